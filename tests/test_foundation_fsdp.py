"""One process vs two (FSDP2 under torchrun, gloo on CPU): the same global batch must give the same model.

1. sft.py and reward.py, 2 optimiser steps: world size 1 with 2 accumulation micro-batches vs world size 2 with one
   micro-batch per rank -> the same logged losses and the same saved parameters (within fp32 rounding).
2. common.py's distributed plumbing, run by this file itself under torchrun (`_distributed_checks`): a world-2
   `load_model` computes exactly what `from_pretrained` computes; greedy `generate` / `sample_texts` /
   `reward.score_texts` give the world-1 answers; after those no-grad forwards the gradients are still right;
   `full_state_dict` / `save_model` write exactly the loaded parameters.

Tolerance of (1). Both runs compute the same sums in a different order (2 micro-batches accumulated in one process
vs an all-reduce of 2 ranks), so gradients agree to fp32 rounding: relative error ~1e-7..1e-6. Adam turns a gradient
g into the step lr * m / (sqrt(v) + eps); its error is about lr x the relative error of the gradient, except where
|g| is near eps = 1e-8, where the step's sensitivity to g grows to ~lr * delta_g / eps. With lr = 1e-3, 2 steps and
gradient errors of ~1e-9 absolute, every parameter is expected within ~1e-6 of the other run: we allow 2e-6
absolute (the parameters themselves are ~1e-2, a step moves them by up to 1e-3, so a wrong gradient, e.g. a
missing x world factor, shows as ~1e-4 and fails). The logged losses are sums of the same terms: relative 1e-6.
"""
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

import reward
import sft

HERE = os.path.abspath(__file__)
PARAM_ATOL = 2e-6   # see the module docstring
LOSS_RTOL = 1e-6


def max_param_diff(folder_a: str, folder_b: str, reference: str) -> tuple[float, float]:
    """(max |a - b| over all parameters, max |a - reference|): the disagreement and how far training moved."""
    a, b = load_file(os.path.join(folder_a, "model.safetensors")), load_file(os.path.join(folder_b, "model.safetensors"))
    ref = load_file(os.path.join(reference, "model.safetensors"))
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - ref[k]).abs().max().item() for k in a if k in ref)
    return diff, moved


