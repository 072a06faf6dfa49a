"""Reward model (RM): Bradley–Terry training on preference pairs, the paper's Eq. (1).

r_θ(x, y) is the SFT model with a linear head (no bias) on the final hidden state of the last token:
the EOS that ends the response. It is a plain `AutoModelForSequenceClassification` with
`num_labels=1`, so the checkpoint loads with transformers alone and gives the same scores. Eq. (1),
over a batch of pairs (x, y_w, y_l) from D:

    L_θ = − mean log σ( r_θ(x, y_w) − r_θ(x, y_l) )

Commands
    python reward.py                                    # 1 process, CPU, the built-in testbed
    torchrun --standalone --nproc_per_node=2 reward.py  # FSDP2 over 2 processes (gloo on CPU)
    torchrun --nproc_per_node=8 reward.py --model runs/llama2-sft --train hh_train.jsonl \\
        --test hh_test.jsonl --bf16
    python reward.py --model runs/smollm2-sft --train helpful-base/train.jsonl.gz \\
        --test helpful-base/test.jsonl.gz

Paper defaults (Llama-2-7B): lr 5e-6, global batch 16 pairs, 1 epoch.

Deliberate choices the paper leaves open
  1. Constant learning rate (no schedule is stated); AdamW betas (0.9, 0.95), no weight decay,
     gradient clip 1.0.
  2. Chosen and rejected responses go through the model in one forward pass (2n sequences), packed
     without padding (packing.py: no FLOPs on pad tokens, same loss and gradients as the
     right-padded batch to float rounding); the score is read at each sequence's last token, the EOS
     appended to every response (data.encode).
  3. The head is initialised by transformers (normal, std = initializer_range) under the run's seed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from plumbing import common, data, distributed, packing
from plumbing.common import arg, check, non_negative, or_sentinel, positive
from plumbing.data import CHAT_TEMPLATE_HELP, CHAT_TEMPLATE_MODES, DATA_FORMAT_HELP, DATA_FORMATS
from plumbing.distributed import NOT_RESUMABLE, RESUME_HELP, SAVE_EVERY_HELP
from testbed.gold import gold_scores


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Args:
    model: str = arg("runs/testbed/sft",
                     "initial model: the SFT checkpoint (a save_pretrained folder)",
                     essential=True)
    train: str = arg("runs/testbed/data/pairs_train.jsonl",
                     "preference pairs D, JSONL {prompt, chosen, rejected} or a public format "
                     "(--data-format)", essential=True)
    test: str = arg("runs/testbed/data/pairs_test.jsonl",
                    "held-out pairs for evaluation (empty string = none)")
    data_format: str = arg("auto", DATA_FORMAT_HELP + " (for --train and --test)",
                           choices=DATA_FORMATS, essential=True)
    preference: str = arg("safer",
                          "PKU-SafeRLHF: chosen by safer_response_id or better_response_id",
                          choices=["safer", "better"], essential=True)
    chat_template: str = arg("auto", CHAT_TEMPLATE_HELP, choices=CHAT_TEMPLATE_MODES,
                             essential=True)
    out: str = arg("runs/testbed/rm", "output folder: the RM checkpoint, metrics.jsonl, args.json")
    lr: float = arg(5e-6, "learning rate (paper: 5e-6), constant", essential=True, valid=positive)
    epochs: float = arg(1.0, "passes over D (paper: 1)", valid=positive)
    batch_size: int = arg(16, "global batch in pairs = micro-batch x accumulation x world size "
                              "(paper: 16)", essential=True, valid=positive)
    micro_batch_size: int = arg(8, "pairs per forward/backward on one process (2x sequences: "
                                   "chosen + rejected)", valid=positive)
    max_len: int = arg(512, "maximum tokens of prompt + response; longer ones are truncated "
                            "(see data.encode)", essential=True, valid=positive)
    grad_clip: float = arg(1.0, "clip the global gradient norm to this value (0 = off)",
                           essential=True, valid=non_negative)
    seed: int = arg(0, "random seed (data order, head initialisation)", essential=True,
                    valid=common.seed)
    bf16: bool = arg(False, "bf16: autocast, and under FSDP2 bf16 parameters and activations with "
                            "fp32 master weights and gradient reduction (MixedPrecisionPolicy); "
                            "fp32 is the reference", essential=True)
    grad_checkpointing: bool = arg(False, distributed.CHECKPOINTING_HELP)
    threads: int = arg(0, common.THREADS_HELP, valid=non_negative)
    tf32: bool = arg(False, common.TF32_HELP)
    deterministic: bool = arg(False, common.DETERMINISTIC_HELP)
    dist_timeout: float = arg(60.0, distributed.DIST_TIMEOUT_HELP, valid=positive)
    max_steps: int = arg(-1, "stop after this many optimiser steps (-1 = the whole epoch); for "
                             "smoke tests", valid=or_sentinel(-1, "the whole epoch"))
    eval_every: int = arg(50, "evaluate on the test pairs every N steps (and at the end; 0 = only "
                              "at the end)", valid=non_negative)
    eval_batch_size: int = arg(32, "pairs per forward pass during evaluation", valid=positive)
    log_every: int = arg(10, "print a metrics line every N steps", valid=positive)
    overwrite: bool = arg(False, "replace an existing output folder")
    save_every: int = arg(0, SAVE_EVERY_HELP, valid=non_negative)
    resume: bool = arg(False, RESUME_HELP)


# --------------------------------------------------------------------------------------------------
# The pieces that are the method
# --------------------------------------------------------------------------------------------------
def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Eq. (1): mean over pairs of −log σ(r_w − r_l). (n,), (n,) -> scalar.

    `logsigmoid` instead of log(sigmoid(.)): exact for large negative margins, where sigmoid
    underflows to 0."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def rewards(model: torch.nn.Module, input_ids: torch.Tensor,
            attention_mask: torch.Tensor) -> torch.Tensor:
    """r_θ(x, y) for right-padded sequences (B, T) -> (B,). transformers pools the logit of the last
    non-pad token (it finds it with config.pad_token_id), i.e. the EOS that ends each response."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]


