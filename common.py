"""Plumbing shared by every stage: arguments, errors, data files, processes, FSDP2, checkpoints, sampling.

Nothing in here is part of the method. The algorithm of each stage (the losses, Algorithm 1, PPO) lives in that
stage's own file; this module only holds what every stage needs the same way:

- `parse_args`   one `Args` dataclass per stage -> argparse flags (`--meta-order`), help text from the field metadata
- `UserError`    a mistake of the user's (bad file, bad flag): `run_main` prints it as one line and exits 2
- `read_jsonl`   JSONL / JSONL.gz / JSON-array reader that names file:line on every error
- `init_distributed`, `print0`, `seed_everything`: one code path for `python x.py` and `torchrun` (gloo on CPU,
                 nccl on CUDA)
- `load_model`, `save_model`: Hugging Face `save_pretrained` folders in, out; FSDP2 (`fully_shard` per decoder
                 layer, then the root) when world size > 1; rank 0 reads the weights and broadcasts them
- `generate`     batched nucleus sampling with the KV cache, shared by the meta data set, PPO and evaluation
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import random
import shutil
import sys
import typing
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist


# ---------------------------------------------------------------------------------------------------------------
# Errors: a user's mistake is one clear line and exit code 2, never a traceback.
# ---------------------------------------------------------------------------------------------------------------
class UserError(Exception):
    """A problem with the user's input (a file, a flag, a checkpoint): reported as one line, exit status 2."""


