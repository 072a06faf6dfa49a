"""GPU smoke test: every stage on one NVIDIA GPU under torchrun, checked and timed, in one command.

The stages were written for GPUs and tested on CPU; this runs them on a GPU once, in about six
minutes, and says what works, how fast and in how much memory. Every check stands on its own: one
that fails is reported and the others still run; a stage whose input failed runs on a stand-in
(the base model, an untrained RM, a meta set made from the pairs).

Command (one GPU, no network: nothing is installed or downloaded; ~6 min on an H100 / H200 by
estimate, never more than --budget, 9 min)
    python3 -m tools.gpu_smoke --out $OUT/smoke
    python3 -m tools.gpu_smoke --out $OUT/smoke --smollm2 runs/smollm2   # the real SmolLM2-135M
    python3 -m tools.gpu_smoke --out $OUT/smoke --parts resume --launcher env  # a part again
    python -m tools.gpu_smoke --cpu --out /tmp/smoke   # CPU, gloo, toy sizes (its test runs this)
Output in --out: smoke.md (the tables, also printed), smoke.json (every number), logs.tar.gz (each
run's log, metrics.jsonl, args.json and peak-memory report). Exit status 0 only when every check
passed. The checkpoints (several GB) go to --workdir, by default a temporary folder deleted at
the end.

The checks (GPU mode; --cpu: the testbed model only, 1-2 steps, gloo, no memory or MFU: "n/a")
  stage      sft -> reward (from the SFT model) -> meta_data (S, k = 4) -> meta_rm (order 1,
             --meta-impl functional and inplace) -> ppo -> dpo -> evaluate (ppo vs sft, --judge
             gold on the testbed's prompts), each with --bf16 and a few steps, on two models:
               testbed  the testbed's tiny Llama and data (`python -m testbed`), with every
                        evaluation part of the stages on
               smollm2  SmolLM2-135M's exact shape (LlamaConfig: hidden 576, intermediate 1536,
                        30 layers, 9 heads, 3 key/value heads, vocabulary 49,152, tied embeddings,
                        rope theta 1e5) with random weights and the testbed's tokenizer, or the
                        converted model of --smollm2; data of known length (below)
             pass: exit status 0, the stage ran on the GPU (its peak-memory report names cuda) and
             every number it wrote (metrics.jsonl; meta_data: stats.json; evaluate: results.json)
             is finite.
  fsdp2      FSDP2 == the plain model, on one process (NCCL): `fully_shard` per decoder layer and
             the root, as the stages do at world > 1, on a copy of each model, against the plain
             model, on a batch of random token ids:
               bf16  `distributed.fsdp_precision(True)` against the plain model under bf16
                     autocast (what a stage computes at world 1): relative Frobenius distance of
                     the logits <= 5e-2. bf16 keeps 8 significant bits (unit roundoff
                     u = 2^-8 = 3.9e-3); FSDP2's mixed precision rounds the residual stream to
                     bf16 at each of the 2L residual adds where autocast keeps it in fp32, so the
                     two differ by about sqrt(2L)·u (3 % for L = 30). Measured on CPU: 0.7 %
                     (testbed) and 1.4 % (SmolLM2 shape). A real fault (a wrong shard, garbage
                     rotary buffers, a layer left in fp32 or not gathered) moves logits by O(1).
               fp32  `fsdp_precision(False)` against the plain fp32 model: logits and every
                     gradient of a backward (the LM loss) within 1e-5 relative (same kernels on the
                     same shapes: 0 on CPU; the room is for a different cuBLAS algorithm).
  resume     sft on the testbed model with --deterministic --bf16 --save-every 1: run straight,
             and run interrupted (tests/helpers/run_with_hooks.py sends SIGTERM right after step 1,
             as tests/test_reliability.py does on CPU) then --resume. pass: the final weights are
             bit-identical (the README's claim: bit for bit, on a GPU with --deterministic); else
             the largest absolute difference. A second straight run tells a resume fault from
             kernels that are not deterministic (GPU mode).
  memory     sft, reward, meta_rm (in place), ppo, dpo on the smollm2 model: tools/memory_estimate
             `estimate` at the run's own shapes against torch.cuda.max_memory_allocated of the
             stage's process (reported by common.report_peak_memory). The options that model a
             world-1 run: precision "autocast" (fp32 trained weights, bf16 autocast, the casts of
             the weights saved for backward), frozen models in bf16 (frozen_bf16: ppo's reference
             and RM, dpo's reference), no checkpointing, generation on the model itself under
             autocast (gen_unsharded False; nothing is gathered at world 1). Like with like: the
             estimate's allocated parts, without its runtime (1 GiB of CUDA context, NCCL, cuBLAS)
             and allocator margin (10 %), which max_memory_allocated does not see. The estimator
             assumes worst-case shapes (every sequence at its maximum length, one per packed row:
             masked=False, no block-diagonal mask); the smollm2 data make that true: every prompt
             and response is longer than --max-len (and every PPO prompt than --max-prompt-len),
             so data.encode cuts each sequence to exactly --max-len (PPO: prompt-len + new tokens;
             a random 49k-vocabulary policy hardly ever samples EOS; a trained --smollm2 model may
             stop early, and then the estimate is an upper bound: the check says so). meta_rm in
             place reads a meta set of such responses; its functional run reads meta_data's S
             (lengths vary: not compared). pass: the estimate within 20 % of the peak.
  speed      (numbers, no pass/fail) s/step from the times at which the stage printed its step
             lines (--log-every 1; the first step, with its warm-up, left out), tokens/s = tokens
             per step / s per step (tokens from the data files: exact for smollm2, the data's mean
             for testbed; ppo: its own train_tokens_per_s), generation ms per decode step (ppo:
             gen_s over its decode steps; meta_data and evaluate: a probe in the device worker that
             calls sampling.generate on the base model as those stages do and counts forwards),
             MFU against the GPU's bf16 matmul peak, measured first (8192^3, best of 5 x 10).

Why each stage runs as its own process under torchrun (`python -m torch.distributed.run
--standalone --nproc_per_node=1 STAGE.py ...`) and not in this process with torchrun's environment:
it is what a user runs; a crash, a CUDA error (which poisons the context for the rest of a
process), a leaked tensor, a hang or a stage's global settings (deterministic mode, threads) stay in
that process, and a timeout kills only it; and torch.cuda.max_memory_allocated of a fresh process is
exactly the stage's peak, with nothing of an earlier stage in it. The price is ~5-10 s of start-up
per run. `--launcher env` starts the stages without torchrun, with the environment it would set
(RANK 0, WORLD_SIZE 1, LOCAL_RANK 0, MASTER_ADDR/PORT), for a machine where torchrun itself fails.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from typing import Any, Iterator

from plumbing import common
from plumbing.common import arg, check, non_negative, positive
from tools import memory_estimate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
HOOKS = os.path.join("tests", "helpers", "run_with_hooks.py")  # the test-only SIGTERM hook
FSDP_BF16_TOL = 5e-2      # relative, logits (module docstring: sqrt(2L)·u with u = 2^-8)
FSDP_FP32_TOL = 1e-5      # relative, logits and gradients
MEMORY_TOL = 0.20         # |estimate / peak - 1|
K = 4                     # responses per prompt of the meta set S
MIN_RUN_S = 20.0          # a run is not started with less of --budget left
ERROR_LINE = re.compile(r"^\w*(Error|Exception)\b.*: ")  # a traceback's last line
STEP_LINE = re.compile(r"(?:^|\]:)\s*(?:step|it) (\d+)/(\d+) ")  # "step 3/8 loss ...", "it 2/3 ..."

# SmolLM2-135M's shape (its config.json), with the testbed tokenizer's pad / eos ids added
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                     num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-5,
                     rope_parameters={"rope_type": "default", "rope_theta": 100000.0})


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much each stage does on one model: few steps, the stages' batch shapes."""
    steps: int              # optimiser steps of sft, reward, dpo
    meta_steps: int         # meta_rm steps
    ppo_iterations: int
    sft_batch: int          # sequences per sft step / per micro-batch
    sft_micro: int
    pair_batch: int         # pairs per reward / dpo step / micro-batch
    pair_micro: int
    max_len: int
    meta_batch: int         # meta_rm n = m (pairs, meta prompts) per step
    meta_micro: int         # meta_rm --micro-batch-size of the in-place route
    ppo_prompts: int        # per iteration; x ppo_rollouts rollouts, all in one generate call
    ppo_rollouts: int
    ppo_mini: int
    ppo_micro: int
    prompt_len: int         # ppo --max-prompt-len
    new_tokens: int         # ppo --max-new-tokens
    sample_tokens: int      # new tokens of meta_data, evaluate and the sft / dpo reports
    meta_prompts: int       # meta_data --max-prompts (of which `heldout` held out)
    heldout: int
    eval_prompts: int       # evaluate --max-prompts
    evaluation: bool        # the stages' own evaluation parts (test pairs, held-out S, reports)


