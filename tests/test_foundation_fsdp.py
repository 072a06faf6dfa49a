"""The distributed plumbing (distributed.py, sampling.py) under torchrun (2 processes, FSDP2, gloo on CPU) against
one process.

This file runs itself under torchrun (`_distributed_checks`, rank 0 compares against plain transformers in the same
process, so "equal" means bitwise): a world-2 `load_model` computes exactly what `from_pretrained` computes
(including the rotary buffers, which are not in the checkpoint); greedy `generate` with ranks that stop at different lengths
(synced_gpus) and `sample_texts` / `reward.score_texts` give the world-1 answers; a training forward after those
no-grad forwards gives the plain gradient; `full_state_dict` / `save_model` write exactly the loaded parameters;
`print0` prints on rank 0 only. (sft.py / reward.py 1 vs 2 processes: test_foundation_stages.py.)
"""
import contextlib
import io
import json
import os
import sys

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import reward
from plumbing import common, data, distributed, sampling

HERE = os.path.abspath(__file__)


N_PROMPTS, NEW_TOKENS = 6, 12


def early_stopping_base(world, folder: str) -> str:
    """A copy of the base model whose EOS output row equals the row of a token t, so greedy decoding stops where it
    would have emitted t (torch.argmax takes the first maximum; EOS's id is lower). t is chosen so that the two
    ranks' prompts (prompts[rank::2]) stop at different lengths: then one rank finishes first and must keep
    stepping (synced_gpus) while the other still needs its collective forwards."""
    tokenizer = AutoTokenizer.from_pretrained(world.base_model)
    model = AutoModelForCausalLM.from_pretrained(world.base_model, dtype=torch.float32).eval()
    prompts = [r["prompt"] for r in data.read_jsonl(world.eval_prompts)][:N_PROMPTS]
    _, resp = sampling.generate(model, tokenizer, prompts, max_new_tokens=NEW_TOKENS, do_sample=False)
    counts = torch.bincount(resp.flatten(), minlength=len(tokenizer))
    eos, w = tokenizer.eos_token_id, model.lm_head.weight
    for t in counts.argsort(descending=True).tolist()[:20]:
        if t <= eos or counts[t] == 0:
            continue
        with torch.no_grad():
            w[eos] = w[t]
        widths = [sampling.generate(model, tokenizer, prompts[k::2], max_new_tokens=NEW_TOKENS,
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
    rank, world, device = distributed.init_distributed()
    assert world == 2
    common.seed_everything(0, rank)
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = [r["prompt"] for r in data.read_jsonl(eval_prompts, ["prompt"])][:N_PROMPTS]
    pairs = data.read_jsonl(pairs_test, ["prompt", "chosen", "rejected"])[:5]
    seqs = [data.encode(tokenizer, p["prompt"], p["chosen"], 96)[0] for p in pairs]
    ids, mask = data.pad(seqs, tokenizer.pad_token_id)
    r: dict = {}

    # 1. forward of the sharded model (same input on both ranks) vs the plain model
    model = distributed.load_model(AutoModelForCausalLM, base, world, device).eval()
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
    _, resp = sampling.generate(model, tokenizer, mine, max_new_tokens=NEW_TOKENS, do_sample=False, world=world)
    gathered = [None] * world
    dist.all_gather_object(gathered, resp.tolist())
    r["response_widths"] = [len(g[0]) for g in gathered]
    texts, _ = sampling.sample_texts(model, tokenizer, prompts, max_new_tokens=NEW_TOKENS, world=world, rank=rank,
                                   batch_size=2, do_sample=False)
    if rank == 0:
        ok = True
        for k in range(world):
            _, ref = sampling.generate(plain, tokenizer, prompts[k::world], max_new_tokens=NEW_TOKENS, do_sample=False)
            ok &= ref.tolist() == gathered[k]
        r["generate_equal"] = ok
        ref_texts, _ = sampling.sample_texts(plain, tokenizer, prompts, max_new_tokens=NEW_TOKENS, world=1, rank=0,
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
    state = distributed.full_state_dict(model, world)
    distributed.save_model(model, tokenizer, ckpt, world)
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
    rm, _ = distributed.load_reward_model(base, world, device)
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
    common.run_main(lambda: _distributed_checks(*sys.argv[1:6]))
