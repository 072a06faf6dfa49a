"""Plumbing of a run that is neither data nor processes: its flags, its errors, its output folder,
its loop pieces.

Nothing in here is part of the method (the losses, Algorithm 1 and PPO live in their stage's file),
and nothing in here imports a stage or the testbed. The other plumbing modules: `data.py`
(files -> records -> token ids), `distributed.py` (processes, FSDP2, checkpoints), `sampling.py`
(responses from a policy).

- `arg`, `parse_args`  one `Args` dataclass per stage -> argparse flags (`--meta-order`); help text,
                       choices, the valid values (`valid=positive`, checked before the stage touches
                       anything) and whether a field is *essential* (--resume refuses another value)
                       sit on the field
- `UserError`, `run_main`  a mistake of the user's is one line on stderr and exit status 2, never a
                       traceback; so is a full disk; SIGINT / SIGTERM end a stage with one line too
                       (`Preemption`: at a step boundary, after a resumable checkpoint, when
                       --save-every is set)
- `configure_process`  intra-op threads from the cores this process may use, and no progress-bar
                       redraws in a log
- `prepare_output`, `lock_output`, `MetricsLog`, `save_args`  the output folder of a stage
                       (one live run at a time) and what it appends there
- `is_main`, `print0`, `progress`, `seed_everything`, `autocast`  rank 0 prints; progress bars;
                       seeds; bf16 autocast
- `report_peak_memory`  tools/gpu_smoke.py's one hook: a stage's peak GPU memory, when asked
- the pieces every training loop repeats: `split_batch`, `count_steps`, `Shuffled` (the data order,
  resumable), `due` (every N steps), `eval_mode`, `check_finite`
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import json
import math
import os
import random
import signal
import sys
import typing
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist


# --------------------------------------------------------------------------------------------------
# Errors: a user's mistake is one clear line and exit code 2, never a traceback.
# --------------------------------------------------------------------------------------------------
class UserError(Exception):
    """A problem with the user's input (a file, a flag, a checkpoint): reported as one line,
    exit status 2."""


class NothingToDo(Exception):
    """`--resume` found a finished run: reported as one line, exit status 0."""


class NonFiniteError(UserError):
    """A loss or gradient became NaN/inf: the stage stops, naming the step and quantity; no
    checkpoint is written. The check comes before anything is saved in that step, so the last
    checkpoint holds finite weights."""


def check(condition: bool, message: str) -> None:
    """Raise a `UserError` with `message` unless `condition` holds (argument validation)."""
    if not condition:
        raise UserError(message)


def check_finite(value: float, what: str) -> None:
    """Stop the stage (`NonFiniteError`) when a loss or norm is NaN or inf; `what` names it
    ("sft step 3: loss")."""
    if not math.isfinite(value):
        raise NonFiniteError(f"{what} is {value}; stopping "
                             "(the last saved checkpoint is untouched)")


class Interrupted(Exception):
    """SIGINT (Ctrl-C) or SIGTERM (a cluster's preemption) ended the stage: one line on stderr, exit
    status 128 + the signal's number (130, 143), as a shell reports a process killed by it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


# A full disk (or quota, or a read-only file system) is the user's to fix: one line, not a
# traceback.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def run_main(main: Callable[[], Any]) -> None:
    """Call `main()`; turn a `UserError` into one line on stderr (rank 0 only) and exit status 2.

    Every rank sees the same inputs, so every rank raises the same error and exits; printing it once
    is enough. The process group, if any, is torn down first so torchrun does not wait on a rank
    that left. An `OSError` of a full disk is reported the same way; SIGINT / SIGTERM are handled by
    `Preemption` (one line, exit 128 + signal).
    """
    _install_signal_handlers()
    try:
        main()
    except NothingToDo as e:
        print0(str(e))
    except Interrupted as e:
        # no teardown: another rank may sit in a collective that will never complete
        if int(os.environ.get("RANK", "0")) == 0:
            print(str(e), file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(128 + e.signum)
    except (UserError, OSError) as e:
        if isinstance(e, OSError) and e.errno not in DISK_ERRNOS:
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}" if isinstance(e, UserError)
                  else f"error: {e.filename or ''}: {e.strerror}",
                  file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(2)
    report_peak_memory()
    # torchrun workers have been seen to abort at interpreter exit *after* the work finished
    # (docs/design.md §9); ending the process here, after everything was flushed and saved, makes
    # the exit status reliable.
    if dist.is_initialized():
        dist.destroy_process_group()
    if "LOCAL_RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


PEAK_MEMORY_ENV = "METARM_PEAK_MEMORY_FILE"


def report_peak_memory() -> None:
    """For tools/gpu_smoke.py, which runs each stage as its own process: when the environment
    variable METARM_PEAK_MEMORY_FILE names a file, rank 0 writes there, as `run_main` ends a stage
    that finished, the peaks of PyTorch's CUDA allocator over the whole run (bytes:
    torch.cuda.max_memory_allocated, max_memory_reserved) and the process group's backend, as JSON;
    on CPU only the device and backend. Unset (every ordinary run): nothing. A failure here is one
    line on stderr, never the stage's."""
    path = os.environ.get(PEAK_MEMORY_ENV)
    if not path or not is_main():
        return
    try:
        report: dict[str, Any] = {"device": "cpu", "backend": (str(dist.get_backend())
                                                               if dist.is_initialized() else None)}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            report.update(device=f"cuda:{torch.cuda.current_device()}",
                          max_memory_allocated=torch.cuda.max_memory_allocated(),
                          max_memory_reserved=torch.cuda.max_memory_reserved())
        with open(path, "w") as f:
            json.dump(report, f)
    except Exception as e:  # noqa: BLE001 (a report, not the stage's work)
        print(f"note: {PEAK_MEMORY_ENV}: no report ({e})", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# SIGINT / SIGTERM: a training loop stops at a step boundary after a resumable checkpoint
# (--save-every N > 0); anything else stops at once. The handlers are installed by `run_main` only
# (the process entry point): a stage called in-process (tests, a notebook) leaves the caller's
# signal handling alone.
# --------------------------------------------------------------------------------------------------
class Preemption:
    """What the signal handler does while a stage runs, and the stage's side of it.

    `Preemption(resumable=True, what="sft", out=...)` (a training loop with --save-every N > 0): a
    SIGINT or SIGTERM only raises a flag; `requested(world, step, last)` (collective: the flag is
    the max over all ranks, so every rank stops at the same step even when only one was signalled)
    says whether to save at this step boundary, and `stop(step, last)` then ends the stage with one
    line naming the checkpoint and --resume. Further signals while the flag is up are ignored (under
    torchrun, Ctrl-C reaches every worker and torchrun then sends SIGTERM too). Outside such a loop
    (loading, evaluation, a stage without --save-every) a signal ends the stage at once, with the
    line `hint` (what is left on disk)."""

    current: "Preemption | None" = None  # the stage's, read by the handler

    def __init__(self, resumable: bool = False, what: str = "", out: str = "", hint: str = "",
                 unit: str = "step"):
        self.resumable, self.what, self.out, self.hint, self.unit = resumable, what, out, hint, unit
        self.signum = 0
        Preemption.current = self

    def requested(self, world: int, step: int, last: int) -> bool:
        """At the boundary after `step` (counted from 1) of `last`: was a signal received on any
        rank? Never at the last step (the stage is about to finish anyway). Collective under
        torchrun: every rank must call it."""
        flag = self.signum
        if world > 1:
            t = torch.tensor([flag], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        self.signum = flag
        return bool(flag) and step < last

    def stop(self, step: int, last: int) -> None:
        """After the checkpoint of `step` was saved: end the stage (`Interrupted`) when `requested`
        said so."""
        if self.signum and step < last:
            name = signal.Signals(self.signum).name
            raise Interrupted(self.signum,
                              f"{self.what}: stopped by {name} after {self.unit} {step} of {last}; "
                              f"a resumable checkpoint is in {self.out}: run the same command with "
                              "--resume to continue "
                              "(the result is the same as an uninterrupted run)")

    def handle(self, signum: int) -> None:
        if self.resumable:
            self.signum = self.signum or signum
            return
        raise Interrupted(signum, f"stopped by {signal.Signals(signum).name}"
                                  + (f"; {self.hint}" if self.hint else ""))


def _install_signal_handlers() -> None:
    def handler(signum: int, frame: Any) -> None:
        (Preemption.current or Preemption()).handle(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)


# --------------------------------------------------------------------------------------------------
# Arguments: one dataclass per stage, one flag per field.
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Valid:
    """The valid values of a numeric flag: `test(value)`, the words that name them in an error
    ("a finite number > 0"), and `bad`, values that fail the test, so a test can try each flag with
    them (tests/test_flags.py)."""
    describe: str
    test: Callable[[Any], bool]
    bad: tuple

    def __call__(self, value: Any) -> bool:
        return bool(self.test(value))

    def counterexamples(self, kind: type) -> list:
        """The `bad` values that a flag of type `kind` can be given on a command line
        (an int flag takes no nan)."""
        if kind is float:
            return [float(b) for b in self.bad]
        return [int(b) for b in self.bad if math.isfinite(b) and b == int(b)]


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# The predicates the stages' Args use (`arg(..., valid=positive)`)
positive = Valid("a finite number > 0", lambda x: _number(x) and x > 0, (0, -1, math.nan, math.inf))
non_negative = Valid("a finite number >= 0", lambda x: _number(x) and x >= 0,
                     (-1, math.nan, math.inf))
finite = Valid("a finite number", _number, (math.nan, math.inf, -math.inf))
in_unit = Valid("in [0, 1]", lambda x: _number(x) and 0 <= x <= 1, (-1, 2, math.nan))
in_unit_above_0 = Valid("in (0, 1]", lambda x: _number(x) and 0 < x <= 1, (0, -1, 2, math.nan))
seed = Valid("an integer in [0, 2**31 - 1]", lambda x: _number(x) and 0 <= x < 2**31, (-1, 2**32))


def at_least(n: float, why: str = "") -> Valid:
    return Valid(f"a number >= {n}" + (f" ({why})" if why else ""),
                 lambda x: _number(x) and x >= n, (n - 1, math.nan))


def or_sentinel(sentinel: int, meaning: str, base: Valid = positive) -> Valid:
    """`base`, or exactly `sentinel` with its own meaning (`-1 = no limit`)."""
    return Valid(f"{base.describe}, or {sentinel} ({meaning})", lambda x: x == sentinel or base(x),
                 tuple(b for b in base.bad if b != sentinel) + (sentinel - 1,))


def arg(default: Any, help: str, choices: Iterable[Any] | None = None, *, essential: bool = False,
        valid: Valid | None = None) -> Any:
    """A field of a stage's `Args`: its default, its --help text, optional allowed values, its valid
    values (`valid`, a `Valid` such as `positive`; every numeric field has `choices` or `valid`,
    tests/test_flags.py checks it), and whether it is `essential` — it changes what the run
    computes, so `--resume` refuses a checkpoint written with another value
    (see `essential_fields`). Everything sits in the field's metadata dict, read by `parse_args`,
    `validate` and `essential_fields`."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices,
                                                        "essential": essential, "valid": valid})


def flag_name(field_name: str) -> str:
    """The command-line flag of an Args field: `meta_order` -> `--meta-order`."""
    return "--" + field_name.replace("_", "-")


def validate(args: Any) -> None:
    """Check every field that declares `valid=` (`parse_args` calls it, before the stage touches
    anything); the first bad value is a `UserError` naming the flag:
    "--lr -1.0: must be a finite number > 0"."""
    for f in dataclasses.fields(args):
        valid, value = f.metadata.get("valid"), getattr(args, f.name)
        if valid is not None and not valid(value):
            raise UserError(f"{flag_name(f.name)} {value}: must be {valid.describe}")


def essential_fields(args: Any) -> list[str]:
    """The names of the fields marked `essential=True`, in the order the dataclass declares them."""
    return [f.name for f in dataclasses.fields(args) if f.metadata.get("essential")]


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (rank 0 only under torchrun) and exit
    status 2, like a `UserError`; the default prints the whole usage block first,
    from every rank."""

    def error(self, message: str) -> typing.NoReturn:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def parse_args(cls: type, argv: list[str] | None = None) -> Any:
    """Build an argparse parser from the dataclass `cls` and return an instance filled from `argv`.

    Field `meta_order` becomes flag `--meta-order`; a bool field becomes `--flag / --no-flag`.
    Unknown flags, abbreviations and values of the wrong type are refused with one line naming the
    flag and exit status 2, and so are values outside a field's `valid=`
    (`validate`, a `UserError`).
    """
    parser = _OneLineErrorParser(
        prog=program_name(),
        description=(sys.modules[cls.__module__].__doc__ or "").strip().split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        # a flag is exactly its field's name; `--meta` must not silently mean `--meta-order`
        allow_abbrev=False,
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = flag_name(f.name)
        kind = hints[f.name]
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
            continue
        if typing.get_origin(kind) in (typing.Union,
                                       getattr(__import__("types"), "UnionType", None)):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))  # Optional[T] -> T
        parser.add_argument(flag, type=kind, default=f.default, help=help_text,
                            choices=f.metadata.get("choices"))
    args = cls(**vars(parser.parse_args(argv)))
    validate(args)
    return args


def program_name() -> str:
    """How the user started this program, for usage lines: `sft.py`, or `python -m study` for a
    module of a folder run with -m (whose sys.argv[0] is a file path such as study/__main__.py)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return "python -m " + spec.name.removesuffix(".__main__")
    return os.path.basename(sys.argv[0])


def save_args(args: Any, folder: str) -> None:
    """Write the full arguments of a run as `args.json` inside a checkpoint or output folder."""
    with open(os.path.join(folder, "args.json"), "w") as f:
        json.dump(dataclasses.asdict(args), f, indent=2, sort_keys=True)


# --------------------------------------------------------------------------------------------------
# The output folder of a stage
# --------------------------------------------------------------------------------------------------
def prepare_output(folder: str, overwrite: bool, resume: bool = False,
                   state: dict | None = None) -> None:
    """Refuse to write into a folder that already holds files, unless --overwrite (then its old
    metrics.jsonl is removed; its checkpoint files are replaced only when the new checkpoint is
    complete, see `distributed.save_model`) or --resume (`state` from `distributed.resume_state`:
    metrics.jsonl is cut back to the lines written before that checkpoint, so the resumed run
    appends exactly what the interrupted one would have; no state: a fresh start). Refuse a folder
    that another live run writes into (`lock_output`)."""
    exists = os.path.isdir(folder) and len(os.listdir(folder)) > 0
    check(not exists or overwrite or resume,
          f"{folder}: output folder already holds files "
          "(pass --resume to continue that run, --overwrite to replace it)")
    check(not os.path.exists(folder) or os.path.isdir(folder),
          f"{folder}: exists and is not a folder")
    lock_output(folder)  # collective: every rank has checked before rank 0 creates the folder
    if is_main():
        os.makedirs(folder, exist_ok=True)
        metrics = os.path.join(folder, "metrics.jsonl")
        if state is not None and os.path.exists(metrics):
            with open(metrics) as f:
                lines = f.readlines()[: state["metrics_lines"]]
            write_lines(metrics, lines)
        elif (overwrite or resume) and os.path.exists(metrics):
            os.remove(metrics)


# lock file -> the descriptor that holds its flock, for the life of the process
_LOCKS: dict[str, int] = {}


def lock_path(folder: str) -> str:
    """The lock file of an output folder: `.NAME.lock` beside it, not inside (a checkpoint save
    replaces the folder by renaming, which would take a lock file inside it along)."""
    parent, name = os.path.split(os.path.abspath(folder))
    return os.path.join(parent, f".{name}.lock")


def lock_output(folder: str) -> None:
    """One live run per output folder: rank 0 takes an exclusive `fcntl.flock` on
    `lock_path(folder)` and holds it until the process ends (the kernel drops it however the process
    ends, so a killed run leaves nothing stuck); a second run on the same folder is refused with one
    line naming the holder's pid. Collective under torchrun (rank 0's answer is broadcast). Taking
    it again in the same process is a no-op (stages called in-process)."""
    refused = None
    if is_main():
        path = lock_path(folder)
        if path not in _LOCKS:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                refused = (f"{folder}: another run (pid {holder}) is writing into this folder; "
                           "wait for it to end or choose another --out")
            else:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                _LOCKS[path] = fd
    if dist.is_initialized():
        box = [refused]
        dist.broadcast_object_list(box, src=0)
        refused = box[0]
    check(refused is None, refused or "")


def write_lines(path: str, lines: list[str]) -> None:
    """Replace a text file atomically (temporary file, then rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(tmp, path)


class MetricsLog:
    """Append-only JSONL of metrics, written by rank 0 only. The file is opened for each line, so a
    crash loses nothing and a checkpoint save may move the folder that holds it."""

    def __init__(self, path: str):
        self.path = path

    def log(self, **metrics: Any) -> None:
        if is_main():
            with open(self.path, "a") as f:
                f.write(json.dumps(metrics) + "\n")


# --------------------------------------------------------------------------------------------------
# Printing, seeds, precision
# --------------------------------------------------------------------------------------------------
def is_main() -> bool:
    """Rank 0, or the only process: the one that prints, saves and draws progress bars."""
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*a: Any, **k: Any) -> None:
    """print on rank 0 only (every other rank would print the same line)."""
    if is_main():
        from tqdm import tqdm

        tqdm.write(" ".join(str(x) for x in a), **k)  # keeps a progress bar intact below the line


def progress(iterable: Iterable | None = None, **kwargs: Any):
    """A tqdm progress bar, drawn by rank 0 only and only when stderr is a terminal: in a log
    (nohup, CI, a file) a bar is one carriage-return redraw per step, so there is none; the stage's
    periodic metric lines stay."""
    from tqdm import tqdm

    return tqdm(iterable, disable=not (is_main() and sys.stderr.isatty()), **kwargs)


THREADS_HELP = ("intra-op threads of this process; 0 = auto: $OMP_NUM_THREADS when set, "
                "else the cores this process may use (taskset) divided by the processes "
                "torchrun starts on this machine")


def threads_for(requested: int = 0) -> int:
    """The intra-op threads of this process: `requested` (--threads) when > 0; else OMP_NUM_THREADS
    when it is set (a positive integer); else the cores this process may run on
    (os.sched_getaffinity: taskset, cgroups) shared by the processes of this machine
    (LOCAL_WORLD_SIZE, set by torchrun), at least 1."""
    if requested > 0:
        return requested
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else (os.cpu_count() or 1))
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


