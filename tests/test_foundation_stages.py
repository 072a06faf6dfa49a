"""sft.py and reward.py at toy size on the test world: what they log, save and print; the first step's loss against
an independent computation with plain transformers; and one process vs two (FSDP2 under torchrun, gloo on CPU).

Each stage runs twice per session, with the same flags and global batch of 8: in this process through `main([...])`
(world size 1, 2 accumulation micro-batches of 4) and as `torchrun --standalone --nproc_per_node=2` (world size 2,
one micro-batch of 4 per rank). The two must log the same losses and save the same parameters.

Tolerance of the 1-vs-2 comparison. Both runs compute the same sums in a different order (2 micro-batches
accumulated in one process vs an all-reduce over 2 ranks), so gradients agree to fp32 rounding, relative error
~1e-7..1e-6. Adam's step is lr * m / (sqrt(v) + eps), so a parameter's error is about lr x the relative error of its
gradient (~1e-3 x 1e-6 = 1e-9), except for the few entries whose |g| is near eps = 1e-8, where the step's
sensitivity to g grows to ~lr * delta_g / eps. Measured on the testbed world (lr 1e-3, 2 steps): sft max 3e-8,
reward max 8.5e-7 (4 entries of ~1M above 1e-7; exactly 0 on the throwaway world). We allow PARAM_ATOL =
5e-3 x lr = 5e-6. It still catches a wrong gradient *direction* (a rank training on the wrong slice, a micro-batch
dropped or counted twice): that moves parameters by ~lr = 1e-3. Adam is blind to a wrong gradient *scale* (a
missing x world factor), so the logged grad_norm is compared too (relative 1e-5). Logged training losses are sums of
the same terms: relative 1e-6. Evaluation metrics after a step are computed at parameters that already differ by
up to ~1e-6: relative 1e-5.
"""
import contextlib
import io
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import reward
import sft
from plumbing import common, data

LR = 1e-3
PARAM_ATOL = 5e-3 * LR   # see the module docstring
LOSS_RTOL = 1e-6
EVAL_RTOL = 1e-5


def read_metrics(folder: str) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def first_batch(n_records: int, batch_size: int, seed: int = 0) -> list[int]:
    """The indices of step 1's global batch: the stages draw a permutation from a generator seeded with --seed."""
    return torch.randperm(n_records, generator=torch.Generator().manual_seed(seed)).tolist()[:batch_size]


def run_both(stage, script: str, flags: list[str], folder: str, run) -> dict:
    """Run `stage.main(flags)` here (printed lines captured) and `torchrun ... script flags` with 2 processes."""
    one, two = os.path.join(folder, "one"), os.path.join(folder, "two")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        stage.main([*flags, "--out", one])
    rc, out, err = run([script, *flags, "--out", two], nproc=2)
    assert rc == 0, out + err
    return dict(one=one, two=two, printed=printed.getvalue(), printed_two=out)


def max_param_diff(folder_a: str, folder_b: str, reference: str) -> tuple[float, float]:
    """(max |a - b| over all parameters, max |a - reference| over the parameters the reference has)."""
    a, b = (load_file(os.path.join(f, "model.safetensors")) for f in (folder_a, folder_b))
    ref = load_file(os.path.join(reference, "model.safetensors"))
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - ref[k]).abs().max().item() for k in a if k in ref)
    return diff, moved


# ---------------------------------------------------------------------------------------------------------------
# sft.py
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_runs(world, run, tmp_path_factory):
    flags = ["--model", world.base_model, "--data", world.sft_train, "--lr", str(LR), "--batch-size", "8",
             "--micro-batch-size", "4", "--max-steps", "2", "--max-len", "96", "--log-every", "1",
             "--eval-prompts", world.eval_prompts, "--eval-samples", "8", "--max-new-tokens", "8"]
    return run_both(sft, "sft.py", flags, str(tmp_path_factory.mktemp("sft")), run)