def packed_rewards(model: torch.nn.Module, batch: packing.Packed) -> torch.Tensor:
    """r_θ(x, y) of packed sequences (packing.Packed, S sequences) -> (S,): the head applied to the
    final hidden state at each sequence's last token (its EOS) — what `rewards` reads from the
    padded batch, without the padding. The head runs on S vectors only, not on every token as inside
    transformers' forward. (At parameters other than the module's own, through
    torch.func.functional_call: meta_rm.rewards_at.)"""
    return model.score(packing.hidden(model, batch)[batch.last])[:, 0]


def pair_sequences(tokenizer, pairs: list[dict], max_len: int,
                   chat_template: str = "auto") -> tuple[list[list[int]], int]:
    """Token ids of n pairs: 2n sequences, 0..n-1 chosen, n..2n-1 rejected. Returns (sequences,
    n truncated)."""
    seqs, n_truncated = [], 0
    for key in ("chosen", "rejected"):
        for p in pairs:
            ids, _, truncated = data.encode(tokenizer, p["prompt"], p[key], max_len, chat_template)
            seqs.append(ids)
            n_truncated += truncated
    return seqs, n_truncated


def pair_batch(tokenizer, pairs: list[dict], max_len: int,
               chat_template: str = "auto") -> tuple[torch.Tensor, torch.Tensor, int]:
    """Tokenise n pairs into one right-padded (2n, T) batch: rows 0..n-1 chosen, rows n..2n-1
    rejected. Returns (ids, mask, n truncated sequences). The padded layout is the reference the
    packed one is tested against."""
    seqs, n_truncated = pair_sequences(tokenizer, pairs, max_len, chat_template)
    ids, mask = data.pad(seqs, tokenizer.pad_token_id)
    return ids, mask, n_truncated


def reward_dtype(r: torch.Tensor) -> torch.Tensor:
    """Rewards keep the model's dtype (float32, or float64 in the golden tests); only bf16 / fp16
    (autocast) are up-cast to float32 before the losses."""
    return r.float() if r.dtype in (torch.bfloat16, torch.float16) else r


