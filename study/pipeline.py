"""The study: the paper's rounds (docs/design.md §4) for every arm over seeds, on the testbed.

One world (testbed + SFT model, shared), then for every seed s, with the stages run as subprocesses:

    RM₀ ← reward.py on D                                            vanilla RM (Eq. 1), seed s
    vanilla   π ← PPO with RM₀                                       "vanilla PPO"
    metarm    for r = 1 … R: S_r ← k samples per prompt from π_{r−1} (π₀ = SFT)
                             RM_r ← MetaRM (Algorithm 1) on D with S_r, from RM_{r−1}
                             π_r  ← PPO with RM_r
    eta0      the same rounds with the ascent off (η = 0): RM_r ← one more epoch on D (reward.py,
              the same pair order as meta_rm.py; η = 0 makes Algorithm 1 exactly that) —
              separates "the meta step" from "one more epoch of RM training", which the paper's
              tables confound
    oracle    the same rounds with labels: every two responses of S_r (sampled from the oracle
              chain's own π_{r−1}) labelled by the testbed's annotator, RM_r ← one epoch on D ∪
              those pairs, from RM_{r−1}: the fresh-labels upper bound MetaRM tries to approach
              without labels
    dpo       DPO on D from the SFT model (no reward model)
    random    control: MetaRM's rounds with the ascent along a random direction of the same length
    sftS      control: MetaRM's rounds with J always on S₁ (the SFT model's samples); its round 1
              is MetaRM's round 1, run once
    oracleM   control: the oracle with one gold label per meta sample
    evaluation  every policy vs SFT (gold judge, greedy, held-out prompts); the gold-vs-√KL curve
              of every PPO run (ppo.py --eval-prompts); RM accuracy (ID / OOD) and reward gaps of
              every RM; best-of-n under RM₀

and `study/report.py` turns the folder into report.md / results.json / figures with intervals over
seeds. Within a seed every arm's PPO runs use the same seed, so arm − vanilla differences are
paired.

Every stage is the command a user would type (printed before it runs; its output goes to OUT/logs/).
Up to --jobs stages run at once, each with --threads threads, so the cores are never oversubscribed.
A finished stage leaves a marker in OUT/.done/: running the same command again skips it, so a crash
costs only the stages in flight.

Commands
    python -m study                     # the default: 5 seeds, every arm, 1 round (~50 min on 2 cores)
    python -m study --study             # the full study: 8 seeds, every arm and control, 3 rounds
    python -m study --eta-sweep 0,0.03,0.1,0.3,1 --arms vanilla,metarm --rounds 1 \\
        --out runs/eta_sweep
    python -m study --nproc 2 --jobs 1  # every stage under torchrun with 2 processes (FSDP2)
    python -m study --toy --seeds 2 --out runs/toy  # a smoke run of every stage (numbers mean
                                                      nothing)

Choices the paper leaves open (flags; defaults in brackets)
  1. --rm-init [previous]: round r's RM starts from RM_{r−1} (round 1: RM₀), so the RM keeps
     adapting to each new policy; `sft` starts every round from the SFT model with a fresh head.
  2. --ppo-init [sft]: every round's PPO starts from the SFT model with that round's RM and the
     same budget as vanilla PPO, so "round r vs vanilla PPO" compares reward models and nothing
     else; `previous` continues from π_{r−1}. S_r is sampled from the previous round's policy
     either way. The KL reference is always SFT.
  3. Round 1 samples S from the SFT model, later rounds from the previous round's policy, at
     temperature 1.0 (PPO samples at 0.8) so the k samples differ.
  4. The testbed's tiny model needs other learning rates and a larger ascent step η than the
     paper's 7B values (TESTBED below, each with its reason; docs/calibration.md says how the
     testbed's knobs were chosen).
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

from plumbing import common
from plumbing.common import Valid, arg, check, non_negative, or_sentinel, positive
from study import report
from study.arms import (ARMS, DEFAULT_ARMS, WORLD_FLAGS, Seed, Task, metarm_eta, seed_tasks, stage_flags,
                        world_tasks)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # stages run from the root
SEEDS = Valid("an integer in [1, 12] (study/report.py's exact bootstrap enumerates the resamples)",
              lambda x: isinstance(x, int) and 1 <= x <= 12, (0, 13))


@dataclasses.dataclass
class Args:
    out: str = arg("runs/pipeline", "output folder: testbed/, sft/, seed<s>/…, logs/, report.md, "
                                    "results.json, figures/")
    seeds: int = arg(5, "seeds 0 … N−1; each seed has its own RMs, meta sets and PPO runs (the "
                        "world and the SFT model are shared)", valid=SEEDS)
    arms: str = arg(",".join(DEFAULT_ARMS),
                    "comma-separated arms: " + ", ".join(ARMS) + " (vanilla is always run: "
                    "it is the baseline of every comparison)")
    rounds: int = arg(1, "MetaRM rounds after the vanilla RM (paper: 4 for dialogue, 5 for "
                         "summarisation)", valid=non_negative)
    study: bool = arg(False, "the full study: --seeds 8 --arms " + ",".join(ARMS)
                             + " --rounds 3 (every arm and control; flags given explicitly "
                             "still win)")
    eta_sweep: str = arg("", "comma-separated η values: round-1 MetaRM from RM₀ with each η, then "
                             "PPO (its own figure); empty = none")
    jobs: int = arg(0, "stages run at once; 0 = the cores this process may use // "
                       "(--threads x --nproc)", valid=non_negative)
    threads: int = arg(1, "intra-op threads per stage process (OMP_NUM_THREADS)", valid=positive)
    nproc: int = arg(1, "processes per stage (torchrun --nproc_per_node); 1 = plain python",
                     valid=positive)
    model_size: str = arg("tiny",
                          "testbed model size (tiny ~1M, small ~5M, medium ~28M parameters)",
                          choices=["tiny", "small", "medium"])
    world: str = arg("assistant", "the testbed's world (python -m testbed --world): assistant "
                                  "(the first) or extrapolation (an RM right where its data "
                                  "are, wrong where PPO goes); study/arms.py's WORLD_FLAGS "
                                  "holds each world's stage flags", choices=list(WORLD_FLAGS))
    world_seed: int = arg(0, "seed of the testbed and of the SFT model, shared by all seeds",
                          valid=common.seed)
    rm_init: str = arg("previous", "round r's RM starts from RM_{r-1} (previous) or from SFT (sft)",
                       choices=["previous", "sft"])
    ppo_init: str = arg("sft", "round r's PPO starts from SFT (sft) or from π_{r-1} (previous)",
                        choices=["previous", "sft"])
    meta_order: int = arg(1, "MetaRM gradient: 1 = first order (paper), 2 = exact", choices=[1, 2])
    eta: float = arg(-1.0, "η of the meta step; -1 = the testbed value in TESTBED (0.3)",
                     valid=or_sentinel(-1, "the testbed value", non_negative))
    ood: bool = arg(False, "build S from the OOD prompts instead of the RL prompts "
                           "(paper's OOD experiment)")
    toy: bool = arg(False, "tiny data and step counts: a smoke run of every stage "
                           "(numbers mean nothing)")
    stage_flags: str = arg("", "extra flags per stage after TESTBED's (later flags win), e.g. "
                               "\"ppo: --kl-coef 0.02 --iterations 160; testbed: --errors subtle\" "
                               "(how docs/calibration.md's runs were made)")
    save_every: int = arg(0, "sft, reward, meta_rm and ppo save a resumable checkpoint every N "
                             "steps (ppo: iterations), and a rerun continues an interrupted one "
                             "from it (--resume); 0 = an interrupted stage starts over",
                          valid=non_negative)


STUDY_DEFAULTS = {"seeds": 8, "arms": ",".join(ARMS), "rounds": 3}


def plan(args: Args, hp: dict[str, list[str]], arms: list[str], sweep: list[float]) -> list[Task]:
    """The whole study: the shared world, then every seed's arms and evaluation (study/arms.py)."""
    out = os.path.abspath(args.out)
    tasks = world_tasks(out, hp, args.world_seed, args.model_size)
    for s in range(args.seeds):
        w = Seed(out, s, hp, "ood_prompts" if args.ood else "rl_prompts")
        tasks += seed_tasks(w, arms, args.rounds, sweep, args.rm_init, args.ppo_init,
                            args.meta_order)
    return tasks


