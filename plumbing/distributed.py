"""Processes, FSDP2 and checkpoints: one code path for `python stage.py` and
`torchrun --nproc_per_node=N stage.py`.

Nothing in here is part of the method. What each part answers:

- `init_distributed`  how a stage finds out whether it runs alone or under torchrun
                 (gloo on CPU, nccl on CUDA)
- `all_reduce_mean`, `all_reduce_sum`, `clip_grad_norm`, `global_norm`: numbers over all processes
- `empty_model`, `load_weights`  a Hugging Face `save_pretrained` folder in: its architecture on the
                 meta device, which the stage shards (FSDP2: `fully_shard` per decoder layer, then
                 the root, written out in each stage) or not, then its weights: rank 0 reads them
                 and broadcasts (docs/design.md §9); `load_model` = the three in one call, for tests
                 and benchmarks
- `check_checkpoint`, `check_positions`  a model folder is complete, and --max-len fits its position
                 embeddings
- `save_model`   a crash-safe checkpoint out (written under FOLDER.tmp, then renamed into place),
                 loadable with transformers alone; a full disk is one line and leaves the previous
                 checkpoint as it was
- `training_state`, `resume_state`, `restore_training_state`, `recover_save`:
                 --save-every / --resume, bit for bit
"""
from __future__ import annotations

import datetime
import json
import math
import os
import random
import shutil
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from plumbing.common import (MetricsLog, NothingToDo, UserError, check, check_finite,
                             essential_fields, is_main, lock_output, print0, save_args)


# --------------------------------------------------------------------------------------------------
# Processes: `python stage.py` (world size 1) and `torchrun --nproc_per_node=N stage.py` share one
# code path.
# --------------------------------------------------------------------------------------------------
DIST_TIMEOUT_HELP = ("minutes a process waits in a collective before the run fails (NCCL's own "
                     "default is 10: less than rank 0 may need to write a 7B optimiser state while "
                     "the others wait)")


def process_group_backend(device_type: str) -> str:
    """The backend string of the process group for a run on `device_type`. CPU: gloo. CUDA: NCCL
    for CUDA tensors (the FSDP2 all-gathers and reduce-scatters) and gloo for CPU tensors —
    "cpu:gloo,cuda:nccl", one process group with both: NCCL has no CPU implementation, and the
    stages reduce python numbers (losses, token counts, the preemption flag) as CPU tensors and
    broadcast python objects (errors, judge verdicts), which then go through gloo."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def check_gpu_count(local_rank: int, local_world: int, gpus: int) -> None:
    """One GPU per process: torchrun must not start more processes on a machine than it has GPUs
    (a second process on a GPU would crash NCCL, or silently share it)."""
    check(local_rank < gpus, f"torchrun started {local_world} processes on this machine, which has "
                             f"{gpus} GPU(s): one GPU per process, so --nproc_per_node={gpus} at "
                             "most (or set CUDA_VISIBLE_DEVICES)")


def init_distributed(timeout_minutes: float = 60.0) -> tuple[int, int, torch.device]:
    """Start the process group when launched by torchrun; return (rank, world_size, device).

    CUDA when there is a GPU (one per process: LOCAL_RANK), else CPU; the backend is
    `process_group_backend`'s, and a process waits `timeout_minutes` in a collective before the
    run fails. Without torchrun nothing is initialised and the stage runs as a plain single
    process.
    """
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        check_gpu_count(local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                        torch.cuda.device_count())
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend=process_group_backend(device.type),
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    return rank, world, device


def all_reduce_mean(values: dict[str, float], world: int) -> dict[str, float]:
    """Average a dict of python floats across ranks (for printing metrics that each rank computed on
    its share)."""
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


def clip_grad_norm(model: torch.nn.Module, max_norm: float, what: str = "gradient norm") -> float:
    """Clip the global gradient norm (over all ranks under FSDP2) and return the norm before
    clipping; a non-finite norm stops the stage (`what` names it in the message, e.g.
    "sft step 12: gradient norm")."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                          max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    norm = norm.item()
    check_finite(norm, what)
    return norm


