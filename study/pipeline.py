"""The study: the paper's rounds procedure (docs/design.md §4) for every arm and several seeds, on the testbed.

One world (testbed + SFT model, shared), then for every seed s, with the stages run as subprocesses:

    RM₀ ← reward.py on D                                                        vanilla RM (Eq. 1), seed s
    vanilla   π ← PPO with RM₀                                                   "vanilla PPO"
    metarm    for r = 1 … R: S_r ← k samples per prompt from π_{r−1} (π₀ = SFT)
                             RM_r ← MetaRM (Algorithm 1) on D with S_r, from RM_{r−1}
                             π_r  ← PPO with RM_r
    eta0      the same rounds with the ascent off (η = 0): RM_r ← one more epoch on D (reward.py, the same pair
              order as meta_rm.py; η = 0 makes Algorithm 1 exactly that) — separates "the meta step" from
              "one more epoch of RM training", which the paper's tables confound
    oracle    the same rounds with labels: every two responses of S_r (sampled from the oracle chain's own π_{r−1})
              labelled by the testbed's annotator, RM_r ← one epoch on D ∪ those pairs, from RM_{r−1}: the
              fresh-labels upper bound MetaRM tries to approach without labels
    dpo       DPO on D from the SFT model (no reward model)
    evaluation  every policy vs SFT (gold judge, greedy, held-out prompts); the gold-vs-√KL curve of every PPO run
              (ppo.py --eval-prompts); RM accuracy (ID / OOD) and reward gaps of every RM; best-of-n under RM₀

and `report.py` turns the folder into report.md / results.json / figures with intervals over seeds. Within a seed
every arm's PPO runs use the same seed, so arm − vanilla differences are paired.

Every stage is the command a user would type (printed before it runs; its output goes to OUT/logs/). Up to --jobs
stages run at once, each with --threads threads, so the cores are never oversubscribed. A finished stage leaves a
marker in OUT/.done/: running the same command again skips it, so a crash costs only the stages in flight.

Commands
    python pipeline.py                         # the default: 5 seeds, every arm, 1 round (~1 h on 2 cores)
    python pipeline.py --study                 # the full study: 5 seeds, every arm, 3 rounds
    python pipeline.py --eta-sweep 0,0.03,0.1,0.3,1 --arms vanilla,metarm --rounds 1 --out runs/eta_sweep
    python pipeline.py --nproc 2 --jobs 1      # every stage under torchrun with 2 processes (FSDP2)
    python pipeline.py --toy --seeds 2 --out runs/toy  # a smoke run of every stage (numbers mean nothing)

Choices the paper leaves open (flags; defaults in brackets)
  1. --rm-init [previous]: round r's RM starts from RM_{r−1} (round 1: RM₀), so the RM keeps adapting to each new
     policy; `sft` starts every round from the SFT model with a fresh head.
  2. --ppo-init [sft]: every round's PPO starts from the SFT model with that round's RM and the same budget as
     vanilla PPO, so "round r vs vanilla PPO" compares reward models and nothing else; `previous` continues from
     π_{r−1}. S_r is sampled from the previous round's policy either way. The KL reference is always SFT.
  3. Round 1 samples S from the SFT model, later rounds from the previous round's policy, at temperature 1.0 (PPO
     samples at 0.8) so the k samples differ.
  4. The testbed's tiny model needs other learning rates and a larger ascent step η than the paper's 7B values
     (TESTBED below, each with its reason; docs/calibration.md says how the testbed's knobs were chosen).
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

import dpo
from plumbing import common
from plumbing.common import Valid, arg, check, non_negative, or_sentinel, positive
from study import report

# Hyper-parameters of the testbed (tiny Llama, ~1M parameters, trained from random initialisation); sequences are
# short (prompt <= 20, response <= 31 tokens), hence --max-len 64 and 32 new tokens.
TESTBED = {
    # visible errors (testbed.py's default) and 8000 pairs: chosen on the vanilla arm (docs/calibration.md)
    "testbed": ["--n-pairs-train", "8000"],
    # from scratch, the paper's 2e-5 learns nothing in 500 steps; 3e-3 reaches EOS rate 1.0
    "sft": ["--lr", "3e-3", "--max-len", "64", "--micro-batch-size", "32"],
    # the paper's 5e-6 barely moves a fresh head on a 1M model in one epoch; 1e-3 and 3e-3 were worse than 3e-4
    # (docs/calibration.md)
    "reward": ["--lr", "3e-4", "--max-len", "64", "--micro-batch-size", "16", "--eval-every", "0"],
    # S: 256 prompts (192 train + 64 held out) x k = 5; each meta step draws m = 16 of them
    "meta_data": ["--max-prompts", "256", "--heldout", "64", "--max-new-tokens", "32"],
    # α as reward.py; η = 0.3 makes ‖θ' − θ‖ = η‖∇J‖ ≈ 0.1, the size of one Adam step of the RM; with the paper's
    # 5e-6 the step is ~1e-6 and the meta step does nothing. Chosen from that scale argument, not tuned.
    "meta_rm": ["--lr", "3e-4", "--eta", "0.3", "--max-len", "64", "--log-adapted-every", "10", "--eval-every", "0"],
    # 64 rollouts per iteration (16 prompts x 4), 2 epochs of 2 mini-batches; the held-out curve every 10
    # iterations (100 prompts x 4 samples)
    "ppo": ["--policy-lr", "1e-4", "--critic-lr", "1e-4", "--rollouts-per-prompt", "4", "--prompts-per-iteration",
            "16", "--mini-batch-size", "32", "--micro-batch-size", "32", "--max-new-tokens", "32", "--iterations",
            "80", "--sample-every", "0", "--save-every", "0", "--eval-every", "10", "--eval-samples", "4"],
    # dpo.py's own TESTBED (each value with its reason there); one epoch over the 8000 pairs is 500 steps, as
    # its two epochs over 4000 were
    "dpo": [*dpo.TESTBED, "--epochs", "1"],
    "evaluate": ["--max-new-tokens", "32", "--max-len", "64"],
    "best_of_n": ["--samples", "64", "--max-new-tokens", "32", "--max-len", "64"],
}
# --toy: sizes for a smoke run of every stage in a few minutes (tests); the numbers mean nothing there.
TOY = {
    "testbed": ["--n-sft", "256", "--n-pairs-train", "64", "--n-pairs-test", "32", "--n-rl-prompts", "64",
                "--n-eval-prompts", "8", "--n-ood-prompts", "32", "--n-ood-pairs-test", "16"],
    "sft": ["--epochs", "1", "--eval-samples", "8", "--max-new-tokens", "8"],
    "meta_data": ["--max-prompts", "24", "--heldout", "8", "--max-new-tokens", "8", "--k", "3"],
    "meta_rm": [],
    "ppo": ["--iterations", "2", "--prompts-per-iteration", "4", "--max-new-tokens", "8", "--mini-batch-size", "16",
            "--micro-batch-size", "16", "--eval-every", "1", "--eval-samples", "1"],
    "dpo": ["--max-steps", "2"],
    "evaluate": ["--max-new-tokens", "8"],
    "best_of_n": ["--samples", "4", "--max-new-tokens", "8"],
}
ARMS = ("vanilla", "metarm", "eta0", "oracle", "dpo")
SEEDS = Valid("an integer in [1, 12] (report.py's exact bootstrap enumerates the resamples)",
              lambda x: isinstance(x, int) and 1 <= x <= 12, (0, 13))


@dataclasses.dataclass
class Args:
    out: str = arg("runs/pipeline", "output folder: testbed/, sft/, seed<s>/…, logs/, report.md, results.json, "
                                    "figures/")
    seeds: int = arg(5, "seeds 0 … N−1; each seed has its own RMs, meta sets and PPO runs (the world and the SFT "
                        "model are shared)", valid=SEEDS)
    arms: str = arg(",".join(ARMS), "comma-separated arms: " + ", ".join(ARMS) + " (vanilla is always run: "
                    "it is the baseline of every comparison)")
    rounds: int = arg(1, "MetaRM rounds after the vanilla RM (paper: 4 for dialogue, 5 for summarisation)",
                      valid=non_negative)
    study: bool = arg(False, "the full study: --seeds 5 --arms " + ",".join(ARMS) + " --rounds 3 (flags given "
                             "explicitly still win)")
    eta_sweep: str = arg("", "comma-separated η values: round-1 MetaRM from RM₀ with each η, then PPO (its own "
                             "figure); empty = none")
    jobs: int = arg(0, "stages run at once; 0 = the cores this process may use // (--threads x --nproc)",
                    valid=non_negative)
    threads: int = arg(1, "intra-op threads per stage process (OMP_NUM_THREADS)", valid=positive)
    nproc: int = arg(1, "processes per stage (torchrun --nproc_per_node); 1 = plain python", valid=positive)
    model_size: str = arg("tiny", "testbed model size (tiny ~1M, small ~5M, medium ~28M parameters)",
                          choices=["tiny", "small", "medium"])
    world_seed: int = arg(0, "seed of the testbed and of the SFT model, shared by all seeds", valid=common.seed)
    rm_init: str = arg("previous", "round r's RM starts from RM_{r-1} (previous) or from SFT (sft)",
                       choices=["previous", "sft"])
    ppo_init: str = arg("sft", "round r's PPO starts from SFT (sft) or from π_{r-1} (previous)",
                        choices=["previous", "sft"])
    meta_order: int = arg(1, "MetaRM gradient: 1 = first order (paper), 2 = exact", choices=[1, 2])
    eta: float = arg(-1.0, "η of the meta step; -1 = the testbed value in TESTBED (0.3)",
                     valid=or_sentinel(-1, "the testbed value", non_negative))
    ood: bool = arg(False, "build S from the OOD prompts instead of the RL prompts (paper's OOD experiment)")
    toy: bool = arg(False, "tiny data and step counts: a smoke run of every stage (numbers mean nothing)")
    stage_flags: str = arg("", "extra flags per stage after TESTBED's (later flags win), e.g. \"ppo: --kl-coef 0.02 "
                               "--iterations 160; testbed: --errors subtle\" (how docs/calibration.md's runs were made)")
    save_every: int = arg(0, "sft, reward, meta_rm and ppo save a resumable checkpoint every N steps (ppo: "
                             "iterations), and a rerun continues an interrupted one from it (--resume); 0 = an "
                             "interrupted stage starts over", valid=non_negative)


STUDY_DEFAULTS = {"seeds": 5, "arms": ",".join(ARMS), "rounds": 3}


@dataclasses.dataclass
class Task:
    """One stage run: `script flags` under OUT/logs/<name>.log, after every task in `deps` finished. `prepare`, if
    given, runs in this process just before the stage starts (e.g. to concatenate two data files)."""
    name: str
    script: str
    flags: list[str]
    deps: list[str]
    prepare: Callable[[], None] | None = None


def metarm_eta(eta: float) -> float:
    """The η the metarm arm runs with: --eta, or TESTBED's when --eta is -1."""
    flags = TESTBED["meta_rm"]
    return eta if eta >= 0 else float(flags[flags.index("--eta") + 1])


