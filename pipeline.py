"""The paper's procedure end to end, in rounds (docs/design.md §4), on the built-in testbed by default.

    testbed ─ SFT ─ RM₀ (vanilla, Eq. 1) ─ PPO₀ ("vanilla PPO")                                          round 0
                 └ for r = 1 … R:  S_r ← k = 5 samples per prompt from π_{r−1} (π₀ of this chain = SFT)
                                   RM_r ← MetaRM (Algorithm 1) on the ORIGINAL pairs D with S_r           round r
                                   π_r  ← PPO with RM_r
    evaluate: π_r vs SFT and vs vanilla PPO (gold judge), RM accuracy per round (ID and OOD), reward-gap
              histograms of every RM on held-out samples of the last policy, diversity → report.md

Every stage is its own script, run as a subprocess (`python stage.py` or `torchrun --nproc_per_node=N stage.py`),
so what the pipeline does is exactly what a user would type; each command is printed before it runs.
A finished stage leaves a marker in OUT/.done/; running the same command again skips finished stages, so a crash
costs only the stage it interrupted.

Commands
    python pipeline.py                               # the default: 3 MetaRM rounds on the tiny testbed, 1 process
    python pipeline.py --nproc 2                     # every stage under torchrun with 2 processes (FSDP2)
    python pipeline.py --ood                         # S built from OOD prompts (the paper's OOD experiment)
    python pipeline.py --toy --rounds 1 --out runs/toy   # a seconds-long smoke run (tests)

Choices the paper leaves open (flags; defaults in brackets)
  1. --rm-init [previous]: round r's MetaRM starts from RM_{r−1} (round 1: the vanilla RM), so the RM keeps adapting
     to each new policy; `sft` starts every round from the SFT model with a fresh head.
  2. --ppo-init [sft]: every round's PPO starts from the SFT model with that round's RM, the same budget as vanilla
     PPO, so "round r vs vanilla PPO" compares reward models and nothing else; `previous` continues from π_{r−1}
     (on the testbed that stacks 40 more PPO iterations per round, and the stacked policy over-optimises: a run with
     `previous` had gold 1.54 / 0.84 / 0.89 for rounds 1–3 against SFT's 1.54). S_r is still sampled from the
     previous round's policy, so the RM of round r meets the distribution PPO drifted to. The KL reference is
     always the SFT model.
  3. Round 1 samples S from the SFT model, later rounds from the previous round's policy (docs/design.md §4), at
     temperature 1.0 (PPO samples at 0.8) so the k samples differ.
  4. The testbed's tiny model needs larger learning rates than the paper's 7B values, and a larger ascent step η
     (with η = 5e-6 the meta step moves θ by ~1e-6 and MetaRM collapses to vanilla training); the values are in
     TESTBED below, each with its reason. Only the paper's structure (1 epoch on D per RM, k = 5, n = m = 16,
     β = 0.05, clip 0.8, GAE 0.95/1) is kept as is.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import common
from common import arg, non_negative, or_sentinel, positive

# Hyper-parameters of the testbed run (tiny Llama, ~1M parameters, trained from random initialisation). Sequences
# are short (prompt <= 20, response <= 26 tokens), hence --max-len 64 and 32 new tokens.
TESTBED = {
    # from scratch, the paper's 2e-5 learns nothing in 500 steps; 3e-3 reaches EOS rate 1.0 and gold ≈ 1.6
    "sft": ["--lr", "3e-3", "--max-len", "64", "--micro-batch-size", "32"],
    # the paper's 5e-6 barely moves a fresh head on a 1M model in 250 steps
    "reward": ["--lr", "3e-4", "--max-len", "64", "--micro-batch-size", "16"],
    # S: 256 prompts (192 train + 64 held out) x k = 5; each meta step draws m = 16 of them
    "meta_data": ["--max-prompts", "256", "--heldout", "64", "--max-new-tokens", "32"],
    # α as reward.py; η = 0.3 makes ‖θ' − θ‖ = η‖∇J‖ ≈ 0.1, the size of one Adam step of the RM (lr 3e-4 over ~1M
    # coordinates moves θ by ~0.3); with the paper's 5e-6 the step is ~1e-6 and J(θ') − J(θ) ≈ 1e-6 (no meta step).
    # Chosen from that scale argument, not tuned on the evaluation prompts.
    "meta_rm": ["--lr", "3e-4", "--eta", "0.3", "--max-len", "64", "--log-adapted-every", "10"],
    # 64 rollouts per iteration (16 prompts x 4), 2 epochs of 2 mini-batches; 40 iterations is where the vanilla
    # RM's score keeps rising while the gold reward has started to fall (over-optimisation)
    "ppo": ["--policy-lr", "1e-4", "--critic-lr", "1e-4", "--rollouts-per-prompt", "4", "--prompts-per-iteration",
            "16", "--mini-batch-size", "32", "--micro-batch-size", "32", "--max-new-tokens", "32", "--iterations",
            "40", "--sample-every", "0", "--save-every", "0"],
    "evaluate": ["--max-new-tokens", "32", "--max-len", "64"],
}
# --toy: sizes for a smoke run of the whole pipeline in about a minute (tests); numbers mean nothing there.
TOY = {
    "testbed": ["--n-sft", "256", "--n-pairs-train", "64", "--n-pairs-test", "32", "--n-rl-prompts", "64",
                "--n-eval-prompts", "8", "--n-ood-prompts", "32", "--n-ood-pairs-test", "16"],
    "sft": ["--epochs", "1", "--eval-samples", "8", "--max-new-tokens", "8"],
    "meta_data": ["--max-prompts", "24", "--heldout", "8", "--max-new-tokens", "8", "--k", "3"],
    "meta_rm": ["--eval-every", "0"],
    "ppo": ["--iterations", "2", "--prompts-per-iteration", "4", "--max-new-tokens", "8", "--mini-batch-size", "16",
            "--micro-batch-size", "16"],
    "evaluate": ["--max-new-tokens", "8"],
}


@dataclasses.dataclass
class Args:
    out: str = arg("runs/pipeline", "output folder: one sub-folder per stage, report.md, results.json, figures")
    rounds: int = arg(3, "MetaRM rounds after round 0 (paper: 4 for dialogue, 5 for summarisation)", valid=non_negative)
    nproc: int = arg(1, "processes per stage (torchrun --nproc_per_node); 1 = plain python", valid=positive)
    model_size: str = arg("tiny", "testbed model size (tiny ~1M, small ~5M, medium ~28M parameters)",
                          choices=["tiny", "small", "medium"])
    seed: int = arg(0, "seed of the testbed and of every stage", valid=common.seed)
    threads: int = arg(0, "--threads of every stage (0 = each stage's own auto rule, see its --help)",
                       valid=non_negative)
    rm_init: str = arg("previous", "round r's MetaRM starts from RM_{r-1} (previous) or from SFT (sft)",
                       choices=["previous", "sft"])
    ppo_init: str = arg("sft", "round r's PPO starts from SFT (sft) or from π_{r-1} (previous)",
                        choices=["previous", "sft"])
    meta_order: int = arg(1, "MetaRM gradient: 1 = first order (paper), 2 = exact", choices=[1, 2])
    eta: float = arg(-1.0, "η of the meta step; -1 = the testbed value in TESTBED (0.3)",
                     valid=or_sentinel(-1, "the testbed value", non_negative))
    ood: bool = arg(False, "build S from the OOD prompts instead of the RL prompts (paper's OOD experiment)")
    toy: bool = arg(False, "tiny data and step counts: a smoke run of every stage (numbers mean nothing)")
    save_every: int = arg(0, "sft, reward, meta_rm and ppo save a resumable checkpoint every N steps (ppo: "
                             "iterations), and a rerun continues an interrupted one from it (--resume); 0 = an "
                             "interrupted stage starts over", valid=non_negative)


def per_process(flags: list[str], nproc: int) -> list[str]:
    """The micro-batch sizes in TESTBED / TOY are for one process: with N processes each takes 1/N of them, so the
    global batch (micro-batch x accumulation x processes) stays the same."""
    flags = list(flags)
    for i, flag in enumerate(flags[:-1]):
        if flag == "--micro-batch-size":
            flags[i + 1] = str(max(1, int(flags[i + 1]) // nproc))
    return flags


def run_stage(args: Args, name: str, script: str, flags: list[str]) -> None:
    """Run one stage as a subprocess unless its .done marker exists; stop the pipeline if it fails."""
    marker = os.path.join(args.out, ".done", name)
    if os.path.exists(marker):
        print(f"== {name}: done already (remove {marker} to run it again)", flush=True)
        return
    launcher = [sys.executable] if args.nproc == 1 or script == "testbed.py" else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    # An unfinished stage starts over (--overwrite), or continues from its last checkpoint (--resume)
    resumable = args.save_every > 0 and script in ("sft.py", "reward.py", "meta_rm.py", "ppo.py")
    again = ["--save-every", str(args.save_every), "--resume"] if resumable else ["--overwrite"]
    again += ["--threads", str(args.threads)] if args.threads > 0 else []
    cmd = launcher + [script, *flags, *again]
    shown = ["python", *cmd[1:]] if len(launcher) == 1 else ["torchrun", *cmd[3:]]  # what a user would type
    print(f"\n== {name}\n$ {shlex.join(shown)}", flush=True)
    t0 = time.time()
    rc = wait_passing_on_signals(subprocess.Popen(cmd, cwd=os.path.dirname(os.path.abspath(__file__))))
    if rc - 128 in (signal.SIGINT, signal.SIGTERM):  # the stage stopped itself (and saved, with --save-every)
        raise common.Interrupted(rc - 128, f"pipeline: stage {name} was stopped by {signal.Signals(rc - 128).name}; "
                                           "run the same command again to continue"
                                 + (" from its last checkpoint" if resumable else ""))
    if rc != 0:
        raise common.UserError(f"stage {name} failed (exit status {rc}); run the same command again to resume there")
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    with open(marker, "w") as f:
        json.dump({"seconds": time.time() - t0}, f)
    print(f"== {name}: {time.time() - t0:.0f} s", flush=True)


def wait_passing_on_signals(proc: subprocess.Popen) -> int:
    """Wait for a stage's process and return its exit status. A SIGTERM sent to the pipeline (a cluster's preemption)
    is passed on to the stage, which stops at its next step boundary (after a resumable checkpoint with
    --save-every); SIGINT is not passed on: Ctrl-C reaches the stage from the terminal already, and a second one
    would cut torchrun's own shutdown short. Either way the pipeline waits for the stage instead of dying first."""
    if threading.current_thread() is not threading.main_thread():
        return proc.wait()
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, lambda signum, frame: None),
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))}
    try:
        return proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(Args, argv)
    t_start = time.time()
    out = os.path.abspath(args.out)
    common.lock_output(out)  # one live pipeline per folder (each stage also locks its own)
    os.makedirs(out, exist_ok=True)
    common.save_args(args, out)
    hp = {stage: per_process(list(flags) + (TOY.get(stage, []) if args.toy else []), args.nproc)
          for stage, flags in TESTBED.items()}
    hp["testbed"] = TOY["testbed"] if args.toy else []
    if args.eta >= 0:
        hp["meta_rm"] += ["--eta", str(args.eta)]
    tb = os.path.join(out, "testbed")
    data = os.path.join(tb, "data")
    sft = os.path.join(out, "sft")

    # ---- round 0: testbed -> SFT -> vanilla RM -> vanilla PPO ----
    run_stage(args, "testbed", "testbed.py", ["--out", tb, "--seed", str(args.seed), "--model-size", args.model_size,
                                              *hp["testbed"]])
    run_stage(args, "sft", "sft.py", ["--model", os.path.join(tb, "base_model"), "--data",
                                      os.path.join(data, "sft_train.jsonl"), "--eval-prompts",
                                      os.path.join(data, "eval_prompts.jsonl"), "--out", sft, "--seed",
                                      str(args.seed), *hp["sft"]])
    pairs = ["--train", os.path.join(data, "pairs_train.jsonl"), "--test", os.path.join(data, "pairs_test.jsonl")]
    rms, policies = [os.path.join(out, "round0", "rm")], [os.path.join(out, "round0", "ppo")]
    run_stage(args, "round0/rm", "reward.py", ["--model", sft, *pairs, "--out", rms[0], "--seed", str(args.seed),
                                               *hp["reward"]])
    ppo_common = ["--sft", sft, "--prompts", os.path.join(data, "rl_prompts.jsonl"), "--seed", str(args.seed),
                  *hp["ppo"]]
    run_stage(args, "round0/ppo", "ppo.py", ["--rm", rms[0], "--out", policies[0], *ppo_common])

    # ---- rounds 1..R: S_r from the latest policy -> MetaRM on D -> PPO ----
    chain = sft  # the latest policy of the MetaRM chain: SFT before round 1
    meta_prompts = os.path.join(data, "ood_prompts.jsonl" if args.ood else "rl_prompts.jsonl")
    for r in range(1, args.rounds + 1):
        rdir = os.path.join(out, f"round{r}")
        meta_set = os.path.join(rdir, "meta_set")
        run_stage(args, f"round{r}/meta_set", "meta_data.py", ["--policy", chain, "--prompts", meta_prompts,
                                                                "--out", meta_set, "--seed", str(args.seed + r),
                                                                *hp["meta_data"]])
        rm_start = rms[-1] if args.rm_init == "previous" else sft
        rms.append(os.path.join(rdir, "rm"))
        run_stage(args, f"round{r}/meta_rm", "meta_rm.py", [
            "--model", rm_start, *pairs, "--meta", os.path.join(meta_set, "meta_train.jsonl"), "--meta-heldout",
            os.path.join(meta_set, "meta_heldout.jsonl"), "--out", rms[-1], "--meta-order", str(args.meta_order),
            "--seed", str(args.seed + r), *(["--fresh-head"] if rm_start == sft else []), *hp["meta_rm"]])
        policies.append(os.path.join(rdir, "ppo"))
        init = chain if args.ppo_init == "previous" else sft
        run_stage(args, f"round{r}/ppo", "ppo.py", ["--rm", rms[-1], "--policy", init, "--out", policies[-1],
                                                     *ppo_common])
        chain = policies[-1]

    # ---- evaluation ----
    results = evaluate_all(args, out, data, sft, rms, policies, hp["evaluate"])
    results["wall_seconds"] = time.time() - t_start
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    report = write_report(args, out, results)
    print(f"\n{report}\nwrote {out}/report.md and {out}/results.json ({results['wall_seconds'] / 60:.1f} min)")


