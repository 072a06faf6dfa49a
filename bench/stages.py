"""Benchmark of every stage against this machine's matmul peak (issue 7): a script, not a test.

It calls the stages' own functions on models built from testbed configs, so it measures the real
code:
    SFT      sft.packed_loss_sum on a packed batch (packing.py), + clip + AdamW
             (sft.py's inner loop)
    RM       reward.packed_rewards + reward.bradley_terry_loss, + clip + AdamW
             (reward.py's inner loop)
    MetaRM   meta_rm.meta_gradient (order 1, order 2) and meta_gradient_inplace on packed batches,
             + clip + AdamW
    "(padded, before)" rows: the same steps on the right-padded (B, T) batch, as the stages ran
    before issue 15 (sft.sft_loss_sum on full logits, reward.rewards, meta_gradient on (ids, mask)),
    timed interleaved with them
    PPO      ppo.rollout (generation, sampling.generate), ppo.make_experience (steps 2-3),
             ppo.ppo_update (step 6)
Batches are the default pipeline's (study/arms.py TESTBED): SFT 32 examples, RM n = 16 pairs,
MetaRM n = m = 16, k = 5, max length 64; PPO 16 prompts x 4 rollouts, 32 new tokens, 2 epochs of
mini-batches of 32.

Commands
    python -m bench.stages                          # everything, tiny and medium, ~9 min on 2 cores
    python -m bench.stages --threads 1 --repeats 4  # what BENCHMARKS.md holds (a machine shared
                                                      with other jobs)
    python -m bench.stages --parts peak,rm,meta --sizes tiny --repeats 3  # a part of it
    python -m bench.stages --no-world2              # without the torchrun (2-process) sub-run
    python -m bench.stages --parts concurrent --merge  # two stages at once; the other numbers
                                                         stay as they are
The tables go to BENCHMARKS.md (--out-md) and the numbers to benchmarks.json (--out-json).

What is measured, and how
  time       median over --repeats timed calls after --warmup untimed ones (time.perf_counter). The
             meta steps and their vanilla RM step are timed interleaved (vanilla, meta1, meta2,
             vanilla, ...) so that their ratio is taken within one repeat, under the same machine
             load; the reported ratio is the median of the per-repeat ratios.
  FLOPs      (analytic, Kaplan / PaLM style) per token, with N = parameters that sit in matmuls
             (every nn.Linear: attention, MLP, lm_head or score head; not the input embedding, not
             the norms), L layers, d hidden size, T the padded sequence length:
                 forward  2·N + 4·L·T·d       (QKᵀ and AV: 2·T·d each per token and layer; causal
                                              mask not discounted)
                 training 6·N + 12·L·T·d      (backward = 2 x forward)
             counted on the tokens the hardware computes: B·T of a padded batch, rows·C of a packed
             one (attention per row of C); tokens/s counts real (non-pad) tokens; "pad" is the share
             of computed tokens that are padding. The FLOP-ideal of a meta step is counted on real
             tokens (each sequence's own length):
             MetaRM: order 1 = 3·F(X_s) + 3·F(X_t); order 2 = 9·F(X_s) + 3·F(X_t)
             (derivation in BENCHMARKS.md).
             Generation with the KV cache: prefill 2·N·P + 4·L·P²·d per row, then per new token
             2·N + 4·L·t·d.
  MFU        achieved FLOP/s / the measured matmul peak of the same dtype
             (bf16 steps against the bf16 peak).
  memory     peak resident set size of the process (VmHWM from /proc/self/status), reset at the
             start of each measurement by writing 5 to /proc/self/clear_refs; it includes the
             models, optimiser states and the Python interpreter (~300 MB of torch + transformers).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import meta_rm
import ppo
import reward
import sft
from plumbing import common, data, distributed, packing
from plumbing.common import arg, non_negative, positive
from testbed import world as testbed_world


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Args:
    parts: str = arg("peak,sft,rm,meta,ppo,gen,profile,world2,concurrent",
                     "comma-separated parts: peak, sft, rm, meta, ppo, gen (KV cache on/off), "
                     "profile (where a medium bf16 step spends its time), world2 "
                     "(torchrun, 2 processes vs 1), concurrent (two stages at once: threads as "
                     "torch's default vs as common.threads_for splits the cores)")
    sizes: str = arg("tiny,medium", "testbed model sizes (testbed_world.MODEL_SIZES)")
    dtypes: str = arg("fp32,bf16", "fp32 and/or bf16 (autocast) for every training step")
    repeats: int = arg(5, "timed repeats per measurement (median); medium uses "
                          "max(2, repeats // 2)", valid=positive)
    warmup: int = arg(2, "untimed calls before timing", valid=non_negative)
    workdir: str = arg("runs/bench",
                       "where the testbeds (data, tokenizer, random base model) are written")
    out_md: str = arg("bench/BENCHMARKS.md", "markdown table")
    out_json: str = arg("bench/benchmarks.json", "all numbers")
    threads: int = arg(2, "torch threads of the single process (the 2-process run uses 1 per "
                          "process); on a machine shared with other jobs use 1: two threads that "
                          "wait on each other are far slower there",
                       valid=positive)
    worker: str = arg("", "internal: the worker of the world2 part (torchrun) or of the "
                          "concurrent part", choices=["", "world2", "concurrent"])
    merge: bool = arg(False, "add the parts measured now to the numbers already in --out-json "
                             "(the other parts keep theirs) and write BENCHMARKS.md from the whole")
    seed: int = arg(0, "seed of the testbeds, the batches and the models", valid=common.seed)


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------
def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter of this process
    (Linux: `5` into /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident set size since the last reset (VmHWM), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def timed(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Call every function `warmup` times, then `repeats` rounds of each in turn (interleaved);
    seconds per call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def matmul_peak(dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """Best median FLOP/s of square matmuls (n = 1024, 1536, 2048) in `dtype`:
    the physical reference."""
    best = {"flops": 0.0}
    for n in (1024, 1536, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        t = timed({"mm": lambda: torch.mm(a, b)}, 2, repeats)["mm"]
        flops = 2 * n**3 / statistics.median(t)
        if flops > best["flops"]:
            best = {"flops": flops, "n": n, "median_s": statistics.median(t)}
    return best


def machine() -> dict[str, Any]:
    model = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                     if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "load_before": os.getloadavg()}


# --------------------------------------------------------------------------------------------------
# FLOPs (formulas in the module docstring)
# --------------------------------------------------------------------------------------------------
def shape(model: torch.nn.Module) -> dict[str, int]:
    """N (parameters in nn.Linear layers), L, d of a Hugging Face decoder."""
    n_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return {"N": n_linear, "L": model.config.num_hidden_layers, "d": model.config.hidden_size}


def forward_flops(s: dict[str, int], batch: int, T: int) -> float:
    """Forward FLOPs of `batch` sequences padded to T tokens."""
    return batch * T * (2 * s["N"] + 4 * s["L"] * T * s["d"])


def real_flops(s: dict[str, int], lengths: list[int]) -> float:
    """Forward FLOPs of sequences of these lengths, each attending to its own tokens only:
    the FLOP-ideal."""
    return sum(n * (2 * s["N"] + 4 * s["L"] * n * s["d"]) for n in lengths)


def batch_flops(s: dict[str, int], batch) -> float:
    """Forward FLOPs of a batch as the hardware computes it:
    a padded (ids, mask, ...) tuple or a Packed batch."""
    ids = batch.input_ids if isinstance(batch, packing.Packed) else batch[0]
    return forward_flops(s, *ids.shape)


def batch_tokens(batch) -> tuple[int, int]:
    """(real tokens, computed tokens) of a padded tuple or a Packed batch."""
    if isinstance(batch, packing.Packed):
        return batch.real_tokens, batch.computed_tokens
    return int(batch[1].sum()), batch[0].numel()


def batch_shape(batch) -> str:
    if isinstance(batch, packing.Packed):
        return (f"{len(batch.lengths)} seqs in {batch.input_ids.shape[0]} x "
                f"{batch.input_ids.shape[1]} packed")
    return f"{batch[0].shape[0]} x {batch[0].shape[1]} padded"


def generation_flops(s: dict[str, int], batch: int, P: int, R: int) -> float:
    """Prefill of P prompt columns, then R new tokens each attending to the cache."""
    prefill = forward_flops(s, batch, P)
    decode = sum(batch * (2 * s["N"] + 4 * s["L"] * (P + t) * s["d"]) for t in range(R))
    return prefill + decode


def generation_flops_no_cache(s: dict[str, int], batch: int, P: int, R: int) -> float:
    """Without a cache every new token re-runs the whole prefix."""
    return sum(forward_flops(s, batch, P + t) for t in range(R))


# --------------------------------------------------------------------------------------------------
# Data and models (from a testbed written by python -m testbed)
# --------------------------------------------------------------------------------------------------
# the repository: workers import from it
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LEN = 64  # study/arms.py TESTBED: --max-len 64


def make_testbed(workdir: str, size: str, seed: int) -> str:
    folder = os.path.join(workdir, f"testbed_{size}")
    if not os.path.isfile(os.path.join(folder, "testbed.json")):
        testbed_world.main(["--out", folder, "--model-size", size, "--seed", str(seed),
                            "--overwrite"])
    return folder


class Workload:
    """The batches of one testbed: SFT examples, preference pairs X_t, meta items X_s (k = 5
    responses sampled by testbed_world.sample_response, the lengths a policy's samples have),
    PPO prompts."""

    def __init__(self, folder: str, seed: int):
        self.folder, self.base = folder, os.path.join(folder, "base_model")
        self.tokenizer = AutoTokenizer.from_pretrained(self.base)
        rng = random.Random(seed)
        files = os.path.join(folder, "data")
        demos = rng.sample(data.read_jsonl(os.path.join(files, "sft_train.jsonl")), 32)
        self.sft = [data.encode(self.tokenizer, r["prompt"], r["response"], MAX_LEN) for r in demos]
        self.pairs = rng.sample(data.read_jsonl(os.path.join(files, "pairs_train.jsonl")), 16)
        prompts = [r["prompt"] for r in data.read_jsonl(os.path.join(files, "rl_prompts.jsonl"))]
        self.meta_items = [
            {"prompt": p,
             "responses": [testbed_world.sample_response(p, rng, testbed_world.SFT_STYLE)
                           for _ in range(5)]}
            for p in rng.sample(prompts, 16)]
        self.ppo_prompts = rng.sample(prompts, 16)

    def sft_batch(self, part: slice = slice(None)):
        """The right-padded layout (before issue 15): (ids, mask, labels)."""
        examples = self.sft[part]
        ids, mask = data.pad([x for x, _, _ in examples], self.tokenizer.pad_token_id)
        labels, _ = data.pad([sft.sft_labels(x, n) for x, n, _ in examples], -100)
        return ids, mask, labels

    def sft_packed(self, part: slice = slice(None)):
        """What sft.py runs: (Packed, positions, targets)."""
        examples = self.sft[part]
        packed = packing.pack([x for x, _, _ in examples], self.tokenizer.pad_token_id)
        return (packed, *sft.packed_targets(packed, [sft.sft_labels(x, n) for x, n, _ in examples]))

    def pair_batch(self, part: slice = slice(None), packed: bool = True):
        seqs, _ = reward.pair_sequences(self.tokenizer, self.pairs[part], MAX_LEN)
        return (packing.pack(seqs, self.tokenizer.pad_token_id) if packed
                else data.pad(seqs, self.tokenizer.pad_token_id))

    def meta_batch(self, part: slice = slice(None), packed: bool = True):
        seqs = meta_rm.meta_sequences(self.tokenizer, self.meta_items[part], MAX_LEN)
        return (packing.pack(seqs, self.tokenizer.pad_token_id) if packed
                else data.pad(seqs, self.tokenizer.pad_token_id))


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)


# --------------------------------------------------------------------------------------------------
# One training step of each stage, exactly as the stage's loop does it
# --------------------------------------------------------------------------------------------------
def sft_step(model, opt, batch, bf16: bool, world: int = 1) -> None:
    """sft.py's step on a packed batch (Packed, positions, targets) or, as before,
    on a padded (ids, mask, labels)."""
    if isinstance(batch[0], packing.Packed):
        packed, idx, targets = batch
        n_tokens = len(targets) * world  # the global batch's response tokens
        with common.autocast(targets.device, bf16):
            loss_sum = sft.packed_loss_sum(model, packed, idx, targets)
    else:
        ids, mask, labels = batch
        n_tokens = (labels[:, 1:] != -100).sum().item() * world
        with common.autocast(ids.device, bf16):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)
        loss_sum = sft.sft_loss_sum(logits, labels)
    (loss_sum * world / n_tokens).backward()
    distributed.clip_grad_norm(model, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def rm_step(model, opt, batch, bf16: bool) -> None:
    """reward.py's step on a Packed batch or, as before, on a padded (ids, mask)."""
    with common.autocast(torch.device("cpu"), bf16):
        packed = isinstance(batch, packing.Packed)
        r = (reward.packed_rewards(model, batch) if packed
             else reward.rewards(model, *batch)).float()  # (2n,)
    n = r.shape[0] // 2
    reward.bradley_terry_loss(r[:n], r[n:]).backward()
    distributed.clip_grad_norm(model, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def meta_step(model, opt, pairs, meta, order: int, bf16: bool, measure: bool = False) -> None:
    """meta_rm.py's world-size-1 loop body: meta_gradient (functional_call), with `measure` its
    mechanism statistics (what --log-adapted-every logs), then clip + AdamW."""
    params = dict(model.named_parameters())
    grads, _ = meta_rm.meta_gradient(model, params, dict(model.named_buffers()), pairs, meta, 5,
                                     0.3, order, bf16=bf16)
    for p, g in zip(params.values(), grads):
        p.grad = g
    if measure:
        meta_rm.mechanism_stats(model, [pairs], [meta], 5, 0.3, False, len(pairs.lengths) // 2,
                                len(meta.lengths) // 5, bf16)
    distributed.clip_grad_norm(model, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def meta_step_inplace(model, opt, pairs, meta, bf16: bool, n_pairs: int = 16,
                      n_prompts: int = 16) -> None:
    """meta_rm.py's --meta-impl inplace (the sharded recipe), one micro-batch each."""
    meta_rm.meta_gradient_inplace(model, [pairs], [meta], 5, 0.3, n_pairs, n_prompts, bf16=bf16)
    distributed.clip_grad_norm(model, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def row(name: str, size: str, dtype: str, times: list[float], flops: float, tokens: int,
        peak: float, rss: float, computed: int | None = None, **extra: Any) -> dict[str, Any]:
    """One timed step; `computed` tokens (real + padding) give the padding share."""
    t = statistics.median(times)
    pad = {"pad_share": 1 - tokens / computed} if computed else {}
    return {"stage": name, "size": size, "dtype": dtype, "step_s": t, "step_s_all": times,
            "tokens": tokens, "tokens_per_s": tokens / t, "flops": flops, "flops_per_s": flops / t,
            "mfu": flops / t / peak, "peak_rss_mb": rss, **pad, **extra}


# --------------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------------
def bench_training(w: Workload, size: str, args: Args, peaks: dict[str, float],
                   parts: set[str]) -> list[dict]:
    """SFT, RM, MetaRM (both orders, both implementations) steps on packed batches, each timed
    interleaved with the same step on the padded batch (before issue 15); fp32 and bf16."""
    out = []
    reps = args.repeats if size == "tiny" else max(2, args.repeats // 2)
    warm = args.warmup if size == "tiny" else 1
    sft_pad, sft_pack = w.sft_batch(), w.sft_packed()
    pairs = {"packed": w.pair_batch(), "padded": w.pair_batch(packed=False)}
    metas = {"packed": w.meta_batch(), "padded": w.meta_batch(packed=False)}
    for dtype in args.dtypes.split(","):
        bf16 = dtype == "bf16"
        peak = peaks[dtype]
        if "sft" in parts:
            torch.manual_seed(args.seed)
            model = AutoModelForCausalLM.from_pretrained(w.base, dtype=torch.float32)
            model.train()
            opt = adamw(model)
            reset_peak_rss()
            t = timed({"packed": lambda: sft_step(model, opt, sft_pack, bf16),
                       "padded": lambda: sft_step(model, opt, sft_pad, bf16)}, warm, reps)
            s, real = shape(model), int(sft_pad[1].sum())
            for key, label, batch in (("padded", "SFT (padded, before)", sft_pad[:2]),
                                      ("packed", "SFT", sft_pack[0])):
                out.append(row(label, size, dtype, t[key], 3 * batch_flops(s, batch), real, peak,
                               peak_rss_mb(), batch_tokens(batch)[1], batch=batch_shape(batch),
                               **({"speedup": statistics.median(t["padded"])
                                              / statistics.median(t["packed"])}
                                  if key == "packed" else {})))
            del model, opt
        if "rm" in parts or "meta" in parts:
            out += bench_rm_meta(w, size, dtype, args, pairs, metas, parts, reps, warm, peak)
    return out


def bench_rm_meta(w: Workload, size: str, dtype: str, args: Args, pairs: dict, metas: dict,
                  parts: set[str], reps: int, warm: int, peak: float) -> list[dict]:
    """The RM step and the meta steps (packed, and the padded RM step of before), all interleaved,
    so that every meta step's ratio to the vanilla RM step is taken within one repeat.
    (meta_rm.meta_gradient takes packed batches only since the layout of issue 19; the padded meta
    steps of before issue 15 are BENCHMARKS.md's 2026-12-02 rows, no longer re-measured.)"""
    bf16, out = dtype == "bf16", []
    torch.manual_seed(args.seed)
    model, _ = distributed.load_reward_model(w.base, 1, torch.device("cpu"))
    model.train()
    opt = adamw(model)
    s = shape(model)
    P_t, P_s = pairs["packed"], metas["packed"]
    ideal_t, ideal_s = real_flops(s, P_t.lengths.tolist()), real_flops(s, P_s.lengths.tolist())
    fns = {"rm": lambda: rm_step(model, opt, P_t, bf16),
           "rm_padded": lambda: rm_step(model, opt, pairs["padded"], bf16)}
    if "meta" in parts:
        fns["meta1"] = lambda: meta_step(model, opt, P_t, P_s, 1, bf16)
        fns["meta1_inplace"] = lambda: meta_step_inplace(model, opt, P_t, P_s, bf16)
        # its cost is one forward of X_s; measured on tiny only to keep the run short
        if size == "tiny":
            fns["meta1_log_adapted"] = lambda: meta_step(model, opt, P_t, P_s, 1, bf16,
                                                         measure=True)
    reset_peak_rss()
    t = timed(fns, warm, reps)
    rss = peak_rss_mb()
    tok_t, tok_s = P_t.real_tokens, P_s.real_tokens
    for key, label, batch in (("rm_padded", "RM (padded, before)", pairs["padded"]),
                              ("rm", "RM", P_t)):
        out.append(row(label, size, dtype, t[key], 3 * batch_flops(s, batch), tok_t, peak, rss,
                       batch_tokens(batch)[1], batch=batch_shape(batch),
                       **({"speedup": statistics.median(t["rm_padded"])
                                      / statistics.median(t["rm"])}
                          if key == "rm" else {})))
    if "meta" not in parts:
        return out
    for name, label, base in (("meta1", "MetaRM order 1 (functional)", "rm"),
                              ("meta1_inplace", "MetaRM order 1 (inplace)", "rm"),
                              ("meta1_log_adapted", "MetaRM order 1 + J(θ') log", "rm")):
        if name not in t:
            continue
        bt, bs = P_t, P_s
        ratios = [a / b for a, b in zip(t[name], t[base])]
        speedup = {}
        out.append(row(label, size, dtype, t[name], 3 * batch_flops(s, bs) + 3 * batch_flops(s, bt),
                       tok_t + tok_s, peak, rss, batch_tokens(bt)[1] + batch_tokens(bs)[1],
                       batch=f"{batch_shape(bt)} + {batch_shape(bs)}",
                       ratio=statistics.median(ratios),
                       ideal=(3 * ideal_s + 3 * ideal_t) / (3 * ideal_t), **speedup))
    del model, opt
    return out + bench_order2(w, size, dtype, args, pairs, metas, reps, peak)


def bench_order2(w: Workload, size: str, dtype: str, args: Args, pairs: dict, metas: dict,
                 reps: int, peak: float) -> list[dict]:
    """MetaRM order 2 and its vanilla reference. Order 2 needs eager attention (no double backward
    through the fused SDPA kernels), so the reference RM step is timed on the same eager model,
    interleaved (packed)."""
    bf16 = dtype == "bf16"
    torch.manual_seed(args.seed)
    eager, _ = distributed.load_reward_model(w.base, 1, torch.device("cpu"),
                                             attn_implementation="eager")
    eager.train()
    opt2 = adamw(eager)
    s = shape(eager)
    P_t, P_s = pairs["packed"], metas["packed"]
    fns = {"rm": lambda: rm_step(eager, opt2, P_t, bf16),
           "meta2": lambda: meta_step(eager, opt2, P_t, P_s, 2, bf16)}
    reset_peak_rss()
    t2 = timed(fns, 1, max(2, reps - 1) if size == "tiny" else 1)
    rss2 = peak_rss_mb()
    ideal_t, ideal_s = real_flops(s, P_t.lengths.tolist()), real_flops(s, P_s.lengths.tolist())
    tok = P_t.real_tokens + P_s.real_tokens
    out = [row("RM (eager attention)", size, dtype, t2["rm"], 3 * batch_flops(s, P_t),
               P_t.real_tokens, peak, rss2, P_t.computed_tokens, batch=batch_shape(P_t))]
    for name, label, (bt, bs) in (("meta2", "MetaRM order 2 (eager)", (P_t, P_s)),):
        if name not in t2:
            continue
        ratios = [a / b for a, b in zip(t2[name], t2["rm"])]
        out.append(row(label, size, dtype, t2[name],
                       9 * batch_flops(s, bs) + 3 * batch_flops(s, bt), tok, peak, rss2,
                       batch_tokens(bt)[1] + batch_tokens(bs)[1],
                       batch=f"{batch_shape(bt)} + {batch_shape(bs)}",
                       ratio=statistics.median(ratios),
                       ideal=(9 * ideal_s + 3 * ideal_t) / (3 * ideal_t),
                       **({"speedup": statistics.median(t2["meta2_padded"])
                                      / statistics.median(t2["meta2"])}
                          if name == "meta2" and "meta2_padded" in t2 else {})))
    return out


class ForwardCounter:
    """Forward hooks on the root modules: calls and rows per model
    (a check that no pass runs twice)."""

    def __init__(self, models: dict[str, torch.nn.Module]):
        self.counts = {name: {"calls": 0, "rows": 0} for name in models}
        self.handles = [m.register_forward_hook(self._hook(name), with_kwargs=True)
                        for name, m in models.items()]

    def _hook(self, name):
        def hook(module, a, kw, output):
            self.counts[name]["calls"] += 1
            self.counts[name]["rows"] += (kw["input_ids"].shape[0] if "input_ids" in kw
                                          else a[0].shape[0])
        return hook

    def take(self) -> dict[str, dict[str, int]]:
        out = {k: dict(v) for k, v in self.counts.items()}
        for v in self.counts.values():
            v.update(calls=0, rows=0)
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def bench_ppo(w: Workload, size: str, args: Args,
              peaks: dict[str, float]) -> tuple[list[dict], dict]:
    """PPO: rollout (generation), make_experience (steps 2-3), ppo_update (step 6) with the
    pipeline's sizes. Medium: 4 prompts x 4 rollouts, mini-batch 16
    (a full iteration of the default size costs ~20 s per repeat)."""
    out, checks = [], {}
    n_prompts = 16 if size == "tiny" else 4
    mini = 32 if size == "tiny" else 16
    pa = ppo.Args(rollouts_per_prompt=4, prompts_per_iteration=n_prompts, mini_batch_size=mini,
                  micro_batch_size=mini, max_new_tokens=32, ppo_epochs=2, generation_batch_size=64)
    reps = 3 if size == "tiny" else 2
    device = torch.device("cpu")
    for dtype in args.dtypes.split(","):
        pa.bf16 = dtype == "bf16"
        peak = peaks[dtype]
        torch.manual_seed(args.seed)
        policy = AutoModelForCausalLM.from_pretrained(w.base, dtype=torch.float32)
        ref = AutoModelForCausalLM.from_pretrained(w.base, dtype=torch.float32)
        rm, _ = distributed.load_reward_model(w.base, 1, device)
        critic, _ = distributed.load_reward_model(w.base, 1, device)
        for m in (policy, ref, rm, critic):
            m.eval()
        ref.requires_grad_(False)
        rm.requires_grad_(False)
        popt, copt = adamw(policy), adamw(critic)
        prompts = [p for p in w.ppo_prompts[:n_prompts] for _ in range(pa.rollouts_per_prompt)]
        gen = torch.Generator().manual_seed(0)
        counter = ForwardCounter({"policy": policy, "ref": ref, "rm": rm, "critic": critic})
        times: dict[str, list[float]] = {"gen": [], "exp": [], "update": []}
        reset_peak_rss()
        for r in range(1 + reps):  # the first iteration is the warm-up
            counter.take()
            t0 = time.perf_counter()
            batch = ppo.rollout(policy, w.tokenizer, prompts, pa, 1, device)
            t1 = time.perf_counter()
            gen_counts = counter.take()
            exp = ppo.make_experience(policy, ref, rm, critic, batch, pa, 1)
            ppo.compute_advantages(exp, batch, pa, 1, 0.0, 1.0)
            t2 = time.perf_counter()
            exp_counts = counter.take()
            ppo.ppo_update(policy, critic, popt, copt, batch, exp, pa, 1, gen)
            t3 = time.perf_counter()
            upd_counts = counter.take()
            if r > 0:
                times["gen"].append(t1 - t0)
                times["exp"].append(t2 - t1)
                times["update"].append(t3 - t2)
        rss = peak_rss_mb()
        counter.remove()
        out += ppo_rows(size, dtype, batch, shape(policy), shape(critic), pa, times, peak, rss)
        checks[f"{size}/{dtype}"] = {"rollouts": batch.input_ids.shape[0], "generation": gen_counts,
                                     "make_experience": exp_counts, "ppo_update": upd_counts,
                                     "response_len": batch.response.shape[1]}
        del policy, ref, rm, critic, popt, copt
    return out, checks


def ppo_rows(size: str, dtype: str, batch, sp: dict[str, int], sc: dict[str, int], pa,
             times: dict[str, list[float]], peak: float, rss: float) -> list[dict]:
    """The rows of PPO's three phases: FLOPs from the policy's (sp) and critic's (sc) shapes,
    real tokens counted."""
    B, P, R = batch.input_ids.shape[0], batch.prompt_len, batch.response.shape[1]
    new_tokens = int(batch.response_mask.sum())
    real = int(batch.attention_mask.sum())
    # the micro-batches ppo.py packs
    # (step 3 and step 6 use the same ones here: micro-batch = mini-batch = 32)
    packs = [ppo.pack_rollouts(batch.rows(slice(i, i + pa.micro_batch_size)),
                               torch.device("cpu")).packed
             for i in range(0, B, pa.micro_batch_size)]
    f_p, f_c = sum(batch_flops(sp, x) for x in packs), sum(batch_flops(sc, x) for x in packs)
    computed = sum(x.computed_tokens for x in packs)
    shapes = " + ".join(f"{x.input_ids.shape[0]} x {x.input_ids.shape[1]}" for x in packs)
    return [row("PPO generation (rollout)", size, dtype, times["gen"],
                generation_flops(sp, B, P, R), new_tokens, peak, rss, batch=f"{B} x ({P} + {R})",
                pad_before=1 - real / (B * (P + R))),
            row("PPO make_experience (4 fwd)", size, dtype, times["exp"], 2 * f_p + 2 * f_c,
                4 * real, peak, rss, 4 * computed, batch=f"4 models x {shapes} packed"),
            row("PPO ppo_update (2 epochs)", size, dtype, times["update"],
                pa.ppo_epochs * 3 * (f_p + f_c), 2 * pa.ppo_epochs * real, peak, rss,
                2 * pa.ppo_epochs * computed,
                batch=f"{pa.ppo_epochs} x (policy + critic) x {shapes} packed")]


def bench_generation(w: Workload, size: str, args: Args,
                     peaks: dict[str, float]) -> list[dict]:
    """Tokens/s of batched sampling with and without the KV cache (same kwargs as sampling.generate,
    a fixed number of new tokens so both runs do the same work)."""
    out = []
    policy = AutoModelForCausalLM.from_pretrained(w.base, dtype=torch.float32)
    policy.eval()
    prompts = [p for p in w.ppo_prompts for _ in range(4)][:64 if size == "tiny" else 16]
    ids, mask = data.pad([data.prompt_ids(w.tokenizer, p) for p in prompts],
                         w.tokenizer.pad_token_id, side="left")
    R = 32
    s = shape(policy)
    for dtype in args.dtypes.split(","):
        bf16 = dtype == "bf16"

        def sample(cache: bool):
            with torch.no_grad(), common.autocast(ids.device, bf16):
                return policy.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                       max_new_tokens=R, min_new_tokens=R, use_cache=cache,
                                       temperature=0.8, top_p=0.9, top_k=0, repetition_penalty=1.1,
                                       pad_token_id=w.tokenizer.pad_token_id,
                                       eos_token_id=w.tokenizer.eos_token_id)
        reset_peak_rss()
        sample(True)  # warm-up
        sample(False)
        t = timed({"cache": lambda: sample(True), "no_cache": lambda: sample(False)}, 0,
                  3 if size == "tiny" else 1)
        rss = peak_rss_mb()
        B, P = ids.shape
        for name, key, flops in (("generation, KV cache", "cache", generation_flops(s, B, P, R)),
                                 ("generation, no cache", "no_cache",
                                  generation_flops_no_cache(s, B, P, R))):
            out.append(row(name, size, dtype, t[key], flops, B * R, peaks[dtype], rss,
                           batch=f"{B} x ({P} + {R})",
                           speedup=(statistics.median(t["no_cache"])
                                    / statistics.median(t["cache"]))))
    return out


def bench_profile(w: Workload, args: Args) -> dict[str, Any]:
    """Where one medium bf16 RM step and one SFT step spend their time
    (torch.profiler, self CPU time by op)."""
    from torch.profiler import ProfilerActivity, profile

    categories = [("matmul", ("mm", "addmm", "bmm", "linear", "matmul", "_mkldnn", "mkldnn")),
                  ("attention (SDPA)", ("scaled_dot_product", "flash_attention")),
                  ("softmax / log_softmax / cross-entropy",
                   ("softmax", "nll_loss", "cross_entropy")),
                  ("optimizer (AdamW foreach) and grad clip", ("_foreach", "adam", "norm")),
                  ("dtype casts (autocast copies)", ("to_copy", "copy_", "_to_copy")),
                  ("elementwise (RMSNorm, SiLU, rotary, residual)",
                   ("mul", "add", "pow", "mean", "rsqrt", "silu", "neg", "cat", "sigmoid", "div",
                    "sub", "where", "sum", "exp"))]
    result = {}
    size_w = w
    for stage in ("RM", "SFT"):
        torch.manual_seed(args.seed)
        if stage == "RM":
            model, _ = distributed.load_reward_model(size_w.base, 1, torch.device("cpu"))
            batch = size_w.pair_batch()
            step = lambda: rm_step(model, opt, batch, True)
        else:
            model = AutoModelForCausalLM.from_pretrained(size_w.base, dtype=torch.float32)
            batch = size_w.sft_packed()
            step = lambda: sft_step(model, opt, batch, True)
        model.train()
        opt = adamw(model)
        step()
        step()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        wall = time.perf_counter() - t0
        shares: dict[str, float] = {}
        total = 0.0
        top = []
        for e in prof.key_averages():
            us = e.self_cpu_time_total
            total += us
            name = e.key.lower()
            cat = next((c for c, keys in categories if any(k in name for k in keys)),
                       "other (python, views, ...)")
            shares[cat] = shares.get(cat, 0.0) + us
            top.append((us, e.key))
        top.sort(reverse=True)
        result[stage] = {"wall_s_profiled": wall, "self_cpu_s": total / 1e6,
                         "shares": {k: v / total
                                    for k, v in sorted(shares.items(), key=lambda kv: -kv[1])},
                         "top_ops": [(k, us / total) for us, k in top[:8]]}
        del model, opt
    return result


# --------------------------------------------------------------------------------------------------
# World size 2 (torchrun, gloo, FSDP2) vs 1:
# SFT, RM and the inplace meta step on the same global batch
# --------------------------------------------------------------------------------------------------
def world_steps(w: Workload, world: int, rank: int, args: Args,
                size: str) -> dict[str, list[float]]:
    device = torch.device("cpu")
    half = lambda n: slice(rank * n // world, (rank + 1) * n // world)
    sft_ids = w.sft_packed(half(32))
    pair_ids, meta_ids = w.pair_batch(half(16)), w.meta_batch(half(16))
    torch.manual_seed(args.seed)
    lm = distributed.load_model(AutoModelForCausalLM, w.base, world, device)
    rm, _ = distributed.load_reward_model(w.base, world, device)
    lm.train()
    rm.train()
    o1, o2 = adamw(lm), adamw(rm)
    n_local = 16 // world
    reps = args.repeats if size == "tiny" else max(2, args.repeats // 2)
    return timed({"sft": lambda: sft_step(lm, o1, sft_ids, False, world),
                  "rm": lambda: rm_step(rm, o2, pair_ids, False),
                  "meta1_inplace": lambda: meta_step_inplace(rm, o2, pair_ids, meta_ids, False,
                                                             n_local, n_local)},
                 1, reps)


def worker(args: Args) -> None:
    rank, world, _ = distributed.init_distributed()
    torch.set_num_threads(1)
    results = {}
    for size in args.sizes.split(","):
        w = Workload(make_testbed(args.workdir, size, args.seed), args.seed)
        results[size] = world_steps(w, world, rank, args, size)
    if rank == 0:
        with open(os.path.join(args.workdir, "world2.json"), "w") as f:
            json.dump(results, f)


def bench_world2(args: Args) -> dict[str, Any]:
    """The same steps on 1 process (args.threads threads) and on 2 processes (1 thread each)."""
    out: dict[str, Any] = {}
    for size in args.sizes.split(","):
        w = Workload(make_testbed(args.workdir, size, args.seed), args.seed)
        out[size] = {"world1": world_steps(w, 1, 0, args, size)}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
           "--nproc_per_node=2", __file__, "--worker", "world2", "--sizes", args.sizes,
           "--workdir", args.workdir, "--repeats", str(args.repeats), "--seed", str(args.seed)]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    path = os.path.join(args.workdir, "world2.json")
    if proc.returncode != 0 or not os.path.isfile(path):
        print(proc.stdout[-2000:], proc.stderr[-3000:])
        return {"error": f"torchrun exited {proc.returncode}"}
    with open(path) as f:
        two = json.load(f)
    os.remove(path)
    for size in out:
        out[size]["world2"] = two[size]
    out["torchrun_wall_s"] = time.time() - t0
    return out


# --------------------------------------------------------------------------------------------------
# Two stages at once (issue 14): each its own process on the same cores, with torch's default
# thread count (what every stage had) or with the cores split between them (common.threads_for:
# the cores this process may use / LOCAL_WORLD_SIZE, or --threads)
# --------------------------------------------------------------------------------------------------
# tiny fp32 steps of the default pipeline's batches: many small ops, the worst case
CONCURRENT_STEPS = ("sft", "rm")


def concurrent_worker(args: Args) -> None:
    """One process of the concurrent part: --threads threads, the tiny SFT and RM steps timed;
    prints JSON."""
    torch.set_num_threads(args.threads)
    w = Workload(make_testbed(args.workdir, "tiny", args.seed), args.seed)
    torch.manual_seed(args.seed)
    lm = AutoModelForCausalLM.from_pretrained(w.base, dtype=torch.float32)
    rm, _ = distributed.load_reward_model(w.base, 1, torch.device("cpu"))
    lm.train()
    rm.train()
    o1, o2 = adamw(lm), adamw(rm)
    sft_ids, pair_ids = w.sft_batch(), w.pair_batch()
    times = timed({"sft": lambda: sft_step(lm, o1, sft_ids, False),
                   "rm": lambda: rm_step(rm, o2, pair_ids, False)},
                  args.warmup, args.repeats)
    print(json.dumps({k: statistics.median(v) for k, v in times.items()}), flush=True)


def bench_concurrent(args: Args) -> dict[str, Any]:
    """Median step times of one worker alone and of two started at once, at `before` threads each
    (torch's default when no stage set its threads: the machine's cores, os.cpu_count()) and at
    `after` (common.threads_for with 2 local processes: the cores this process may use, halved,
    at least 1). Each worker is its own process, so the two compete for the cores as two stages
    started by hand do."""
    make_testbed(args.workdir, "tiny", args.seed)  # once, before any worker starts
    cores = sorted(os.sched_getaffinity(0))
    before = os.cpu_count() or 1
    after = max(1, len(cores) // 2)
    cmd = [sys.executable, __file__, "--worker", "concurrent", "--workdir", args.workdir,
           "--repeats", str(max(args.repeats, 10)), "--warmup", str(args.warmup),
           "--seed", str(args.seed)]

    def run(threads: int, n: int) -> list[dict[str, float]]:
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"PYTHONPATH": ROOT}
        procs = [subprocess.Popen(cmd + ["--threads", str(threads)], stdout=subprocess.PIPE,
                                  text=True, env=env)
                 for _ in range(n)]
        outs = [p.communicate()[0] for p in procs]
        return [json.loads(o.strip().splitlines()[-1]) for o in outs]

    out: dict[str, Any] = {"cores": cores, "before_threads": before, "after_threads": after,
                           "load_before": os.getloadavg()}
    for name, threads, n in (("alone_before", before, 1), ("two_before", before, 2),
                             ("alone_after", after, 1), ("two_after", after, 2)):
        out[name] = run(threads, n)
        print(f"concurrent {name}: {threads} thread(s) x {n} process(es): {out[name]}", flush=True)
    out["load_after"] = os.getloadavg()
    return out


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def write_markdown(res: dict[str, Any], path: str) -> None:
    """BENCHMARKS.md: the machine, every table, and the hand-written reading kept from the file
    already there."""
    m = res["machine"]
    lines = [f"# Benchmarks (bench/stages.py, {m['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} (CPU), "
             f"{res['threads']} threads. "
             "Load average before / after the run: "
             f"{', '.join(f'{x:.2f}' for x in m['load_before'])} / "
             f"{', '.join(f'{x:.2f}' for x in m['load_after'])} (the run's own threads are in the "
             "second; on a machine shared with other jobs absolute times are noisy, ratios "
             "measured within one run less so). "
             f"Whole run: {res['wall_s']:.0f} s. "
             "No GPU numbers: this task had no GPU machine.", ""]
    # rows kept from an earlier run (see its note), when only part of the bench was rerun
    if res.get("carried"):
        lines += [res["carried"], ""]
    lines += (_peak_and_step_tables(res) + _ppo_profile_and_world2_tables(res)
              + trl_tables(TRL_JSON, res.get("peak")))
    # The hand-written reading of the numbers (from "## Reading" on)
    # is kept when the tables are regenerated.
    if os.path.isfile(path):
        with open(path) as f:
            old = f.read()
        if "\n## Reading" in old:
            lines.append(old[old.index("\n## Reading") + 1:].rstrip("\n"))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _peak_and_step_tables(res: dict[str, Any]) -> list[str]:
    """The matmul peak, one row per timed step, and the bf16 speed-ups."""
    lines: list[str] = []
    if "peak" in res:
        lines += ["## Matmul peak (the physical reference)", "",
                  "| dtype | GFLOP/s | best n (n x n @ n x n) |", "|---|---|---|"]
        for k, v in res["peak"].items():
            lines.append(f"| {k} | {v['flops'] / 1e9:.0f} | {v['n']} |")
        if "peak_other_threads" in res:
            o = res["peak_other_threads"]
            lines += ["", f"At {o['threads']} thread(s) in the same run: "
                          f"fp32 {o['fp32'] / 1e9:.0f}, bf16 {o['bf16'] / 1e9:.0f} GFLOP/s. "
                          f"MFU below is against the peak at {res['threads']} thread(s), "
                          "the count every step ran with."]
        lines.append("")
    if res.get("rows"):
        lines += ["## Steps", "",
                  "| stage | size | dtype | batch | pad | step s (median) | vs padded | "
                  "real tok/s | GFLOP/step | GFLOP/s | MFU | peak RSS MB | time / vanilla RM | "
                  "FLOP-ideal |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
            ideal = f"{r['ideal']:.2f}" if "ideal" in r else ""
            speedup = (f"{r['speedup']:.2f}x" if "speedup" in r and "generation" not in r["stage"]
                       else "")
            if "speedup" in r and r["stage"].endswith("KV cache"):
                ratio = f"cache speed-up {r['speedup']:.1f}x"
            pad = f"{100 * r['pad_share']:.0f}%" if "pad_share" in r else ""
            if "pad_before" in r:
                pad = f"{100 * r['pad_before']:.0f}% of (B, P + R)"
            lines.append(f"| {r['stage']} | {r['size']} | {r['dtype']} | {r['batch']} | {pad} | "
                         f"{r['step_s']:.4f} | {speedup} | {r['tokens_per_s']:.0f} | "
                         f"{r['flops'] / 1e9:.2f} | {r['flops_per_s'] / 1e9:.1f} | "
                         f"{100 * r['mfu']:.1f}% | {r['peak_rss_mb']:.0f} | {ratio} | {ideal} |")
        lines.append("")
        bf = {}
        for r in res["rows"]:
            bf.setdefault((r["stage"], r["size"]), {})[r["dtype"]] = r["step_s"]
        pairs = [(k, v) for k, v in bf.items() if "fp32" in v and "bf16" in v]
        if pairs:
            lines += ["bf16 autocast speed-up (fp32 step time / bf16 step time): " + "; ".join(
                f"{s} {z} {v['fp32'] / v['bf16']:.2f}x" for (s, z), v in pairs), ""]
    return lines


TRL_JSON = "bench/benchmarks_trl.json"  # written by bench/against_trl.py


def trl_tables(path: str, peak: dict[str, Any] | None = None) -> list[str]:
    """bench/against_trl.py's measurements (reward.py / ppo.py vs TRL's RewardTrainer / PPOTrainer),
    when present; with this run's matmul `peak`, the least time one PPO iteration's FLOPs need."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        t = json.load(f)
    a, wl = t["args"], t["workload"]
    lines = [f"## Against TRL (bench/against_trl.py, {t['date']}, {t['threads']} thread(s), "
             f"{a['repeats']} alternating repeats, {t['wall_s']:.0f} s)", "",
             f"Same 3.5M-parameter Llama, same token ids, {t['threads']} torch thread(s); "
             f"load average before / after {t['load_before'][0]:.2f} / {t['load_after'][0]:.2f}. "
             f"TRL: RewardTrainer from trl {t['versions'].get('rm', '?').split()[0]}, "
             f"PPOTrainer from trl {t['versions'].get('ppo', '?').split()[0]} "
             f"(transformers / torch: {' / '.join(t['versions'].get('rm', '? ? ?').split()[1:])}).",
             "",
             f"RM: {a['batch']} pairs per step, --max-len {a['max_len']}, "
             f"mean length {wl['mean_len']:.0f} tokens, "
             f"longest of a batch {wl['longest_mean']:.0f} on average, "
             f"{100 * wl['padding_share']:.0f} % of a padded batch is padding; "
             f"{a['rm_steps']} timed steps per run. PPO: {a['ppo_prompts']} prompts x 4 rollouts, "
             f"{a['ppo_new_tokens']} new tokens, 1 epoch, 1 mini-batch; "
             f"{a['ppo_iterations']} timed iterations per run.",
             "", "| step | dtype | contender | median s per step / iteration (each run) | "
             "TRL time / its time (per repeat) | real tok/s |", "|---|---|---|---|---|---|"]
    for key, runs in t["runs"].items():
        part, dtype = key.split("/")
        for name, rs in runs.items():
            meds = [r["median_s"] for r in rs]
            ratio = t.get("ratios", {}).get(f"{key}/{name}")
            label = trl_label(part, name, t)
            tps = (f"{wl['real_tokens_per_step'] / statistics.median(meds):.0f}" if part == "rm"
                   else "")
            lines.append(f"| {'RM step' if part == 'rm' else 'PPO iteration'} | {dtype} "
                         f"| {label} | " + ", ".join(f"{m:.3f}" for m in meds) + " | "
                         + (f"{min(ratio):.2f}–{max(ratio):.2f} "
                            f"(median {statistics.median(ratio):.2f})"
                            if ratio else "") + f" | {tps} |")
    return lines + [""] + ppo_parts_table(t) + ppo_floor(t, peak)


def ppo_floor(t: dict[str, Any], peak: dict[str, Any] | None) -> list[str]:
    """One ppo.py iteration's FLOPs (bench.against_trl.ppo_flops) at the matmul peak: no
    implementation of the same work on this machine is faster, so 3 x TRL is out of reach wherever
    this floor is above a third of TRL's time."""
    f = t.get("ppo_flops")
    if not f or not peak:
        return []
    total = f["experience"] + f["update"] + f["generation"]
    cells = []
    for dtype in ("fp32", "bf16"):
        trl = t["runs"].get(f"ppo/{dtype}", {}).get("trl")
        if trl and dtype in peak:
            med = statistics.median(r["median_s"] for r in trl)
            cells.append(f"{dtype}: at least {total / peak[dtype]['flops']:.3f} s at "
                         f"{peak[dtype]['flops'] / 1e9:.0f} GFLOP/s, against TRL's {med:.3f} s "
                         f"(a third: {med / 3:.3f} s)")
    return [f"FLOPs of one ppo.py iteration on the rollouts of its first run "
            f"({f['rollouts']} rollouts, {f['tokens']} tokens; counted on real tokens, "
            f"bench.against_trl.ppo_flops): experience {f['experience'] / 1e9:.1f}, "
            f"update {f['update'] / 1e9:.1f}, generation {f['generation'] / 1e9:.1f} GFLOP. "
            "At the matmul peak of the bench/stages.py run above — " + "; ".join(cells) + ".", ""]


def trl_label(part: str, name: str, t: dict[str, Any]) -> str:
    """The name of a bench/against_trl.py contender in the tables."""
    before = f"ppo.py before packing ({t.get('before_commit', '?')})"
    return {"ours": "reward.py (packed)" if part == "rm" else "ppo.py", "trl": "TRL",
            "ours_padded": "reward.py padded (before)", "ours_before": before}[name]


def ppo_parts_table(t: dict[str, Any]) -> list[str]:
    """Each part of a PPO iteration (bench/against_trl.py): the median over repeats of each run's
    median, and its share."""
    rows = [(key.split("/")[1], name, rs) for key, runs in t["runs"].items()
            if key.startswith("ppo/")
            for name, rs in runs.items() if all(r.get("parts") for r in rs)]
    if not rows:
        return []
    names = ("generation", "experience", "update", "other")
    lines = ["### Where a PPO iteration spends its time (the same runs)", "",
             "generation = sampling the rollouts (step 1); experience = the RM, policy, reference "
             "and critic forwards and the advantages (steps 2-5); update = step 6; other = the "
             "iteration's metrics (for TRL: everything that is not its `batch_generation`). "
             "Seconds: the median over repeats of each run's median, so the parts need not add up "
             "to the iteration exactly.", "",
             "| dtype | contender | iteration s | " + " | ".join(names) + " |",
             "|---|---|---|---|---|---|---|"]
    for dtype, name, rs in rows:
        total = statistics.median(r["median_s"] for r in rs)
        cells = []
        for k in names:
            v = [r["parts"][k] for r in rs if k in r["parts"]]
            cells.append(f"{statistics.median(v):.3f} s "
                         f"({100 * statistics.median(v) / total:.0f} %)" if v else "")
        lines.append(f"| {dtype} | {trl_label('ppo', name, t)} | {total:.3f} | "
                     + " | ".join(cells) + " |")
    return lines + [""]


def _ppo_profile_and_world2_tables(res: dict[str, Any]) -> list[str]:
    """PPO's forward-pass counts, the profiler's shares of a medium bf16 step, 1 process vs 2."""
    lines: list[str] = []
    if res.get("ppo_forward_counts"):
        lines += ["## PPO forward passes per iteration (forward hooks on the four root modules)",
                  "", "| run | rollouts | generation (policy calls) | "
                  "make_experience: calls / rows per model | ppo_update: calls / rows |",
                  "|---|---|---|---|---|"]
        for k, c in res["ppo_forward_counts"].items():
            me = ", ".join(f"{n} {v['calls']}/{v['rows']}" for n, v in c["make_experience"].items())
            up = ", ".join(f"{n} {v['calls']}/{v['rows']}" for n, v in c["ppo_update"].items()
                           if v["calls"])
            lines.append(f"| {k} | {c['rollouts']} | {c['generation']['policy']['calls']} "
                         f"(R = {c['response_len']}) | {me} | {up} |")
        lines.append("")
    if res.get("profile"):
        lines += ["## Where a medium bf16 step spends its time (torch.profiler, self CPU time)", ""]
        for stage, p in res["profile"].items():
            lines.append(f"- {stage} step ({p['wall_s_profiled']:.2f} s under the profiler): "
                         + ", ".join(f"{k} {100 * v:.0f}%" for k, v in p["shares"].items()))
            lines.append("  top ops: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in p["top_ops"]))
        lines.append("")
    if res.get("world2") and "error" not in res["world2"]:
        lines += [f"## 1 process ({res['threads']} thread(s)) vs 2 processes "
                  "(torchrun, gloo, FSDP2, 1 thread each), same global batch",
                  "", "| size | step | world 1 s | world 2 s | world 1 / world 2 |",
                  "|---|---|---|---|---|"]
        for size, v in res["world2"].items():
            if size == "torchrun_wall_s":
                continue
            for step in v["world1"]:
                a, b = statistics.median(v["world1"][step]), statistics.median(v["world2"][step])
                lines.append(f"| {size} | {step} (fp32) | {a:.4f} | {b:.4f} | {a / b:.2f} |")
        lines.append("")
    if res.get("concurrent"):
        lines += _concurrent_table(res["concurrent"])
    return lines


def _concurrent_table(c: dict[str, Any]) -> list[str]:
    """Two stages at once: per-step medians alone and side by side,
    before and after the threads rule."""
    lines = [f"## Two stages at once ({c['date']}; cores this run could use: {c['cores']}; "
             f"load average before / after: {', '.join(f'{x:.2f}' for x in c['load_before'])} / "
             f"{', '.join(f'{x:.2f}' for x in c['load_after'])})", "",
             "Each worker is its own process (tiny fp32 steps, the default pipeline's batches). "
             f"Before: {c['before_threads']} thread(s) each, torch's default when no stage set its "
             f"threads (the machine's cores). After: {c['after_threads']} thread(s) each, what "
             "common.threads_for gives two processes on these cores (taskset halves, torchrun's "
             "LOCAL_WORLD_SIZE or --threads).", "",
             "| step | alone, before | two at once, before (each) | alone, after | "
             "two at once, after (each) | two at once: before / after |",
             "|---|---|---|---|---|---|"]
    for step in CONCURRENT_STEPS:
        two_before = max(r[step] for r in c["two_before"])
        two_after = max(r[step] for r in c["two_after"])
        lines.append(f"| {step} (tiny, fp32) | {c['alone_before'][0][step]:.4f} s | "
                     f"{two_before:.4f} s | {c['alone_after'][0][step]:.4f} s | "
                     f"{two_after:.4f} s | {two_before / two_after:.1f}x |")
    return lines + [""]


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(Args, argv)
    os.makedirs(args.workdir, exist_ok=True)
    if args.worker == "world2":
        worker(args)
        return
    if args.worker == "concurrent":
        concurrent_worker(args)
        return
    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    t_start = time.time()
    res: dict[str, Any] = {"machine": machine(), "threads": args.threads,
                           "args": dataclasses.asdict(args), "rows": []}
    peaks = {"fp32": math.nan, "bf16": math.nan}  # MFU is not known unless the peak part ran
    if "peak" in parts:
        res["peak"] = {"fp32": matmul_peak(torch.float32, 10),
                       "bf16": matmul_peak(torch.bfloat16, 10)}
        peaks = {k: v["flops"] for k, v in res["peak"].items()}
        other = 2 if args.threads == 1 else 1  # the peak at the other thread count, for reference
        torch.set_num_threads(other)
        res["peak_other_threads"] = {"threads": other,
                                     "fp32": matmul_peak(torch.float32, 5)["flops"],
                                     "bf16": matmul_peak(torch.bfloat16, 5)["flops"]}
        torch.set_num_threads(args.threads)
        print("peak GFLOP/s: " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items()),
              flush=True)
    res["ppo_forward_counts"] = {}
    for size in args.sizes.split(","):
        w = Workload(make_testbed(args.workdir, size, args.seed), args.seed)
        stages: list[tuple[str, Callable[[], Any]]] = []
        if parts & {"sft", "rm", "meta"}:
            stages.append(("training", lambda: res["rows"].extend(
                bench_training(w, size, args, peaks, parts))))
        if "ppo" in parts:
            def run_ppo():
                rows, checks = bench_ppo(w, size, args, peaks)
                res["rows"].extend(rows)
                res["ppo_forward_counts"].update(checks)
            stages.append(("ppo", run_ppo))
        if "gen" in parts:
            stages.append(("gen", lambda: res["rows"].extend(
                bench_generation(w, size, args, peaks))))
        if "profile" in parts and size == "medium":
            stages.append(("profile", lambda: res.__setitem__("profile", bench_profile(w, args))))
        for name, fn in stages:
            t0 = time.time()
            n = len(res["rows"])
            fn()
            for r in res["rows"][n:]:
                print(f"{r['stage']:32s} {r['size']:6s} {r['dtype']} {r['step_s']:.4f} s  "
                      f"MFU {100 * r['mfu']:.1f}%"
                      + (f"  ratio {r['ratio']:.2f} (ideal {r['ideal']:.2f})" if "ratio" in r
                         else ""), flush=True)
            print(f"[{size} {name}: {time.time() - t0:.0f} s, load {os.getloadavg()[0]:.2f}]",
                  flush=True)
    if "world2" in parts:
        t0 = time.time()
        res["world2"] = bench_world2(args)
        print(f"[world2: {time.time() - t0:.0f} s] {json.dumps(res['world2'])[:400]}", flush=True)
    if "concurrent" in parts:
        t0 = time.time()
        res["concurrent"] = {**bench_concurrent(args),
                             "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}
        print(f"[concurrent: {time.time() - t0:.0f} s]", flush=True)
    res["machine"]["load_after"] = os.getloadavg()
    res["wall_s"] = time.time() - t_start
    # the parts measured now replace theirs, the rest stays
    if args.merge and os.path.isfile(args.out_json):
        with open(args.out_json) as f:
            old = json.load(f)
        measured = {"concurrent": "concurrent", "world2": "world2", "profile": "profile",
                    "peak": "peak"}
        res = {**old, **{key: res[key] for part, key in measured.items()
                         if part in parts and key in res}}
    with open(args.out_json, "w") as f:
        json.dump(res, f, indent=1)
    write_markdown(res, args.out_md)
    print(f"wrote {args.out_md} and {args.out_json} ({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    common.run_main(main)