def reshard(*models: torch.nn.Module) -> None:
    """Free the gathered parameters of FSDP2 roots after no-grad forwards: FSDP2 leaves a root
    unsharded after its forward, expecting the backward that a no-grad forward never runs
    (docs/design.md §9). No-op on plain modules."""
    for model in models:
        if hasattr(model, "reshard"):
            model.reshard()


def global_norm(tensors: list[torch.Tensor]) -> float:
    """‖(t_1, …, t_N)‖₂ over all processes (tensors may be FSDP2 shards: each process squares its
    own part)."""
    sq = sum((t.to_local() if hasattr(t, "to_local") else t).double().pow(2).sum() for t in tensors)
    if dist.is_initialized() and any(hasattr(t, "to_local") for t in tensors):
        dist.all_reduce(sq)
    return math.sqrt(float(sq))


# --------------------------------------------------------------------------------------------------
# Models and checkpoints
# --------------------------------------------------------------------------------------------------
def check_checkpoint(path: str, what: str = "checkpoint") -> None:
    """A model folder must hold config.json and weights; otherwise one clear line
    (a missing or half-written save)."""
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such {what} folder")
    names = os.listdir(path)
    if "config.json" not in names:
        raise UserError(f"{path}: not a model folder (no config.json)")
    if not any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        raise UserError(f"{path}: no *.safetensors weights "
                        "(half-written or not a save_pretrained folder)")


def model_config(path: str) -> dict:
    """config.json of a model folder (checked by `check_checkpoint`) as a dict, without building
    anything."""
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def check_positions(path: str, flag: str, tokens: int, reserve: int = 0) -> None:
    """`tokens` (the value of `flag`: --max-len, or --max-new-tokens with `reserve` = 1 position
    kept for a prompt) must fit the position embeddings of the model in `path`
    (max_position_embeddings; GPT-2: n_positions): beyond them a learned position table raises and a
    rotary one silently extrapolates. Read where a stage first reads the model's config, before
    anything is written."""
    config = model_config(path)
    positions = config.get("max_position_embeddings", config.get("n_positions"))
    if isinstance(positions, int) and tokens + reserve > positions:
        room = (f"{positions - reserve} positions left after a prompt" if reserve
                else f"{positions} positions")
        raise UserError(f"{flag} {tokens}: more than the model in {path} has "
                        f"({room}; max_position_embeddings {positions})")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face model: the modules whose class is listed in
    `_no_split_modules` (LlamaDecoderLayer, GPT2Block, ...). Each becomes its own FSDP2 unit. Found
    by class name through the class's bases too: `fully_shard` turns a LlamaDecoderLayer into an
    FSDPLlamaDecoderLayer, a subclass."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]


def empty_model(cls: Any, path: str, dtype: torch.dtype = torch.float32,
                **overrides: Any) -> torch.nn.Module:
    """The architecture of the `save_pretrained` folder `path` as `cls` (AutoModelForCausalLM,
    AutoModelForSequenceClassification, ...) on the meta device: its shape, no memory, no weights
    yet. A stage shards it (FSDP2: `fully_shard` per decoder layer, then the root) or not, then
    fills it with `load_weights`. `dtype`: of the weights (float32, the master weights of a trained
    model; bfloat16 for a frozen one under --bf16). `overrides` go to the config (num_labels=1,
    pad_token_id, attn_implementation="eager")."""
    check_checkpoint(path)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, **{k: v for k, v in overrides.items()
                                                 if k != "attn_implementation"})
    if "attn_implementation" in overrides:
        config._attn_implementation = overrides["attn_implementation"]
    with torch.device("meta"):
        return cls.from_config(config, dtype=dtype)