SIZES = {
    "testbed": Sizes(steps=8, meta_steps=4, ppo_iterations=3, sft_batch=32, sft_micro=16,
                     pair_batch=16, pair_micro=8, max_len=64, meta_batch=8, meta_micro=4,
                     ppo_prompts=8, ppo_rollouts=4, ppo_mini=16, ppo_micro=8, prompt_len=64,
                     new_tokens=32, sample_tokens=32, meta_prompts=32, heldout=8, eval_prompts=32,
                     evaluation=True),
    "testbed-cpu": Sizes(steps=2, meta_steps=2, ppo_iterations=2, sft_batch=8, sft_micro=8,
                         pair_batch=8, pair_micro=4, max_len=48, meta_batch=4, meta_micro=2,
                         ppo_prompts=2, ppo_rollouts=2, ppo_mini=4, ppo_micro=4, prompt_len=48,
                         new_tokens=8, sample_tokens=8, meta_prompts=12, heldout=4,
                         eval_prompts=8, evaluation=True),
    # every sequence exactly max_len (or prompt_len + new_tokens): the memory estimator's shapes
    "smollm2": Sizes(steps=4, meta_steps=3, ppo_iterations=3, sft_batch=16, sft_micro=8,
                     pair_batch=8, pair_micro=4, max_len=512, meta_batch=4, meta_micro=2,
                     ppo_prompts=8, ppo_rollouts=4, ppo_mini=16, ppo_micro=8, prompt_len=128,
                     new_tokens=192, sample_tokens=64, meta_prompts=20, heldout=4,
                     eval_prompts=16, evaluation=False),
}
TESTBED_WORLD = {  # `python -m testbed` sizes: enough records for the steps above
    False: ["--n-sft", "512", "--n-pairs-train", "256", "--n-pairs-test", "64",
            "--n-rl-prompts", "128", "--n-eval-prompts", "32", "--n-ood-prompts", "16",
            "--n-ood-pairs-test", "16"],
    True: ["--n-sft", "64", "--n-pairs-train", "32", "--n-pairs-test", "16", "--n-rl-prompts", "24",
           "--n-eval-prompts", "8", "--n-ood-prompts", "8", "--n-ood-pairs-test", "8",
           "--vocab-size", "300"],
}
PARTS = ("device", "testbed", "smollm2", "resume")
# the stages whose memory is checked on the smollm2 model, and their tools/memory_estimate stage
MEMORY_STAGES = {"sft": "sft", "reward": "reward", "meta_rm inplace": "meta_rm", "ppo": "ppo",
                 "dpo": "dpo"}


@dataclasses.dataclass
class Args:
    out: str = arg("runs/gpu_smoke", "output folder: smoke.md, smoke.json, logs.tar.gz "
                                     "(a few hundred kB; the checkpoints go to --workdir)")
    workdir: str = arg("", "folder for the worlds, checkpoints and logs (several GB with SmolLM2); "
                           "empty = a new temporary folder, deleted at the end")
    keep_workdir: bool = arg(False, "keep the temporary work folder after the run")
    cpu: bool = arg(False, "CPU mode: gloo, the testbed's tiny model at toy sizes, 1-2 steps; "
                           "no CUDA memory, MFU or SmolLM2 (tests/test_gpu_smoke.py)")
    smollm2: str = arg("", "a SmolLM2-135M folder converted by tools/convert_smollm2.py; empty = "
                           "a model of its exact shape with random weights and the testbed's "
                           "tokenizer")
    parts: str = arg("all", "what to run, comma-separated, of: " + ", ".join(PARTS) + "; all = "
                            "every part (--cpu: all but smollm2)")
    launcher: str = arg("torchrun", "how a stage is started: torchrun (one process, --standalone) "
                                    "or env (python STAGE.py with the environment torchrun sets)",
                        choices=["torchrun", "env"])
    budget: float = arg(540.0, "seconds for the whole run: when they are spent, what is left is "
                               "reported as skipped and the report is written", valid=positive)
    stage_timeout: float = arg(150.0, "seconds one run (a stage, the device worker) may take "
                                      "before it is killed and reported (a hang must not take "
                                      "the whole --budget; the longest run, ppo on smollm2, "
                                      "should take about a minute)", valid=positive)
    threads: int = arg(0, common.THREADS_HELP + "; each run gets OMP_NUM_THREADS = this "
                                                "(0: 1 with --cpu, else 4)", valid=non_negative)
    overwrite: bool = arg(False, "write into an --out that already holds files")


# --------------------------------------------------------------------------------------------------
# Processes: one run = one subprocess, its output stamped line by line, killed with its children
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    name: str
    rc: int | None                      # None: killed at its timeout
    seconds: float
    log: str
    steps: list[tuple[float, int]]      # (time.monotonic(), step) of every printed step line
    peak: dict | None                   # common.report_peak_memory's file, when it wrote one

    def tail(self, lines: int = 30) -> str:
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def failure(self) -> str | None:
        """Why the run failed (with the stage's own error line, when it printed one), or None when
        it exited 0."""
        if self.rc is None:
            return f"killed after {self.seconds:.0f} s (--stage-timeout / --budget)"
        if self.rc == 0:
            return None
        said = [line.strip() for line in self.tail(200).splitlines()
                if line.startswith("error: ") or ERROR_LINE.match(line)]
        return f"exit status {self.rc}" + (f": {said[-1][:300]}" if said else "")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own, so a
    process group does not hold them), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def pump(stream, log: str, command: str, steps: list[tuple[float, int]]) -> None:
    """Copy a run's output into its log, noting when each step line arrived."""
    with open(log, "w", encoding="utf-8") as f:
        f.write(f"$ {command}\n")
        for line in stream:
            match = STEP_LINE.search(line)
            if match:
                steps.append((time.monotonic(), int(match.group(1))))
            f.write(line)