def with_flag(flags: list[str], flag: str, value: str) -> list[str]:
    """`flags` with `flag`'s value set to `value` (replaced where it is there, else appended), so a printed command
    names each flag once."""
    flags = list(flags)
    if flag in flags:
        flags[flags.index(flag) + 1] = value
        return flags
    return flags + [flag, value]


def per_process(flags: list[str], nproc: int) -> list[str]:
    """The micro-batch sizes in TESTBED / TOY are for one process: with N processes each takes 1/N of them, so the
    global batch (micro-batch x accumulation x processes) stays the same."""
    flags = list(flags)
    for i, flag in enumerate(flags[:-1]):
        if flag == "--micro-batch-size":
            flags[i + 1] = str(max(1, int(flags[i + 1]) // nproc))
    return flags


def stage_flags(args: Args) -> dict[str, list[str]]:
    """TESTBED (+ TOY with --toy), split over --nproc processes, with --eta and --stage-flags applied."""
    hp = {stage: per_process(flags + (TOY.get(stage, []) if args.toy else []), args.nproc)
          for stage, flags in TESTBED.items()}
    if args.eta >= 0:
        hp["meta_rm"] = with_flag(hp["meta_rm"], "--eta", str(args.eta))
    for part in filter(str.strip, args.stage_flags.split(";")):
        stage, sep, flags = part.partition(":")
        check(sep == ":" and stage.strip() in hp, f"--stage-flags {part.strip()!r}: expected 'stage: --flag value', "
                                                  f"stage one of {', '.join(hp)}")
        hp[stage.strip()] += shlex.split(flags)
    return hp


# ----------------------------------------------------------------------------------------------------------------
# The plan: every stage of every seed and arm, with its dependencies
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class World:
    """The shared paths."""
    out: str
    data: str
    base_model: str
    sft: str

    def file(self, name: str) -> str:
        return os.path.join(self.data, f"{name}.jsonl")


def plan(args: Args, hp: dict[str, list[str]], arms: list[str], sweep: list[float]) -> list[Task]:
    out = os.path.abspath(args.out)
    w = World(out, os.path.join(out, "testbed", "data"), os.path.join(out, "testbed", "base_model"),
              os.path.join(out, "sft"))
    tasks = [Task("testbed", "testbed", ["--out", os.path.join(out, "testbed"), "--seed", str(args.world_seed),
                                            "--model-size", args.model_size, *hp["testbed"]], []),
             Task("sft", "sft.py", ["--model", w.base_model, "--data", w.file("sft_train"), "--eval-prompts",
                                    w.file("eval_prompts"), "--out", w.sft, "--seed", str(args.world_seed),
                                    *hp["sft"]], ["testbed"])]
    for s in range(args.seeds):
        tasks += seed_tasks(args, hp, w, s, arms, sweep)
    return tasks


def seed_tasks(args: Args, hp: dict[str, list[str]], w: World, s: int, arms: list[str],
               sweep: list[float]) -> list[Task]:
    """The stages of one seed (see the module docstring). Task names are paths under OUT: seed<s>/<arm>/…"""
    root = f"seed{s}"
    at = lambda name: os.path.join(w.out, name)  # noqa: E731  (a task's output folder is OUT/<task name>)
    pairs = ["--test", w.file("pairs_test")]
    meta_prompts = w.file("ood_prompts" if args.ood else "rl_prompts")
    tasks = [Task(f"{root}/rm0", "reward.py", ["--model", w.sft, "--train", w.file("pairs_train"), *pairs, "--out",
                                               at(f"{root}/rm0"), "--seed", str(s), *hp["reward"]], ["sft"])]

    def ppo(name: str, rm: str, deps: list[str], init: str | None = None) -> None:
        tasks.append(Task(name, "ppo.py", ["--sft", w.sft, "--policy", init or w.sft, "--rm", at(rm), "--prompts",
                                           w.file("rl_prompts"), "--eval-prompts", w.file("eval_prompts"), "--out",
                                           at(name), "--seed", str(s), *hp["ppo"]], [rm, *deps]))

    def meta_set(name: str, policy: str, deps: list[str], r: int) -> None:
        tasks.append(Task(name, "meta_data.py", ["--policy", policy, "--prompts", meta_prompts, "--out", at(name),
                                                 "--seed", str(100 * s + r), "--oracle-pairs", *hp["meta_data"]],
                          deps))

    ppo(f"{root}/vanilla/ppo", f"{root}/rm0", [])
    for arm in [a for a in arms if a in ("metarm", "eta0", "oracle")]:
        rm_prev, policy_prev = f"{root}/rm0", None
        for r in range(1, args.rounds + 1):
            base = f"{root}/{arm}/round{r}"
            # S_r: round 1 samples the SFT model (one S shared by the arms); later rounds the chain's own policy
            S = f"{root}/S1" if r == 1 else (f"{root}/metarm/round{r}/S" if arm in ("metarm", "eta0") else f"{base}/S")
            if r == 1 and not any(t.name == S for t in tasks):
                meta_set(S, w.sft, ["sft"], 1)
            elif r > 1 and arm != "eta0":
                meta_set(S, at(policy_prev), [policy_prev], r)
            start = rm_prev if args.rm_init == "previous" else "sft"
            deps = [S, start] if start != "sft" else [S, "sft"]
            rm_from = at(start) if start != "sft" else w.sft
            if arm == "metarm":
                tasks.append(Task(f"{base}/rm", "meta_rm.py", [
                    "--model", rm_from, "--train", w.file("pairs_train"), *pairs, "--meta", f"{at(S)}/meta_train.jsonl",
                    "--meta-heldout", f"{at(S)}/meta_heldout.jsonl", "--out", at(f"{base}/rm"), "--meta-order",
                    str(args.meta_order), "--seed", str(100 * s + r), *hp["meta_rm"],
                    *(["--fresh-head"] if start == "sft" else [])], deps))  # an RM from SFT, on purpose
            elif arm == "eta0":  # the same epoch over D in the same order as meta_rm.py, without the ascent
                deps = [d for d in deps if d != S]
                tasks.append(Task(f"{base}/rm", "reward.py", [
                    "--model", rm_from, "--train", w.file("pairs_train"), *pairs, "--out", at(f"{base}/rm"),
                    "--seed", str(100 * s + r), *hp["reward"]], deps))
            else:  # oracle: D plus the fresh gold labels of S_r
                train = at(f"{base}/train_pairs.jsonl")
                tasks.append(Task(f"{base}/rm", "reward.py", [
                    "--model", rm_from, "--train", train, *pairs, "--out", at(f"{base}/rm"), "--seed",
                    str(100 * s + r), *hp["reward"]], deps,
                    prepare=concatenate(train, [w.file("pairs_train"), f"{at(S)}/oracle_pairs.jsonl"])))
            init = at(policy_prev) if args.ppo_init == "previous" and policy_prev else None
            ppo(f"{base}/ppo", f"{base}/rm", [policy_prev] if init else [], init)
            rm_prev, policy_prev = f"{base}/rm", f"{base}/ppo"
    for eta in sweep:
        base = f"{root}/sweep/eta{eta:g}"
        if not any(t.name == f"{root}/S1" for t in tasks):
            meta_set(f"{root}/S1", w.sft, ["sft"], 1)
        tasks.append(Task(f"{base}/rm", "meta_rm.py", [
            "--model", at(f"{root}/rm0"), "--train", w.file("pairs_train"), *pairs, "--meta",
            f"{at(root)}/S1/meta_train.jsonl", "--meta-heldout", f"{at(root)}/S1/meta_heldout.jsonl", "--out",
            at(f"{base}/rm"), "--meta-order", str(args.meta_order), "--seed", str(100 * s + 1),
            *with_flag(hp["meta_rm"], "--eta", f"{eta:g}")], [f"{root}/S1", f"{root}/rm0"]))
        ppo(f"{base}/ppo", f"{base}/rm", [])
    if "dpo" in arms:
        tasks.append(Task(f"{root}/dpo", "dpo.py", ["--model", w.sft, "--train", w.file("pairs_train"), *pairs,
                                                    "--eval-prompts", w.file("eval_prompts"), "--out", at(f"{root}/dpo"),
                                                    "--seed", str(s), *hp["dpo"]],
                          ["sft"]))
    return tasks + evaluation_tasks(hp, w, s, tasks)


def evaluation_tasks(hp: dict[str, list[str]], w: World, s: int, tasks: list[Task]) -> list[Task]:
    """Every policy of the seed vs SFT (gold judge, greedy); every RM side by side; best-of-n under RM₀."""
    root, at = f"seed{s}", lambda name: os.path.join(w.out, name)  # noqa: E731
    out: list[Task] = []
    policies = [t.name for t in tasks if t.script in ("ppo.py", "dpo.py")]
    for policy in policies:
        out.append(Task(f"{root}/eval/{report.policy_key(policy)}", "evaluate.py", [
            "--policy-a", at(policy), "--policy-b", w.sft, "--name-a", report.policy_key(policy), "--name-b", "sft",
            "--prompts", w.file("eval_prompts"), "--pairs-test", "", "--ood-pairs-test", "", "--judge", "gold",
            "--out", at(f"{root}/eval/{report.policy_key(policy)}"), *hp["evaluate"]], [policy]))
    rms = [t.name for t in tasks if t.name.endswith("/rm") or t.name.endswith("/rm0")]
    # the reward gaps (Fig. 5) on held-out samples of the latest MetaRM policy, else of the SFT model
    meta_sets = [t.name for t in tasks if t.script == "meta_data.py"]
    gap_set = next((n for n in reversed(meta_sets) if "/metarm/" in n), meta_sets[0] if meta_sets else None)
    out.append(Task(f"{root}/eval/rms", "evaluate.py", [
        "--rms", ",".join(f"{report.rm_key(rm)}={at(rm)}" for rm in rms), "--pairs-test", w.file("pairs_test"),
        "--ood-pairs-test", w.file("ood_pairs_test"), "--prompts", w.file("eval_prompts"),
        *(["--gap-set", f"{at(gap_set)}/meta_heldout.jsonl"] if gap_set else []), "--out", at(f"{root}/eval/rms"),
        *hp["evaluate"]], rms + ([gap_set] if gap_set else [])))
    out.append(Task(f"{root}/best_of_n", "study.best_of_n", ["--policy", w.sft, "--rm", at(f"{root}/rm0"), "--prompts",
                                                          w.file("eval_prompts"), "--out", at(f"{root}/best_of_n"),
                                                          "--seed", str(s), *hp["best_of_n"]], [f"{root}/rm0"]))
    return out


def concatenate(path: str, sources: list[str]) -> Callable[[], None]:
    """A `prepare` step: write the lines of `sources` one after the other into `path` (atomically)."""
    def write() -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            for src in sources:
                with open(src) as g:
                    f.writelines(line if line.endswith("\n") else line + "\n" for line in g if line.strip())
        os.replace(path + ".tmp", path)
    return write


# ----------------------------------------------------------------------------------------------------------------
# Running the plan: up to --jobs stages at once, each a subprocess with --threads threads
# ----------------------------------------------------------------------------------------------------------------
def command(args: Args, task: Task) -> tuple[list[str], str]:
    """(the argv to run, the command as a user would type it)."""
    # a stage file at the root (sft.py) runs as a script, a module of a folder (study.best_of_n) with -m
    target = [task.script] if task.script.endswith(".py") else ["-m", task.script]
    script_flags = [*target, *task.flags, *resume_flags(args, task.script)]
    if args.nproc == 1 or task.script == "testbed":
        return [sys.executable, *script_flags], shlex.join(["python", *script_flags])
    launcher = ["--standalone", f"--nproc_per_node={args.nproc}"]
    return ([sys.executable, "-m", "torch.distributed.run", *launcher, *script_flags],
            shlex.join(["torchrun", *launcher, *script_flags]))


def resume_flags(args: Args, script: str) -> list[str]:
    """An unfinished stage starts over (--overwrite), or continues from its last checkpoint (--resume)."""
    if args.save_every > 0 and script in ("sft.py", "reward.py", "meta_rm.py", "ppo.py", "dpo.py"):
        return ["--save-every", str(args.save_every), "--resume"]
    return ["--overwrite"]


def run_tasks(args: Args, tasks: list[Task], jobs: int) -> dict[str, tuple[str, float]]:
    """Run every task whose dependencies are done and whose marker is missing, at most `jobs` at a time; return
    {task: (script, seconds)} of the tasks run now. A failed task stops the launching of new ones (those in flight finish)."""
    out = os.path.abspath(args.out)
    marker = lambda t: os.path.join(out, ".done", t.name)  # noqa: E731
    done = {t.name for t in tasks if os.path.exists(marker(t))}
    todo = [t for t in tasks if t.name not in done]
    if len(done):
        print(f"== {len(done)} of {len(tasks)} stages done already (markers in {out}/.done/)", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    seconds: dict[str, tuple[str, float]] = {}
    script_of = {t.name: t.script for t in tasks}
    failed: list[str] = []
    stopping, restore_signals = pass_signals_on(running)
    while (todo and not failed and not stopping) or running:
        for t in [t for t in todo if all(d in done for d in t.deps)][: max(0, jobs - len(running))]:
            if failed or stopping:
                break
            todo.remove(t)
            if t.prepare:
                t.prepare()
            argv, shown = command(args, t)
            log_path = os.path.join(out, "logs", t.name.replace("/", "__") + ".log")
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            log = open(log_path, "w")
            print(f"[{len(done) + len(running) + 1}/{len(tasks)}] {t.name}\n$ {shown}", flush=True)
            running[t.name] = (subprocess.Popen(argv, cwd=os.path.dirname(os.path.abspath(__file__)), env=env,
                                                stdout=log, stderr=subprocess.STDOUT), time.time(), log)
        time.sleep(0.1)
        for name, (proc, t0, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            seconds[name] = (script_of[name], time.time() - t0)
            if proc.returncode != 0:
                failed.append(name)
                print(f"!! {name} failed (exit status {proc.returncode}); its output: {log.name}", flush=True)
                continue
            done.add(name)
            os.makedirs(os.path.dirname(os.path.join(out, ".done", name)), exist_ok=True)
            with open(os.path.join(out, ".done", name), "w") as f:
                f.write(f"{seconds[name][1]:.1f}\n")
            print(f"   {name}: {seconds[name][1]:.0f} s", flush=True)
    restore_signals()
    if stopping:
        raise common.Interrupted(stopping[0], f"pipeline: stopped by {signal.Signals(stopping[0]).name}; the stages "
                                              "that were running stopped too (with --save-every after a resumable "
                                              "checkpoint): run the same command again to continue")
    if failed:
        raise common.UserError(f"stage {failed[0]} failed (log: {out}/logs/{failed[0].replace('/', '__')}.log); run "
                               "the same command again to continue from there")
    return seconds


def pass_signals_on(running: dict[str, tuple[subprocess.Popen, float, object]]) -> tuple[list[int], Callable]:
    """While the stages run: a SIGTERM sent to the pipeline (a cluster's preemption) is passed on to every running
    stage, which stops at its next step boundary (after a resumable checkpoint with --save-every); SIGINT is not
    passed on (Ctrl-C reaches the stages from the terminal already, and a second one would cut torchrun's own
    shutdown short). Either way nothing new is started and the pipeline waits for the running stages instead of
    dying first. Returns the list the signals are recorded in (empty: none) and the function that puts the previous
    handlers back."""
    stopping: list[int] = []

    def handler(signum: int, frame: object) -> None:
        stopping.append(signum)
        if signum == signal.SIGTERM:
            for proc, _, _ in running.values():
                proc.send_signal(signum)

    if threading.current_thread() is not threading.main_thread():
        return stopping, lambda: None
    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    return stopping, lambda: [signal.signal(signum, h) for signum, h in previous.items()]


def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(Args, argv)
    given = set(argv if argv is not None else sys.argv[1:])
    if args.study:  # the full study, except where a flag was given explicitly
        for key, value in STUDY_DEFAULTS.items():
            if "--" + key not in given:
                setattr(args, key, value)
    arms = ["vanilla"] + [a.strip() for a in args.arms.split(",") if a.strip() and a.strip() != "vanilla"]
    check(all(a in ARMS for a in arms), f"--arms {args.arms}: each must be one of {', '.join(ARMS)}")
    try:
        sweep = [float(x) for x in args.eta_sweep.split(",") if x.strip()]
    except ValueError:
        raise common.UserError(f"--eta-sweep {args.eta_sweep}: expected comma-separated numbers") from None
    check(all(x >= 0 for x in sweep), "--eta-sweep values must be >= 0")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = args.jobs or max(1, cores // (args.threads * args.nproc))
    t_start = time.time()
    common.lock_output(args.out)  # one live pipeline per folder (each stage also locks its own)
    os.makedirs(args.out, exist_ok=True)
    common.save_args(args, args.out)
    tasks = plan(args, stage_flags(args), arms, sweep)
    print(f"pipeline: {len(tasks)} stages ({args.seeds} seeds, arms {', '.join(arms)}, {args.rounds} rounds"
          f"{', η sweep ' + args.eta_sweep if sweep else ''}); {jobs} at a time x {args.threads} thread(s) x "
          f"{args.nproc} process(es) on {cores} cores", flush=True)
    seconds = run_tasks(args, tasks, jobs)
    text = report.write(os.path.abspath(args.out), seeds=list(range(args.seeds)), arms=arms, rounds=args.rounds,
                        sweep=sweep, wall_seconds=time.time() - t_start, stage_seconds=seconds,
                        settings={"jobs": jobs, "threads": args.threads, "nproc": args.nproc,
                                  "model_size": args.model_size, "meta_order": args.meta_order, "ood": args.ood,
                                  "toy": args.toy, "rm_init": args.rm_init, "ppo_init": args.ppo_init,
                                  "eta": metarm_eta(args.eta)})
    print(f"\n{text}\nwrote {args.out}/report.md, results.json and figures/ ({(time.time() - t_start) / 60:.1f} min)")


if __name__ == "__main__":
    common.run_main(main)
