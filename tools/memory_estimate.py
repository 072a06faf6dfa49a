"""Per-GPU memory estimator for the stages of this repository (sft, reward, meta_rm, ppo, dpo,
meta_data).

From a Hugging Face config (a dict), the world size, micro-batch and sequence lengths, `estimate`
says how many bytes each GPU needs at the peak of a stage, part by part. Everything is arithmetic on
the config: nothing is loaded, nothing of the project is imported.

    python -m tools.memory_estimate --config llama-2-7b --stage ppo --world 8 --micro-batch 4 \\
        --seq-len 1024 --prompt-len 512 --new-tokens 512
    python -m tools.memory_estimate --config path/to/config.json --stage all

The table has two columns per stage:
  BEFORE  what the code does today with --bf16: torch.autocast only. FSDP2 all-gathers fp32 weights;
          autocast's bf16 cast of every weight is saved for backward (so each layer's full bf16 copy
          lives until backward); the frozen models (PPO's reference and RM, DPO's reference) are
          fp32; no activation checkpointing; generation on the sharded model, under autocast (whose
          cast cache keeps a bf16 copy of every trainable weight alive for the whole generate call),
          with the KV cache's keys in fp32 (rotary's cos/sin are fp32) and values in bf16.
  AFTER   FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): fp32 master shards, bf16
          all-gathers freed after each layer, bf16 activations; frozen models in bf16; activation
          checkpointing per decoder layer; PPO generation on an unsharded bf16 copy of the policy.

What every number assumes (also in the docstrings below):
  - Worst-case shapes: every sequence is --seq-len long (PPO: prompt-len + new-tokens), packed one
    per row (rows = sequences, row length C = the sequence length), and every token of an SFT/DPO
    sequence is a target (the LM head runs on all of them). Real batches are shorter; these are
    upper bounds.
  - Packed rows hold a block-diagonal mask (packing.py: attention_mask=None, positions restart), so
    SDPA gets a boolean mask: on GPU this rules out the flash kernel; the memory-efficient kernel
    runs instead, which saves O(T) per token (q, k, v, output, log-sum-exp) plus the mask, converted
    to the compute dtype, once PER LAYER. With a mask, transformers repeats K/V to all heads
    (repeat_kv) before SDPA, so GQA saves no activation memory. attention="sdpa" models exactly that
    (it is also what the CPU runs: its flash kernel saves the same tensors, which is what
    tests/test_memory_estimate.py measures). attention="eager" (meta_rm --meta-order 2 loads the
    model with eager attention) saves the (H, C, C) attention probabilities per layer.
  - FSDP2 keeps two decoder layers all-gathered at a time (the running one and the next, prefetched)
    and, in backward, two layers' unsharded gradients; the root's parameters (embeddings, final
    norm, head) stay gathered from the root's forward to the end of backward (and, for no-grad
    forwards, until `reshard`).
  - AdamW: two fp32 states per parameter, sharded; its foreach step makes one temporary the size of
    the shards.
  - A fixed 1 GiB of runtime (CUDA context, NCCL and cuBLAS workspaces) and a 10 % allocator margin
    (fragmentation of PyTorch's caching allocator) on everything else. "Fits on 80 GB" compares with
    81,559 MiB (what an H100 80GB reports).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

GiB = 2**30
FP32, BF16, INT64 = 4, 2, 8
RUNTIME_BYTES = 1 * GiB  # CUDA context + NCCL buffers + cuBLAS workspace, per process (assumed)
ALLOCATOR_MARGIN = 0.10  # fragmentation of the caching allocator (assumed)
GPU_80GB = 81_559 * 2**20  # what an H100 80GB reports (nvidia-smi: 81559 MiB)
STAGES = ("sft", "reward", "meta_rm", "ppo", "dpo", "meta_data")
PRECISIONS = ("fp32", "autocast", "mixed")

# Built-in configs: the fields that matter, as in the public config.json files (no hub access
#   needed).
BUILTIN_CONFIGS: dict[str, dict] = {
    "llama-2-7b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
    ),
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    ),
    "smollm2-135m": dict(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
}


# -------------------------------------------------------------------------------------------------
# The architecture, read from any HF decoder config (Llama / Qwen2 / Mistral keys, or GPT-2's)
# -------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Arch:
    kind: str  # "llama" (Llama, Qwen2, Mistral, SmolLM2: RMSNorm, rotary, SiLU MLP) or "gpt2"
    d: int  # hidden size
    f: int  # MLP intermediate size
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool  # lm_head shares the embedding matrix
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    positions: int  # GPT-2's learned position table (0 for rotary models)


def arch(config: dict) -> Arch:
    """The sizes `estimate` needs, from a config.json dict. GPT-2 keys (n_embd, n_layer, n_head,
    n_inner) are read when model_type is gpt2 or hidden_size is absent; everything else is read as a
    Llama-style decoder. Qwen2 has biases on q/k/v (hard-coded in transformers); Llama's
    `attention_bias` puts them on q/k/v/o, `mlp_bias` on the MLP."""
    c = config
    if c.get("model_type") == "gpt2" or ("hidden_size" not in c and "n_embd" in c):
        d = c.get("n_embd", 768)
        heads = c.get("n_head", 12)
        return Arch(
            "gpt2",
            d,
            c.get("n_inner") or 4 * d,
            c.get("n_layer", 12),
            heads,
            heads,
            d // heads,
            c.get("vocab_size", 50257),
            c.get("tie_word_embeddings", True),
            True,
            True,
            True,
            c.get("n_positions", 1024),
        )
    d, heads = c["hidden_size"], c["num_attention_heads"]
    qwen2 = c.get("model_type") == "qwen2"
    attention_bias = bool(c.get("attention_bias", False))
    return Arch(
        "llama",
        d,
        c["intermediate_size"],
        c["num_hidden_layers"],
        heads,
        c.get("num_key_value_heads") or heads,
        c.get("head_dim") or d // heads,
        c["vocab_size"],
        bool(c.get("tie_word_embeddings", False)),
        qwen2 or attention_bias,
        attention_bias,
        bool(c.get("mlp_bias", False)),
        0,
    )


def parameter_counts(config: dict, head: str = "lm", num_labels: int = 1) -> dict[str, int]:
    """Exact parameter counts of AutoModelForCausalLM (head="lm") or
    AutoModelForSequenceClassification (head="score", `num_labels` outputs, no bias) built from
    `config`:
        layer         parameters of one decoder layer (an FSDP2 unit)
        layer_matmul  of those, the weights used in matmuls (what autocast casts to bf16 and saves)
        root          the rest, FSDP2's root unit: embeddings (+ GPT-2's position table), final
                      norm, head
        head_matmul   the head's weight (lm_head, or the tied embedding used as one; or score)
        total
    """
    a = arch(config)
    d, f, hd = a.d, a.f, a.head_dim
    if a.kind == "gpt2":
        matmul = d * 3 * d + d * d + 2 * d * f  # c_attn, attn c_proj, c_fc, mlp c_proj
        layer = matmul + 3 * d + d + f + d + 4 * d  # their biases; ln_1 and ln_2 (weight + bias)
        embed, final_norm = a.vocab * d + a.positions * d, 2 * d
    else:
        q, kv = a.heads * hd, a.kv_heads * hd
        matmul = d * q + 2 * d * kv + q * d + 3 * d * f  # q, k, v, o; gate, up, down
        bias = (
            (q + 2 * kv if a.qkv_bias else 0)
            + (d if a.o_bias else 0)
            + (2 * f + d if a.mlp_bias else 0)
        )
        layer = matmul + bias + 2 * d  # + input and post-attention RMSNorm
        embed, final_norm = a.vocab * d, d
    if head == "lm":
        head_params = 0 if a.tied else a.vocab * d
        head_matmul = a.vocab * d
    elif head == "score":
        head_params = head_matmul = num_labels * d
    else:
        raise ValueError(f"head must be 'lm' or 'score', not {head!r}")
    root = embed + final_norm + head_params
    return dict(
        layer=layer,
        layer_matmul=matmul,
        layers=a.layers * layer,
        root=root,
        embed=embed,
        head_matmul=head_matmul,
        total=root + a.layers * layer,
    )


# -------------------------------------------------------------------------------------------------
# Activations saved for backward: the analytical model (checked against measured bytes on CPU by
# tests/test_memory_estimate.py)
# -------------------------------------------------------------------------------------------------
def _norm_bytes(d: int, precision: str, consumers: int) -> int:
    """Bytes per token that one LlamaRMSNorm (and the cast of its output for the `consumers` linears
    that read it;
    0 for the final norm, whose output is only indexed) saves for backward. The norm is
        x32 = x.to(fp32); var = x32.pow(2).mean(-1); r = rsqrt(var + eps); h = x32 * r; out = w *
        h.to(x.dtype)
    pow and mul save x32, rsqrt saves r (1 fp32 per token), w * h saves h (w is a parameter).
      fp32      x is fp32 (x32 is x): x 4d + r 4 + h 4d; the linears read `out` itself: + 4d (one
                storage).
      autocast  the residual stream stays fp32 (fp32 embeddings + bf16 attention output promote to
                fp32), the norm runs in fp32: x 4d + r 4 + h 4d; `out` (fp32) is not saved, but
                every linear casts it to bf16 itself (autocast caches casts of leaf weights only): +
                2d per consumer (3 for q/k/v, 2 for gate/up).
      mixed     x is bf16 and not saved; x32 is a fresh fp32 copy: 4d + r 4 + h.to(bf16) 2d; the
                linears read
                the bf16 `out`: + 2d."""
    if precision == "fp32":
        return 4 * d + 4 + 4 * d + (4 * d if consumers else 0)
    if precision == "autocast":
        return 4 * d + 4 + 4 * d + consumers * 2 * d
    return 4 * d + 4 + 2 * d + (2 * d if consumers else 0)


def _compute_bytes(precision: str) -> int:
    """Bytes of an element a matmul produces: fp32, or bf16 under autocast and mixed."""
    return FP32 if precision == "fp32" else BF16


def layer_saved_per_token(
    a: Arch, precision: str, attention: str = "sdpa", masked: bool = True, row_len: int = 0
) -> dict[str, int]:
    """Bytes per token that one decoder layer saves for backward, without checkpointing, by part.

    HF's LlamaDecoderLayer: x -> input_layernorm -> q/k/v_proj -> rotary -> attention -> o_proj -> +
    x -> h1 -> post_attention_layernorm -> gate/up_proj -> SiLU(gate) * up -> down_proj -> + h1.
    With b the compute dtype's bytes (4 fp32; 2 under autocast and mixed), H heads, K key/value
    heads, hd the head dim:
      norms      `_norm_bytes` twice (the second norm's x is h1, the residual after attention)
      attention  rotary: q * cos and rotate_half(q) * sin save cos and sin (shared by all layers:
                 counted once in `activation_bytes`), not q. SDPA (CPU flash / GPU memory-efficient
                 kernel) saves q, k, v and its output (b each; under autocast SDPA casts its inputs
                 to bf16 and those casts are saved, the fp32 rotary outputs are not) and the
                 log-sum-exp (H fp32). o_proj reads SDPA's output (already in (T, H, hd) layout:
                 .contiguous() copies nothing) and saves that same storage. With a mask (packed
                 rows), transformers repeats k and v to H heads before SDPA: they are saved at H
                 heads.
                 The boolean mask is converted to a b-byte float mask inside SDPA, once per layer,
                 and saved: row_len (C) elements per token.
                 eager (meta_rm order 2): q, k and v (repeated to H), softmax's output (fp32,
                 dtype=float32) and, under bf16, its bf16 copy (.to(query.dtype)) that the second
                 matmul saves, and the output made contiguous for o_proj; the additive mask is not
                 saved.
      mlp        gate and up outputs (SiLU saves its input, the product saves both factors), SiLU's
                 output and the product (down_proj's input): 4 f b. The residual adds save nothing.
    """
    if a.kind == "gpt2":
        return _gpt2_layer_saved_per_token(a, precision, attention, masked, row_len)
    b = _compute_bytes(precision)
    H, hd = a.heads, a.head_dim
    kv = H if (masked or attention == "eager") else a.kv_heads
    parts = dict(
        norms=_norm_bytes(a.d, precision, 3) + _norm_bytes(a.d, precision, 2), mlp=4 * a.f * b
    )
    if attention == "sdpa":
        parts["attention"] = (2 * H + 2 * kv) * hd * b + H * FP32
        parts["mask"] = row_len * b if masked else 0
    elif attention == "eager":
        probs = (
            FP32 if b == FP32 else FP32 + b
        )  # fp32: the softmax output itself; bf16: + its bf16 copy
        parts["attention"] = 4 * H * hd * b + H * row_len * probs
        parts["mask"] = 0
    else:
        raise ValueError(f"attention must be 'sdpa' or 'eager', not {attention!r}")
    return parts


def _gpt2_layer_saved_per_token(
    a: Arch, precision: str, attention: str, masked: bool, row_len: int
) -> dict[str, int]:
    """GPT-2 block, APPROXIMATE (not measured): LayerNorm saves x, mean and rstd; c_attn's input; q,
    k, v, output and log-sum-exp in SDPA; c_proj's input; the MLP saves c_fc's output, about four
    f-sized tensors inside gelu_new's Python formula (x, x³, tanh, ...) and c_proj's input. Same
    dtype rules as Llama's."""
    b, r = _compute_bytes(precision), (BF16 if precision == "mixed" else FP32)
    d, f, H = a.d, a.f, a.heads
    norms = 2 * (r * d + 8 + b * d)
    attn = 4 * d * b + H * FP32 + (H * row_len * (FP32 + b) if attention == "eager" else 0)
    return dict(
        norms=norms,
        attention=attn,
        mlp=6 * f * b,
        mask=row_len * b if (masked and attention == "sdpa") else 0,
    )


def activation_bytes(
    config: dict,
    *,
    rows: int,
    row_len: int,
    head_positions: int,
    head: str,
    precision: str,
    grad_checkpointing: bool = False,
    attention: str = "sdpa",
    masked: bool = True,
) -> dict[str, int]:
    """Bytes saved for backward by one forward of the stages' packed code path (packing.hidden, then
    the head at `head_positions` rows of the final hidden state), by part. `rows` x `row_len` = T
    computed tokens.

    head: "score"  reward.packed_rewards: the score head on S = head_positions sequences' last token
          "lm"     sft.packed_loss_sum, ppo.response_logits + logprobs_and_entropy,
                   packing.response_logprobs: the LM head on N = head_positions tokens, logits cast
                   to fp32, log_softmax
    Parts:
      layers        L x T x `layer_saved_per_token` (checkpointing: only each layer's input, the
                    residual stream: fp32 under fp32/autocast, bf16 under mixed)
      inputs        input_ids (int64, saved by the embedding) and rotary's cos and sin (T x hd each,
                    in the residual stream's dtype; shared by all layers). Under checkpointing cos,
                    sin and the mask are held by the checkpoint's closure, not saved: see
                    `held_by_checkpoint`
      final_norm    the final RMSNorm (its output is only indexed, so not saved)
      head          the head's input: the indexed hidden states (N x d, cast to bf16 under autocast)
                    and the int64 index; for "lm" also log_softmax's fp32 output (N x V) and the
                    int64 targets
    Not included: parameters, and autocast's bf16 weight casts (`estimate` counts them as their own
    part).
    """
    a = arch(config)
    T = rows * row_len
    b = _compute_bytes(precision)
    r = BF16 if precision == "mixed" else FP32
    out: dict[str, int] = {}
    if grad_checkpointing:
        out["layers"] = a.layers * T * a.d * r
        out["inputs"] = T * INT64
    else:
        per = layer_saved_per_token(a, precision, attention, masked, row_len)
        out["layers"] = a.layers * T * (per["norms"] + per["attention"] + per["mlp"])
        out["mask"] = a.layers * T * per["mask"]
        rope = 0 if a.kind == "gpt2" else 2 * T * a.head_dim * r
        out["inputs"] = T * INT64 + rope
    if a.kind == "gpt2":
        out["final_norm"] = T * (r * a.d + 8)
    else:
        out["final_norm"] = T * _norm_bytes(a.d, precision, 0)
    N = head_positions
    out["head"] = N * a.d * b + N * INT64
    if head == "lm":
        out["head"] += N * a.vocab * FP32 + N * INT64
    return out


def held_by_checkpoint(
    config: dict, *, rows: int, row_len: int, precision: str, masked: bool = True
) -> int:
    """Under checkpointing, what the checkpoint keeps without saving it: rotary's cos and sin and
    the boolean block-diagonal mask (rows x C x C bytes), passed to every layer as keyword
    arguments."""
    a = arch(config)
    r = BF16 if precision == "mixed" else FP32
    return 2 * rows * row_len * a.head_dim * r + (rows * row_len * row_len if masked else 0)


def layer_recompute_bytes(
    config: dict,
    *,
    rows: int,
    row_len: int,
    precision: str,
    attention: str = "sdpa",
    masked: bool = True,
) -> int:
    """Checkpointing: in backward one layer at a time is recomputed with its full saved activations
    (plus its
    float mask): what a non-checkpointed layer saves."""
    a = arch(config)
    per = layer_saved_per_token(a, precision, attention, masked, row_len)
    return rows * row_len * sum(per.values())


def autocast_weight_copies(config: dict, head: str, grad_checkpointing: bool = False) -> int:
    """Before (autocast): the bf16 casts of the matmul weights (all layers' q/k/v/o/gate/up/down and
    the head) that a training forward saves for backward, so the whole model's bf16 copy (not
    sharded: casts of the all-gathered weights) lives until backward. With checkpointing only the
    head's cast is saved (a layer's casts are redone when it is recomputed); but autocast's cast
    cache still holds every layer's cast until the autocast block exits at the end of the forward,
    so `estimate` counts the full copy either way. The same copies are what the cache keeps during a
    no-grad forward or a whole generate() of a model whose weights require grad."""
    p = parameter_counts(config, head)
    layers = 0 if grad_checkpointing else arch(config).layers * p["layer_matmul"]
    return BF16 * (layers + p["head_matmul"])


# -------------------------------------------------------------------------------------------------
# Stages
# -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Options:
    """Everything `estimate` takes besides the config and the stage (see the module docstring for
    BEFORE/AFTER).

    world           processes (GPUs); FSDP2 shards when > 1
    micro_batch     per process and forward: SFT sequences; RM, MetaRM and DPO pairs (2 sequences
                    each); MetaRM prompts (k sequences each); PPO rollouts
    seq_len         longest sequence (SFT/RM/MetaRM/DPO --max-len)
    prompt_len      PPO and meta_data prompt length (the cap)
    new_tokens      PPO and meta_data --max-new-tokens
    gen_batch       sequences per generate() call (PPO --generation-batch-size, meta_data
                    --batch-size)
    precision       fp32 | autocast (before, --bf16 today) | mixed (after)
    frozen_bf16     frozen models (PPO reference and RM, DPO reference) held in bf16
    gen_unsharded   PPO generation on an unsharded bf16 copy of the policy (after)
    meta_route      inplace | gathered (meta_rm's routes under FSDP2; at world 1 the functional
                    code)
    meta_order      1 | 2 (order 2 needs the gathered route and eager attention)
    measure_adapted meta_rm --log-adapted-every 1 (the default): the gathered route's
                    mechanism_stats holds one more full gradient
    k               responses per MetaRM prompt
    attention       sdpa (what the stages run; GPU: memory-efficient kernel because of the packed
                    mask) | eager
    masked          packed rows carry a block-diagonal mask (the usual case; False: one sequence per
                    row)
    """

    world: int = 8
    micro_batch: int = 4
    seq_len: int = 1024
    prompt_len: int = 512
    new_tokens: int = 512
    gen_batch: int = 64
    precision: str = "mixed"
    grad_checkpointing: bool = False
    frozen_bf16: bool = False
    gen_unsharded: bool = False
    meta_route: str = "inplace"
    meta_order: int = 1
    measure_adapted: bool = True
    k: int = 5
    attention: str = "sdpa"
    masked: bool = True


BEFORE = dict(
    precision="autocast", grad_checkpointing=False, frozen_bf16=False, gen_unsharded=False
)
AFTER = dict(precision="mixed", grad_checkpointing=True, frozen_bf16=True, gen_unsharded=True)


class _Model:
    """One model of a stage: its parameter counts and how FSDP2 holds it on one GPU."""

    def __init__(self, config: dict, head: str, o: Options, trained: bool):
        self.config, self.head, self.o, self.trained = config, head, o, trained
        self.p = parameter_counts(config, head)
        self.a = arch(config)
        self.frozen_bf16 = (not trained) and o.frozen_bf16

    @property
    def shard_bytes(self) -> int:
        """Parameters on this GPU: fp32 master shards (frozen models in bf16 when frozen_bf16)."""
        return (BF16 if self.frozen_bf16 else FP32) * self.p["total"] // self.o.world

    def gather_bytes(self) -> int:
        """Bytes per all-gathered element: bf16 under mixed precision or for a bf16 frozen
        model, else fp32."""
        return BF16 if (self.o.precision == "mixed" or self.frozen_bf16) else FP32

    def in_flight(self, backward: bool, root: bool = True) -> int:
        """All-gathered parameters in flight: the root (embeddings, final norm, head: gathered from
        the root's forward to the end of backward) and two layers (the running one and the next,
        prefetched). In backward also two layers' unsharded gradients (the one computed and the one
        being reduce-scattered; mixed: bf16 plus the fp32 copy the reduce-scatter reads) and the
        head's unsharded gradient, computed first and reduce-scattered with the root's at the very
        end (when the activations are gone: that last moment, the embedding's gradient and the
        root's reduce-scatter buffer, is smaller than the start of backward and is not modelled).
        Nothing at world size 1 (the parameters themselves are the full model). `root=False`: the
        root is counted elsewhere (PPO's experience phase keeps all four roots gathered).
        """
        if self.o.world == 1:
            return 0
        g = self.gather_bytes()
        out = g * ((self.p["root"] if root else 0) + 2 * self.p["layer"])
        if backward:
            mixed = self.o.precision == "mixed"
            out += (BF16 + FP32 if mixed else FP32) * 2 * self.p["layer"]
            out += (BF16 if mixed else FP32) * self.p["head_matmul"]
        return out

    def weight_copies(self) -> int:
        """autocast only: the bf16 weight casts, saved (training) or cached (no-grad forward of a
        model whose
        weights require grad); frozen models (requires_grad False) are not cached."""
        if self.o.precision != "autocast" or not self.trained:
            return 0
        return autocast_weight_copies(self.config, self.head)

    def activations(self, sequences: int, length: int, head_positions: int) -> dict[str, int]:
        """Saved activations of one forward (+ what lives beside them at the peak) for `sequences`
        rows of `length` tokens: the saved bytes, the checkpointed layer recomputed in backward, the
        hidden-state tuple (`packing.hidden` asks for output_hidden_states: under mixed precision,
        without checkpointing, the bf16 layer outputs are not otherwise saved, and live until the
        forward returns)."""
        o = self.o
        act = activation_bytes(
            self.config,
            rows=sequences,
            row_len=length,
            head_positions=head_positions,
            head=self.head,
            precision=o.precision,
            grad_checkpointing=o.grad_checkpointing,
            attention=o.attention,
            masked=o.masked,
        )
        head_logits = act.pop("head")
        out = {"activations (saved)": sum(act.values()), "head inputs": head_logits}
        if o.grad_checkpointing:
            out["activations (saved)"] += held_by_checkpoint(
                self.config, rows=sequences, row_len=length, precision=o.precision, masked=o.masked
            )
            out["recompute (1 layer)"] = layer_recompute_bytes(
                self.config,
                rows=sequences,
                row_len=length,
                precision=o.precision,
                attention=o.attention,
                masked=o.masked,
            )
        elif o.precision == "mixed":
            out["hidden-state tuple"] = self.a.layers * sequences * length * self.a.d * BF16
        return out


def _logits_train(n: int, vocab: int) -> int:
    """The (N, V) logits of a training forward + backward, at their peak: log_softmax's saved fp32
    output is in `head inputs`; beside it, in forward, the fp32 logits (`.float()`; ppo's also
    divided by the temperature: one more) or, in backward, the gradient arriving at log_softmax's
    output and the one it returns: two more fp32 (N, V) tensors."""
    return 2 * n * vocab * FP32


def _phase_total(parts: dict[str, int]) -> int:
    return sum(v for k, v in parts.items() if not k.startswith("_"))


PART_ORDER = (
    "params (fp32 shards)",
    "grads (fp32 shards)",
    "AdamW states (2 fp32)",
    "AdamW step temporary",
    "frozen models (shards)",
    "meta: θ backup (shards)",
    "meta: full θ (fp32)",
    "meta: ∇J (raw + averaged)",
    "meta: full θ, ∇J, θ', ∇L (fp32)",
    "meta: J backward graph (order 2)",
    "meta: J graph kept (order 2)",
    "gathered roots (4 models)",
    "gathered params in flight",
    "gathered params + grads in flight",
    "unsharded bf16 policy",
    "autocast weight copies",
    "activations (saved)",
    "hidden-state tuple",
    "recompute (1 layer)",
    "forward working set (1 layer)",
    "head inputs",
    "logits (N x V fp32)",
    "KV cache",
    "prefill / sampling buffers",
)


def _finish(parts: dict[str, int]) -> dict[str, int]:
    """Order the parts (PART_ORDER), add the allocator margin, the runtime and the total."""
    rank = {k: i for i, k in enumerate(PART_ORDER)}
    parts = {
        k: int(v) for k, v in sorted(parts.items(), key=lambda kv: rank.get(kv[0], len(rank))) if v
    }
    allocated = sum(parts.values())
    parts["allocator margin"] = int(ALLOCATOR_MARGIN * allocated)
    parts["runtime (CUDA, NCCL)"] = RUNTIME_BYTES
    parts["total"] = allocated + parts["allocator margin"] + RUNTIME_BYTES
    return parts


def _optimizer_parts(models: list[_Model], grads: bool) -> dict[str, int]:
    trained = [m for m in models if m.trained]
    out = {
        "params (fp32 shards)": sum(m.shard_bytes for m in trained),
        "AdamW states (2 fp32)": sum(2 * FP32 * m.p["total"] // m.o.world for m in trained),
    }
    if grads:
        out["grads (fp32 shards)"] = sum(FP32 * m.p["total"] // m.o.world for m in trained)
    frozen = [m for m in models if not m.trained]
    if frozen:
        out["frozen models (shards)"] = sum(m.shard_bytes for m in frozen)
    return out


def _train_step(model: _Model, sequences: int, length: int, head_positions: int) -> dict[str, int]:
    """One forward + backward of a trained model: what lives beside the optimiser's state
    at its peak."""
    out = {
        "gathered params + grads in flight": model.in_flight(backward=True),
        "autocast weight copies": model.weight_copies(),
    }
    out.update(model.activations(sequences, length, head_positions))
    if model.head == "lm":
        out["logits (N x V fp32)"] = _logits_train(head_positions, model.a.vocab)
    return out


def _step_phase(models: list[_Model]) -> dict[str, int]:
    """The optimiser step: states and gradients, and AdamW's foreach temporary (one tensor
    per shard)."""
    out = _optimizer_parts(models, grads=True)
    out["AdamW step temporary"] = max(FP32 * m.p["total"] // m.o.world for m in models if m.trained)
    return out


def _generation(
    model: _Model, batch: int, prompt: int, new: int, unsharded: bool
) -> dict[str, int]:
    """generate() with the KV cache for `batch` sequences of prompt + new tokens.
    KV cache: 2 (keys, values) x layers x K heads x hd per token; keys fp32 and values bf16 under
    autocast (rotary's cos/sin are fp32, so rotated keys are promoted), both fp32 in fp32, both bf16
    in mixed/unsharded. Prefill: one layer's working set at a time, about (3 f + 6 d) values per
    prompt token, plus the (batch, 1, P, P) mask; sampling: a few (batch, V) fp32 buffers (top-p
    sorts, repetition penalty). Weights: sharded (the root and two layers gathered per step, and,
    under autocast, the cast cache holding a
    bf16 copy of every trainable weight) or one unsharded bf16 copy of the whole model."""
    a, o = model.a, model.o
    tokens = batch * (prompt + new)
    if unsharded or o.precision == "mixed":
        key, value, b = BF16, BF16, BF16
    elif o.precision == "autocast":
        key, value, b = FP32, BF16, BF16
    else:
        key, value, b = FP32, FP32, FP32
    out = {
        "KV cache": a.layers * a.kv_heads * a.head_dim * tokens * (key + value),
        "prefill / sampling buffers": batch * prompt * (3 * a.f + 6 * a.d) * b
        + batch * prompt * prompt * b
        + 4 * batch * a.vocab * FP32,
    }
    if unsharded:
        out["unsharded bf16 policy"] = BF16 * model.p["total"]
    else:
        out["gathered params in flight"] = model.in_flight(backward=False)
        out["autocast weight copies"] = model.weight_copies()
    return out


def _no_grad_forward(
    model: _Model,
    sequences: int,
    length: int,
    head_positions: int,
    logits_copies: int,
    root: bool = True,
) -> dict[str, int]:
    """A forward without gradients (PPO step 3, DPO's reference): one layer's working set at a time
    (about the saved bytes of one layer), the gathered weights, the autocast cache (trainable
    models), and the (N, V) logits: `logits_copies` fp32 copies at their peak."""
    per = layer_saved_per_token(
        model.a, model.o.precision, model.o.attention, model.o.masked, length
    )
    out = {
        "gathered params in flight": model.in_flight(backward=False, root=root),
        "autocast weight copies": model.weight_copies(),
        "forward working set (1 layer)": sequences * length * sum(per.values()),
    }
    if model.head == "lm":
        out["logits (N x V fp32)"] = logits_copies * head_positions * model.a.vocab * FP32
    return out


def _stack(*parts: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0) + v
    return out


def estimate_phases(
    config: dict, stage: str, o: Options, reward_config: dict | None = None
) -> dict[str, dict[str, int]]:
    """Per phase of `stage`, the bytes per GPU by part (each with its allocator margin, runtime and
    total).
    `reward_config`: the RM/critic's config when it differs from the policy's (PPO); default
    the same.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, not {stage!r}")
    if o.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {o.precision!r}")
    rc = reward_config or config
    L, mb = o.seq_len, o.micro_batch
    phases: dict[str, dict[str, int]] = {}
    if stage == "sft":
        m = _Model(config, "lm", o, trained=True)
        phases["train"] = _stack(_optimizer_parts([m], grads=True), _train_step(m, mb, L, mb * L))
        phases["step"] = _step_phase([m])
    elif stage == "reward":
        m = _Model(rc, "score", o, trained=True)
        phases["train"] = _stack(
            _optimizer_parts([m], grads=True), _train_step(m, 2 * mb, L, 2 * mb)
        )
        phases["step"] = _step_phase([m])
    elif stage == "dpo":
        pol, ref = _Model(config, "lm", o, trained=True), _Model(config, "lm", o, trained=False)
        base = _optimizer_parts([pol, ref], grads=True)
        phases["reference forward"] = _stack(base, _no_grad_forward(ref, 2 * mb, L, 2 * mb * L, 3))
        phases["train"] = _stack(base, _train_step(pol, 2 * mb, L, 2 * mb * L))
        phases["step"] = _step_phase([pol, ref])
    elif stage == "meta_data":
        m = _Model(config, "lm", o, trained=False)
        parts = {"params (fp32 shards)": FP32 * m.p["total"] // o.world}
        m.trained = True  # loaded without requires_grad_(False): autocast would cache its casts
        phases["generation"] = _stack(
            parts, _generation(m, o.gen_batch, o.prompt_len, o.new_tokens, o.gen_unsharded)
        )
    elif stage == "meta_rm":
        phases.update(_meta_rm(rc, o))
    else:
        phases.update(_ppo(config, rc, o))
    return {name: _finish(parts) for name, parts in phases.items()}


def _meta_rm(config: dict, o: Options) -> dict[str, dict[str, int]]:
    """meta_rm.py's step. Per process: `micro_batch` pairs (2 sequences each) and `micro_batch` meta
    prompts
    (k sequences each; the paper's n = m = 16 over 8 GPUs is 2 of each).
    inplace (order 1, FSDP2): backs up θ's shards (+4 P / world), J's forward + backward over micro
    x k sequences leaves ∇J in p.grad, the ascent is in place, L's forward + backward over 2 micro
    sequences. gathered (and world 1's functional code): every rank all-gathers θ in full fp32 (4 P;
    at world 1 the model's own parameters: 0), computes ∇J (4 P; the average over ranks briefly
    doubles it), θ' = θ + η∇J (4 P) and ∇L (4 P), all in full, on a plain twin of the model run
    under autocast whatever the precision option (the twin is not FSDP2-managed); mechanism_stats
    (--log-adapted-every 1, the default) adds ∇L at θ (4 P). Order 2 keeps J's graph for the double
    backward (its forward's saved activations and about as much again
    for the backward's own graph) and runs eager attention. Model: the RM (score head)."""
    m = _Model(config, "score", o, trained=True)
    P = m.p["total"]
    # the gathered route fills p.grad only at the end (world 1: ∇L itself becomes p.grad, counted in
    #   the step)
    base = _optimizer_parts([m], grads=o.meta_route == "inplace" or o.world > 1)
    j_seqs, l_seqs = o.micro_batch * o.k, 2 * o.micro_batch
    phases: dict[str, dict[str, int]] = {}
    if o.meta_route == "inplace":
        if o.meta_order != 1:
            raise ValueError("the in-place route computes the first-order gradient only")
        base["meta: θ backup (shards)"] = FP32 * P // o.world
        phases["J forward+backward"] = _stack(base, _train_step(m, j_seqs, o.seq_len, j_seqs))
        phases["L forward+backward"] = _stack(base, _train_step(m, l_seqs, o.seq_len, l_seqs))
        return phases
    if o.meta_route != "gathered":
        raise ValueError(f"meta_route must be 'inplace' or 'gathered', not {o.meta_route!r}")
    twin_o = dataclasses.replace(
        o,
        world=1,
        precision="fp32" if o.precision == "fp32" else "autocast",
        attention="eager" if o.meta_order == 2 else o.attention,
        grad_checkpointing=False,
    )
    twin = _Model(config, "score", twin_o, trained=True)
    full = 0 if o.world == 1 else FP32 * P
    j_act = twin.activations(j_seqs, o.seq_len, j_seqs)
    l_act = twin.activations(l_seqs, o.seq_len, l_seqs)
    casts = twin.weight_copies()
    j = _stack(base, {"meta: full θ (fp32)": full, "autocast weight copies": casts}, j_act)
    phases["J forward"] = j
    phases["∇J average"] = _stack(
        base,
        {
            "meta: full θ (fp32)": full,
            "meta: ∇J (raw + averaged)": 2 * FP32 * P,
            "autocast weight copies": casts if o.meta_order == 2 else 0,
        },
        j_act if o.meta_order == 2 else {},
        {"meta: J backward graph (order 2)": sum(j_act.values()) if o.meta_order == 2 else 0},
    )
    copies = 4 if o.measure_adapted else 3  # ∇J, θ', ∇L (and ∇L at θ) besides the full θ
    after = {
        "meta: full θ, ∇J, θ', ∇L (fp32)": full + FP32 * P * copies,
        "autocast weight copies": casts * (2 if o.meta_order == 2 else 1),
    }
    if o.meta_order == 2:
        after["meta: J graph kept (order 2)"] = 2 * sum(j_act.values())
    phases["L forward+backward"] = _stack(base, after, l_act)
    return phases


def _ppo(config: dict, rc: dict, o: Options) -> dict[str, dict[str, int]]:
    """ppo.py's iteration on one GPU: policy and critic trained (AdamW), reference and RM frozen.
    generation  `gen_batch` rollouts of prompt_len + new_tokens (no gradients exist:
                zero_grad(set_to_none))
    experience  make_experience, per micro-batch: RM, policy (logits with entropy: up to 4 fp32 (N,
                V) copies: logits, logits / T, log_softmax, its exp and product), reference (3
                copies), critic; the four roots stay gathered until the reshard at the end; under
                autocast the policy's and critic's cast caches hold bf16 copies of their weights
                during their forwards
    update      policy forward + backward (then the critic's, smaller head) with both models'
                gradients
    step        the two AdamW steps"""
    pol, crit = _Model(config, "lm", o, True), _Model(rc, "score", o, True)
    ref, rm = _Model(config, "lm", o, False), _Model(rc, "score", o, False)
    models = [pol, crit, ref, rm]
    seq = o.prompt_len + o.new_tokens
    N = o.micro_batch * o.new_tokens
    statics = _optimizer_parts(models, grads=False)
    phases: dict[str, dict[str, int]] = {}
    phases["generation"] = _stack(
        statics, _generation(pol, o.gen_batch, o.prompt_len, o.new_tokens, o.gen_unsharded)
    )
    roots = 0 if o.world == 1 else sum(m.gather_bytes() * m.p["root"] for m in models)
    exp = _stack(
        statics,
        {"gathered roots (4 models)": roots},
        max(
            (
                _no_grad_forward(pol, o.micro_batch, seq, N, 4, root=False),
                _no_grad_forward(ref, o.micro_batch, seq, N, 3, root=False),
                _no_grad_forward(crit, o.micro_batch, seq, N, 0, root=False),
            ),
            key=_phase_total,
        ),
    )
    phases["experience"] = exp
    grads = _optimizer_parts(models, grads=True)
    phases["update"] = _stack(
        grads,
        max(
            (_train_step(pol, o.micro_batch, seq, N), _train_step(crit, o.micro_batch, seq, N)),
            key=_phase_total,
        ),
    )
    phases["step"] = _step_phase(models)
    return phases


def estimate(
    config: dict,
    stage: str,
    *,
    world: int = 8,
    micro_batch: int = 4,
    seq_len: int = 1024,
    prompt_len: int = 512,
    new_tokens: int = 512,
    gen_batch: int = 64,
    precision: str = "mixed",
    grad_checkpointing: bool = False,
    frozen_bf16: bool = False,
    gen_unsharded: bool = False,
    meta_route: str = "inplace",
    meta_order: int = 1,
    measure_adapted: bool = True,
    k: int = 5,
    attention: str = "sdpa",
    masked: bool = True,
    reward_config: dict | None = None,
) -> dict[str, int]:
    """Bytes per GPU at the peak of `stage`, by part, with "total" (see `Options` for every argument
    and the module docstring for what the numbers assume). For stages with several phases (ppo:
    generation, experience, update, step) the parts are those of the phase with the largest total;
    "_phase" is its index in `estimate_phases`' order."""
    o = Options(
        world,
        micro_batch,
        seq_len,
        prompt_len,
        new_tokens,
        gen_batch,
        precision,
        grad_checkpointing,
        frozen_bf16,
        gen_unsharded,
        meta_route,
        meta_order,
        measure_adapted,
        k,
        attention,
        masked,
    )
    phases = estimate_phases(config, stage, o, reward_config)
    names = list(phases)
    peak = max(names, key=lambda n: phases[n]["total"])
    return {**phases[peak], "_phase": names.index(peak)}


# -------------------------------------------------------------------------------------------------
# Command
# -------------------------------------------------------------------------------------------------
def load_config(name_or_path: str) -> dict:
    """A built-in config by name (BUILTIN_CONFIGS), or a config.json file (or a folder with
    one)."""
    if name_or_path in BUILTIN_CONFIGS:
        return dict(BUILTIN_CONFIGS[name_or_path])
    path = (
        os.path.join(name_or_path, "config.json") if os.path.isdir(name_or_path) else name_or_path
    )
    if not os.path.isfile(path):
        raise SystemExit(
            f"--config {name_or_path}: neither a built-in config ({', '.join(BUILTIN_CONFIGS)}) "
            "nor a config.json"
        )
    with open(path) as f:
        return json.load(f)


def table(config: dict, stage: str, columns: dict[str, dict], common: dict) -> str:
    """One stage: the parts of each column's peak phase in GiB, side by side, and whether it
    fits 80 GB."""
    results = {}
    for name, opts in columns.items():
        o = Options(**{**common, **opts})
        phases = estimate_phases(config, stage, o)
        peak = max(phases, key=lambda n: phases[n]["total"])
        results[name] = (peak, phases)
    rank = {k: i for i, k in enumerate(PART_ORDER + ("allocator margin", "runtime (CUDA, NCCL)"))}
    keys: list[str] = []
    for _, (peak, phases) in results.items():
        keys += [k for k in phases[peak] if k not in keys and k != "total"]
    keys.sort(key=lambda k: rank.get(k, len(rank)))
    width = max(len(k) for k in keys + ["total"]) + 2
    head = f"{stage}: peak phase " + ", ".join(f"{n} = {p}" for n, (p, _) in results.items())
    lines = [head, " " * width + "".join(f"{n:>10}" for n in results)]
    for key in keys:
        lines.append(
            f"{key:<{width}}"
            + "".join(
                f"{phases[peak].get(key, 0) / GiB:>10.2f}" for peak, phases in results.values()
            )
        )
    lines.append(
        f"{'total':<{width}}"
        + "".join(f"{phases[peak]['total'] / GiB:>10.2f}" for peak, phases in results.values())
    )
    lines.append(
        f"{'fits 80 GB':<{width}}"
        + "".join(
            f"{'yes' if phases[peak]['total'] <= GPU_80GB else 'NO':>10}"
            for peak, phases in results.values()
        )
    )
    if len(next(iter(results.values()))[1]) > 1:
        for n, (peak, phases) in results.items():
            lines.append(
                f"  {n} phases: "
                + ", ".join(f"{p} {v['total'] / GiB:.1f}" for p, v in phases.items())
            )
    return "\n".join(lines)


PAPER_ROWS = (  # (label, stage, options): the paper's settings (docs/memory.md)
    ("sft (micro 4, len 1024)", "sft", dict(micro_batch=4, seq_len=1024)),
    ("reward (micro 4 pairs, len 1024)", "reward", dict(micro_batch=4, seq_len=1024)),
    ("meta_rm inplace (micro 2, k 5)", "meta_rm", dict(micro_batch=2, k=5, seq_len=1024)),
    (
        "meta_rm gathered, order 1",
        "meta_rm",
        dict(micro_batch=2, k=5, seq_len=1024, meta_route="gathered"),
    ),
    (
        "meta_rm gathered, order 2",
        "meta_rm",
        dict(micro_batch=2, k=5, seq_len=1024, meta_route="gathered", meta_order=2),
    ),
    (
        "ppo (micro 4, gen 64)",
        "ppo",
        dict(micro_batch=4, prompt_len=512, new_tokens=512, gen_batch=64),
    ),
    (
        "ppo (micro 8, gen 64)",
        "ppo",
        dict(micro_batch=8, prompt_len=512, new_tokens=512, gen_batch=64),
    ),
    (
        "ppo (micro 8, gen 16)",
        "ppo",
        dict(micro_batch=8, prompt_len=512, new_tokens=512, gen_batch=16),
    ),
    ("dpo (micro 4 pairs, len 1024)", "dpo", dict(micro_batch=4, seq_len=1024)),
    (
        "meta_data (gen 64, 512 + 512)",
        "meta_data",
        dict(prompt_len=512, new_tokens=512, gen_batch=64),
    ),
)


def paper_table(config: dict, world: int = 8) -> str:
    """A markdown table: per PAPER_ROWS setting, BEFORE and AFTER totals (GiB per GPU), the peak
    phase and its two largest parts, and whether it fits 80 GB. (meta_data has no --bf16: BEFORE is
    fp32.)"""
    lines = [
        "| setting | before GiB | after GiB | fits 80 GB (before / after) "
        "| after's peak: largest parts |",
        "|---|---:|---:|---|---|",
    ]
    for label, stage, opts in PAPER_ROWS:
        before = {**BEFORE, "precision": "fp32"} if stage == "meta_data" else BEFORE
        res = []
        for col in (before, AFTER):
            o = Options(**{**dict(world=world), **opts, **col})
            phases = estimate_phases(config, stage, o)
            peak = max(phases, key=lambda n: phases[n]["total"])
            res.append((peak, phases[peak]))
        fits = " / ".join("yes" if p["total"] <= GPU_80GB else "**no**" for _, p in res)
        peak, parts = res[1]
        skip = ("total", "allocator margin", "runtime (CUDA, NCCL)")
        top = sorted(((v, k) for k, v in parts.items() if k not in skip), reverse=True)[:2]
        lines.append(
            f"| {label} | {res[0][1]['total'] / GiB:.1f} | {parts['total'] / GiB:.1f} | {fits} | "
            f"{peak}: " + ", ".join(f"{k} {v / GiB:.1f}" for v, k in top) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--config",
        default="llama-2-7b",
        help="built-in name or path to a config.json: " + ", ".join(BUILTIN_CONFIGS),
    )
    ap.add_argument("--stage", default="all", choices=STAGES + ("all",))
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--gen-batch", type=int, default=64)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--meta-route", default="inplace", choices=["inplace", "gathered"])
    ap.add_argument("--meta-order", type=int, default=1, choices=[1, 2])
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--before", action="store_true", help="only the BEFORE column (today's code)")
    ap.add_argument("--after", action="store_true", help="only the AFTER column")
    ap.add_argument(
        "--before-precision",
        default="autocast",
        choices=PRECISIONS,
        help="BEFORE's precision: autocast (--bf16) or fp32 (no --bf16)",
    )
    ap.add_argument(
        "--no-checkpointing", action="store_true", help="AFTER without activation checkpointing"
    )
    ap.add_argument(
        "--paper",
        action="store_true",
        help="a markdown summary of the paper's settings "
        "(PAPER_ROWS) for --config at --world; the other shape flags are ignored",
    )
    args = ap.parse_args(argv)
    config = load_config(args.config)
    if args.paper:
        print(paper_table(config, args.world))
        return
    columns = {"before": {**BEFORE, "precision": args.before_precision}, "after": dict(AFTER)}
    if args.no_checkpointing:
        columns["after"]["grad_checkpointing"] = False
    if args.before and not args.after:
        columns.pop("after")
    if args.after and not args.before:
        columns.pop("before")
    common = dict(
        world=args.world,
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        gen_batch=args.gen_batch,
        k=args.k,
        meta_route=args.meta_route,
        meta_order=args.meta_order,
        attention=args.attention,
    )
    p = parameter_counts(config)
    print(
        f"{args.config}: {p['total'] / 1e9:.3f} B parameters (causal LM); world {args.world}, "
        f"micro-batch {args.micro_batch}, seq-len {args.seq_len}, prompt {args.prompt_len} + "
        f"{args.new_tokens} new, "
        f"generation batch {args.gen_batch}; GiB per GPU"
    )
    for stage in (STAGES if args.stage == "all" else (args.stage,)):
        cols = dict(columns)
        if stage == "meta_data":  # meta_data.py has no --bf16: it samples in fp32 today
            cols = {
                n: ({**c, "precision": "fp32"} if n == "before" else c) for n, c in cols.items()
            }
        print()
        print(table(config, stage, cols, common))


if __name__ == "__main__":
    main(sys.argv[1:])
