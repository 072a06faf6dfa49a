"""Plumbing of a run that is neither data nor processes: its flags, its errors, its output folder, its loop pieces.

Nothing in here is part of the method (the losses, Algorithm 1 and PPO live in their stage's file), and nothing in
here imports a stage or the testbed. The other plumbing modules: `data.py` (files -> records -> token ids),
`distributed.py` (processes, FSDP2, checkpoints), `sampling.py` (responses from a policy).

- `arg`, `parse_args`  one `Args` dataclass per stage -> argparse flags (`--meta-order`); help text, choices and
                       whether a field is *essential* (--resume refuses another value) sit on the field
- `UserError`, `run_main`  a mistake of the user's is one line on stderr and exit status 2, never a traceback
- `prepare_output`, `MetricsLog`, `save_args`  the output folder of a stage and what it appends there
- `is_main`, `print0`, `seed_everything`, `autocast`  rank 0 prints; seeds; bf16 autocast
- the pieces every training loop repeats: `split_batch`, `count_steps`, `Shuffled` (the data order, resumable),
  `due` (every N steps), `eval_mode`, `check_finite`
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import typing
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist


# ---------------------------------------------------------------------------------------------------------------
# Errors: a user's mistake is one clear line and exit code 2, never a traceback.
# ---------------------------------------------------------------------------------------------------------------
class UserError(Exception):
    """A problem with the user's input (a file, a flag, a checkpoint): reported as one line, exit status 2."""


class NothingToDo(Exception):
    """`--resume` found a finished run: reported as one line, exit status 0."""


class NonFiniteError(UserError):
    """A loss or gradient became NaN/inf: the stage stops, naming the step and quantity; no checkpoint is written.
    The check comes before anything is saved in that step, so the last checkpoint holds finite weights."""


def check(condition: bool, message: str) -> None:
    """Raise a `UserError` with `message` unless `condition` holds (argument validation)."""
    if not condition:
        raise UserError(message)


def check_finite(value: float, what: str) -> None:
    """Stop the stage (`NonFiniteError`) when a loss or norm is NaN or inf; `what` names it ("sft step 3: loss")."""
    if not math.isfinite(value):
        raise NonFiniteError(f"{what} is {value}; stopping (the last saved checkpoint is untouched)")


def run_main(main: Callable[[], Any]) -> None:
    """Call `main()`; turn a `UserError` into one line on stderr (rank 0 only) and exit status 2.

    Every rank sees the same inputs, so every rank raises the same error and exits; printing it once is enough.
    The process group, if any, is torn down first so torchrun does not wait on a rank that left.
    """
    try:
        main()
    except NothingToDo as e:
        print0(str(e))
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(2)
    # torchrun workers have been seen to abort at interpreter exit *after* the work finished (docs/design.md §9);
    # ending the process here, after everything was flushed and saved, makes the exit status reliable.
    if dist.is_initialized():
        dist.destroy_process_group()
    if "LOCAL_RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


# ---------------------------------------------------------------------------------------------------------------
# Arguments: one dataclass per stage, one flag per field.
# ---------------------------------------------------------------------------------------------------------------
def arg(default: Any, help: str, choices: Iterable[Any] | None = None, *, essential: bool = False) -> Any:
    """A field of a stage's `Args`: its default, its --help text, optional allowed values, and whether it is
    `essential` — it changes what the run computes, so `--resume` refuses a checkpoint written with another value
    (see `essential_fields`). Everything sits in the field's metadata dict, so a later per-field fact (a validity
    check, say) is one more keyword here and one more reader of `dataclasses.fields`."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "essential": essential})


def essential_fields(args: Any) -> list[str]:
    """The names of the fields marked `essential=True`, in the order the dataclass declares them."""
    return [f.name for f in dataclasses.fields(args) if f.metadata.get("essential")]


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (rank 0 only under torchrun) and exit status 2, like a
    `UserError`; the default prints the whole usage block first, from every rank."""

    def error(self, message: str) -> typing.NoReturn:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def parse_args(cls: type, argv: list[str] | None = None) -> Any:
    """Build an argparse parser from the dataclass `cls` and return an instance filled from `argv`.

    Field `meta_order` becomes flag `--meta-order`; a bool field becomes `--flag / --no-flag`. Unknown flags,
    abbreviations and values of the wrong type are refused with one line naming the flag and exit status 2.
    """
    parser = _OneLineErrorParser(
        description=(sys.modules[cls.__module__].__doc__ or "").strip().split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # a flag is exactly its field's name; `--meta` must not silently mean `--meta-order`
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        if typing.get_origin(kind) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))  # Optional[T] -> T
        parser.add_argument(flag, type=kind, default=f.default, help=help_text, choices=f.metadata.get("choices"))
    return cls(**vars(parser.parse_args(argv)))