@torch.no_grad()
def score_texts(model, tokenizer, prompts: list[str], responses: list[str], *, max_len: int,
                world: int, rank: int, batch_size: int = 64, bf16: bool = False,
                chat_template: str = "auto") -> torch.Tensor:
    """r(x, y) for every (prompt, response), spread over ranks; every rank gets all N scores (N,) on
    CPU.

    Every rank runs the same number of forward passes (FSDP2 forwards are collective): the list is
    padded with repeats of its last item to a multiple of world x batch_size, and the padding is
    dropped after gathering."""
    device = next(model.parameters()).device
    n = len(prompts)
    chunk = world * batch_size
    idx = list(range(n)) + [n - 1] * ((-n) % chunk)
    scores = []
    for start in range(0, len(idx), chunk):
        mine = idx[start + rank * batch_size: start + (rank + 1) * batch_size]
        seqs = [data.encode(tokenizer, prompts[i], responses[i], max_len, chat_template)[0]
                for i in mine]
        with common.autocast(device, bf16):  # packed, as in training: no FLOPs on padding
            r = reward_dtype(packed_rewards(
                model, packing.pack(seqs, tokenizer.pad_token_id).to(device)))
        if world > 1:
            parts = [torch.empty_like(r) for _ in range(world)]
            dist.all_gather(parts, r)
            r = torch.cat(parts)
        scores.append(r.cpu())
    distributed.reshard(model)
    return torch.cat(scores)[:n]


def evaluate(model, tokenizer, pairs: list[dict], *, max_len: int, world: int, rank: int,
             batch_size: int, bf16: bool = False, chat_template: str = "auto") -> dict[str, float]:
    """Accuracy on held-out pairs vs their (noisy) labels and, on the testbed, vs the hidden gold
    ordering."""
    prompts = [p["prompt"] for p in pairs]
    with common.eval_mode(model):
        r_w, r_l = (score_texts(model, tokenizer, prompts, [p[key] for p in pairs], max_len=max_len,
                                world=world, rank=rank, batch_size=batch_size, bf16=bf16,
                                chat_template=chat_template)
                    for key in ("chosen", "rejected"))
    out = {"acc": (r_w > r_l).float().mean().item(), "reward_chosen": r_w.mean().item(),
           "reward_rejected": r_l.mean().item(), "margin": (r_w - r_l).mean().item(),
           "loss": bradley_terry_loss(r_w, r_l).item()}
    g_w = gold_scores(prompts, [p["chosen"] for p in pairs])
    g_l = gold_scores(prompts, [p["rejected"] for p in pairs])
    if g_w is not None and g_l is not None:
        # agreement with the gold ordering, over the pairs whose gold scores differ
        gold_says = torch.tensor(g_w) - torch.tensor(g_l)
        keep = gold_says != 0
        out["acc_gold"] = ((r_w - r_l)[keep] * gold_says[keep] > 0).float().mean().item()
        # how often the labels match gold
        out["label_acc_gold"] = (gold_says[keep] > 0).float().mean().item()
    return out


