"""Supervised fine-tuning (SFT): next-token loss on the responses of (prompt, response) pairs.

The first stage of the pipeline (paper §"Experimental settings"; docs/design.md §6): the policy that
PPO starts from, the reference policy of the KL term, and the backbone of the reward model all come
from this checkpoint.

Commands
    python sft.py                                    # 1 process, CPU, the built-in testbed
    torchrun --standalone --nproc_per_node=2 sft.py  # FSDP2 over 2 processes (gloo on CPU)
    torchrun --nproc_per_node=8 sft.py --model meta-llama/Llama-2-7b-hf --data hh_sft.jsonl --bf16
                                                     # GPUs
    python sft.py --model runs/smollm2 --data helpful-base/train.jsonl.gz --out runs/smollm2-sft
                                                     # SmolLM2, HH-RLHF

Paper defaults (Llama-2-7B): lr 2e-5, 2 epochs, warm-up 0.3 epoch then linear decay to 0, global
batch 32.

Deliberate choices the paper leaves open
  1. Loss on response tokens only (prompt and padding are masked with -100); the EOS token is part
     of the target, so the model learns to stop. A micro-batch is packed without padding
     (packing.py) and the LM head runs only on the positions that predict a response token
     (`packed_targets`): the same loss and gradients as the padded batch to float rounding, no FLOPs
     on padding or on the prompt's logits.
  2. The loss is the mean NLL per response token over the whole *global* batch (not a mean of
     per-micro-batch means), so the gradient does not depend on how the batch is split over
     micro-batches and ranks.
  3. AdamW with betas (0.9, 0.95), no weight decay; gradient norm clipped to 1.0.
  4. The last incomplete global batch of an epoch is dropped (every step sees exactly `batch_size`
     examples).
"""
from __future__ import annotations

import dataclasses
import os
import time

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer

from plumbing import common, data, distributed, packing, sampling
from plumbing.common import arg, check, non_negative, or_sentinel, positive
from plumbing.data import CHAT_TEMPLATE_HELP, CHAT_TEMPLATE_MODES, DATA_FORMAT_HELP, DATA_FORMATS
from plumbing.distributed import NOT_RESUMABLE, RESUME_HELP, SAVE_EVERY_HELP
from testbed.gold import gold_scores


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Args:
    model: str = arg("runs/testbed/base_model",
                     "base model: a save_pretrained folder (config, safetensors, tokenizer)",
                     essential=True)
    data: str = arg("runs/testbed/data/sft_train.jsonl",
                    "demonstrations, JSONL records {prompt, response}, or a public format "
                    "(--data-format): its preferred responses", essential=True)
    data_format: str = arg("auto", DATA_FORMAT_HELP + " (for --data)", choices=DATA_FORMATS,
                           essential=True)
    preference: str = arg("safer",
                          "PKU-SafeRLHF: the demonstration is the safer or the better response",
                          choices=["safer", "better"], essential=True)
    chat_template: str = arg("auto", CHAT_TEMPLATE_HELP, choices=CHAT_TEMPLATE_MODES,
                             essential=True)
    out: str = arg("runs/testbed/sft",
                   "output folder: the SFT checkpoint, metrics.jsonl, args.json")
    lr: float = arg(2e-5, "peak learning rate (paper: 2e-5)", essential=True, valid=positive)
    epochs: float = arg(2.0, "passes over the data (paper: 2)", essential=True, valid=positive)
    warmup_epochs: float = arg(0.3, "linear warm-up length in epochs (paper: 0.3), then linear "
                                    "decay to 0", essential=True, valid=non_negative)
    batch_size: int = arg(32, "global batch size in examples = micro-batch x accumulation x "
                              "world size (paper: 32)", essential=True, valid=positive)
    micro_batch_size: int = arg(8, "examples per forward/backward on one process", valid=positive)
    max_len: int = arg(512, "maximum tokens of prompt + response; longer ones are truncated "
                            "(see data.encode)", essential=True, valid=positive)
    grad_clip: float = arg(1.0, "clip the global gradient norm to this value (0 = off)",
                           essential=True, valid=non_negative)
    seed: int = arg(0, "random seed (data order, initialisation)", essential=True,
                    valid=common.seed)
    bf16: bool = arg(False, "bf16: autocast, and under FSDP2 bf16 parameters and activations with "
                            "fp32 master weights and gradient reduction (MixedPrecisionPolicy); "
                            "fp32 is the reference", essential=True)
    grad_checkpointing: bool = arg(False, distributed.CHECKPOINTING_HELP)
    threads: int = arg(0, common.THREADS_HELP, valid=non_negative)
    tf32: bool = arg(False, common.TF32_HELP)
    deterministic: bool = arg(False, common.DETERMINISTIC_HELP)
    dist_timeout: float = arg(60.0, distributed.DIST_TIMEOUT_HELP, valid=positive)
    max_steps: int = arg(-1, "stop after this many optimiser steps (-1 = run all epochs); for "
                             "smoke tests", essential=True, valid=or_sentinel(-1, "all epochs"))
    log_every: int = arg(10, "print a metrics line every N steps", valid=positive)
    eval_prompts: str = arg("runs/testbed/data/eval_prompts.jsonl",
                            "prompts sampled after training to report EOS rate (and gold reward "
                            "on the testbed); empty string = skip")
    eval_samples: int = arg(64, "how many eval prompts to sample after training", valid=positive)
    max_new_tokens: int = arg(48, "maximum new tokens when sampling after training", valid=positive)
    overwrite: bool = arg(False, "replace an existing output folder")
    save_every: int = arg(0, SAVE_EVERY_HELP, valid=non_negative)
    resume: bool = arg(False, RESUME_HELP)


