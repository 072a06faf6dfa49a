"""tools/memory_estimate.py against measurement and hand arithmetic.

1. Parameter counts: exact, against sum(p.numel()) of the models transformers builds from the same
   config (on the meta device, so the 7B built-in configs cost nothing), causal LM and sequence
   classification (the RM's head).
2. Saved activations: the analytical model (`activation_bytes`) against the bytes measured on CPU
   for the stages' own code paths (reward.packed_rewards, sft.packed_loss_sum, ppo.response_logits +
   logprobs_and_entropy), for the testbed's model sizes and a GQA Llama, in fp32, bf16 autocast and
   bf16 mixed precision (the model in bf16, which is what FSDP2's
   MixedPrecisionPolicy(param_dtype=bf16) computes with), with and without gradient checkpointing.
   Measured = the sum over the UNIQUE storages (by data pointer) of the tensors saved for backward
   that are still alive after the forward (torch.autograd.graph.saved_tensors_hooks; a saved tensor
   counts while the graph holds it), excluding parameters' storages and autocast's bf16 casts of the
   weights (these are checked on their own against `autocast_weight_copies`, exactly). Tolerance: 1
   %. The model is derived op by op (memory_estimate.layer_saved_per_token's docstring) and counts
   every saved tensor the measurement sees, so it should match to the byte; 1 % leaves room for
   storages that the allocator rounds or that a transformers release adds (a few int64 index tensors
   of a few hundred bytes). The CPU runs SDPA's flash-for-CPU kernel, which saves the same tensors
   as the GPU's memory-efficient kernel that packed (masked) rows get (q, k, v, output, log-sum-exp,
   and the mask as a float); "eager" is checked too.
3. Pure arithmetic parts (AdamW states, gradient and parameter shards, frozen models, KV cache, the
   meta step's copies): numbers derived by hand in the comments.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
)

import ppo
import reward
import sft
from plumbing import packing
from testbed import world as testbed_world
from tools import memory_estimate as me

VOCAB = 1000
TOLERANCE = 0.01


def llama_config(hidden, intermediate, layers, heads, kv_heads=None, **extra) -> dict:
    return {
        **dict(
            model_type="llama",
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads or heads,
            vocab_size=VOCAB,
            tie_word_embeddings=False,
            max_position_embeddings=1024,
        ),
        **extra,
    }


CONFIGS = {size: llama_config(*dims) for size, dims in testbed_world.MODEL_SIZES.items()}
CONFIGS["gqa"] = llama_config(256, 512, 4, 8, 2)  # 8 query heads share 2 key/value heads


def hf_config(config: dict, **extra):
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gpt2": GPT2Config}[config["model_type"]]
    return cls(**{k: v for k, v in config.items() if k != "model_type"}, **extra)


def numel(cls, config: dict, **extra) -> int:
    with torch.device("meta"):
        model = cls.from_config(hf_config(config, **extra))
    return sum(p.numel() for p in model.parameters())


# -------------------------------------------------------------------------------------------------
# 1. Parameter counts
# -------------------------------------------------------------------------------------------------
PARAM_CONFIGS = {
    **CONFIGS,
    **me.BUILTIN_CONFIGS,
    "llama-biases": llama_config(64, 96, 2, 4, 2, attention_bias=True, mlp_bias=True),
    "llama-tied": llama_config(64, 96, 2, 4, 2, tie_word_embeddings=True),
    "mistral-like-head-dim": llama_config(64, 96, 2, 4, 2, head_dim=32),
    "gpt2": dict(
        model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128
    ),
    "gpt2-n-inner": dict(
        model_type="gpt2",
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=128,
        n_inner=100,
    ),
}


@pytest.mark.parametrize("name", PARAM_CONFIGS)
def test_parameter_counts_exact(name):
    config = PARAM_CONFIGS[name]
    assert me.parameter_counts(config, "lm")["total"] == numel(AutoModelForCausalLM, config)
    assert me.parameter_counts(config, "score")["total"] == numel(
        AutoModelForSequenceClassification, config, num_labels=1
    )


def test_parameter_counts_by_hand():
    # Llama-2-7B: per layer q, k, v, o 4 x 4096² = 67,108,864; gate, up, down 3 x 4096 x 11008 =
    # 135,266,304; two norms 8,192 -> 202,383,360; x 32 = 6,476,267,520; embeddings and lm_head 2 x
    # 32000 x 4096 = 262,144,000; final norm 4,096: 6,738,415,616 (the published 6.74 B).
    p = me.parameter_counts(me.BUILTIN_CONFIGS["llama-2-7b"])
    assert p["layer"] == 202_383_360 and p["total"] == 6_738_415_616
    # Qwen2.5-0.5B (tied): per layer q 896 x 896 + 896 bias, k and v 896 x 128 + 128 each, o 896²,
    # MLP 3 x 896 x 4864, norms 2 x 896: 802,816 + 896 + 2 x 114,816 + 802,816 + 13,074,432 + 1,792
    # = 14,912,384; x 24 = 357,897,216; embeddings 151936 x 896 = 136,134,656; norm 896:
    #   494,032,768.
    assert me.parameter_counts(me.BUILTIN_CONFIGS["qwen2.5-0.5b"])["total"] == 494_032_768


# -------------------------------------------------------------------------------------------------
# 2. Saved activations, measured
# -------------------------------------------------------------------------------------------------
class _Box:
    """What the pack hook hands autograd: the graph holds it as long as it needs the tensor, so a
    weak set of boxes
    is exactly the set of saved tensors still alive."""

    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


def _is_weight_cast(t: torch.Tensor) -> bool:
    """autocast's bf16 copy of a parameter (or a transposed view of it): a chain of nothing but copy
    and view
    nodes from the tensor up to a parameter's AccumulateGrad."""
    fn = t.grad_fn
    while fn is not None and type(fn).__name__ in (
        "ToCopyBackward0",
        "TBackward0",
        "ViewBackward0",
    ):
        fn = fn.next_functions[0][0]
        if type(fn).__name__ == "AccumulateGrad":
            return True
    return False


