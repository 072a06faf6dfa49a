"""Checkpoints written by `distributed.save_model` load with plain transformers and compute the same function, and
the reward model's score is the linear head on the final hidden state of the EOS token (checked by hand)."""
import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import reward
from plumbing import data, distributed

CPU = torch.device("cpu")


def batch(tokenizer, world, n=4, max_len=64):
    """n right-padded (prompt + response + EOS) sequences of different lengths from the world's pairs."""
    pairs = data.read_jsonl(world.pairs_train)[:n]
    seqs = [data.encode(tokenizer, p["prompt"], p["chosen"] if i % 2 else p["rejected"], max_len)[0]
            for i, p in enumerate(pairs)]
    assert len({len(s) for s in seqs}) > 1, "want sequences of different lengths, so padding matters"
    ids, mask = data.pad(seqs, tokenizer.pad_token_id)
    return seqs, ids, mask


def perturb_(model, seed=1):
    """Move every parameter off its initial value, so a save that silently kept the old file would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))


def test_causal_lm_save_then_plain_transformers_load_is_identical(world, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(world.base_model)
    model = distributed.load_model(AutoModelForCausalLM, world.base_model, 1, CPU).eval()
    perturb_(model)
    out = str(tmp_path / "ckpt")
    os.makedirs(out)
    (tmp_path / "ckpt" / "metrics.jsonl").write_text('{"step": 1}\n')  # a file of the run that is not the checkpoint
    distributed.save_model(model, tokenizer, out, 1)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    _, ids, mask = batch(tokenizer, world)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           loaded(input_ids=ids, attention_mask=mask).logits)
    assert (tmp_path / "ckpt" / "metrics.jsonl").read_text() == '{"step": 1}\n'  # kept across the swap
    assert AutoTokenizer.from_pretrained(out).pad_token_id == tokenizer.pad_token_id
    assert not os.path.exists(out + ".tmp") and not os.path.exists(out + ".old")


def test_reward_model_save_load_and_pooling_by_hand(world, tmp_path):
    torch.manual_seed(0)
    model, tokenizer = distributed.load_reward_model(world.base_model, 1, CPU)
    model.eval()
    perturb_(model)
    out = str(tmp_path / "rm")
    distributed.save_model(model, tokenizer, out, 1)
    loaded = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert loaded.config.num_labels == 1 and loaded.config.pad_token_id == tokenizer.pad_token_id

    seqs, ids, mask = batch(tokenizer, world)
    with torch.no_grad():
        r = reward.rewards(model, ids, mask)  # (B,)
        # (1) plain transformers on the saved folder gives the very same scores
        assert torch.equal(r, reward.rewards(loaded, ids, mask))

        # (2) the score is w · h_T, h_T the final hidden state at the last real token (the EOS), computed by hand:
        # run the backbone alone, take each row's position len(seq) - 1 from the python lists, apply the head.
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
        last = torch.tensor([len(s) - 1 for s in seqs])
        assert all(ids[i, last[i]] == tokenizer.eos_token_id for i in range(len(seqs)))
        by_hand = hidden[torch.arange(len(seqs)), last] @ model.score.weight[0]  # (B,); the head has no bias
        assert model.score.bias is None
        # the same numbers through different matmul shapes: equal up to fp32 rounding of a 64-128 term dot product
        torch.testing.assert_close(r, by_hand, rtol=1e-5, atol=1e-6)

        # (3) extra right padding changes nothing: pad 7 more columns (pad id, mask 0)
        extra = torch.full((len(seqs), 7), tokenizer.pad_token_id)
        r_padded = reward.rewards(model, torch.cat([ids, extra], 1), torch.cat([mask, torch.zeros_like(extra)], 1))
        torch.testing.assert_close(r_padded, r, rtol=1e-5, atol=1e-6)
        # ... and a sequence scored alone (no padding at all) gets the score it gets inside the batch
        alone = torch.stack([reward.rewards(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]
                             for s in seqs])
        torch.testing.assert_close(alone, r, rtol=1e-5, atol=1e-6)


def test_save_model_writes_args_json(world, tmp_path):
    import sft

    args = sft.Args(out=str(tmp_path / "x"), lr=1e-3)
    tokenizer = AutoTokenizer.from_pretrained(world.base_model)
    model = distributed.load_model(AutoModelForCausalLM, world.base_model, 1, CPU)
    distributed.save_model(model, tokenizer, args.out, 1, args)
    with open(os.path.join(args.out, "args.json")) as f:
        assert json.load(f)["lr"] == 1e-3


def test_save_keeps_a_nested_checkpoint(world, tmp_path):
    # ppo.py saves the policy into OUT and the critic into OUT/critic: saving the policy again (a new OUT built in
    # OUT.tmp, then renamed) must carry OUT/critic over unchanged, byte for byte.
    tokenizer = AutoTokenizer.from_pretrained(world.base_model)
    model = AutoModelForCausalLM.from_pretrained(world.base_model)
    out = str(tmp_path / "out")
    distributed.save_model(model, tokenizer, out, world=1)
    distributed.save_model(model, tokenizer, os.path.join(out, "critic"), world=1)
    before = open(os.path.join(out, "critic", "model.safetensors"), "rb").read()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # a different policy
    distributed.save_model(model, tokenizer, out, world=1)
    assert open(os.path.join(out, "critic", "model.safetensors"), "rb").read() == before
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(next(reloaded.parameters()), next(model.parameters()))