TF32_HELP = ("NVIDIA GPUs: TF32 for fp32 matmuls and convolutions (a 10-bit mantissa, several "
             "times the fp32 throughput on A100 / H100); off = exact fp32. No effect on CPU")
DETERMINISTIC_HELP = ("deterministic kernels only (torch.use_deterministic_algorithms; on CUDA "
                      "also CUBLAS_WORKSPACE_CONFIG): what bit-identical --resume and 1 process == "
                      "N processes need on a GPU, at some speed; CPU runs are deterministic "
                      "without it")


def configure_process(threads: int = 0, tf32: bool = False, deterministic: bool = False) -> int:
    """What every stage does first: `torch.set_num_threads(threads_for(threads))` (threads that
    outnumber the cores busy-wait on each other: two 2-thread processes on 2 cores each ran
    ~3x slower than with 1 thread each, see bench/BENCHMARKS.md), no progress bars from
    transformers when stderr is not a terminal, TF32 matmuls on NVIDIA GPUs when `tf32`, and only
    deterministic kernels when `deterministic` (CUBLAS_WORKSPACE_CONFIG must be set before the first
    cuBLAS call, hence here; ops without a deterministic kernel warn, once each). Returns the thread
    count."""
    n = threads_for(threads)
    torch.set_num_threads(n)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Set both ways (a stage run in-process after another). warn_only: an op without a deterministic
    # kernel warns instead of stopping the run; SDPA's flash and memory-efficient backward are among
    # them, so under --deterministic attention runs its math kernel (deterministic, more memory).
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cuda.enable_flash_sdp(not deterministic)
    torch.backends.cuda.enable_mem_efficient_sdp(not deterministic)
    if not sys.stderr.isatty():
        import transformers

        transformers.utils.logging.disable_progress_bar()
    return n


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch. Each rank gets seed + rank so ranks sample different things
    where they sample independently (generation); data order is drawn from separate generators
    seeded with `seed` alone."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast when asked (about 4x faster matmuls on this CPU); fp32 otherwise
    (the reference)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