def test_sft_logs_saves_and_reports(world, sft_runs):
    out, printed = sft_runs["one"], sft_runs["printed"]
    records = data.read_jsonl(world.sft_train)
    metrics = read_metrics(out)
    # one line per optimiser step, then the sample report
    steps, final = metrics[:-1], metrics[-1]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert math.isfinite(m["loss"]) and m["tokens_per_s"] > 0 and m["grad_norm"] > 0
    # lr by hand: steps per epoch = n // 8, warm-up = round(0.3 x that) steps; 0-based step k of the warm-up runs
    # at peak x (k + 1) / warm-up
    warmup = round(0.3 * (len(records) // 8))
    assert [m["lr"] for m in steps] == pytest.approx([LR * 1 / warmup, LR * 2 / warmup])

    # the checkpoint holds args.json with the run's flags; the final sample report is logged and printed
    with open(os.path.join(out, "args.json")) as f:
        saved = json.load(f)
    assert saved["lr"] == LR and saved["max_steps"] == 2 and saved["data"] == world.sft_train
    assert 0.0 <= final["final_eos_rate"] <= 1.0 and "final_mean_response_words" in final
    assert ("final_gold_reward" in final) == world.testbed
    assert "sft samples: eos_rate" in printed and ("gold_reward" in printed) == world.testbed
    assert [line.split(" loss")[0] for line in printed.splitlines() if line.startswith("step ")] == [
        "step 1/2", "step 2/2"]  # --log-every 1
    # under torchrun only rank 0 prints: each line once in the merged output of both workers
    assert sft_runs["printed_two"].count("step 2/2 loss") == 1
    assert sft_runs["printed_two"].count("sft samples: eos_rate") == 1


def test_sft_first_loss_by_transformers(world, sft_runs):
    # Step 1's loss = mean NLL per response token over the whole global batch (2 micro-batches of 4), at the
    # initial parameters. Independent computation: transformers' own causal-LM loss on the 8 sequences at once,
    # with the prompt and the padding labelled -100 (it shifts by one and averages over the labelled tokens).
    records = data.read_jsonl(world.sft_train)
    tokenizer = AutoTokenizer.from_pretrained(world.base_model)
    base = AutoModelForCausalLM.from_pretrained(world.base_model, dtype=torch.float32)
    seqs, labels = [], []
    for i in first_batch(len(records), 8):
        ids, n_prompt, _ = data.encode(tokenizer, records[i]["prompt"], records[i]["response"], 96)
        seqs.append(ids)
        labels.append([-100] * n_prompt + ids[n_prompt:])
    ids, mask = data.pad(seqs, tokenizer.pad_token_id)
    label_ids, _ = data.pad(labels, -100)
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask, labels=label_ids).loss.item()
    assert read_metrics(sft_runs["one"])[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_sft_one_process_equals_two(world, sft_runs):
    assert "x 1 accumulation x 2 processes" in sft_runs["printed_two"]
    assert "x 2 accumulation x 1 processes" in sft_runs["printed"]
    m1, m2 = read_metrics(sft_runs["one"]), read_metrics(sft_runs["two"])
    for a, b in zip(m1[:2], m2[:2]):
        assert a["step"] == b["step"] and a["lr"] == b["lr"]
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    diff, moved = max_param_diff(sft_runs["one"], sft_runs["two"], world.base_model)
    print(f"sft: max |theta_1proc - theta_2proc| = {diff:.3g}; training moved parameters by up to {moved:.3g}")
    assert moved > 1e-4  # the steps did something
    assert diff <= PARAM_ATOL


# ---------------------------------------------------------------------------------------------------------------
# reward.py
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward_runs(world, run, tmp_path_factory):
    # --eval-every 1: an evaluation (no-grad forwards; under FSDP2 followed by a reshard) sits between the 2 steps
    flags = ["--model", world.base_model, "--train", world.pairs_train, "--test", world.pairs_test, "--lr", str(LR),
             "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "2", "--max-len", "96",
             "--eval-every", "1", "--eval-batch-size", "8", "--log-every", "1"]
    return run_both(reward, "reward.py", flags, str(tmp_path_factory.mktemp("reward")), run)


def test_reward_logs_and_evaluates(world, reward_runs):
    metrics = read_metrics(reward_runs["one"])
    assert [m["step"] for m in metrics] == [1, 1, 2, 2]  # step 1, eval @ 1, step 2, eval @ 2 (the final one)
    assert {"loss", "acc", "grad_norm", "pairs_per_s"} <= metrics[0].keys()
    assert {"eval_acc", "eval_loss", "eval_margin"} <= metrics[-1].keys()
    assert ("eval_acc_gold" in metrics[-1]) == world.testbed
    assert "eval @ 2:" in reward_runs["printed"]
    assert reward_runs["printed_two"].count("eval @ 2:") == 1  # rank 0 only
    with open(os.path.join(reward_runs["one"], "args.json")) as f:
        assert json.load(f)["train"] == world.pairs_train


def test_reward_first_loss_by_transformers(world, reward_runs):
    # Step 1's loss = Eq. (1) on the first 8 pairs at the initial parameters. Independent computation: a plain
    # AutoModelForSequenceClassification whose new head is drawn the way the stage draws it (seed 0, then
    # from_pretrained), each sequence scored alone (no padding), then -mean log sigmoid(r_w - r_l).
    pairs = data.read_jsonl(world.pairs_train)
    tokenizer = AutoTokenizer.from_pretrained(world.base_model)
    common.seed_everything(0)
    rm = AutoModelForSequenceClassification.from_pretrained(world.base_model, dtype=torch.float32, num_labels=1,
                                                            pad_token_id=tokenizer.pad_token_id).eval()

    def r(prompt: str, response: str) -> float:
        ids = data.encode(tokenizer, prompt, response, 96)[0]
        with torch.no_grad():
            return rm(input_ids=torch.tensor([ids])).logits[0, 0].item()

    margins = [r(pairs[i]["prompt"], pairs[i]["chosen"]) - r(pairs[i]["prompt"], pairs[i]["rejected"])
               for i in first_batch(len(pairs), 8)]
    expected = sum(math.log(1 + math.exp(-m)) for m in margins) / len(margins)
    first = read_metrics(reward_runs["one"])[0]
    assert first["loss"] == pytest.approx(expected, rel=1e-5)
    assert first["acc"] == sum(m > 0 for m in margins) / 8


def test_reward_one_process_equals_two(world, reward_runs):
    m1, m2 = read_metrics(reward_runs["one"]), read_metrics(reward_runs["two"])
    assert len(m1) == len(m2) == 4
    for a, b in zip(m1, m2):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        if "loss" in a:  # a training step
            assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL)
            assert b["acc"] == a["acc"]
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        for k in ("eval_loss", "eval_reward_chosen", "eval_reward_rejected", "eval_margin"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=EVAL_RTOL), k
    diff, moved = max_param_diff(reward_runs["one"], reward_runs["two"], world.base_model)  # moved: the backbone
    print(f"reward: max |theta_1proc - theta_2proc| = {diff:.3g}; training moved parameters by up to {moved:.3g}")
    assert moved > 1e-4
    assert diff <= PARAM_ATOL
