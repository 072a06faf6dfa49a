"""The study's task graph: which stage runs with which flags after which others,
one function per arm.

A task is one stage run as a user would type it
(`python reward.py --model ... --out OUT/seed0/rm0 ...`); its name is the path of its output folder
under OUT (`seed0/metarm/round1/rm`). `study/pipeline.py` runs the graph; `study/report.py` reads
the folders back by the same names (`policy_key`, `rm_key`). Nothing here runs or imports a stage:
the arms are command lines.

    the world       testbed (data, tokenizer, base model) and the SFT model, shared by every seed
    vanilla         RM₀ ← reward.py on D;  π ← PPO with RM₀                      ("vanilla PPO")
    metarm          round r = 1 … R:  S_r ← k samples per prompt from π_{r−1} (π₀ = SFT);
                                      RM_r ← MetaRM (Algorithm 1) on D with S_r, from RM_{r−1};
                                      π_r ← PPO
    eta0            the same rounds with the ascent off (η = 0): RM_r ← one more epoch on D
                    (reward.py, the same pair order as meta_rm.py; η = 0 makes Algorithm 1
                    exactly that)
    oracle          the same rounds with labels: every two responses of S_r (sampled from the
                    oracle chain's own π_{r−1}) labelled by the testbed's annotator, RM_r ← one
                    epoch on D ∪ those pairs
  the controls that separate the meta step from what else it does:
    random          MetaRM's rounds with the ascent in a random direction of the same length
                    ‖η∇J‖ (meta_rm.py --ascent random): is it ∇J's direction, or any look-ahead?
    sftS            MetaRM's rounds with J always on S₁, the SFT model's samples: is it the
                    policy's shift? (round 1 is MetaRM's own round 1 — its S is S₁ already —
                    so it is not run again: the chain goes on from MetaRM's round-1 RM and policy)
    oracleM         the oracle with as many gold labels as MetaRM has meta samples (a cycle of k
                    pairs per prompt of S_r, meta_data.py's oracle_pairs_matched.jsonl)
    dpo             DPO on D from the SFT model (no reward model)
    sweep           round-1 MetaRM from RM₀ at each η of --eta-sweep, then PPO
    evaluation      every policy vs SFT (gold judge, greedy); every RM on held-out pairs (a task
                    per RM); best-of-n under RM₀
"""
from __future__ import annotations

import dataclasses
import os
import shlex
from typing import Callable

import dpo