def load_weights(model: torch.nn.Module, path: str, world: int,
                 device: torch.device) -> torch.nn.Module:
    """`empty_model`'s result filled with the weights in `path`; returns the model to use.

    One process: the model `from_pretrained` reads (the empty one was only its shape). FSDP2 (world
    size > 1): every rank allocates only its shards (`to_empty`); rank 0 alone reads the folder and
    broadcasts them (`broadcast_from_rank0`), so a 7B model is never held in full by more than one
    process. A head the folder lacks (an RM started from an SFT checkpoint) is initialised by
    `from_pretrained` under the current seed, on rank 0, and broadcast like the rest. Buffers that
    are not saved (Llama's rotary `inv_freq`) are garbage after `to_empty`, so rank 0 broadcasts
    those too (docs/design.md §9). The weights keep the empty model's dtype."""
    cls, config = _unwrapped_class(model), model.config  # config: with empty_model's overrides
    dtype = next(model.parameters()).dtype
    if world == 1:
        return cls.from_pretrained(path, config=config, dtype=dtype).to(device)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    full = (cls.from_pretrained(path, config=config, dtype=dtype)
            if dist.get_rank() == 0 else None)
    set_model_state_dict(model, full.state_dict() if full is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    full_buffers = dict(full.named_buffers()) if full is not None else {}
    for name, buf in model.named_buffers():
        if full is not None:
            buf.copy_(full_buffers[name])
        dist.broadcast(buf, src=0)
    del full
    return model


def fsdp_precision(bf16: bool):
    """FSDP2's mixed precision for --bf16: the shards stay fp32 (the master weights the optimiser
    updates), the all-gathered parameters, and so the forward, backward and saved activations, are
    bf16, and gradients are reduce-scattered in fp32. Without it FSDP2 would all-gather fp32
    weights and autocast would keep a bf16 copy of every layer's weights for the backward.
    Without --bf16: no cast (fp32, the reference)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not bf16:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


CHECKPOINTING_HELP = ("activation checkpointing: every decoder layer keeps only its input for the "
                      "backward and runs its forward again there (about a third more compute, far "
                      "less memory); for models too large for the activations of a micro-batch")


def checkpoint_activations(model: torch.nn.Module) -> None:
    """--grad-checkpointing: every decoder layer keeps only its input for the backward and runs its
    forward again there (transformers' checkpointing, non-reentrant; the FSDP2 hooks stay outside
    the checkpoint). Call on the model `load_weights` returned (one process: a new model).
    transformers checkpoints a layer only in training mode: a stage that keeps its models in eval
    mode (PPO, DPO: no dropout) calls `keep_layers_training` after every `.eval()`."""
    model.activation_checkpointing_enable({"use_reentrant": False})


def keep_layers_training(model: torch.nn.Module) -> None:
    """For a model in eval mode with --grad-checkpointing: mark its decoder layers themselves as
    training (what transformers' checkpointing asks), not their submodules, so dropout stays off."""
    for layer in decoder_layers(model):
        layer.training = True


def shard(model: torch.nn.Module, world: int) -> torch.nn.Module:
    """FSDP2 as every stage writes it out where it builds a model: `fully_shard` each decoder layer,
    then the root; one process keeps a plain module. For tests and benchmarks (`load_model`)."""
    if world == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def load_model(cls: Any, path: str, world: int, device: torch.device,
               **overrides: Any) -> torch.nn.Module:
    """`empty_model`, `shard`, `load_weights` in one call (tests, benchmarks, the study's tools)."""
    return load_weights(shard(empty_model(cls, path, **overrides), world), path, world, device)


def check_reward_model(path: str, flag: str, alternative: str = "") -> None:
    """`path` must be a reward model, i.e. what reward.py or meta_rm.py saves: a
    ...ForSequenceClassification config with one label (num_labels 1) and the `score` head's weight
    in its safetensors. A causal-LM checkpoint (SFT, a PPO policy) is refused with one line: loading
    it as an RM would give it a random head without a word. `alternative` is appended to the message
    (another way out, for the stage that has one)."""
    check_checkpoint(path, flag)
    config = model_config(path)
    kind = ", ".join(config.get("architectures") or []) or "an unnamed architecture"
    labels = (len(config["id2label"]) if isinstance(config.get("id2label"), dict)
              else config.get("num_labels", 2))
    classifier = any(a.endswith("ForSequenceClassification")
                     for a in config.get("architectures") or [])
    has_head = classifier and "score.weight" in _weight_names(path)
    what = ("" if not classifier
            else f" with {labels} labels" if labels != 1
            else "" if has_head
            else " without score.weight in its safetensors")
    check(has_head and labels == 1,
          f"{path}: {flag} must be a reward model (one score head, trained: what reward.py or "
          f"meta_rm.py saves), but this is a {kind} checkpoint{what}; "
          f"train one with reward.py --model {path}{alternative}")


def check_causal_lm(path: str, flag: str) -> None:
    """`path` must be a causal language model (a base model, or what sft.py, ppo.py or dpo.py
    save), where a stage generates or trains a policy. A reward model there is refused with one
    line: loaded as a causal LM it would get a random LM head without a word. A config that names
    no architecture is let through (nothing to tell it by)."""
    check_checkpoint(path, flag)
    kinds = model_config(path).get("architectures") or []
    causal = any(k.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
                 for k in kinds)
    reward_model = any(k.endswith("ForSequenceClassification") for k in kinds)
    check(causal or not kinds,
          f"{path}: {flag} must be a causal language model (a base model, or what sft.py, ppo.py "
          f"or dpo.py save), but this is a {', '.join(kinds)} checkpoint"
          + (" (a reward model)" if reward_model else ""))


def _weight_names(path: str) -> set[str]:
    """The tensor names stored in a model folder's safetensors
    (headers only; sharded folders via their index)."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    names: set[str] = set()
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                names.update(f.keys())
    return names


def check_reward_tokenizer(path: str, what: str = "--model"):
    """The checkpoint folder exists with weights, and its tokenizer has a PAD token distinct from
    EOS: transformers reads the score at the last token that is not pad, and the score belongs on
    the EOS."""
    check_checkpoint(path, what)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    check(tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
          and tokenizer.pad_token_id != tokenizer.eos_token_id,
          f"{path}: the tokenizer needs a PAD token distinct from EOS "
          "(the reward is read at the EOS token)")
    return tokenizer


def load_reward_model(path: str, world: int, device: torch.device, **overrides):
    """An RM (or an SFT checkpoint to start one from) as AutoModelForSequenceClassification with one
    output, and its tokenizer (`load_model`: for tests and benchmarks; the stages write it out)."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = check_reward_tokenizer(path, "model")
    model = load_model(AutoModelForSequenceClassification, path, world, device, num_labels=1,
                       pad_token_id=tokenizer.pad_token_id, **overrides)
    return model, tokenizer


def full_state_dict(model: torch.nn.Module, world: int) -> dict[str, torch.Tensor]:
    """The whole state dict on CPU: on rank 0 (gathered from the shards under FSDP2); `{}` on the
    other ranks."""
    if world == 1:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model,
                                options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_model(model: torch.nn.Module, tokenizer: Any, folder: str, world: int, args: Any = None,
               trainer_state: dict | None = None) -> None:
    """Save a checkpoint that `from_pretrained` loads with transformers alone: config, safetensors,
    tokenizer, the run's args.json and, for `--resume`, `trainer_state` (from `training_state`) as
    trainer_state.pt. All ranks must call it (gathering the shards is collective); rank 0 writes.

    The folder is written under a temporary name, flushed to disk and renamed into place
    (`move_into_place`), so a crash in the middle of a save leaves the previous checkpoint untouched
    (and the trainer state always belongs to the weights beside it). A plain copy of the model class
    is built on the meta device and given the gathered tensors, so the saved config names the plain
    architecture (not the FSDP wrapper). A write that fails (a full disk: `WRITE_ERRORS`) removes
    the temporary folder and is a `UserError` on every rank, one line; the previous checkpoint was
    never touched.
    """
    state = full_state_dict(model, world)
    failed = None
    if is_main():
        with torch.device("meta"):
            plain = _unwrapped_class(model)(model.config)
        # strict=False: a tied lm_head may be absent
        plain.load_state_dict(state, assign=True, strict=False)
        if getattr(model.config, "tie_word_embeddings", False):
            plain.tie_weights()
        missing = [n for n, p in plain.named_parameters() if p.is_meta]
        # would be saved as garbage
        assert not missing, f"save_model: no weights gathered for {missing}"
        tmp = folder.rstrip("/") + ".tmp"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            plain.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if args is not None:
                save_args(args, tmp)
            if trainer_state is not None:
                torch.save(trainer_state, os.path.join(tmp, TRAINER_STATE))
            _carry_over(folder, tmp)
            _fsync_folder(tmp)
        except WRITE_ERRORS as e:  # a full disk, a quota, a read-only or vanished file system
            shutil.rmtree(tmp, ignore_errors=True)  # give back what the unfinished save took
            failed = (f"{folder}: could not write the checkpoint "
                      f"({_one_line(e)}; is the disk full?); "
                      f"the previous checkpoint in {folder} is untouched")
        else:
            move_into_place(tmp, folder)
    # rank 0's outcome, to every rank (this also waits until rank 0 has written)
    if dist.is_initialized():
        box = [failed]
        dist.broadcast_object_list(box, src=0)
        failed = box[0]
    check(failed is None, failed or "")


def _write_errors() -> tuple[type, ...]:
    """What a failed write raises: OSError from Python's own files, SafetensorError from safetensors
    ("No space left on device (os error 28)"), RuntimeError from torch.save
    ("[enforce fail at inline_container.cc] unexpected pos"). Each was seen on a full tmpfs."""
    from safetensors import SafetensorError

    return OSError, SafetensorError, RuntimeError


WRITE_ERRORS = _write_errors()


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _carry_over(folder: str, tmp: str) -> None:
    """Copy into the new checkpoint what the old folder holds beside its checkpoint
    (metrics.jsonl, ppo's critic/, ...), but never its trainer state: it would not match the new
    weights."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        src, dst = os.path.join(folder, name), os.path.join(tmp, name)
        if os.path.exists(dst) or name == TRAINER_STATE:
            continue
        if os.path.isfile(src):
            shutil.copy2(src, dst)
        elif os.path.isdir(src):
            # a nested checkpoint: hard links, so a 7B critic costs no copy and no disk
            shutil.copytree(src, dst, copy_function=os.link)


def move_into_place(tmp: str, folder: str) -> None:
    """Replace `folder` by the complete folder `tmp`: two renames. Between them the previous
    checkpoint is FOLDER.old and FOLDER does not exist
    (`recover_save` moves it back after a crash there)."""
    old = folder.rstrip("/") + ".old"
    if os.path.exists(folder):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_folder(folder: str) -> None:
    """Flush every file of `folder` to disk before it is renamed into place
    (a rename can reach the disk before the data it names; after a power loss the checkpoint would
    then be there but empty)."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _unwrapped_class(model: torch.nn.Module) -> type:
    """FSDP2 swaps a module's class for a subclass named FSDP<Name>; return the original
    Hugging Face class."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


# --------------------------------------------------------------------------------------------------
# Resuming (--save-every N, --resume): everything a run needs to continue bit for bit from a
# checkpoint. The trainer state is one file inside the checkpoint folder, so the atomic rename of
# `save_model` covers it with the weights.
# --------------------------------------------------------------------------------------------------
TRAINER_STATE = "trainer_state.pt"
SAVE_EVERY_HELP = ("every N optimiser steps, save a resumable checkpoint into --out "
                   "(weights, optimiser, data order, RNG states; continue with --resume); "
                   "0 = only the final model, which is then not resumable")
NOT_RESUMABLE = ("no checkpoint was written (--save-every 0); with --save-every N a stage stops at "
                 "the next step boundary after saving a resumable one")
RESUME_HELP = ("continue the run in --out from its latest --save-every checkpoint "
               "(the same essential flags are required); a folder without one starts from scratch")


def training_state(step: int, optimizers: list[tuple[torch.nn.Module, torch.optim.Optimizer]],
                   world: int, metrics: MetricsLog, finished: bool = False,
                   **extra: Any) -> dict | None:
    """The trainer state after `step` optimiser steps: each optimiser's full state (gathered from
    the FSDP2 shards), the RNG states of every rank (python, numpy, torch, CUDA), how many metrics
    lines were written, and the stage's `extra` values (its data order, counters); an extra value
    with a `state_dict()` (a `common.Shuffled`) is saved as that. Collective (every rank calls it);
    rank 0 gets it, others None."""
    rng = {"python": random.getstate(), "numpy": np.random.get_state(),
           "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [rng]
    if world > 1:
        rngs = [None] * world if is_main() else None
        dist.gather_object(rng, rngs, dst=0)
    # a finished run is never continued, so its final save skips the optimiser state
    # (as large as 2 models for Adam)
    optimizer_states = [] if finished else [_optimizer_state(model, opt, world)
                                            for model, opt in optimizers]
    if not is_main():
        return None
    lines = 0
    if os.path.exists(metrics.path):
        with open(metrics.path) as f:
            lines = sum(1 for _ in f)
    extra = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in extra.items()}
    return dict(step=step, finished=finished, optimizers=optimizer_states, rng=rngs,
                metrics_lines=lines, extra=extra)


def _optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: int) -> dict:
    if world == 1:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def resume_state(args: Any) -> dict | None:
    """For --resume: the trainer state of the checkpoint in args.out, or None when it holds no
    checkpoint yet (the run then starts from scratch). Refuses a checkpoint written with other
    values of the essential fields of `args` (`arg(..., essential=True)`: data, model, batch,
    learning rate, seed, ...: anything that changes the result) and one saved without --save-every
    (no trainer state).
    A finished run (its final save) raises `NothingToDo`. Call before `prepare_output`; it takes the
    folder's lock first (`common.lock_output`): another live run in it is refused before anything is
    moved or read."""
    folder = args.out
    lock_output(folder)
    recover_save(folder)
    path = os.path.join(folder, TRAINER_STATE)
    if not os.path.exists(path):
        check(not os.path.exists(os.path.join(folder, "config.json")),
              f"{folder}: --resume: this checkpoint has no {TRAINER_STATE} "
              "(it was saved without --save-every); pass --overwrite to start again")
        print0(f"--resume: no checkpoint in {folder} yet, starting from scratch")
        return None
    with open(os.path.join(folder, "args.json")) as f:
        saved = json.load(f)
    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {getattr(args, k)!r}"
               for k in essential_fields(args) if saved.get(k) != getattr(args, k)]
    check(not changed, f"{folder}: --resume with different settings than the checkpoint "
                       f"({'; '.join(changed)}); "
                       "use the same flags, or --overwrite / another --out for a new run")
    # our own file (it holds numpy/python RNG states)
    # map_location: a state saved on GPUs loads on any machine (the optimiser's tensors go back to
    # their device in restore_training_state)
    state = torch.load(path, weights_only=False, mmap=True, map_location="cpu")
    if state["finished"]:
        raise NothingToDo(f"--resume: {folder} is a finished run ({state['step']} steps); "
                          "nothing to do")
    print0(f"--resume: continuing {folder} after step {state['step']}")
    return state


def restore_training_state(state: dict,
                           optimizers: list[tuple[torch.nn.Module, torch.optim.Optimizer]],
                           world: int, rank: int, **stateful: Any) -> dict:
    """Put the optimisers, this rank's RNG states and every `stateful` object (by the name
    `training_state` saved it under: `order=...`) back as `training_state` saved them; return the
    stage's `extra` values. Call after every model is built (building a model draws random numbers).
    At another world size the data order still resumes exactly, but the per-rank RNG streams cannot,
    so they are left as seeded (a note)."""
    for name, obj in stateful.items():
        obj.load_state_dict(state["extra"][name])
    for (model, opt), saved in zip(optimizers, state["optimizers"]):
        if world == 1:
            opt.load_state_dict(saved)
        else:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 set_optimizer_state_dict)

            set_optimizer_state_dict(model, opt, saved,
                                     options=StateDictOptions(full_state_dict=True))
    if len(state["rng"]) == world:
        rng = state["rng"][rank]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:
        print0(f"note: the checkpoint was written by {len(state['rng'])} processes, "
               f"this run has {world}: random streams (sampling) are not those of the "
               "interrupted run; data order and optimiser are")
    return state["extra"]


def recover_save(folder: str) -> None:
    """A save killed between its two renames (see `save_model`) leaves the previous checkpoint as
    FOLDER.old and no FOLDER: move it back. A leftover FOLDER.tmp is an incomplete save
    and is removed."""
    if is_main():
        old, tmp = folder.rstrip("/") + ".old", folder.rstrip("/") + ".tmp"
        if not os.path.exists(folder) and os.path.isdir(old):
            os.replace(old, folder)
            print0(f"note: an interrupted save left the previous checkpoint in {old}; "
                   f"moved it back to {folder}")
        shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