def metrics(folder: str) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_sft_one_process_equals_two(world, run, tmp_path):
    common_flags = ["--model", world.base_model, "--data", world.sft_train, "--batch-size", "8",
                    "--micro-batch-size", "4", "--max-steps", "2", "--max-len", "96", "--lr", "1e-3",
                    "--eval-prompts", world.eval_prompts, "--eval-samples", "4", "--max-new-tokens", "8"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    sft.main([*common_flags, "--out", one])  # world 1: accumulation 2
    rc, out, err = run(["sft.py", *common_flags, "--out", two], nproc=2)  # world 2: accumulation 1
    assert rc == 0, out + err
    assert "2 processes" in out and "x 1 accumulation" in out

    m1, m2 = metrics(one), metrics(two)
    steps1, steps2 = [m for m in m1 if "loss" in m], [m for m in m2 if "loss" in m]
    assert [m["step"] for m in steps1] == [m["step"] for m in steps2] == [1, 2]
    for a, b in zip(steps1, steps2):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL)
        assert b["lr"] == a["lr"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    diff, moved = max_param_diff(one, two, world.base_model)
    print(f"sft: max |theta_1proc - theta_2proc| = {diff:.3g}; training moved parameters by up to {moved:.3g}")
    assert moved > 1e-4  # the steps did something
    assert diff <= PARAM_ATOL


def test_reward_one_process_equals_two(world, run, tmp_path):
    # --eval-every 1: an evaluation (no-grad forwards under FSDP2, then reshard) sits between the two steps
    common_flags = ["--model", world.base_model, "--train", world.pairs_train, "--test", world.pairs_test,
                    "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "2", "--max-len", "96",
                    "--lr", "1e-3", "--eval-every", "1", "--eval-batch-size", "8"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    reward.main([*common_flags, "--out", one])
    rc, out, err = run(["reward.py", *common_flags, "--out", two], nproc=2)
    assert rc == 0, out + err

    m1, m2 = metrics(one), metrics(two)
    assert len(m1) == len(m2) == 4  # step 1, eval @ 1, step 2, eval @ 2
    for a, b in zip(m1, m2):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        if "loss" in a:  # a training step: the loss of step 1 is computed at identical parameters
            assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL)
            assert b["acc"] == a["acc"]
        for k in ("eval_loss", "eval_reward_chosen", "eval_reward_rejected", "eval_margin"):
            if k in a:  # parameters already differ by ~1e-7..1e-6 after a step: scores agree to ~1e-5 relative
                assert b[k] == pytest.approx(a[k], rel=1e-5), k
    diff, moved = max_param_diff(one, two, world.base_model)  # moved: over the backbone (the head is new)
    print(f"reward: max |theta_1proc - theta_2proc| = {diff:.3g}; training moved parameters by up to {moved:.3g}")
    assert moved > 1e-4
    assert diff <= PARAM_ATOL


N_PROMPTS, NEW_TOKENS = 6, 12


def early_stopping_base(world, folder: str) -> str:
    """A copy of the base model whose EOS output row equals the row of a token t, so greedy decoding stops where it
    would have emitted t (torch.argmax takes the first maximum; EOS's id is lower). t is chosen so that the two
    ranks' prompts (prompts[rank::2]) stop at different lengths: then one rank finishes first and must keep
    stepping (synced_gpus) while the other still needs its collective forwards."""
    import common
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(world.base_model)
    model = AutoModelForCausalLM.from_pretrained(world.base_model, dtype=torch.float32).eval()
    prompts = [r["prompt"] for r in common.read_jsonl(world.eval_prompts)][:N_PROMPTS]
    _, resp = common.generate(model, tokenizer, prompts, max_new_tokens=NEW_TOKENS, do_sample=False)
    counts = torch.bincount(resp.flatten(), minlength=len(tokenizer))
    eos, w = tokenizer.eos_token_id, model.lm_head.weight
    for t in counts.argsort(descending=True).tolist()[:20]:
        if t <= eos or counts[t] == 0:
            continue
        with torch.no_grad():
            w[eos] = w[t]
        widths = [common.generate(model, tokenizer, prompts[k::2], max_new_tokens=NEW_TOKENS,
                                  do_sample=False)[1].shape[1] for k in range(2)]
        if widths[0] != widths[1]:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            return folder
    pytest.skip("no token makes the two ranks stop at different lengths on this world")


def test_distributed_plumbing_matches_one_process(world, run, tmp_path):
    result = str(tmp_path / "result.json")
    base = early_stopping_base(world, str(tmp_path / "base"))
    rc, out, err = run([HERE, base, world.eval_prompts, world.pairs_test, str(tmp_path / "ckpt"), result], nproc=2)
    assert rc == 0, out + err
    with open(result) as f:
        r = json.load(f)
    print(r)
    # exact: rank 0 compares, in one process with the same threads, against a plain from_pretrained model
    assert r["logits_max_diff"] == 0.0
    assert r["inv_freq_equal"] and r["state_dict_equal"] and r["saved_logits_equal"]
    assert r["generate_equal"] and r["sample_texts_equal"]
    assert r["response_widths"][0] != r["response_widths"][1]  # one rank stopped early (synced_gpus was needed)
    assert r["scores_max_diff"] == 0.0
    # the gradient after no-grad forwards (generate, scoring) and a reshard: the same batch on both ranks, so the
    # average over ranks is the plain gradient; fp32 rounding of a differently ordered all-reduce only
    assert r["grad_max_rel_diff"] < 1e-5
    assert r["rank1_printed_nothing"]


# ---------------------------------------------------------------------------------------------------------------
# Run by torchrun: python -m torch.distributed.run --nproc_per_node=2 tests/test_foundation_fsdp.py BASE ...
# ---------------------------------------------------------------------------------------------------------------
def _distributed_checks(base: str, eval_prompts: str, pairs_test: str, ckpt: str, result: str) -> None:
    import contextlib
    import io

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import common

    rank, world, device = common.init_distributed()
    assert world == 2
    common.seed_everything(0, rank)
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = [r["prompt"] for r in common.read_jsonl(eval_prompts, ["prompt"])][:N_PROMPTS]
    pairs = common.read_jsonl(pairs_test, ["prompt", "chosen", "rejected"])[:5]
    seqs = [common.encode(tokenizer, p["prompt"], p["chosen"], 96)[0] for p in pairs]
    ids, mask = common.pad_right(seqs, tokenizer.pad_token_id)
    r: dict = {}

    # 1. forward of the sharded model (same input on both ranks) vs the plain model
    model = common.load_model(AutoModelForCausalLM, base, world, device).eval()
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval() if rank == 0 else None
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    model.reshard()
    if rank == 0:
        with torch.no_grad():
            r["logits_max_diff"] = (logits - plain(input_ids=ids, attention_mask=mask).logits).abs().max().item()
        bufs = dict(plain.named_buffers())
        r["inv_freq_equal"] = all(torch.equal(b, bufs[n]) for n, b in model.named_buffers())

    # 2. greedy generation, prompts spread over ranks (each rank its own prompts, different stopping times)
    mine = prompts[rank::world]
    _, resp = common.generate(model, tokenizer, mine, max_new_tokens=NEW_TOKENS, do_sample=False, world=world)
    gathered = [None] * world
    dist.all_gather_object(gathered, resp.tolist())
    r["response_widths"] = [len(g[0]) for g in gathered]
    texts, _ = common.sample_texts(model, tokenizer, prompts, max_new_tokens=NEW_TOKENS, world=world, rank=rank,
                                   batch_size=2, do_sample=False)
    if rank == 0:
        ok = True
        for k in range(world):
            _, ref = common.generate(plain, tokenizer, prompts[k::world], max_new_tokens=NEW_TOKENS, do_sample=False)
            ok &= ref.tolist() == gathered[k]
        r["generate_equal"] = ok
        ref_texts, _ = common.sample_texts(plain, tokenizer, prompts, max_new_tokens=NEW_TOKENS, world=1, rank=0,
                                           batch_size=2, do_sample=False)
        r["sample_texts_equal"] = ref_texts == texts

    # 3. gradient of a training forward after the no-grad forwards above (the root was resharded by generate)
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        plain.train()
        plain(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        r["grad_max_rel_diff"] = max(((grads[n] - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)).item()
                                     for n, p in plain.named_parameters())

    # 4. the gathered state dict and a save from two processes hold exactly the loaded parameters
    state = common.full_state_dict(model, world)
    common.save_model(model, tokenizer, ckpt, world)
    if rank == 0:
        ref = plain.state_dict()
        r["state_dict_equal"] = state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)
        saved = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        plain.eval()
        with torch.no_grad():
            r["saved_logits_equal"] = torch.equal(saved(input_ids=ids, attention_mask=mask).logits,
                                                  plain(input_ids=ids, attention_mask=mask).logits)

    # 5. reward scores from the sharded RM vs the plain one (same head: rank 0 initialises it, broadcasts it)
    torch.manual_seed(0)
    rm, _ = reward.load_reward_model(base, world, device)
    rm.eval()
    responses = [p["chosen"] for p in pairs]
    scores = reward.score_texts(rm, tokenizer, [p["prompt"] for p in pairs], responses, max_len=96, world=world,
                                rank=rank, batch_size=2)
    head = rm.score.weight.full_tensor()
    if rank == 0:
        plain_rm = AutoModelForSequenceClassification.from_pretrained(base, dtype=torch.float32, num_labels=1,
                                                                      pad_token_id=tokenizer.pad_token_id).eval()
        with torch.no_grad():
            plain_rm.score.weight.copy_(head)
        ref = reward.score_texts(plain_rm, tokenizer, [p["prompt"] for p in pairs], responses, max_len=96, world=1,
                                 rank=0, batch_size=2)
        r["scores_max_diff"] = (scores - ref).abs().max().item()

    # 6. print0 prints on rank 0 only
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        common.print0("hello")
    flags = [None] * world
    dist.all_gather_object(flags, buf.getvalue())
    if rank == 0:
        r["rank1_printed_nothing"] = flags[1] == "" and "hello" in flags[0]
        with open(result, "w") as f:
            json.dump(r, f)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    import common

    common.run_main(lambda: _distributed_checks(*sys.argv[1:6]))