# --------------------------------------------------------------------------------------------------
# Running the plan: up to --jobs stages at once, each a subprocess with --threads threads
# --------------------------------------------------------------------------------------------------
def command(args: Args, task: Task) -> tuple[list[str], str]:
    """(the argv to run, the command as a user would type it)."""
    # a stage file at the root (sft.py) runs as a script,
    # a module of a folder (study.best_of_n) with -m
    target = [task.script] if task.script.endswith(".py") else ["-m", task.script]
    script_flags = [*target, *task.flags, *resume_flags(args, task.script)]
    if args.nproc == 1 or task.script == "testbed":
        return [sys.executable, *script_flags], shlex.join(["python", *script_flags])
    launcher = ["--standalone", f"--nproc_per_node={args.nproc}"]
    return ([sys.executable, "-m", "torch.distributed.run", *launcher, *script_flags],
            shlex.join(["torchrun", *launcher, *script_flags]))


def resume_flags(args: Args, script: str) -> list[str]:
    """An unfinished stage starts over (--overwrite), or continues from its last checkpoint
    (--resume)."""
    if args.save_every > 0 and script in ("sft.py", "reward.py", "meta_rm.py", "ppo.py", "dpo.py"):
        return ["--save-every", str(args.save_every), "--resume"]
    return ["--overwrite"]