def save_args(args: Any, folder: str) -> None:
    """Write the full arguments of a run as `args.json` inside a checkpoint or output folder."""
    with open(os.path.join(folder, "args.json"), "w") as f:
        json.dump(dataclasses.asdict(args), f, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------------------------
# The output folder of a stage
# ---------------------------------------------------------------------------------------------------------------
def prepare_output(folder: str, overwrite: bool, resume: bool = False, state: dict | None = None) -> None:
    """Refuse to write into a folder that already holds files, unless --overwrite (then its old metrics.jsonl is
    removed; its checkpoint files are replaced only when the new checkpoint is complete, see
    `distributed.save_model`) or --resume (`state` from `distributed.resume_state`: metrics.jsonl is cut back to
    the lines written before that checkpoint, so the resumed run appends exactly what the interrupted one would
    have; no state: a fresh start)."""
    exists = os.path.isdir(folder) and len(os.listdir(folder)) > 0
    check(not exists or overwrite or resume,
          f"{folder}: output folder already holds files (pass --resume to continue that run, --overwrite to replace it)")
    check(not os.path.exists(folder) or os.path.isdir(folder), f"{folder}: exists and is not a folder")
    if dist.is_initialized():
        dist.barrier()  # every rank has checked before rank 0 creates the folder
    if is_main():
        os.makedirs(folder, exist_ok=True)
        metrics = os.path.join(folder, "metrics.jsonl")
        if state is not None and os.path.exists(metrics):
            with open(metrics) as f:
                lines = f.readlines()[: state["metrics_lines"]]
            write_lines(metrics, lines)
        elif (overwrite or resume) and os.path.exists(metrics):
            os.remove(metrics)


def write_lines(path: str, lines: list[str]) -> None:
    """Replace a text file atomically (temporary file, then rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(tmp, path)


class MetricsLog:
    """Append-only JSONL of metrics, written by rank 0 only. The file is opened for each line, so a crash loses
    nothing and a checkpoint save may move the folder that holds it."""

    def __init__(self, path: str):
        self.path = path

    def log(self, **metrics: Any) -> None:
        if is_main():
            with open(self.path, "a") as f:
                f.write(json.dumps(metrics) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Printing, seeds, precision
# ---------------------------------------------------------------------------------------------------------------
def is_main() -> bool:
    """Rank 0, or the only process: the one that prints, saves and draws progress bars."""
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*a: Any, **k: Any) -> None:
    """print on rank 0 only (every other rank would print the same line)."""
    if is_main():
        from tqdm import tqdm

        tqdm.write(" ".join(str(x) for x in a), **k)  # keeps a progress bar intact below the line


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch. Each rank gets seed + rank so ranks sample different things where they
    sample independently (generation); data order is drawn from separate generators seeded with `seed` alone."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast when asked (about 4x faster matmuls on this CPU); fp32 otherwise (the reference)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


# ---------------------------------------------------------------------------------------------------------------
# Pieces every training loop repeats (each stage's loop stays in its own file; these are its parts)
# ---------------------------------------------------------------------------------------------------------------
def split_batch(global_batch: int, micro_batch: int, world: int, flag: str = "--batch-size") -> int:
    """Gradient-accumulation steps so that global = micro x accumulation x world; a clear error otherwise."""
    check(global_batch > 0 and micro_batch > 0, f"{flag} and --micro-batch-size must be positive")
    check(global_batch % (micro_batch * world) == 0,
          f"{flag} {global_batch} is not divisible by --micro-batch-size {micro_batch} x world size {world}")
    return global_batch // (micro_batch * world)


def count_steps(n: int, batch_size: int, epochs: float, max_steps: int, what: str) -> tuple[int, int]:
    """(steps per epoch, total steps) of `epochs` passes over `n` items in global batches of `batch_size`, the last
    incomplete batch of every epoch dropped, at most `max_steps` (-1 = no limit). `what` names the data in the error
    when not even one batch fits ("pairs.jsonl: 10 pairs")."""
    steps_per_epoch = n // batch_size
    check(steps_per_epoch > 0, f"{what}, fewer than one batch of {batch_size}")
    total_steps = math.floor(steps_per_epoch * epochs)
    return steps_per_epoch, min(total_steps, max_steps) if max_steps > 0 else total_steps


class Shuffled:
    """The order in which a stage draws its data: `take()` returns the indices of the next batch of `batch_size`
    items out of `n`, from a fresh random permutation every epoch.

    The generator is seeded with `seed` alone, the same on every rank, so every rank draws the same global batch
    (each then takes its own slice). `whole_batches=True` (sft, reward, D in meta_rm): an epoch is cut to whole
    batches (the rest of the permutation is dropped) and the next epoch starts when it is used up.
    `whole_batches=False` (S in meta_rm, prompts in ppo): the order cycles; when fewer than a batch remain, the next
    permutation is appended, so a batch may span two epochs. `state_dict` / `load_state_dict` hold what --resume needs:
    the indices not drawn yet and the generator's state.
    """

    def __init__(self, n: int, batch_size: int, seed: int, whole_batches: bool):
        self.n, self.batch_size, self.whole_batches = n, batch_size, whole_batches
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def take(self) -> list[int]:
        if self.whole_batches and not self.order:  # a new epoch, cut to whole batches
            self.order = torch.randperm(self.n, generator=self.generator).tolist()[
                : self.n // self.batch_size * self.batch_size]
        while not self.whole_batches and len(self.order) < self.batch_size:  # cycle: append the next epoch
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
    """Whether a periodic action (--eval-every, --save-every) runs after `step` (counted from 1): every `every`
    steps, never when `every` is 0, and not after the `last` step — the stage does it once more after its loop."""
    return every > 0 and step % every == 0 and step < last


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Dropout off for an evaluation in the middle of training; the model's previous mode is restored after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