# Hyper-parameters of the testbed (tiny Llama, ~1M parameters, trained from random initialisation);
# sequences are short (prompt <= 20, response <= 31 tokens), hence --max-len 64 and 32 new tokens.
TESTBED = {
    # visible errors (the testbed's default) and 8000 pairs:
    # chosen on the vanilla arm (docs/calibration.md)
    "testbed": ["--n-pairs-train", "8000"],
    # from scratch, the paper's 2e-5 learns nothing in 500 steps; 3e-3 reaches EOS rate 1.0
    "sft": ["--lr", "3e-3", "--max-len", "64", "--micro-batch-size", "32"],
    # the paper's 5e-6 barely moves a fresh head on a 1M model in one epoch; 1e-3 and 3e-3 were
    # worse than 3e-4 (docs/calibration.md)
    "reward": ["--lr", "3e-4", "--max-len", "64", "--micro-batch-size", "16", "--eval-every", "0"],
    # S: 256 prompts (192 train + 64 held out) x k = 5; each meta step draws m = 16 of them
    "meta_data": ["--max-prompts", "256", "--heldout", "64", "--max-new-tokens", "32"],
    # α as reward.py; η = 0.3 makes ‖θ' − θ‖ = η‖∇J‖ ≈ 0.1, the size of one Adam step of the RM;
    # with the paper's 5e-6 the step is ~1e-6 and the meta step does nothing.
    # Chosen from that scale argument, not tuned.
    "meta_rm": ["--lr", "3e-4", "--eta", "0.3", "--max-len", "64", "--log-adapted-every", "10",
                "--eval-every", "0"],
    # 64 rollouts per iteration (16 prompts x 4), 2 epochs of 2 mini-batches; the held-out curve
    # every 10 iterations (100 prompts x 4 samples)
    "ppo": ["--policy-lr", "1e-4", "--critic-lr", "1e-4", "--rollouts-per-prompt", "4",
            "--prompts-per-iteration", "16", "--mini-batch-size", "32", "--micro-batch-size", "32",
            "--max-new-tokens", "32", "--iterations", "80", "--sample-every", "0",
            "--save-every", "0", "--eval-every", "10", "--eval-samples", "4"],
    # dpo.py's own TESTBED (each value with its reason there); one epoch over the 8000 pairs is 500
    # steps, as its two epochs over 4000 were
    "dpo": [*dpo.TESTBED, "--epochs", "1"],
    "evaluate": ["--max-new-tokens", "32", "--max-len", "64"],
    "best_of_n": ["--samples", "64", "--max-new-tokens", "32", "--max-len", "64"],
}
# The extrapolation world (testbed/gold.py): what differs from TESTBED above, each chosen on the
# vanilla and oracle arms only (docs/calibration.md). τ = 0.5: labels agree with the gold order on
# ~91 % of pairs; 8000 pairs (the vanilla RM at 0.84 of the gold order, 3000 gave 0.78–0.80). PPO
# samples 24 new tokens (the world's best responses have ≤ 20), leaves the RM score unclipped
# (--score-clip 0: a clip caps the very incentive whose extrapolation is studied), and moves slowly
# enough (policy lr 3e-5, 60 iterations of 32 rollouts) that its held-out curve, every 5
# iterations, shows the rise before the fall (at 1e-4 gold peaked by iteration 5).
WORLD_FLAGS = {
    "assistant": {},
    "extrapolation": {
        "testbed": ["--world", "extrapolation", "--label-noise", "0.5"],
        "meta_data": ["--oracle-tau", "0.5"],
        "ppo": ["--iterations", "60", "--max-new-tokens", "24", "--score-clip", "0",
                "--prompts-per-iteration", "8", "--eval-every", "5", "--policy-lr", "3e-5"],
    },
}
# --toy: sizes for a smoke run of every stage in a few minutes (tests);
# the numbers mean nothing there.
TOY = {
    "testbed": ["--n-sft", "256", "--n-pairs-train", "64", "--n-pairs-test", "32",
                "--n-rl-prompts", "64", "--n-eval-prompts", "8", "--n-ood-prompts", "32",
                "--n-ood-pairs-test", "16"],
    "sft": ["--epochs", "1", "--eval-samples", "8", "--max-new-tokens", "8"],
    "meta_data": ["--max-prompts", "24", "--heldout", "8", "--max-new-tokens", "8", "--k", "3"],
    "meta_rm": [],
    "ppo": ["--iterations", "2", "--prompts-per-iteration", "4", "--max-new-tokens", "8",
            "--mini-batch-size", "16", "--micro-batch-size", "16", "--eval-every", "1",
            "--eval-samples", "1"],
    "dpo": ["--max-steps", "2"],
    "evaluate": ["--max-new-tokens", "8"],
    "best_of_n": ["--samples", "4", "--max-new-tokens", "8"],
}
ARMS = ("vanilla", "metarm", "eta0", "oracle", "dpo", "random", "sftS", "oracleM")
# python -m study without --arms: the paper's comparison with the η = 0 control and the oracle
DEFAULT_ARMS = ("vanilla", "metarm", "eta0", "oracle", "dpo")
ROUND_ARMS = ("metarm", "eta0", "oracle", "random", "sftS", "oracleM")  # the paper's rounds
CONTROLS = ("eta0", "random", "sftS", "oracleM")  # MetaRM against each, round by round
META_ARMS = ("metarm", "random", "sftS")  # the arms whose RMs are meta_rm.py runs


def metarm_eta(eta: float) -> float:
    """The η the metarm arm runs with: --eta, or TESTBED's when --eta is -1."""
    flags = TESTBED["meta_rm"]
    return eta if eta >= 0 else float(flags[flags.index("--eta") + 1])