def gpu_slots(nproc: int) -> list[str]:
    """The GPUs of this machine (as CUDA_VISIBLE_DEVICES names them), nproc to a slot: ["0", "1",
    ...], or ["0,1", "2,3"] for --nproc 2; [] without a GPU. A stage runs on one slot, so two stages
    never share a GPU (and never all land on GPU 0)."""
    import torch

    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    names = [x.strip() for x in visible.split(",") if x.strip()] if visible else \
        [str(i) for i in range(count)]
    names = names[:count]
    return [",".join(names[i: i + nproc]) for i in range(0, len(names) - nproc + 1, nproc)]


def run_tasks(args: Args, tasks: list[Task], jobs: int,
              slots: list[str] | None = None) -> dict[str, tuple[str, float]]:
    """Run every task whose dependencies are done and whose marker is missing, at most `jobs` at a
    time; return {task: (script, seconds)} of the tasks run now. A failed task stops the launching
    of new ones (those in flight finish). With GPU `slots` (gpu_slots) each running stage holds one
    slot as its CUDA_VISIBLE_DEVICES."""
    out = os.path.abspath(args.out)
    marker = lambda t: os.path.join(out, ".done", t.name)  # noqa: E731
    done = {t.name for t in tasks if os.path.exists(marker(t))}
    todo = [t for t in tasks if t.name not in done]
    if len(done):
        print(f"== {len(done)} of {len(tasks)} stages done already (markers in {out}/.done/)",
              flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    free = list(slots or [])  # GPU slots not held by a running stage
    held: dict[str, str] = {}  # task -> its slot
    seconds: dict[str, tuple[str, float]] = {}
    script_of = {t.name: t.script for t in tasks}
    failed: list[str] = []
    stopping, restore_signals = pass_signals_on(running)
    while (todo and not failed and not stopping) or running:
        room = min(jobs, len(slots)) if slots else jobs
        for t in [t for t in todo if all(d in done for d in t.deps)][: max(0, room - len(running))]:
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
            task_env = env
            if slots:
                held[t.name] = free.pop(0)
                task_env = dict(env, CUDA_VISIBLE_DEVICES=held[t.name])
            running[t.name] = (subprocess.Popen(argv, cwd=REPO, env=task_env, stdout=log,
                                                stderr=subprocess.STDOUT),
                               time.time(), log)
        time.sleep(0.1)
        for name, (proc, t0, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if name in held:
                free.append(held.pop(name))
            seconds[name] = (script_of[name], time.time() - t0)
            if proc.returncode != 0:
                failed.append(name)
                print(f"!! {name} failed (exit status {proc.returncode}); its output: {log.name}",
                      flush=True)
                continue
            done.add(name)
            os.makedirs(os.path.dirname(os.path.join(out, ".done", name)), exist_ok=True)
            with open(os.path.join(out, ".done", name), "w") as f:
                f.write(f"{seconds[name][1]:.1f}\n")
            print(f"   {name}: {seconds[name][1]:.0f} s", flush=True)
    restore_signals()
    if stopping:
        raise common.Interrupted(stopping[0],
                                 f"pipeline: stopped by {signal.Signals(stopping[0]).name}; the "
                                 "stages that were running stopped too (with --save-every after "
                                 "a resumable checkpoint): run the same command again to continue")
    if failed:
        raise common.UserError(f"stage {failed[0]} failed "
                               f"(log: {out}/logs/{failed[0].replace('/', '__')}.log); run the "
                               "same command again to continue from there")
    return seconds


def pass_signals_on(running: dict[str, tuple[subprocess.Popen, float, object]]
                    ) -> tuple[list[int], Callable]:
    """While the stages run: a SIGTERM sent to the pipeline (a cluster's preemption) is passed on to
    every running stage, which stops at its next step boundary (after a resumable checkpoint with
    --save-every); SIGINT is not passed on (Ctrl-C reaches the stages from the terminal already, and
    a second one would cut torchrun's own shutdown short). Either way nothing new is started and the
    pipeline waits for the running stages instead of dying first. Returns the list the signals are
    recorded in (empty: none) and the function that puts the previous handlers back."""
    stopping: list[int] = []

    def handler(signum: int, frame: object) -> None:
        stopping.append(signum)
        if signum == signal.SIGTERM:
            for proc, _, _ in running.values():
                proc.send_signal(signum)

    if threading.current_thread() is not threading.main_thread():
        return stopping, lambda: None
    previous = {signum: signal.signal(signum, handler)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    return stopping, lambda: [signal.signal(signum, h) for signum, h in previous.items()]


def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(Args, argv)
    given = set(argv if argv is not None else sys.argv[1:])
    if args.study:  # the full study, except where a flag was given explicitly
        for key, value in STUDY_DEFAULTS.items():
            if "--" + key not in given:
                setattr(args, key, value)
    arms = ["vanilla"] + [a.strip() for a in args.arms.split(",")
                          if a.strip() and a.strip() != "vanilla"]
    check(all(a in ARMS for a in arms),
          f"--arms {args.arms}: each must be one of {', '.join(ARMS)}")
    try:
        sweep = [float(x) for x in args.eta_sweep.split(",") if x.strip()]
    except ValueError:
        raise common.UserError(
            f"--eta-sweep {args.eta_sweep}: expected comma-separated numbers") from None
    check(all(x >= 0 for x in sweep), "--eta-sweep values must be >= 0")
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else (os.cpu_count() or 1))
    slots = gpu_slots(args.nproc)  # on a GPU machine: a slot of --nproc GPUs per stage
    jobs = args.jobs or (len(slots) if slots else max(1, cores // (args.threads * args.nproc)))
    t_start = time.time()
    common.lock_output(args.out)  # one live pipeline per folder (each stage also locks its own)
    os.makedirs(args.out, exist_ok=True)
    common.save_args(args, args.out)
    try:
        hp = stage_flags(args.toy, args.nproc, args.eta, args.stage_flags, args.world)
    except ValueError as e:
        raise common.UserError(str(e)) from None
    tasks = plan(args, hp, arms, sweep)
    print(f"pipeline: {len(tasks)} stages ({args.seeds} seeds, arms {', '.join(arms)}, "
          f"{args.rounds} rounds{', η sweep ' + args.eta_sweep if sweep else ''}); "
          f"{jobs} at a time x {args.threads} thread(s) x {args.nproc} process(es) on {cores} "
          "cores" + (f", GPUs {' / '.join(slots)}" if slots else ""), flush=True)
    seconds = run_tasks(args, tasks, jobs, slots)
    text = report.write(os.path.abspath(args.out), seeds=list(range(args.seeds)), arms=arms,
                        rounds=args.rounds, sweep=sweep, wall_seconds=time.time() - t_start,
                        stage_seconds=seconds,
                        settings={"jobs": jobs, "threads": args.threads, "nproc": args.nproc,
                                  "model_size": args.model_size, "meta_order": args.meta_order,
                                  "world": args.world, "world_seed": args.world_seed,
                                  "ood": args.ood, "toy": args.toy, "rm_init": args.rm_init,
                                  "ppo_init": args.ppo_init, "eta": metarm_eta(args.eta),
                                  "command": shlex.join(["python", "-m", "study",
                                                         *(argv if argv is not None
                                                           else sys.argv[1:])])})
    print(f"\n{text}\nwrote {args.out}/report.md, results.json and figures/ "
          f"({(time.time() - t_start) / 60:.1f} min)")


if __name__ == "__main__":
    common.run_main(main)