def measure(model: torch.nn.Module, forward) -> tuple[int, int]:
    """(activation bytes, autocast weight-cast bytes) saved for backward by `forward()` and alive
    after it, each unique storage once, parameters excluded. `forward` returns the loss-like output
    (kept alive).
    """
    live: weakref.WeakSet = weakref.WeakSet()

    def pack(t):
        box = _Box(t)
        live.add(box)
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        out = forward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    acts: dict[int, int] = {}
    casts: dict[int, int] = {}
    for box in list(live):
        s = box.t.untyped_storage()
        if s.data_ptr() in params:
            continue
        (casts if _is_weight_cast(box.t) else acts)[s.data_ptr()] = s.nbytes()
    del out
    return sum(acts.values()), sum(casts.values())


SEQS = [
    list(range(1, 1 + n)) for n in (61, 47, 40, 33, 26, 19, 12)
]  # several per row: a block-diagonal mask


@pytest.fixture(scope="module")
def models():
    """One causal LM and one RM per config, fp32 and a bf16 copy; built once."""
    cache = {}

    def get(name, head, precision, attention="sdpa"):
        key = (name, head, precision == "mixed", attention)
        if key not in cache:
            torch.manual_seed(0)
            cls = AutoModelForCausalLM if head == "lm" else AutoModelForSequenceClassification
            extra = dict(num_labels=1, pad_token_id=0) if head == "score" else {}
            model = cls.from_config(
                hf_config(CONFIGS[name], attn_implementation=attention, **extra)
            )
            cache[key] = model.to(torch.bfloat16) if precision == "mixed" else model
        return cache[key]

    return get