def evaluate_all(args: Args, out: str, data: str, sft: str, rms: list[str], policies: list[str],
                 flags: list[str]) -> dict:
    """Run evaluate.py for every comparison of the paper's tables and figures; collect their results.json."""
    ev = os.path.join(out, "eval")
    common_flags = ["--prompts", os.path.join(data, "eval_prompts.jsonl"), "--pairs-test", "", "--ood-pairs-test",
                    "", "--judge", "gold", *flags]
    results: dict = {"vs_sft": {}, "vs_vanilla": {}}
    for r, policy in enumerate(policies):
        name = "vanilla PPO" if r == 0 else f"MetaRM round {r}"
        folder = os.path.join(ev, f"round{r}_vs_sft")
        run_stage(args, f"eval/round{r}_vs_sft", "evaluate.py", [
            "--policy-a", policy, "--policy-b", sft, "--name-a", name, "--name-b", "SFT", "--out", folder,
            *common_flags])
        results["vs_sft"][name] = load_results(folder)
        if r > 0:
            folder = os.path.join(ev, f"round{r}_vs_vanilla")
            run_stage(args, f"eval/round{r}_vs_vanilla", "evaluate.py", [
                "--policy-a", policy, "--policy-b", policies[0], "--name-a", name, "--name-b", "vanilla PPO",
                "--out", folder, *common_flags])
            results["vs_vanilla"][name] = load_results(folder)
    # reward models side by side: accuracy (ID and OOD), gaps on held-out samples of the last policy, curves
    rm_names = ["vanilla"] + [f"metarm_r{r}" for r in range(1, len(rms))]
    gap_set = os.path.join(out, f"round{len(rms) - 1}", "meta_set", "meta_heldout.jsonl")
    folder = os.path.join(ev, "rms")
    run_stage(args, "eval/rms", "evaluate.py", [
        "--rms", ",".join(f"{n}={p}" for n, p in zip(rm_names, rms)),
        "--pairs-test", os.path.join(data, "pairs_test.jsonl"), "--ood-pairs-test",
        os.path.join(data, "ood_pairs_test.jsonl"),
        *(["--gap-set", gap_set] if os.path.exists(gap_set) else ["--gap-policy", policies[-1]]),
        "--rm-metrics", ",".join(f"{n}={p}/metrics.jsonl" for n, p in zip(rm_names, rms)),
        "--ppo-metrics", ",".join(f"round{r}={p}/metrics.jsonl" for r, p in enumerate(policies)),
        "--diff-checkpoints", ",".join([f"sft={sft}"] + [f"round{r}={p}" for r, p in enumerate(policies)]),
        "--prompts", os.path.join(data, "eval_prompts.jsonl"), "--out", folder, *flags])
    results["rms"] = load_results(folder)
    return results