# --------------------------------------------------------------------------------------------------
# Pieces every training loop repeats (each stage's loop stays in its own file; these are its parts)
# --------------------------------------------------------------------------------------------------
def split_batch(global_batch: int, micro_batch: int, world: int, flag: str = "--batch-size") -> int:
    """Gradient-accumulation steps so that global = micro x accumulation x world;
    a clear error otherwise."""
    check(global_batch > 0 and micro_batch > 0, f"{flag} and --micro-batch-size must be positive")
    check(global_batch % (micro_batch * world) == 0,
          f"{flag} {global_batch} is not divisible by --micro-batch-size {micro_batch} "
          f"x world size {world}")
    return global_batch // (micro_batch * world)


def count_steps(n: int, batch_size: int, epochs: float, max_steps: int,
                what: str) -> tuple[int, int]:
    """(steps per epoch, total steps) of `epochs` passes over `n` items in global batches of
    `batch_size`, the last incomplete batch of every epoch dropped, at most `max_steps`
    (-1 = no limit). `what` names the data in the error when not even one batch fits
    ("pairs.jsonl: 10 pairs")."""
    steps_per_epoch = n // batch_size
    check(steps_per_epoch > 0, f"{what}, fewer than one batch of {batch_size}")
    total_steps = math.floor(steps_per_epoch * epochs)
    return steps_per_epoch, min(total_steps, max_steps) if max_steps > 0 else total_steps