def run_main(main: Callable[[], Any]) -> None:
    """Call `main()`; turn a `UserError` into one line on stderr (rank 0 only) and exit status 2.

    Every rank sees the same inputs, so every rank raises the same error and exits; printing it once is enough.
    The process group, if any, is torn down first so torchrun does not wait on a rank that left.
    """
    try:
        main()
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(2)
    # torchrun workers have been seen to abort at interpreter exit *after* the work finished (DESIGN.md §7);
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
def arg(default: Any, help: str, choices: Iterable[Any] | None = None) -> Any:
    """A dataclass field with its help text (shown by --help) and optional allowed values."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


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


def check(condition: bool, message: str) -> None:
    """Raise a `UserError` with `message` unless `condition` holds (argument validation)."""
    if not condition:
        raise UserError(message)


# ---------------------------------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------------------------------
def read_jsonl(path: str, fields: Iterable[str] = ()) -> list[dict]:
    """Read a .jsonl or .json (array of objects) file, either one optionally gzipped (.gz); every record must hold
    `fields` as strings/lists.

    Errors name the file and line: `data.jsonl:17: missing field 'chosen'`. An empty file is an error too.
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    opener = gzip.open if path.endswith(".gz") else open
    is_array = path.removesuffix(".gz").endswith(".json")
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    records: list[tuple[int, Any]] = []
    if is_array:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON array of objects")
        records = [(i + 1, r) for i, r in enumerate(data)]  # "line" = position in the array for .json
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not records:
        raise UserError(f"{path}: empty file (no records)")
    out = []
    for lineno, r in records:
        if not isinstance(r, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(r).__name__}")
        for name in fields:
            if name not in r:
                raise UserError(f"{path}:{lineno}: missing field '{name}'")
            if not isinstance(r[name], (str, list)):
                raise UserError(f"{path}:{lineno}: field '{name}' must be a string, got {type(r[name]).__name__}")
        out.append(r)
    return out


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    """Write records as JSONL atomically (temporary file, then rename), so a crash never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
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


def prepare_output(folder: str, overwrite: bool) -> None:
    """Refuse to write into a folder that already holds files, unless --overwrite (then its old metrics.jsonl is
    removed; its checkpoint files are replaced only when the new checkpoint is complete, see `save_model`)."""
    exists = os.path.isdir(folder) and len(os.listdir(folder)) > 0
    check(not exists or overwrite, f"{folder}: output folder already holds files (pass --overwrite to replace them)")
    check(not os.path.exists(folder) or os.path.isdir(folder), f"{folder}: exists and is not a folder")
    if dist.is_initialized():
        dist.barrier()  # every rank has checked before rank 0 creates the folder
    if is_main():
        os.makedirs(folder, exist_ok=True)
        if overwrite and os.path.exists(os.path.join(folder, "metrics.jsonl")):
            os.remove(os.path.join(folder, "metrics.jsonl"))


# ---------------------------------------------------------------------------------------------------------------
# Processes: `python stage.py` (world size 1) and `torchrun --nproc_per_node=N stage.py` share one code path.
# ---------------------------------------------------------------------------------------------------------------
def init_distributed() -> tuple[int, int, torch.device]:
    """Start the process group when launched by torchrun; return (rank, world_size, device).

    The backend follows the device: nccl for CUDA, gloo for CPU. Without torchrun nothing is initialised and the
    stage runs as a plain single process.
    """
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    return rank, world, device


def is_main() -> bool:
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


def all_reduce_mean(values: dict[str, float], world: int) -> dict[str, float]:
    """Average a dict of python floats across ranks (for printing metrics that each rank computed on its share)."""
    if world == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(values, t.tolist())}


def all_reduce_sum(x: float, world: int) -> float:
    """Sum a python float over ranks."""
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


class NonFiniteError(UserError):
    """A loss or gradient became NaN/inf: the stage stops, naming the step and quantity; no checkpoint is written."""


def check_finite(value: float, what: str) -> None:
    if not math.isfinite(value):
        raise NonFiniteError(f"{what} is {value}; stopping (the last saved checkpoint is untouched)")


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (over all ranks under FSDP2) and return the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    norm = norm.item()
    check_finite(norm, "gradient norm")
    return norm


def split_batch(global_batch: int, micro_batch: int, world: int, flag: str = "--batch-size") -> int:
    """Gradient-accumulation steps so that global = micro x accumulation x world; a clear error otherwise."""
    check(global_batch > 0 and micro_batch > 0, f"{flag} and --micro-batch-size must be positive")
    check(global_batch % (micro_batch * world) == 0,
          f"{flag} {global_batch} is not divisible by --micro-batch-size {micro_batch} x world size {world}")
    return global_batch // (micro_batch * world)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast when asked (about 4x faster matmuls on this CPU); fp32 otherwise (the reference)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


# ---------------------------------------------------------------------------------------------------------------
# Models and checkpoints
# ---------------------------------------------------------------------------------------------------------------
def check_checkpoint(path: str, what: str = "checkpoint") -> None:
    """A model folder must hold config.json and weights; otherwise one clear line (a missing or half-written save)."""
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such {what} folder")
    names = os.listdir(path)
    if "config.json" not in names:
        raise UserError(f"{path}: not a model folder (no config.json)")
    if not any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        raise UserError(f"{path}: no *.safetensors weights (half-written or not a save_pretrained folder)")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face model: the modules whose class is listed in `_no_split_modules`
    (LlamaDecoderLayer, GPT2Block, ...). Each becomes its own FSDP2 unit."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(model: torch.nn.Module, world: int) -> torch.nn.Module:
    """FSDP2: `fully_shard` every decoder layer, then the root. At world size 1 the model stays a plain module."""
    if world == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def load_model(cls: Any, path: str, world: int, device: torch.device, **overrides: Any) -> torch.nn.Module:
    """Load a `save_pretrained` folder as `cls` (AutoModelForCausalLM, AutoModelForSequenceClassification, ...).

    World size 1: plain `from_pretrained`. World size > 1 (FSDP2): every rank builds the model on the meta device
    (no memory), shards it and allocates only its shard; rank 0 alone reads the weights from disk and broadcasts
    them (`broadcast_from_rank0`), so a 7B model is never held in full by more than one process. Buffers that are
    not saved (Llama's rotary `inv_freq`) are garbage after `to_empty`, so rank 0 broadcasts those too.
    `overrides` go to the config (e.g. num_labels=1, attn_implementation="eager").
    """
    check_checkpoint(path)
    from transformers import AutoConfig

    if world == 1:
        return cls.from_pretrained(path, dtype=torch.float32, **overrides).to(device)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    config = AutoConfig.from_pretrained(path, **{k: v for k, v in overrides.items() if k != "attn_implementation"})
    if "attn_implementation" in overrides:
        config._attn_implementation = overrides["attn_implementation"]
    with torch.device("meta"):
        model = cls.from_config(config, dtype=torch.float32)
    shard(model, world)
    model.to_empty(device=device)
    full = cls.from_pretrained(path, dtype=torch.float32, **overrides) if dist.get_rank() == 0 else None
    set_model_state_dict(model, full.state_dict() if full is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    full_buffers = dict(full.named_buffers()) if full is not None else {}
    for name, buf in model.named_buffers():
        if full is not None:
            buf.copy_(full_buffers[name])
        dist.broadcast(buf, src=0)
    del full
    return model


def full_state_dict(model: torch.nn.Module, world: int) -> dict[str, torch.Tensor]:
    """The whole state dict on CPU: on rank 0 (gathered from the shards under FSDP2); `{}` on the other ranks."""
    if world == 1:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_model(model: torch.nn.Module, tokenizer: Any, folder: str, world: int, args: Any = None) -> None:
    """Save a checkpoint that `from_pretrained` loads with transformers alone: config, safetensors, tokenizer,
    and the run's args.json. All ranks must call it (gathering the shards is collective); rank 0 writes.

    The folder is written under a temporary name and renamed into place, so a crash in the middle of a save leaves
    the previous checkpoint untouched. A plain copy of the model class is built on the meta device and given the
    gathered tensors, so the saved config names the plain architecture (not the FSDP wrapper).
    """
    state = full_state_dict(model, world)
    if is_main():
        config = model.config
        plain_cls = _unwrapped_class(model)
        with torch.device("meta"):
            plain = plain_cls(config)
        plain.load_state_dict(state, assign=True, strict=False)  # strict=False: a tied lm_head may be absent
        if getattr(config, "tie_word_embeddings", False):
            plain.tie_weights()
        missing = [n for n, p in plain.named_parameters() if p.is_meta]
        assert not missing, f"save_model: no weights gathered for {missing}"  # would be saved as garbage
        tmp = folder.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if args is not None:
            save_args(args, tmp)
        old = folder.rstrip("/") + ".old"
        if os.path.isdir(folder):  # keep the files that are not part of the checkpoint (metrics.jsonl, ...)
            for name in os.listdir(folder):
                if not os.path.exists(os.path.join(tmp, name)) and os.path.isfile(os.path.join(folder, name)):
                    shutil.copy2(os.path.join(folder, name), os.path.join(tmp, name))
        if os.path.exists(folder):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def _unwrapped_class(model: torch.nn.Module) -> type:
    """FSDP2 swaps a module's class for a subclass named FSDP<Name>; return the original Hugging Face class."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


# ---------------------------------------------------------------------------------------------------------------
# Tokenising (prompt, response) pairs the same way in every stage
# ---------------------------------------------------------------------------------------------------------------
def encode(tokenizer: Any, prompt: str, response: str | None, max_len: int) -> tuple[list[int], int, bool]:
    """Token ids of prompt + response + EOS -> (ids, n_prompt_tokens, truncated).

    The prompt is tokenised with the tokenizer's special tokens (a BOS where the model uses one), the response
    without, and EOS is appended: the model must learn to stop, and the reward model reads its score at that EOS.
    Prompt and response are tokenised separately so the boundary between them is the same in training and in
    generation. With `response=None` only the prompt is encoded (no EOS).
    Truncation rule, when longer than `max_len`: drop tokens from the *start* of the prompt first (the end of the
    prompt, "...Assistant:", matters most), keeping at least one prompt token; then cut the response's end.
    """
    p = tokenizer(prompt).input_ids
    r = [] if response is None else tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    truncated = len(p) + len(r) > max_len
    if truncated:
        p = p[-max(1, max_len - len(r)):]
        r = r[: max_len - len(p)]
    return p + r, len(p), truncated


def pad_right(seqs: list[list[int]], pad_id: int, fill: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad lists of ids -> (ids (B, T), attention_mask (B, T)). `fill` replaces pad in ids if given."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id if fill is None else fill, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------------------------
# Sampling (shared by the meta data set in meta_rm.py, rollouts in ppo.py and evaluate.py)
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, prompts: list[str], *, max_new_tokens: int,
             temperature: float = 0.8, top_p: float = 0.9, repetition_penalty: float = 1.1,
             do_sample: bool = True, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one response per prompt (batched, with the KV cache) -> (prompt_ids, response_ids).

    prompt_ids   (B, P) left-padded with pad_token_id (so every prompt ends at the same column)
    response_ids (B, R) R <= max_new_tokens; each response is cut right after its first EOS, the rest is pad

    Under FSDP2 every rank must run the same number of forward passes (each one all-gathers parameters), so
    `synced_gpus=True` keeps a rank whose samples all hit EOS stepping until every rank is done.
    """
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    device = next(model.parameters()).device
    input_ids, attention_mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    kwargs: dict[str, Any] = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, use_cache=True,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                  repetition_penalty=repetition_penalty, synced_gpus=world > 1)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    if hasattr(model, "reshard"):
        model.reshard()  # after a no-grad forward the FSDP2 root stays unsharded (DESIGN.md §7)
    response = out[:, input_ids.shape[1]:]
    return input_ids, truncate_at_eos(response, tokenizer.eos_token_id, tokenizer.pad_token_id)


def truncate_at_eos(response: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Keep each row up to and including its first EOS; everything after it becomes pad. (B, R) -> (B, R)."""
    is_eos = response == eos_id
    # after_eos[b, t] is True when an EOS occurred strictly before t
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return response.masked_fill(after_eos, pad_id)


def sample_texts(model: torch.nn.Module, tokenizer: Any, prompts: list[str], *, max_new_tokens: int, world: int,
                 rank: int, batch_size: int = 64, **sampling: Any) -> tuple[list[str], list[bool]]:
    """Sample one response per prompt, prompts spread over ranks; every rank gets all (text, ended_with_eos).

    Each rank takes prompts[rank::world]; the list is first padded (repeating its last prompt) to a multiple of the
    world size so every rank runs the same number of generate calls (FSDP2 forwards are collective)."""
    n = len(prompts)
    padded = prompts + [prompts[-1]] * ((-n) % world)
    mine = padded[rank::world]
    texts: list[str] = []
    ended: list[bool] = []
    for i in range(0, len(mine), batch_size):
        _, resp = generate(model, tokenizer, mine[i: i + batch_size], max_new_tokens=max_new_tokens, world=world,
                           **sampling)
        for row in resp.tolist():
            ended.append(tokenizer.eos_token_id in row)
            texts.append(tokenizer.decode([t for t in row if t not in (tokenizer.eos_token_id,
                                                                      tokenizer.pad_token_id)]))
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (texts, ended))
        texts = [gathered[i % world][0][i // world] for i in range(len(padded))]
        ended = [gathered[i % world][1][i // world] for i in range(len(padded))]
    return texts[:n], ended[:n]


def gold_scores(prompts: list[str], responses: list[str]) -> list[float] | None:
    """The testbed's hidden gold reward of each (prompt, response), or None when the data is not the testbed's.
    Used only for reporting; it never enters training."""
    try:
        import testbed
    except ImportError:  # a checkout or install without the testbed: nothing to report
        return None

    scores = [testbed.gold_reward(p, r) for p, r in zip(prompts, responses)]
    return None if any(s is None for s in scores) else scores