# --------------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(Args, argv)
    threads = common.configure_process(args.threads, args.tf32, args.deterministic)
    rank, world, device = distributed.init_distributed(args.dist_timeout)
    accum = common.split_batch(args.batch_size, args.micro_batch_size, world)
    # ---- inputs: every one is checked before the output folder is created, so a mistake leaves
    # nothing behind ----
    distributed.check_reward_tokenizer(args.model)
    distributed.check_positions(args.model, "--max-len", args.max_len)
    pairs = data.read_pairs(args.train, args.data_format, args.preference)
    test_pairs = data.read_pairs(args.test, args.data_format, args.preference) if args.test else []
    _, total_steps = common.count_steps(len(pairs), args.batch_size, args.epochs, args.max_steps,
                                        f"{args.train}: {len(pairs)} pairs")
    state = distributed.resume_state(args) if args.resume else None  # None: start from scratch
    common.prepare_output(args.out, args.overwrite, args.resume, state)
    # same head initialisation on every rank (rank 0's is broadcast anyway)
    common.seed_everything(args.seed, 0)

    # ---- model: r_θ = the SFT model with a linear head on the last token; FSDP2; optimiser ----
    path = args.out if state else args.model
    tokenizer = distributed.check_reward_tokenizer(path)
    # the architecture on the meta device
    model = distributed.empty_model(AutoModelForSequenceClassification, path, num_labels=1,
                                    pad_token_id=tokenizer.pad_token_id)
    if world > 1:  # FSDP2: each decoder layer one unit (gathered for its forward), then the root
        mp = distributed.fsdp_precision(args.bf16)  # --bf16: bf16 compute, fp32 master weights
        for layer in distributed.decoder_layers(model):
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    # rank 0 reads (a new head: seeded), broadcasts
    model = distributed.load_weights(model, path, world, device)
    if args.grad_checkpointing:  # each layer keeps its input only and is recomputed in backward
        distributed.checkpoint_activations(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=0.0)
    log = common.MetricsLog(os.path.join(args.out, "metrics.jsonl"))
    common.print0(f"reward: {len(pairs)} pairs, {total_steps} steps of {args.batch_size} = "
                  f"{args.micro_batch_size} x {accum} accumulation x {world} processes, "
                  f"{threads} thread(s) each")

    def run_eval(step: int) -> None:
        if not test_pairs:
            return
        metrics = evaluate(model, tokenizer, test_pairs, max_len=args.max_len, world=world,
                           rank=rank, batch_size=args.eval_batch_size, bf16=args.bf16,
                           chat_template=args.chat_template)
        log.log(step=step, **{"eval_" + k: v for k, v in metrics.items()})
        common.print0(f"eval @ {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    # ---- loop ----
    # the same on every rank
    order = common.Shuffled(len(pairs), args.batch_size, args.seed, whole_batches=True)
    start, n_truncated = 0, 0
    if state:  # --resume: optimiser, RNG states, and the data order where the checkpoint left it
        extra = distributed.restore_training_state(state, [(model, optimizer)], world, rank,
                                                   order=order)
        start, n_truncated = state["step"], extra["n_truncated"]

    def save(step: int, finished: bool = False) -> None:  # collective: every rank calls it
        trainer_state = None
        if args.save_every > 0:  # resumable checkpoints: also what --resume needs
            trainer_state = distributed.training_state(step, [(model, optimizer)], world, log,
                                                       finished, order=order,
                                                       n_truncated=n_truncated)
        distributed.save_model(model, tokenizer, args.out, world, args, trainer_state)

    preemption = common.Preemption(args.save_every > 0, "reward", args.out, NOT_RESUMABLE)
    bar = common.progress(range(start, total_steps), desc="reward")
    t0 = time.time()
    for step in bar:
        batch = [pairs[i] for i in order.take()]
        mine = batch[rank * len(batch) // world: (rank + 1) * len(batch) // world]
        # Each micro-batch's loss is its share of the global mean: mean over its pairs x
        # (its pairs / global pairs). FSDP2 averages gradients over ranks, so x world turns that
        # average back into the sum over ranks.
        loss_sum, correct = 0.0, 0.0
        for micro in range(accum):
            part = mine[micro * args.micro_batch_size: (micro + 1) * args.micro_batch_size]
            seqs, truncated = pair_sequences(tokenizer, part, args.max_len, args.chat_template)
            n_truncated += truncated
            with common.autocast(device, args.bf16):  # packed: no FLOPs on padding (packing.py)
                r = reward_dtype(packed_rewards(
                    model, packing.pack(seqs, tokenizer.pad_token_id).to(device)))  # (2n,)
            r_w, r_l = r[: len(part)], r[len(part):]
            loss = bradley_terry_loss(r_w, r_l)
            (loss * len(part) / args.batch_size * world).backward()
            loss_sum += loss.item() * len(part)
            correct += (r_w > r_l).sum().item()
        grad_norm = distributed.clip_grad_norm(model, args.grad_clip,
                                               f"reward step {step + 1}: gradient norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        loss = distributed.all_reduce_sum(loss_sum, world) / args.batch_size
        common.check_finite(loss, f"reward step {step + 1}: loss")
        acc = distributed.all_reduce_sum(correct, world) / args.batch_size
        log.log(step=step + 1, loss=loss, acc=acc, grad_norm=grad_norm,
                pairs_per_s=(step + 1 - start) * args.batch_size / max(time.time() - t0, 1e-9))
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.2f}")
        if (step + 1) % args.log_every == 0 or step + 1 == total_steps:
            common.print0(f"step {step + 1}/{total_steps} loss {loss:.4f} acc {acc:.3f} "
                          f"grad_norm {grad_norm:.3f}")
        if common.due(args.eval_every, step + 1, total_steps):
            run_eval(step + 1)
        if (common.due(args.save_every, step + 1, total_steps)
                or preemption.requested(world, step + 1, total_steps)):
            save(step + 1)
            preemption.stop(step + 1, total_steps)  # SIGINT / SIGTERM: stop here, resumable

    run_eval(total_steps)
    if n_truncated:
        common.print0(f"note: {n_truncated} sequences were longer than --max-len {args.max_len} "
                      "and were truncated")
    save(total_steps, finished=True)
    common.print0(f"saved {args.out}")


if __name__ == "__main__":
    common.run_main(main)