def run_path(model, path: str, packed: packing.Packed, precision: str):
    """The stage's code path; returns (forward, head positions)."""
    bf16 = precision == "autocast"
    if path == "rm":

        def forward():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return reward.packed_rewards(model, packed)

        return forward, len(SEQS)
    if path == "sft":
        labels = [sft.sft_labels(s, len(s) // 3) for s in SEQS]
        idx, targets = sft.packed_targets(packed, labels)

        def forward():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return sft.packed_loss_sum(model, packed, idx, targets)

        return forward, len(idx)
    # ppo: response_logits then logprobs_and_entropy, as ppo_update calls them (the logits are a
    #   temporary)
    n_prompt = torch.tensor([len(s) // 2 for s in SEQS])
    count = packed.lengths - n_prompt
    predict = packed.spans(n_prompt - 1, count)
    tokens = packed.input_ids.flatten()[predict + 1]
    mask = torch.arange(int(count.max()))[None, :] < count[:, None]
    pr = ppo.PackedRollouts(packed, predict, tokens, mask)

    def forward():
        return ppo.logprobs_and_entropy(ppo.response_logits(model, pr, bf16), pr.tokens, 0.8)[0]

    return forward, len(tokens)


CASES = [
    (name, path, precision, ckpt)
    for name in CONFIGS
    for path in ("rm", "sft", "ppo")
    for precision in me.PRECISIONS
    for ckpt in (False, True)
]


def compare(models, name, path, precision, ckpt, attention="sdpa", seqs=None, capacity=None):
    head = "score" if path == "rm" else "lm"
    model = models(name, head, precision, attention)
    model.train()  # HF checkpoints only in training mode (dropout is 0 in these configs)
    if ckpt:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    packed = packing.pack(seqs or SEQS, 0, capacity)
    masked = _has_mask(packed)
    try:
        forward, n = run_path(model, path, packed, precision)
        measured, casts = measure(model, forward)
    finally:
        model.activation_checkpointing_disable()
    rows, row_len = packed.input_ids.shape
    est = me.activation_bytes(
        CONFIGS[name],
        rows=rows,
        row_len=row_len,
        head_positions=n,
        head=head,
        precision=precision,
        grad_checkpointing=ckpt,
        attention=attention,
        masked=masked,
    )
    estimated = sum(est.values())
    expected_casts = (
        me.autocast_weight_copies(CONFIGS[name], head, ckpt) if precision == "autocast" else 0
    )
    return measured, estimated, casts, expected_casts


def _has_mask(packed: packing.Packed) -> bool:
    """transformers builds a block-diagonal mask unless every row is one sequence from position
    0 on."""
    restarts = (packed.position_ids[:, 1:] - packed.position_ids[:, :-1]) != 1
    return bool(restarts.any())


RESULTS: list[tuple] = []


@pytest.mark.parametrize("name,path,precision,ckpt", CASES)
def test_saved_activations_match_measurement(models, name, path, precision, ckpt):
    measured, estimated, casts, expected_casts = compare(models, name, path, precision, ckpt)
    RESULTS.append((name, path, precision, ckpt, measured, estimated))
    assert abs(estimated - measured) <= TOLERANCE * measured, (measured, estimated)
    assert casts == expected_casts


@pytest.mark.parametrize("precision", me.PRECISIONS)
@pytest.mark.parametrize("name", ["tiny", "gqa"])
def test_eager_attention_saved_activations(models, name, precision):
    # meta_rm --meta-order 2 loads the RM with eager attention: the (H, C, C) probabilities are
    #   saved per layer
    measured, estimated, casts, expected_casts = compare(
        models, name, "rm", precision, False, "eager"
    )
    assert abs(estimated - measured) <= TOLERANCE * measured, (measured, estimated)
    assert casts == expected_casts


@pytest.mark.parametrize("precision", me.PRECISIONS)
def test_one_sequence_per_row_has_no_mask(models, precision):
    # rows that each hold one sequence from position 0: no mask, SDPA runs causal and GQA keeps 2
    #   K/V heads
    seqs = [list(range(1, 41))] * 3
    measured, estimated, _, _ = compare(
        models, "gqa", "rm", precision, False, seqs=seqs, capacity=40
    )
    assert abs(estimated - measured) <= TOLERANCE * measured, (measured, estimated)


# -------------------------------------------------------------------------------------------------
# 3. Pure arithmetic
# -------------------------------------------------------------------------------------------------
LLAMA7B = me.BUILTIN_CONFIGS["llama-2-7b"]
P7 = 6_738_415_616  # Llama-2-7B causal LM (test_parameter_counts_by_hand)
P7_RM = P7 - 32000 * 4096 + 4096  # no lm_head, a (1, 4096) score head: 6,607,347,712


def test_optimizer_shards_by_hand():
    e = me.estimate(LLAMA7B, "sft", world=8, precision="mixed", grad_checkpointing=True)
    # fp32 shards: 4 B x 6,738,415,616 / 8 = 3,369,207,808; grads the same; AdamW 8 B x P / 8 =
    #   6,738,415,616
    assert e["params (fp32 shards)"] == 3_369_207_808
    assert e["grads (fp32 shards)"] == 3_369_207_808
    assert e["AdamW states (2 fp32)"] == 6_738_415_616


def test_autocast_weight_copies_by_hand():
    # 2 B x (32 layers x 202,375,168 matmul weights (202,383,360 minus the 8,192 norm weights) +
    # lm_head 131,072,000) = 2 x 6,607,077,376 = 13,214,154,752: the whole model in bf16, on every
    #   rank
    assert me.autocast_weight_copies(LLAMA7B, "lm") == 13_214_154_752
    e = me.estimate(LLAMA7B, "sft", world=8, precision="autocast")
    assert e["autocast weight copies"] == 13_214_154_752
    assert "autocast weight copies" not in me.estimate(LLAMA7B, "sft", world=8, precision="mixed")


def test_ppo_frozen_models_and_kv_cache_by_hand():
    phases = me.estimate_phases(
        LLAMA7B,
        "ppo",
        me.Options(
            world=8,
            micro_batch=4,
            prompt_len=512,
            new_tokens=512,
            gen_batch=64,
            precision="mixed",
            frozen_bf16=True,
            gen_unsharded=True,
        ),
    )
    gen = phases["generation"]
    # reference (P7) and RM (P7_RM) in bf16, sharded over 8: 2 x (6,738,415,616 + 6,607,347,712) / 8
    # = 3,336,440,832 (each term divides exactly)
    assert gen["frozen models (shards)"] == 2 * P7 // 8 + 2 * P7_RM // 8 == 3_336_440_832
    # KV cache: 2 (K, V) x 2 B x 32 layers x 32 heads x 128 x 64 rollouts x 1024 tokens =
    #   34,359,738,368 (32 GiB)
    assert gen["KV cache"] == 34_359_738_368
    # the unsharded bf16 policy: 2 x 6,738,415,616
    assert gen["unsharded bf16 policy"] == 13_476_831_232
    before = me.estimate_phases(LLAMA7B, "ppo", me.Options(world=8, precision="autocast"))[
        "generation"
    ]
    # before: keys fp32 (rotary's cos/sin are fp32 under autocast), values bf16: 6 B instead of 4 ->
    #   48 GiB
    assert before["KV cache"] == 48 * 2**30
    assert before["frozen models (shards)"] == 4 * P7 // 8 + 4 * P7_RM // 8


def test_meta_rm_gathered_copies_by_hand():
    phases = me.estimate_phases(
        LLAMA7B,
        "meta_rm",
        me.Options(world=8, micro_batch=2, meta_route="gathered", precision="autocast"),
    )
    L = phases["L forward+backward"]
    # full θ, ∇J, θ', ∇L and (mechanism_stats) ∇L at θ: 5 x 4 B x 6,607,347,712 = 132,146,954,240
    assert L["meta: full θ, ∇J, θ', ∇L (fp32)"] == 5 * 4 * P7_RM
    inplace = me.estimate_phases(LLAMA7B, "meta_rm", me.Options(world=8, micro_batch=2))
    # the in-place route's only extra: the backup of θ's fp32 shards, 4 x P7_RM / 8 = 3,303,673,856
    assert inplace["J forward+backward"]["meta: θ backup (shards)"] == 3_303_673_856


def test_total_is_the_sum_of_parts_and_the_peak_phase():
    for stage in me.STAGES:
        phases = me.estimate_phases(LLAMA7B, stage, me.Options(precision="autocast"))
        for parts in phases.values():
            body = {k: v for k, v in parts.items() if k != "total"}
            assert parts["total"] == sum(body.values())
            allocated = parts["total"] - parts["runtime (CUDA, NCCL)"] - parts["allocator margin"]
            assert parts["allocator margin"] == int(0.10 * allocated)
        e = me.estimate(LLAMA7B, stage, precision="autocast")
        assert e["total"] == max(p["total"] for p in phases.values())


def test_command_prints_both_columns(capsys):
    me.main(["--config", "qwen2.5-0.5b", "--stage", "ppo", "--world", "8", "--micro-batch", "4"])
    out = capsys.readouterr().out
    assert "before" in out and "after" in out and "AdamW states" in out and "fits 80 GB" in out


if (
    __name__ == "__main__"
):  # python tests/test_memory_estimate.py: the measured-vs-estimated table (markdown)
    torch.set_num_threads(1)
    get = models.__wrapped__()  # the fixture's function, called outside pytest
    print(
        "| config | path | precision | checkpointing | attention "
        "| measured B | estimated B | ratio |"
    )
    print("|---|---|---|---|---|---:|---:|---:|")
    cases = [(*c, "sdpa") for c in CASES] + [
        (n, "rm", p, False, "eager") for n in ("tiny", "gqa") for p in me.PRECISIONS
    ]
    for name, path, precision, ckpt, attention in cases:
        measured, estimated, _, _ = compare(get, name, path, precision, ckpt, attention)
        print(
            f"| {name} | {path} | {precision} | {'yes' if ckpt else 'no'} | {attention} "
            f"| {measured:,} | "
            f"{estimated:,} | {estimated / measured:.4f} |"
        )