class Shuffled:
    """The order in which a stage draws its data: `take()` returns the indices of the next batch of
    `batch_size` items out of `n`, from a fresh random permutation every epoch.

    The generator is seeded with `seed` alone, the same on every rank, so every rank draws the same
    global batch (each then takes its own slice). `whole_batches=True` (sft, reward, D in meta_rm):
    an epoch is cut to whole batches (the rest of the permutation is dropped) and the next epoch
    starts when it is used up. `whole_batches=False` (S in meta_rm, prompts in ppo): the order
    cycles; when fewer than a batch remain, the next permutation is appended, so a batch may span
    two epochs. `state_dict` / `load_state_dict` hold what --resume needs: the indices not drawn yet
    and the generator's state.
    """

    def __init__(self, n: int, batch_size: int, seed: int, whole_batches: bool):
        self.n, self.batch_size, self.whole_batches = n, batch_size, whole_batches
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def take(self) -> list[int]:
        if self.whole_batches and not self.order:  # a new epoch, cut to whole batches
            self.order = torch.randperm(self.n, generator=self.generator).tolist()[
                : self.n // self.batch_size * self.batch_size]
        # cycle: append the next epoch
        while not self.whole_batches and len(self.order) < self.batch_size:
            self.order += torch.randperm(self.n, generator=self.generator).tolist()
        batch = self.order[: self.batch_size]
        del self.order[: self.batch_size]
        return batch

    def state_dict(self) -> dict:
        return {"order": list(self.order), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.order = list(state["order"])
        self.generator.set_state(state["generator"])


def due(every: int, step: int, last: int) -> bool:
    """Whether a periodic action (--eval-every, --save-every) runs after `step` (counted from 1):
    every `every` steps, never when `every` is 0, and not after the `last` step — the stage does it
    once more after its loop."""
    return every > 0 and step % every == 0 and step < last


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Dropout off for an evaluation in the middle of training; the model's previous mode is
    restored after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