# --------------------------------------------------------------------------------------------------
# The pieces that are the method
# --------------------------------------------------------------------------------------------------
def sft_labels(ids: list[int], n_prompt: int) -> list[int]:
    """Targets for the next-token loss: -100 (ignored) on the prompt, the token itself on the
    response + EOS.

    The one-token shift (logits at position t predict token t+1) happens in `sft_loss_sum`, not
    here."""
    return [-100] * n_prompt + ids[n_prompt:]


def sft_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed NLL of the labelled tokens. logits (B, T, V), labels (B, T) with -100 where ignored.

    Position t's logits predict token t+1, so logits drop the last column and labels drop the
    first."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=-100, reduction="sum")


def packed_targets(packed: packing.Packed,
                   labels: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions of a packed batch whose next token is labelled, and those labels: flat indices
    (N,) into `packing.hidden`'s rows and targets (N,) — `sft_loss_sum`'s one-token shift, done once
    per sequence.

    Each sequence's labels are laid where its tokens are, except its first label (never a target:
    nothing predicts the first token), so position j's next label is never another sequence's: after
    a sequence's last token comes the next sequence's first slot or the tail, both -100."""
    flat = torch.full((packed.computed_tokens + 1,), -100, dtype=torch.long)
    for start, y in zip(packed.starts.tolist(), labels):
        flat[start + 1: start + len(y)] = torch.tensor(y[1:], dtype=torch.long)
    next_label = flat[1:]  # (rows · C,): the label of the token after position j
    idx = (next_label != -100).nonzero()[:, 0]
    return idx, next_label[idx]


def packed_loss_sum(model: torch.nn.Module, packed: packing.Packed, idx: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
    """`sft_loss_sum` on a packed batch: summed NLL of the targets, the LM head applied at `idx`
    only."""
    logits = model.lm_head(packing.hidden(model, packed)[idx])  # (N, V)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up then linear decay to 0; `step` is the 0-based index of the optimiser step
    about to run.

    warm-up (step < W):  peak * (step + 1) / W       -> the first step already moves, the W-th
                                                        reaches the peak
    decay   (step >= W): peak * (T - step) / (T - W) -> the last step (T - 1) still has
                                                        peak / (T - W) > 0
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * (total_steps - step) / max(1, total_steps - warmup_steps)


# --------------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(Args, argv)
    threads = common.configure_process(args.threads, args.tf32, args.deterministic)
    rank, world, device = distributed.init_distributed(args.dist_timeout)
    accum = common.split_batch(args.batch_size, args.micro_batch_size, world)
    common.seed_everything(args.seed, rank)

    # ---- data: every rank reads the whole file and draws the same order; each takes its slice of
    # a batch ----
    # Every input is checked before the output folder is created: a mistake leaves nothing behind.
    distributed.check_causal_lm(args.model, "--model")
    distributed.check_positions(args.model, "--max-len", args.max_len)
    if args.eval_prompts:
        distributed.check_positions(args.model, "--max-new-tokens", args.max_new_tokens, reserve=1)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    check(tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None,
          f"{args.model}: the tokenizer needs an EOS and a PAD token")
    records = data.read_demonstrations(args.data, args.data_format, args.preference)
    eval_prompts = (data.read_prompts(args.eval_prompts)[: args.eval_samples] if args.eval_prompts
                    else [])
    examples, n_truncated = [], 0
    for r in records:
        ids, n_prompt, truncated = data.encode(tokenizer, r["prompt"], r["response"], args.max_len,
                                               args.chat_template)
        examples.append((ids, sft_labels(ids, n_prompt)))
        n_truncated += truncated
    steps_per_epoch, total_steps = common.count_steps(len(examples), args.batch_size, args.epochs,
                                                      args.max_steps,
                                                      f"{args.data}: {len(examples)} examples")
    warmup_steps = max(1, round(steps_per_epoch * args.warmup_epochs))
    state = distributed.resume_state(args) if args.resume else None  # None: start from scratch
    common.prepare_output(args.out, args.overwrite, args.resume, state)
    common.print0(f"sft: {len(examples)} examples ({n_truncated} truncated to {args.max_len} "
                  f"tokens), {total_steps} steps of {args.batch_size} = {args.micro_batch_size} x "
                  f"{accum} accumulation x {world} processes, {threads} thread(s) each")

    # ---- model, FSDP2 over the processes, and optimiser ----
    path = args.out if state else args.model
    # the architecture on the meta device
    model = distributed.empty_model(AutoModelForCausalLM, path)
    if world > 1:  # FSDP2: each decoder layer one unit (gathered for its forward), then the root
        mp = distributed.fsdp_precision(args.bf16)  # --bf16: bf16 compute, fp32 master weights
        for layer in distributed.decoder_layers(model):
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    # rank 0 reads, every rank gets its shards
    model = distributed.load_weights(model, path, world, device)
    if args.grad_checkpointing:  # each layer keeps its input only and is recomputed in backward
        distributed.checkpoint_activations(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=0.0)
    log = common.MetricsLog(os.path.join(args.out, "metrics.jsonl"))

    # ---- loop ----
    # the same on every rank
    order = common.Shuffled(len(examples), args.batch_size, args.seed, whole_batches=True)
    start = 0
    if state:  # --resume: optimiser, RNG states, and the data order where the checkpoint left it
        distributed.restore_training_state(state, [(model, optimizer)], world, rank, order=order)
        start = state["step"]

    def save(step: int, finished: bool = False) -> None:  # collective: every rank calls it
        trainer_state = None
        if args.save_every > 0:  # resumable checkpoints: also what --resume needs
            trainer_state = distributed.training_state(step, [(model, optimizer)], world, log,
                                                       finished, order=order)
        distributed.save_model(model, tokenizer, args.out, world, args, trainer_state)

    preemption = common.Preemption(args.save_every > 0, "sft", args.out, NOT_RESUMABLE)
    bar = common.progress(range(start, total_steps), desc="sft")
    t0, tokens_seen = time.time(), 0
    for step in bar:
        batch = [examples[i] for i in order.take()]
        # Loss normalisation: the target is the mean NLL per response token of the whole global
        # batch, so each micro-batch contributes (its summed NLL) / (response tokens in the global
        # batch). Every rank can count those tokens itself because every rank holds the whole
        # batch. FSDP2 *averages* gradients over ranks, so the loss is multiplied by the world size
        # to turn that average back into the sum over ranks.
        n_tokens = sum(sum(t != -100 for t in labels[1:]) for _, labels in batch)
        mine = batch[rank * len(batch) // world: (rank + 1) * len(batch) // world]
        lr = lr_at(step, total_steps, warmup_steps, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        nll = 0.0
        for micro in range(accum):
            part = mine[micro * args.micro_batch_size: (micro + 1) * args.micro_batch_size]
            # no FLOPs on padding
            packed = packing.pack([x for x, _ in part], tokenizer.pad_token_id)
            idx, targets = packed_targets(packed, [y for _, y in part])
            with common.autocast(device, args.bf16):
                loss_sum = packed_loss_sum(model, packed.to(device), idx.to(device),
                                           targets.to(device))
            (loss_sum * world / n_tokens).backward()
            nll += loss_sum.item()
        grad_norm = distributed.clip_grad_norm(model, args.grad_clip,
                                               f"sft step {step + 1}: gradient norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        loss = distributed.all_reduce_sum(nll, world) / n_tokens
        common.check_finite(loss, f"sft step {step + 1}: loss")
        tokens_seen += sum(len(ids) for ids, _ in batch)
        metrics = dict(step=step + 1, loss=loss, lr=lr, grad_norm=grad_norm,
                       tokens_per_s=tokens_seen / max(time.time() - t0, 1e-9))
        log.log(**metrics)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        if (step + 1) % args.log_every == 0 or step + 1 == total_steps:
            common.print0(f"step {step + 1}/{total_steps} loss {loss:.4f} lr {lr:.3e} "
                          f"grad_norm {grad_norm:.3f} tok/s {metrics['tokens_per_s']:.0f}")
        if (common.due(args.save_every, step + 1, total_steps)
                or preemption.requested(world, step + 1, total_steps)):
            save(step + 1)
            preemption.stop(step + 1, total_steps)  # SIGINT / SIGTERM: stop here, resumable

    # ---- save (with the trainer state when --save-every asked for resumable checkpoints) ----
    save(total_steps, finished=True)
    common.print0(f"saved {args.out}")

    # ---- what the SFT model does: EOS rate, and gold reward on the testbed ----
    if eval_prompts:
        report = sampling.sample_report(model, tokenizer, eval_prompts,
                                        max_new_tokens=args.max_new_tokens, world=world, rank=rank,
                                        chat_template=args.chat_template, bf16=args.bf16,
                                        gold=gold_scores)
        log.log(**{"final_" + k: v for k, v in report.items()})
        common.print0("sft samples: " + ", ".join(f"{k} {v:.3f}" for k, v in report.items()))


if __name__ == "__main__":
    common.run_main(main)