def with_flag(flags: list[str], flag: str, value: str) -> list[str]:
    """`flags` with `flag`'s value set to `value` (replaced where it is there, else appended), so a
    printed command names each flag once."""
    flags = list(flags)
    if flag in flags:
        flags[flags.index(flag) + 1] = value
        return flags
    return flags + [flag, value]


def per_process(flags: list[str], nproc: int) -> list[str]:
    """The micro-batch sizes in TESTBED / TOY are for one process: with N processes each takes 1/N
    of them, so the global batch (micro-batch x accumulation x processes) stays the same."""
    flags = list(flags)
    for i, flag in enumerate(flags[:-1]):
        if flag == "--micro-batch-size":
            flags[i + 1] = str(max(1, int(flags[i + 1]) // nproc))
    return flags


def merged(flags: list[str], more: list[str]) -> list[str]:
    """`flags` with each `--flag value` of `more` set (with_flag), so each flag shows once."""
    for i in range(0, len(more), 2):
        flags = with_flag(flags, more[i], more[i + 1])
    return flags


def stage_flags(toy: bool, nproc: int, eta: float, extra: str,
                world: str = "assistant") -> dict[str, list[str]]:
    """TESTBED with the world's WORLD_FLAGS (+ TOY with --toy), split over `nproc` processes, with
    --eta and --stage-flags (`extra`, "ppo: --kl-coef 0.02; testbed: --errors subtle") applied; a
    malformed `extra` is a ValueError naming it."""
    hp = {stage: per_process(merged(merged(flags, WORLD_FLAGS[world].get(stage, [])),
                                    TOY.get(stage, []) if toy else []), nproc)
          for stage, flags in TESTBED.items()}
    if eta >= 0:
        hp["meta_rm"] = with_flag(hp["meta_rm"], "--eta", str(eta))
    for part in filter(str.strip, extra.split(";")):
        stage, sep, flags = part.partition(":")
        if sep != ":" or stage.strip() not in hp:
            raise ValueError(f"--stage-flags {part.strip()!r}: expected 'stage: --flag value', "
                             f"stage one of {', '.join(hp)}")
        hp[stage.strip()] += shlex.split(flags)
    return hp


# --------------------------------------------------------------------------------------------------
# Names: a task's name is its output folder under OUT;
# study/report.py reads the folders back by these keys
# --------------------------------------------------------------------------------------------------
def policy_key(task: str) -> str:
    """'seed0/vanilla/ppo' -> 'vanilla', 'seed0/metarm/round2/ppo' -> 'metarm_r2',
    'seed0/dpo' -> 'dpo', 'seed0/sweep/eta0.1/ppo' -> 'sweep_eta0.1'."""
    parts = task.split("/")[1:]
    if parts[0] == "sweep":
        return f"sweep_{parts[1]}"
    if len(parts) >= 3 and parts[1].startswith("round"):
        return f"{parts[0]}_r{parts[1][len('round'):]}"
    return parts[0]


def rm_key(task: str) -> str:
    """'seed0/rm0' -> 'vanilla', otherwise the key of the policy trained with it
    ('metarm_r1', 'sweep_eta0.1')."""
    return "vanilla" if task.endswith("/rm0") else policy_key(task)


# --------------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Task:
    """One stage run: `script flags` under OUT/logs/<name>.log, after every task in `deps` finished.
    `script` is a stage file at the root (sft.py) or a module of a folder (study.best_of_n: run
    with -m). `prepare`, if given, runs in the pipeline's process just before the stage starts
    (e.g. to concatenate two data files)."""
    name: str
    script: str
    flags: list[str]
    deps: list[str]
    prepare: Callable[[], None] | None = None


@dataclasses.dataclass
class Seed:
    """Where one seed's stages read and write: the shared world's files, and OUT/seed<s>/…
    for its own."""
    out: str                     # OUT, absolute
    s: int
    hp: dict[str, list[str]]     # the stages' flags (stage_flags)
    meta_prompts: str = "rl_prompts"  # the prompts S is sampled for (ood_prompts with --ood)

    def name(self, *parts: str) -> str:
        """A task name: 'seed0/metarm/round1/rm'."""
        return "/".join([f"seed{self.s}", *parts])

    def at(self, task: str) -> str:
        """The output folder of a task (a name from `name`, or 'sft')."""
        return os.path.join(self.out, task)

    def file(self, name: str) -> str:
        """A data file of the testbed: file('pairs_train') -> OUT/testbed/data/pairs_train.jsonl."""
        return os.path.join(self.out, "testbed", "data", f"{name}.jsonl")

    @property
    def sft(self) -> str:
        return os.path.join(self.out, "sft")


def world_tasks(out: str, hp: dict[str, list[str]], world_seed: int, model_size: str) -> list[Task]:
    """The testbed and the SFT model, shared by every seed."""
    testbed = os.path.join(out, "testbed")
    data = lambda name: os.path.join(testbed, "data", f"{name}.jsonl")  # noqa: E731
    return [Task("testbed", "testbed", ["--out", testbed, "--seed", str(world_seed),
                                        "--model-size", model_size, *hp["testbed"]], []),
            Task("sft", "sft.py", ["--model", os.path.join(testbed, "base_model"),
                                   "--data", data("sft_train"),
                                   "--eval-prompts", data("eval_prompts"),
                                   "--out", os.path.join(out, "sft"), "--seed", str(world_seed),
                                   *hp["sft"]], ["testbed"])]


def reward_task(w: Seed, name: str, start: str, train: str, seed: int, deps: list[str]) -> Task:
    """reward.py: an RM from `start` (a task name, or 'sft') trained one epoch on `train`."""
    model = w.sft if start == "sft" else w.at(start)
    return Task(name, "reward.py", ["--model", model, "--train", train,
                                    "--test", w.file("pairs_test"), "--out", w.at(name),
                                    "--seed", str(seed), *w.hp["reward"]], deps)


def ppo_task(w: Seed, name: str, rm: str, init: str | None = None) -> Task:
    """ppo.py with the RM of task `rm`, from the SFT model (or from the policy of task `init`); the
    KL reference is always SFT. The held-out curve on the evaluation prompts."""
    return Task(name, "ppo.py", ["--sft", w.sft, "--policy", w.at(init) if init else w.sft,
                                 "--rm", w.at(rm), "--prompts", w.file("rl_prompts"),
                                 "--eval-prompts", w.file("eval_prompts"), "--out", w.at(name),
                                 "--seed", str(w.s), *w.hp["ppo"]],
                [rm, *([init] if init else [])])


def meta_set_task(w: Seed, name: str, policy: str, r: int) -> Task:
    """meta_data.py: S_r, k samples per prompt from the policy of task `policy` ('sft': the SFT
    model), with the oracle's gold-labelled pairs beside it."""
    return Task(name, "meta_data.py", ["--policy", w.sft if policy == "sft" else w.at(policy),
                                       "--prompts", w.file(w.meta_prompts), "--out", w.at(name),
                                       "--seed", str(100 * w.s + r), "--oracle-pairs",
                                       *w.hp["meta_data"]], [policy])


def meta_rm_task(w: Seed, name: str, start: str, S: str, r: int, order: int,
                 eta: str | None = None, ascent: str = "gradient") -> Task:
    """meta_rm.py: Algorithm 1 on D with the meta set of task `S`, from the RM of task `start`
    ('sft': a new head on the SFT model, on purpose: --fresh-head); `eta` replaces the configured η
    (the sweep); ascent 'random' is the random-direction control."""
    flags = w.hp["meta_rm"] if eta is None else with_flag(w.hp["meta_rm"], "--eta", eta)
    if ascent != "gradient":
        flags = with_flag(flags, "--ascent", ascent)
    model = w.sft if start == "sft" else w.at(start)
    return Task(name, "meta_rm.py", [
        "--model", model, "--train", w.file("pairs_train"), "--test", w.file("pairs_test"),
        "--meta", f"{w.at(S)}/meta_train.jsonl", "--meta-heldout", f"{w.at(S)}/meta_heldout.jsonl",
        "--out", w.at(name), "--meta-order", str(order), "--seed", str(100 * w.s + r), *flags,
        *(["--fresh-head"] if start == "sft" else [])], [S, start])


def vanilla_arm(w: Seed) -> list[Task]:
    """RM₀ on D, then PPO with it."""
    return [reward_task(w, w.name("rm0"), "sft", w.file("pairs_train"), w.s, ["sft"]),
            ppo_task(w, w.name("vanilla", "ppo"), w.name("rm0"))]


def round_arm(w: Seed, arm: str, rounds: int, rm_init: str, ppo_init: str,
              order: int) -> list[Task]:
    """One of ROUND_ARMS: R rounds of (S_r, RM_r, π_r). Round 1 samples S from the SFT model
    (one S₁ per seed, shared by the arms); later rounds sample the chain's own π_{r−1} (eta0 needs
    no S; sftS keeps S₁). Each round's RM starts from RM_{r−1} (--rm-init previous; RM₀ in round 1)
    or from SFT; each PPO from SFT or π_{r−1}."""
    tasks: list[Task] = []
    rm_prev, policy_prev = w.name("rm0"), None
    for r in range(1, rounds + 1):
        # sftS's round 1 is MetaRM's round 1 (same S₁, same flags, same seed: the same RM bit for bit),
        # so it is not run twice: the chain continues from MetaRM's round-1 RM and policy
        base = ("metarm" if arm == "sftS" and r == 1 else arm, f"round{r}")
        S = w.name("S1") if r == 1 or arm == "sftS" else w.name(*base, "S")
        if r > 1 and arm not in ("eta0", "sftS"):
            tasks.append(meta_set_task(w, S, policy_prev, r))
        start = rm_prev if rm_init == "previous" else "sft"
        rm = w.name(*base, "rm")
        if arm in META_ARMS:
            ascent = "random" if arm == "random" else "gradient"
            tasks.append(meta_rm_task(w, rm, start, S, r, order, ascent=ascent))
        elif arm == "eta0":
            # the same epoch over D in the same order as meta_rm.py, without the ascent
            tasks.append(reward_task(w, rm, start, w.file("pairs_train"), 100 * w.s + r, [start]))
        else:  # oracle / oracleM: D plus the fresh gold labels of S_r (all pairs / one per sample)
            train = w.at(w.name(*base, "train_pairs.jsonl"))
            labels = "oracle_pairs_matched" if arm == "oracleM" else "oracle_pairs"
            task = reward_task(w, rm, start, train, 100 * w.s + r, [S, start])
            task.prepare = concatenate(train, [w.file("pairs_train"),
                                               f"{w.at(S)}/{labels}.jsonl"])
            tasks.append(task)
        init = policy_prev if ppo_init == "previous" and policy_prev else None
        tasks.append(ppo_task(w, w.name(*base, "ppo"), rm, init))
        rm_prev, policy_prev = rm, w.name(*base, "ppo")
    return tasks


def sweep_arm(w: Seed, eta: float, order: int) -> list[Task]:
    """Round-1 MetaRM from RM₀ on S₁ at this η, then PPO."""
    base = ("sweep", f"eta{eta:g}")
    return [meta_rm_task(w, w.name(*base, "rm"), w.name("rm0"), w.name("S1"), 1, order,
                         eta=f"{eta:g}"),
            ppo_task(w, w.name(*base, "ppo"), w.name(*base, "rm"))]


def dpo_arm(w: Seed) -> list[Task]:
    """DPO on D from the SFT model."""
    return [Task(w.name("dpo"), "dpo.py", ["--model", w.sft, "--train", w.file("pairs_train"),
                                           "--test", w.file("pairs_test"),
                                           "--eval-prompts", w.file("eval_prompts"),
                                           "--out", w.at(w.name("dpo")), "--seed", str(w.s),
                                           *w.hp["dpo"]],
                 ["sft"])]


def seed_tasks(w: Seed, arms: list[str], rounds: int, sweep: list[float], rm_init: str,
               ppo_init: str, order: int) -> list[Task]:
    """Every stage of one seed: the arms, then the evaluation of what they trained."""
    tasks = vanilla_arm(w)
    if any(a in ROUND_ARMS for a in arms) or sweep:
        tasks.append(meta_set_task(w, w.name("S1"), "sft", 1))  # S₁ from the SFT model, shared
    for arm in [a for a in arms if a in ROUND_ARMS]:
        tasks += round_arm(w, arm, rounds, rm_init, ppo_init, order)
    for eta in sweep:
        tasks += sweep_arm(w, eta, order)
    if "dpo" in arms:
        tasks += dpo_arm(w)
    # a task two arms share (MetaRM's round 1, which sftS starts from) runs once; a name planned
    # twice must be the same command, else the planner has a bug that keeping one would hide
    unique: dict[str, Task] = {}
    for t in tasks:
        kept = unique.setdefault(t.name, t)
        assert (kept.script, kept.flags, kept.deps) == (t.script, t.flags, t.deps), t.name
    tasks = list(unique.values())
    return tasks + evaluation_tasks(w, tasks)


def evaluation_tasks(w: Seed, tasks: list[Task]) -> list[Task]:
    """Every policy of the seed vs SFT (gold judge, greedy); every RM side by side;
    best-of-n under RM₀."""
    out: list[Task] = []
    for policy in [t.name for t in tasks if t.script in ("ppo.py", "dpo.py")]:
        name = w.name("eval", policy_key(policy))
        out.append(Task(name, "evaluate.py", [
            "--policy-a", w.at(policy), "--policy-b", w.sft,
            "--name-a", policy_key(policy), "--name-b", "sft",
            "--prompts", w.file("eval_prompts"), "--pairs-test", "", "--ood-pairs-test", "",
            "--judge", "gold", "--out", w.at(name), *w.hp["evaluate"]], [policy]))
    rms = [t.name for t in tasks if t.name.endswith("/rm") or t.name.endswith("/rm0")]
    # the reward gaps (Fig. 5) on held-out samples of the latest MetaRM policy,
    # else of the SFT model
    meta_sets = [t.name for t in tasks if t.script == "meta_data.py"]
    gap_set = next((n for n in reversed(meta_sets) if "/metarm/" in n),
                   meta_sets[0] if meta_sets else None)
    # one evaluation per RM, so that a study extended later (new arms, sweep points) scores every
    # RM it adds: a task's marker covers its own RM only
    for rm in rms:
        name = w.name("eval", "rm", rm_key(rm))
        out.append(Task(name, "evaluate.py", [
            "--rms", f"{rm_key(rm)}={w.at(rm)}", "--pairs-test", w.file("pairs_test"),
            "--ood-pairs-test", w.file("ood_pairs_test"), "--prompts", w.file("eval_prompts"),
            *(["--gap-set", f"{w.at(gap_set)}/meta_heldout.jsonl"] if gap_set else []), "--out",
            w.at(name), *w.hp["evaluate"]], [rm] + ([gap_set] if gap_set else [])))
    out.append(Task(w.name("best_of_n"), "study.best_of_n", [
        "--policy", w.sft, "--rm", w.at(w.name("rm0")), "--prompts", w.file("eval_prompts"),
        "--out", w.at(w.name("best_of_n")), "--seed", str(w.s), *w.hp["best_of_n"]],
        [w.name("rm0")]))
    return out


def concatenate(path: str, sources: list[str]) -> Callable[[], None]:
    """A `prepare` step: write the lines of `sources` one after the other into `path`
    (atomically)."""
    def write() -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            for src in sources:
                with open(src) as g:
                    f.writelines(line if line.endswith("\n") else line + "\n"
                                 for line in g if line.strip())
        os.replace(path + ".tmp", path)
    return write