def seconds_per_step(steps: list[tuple[float, int]]) -> float | None:
    """From the step lines' arrival times, leaving out the first step (CUDA and cuBLAS warm-up):
    (t_last - t_first) / (steps between them); None with fewer than two lines."""
    if len(steps) < 2 or steps[-1][1] <= steps[0][1]:
        return None
    return (steps[-1][0] - steps[0][0]) / (steps[-1][1] - steps[0][1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------
def numbers(obj: Any, where: str = "") -> Iterator[tuple[str, float]]:
    """Every number in a JSON value, with its path ("3.loss", "win_tie_lose.win")."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield where, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from numbers(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from numbers(v, f"{where}.{i}" if where else str(i))


def not_finite(obj: Any) -> list[str]:
    """The non-finite numbers of a stage's output, except a NaN that means "undefined": ppo.py's
    on-policy accuracy of an evaluation in which no two samples of a prompt differed in gold
    (eval_onpolicy_pairs = 0; the smoke's tiny runs sample that often)."""
    if isinstance(obj, list):
        obj = [{k: v for k, v in line.items()
                if not (k == "eval_onpolicy_acc" and line.get("eval_onpolicy_pairs") == 0)}
               if isinstance(line, dict) else line for line in obj]
    return [f"{k} = {v}" for k, v in numbers(obj) if not math.isfinite(v)]


def read_json_lines(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def matmul_parameters(config: dict) -> tuple[int, int]:
    """N of the FLOP formulas: the weights that sit in matmuls (every decoder layer's q, k, v, o,
    gate, up, down, and the head) of the causal LM and of the RM (score head, 1 output)."""
    lm = memory_estimate.parameter_counts(config, "lm")
    rm = memory_estimate.parameter_counts(config, "score")
    layers = memory_estimate.arch(config).layers
    return (layers * lm["layer_matmul"] + lm["head_matmul"],
            layers * rm["layer_matmul"] + rm["head_matmul"])


# FLOPs (the usual Kaplan / PaLM count): a forward costs 2·N per token and a training step
# (forward + backward) 6·N, N = matmul_parameters. Left out: attention's QKᵀ and AV (4·L·T·d per
# token and forward: 13 % of 2·N for SmolLM2 at T = 512), norms, softmax, rotary and the other
# element-wise work, the optimiser step, and the head's saving (the stages apply it only where it
# is read: N counts it on every token, so sft / dpo / ppo slightly overcount their prompt tokens).
# MFU = those FLOPs / the step's seconds / the measured bf16 matmul peak.
def step_flops(stage: str, tokens: dict[str, float], n_lm: int, n_rm: int,
               mechanism: bool = False) -> float:
    """FLOPs of one optimiser step of `stage` on `tokens` (sequences' tokens by kind)."""
    if stage == "sft":
        return 6 * n_lm * tokens["seq"]
    if stage == "reward":
        return 6 * n_rm * tokens["seq"]
    if stage == "dpo":  # policy forward + backward, reference forward
        return (6 + 2) * n_lm * tokens["seq"]
    # meta_rm, order 1: J's forward + backward on X_s, L's on X_t; mechanism_stats
    # (--log-adapted-every 1) one more of each and a forward of X_s
    s, t = tokens["meta"], tokens["pairs"]
    return 6 * n_rm * (s + t) + ((6 + 2) * n_rm * s + 6 * n_rm * t if mechanism else 0)


def ppo_flops(rollout_tokens: float, epochs: int, n_lm: int, n_rm: int) -> float:
    """FLOPs of one PPO iteration after generation: step 3's forwards of policy, reference, RM and
    critic, and --ppo-epochs forward + backward of policy and critic, on every rollout token."""
    return rollout_tokens * (2 * (2 * n_lm + 2 * n_rm) + epochs * 6 * (n_lm + n_rm))


# --------------------------------------------------------------------------------------------------
# The smoke run
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Check:
    name: str
    status: str                  # pass | fail | skipped
    detail: str = ""
    seconds: float | None = None
    numbers: dict = dataclasses.field(default_factory=dict)
    log_tail: str = ""


@dataclasses.dataclass
class World:
    """One model and the files its stages read."""
    name: str                    # testbed | smollm2
    source: str                  # what the base model is, in words
    base: str
    sizes: Sizes
    sft_data: str
    pairs_train: str
    pairs_test: str
    ood_pairs_test: str
    ppo_prompts: str
    meta_prompts: str            # meta_data's prompts
    eval_prompts: str
    meta_set: str = ""           # S with responses longer than max_len (smollm2: memory check)


class Smoke:
    def __init__(self, args: Args, parts: list[str]):
        self.args, self.parts, self.gpu = args, parts, not args.cpu
        self.t0 = time.monotonic()
        self.work = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="gpu_smoke_"))
        self.logs = os.path.join(self.work, "logs")
        for folder in (self.logs, os.path.join(self.work, "peaks")):
            os.makedirs(folder, exist_ok=True)
        self.checks: list[Check] = []
        self.rows: list[dict] = []
        self.timings: dict[str, float] = {}
        self.info: dict[str, Any] = {"models": {}}
        self.device: dict[str, Any] = {}
        self.peak_flops: float | None = None
        self.worlds: dict[str, World] = {}
        self.runs = 0
        self._tokenizers: dict[str, Any] = {}
        self._lengths: dict[tuple, float] = {}

    # ---- bookkeeping ----
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def remaining(self) -> float:
        return self.args.budget - self.elapsed()

    def record(self, check: Check) -> Check:
        self.checks.append(check)
        took = f" ({check.seconds:.1f} s)" if check.seconds is not None else ""
        print(f"[{self.elapsed():6.1f} s] {check.name}: {check.status}{took}"
              + (f" - {check.detail}" if check.detail else ""), flush=True)
        return check

    def part(self, name: str, fn, *a) -> None:
        """Run one part; an error in this script's own code is a failed check, not the end."""
        start = time.monotonic()
        try:
            fn(*a)
        except Exception:  # noqa: BLE001 (reported, and the other parts still run)
            self.record(Check(f"{name}: the smoke script itself", "fail",
                              "internal error (traceback in smoke.json)",
                              log_tail=traceback.format_exc()))
        self.timings[name] = time.monotonic() - start
        print(f"[{self.elapsed():6.1f} s] part {name} took {self.timings[name]:.1f} s", flush=True)

    def environment(self, peak_file: str, distributed: bool) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                            "MASTER_PORT", "GROUP_RANK", "TORCHELASTIC_RUN_ID")}
        threads = self.args.threads or (1 if self.args.cpu else 4)
        env.update(PYTHONPATH=os.pathsep.join([REPO, *filter(None, [env.get("PYTHONPATH")])]),
                   PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads))
        env[common.PEAK_MEMORY_ENV] = peak_file
        if self.args.cpu:
            env["CUDA_VISIBLE_DEVICES"] = ""  # CPU mode stays on the CPU, on any machine
        if distributed and self.args.launcher == "env":
            env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        return env

    def launch(self, name: str, argv: list[str], distributed: bool = True) -> Run | None:
        """`argv` (a script or `-m module` and its flags) as one process under torchrun (or as
        torchrun would start it, --launcher env; `distributed` False: plain python). None when
        --budget has no room left for it."""
        if self.remaining() < MIN_RUN_S:
            return None
        self.runs += 1
        slug = f"{self.runs:02d}_" + re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
        log = os.path.join(self.logs, slug + ".log")
        peak_file = os.path.join(self.work, "peaks", slug + ".json")
        torchrun = TORCHRUN if distributed and self.args.launcher == "torchrun" else []
        command = [sys.executable, *torchrun, *argv]
        limit = min(self.args.stage_timeout, self.remaining() - 5)
        start, steps = time.monotonic(), []
        proc = subprocess.Popen(command, cwd=REPO, env=self.environment(peak_file, distributed),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
        reader = threading.Thread(target=pump, args=(proc.stdout, log, shlex.join(command), steps),
                                  daemon=True)
        reader.start()
        try:
            rc: int | None = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            proc.wait()
            rc = None
        reader.join(timeout=10)
        peak = None
        if os.path.exists(peak_file):
            with open(peak_file) as f:
                peak = json.load(f)
            shutil.copy(peak_file, os.path.join(self.logs, slug + ".peak.json"))
        return Run(name, rc, time.monotonic() - start, log, steps, peak)

    def skipped(self, name: str, why: str = "") -> Check:
        return self.record(Check(name, "skipped", why or "no time left (--budget)"))

    # ---- the run ----
    def run(self) -> bool:
        print(f"gpu_smoke: {'CPU (gloo)' if self.args.cpu else 'GPU (NCCL)'} mode, parts "
              f"{', '.join(self.parts)}, work folder {self.work}", flush=True)
        self.part("worlds", self.build_worlds)
        if "device" in self.parts:
            self.part("device", self.device_checks)
        env = self.info.get("environment") or {}
        no_gpu = self.gpu and env and not str(env.get("device", "")).startswith("cuda")
        for name in ("testbed", "smollm2"):
            if name in self.parts:
                if name == "smollm2" and no_gpu:
                    self.skipped(f"stages ({name})", "no CUDA device (the device worker's report)")
                elif name in self.worlds:
                    self.part(name, self.chain, self.worlds[name])
                else:
                    self.skipped(f"stages ({name})", "its model or data could not be built")
        if "resume" in self.parts:
            if "testbed" in self.worlds:
                self.part("resume", self.resume_check, self.worlds["testbed"])
            else:
                self.skipped("resume (testbed)", "the testbed world could not be built")
        return self.report()

    # ---- models and data ----
    def build_worlds(self) -> None:
        """The testbed world (python -m testbed); for smollm2 its model folder and the data of
        known length."""
        root = os.path.join(self.work, "testbed")
        run = self.launch("python -m testbed", ["-m", "testbed", "--out", root, "--seed", "0",
                                                *TESTBED_WORLD[self.args.cpu]], distributed=False)
        if run is None or run.failure():
            self.record(Check("testbed world", "fail" if run else "skipped",
                              run.failure() if run else "no time left",
                              log_tail=run.tail() if run else ""))
            return
        self.record(Check("testbed world", "pass", root, run.seconds))
        files = {n: os.path.join(root, "data", f"{n}.jsonl")
                 for n in ("sft_train", "pairs_train", "pairs_test", "rl_prompts", "eval_prompts",
                           "ood_pairs_test")}
        sizes = SIZES["testbed-cpu" if self.args.cpu else "testbed"]
        self.worlds["testbed"] = World(
            "testbed", "the testbed's tiny Llama (python -m testbed)",
            os.path.join(root, "base_model"), sizes, files["sft_train"], files["pairs_train"],
            files["pairs_test"], files["ood_pairs_test"], files["rl_prompts"], files["rl_prompts"],
            files["eval_prompts"])
        self.describe_model("testbed", self.worlds["testbed"])
        if "smollm2" in self.parts:
            start = time.monotonic()
            try:
                self.worlds["smollm2"] = self.smollm2_world(self.worlds["testbed"])
                self.describe_model("smollm2", self.worlds["smollm2"])
                shape = self.info["models"]["smollm2"]["parameters"]
                builtin = memory_estimate.parameter_counts(
                    memory_estimate.load_config("smollm2-135m"))["total"]
                self.record(Check("smollm2 model and data", "pass" if shape == builtin else "fail",
                                  f"{self.worlds['smollm2'].source}; {shape:,} parameters "
                                  f"(SmolLM2-135M: {builtin:,})", time.monotonic() - start))
            except Exception:  # noqa: BLE001
                self.record(Check("smollm2 model and data", "fail", "could not be built",
                                  time.monotonic() - start, log_tail=traceback.format_exc()))

    def describe_model(self, name: str, w: World) -> None:
        with open(os.path.join(w.base, "config.json")) as f:
            config = json.load(f)
        n_lm, n_rm = matmul_parameters(config)
        self.info["models"][name] = {
            "source": w.source, "path": w.base, "config": config, "matmul_parameters_lm": n_lm,
            "matmul_parameters_rm": n_rm,
            "parameters": memory_estimate.parameter_counts(config, "lm")["total"]}

    def smollm2_world(self, testbed: World) -> World:
        """SmolLM2's folder (--smollm2) or a model of its exact shape with random weights and the
        testbed's tokenizer, and data whose every sequence is longer than the stages' limits."""
        root = os.path.join(self.work, "smollm2")
        os.makedirs(root, exist_ok=True)
        if self.args.smollm2:
            base = os.path.abspath(self.args.smollm2)
            source = f"SmolLM2-135M converted by tools/convert_smollm2.py ({base})"
        else:
            base = os.path.join(root, "base_model")
            self.build_smollm2_shaped(testbed.base, base)
            source = ("SmolLM2-135M's shape with random weights (seed 0) and the testbed's "
                      "tokenizer (no --smollm2 folder given)")
        s = SIZES["smollm2"]
        rng = random.Random(0)
        with open(testbed.sft_data) as f:
            words = sorted({w for line in f for w in json.loads(line)["response"].split()})

        def text(n: int) -> str:  # n words: at least n tokens (a BPE word is one token or more)
            return " ".join(rng.choice(words) for _ in range(n))

        long = 2 * s.max_len  # words: cut to exactly max_len tokens by data.encode
        data = os.path.join(root, "data")
        os.makedirs(data, exist_ok=True)
        files = {
            "sft": [{"prompt": text(8), "response": text(long)} for _ in range(s.sft_batch
                                                                               * s.steps)],
            "pairs": [{"prompt": text(8), "chosen": text(long), "rejected": text(long)}
                      for _ in range(max(s.pair_batch * s.steps, s.meta_batch * s.meta_steps))],
            "prompts": [{"prompt": text(2 * s.prompt_len)}
                        for _ in range(s.ppo_prompts * s.ppo_iterations)],
            "meta_set": [{"prompt": text(8), "responses": [text(long) for _ in range(K)]}
                         for _ in range(2 * s.meta_batch)],
        }
        for name, records in files.items():
            with open(os.path.join(data, f"{name}.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        path = lambda name: os.path.join(data, f"{name}.jsonl")  # noqa: E731
        return World("smollm2", source, base, s, path("sft"), path("pairs"), testbed.pairs_test,
                     testbed.ood_pairs_test, path("prompts"), testbed.meta_prompts,
                     testbed.eval_prompts, path("meta_set"))

    @staticmethod
    def build_smollm2_shaped(tokenizer_folder: str, out: str) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
        config = LlamaConfig(**SMOLLM2_SHAPE, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = None
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    def tokenizer(self, folder: str):
        if folder not in self._tokenizers:
            from transformers import AutoTokenizer

            self._tokenizers[folder] = AutoTokenizer.from_pretrained(folder)
        return self._tokenizers[folder]

    def mean_length(self, w: World, path: str, field: str) -> float:
        """Mean tokens of a sequence (prompt + `field` + EOS, cut to max_len as the stages cut)."""
        key = (w.base, path, field, w.sizes.max_len)
        if key not in self._lengths:
            from plumbing import data

            tok = self.tokenizer(w.base)
            lengths = []
            for r in read_json_lines(path):
                for response in (r[field] if isinstance(r[field], list) else [r[field]]):
                    lengths.append(len(data.encode(tok, r["prompt"], response,
                                                   w.sizes.max_len)[0]))
            self._lengths[key] = sum(lengths) / len(lengths)
        return self._lengths[key]

    # ---- the device worker: environment, matmul peak, FSDP2 == plain, generation timing ----
    def device_checks(self) -> None:
        models = {}
        for name, w in self.worlds.items():
            s = w.sizes
            per_call = min(s.meta_prompts, 64 // K)  # meta_data's prompts per generate call
            models[name] = {"path": w.base, "meta_prompts": w.meta_prompts, "k": K,
                            "meta_data_prompts": per_call, "eval_prompts": w.eval_prompts,
                            "evaluate_prompts": s.eval_prompts, "new_tokens": s.sample_tokens,
                            "fsdp_tokens": min(256, 4 * s.max_len)}
        spec = {"result": os.path.join(self.work, "device.json"), "gpu": self.gpu,
                "threads": self.args.threads or (1 if self.args.cpu else 4), "models": models}
        spec_path = os.path.join(self.work, "device_spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f, indent=1)
        run = self.launch("device worker", ["-m", "tools.gpu_smoke", "--worker", spec_path])
        if run is None:
            self.skipped("device worker")
            return
        if os.path.exists(spec["result"]):
            with open(spec["result"]) as f:
                self.device = json.load(f)
        env = self.device.get("environment", {})
        self.info["environment"] = env
        ok = run.failure() is None and "error" not in env and env
        detail = run.failure() or ", ".join(f"{k} {env[k]}" for k in
                                            ("gpu", "torch", "transformers", "cuda", "nccl",
                                             "backend") if k in env)
        on_gpu = env.get("device", "").startswith("cuda")
        group = self.device.get("process_group")
        if ok and self.gpu and not on_gpu:
            ok, detail = False, "no CUDA device visible to torch (use --cpu on a CPU machine)"
        elif ok and not isinstance(group, str):  # a dict with the error, or missing
            ok, detail = False, "the process group did not start (NCCL / gloo; see the log)"
        self.record(Check("device worker", "pass" if ok else "fail", detail, run.seconds,
                          log_tail="" if ok else run.tail()))
        if self.gpu:
            peak = self.device.get("matmul_peak", {})
            self.peak_flops = peak.get("flops")
            self.record(Check("bf16 matmul peak", "pass" if self.peak_flops else "fail",
                              f"{self.peak_flops / 1e12:.0f} TFLOP/s ({peak['size']}^3, best of "
                              f"{peak['repeats']} x {peak['calls']})" if self.peak_flops
                              else "not measured", numbers=peak,
                              log_tail=peak.get("error", "")))
        for name in self.worlds:
            self.fsdp_check(name, self.device.get(f"fsdp {name}"), run)

    def fsdp_check(self, name: str, r: dict | None, run: Run) -> None:
        if not r or "error" in r:
            self.record(Check(f"fsdp2 == plain ({name})", "fail",
                              "not measured" if not r else "raised (traceback in smoke.json)",
                              log_tail=(r or {}).get("error") or run.tail()))
            return
        ok = (r["bf16_logits"] <= FSDP_BF16_TOL and r["fp32_logits"] <= FSDP_FP32_TOL
              and r["fp32_grads"] <= FSDP_FP32_TOL)
        detail = (f"bf16 logits {r['bf16_logits']:.2e} (<= {FSDP_BF16_TOL:g}; autocast vs fp32 "
                  f"{r['autocast_vs_fp32']:.2e}), fp32 logits {r['fp32_logits']:.2e}, fp32 "
                  f"gradients {r['fp32_grads']:.2e} (<= {FSDP_FP32_TOL:g}); relative")
        self.record(Check(f"fsdp2 == plain ({name})", "pass" if ok else "fail", detail,
                          numbers=r))

    # ---- the stages ----
    def stage(self, w: World, stage: str, argv: list[str], inputs: str = "") -> bool:
        """Run one stage (`argv`: its script and flags, --bf16 added), check it, add its table row;
        True when it passed."""
        script = argv[0]
        folder = argv[argv.index("--out") + 1]
        name = f"{stage} ({w.name})"
        row: dict[str, Any] = {"stage": stage, "model": w.name, "status": "skipped",
                               "inputs": inputs}
        self.rows.append(row)
        run = self.launch(name, [*argv, "--bf16"])
        if run is None:
            self.skipped(f"stage {name}")
            return False
        row["wall_s"] = run.seconds
        problems = [run.failure()] if run.failure() else []
        device = (run.peak or {}).get("device")
        if not problems and device is None:
            problems.append("no peak-memory report (the stage did not end through run_main)")
        elif not problems and self.gpu != device.startswith("cuda"):
            problems.append(f"ran on {device}")
        row["device"], row["backend"] = device, (run.peak or {}).get("backend")
        written = {"meta_data.py": "stats.json", "evaluate.py": "results.json"}.get(
            script, "metrics.jsonl")
        path = os.path.join(folder, written)
        if not problems:
            try:
                if written.endswith(".jsonl"):
                    content: Any = read_json_lines(path)
                else:
                    with open(path) as f:
                        content = json.load(f)
                bad = not_finite(content)
                if not content:
                    problems.append(f"{written} is empty")
                elif bad:
                    problems.append(f"{len(bad)} non-finite numbers in {written}: "
                                    + "; ".join(bad[:3]))
            except (OSError, ValueError) as e:
                problems.append(f"{written}: {e}")
        for extra in ("metrics.jsonl", "args.json", "stats.json", "results.json"):
            if os.path.exists(os.path.join(folder, extra)):
                shutil.copy(os.path.join(folder, extra),
                            run.log.replace(".log", f".{extra}"))
        try:
            self.speed(w, stage, run, folder, row)
        except Exception:  # noqa: BLE001 (a number missing is not the stage's failure)
            row["speed_error"] = traceback.format_exc()
        if self.gpu and run.peak and "max_memory_allocated" in run.peak:
            row["peak_gib"] = run.peak["max_memory_allocated"] / GiB
            row["reserved_gib"] = run.peak["max_memory_reserved"] / GiB
        row["status"] = "fail" if problems else "pass"
        detail = "; ".join(problems) or (f"on {device}, {row['backend']}"
                                         + (f"; inputs: {inputs}" if inputs else ""))
        self.record(Check(f"stage {name}", row["status"], detail, run.seconds,
                          log_tail=run.tail() if problems else ""))
        if not problems and self.gpu and w.name == "smollm2" and stage in MEMORY_STAGES:
            self.memory_check(w, stage, row)
        return not problems

    def speed(self, w: World, stage: str, run: Run, folder: str, row: dict) -> None:
        """s/step, tokens/s, generation ms per decode step and MFU of a stage (module docstring)."""
        info = self.info["models"][w.name]
        n_lm, n_rm = info["matmul_parameters_lm"], info["matmul_parameters_rm"]
        s = w.sizes
        if stage in ("meta_data", "evaluate"):
            probe = self.device.get(f"generation {w.name} {stage}") or {}
            row["gen_ms_per_step"] = probe.get("ms_per_step")
            row["tokens_per_s"] = probe.get("tokens_per_s")
            row["speed_note"] = "generation probe (device worker)"
            return
        if stage == "ppo":
            lines = [m for m in read_json_lines(os.path.join(folder, "metrics.jsonl"))
                     if "gen_s" in m]
            lines = lines[1:] if len(lines) > 1 else lines  # the first iteration warms up
            mean = lambda key: sum(m[key] for m in lines) / len(lines)  # noqa: E731
            row["s_per_step"] = mean("gen_s") + mean("forward_s") + mean("train_s")
            row["response_len"] = mean("response_len")
            row["tokens_per_s"] = mean("train_tokens_per_s")
            # one generate call per iteration (--generation-batch-size holds all rollouts): it
            # runs max_new_tokens forwards unless every rollout stopped early (eos_rate 1: fewer
            # steps ran, so the true ms per step is above this one)
            row["gen_ms_per_step"] = 1000 * mean("gen_s") / s.new_tokens
            row["gen_steps_exact"] = all(m["eos_rate"] < 1 for m in lines)
            with open(os.path.join(folder, "args.json")) as f:
                epochs = json.load(f)["ppo_epochs"]
            flops = [ppo_flops(m["train_tokens_per_s"] * m["train_s"] / epochs, epochs, n_lm, n_rm)
                     / (m["forward_s"] + m["train_s"]) for m in lines]
            if self.peak_flops:
                row["mfu"] = sum(flops) / len(flops) / self.peak_flops
            return
        per_step = seconds_per_step(run.steps)
        row["s_per_step"] = per_step
        if stage == "sft":
            tokens = {"seq": s.sft_batch * self.mean_length(w, w.sft_data, "response")}
        elif stage in ("reward", "dpo"):
            tokens = {"seq": s.pair_batch * (self.mean_length(w, w.pairs_train, "chosen")
                                             + self.mean_length(w, w.pairs_train, "rejected"))}
        else:  # meta_rm
            with open(os.path.join(folder, "args.json")) as f:
                args = json.load(f)
            tokens = {"pairs": s.meta_batch * (self.mean_length(w, w.pairs_train, "chosen")
                                               + self.mean_length(w, w.pairs_train, "rejected")),
                      "meta": s.meta_batch * K * self.mean_length(w, args["meta"], "responses")}
        total = sum(tokens.values())
        row["tokens_per_step"] = total
        if per_step:
            row["tokens_per_s"] = total / per_step
            mechanism = stage.startswith("meta_rm") and s.evaluation  # --log-adapted-every 1
            flops = step_flops(stage.split()[0], tokens, n_lm, n_rm, mechanism)
            if self.peak_flops:
                row["mfu"] = flops / per_step / self.peak_flops

    def memory_check(self, w: World, stage: str, row: dict) -> None:
        """The estimator at this run's shapes against the stage's max_memory_allocated."""
        name = f"memory {stage} ({w.name})"
        if "peak_gib" not in row:
            self.record(Check(name, "fail", "no max_memory_allocated in the stage's report"))
            return
        s = w.sizes
        shapes = {"sft": dict(micro_batch=s.sft_micro, seq_len=s.max_len),
                  "reward": dict(micro_batch=s.pair_micro, seq_len=s.max_len),
                  "dpo": dict(micro_batch=s.pair_micro, seq_len=s.max_len),
                  "meta_rm inplace": dict(micro_batch=s.meta_micro, k=K, seq_len=s.max_len,
                                          meta_route="inplace"),
                  "ppo": dict(micro_batch=s.ppo_micro, prompt_len=s.prompt_len,
                              new_tokens=s.new_tokens, gen_batch=s.ppo_prompts * s.ppo_rollouts)}
        # a world-1 run today: fp32 trained weights under bf16 autocast, frozen models in bf16,
        # no checkpointing, generation on the model itself; every sequence one packed row
        options = dict(world=1, precision="autocast", frozen_bf16=True, gen_unsharded=False,
                       grad_checkpointing=False, masked=False, attention="sdpa",
                       measure_adapted=False, **shapes[stage])
        config = self.info["models"][w.name]["config"]
        parts = memory_estimate.estimate(config, MEMORY_STAGES[stage], **options)
        allocated = (parts["total"] - parts["allocator margin"]
                     - parts["runtime (CUDA, NCCL)"])
        phases = list(memory_estimate.estimate_phases(
            config, MEMORY_STAGES[stage], memory_estimate.Options(**options)))
        row["estimate_gib"] = allocated / GiB
        row["ratio"] = allocated / GiB / row["peak_gib"]
        ok = abs(row["ratio"] - 1) <= MEMORY_TOL
        largest = sorted(((v, k) for k, v in parts.items()
                          if k not in ("total", "_phase", "allocator margin",
                                       "runtime (CUDA, NCCL)")), reverse=True)[:3]
        short = (f"; the rollouts were shorter than the estimate's {s.new_tokens} new tokens "
                 f"(mean {row['response_len']:.0f}): the estimate is an upper bound"
                 if stage == "ppo" and row.get("response_len", s.new_tokens) < s.new_tokens
                 else "")
        self.record(Check(
            name, "pass" if ok else "fail",
            f"estimate {row['estimate_gib']:.2f} GiB (allocated parts; peak phase "
            f"{phases[parts['_phase']]}: " + ", ".join(f"{k} {v / GiB:.2f}" for v, k in largest)
            + f") vs max_memory_allocated {row['peak_gib']:.2f} GiB (reserved "
            f"{row.get('reserved_gib', math.nan):.2f}): x{row['ratio']:.2f} (within "
            f"{MEMORY_TOL:.0%}: {'yes' if ok else 'no'}){short}",
            numbers={"options": options, "estimate_parts": parts, "peak": row["peak_gib"]}))

    def chain(self, w: World) -> None:
        """sft -> reward -> meta_data -> meta_rm (functional, inplace) -> ppo -> dpo -> evaluate
        on one model; a stage whose input failed reads a stand-in, so every stage is checked."""
        s, out = w.sizes, lambda stage: os.path.join(self.work, w.name, stage)  # noqa: E731
        ev = s.evaluation
        steps = ["--max-steps", str(s.steps), "--log-every", "1"]
        ok = self.stage(w, "sft", [
            "sft.py", "--model", w.base, "--data", w.sft_data, "--out", out("sft"),
            "--lr", "3e-3" if w.name == "testbed" else "1e-4", "--batch-size", str(s.sft_batch),
            "--micro-batch-size", str(s.sft_micro), "--max-len", str(s.max_len), *steps,
            "--eval-prompts", w.eval_prompts if ev else "", "--eval-samples",
            str(s.eval_prompts), "--max-new-tokens", str(s.sample_tokens)])
        policy = out("sft") if ok else w.base
        stand_in = "" if ok else "the base model (sft failed)"
        pair_flags = ["--batch-size", str(s.pair_batch), "--micro-batch-size", str(s.pair_micro),
                      "--max-len", str(s.max_len), "--train", w.pairs_train,
                      "--test", w.pairs_test if ev else "", "--eval-every", "0", *steps]
        ok = self.stage(w, "reward", ["reward.py", "--model", policy, "--out", out("reward"),
                                      "--lr", "3e-4" if w.name == "testbed" else "1e-5",
                                      *pair_flags], stand_in)
        rm = out("reward") if ok else self.untrained_rm(w, policy)
        rm_note = "" if ok else "an untrained RM (reward failed)"
        ok = self.stage(w, "meta_data", [
            "meta_data.py", "--policy", policy, "--prompts", w.meta_prompts, "--out",
            out("meta_data"), "--k", str(K), "--max-prompts", str(s.meta_prompts), "--heldout",
            str(s.heldout), "--max-new-tokens", str(s.sample_tokens)], stand_in)
        meta_set = os.path.join(out("meta_data"), "meta_train.jsonl")
        heldout = os.path.join(out("meta_data"), "meta_heldout.jsonl")
        if not ok:
            meta_set = heldout = self.pairs_meta_set(w)
        s_note = "" if ok else "a meta set made from the pairs (meta_data failed)"
        meta_flags = ["--model", rm, "--train", w.pairs_train, "--test", w.pairs_test if ev else "",
                      "--meta-heldout", heldout if ev else "", "--batch-size", str(s.meta_batch),
                      "--meta-batch-size", str(s.meta_batch), "--max-len", str(s.max_len),
                      "--max-steps", str(s.meta_steps), "--log-every", "1", "--eval-every", "0",
                      "--eta", "0.3", "--lr", "3e-4" if w.name == "testbed" else "1e-5",
                      "--log-adapted-every", "1" if ev else "0"]
        notes = lambda *n: "; ".join(x for x in n if x)  # noqa: E731
        self.stage(w, "meta_rm functional", [
            "meta_rm.py", *meta_flags, "--meta", meta_set, "--meta-impl", "functional",
            "--micro-batch-size", str(s.meta_batch), "--out", out("meta_rm_functional")],
            notes(rm_note, s_note))
        # in place: the smollm2 model reads S of known length (the memory check's shapes)
        inplace_set, inplace_note = (w.meta_set, "S of known length") if w.meta_set else (
            meta_set, s_note)
        ok = self.stage(w, "meta_rm inplace", [
            "meta_rm.py", *meta_flags, "--meta", inplace_set, "--meta-impl", "inplace",
            "--micro-batch-size", str(s.meta_micro), "--out", out("meta_rm_inplace")],
            notes(rm_note, inplace_note))
        meta_rm = out("meta_rm_inplace") if ok else rm
        rollouts = s.ppo_prompts * s.ppo_rollouts
        ok = self.stage(w, "ppo", [
            "ppo.py", "--sft", policy, "--rm", rm, "--prompts", w.ppo_prompts, "--out", out("ppo"),
            "--iterations", str(s.ppo_iterations), "--prompts-per-iteration", str(s.ppo_prompts),
            "--rollouts-per-prompt", str(s.ppo_rollouts), "--mini-batch-size", str(s.ppo_mini),
            "--micro-batch-size", str(s.ppo_micro), "--generation-batch-size", str(rollouts),
            "--max-new-tokens", str(s.new_tokens), "--max-prompt-len", str(s.prompt_len),
            "--policy-lr", "1e-4" if w.name == "testbed" else "1e-6", "--critic-lr", "1e-4",
            "--save-every", "0", "--sample-every", "0",
            *(["--eval-prompts", w.eval_prompts, "--eval-every", "2", "--eval-samples", "1"]
              if ev else [])], notes(stand_in, rm_note))
        ppo_policy = out("ppo") if ok else policy
        self.stage(w, "dpo", [
            "dpo.py", "--model", policy, "--out", out("dpo"), "--lr", "3e-5", "--beta", "0.1",
            "--warmup-steps", "2", *pair_flags, "--eval-prompts", w.eval_prompts if ev else "",
            "--eval-samples", str(s.eval_prompts), "--max-new-tokens", str(s.sample_tokens)],
            stand_in)
        self.stage(w, "evaluate", [
            "evaluate.py", "--policy-a", ppo_policy, "--policy-b", policy, "--judge", "gold",
            "--prompts", w.eval_prompts, "--max-prompts", str(s.eval_prompts), "--max-new-tokens",
            str(s.sample_tokens), "--rms", f"vanilla={rm},metarm={meta_rm}", "--pairs-test",
            w.pairs_test, "--ood-pairs-test", w.ood_pairs_test, "--gap-set", heldout,
            "--max-len", str(s.max_len), "--out", out("evaluate")],
            notes("" if ok else "policy A = the SFT model (ppo failed)", stand_in, rm_note))

    def untrained_rm(self, w: World, policy: str) -> str:
        """A stand-in RM when reward.py failed: `policy` with a score head drawn under seed 0."""
        import torch
        import transformers
        from transformers import AutoModelForSequenceClassification

        folder = os.path.join(self.work, w.name, "rm_stand_in")
        if not os.path.isdir(folder):
            tokenizer = self.tokenizer(policy)
            transformers.logging.set_verbosity_error()  # no report of the new head: it is meant
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = AutoModelForSequenceClassification.from_pretrained(
                    policy, num_labels=1, pad_token_id=tokenizer.pad_token_id)
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        return folder

    def pairs_meta_set(self, w: World) -> str:
        """A stand-in meta set when meta_data.py failed: K responses per prompt from the pairs."""
        if w.meta_set:
            return w.meta_set
        path = os.path.join(self.work, w.name, "meta_set_stand_in.jsonl")
        pairs = read_json_lines(w.pairs_train)
        with open(path, "w") as f:
            for i in range(0, len(pairs) - 1, 2):
                responses = [pairs[i]["chosen"], pairs[i]["rejected"], pairs[i + 1]["chosen"],
                             pairs[i + 1]["rejected"]]
                f.write(json.dumps({"prompt": pairs[i]["prompt"], "responses": responses}) + "\n")
        return path

    # ---- resume ----
    def resume_check(self, w: World) -> None:
        """sft straight vs interrupted (SIGTERM after step 1) + --resume, --deterministic."""
        import torch
        from safetensors.torch import load_file

        s = w.sizes
        root = os.path.join(self.work, "resume")
        flags = ["--model", w.base, "--data", w.sft_data, "--eval-prompts", "", "--lr", "3e-3",
                 "--batch-size", str(s.sft_batch), "--micro-batch-size", str(s.sft_micro),
                 "--max-len", str(s.max_len), "--max-steps", str(max(2, s.steps // 2)),
                 "--save-every", "1", "--log-every", "1", "--bf16", "--deterministic"]
        name = f"resume ({w.name})"
        start = time.monotonic()
        straight = os.path.join(root, "straight")
        runs = {"straight": self.launch("resume: straight", ["sft.py", *flags, "--out", straight])}
        if self.gpu:  # a second straight run: are the kernels deterministic at all?
            runs["again"] = self.launch("resume: straight again",
                                        ["sft.py", *flags, "--out", os.path.join(root, "again")])
        resumed = os.path.join(root, "resumed")
        runs["interrupted"] = self.launch("resume: interrupted", [
            HOOKS, "--signal-after-steps", "1", "TERM", "sft.py", *flags, "--out", resumed])
        state = os.path.join(resumed, "trainer_state.pt")
        checkpoint_step = (torch.load(state, map_location="cpu", weights_only=False)["step"]
                           if os.path.exists(state) else None)
        runs["resumed"] = self.launch("resume: --resume",
                                      ["sft.py", *flags, "--out", resumed, "--resume"])
        if any(r is None for r in runs.values()):
            self.skipped(name)
            return
        seconds = time.monotonic() - start
        problems = [f"{k}: {r.failure()}" for k, r in runs.items()
                    if k != "interrupted" and r.failure()]
        stopped = runs["interrupted"]
        with open(stopped.log, encoding="utf-8", errors="replace") as f:
            log = f.read()
        if stopped.rc == 0 or "stopped by SIGTERM after step 1 " not in log or checkpoint_step != 1:
            problems.append("the interrupted run did not stop after step 1 with a checkpoint")
        if "--resume: continuing" not in runs["resumed"].tail(200):
            problems.append("the resumed run did not continue from the checkpoint")
        if problems:
            self.record(Check(name, "fail", "; ".join(problems), seconds,
                              log_tail="\n".join(r.tail(15) for r in runs.values())))
            return

        def compare(a: str, b: str) -> tuple[bool, float]:
            wa = load_file(os.path.join(a, "model.safetensors"))
            wb = load_file(os.path.join(b, "model.safetensors"))
            if wa.keys() != wb.keys():
                return False, math.inf
            diff = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)
            return all(torch.equal(wa[k], wb[k]) for k in wa), diff

        same, diff = compare(straight, resumed)
        timing = {"tokens_per_s", "pairs_per_s", "s_per_step"}
        lines = [[{k: v for k, v in m.items() if k not in timing}
                  for m in read_json_lines(os.path.join(f, "metrics.jsonl"))]
                 for f in (straight, resumed)]
        result = {"bit_identical": same, "max_abs_diff": diff,
                  "metrics_equal": lines[0] == lines[1], "checkpoint_step": checkpoint_step}
        detail = (f"resumed == straight bit for bit ({diff:.1e})" if same
                  else f"resumed != straight: max |difference| {diff:.3e}")
        detail += f"; metrics lines {'equal' if result['metrics_equal'] else 'differ'}"
        if "again" in runs:
            result["straight_twice_identical"], result["straight_twice_diff"] = compare(
                straight, os.path.join(root, "again"))
            twice = (f"differ by {result['straight_twice_diff']:.3e} (the kernels are not "
                     "deterministic)" if not result["straight_twice_identical"] else "identical")
            detail += f"; two straight runs {twice}"
        self.record(Check(name, "pass" if same else "fail", detail, seconds, numbers=result))

    # ---- report ----
    def report(self) -> bool:
        passed = bool(self.checks) and all(c.status == "pass" for c in self.checks)
        os.makedirs(self.args.out, exist_ok=True)
        markdown = self.markdown(passed)
        print("\n" + markdown, flush=True)
        with open(os.path.join(self.args.out, "smoke.md"), "w") as f:
            f.write(markdown)
        summary = {"passed": passed, "mode": "cpu" if self.args.cpu else "gpu",
                   "command": shlex.join([os.path.basename(sys.executable), "-m",
                                          "tools.gpu_smoke", *sys.argv[1:]]),
                   "args": dataclasses.asdict(self.args), "parts": self.parts,
                   "elapsed_s": self.elapsed(), "part_seconds": self.timings,
                   "tolerances": {"fsdp_bf16_relative": FSDP_BF16_TOL,
                                  "fsdp_fp32_relative": FSDP_FP32_TOL, "memory": MEMORY_TOL},
                   "matmul_peak_flops": self.peak_flops, **self.info, "device_worker": self.device,
                   "stages": self.rows, "checks": [dataclasses.asdict(c) for c in self.checks]}
        with open(os.path.join(self.args.out, "smoke.json"), "w") as f:
            json.dump(summary, f, indent=1, default=str)
        with tarfile.open(os.path.join(self.args.out, "logs.tar.gz"), "w:gz") as tar:
            tar.add(self.logs, arcname="logs")
        if not self.args.workdir and not self.args.keep_workdir:
            shutil.rmtree(self.work, ignore_errors=True)
        return passed

    def markdown(self, passed: bool) -> str:
        cpu = "n/a (CPU)"

        def cell(row: dict, key: str, spec: str, gpu_only: bool = False) -> str:
            if gpu_only and self.args.cpu:
                return cpu
            value = row.get(key)
            return "-" if value is None else format(value, spec)

        env = self.info.get("environment", {})
        lines = [f"# GPU smoke test: {'PASSED' if passed else 'FAILED'}", "",
                 f"- mode: {'CPU, gloo (--cpu)' if self.args.cpu else 'GPU, NCCL'}; launcher "
                 f"{self.args.launcher}; {self.elapsed():.0f} s in all ("
                 + ", ".join(f"{k} {v:.0f} s" for k, v in self.timings.items()) + ")",
                 "- device: " + (", ".join(f"{k} {v}" for k, v in env.items()) or "unknown"),
                 "- bf16 matmul peak: " + (f"{self.peak_flops / 1e12:.1f} TFLOP/s"
                                           if self.peak_flops else cpu if self.args.cpu else "-")]
        for name, m in self.info["models"].items():
            lines.append(f"- model {name}: {m['source']}; {m['parameters']:,} parameters")
        lines += ["", "| stage | model | status | wall s | s/step | tokens/s | gen ms/step | MFU "
                      "| peak GiB | estimate GiB | estimate/peak |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            lines.append(" | ".join([
                f"| {r['stage']}", r["model"], r["status"], cell(r, "wall_s", ".1f"),
                cell(r, "s_per_step", ".3f"), cell(r, "tokens_per_s", ",.0f"),
                ("" if r.get("gen_steps_exact", True) else "≥ ")
                + cell(r, "gen_ms_per_step", ".1f"),
                cell(r, "mfu", ".1%", gpu_only=True), cell(r, "peak_gib", ".2f", gpu_only=True),
                cell(r, "estimate_gib", ".2f", gpu_only=True),
                cell(r, "ratio", ".2f", gpu_only=True)]) + " |")
        lines += ["", "| check | status | detail |", "|---|---|---|"]
        for c in self.checks:
            detail = c.detail.replace("|", "/").replace("\n", " ")
            lines.append(f"| {c.name} | {c.status} | {detail} |")
        lines += ["", "s/step leaves out the first step; gen ms/step: one decode step of the whole "
                      "batch (meta_data, evaluate: the device worker's probe; ≥: every rollout "
                      "stopped early, so fewer steps ran); MFU: 6·N·tokens (training) / 2·N "
                      "(forward) over the measured bf16 matmul peak, attention left out; estimate: "
                      "tools/memory_estimate's allocated parts (no runtime, no margin) vs "
                      "torch.cuda.max_memory_allocated. Logs: logs.tar.gz.", ""]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The device worker (run under torchrun by `Smoke.device_checks`): writes its results after each
# part, so a crash loses only the parts after it
# --------------------------------------------------------------------------------------------------
def device_worker(spec_path: str) -> None:
    import torch
    import torch.distributed as dist

    from plumbing import distributed

    with open(spec_path) as f:
        spec = json.load(f)
    result: dict[str, Any] = {}

    def save() -> None:
        with open(spec["result"] + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(spec["result"] + ".tmp", spec["result"])

    def attempt(key: str, fn, *a) -> None:
        try:
            result[key] = fn(*a)
        except Exception:  # noqa: BLE001 (each part on its own)
            result[key] = {"error": traceback.format_exc()}
            print(result[key]["error"], file=sys.stderr, flush=True)
        save()

    common.configure_process(spec["threads"])  # TF32 off: fp32 means fp32
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    # NCCL (+ gloo for CPU tensors) as in every stage; without it only FSDP2's parts fail
    attempt("process_group", lambda: str(distributed.init_distributed(10.0)[2]))
    attempt("environment", describe_environment, device)
    if device.type == "cuda":
        attempt("matmul_peak", matmul_peak, device)
    for name, m in spec["models"].items():
        attempt(f"fsdp {name}", fsdp_equals_plain, m["path"], m["fsdp_tokens"], device)
        attempt(f"generation {name} meta_data", generation_probe, m["path"], m["meta_prompts"],
                m["meta_data_prompts"], m["k"], m["new_tokens"], True, device)
        attempt(f"generation {name} evaluate", generation_probe, m["path"], m["eval_prompts"],
                m["evaluate_prompts"], 1, m["new_tokens"], False, device)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as common.run_main ends a torchrun worker


def describe_environment(device) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    import transformers

    env: dict[str, Any] = {"device": str(device), "torch": torch.__version__,
                           "transformers": transformers.__version__,
                           "python": sys.version.split()[0],
                           "backend": str(dist.get_backend()) if dist.is_initialized() else None}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_gib=round(p.total_memory / GiB, 1),
                   capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda)
        try:
            version = torch.cuda.nccl.version()
            env["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else version
        except Exception:  # noqa: BLE001 (a detail)
            env["nccl"] = "?"
    return env


def matmul_peak(device, size: int = 8192, repeats: int = 5, calls: int = 10) -> dict[str, Any]:
    """The bf16 matmul throughput this GPU reaches: size^3 products, best of `repeats` timings of
    `calls` back-to-back products (2·size^3 FLOPs each)."""
    import torch

    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    torch.cuda.synchronize(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            torch.matmul(a, b, out=c)
        torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / calls)
    del a, b, c
    torch.cuda.empty_cache()
    return {"size": size, "repeats": repeats, "calls": calls, "seconds": best,
            "flops": 2 * size**3 / best}


def fsdp_equals_plain(path: str, tokens: int, device) -> dict[str, float]:
    """FSDP2 on one process (per decoder layer, then the root; stages' mixed precision or none)
    against the plain model: relative Frobenius distances of logits (bf16: against autocast) and,
    in fp32, of every gradient of the LM loss. (The module docstring says why these tolerances.)"""
    import copy

    import torch
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    from plumbing import distributed

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()

    def sharded(plain: torch.nn.Module, bf16: bool) -> torch.nn.Module:
        model, mp = copy.deepcopy(plain), distributed.fsdp_precision(bf16)
        for layer in distributed.decoder_layers(model):
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model

    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    vocab = min(plain.config.vocab_size, 1000)  # ids every tokenizer here has
    ids = torch.randint(3, vocab, (4, tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    out: dict[str, float] = {"tokens": 4 * tokens}
    with torch.no_grad():
        fp32 = plain(input_ids=ids).logits
        with torch.autocast(device.type, dtype=torch.bfloat16):
            autocast = plain(input_ids=ids).logits.float()
        mixed = sharded(plain, bf16=True)
        out["bf16_logits"] = rel(mixed(input_ids=ids).logits.float(), autocast)
        del mixed
        out["autocast_vs_fp32"] = rel(autocast, fp32)
        full = sharded(plain, bf16=False)
        out["fp32_logits"] = rel(full(input_ids=ids).logits, fp32)
    distributed.reshard(full)  # a no-grad forward leaves the root gathered
    plain(input_ids=ids, labels=ids).loss.backward()
    full(input_ids=ids, labels=ids).loss.backward()
    num = den = 0.0
    names = dict(full.named_parameters())
    for name, p in plain.named_parameters():
        g = names[name].grad
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        num += (p.grad.double() - g.double()).pow(2).sum().item()
        den += p.grad.double().pow(2).sum().item()
    out["fp32_grads"] = math.sqrt(num / max(den, 1e-300))
    del plain, full
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def generation_probe(path: str, prompts_file: str, n_prompts: int, k: int, new_tokens: int,
                     sample: bool, device) -> dict[str, Any]:
    """What meta_data (sampled, k per prompt) and evaluate (greedy) spend per decode step:
    sampling.generate on the model loaded as those stages load it (fp32, bf16 autocast), one call
    of n_prompts x k sequences, timed after a warm-up call; its forwards are counted, so a batch
    that stops early is timed per step it ran."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from plumbing import data, sampling

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    prompts = [p for p in data.read_prompts(prompts_file)[:n_prompts] for _ in range(k)]
    forwards = [0]
    hook = model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    settings = dict(do_sample=sample, temperature=1.0, top_p=0.9, repetition_penalty=1.1,
                    bf16=True)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sampling.generate(model, tokenizer, prompts[:2], max_new_tokens=2, **settings)  # warm-up
    sync()
    forwards[0] = 0
    start = time.perf_counter()
    _, response = sampling.generate(model, tokenizer, prompts, max_new_tokens=new_tokens,
                                    **settings)
    sync()
    seconds = time.perf_counter() - start
    hook.remove()
    generated = int((response != tokenizer.pad_token_id).sum())
    del model
    return {"sequences": len(prompts), "max_new_tokens": new_tokens, "decode_steps": forwards[0],
            "seconds": seconds, "ms_per_step": 1000 * seconds / max(forwards[0], 1),
            "tokens_per_s": generated / seconds, "sampled": sample}


# --------------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(Args, argv)
    wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in (*PARTS, "all")]
    check(wanted and not unknown, f"--parts {args.parts}: choose from all, " + ", ".join(PARTS))
    parts = [p for p in PARTS if p in wanted or ("all" in wanted
                                                 and not (args.cpu and p == "smollm2"))]
    check(not args.smollm2 or os.path.isfile(os.path.join(args.smollm2, "config.json")),
          f"--smollm2 {args.smollm2}: not a model folder (no config.json)")
    check(args.overwrite or not (os.path.isdir(args.out) and os.listdir(args.out)),
          f"{args.out}: output folder already holds files (pass --overwrite to replace them)")
    check(not args.workdir or not (os.path.isdir(args.workdir) and os.listdir(args.workdir)),
          f"--workdir {args.workdir}: not empty")
    common.configure_process(args.threads)
    if not Smoke(args, parts).run():
        raise SystemExit(1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:  # the device worker, started by `Smoke.device_checks`
        device_worker(sys.argv[2])
    else:
        common.run_main(main)