def load_results(folder: str) -> dict:
    with open(os.path.join(folder, "results.json")) as f:
        return json.load(f)


def write_report(args: Args, out: str, results: dict) -> str:
    """report.md in the paper's shapes: Table 1 (vs SFT per round), Table 2 (vs vanilla PPO), RM accuracy (Fig. 4's
    claim), reward-gap histogram (Fig. 5), with links to the figures evaluate.py drew."""
    lines = [f"# MetaRM on the testbed: {args.rounds} rounds ({'OOD' if args.ood else 'in-distribution'} S)", "",
             f"Wall time {results['wall_seconds'] / 60:.1f} min, {args.nproc} process(es), model {args.model_size}, "
             f"seed {args.seed}, meta order {args.meta_order}.", "",
             "## Table 1 shape: each policy vs SFT (gold judge, greedy responses, held-out prompts)", "",
             "| policy | win % | tie % | lose % | gold (policy) | gold (SFT) |", "|---|---|---|---|---|---|"]
    for name, res in results["vs_sft"].items():
        w = res["win_tie_lose"]
        lines.append(f"| {name} | {w['win_pct']:.0f} | {w['tie_pct']:.0f} | {w['lose_pct']:.0f} | "
                     f"{w['gold_mean_a']:.3f} | {w['gold_mean_b']:.3f} |")
    lines += ["", "## Table 2 shape: MetaRM rounds vs vanilla PPO (gold judge)", "",
              "| policy | win % | tie % | lose % |", "|---|---|---|---|"]
    for name, res in results["vs_vanilla"].items():
        w = res["win_tie_lose"]
        lines.append(f"| {name} | {w['win_pct']:.0f} | {w['tie_pct']:.0f} | {w['lose_pct']:.0f} |")
    lines += ["", "## Reward models: accuracy on held-out pairs (Fig. 4's claim) and reward gaps (Fig. 5)", "",
              "| RM | acc (labels) | acc (gold order) | OOD acc (labels) | OOD acc (gold) | gap mean (raw) | "
              "normalised gaps < 0.2 | J (Eq. 2) |", "|---|---|---|---|---|---|---|---|"]
    for name, res in results["rms"]["reward_models"].items():
        idd, ood, gaps = res["test"], res["ood_test"], res["gaps"]
        lines.append(f"| {name} | {idd['acc']:.3f} | {idd['acc_gold']:.3f} | {ood['acc']:.3f} | {ood['acc_gold']:.3f} | "
                     f"{gaps['gap_mean']:.4f} | {gaps['normalised_below_0.2']:.2f} | {gaps['J']:.4f} |")
    lines += ["", "Variance of r(x, s1) − r(x, s2) over the policies (Fig. 1), per RM:", "",
              "| RM | " + " | ".join(next(iter(results["rms"]["reward_models"].values()))["diff12_var"]) + " |",
              "|---|" + "---|" * len(next(iter(results["rms"]["reward_models"].values()))["diff12_var"])]
    for name, res in results["rms"]["reward_models"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in res["diff12_var"].values()) + " |")
    lines += ["", "Figures: [reward gaps](eval/rms/reward_gaps.png), [RM accuracy](eval/rms/rm_accuracy.png), "
                  "[PPO rewards](eval/rms/ppo_rewards.png), [Fig. 1 variance](eval/rms/diff_variance.png)", ""]
    text = "\n".join(lines)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    common.run_main(main)
