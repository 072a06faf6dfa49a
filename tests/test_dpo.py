"""DPO (dpo.py): the loss and its gradient by hand, its β -> 0 limit and signs, sequence log-probabilities against a
per-token loop twin (prompt masked, padding on either side, any batch company), the stage at toy size (loss log 2 at
step 1, evaluation against plain transformers, 1 process == 2 processes, the checkpoint judged by evaluate.py),
resume bit for bit, and bad input as one-line errors.

Tolerance of the 1-vs-2 comparison: as in test_foundation_stages.py (its docstring derives it). Both runs sum the
same terms in a different order (2 micro-batches accumulated in one process vs an all-reduce over 2 ranks), so
gradients agree to fp32 rounding (~1e-7..1e-6 relative); through Adam a parameter then differs by about lr x that,
except for the entries whose |g| is near Adam's eps = 1e-8. PARAM_ATOL = 5e-3 x lr = 5e-6 still catches a rank
training on the wrong slice or a micro-batch counted twice (those move parameters by ~lr = 1e-3); the logged grad_norm
(relative 1e-5) catches a wrong scale (a missing x world), to which Adam is blind; logged losses are sums of the same
terms (relative 1e-6); evaluation after a step runs at parameters that already differ by ~1e-6 (relative 1e-5).
Sequence log-probabilities are sums of ~10-30 token log-probabilities, -30 to -200 nats on the random base model, in
fp32, whose spacing at 128 is 7.6e-6: they and the log-ratios are compared to LOGP_ATOL = 5e-5 nats, a few units in
the last place (measured: up to 7.6e-6), and the margins, β times a log-ratio difference, to β x LOGP_ATOL.
"""
import concurrent.futures
import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import dpo
from plumbing import data
from conftest import REPO, run_command, subprocess_env

sig = lambda x: 1 / (1 + math.exp(-x))
LR = 1e-3
PARAM_ATOL = 5e-3 * LR   # see the module docstring
LOSS_RTOL = 1e-6
EVAL_RTOL = 1e-5
LOGP_ATOL = 5e-5         # nats; see the module docstring
TIMING = {"pairs_per_s"}  # wall-clock: differs between any two runs


def read_metrics(folder: str, drop_timing: bool = False) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows] if drop_timing else rows


def max_param_diff(folder_a: str, folder_b: str, reference: str) -> tuple[float, float]:
    """(max |a - b| over all parameters, max |a - reference|)."""
    a, b, ref = (load_file(os.path.join(f, "model.safetensors")) for f in (folder_a, folder_b, reference))
    assert a.keys() == b.keys()
    return (max((a[k] - b[k]).abs().max().item() for k in a),
            max((a[k] - ref[k]).abs().max().item() for k in a if k in ref))


# ---------------------------------------------------------------------------------------------------------------
# The loss by hand
# ---------------------------------------------------------------------------------------------------------------
def test_dpo_loss_and_gradient_by_hand():
    # β = 0.5, two pairs. Log-ratios ρ = log π_θ − log π_ref, z = β (ρ_w − ρ_l), loss = mean −log σ(z).
    #   pair 1: π_w −1, π_l −3, ref_w −2, ref_l −2 -> ρ_w = +1, ρ_l = −1, r̂_w = +0.5, r̂_l = −0.5, z = +1
    #   pair 2: π_w −4, π_l −1, ref_w −3, ref_l −2 -> ρ_w = −1, ρ_l = +1, r̂_w = −0.5, r̂_l = +0.5, z = −1
    #   loss = (−log σ(1) − log σ(−1)) / 2 = (log(1 + e^−1) + log(1 + e)) / 2 = log(1 + e^−1) + 1/2 = 0.8132617
    # Gradient: d(−log σ(z))/dz = −σ(−z); dz/dπ_w = β, dz/dπ_l = −β, dz/dref_w = −β, dz/dref_l = +β; the mean over
    # n = 2 pairs divides by 2. So dL/dπ_w = −β σ(−z) / 2 = −σ(−z)/4, and the other three follow by the signs:
    #   pair 1 (z = 1):  dπ_w = −σ(−1)/4 = −0.0672363, dπ_l = +0.0672363, dref_w = +0.0672363, dref_l = −0.0672363
    #   pair 2 (z = −1): dπ_w = −σ(1)/4  = −0.1827648, dπ_l = +0.1827648, dref_w = +0.1827648, dref_l = −0.1827648
    pi_w, pi_l, ref_w, ref_l = (torch.tensor(v, dtype=torch.float64, requires_grad=True)
                                for v in ([-1.0, -4.0], [-3.0, -1.0], [-2.0, -3.0], [-2.0, -2.0]))
    loss, r_w, r_l = dpo.dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)) + 0.5, rel=1e-12)
    assert r_w.tolist() == [0.5, -0.5] and r_l.tolist() == [-0.5, 0.5]
    assert not r_w.requires_grad and not r_l.requires_grad  # the implicit rewards are for logging
    loss.backward()
    g = [sig(-1) / 4, sig(1) / 4]
    assert pi_w.grad.tolist() == pytest.approx([-g[0], -g[1]], rel=1e-12)
    assert pi_l.grad.tolist() == pytest.approx([g[0], g[1]], rel=1e-12)
    assert ref_w.grad.tolist() == pytest.approx([g[0], g[1]], rel=1e-12)
    assert ref_l.grad.tolist() == pytest.approx([-g[0], -g[1]], rel=1e-12)


def test_policy_equal_to_reference_gives_log_2_exactly():
    # π_θ = π_ref: every log-ratio is 0, z = 0, −log σ(0) = log 2 for every pair, whatever the log-probs are.
    # The gradient is then the same for every pair: dL/dπ_w = −β σ(0) / n = −β / (2n).
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float64, torch.float32):
        w, l = (-10 * torch.rand(8, generator=g, dtype=dtype) for _ in range(2))
        pi_w, pi_l = w.clone().requires_grad_(), l.clone().requires_grad_()
        loss, r_w, r_l = dpo.dpo_loss(pi_w, pi_l, w, l, beta=0.1)
        assert loss.item() == torch.tensor(math.log(2), dtype=dtype).item()  # exactly, in either precision
        assert (r_w == 0).all() and (r_l == 0).all()
        loss.backward()
        assert pi_w.grad.tolist() == pytest.approx([-0.1 / 16] * 8, rel=1e-6)
        assert pi_l.grad.tolist() == pytest.approx([0.1 / 16] * 8, rel=1e-6)


def test_beta_to_zero_limit():
    # z = β Δ with Δ = ρ_w − ρ_l. Exactly −log σ(z) = log 2 − z/2 + log cosh(z/2) = log 2 − z/2 + z²/8 + O(z⁴), the
    # last terms between 0 and z²/8. So as β -> 0 the loss -> log 2, (loss − log 2) / β -> −mean Δ / 2,
    # and every gradient / β -> ± σ(0) / n = ± 1 / (2n): DPO forgets the pairs' content and just pushes every
    # chosen response up and every rejected one down with the same weight.
    g = torch.Generator().manual_seed(1)
    pi_w, pi_l, ref_w, ref_l = (-20 * torch.rand(5, generator=g, dtype=torch.float64) for _ in range(4))
    delta = (pi_w - ref_w) - (pi_l - ref_l)
    for beta in (1e-2, 1e-4, 1e-6):
        x = pi_w.clone().requires_grad_()
        loss, _, _ = dpo.dpo_loss(x, pi_l, ref_w, ref_l, beta)
        linear = math.log(2) - beta * delta.mean().item() / 2
        assert -1e-15 <= loss.item() - linear <= (beta * delta).pow(2).mean().item() / 8 + 1e-15
        loss.backward()
        assert (x.grad / beta).tolist() == pytest.approx([-1 / 10] * 5, rel=beta * delta.abs().max().item())


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 10.0])
def test_gradient_signs(beta):
    # Whatever the log-probs: raising log π_θ(y_w) lowers the loss, raising log π_θ(y_l) raises it, with equal and
    # opposite weights β σ(−z) / n in (0, β / n]; the reference enters with the opposite signs. (|z| < 20 β here,
    # so σ(−z) stays far from underflow; at β = 10 it rounds to 1 for the most wrongly ordered pairs.)
    g = torch.Generator().manual_seed(2)
    tensors = [(-10 * torch.rand(16, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(4)]
    loss, _, _ = dpo.dpo_loss(*tensors, beta)
    loss.backward()
    d_pw, d_pl, d_rw, d_rl = (t.grad for t in tensors)
    assert (d_pw < 0).all() and (d_pw >= -beta / 16).all()
    assert (d_pl > 0).all() and (d_rw > 0).all() and (d_rl < 0).all()
    torch.testing.assert_close(d_pl, -d_pw, rtol=0, atol=0)
    torch.testing.assert_close(d_rw, -d_pw, rtol=0, atol=0)


def test_loss_is_finite_for_huge_margins():
    # z = 1 x (−1000): −log σ(−1000) = 1000 + log(1 + e^−1000) = 1000; log(sigmoid(.)) would give inf
    loss, _, _ = dpo.dpo_loss(torch.tensor([-1000.0]), torch.tensor([0.0]), torch.tensor([0.0]),
                              torch.tensor([0.0]), beta=1.0)
    assert loss.item() == pytest.approx(1000.0, rel=1e-7)


@pytest.mark.parametrize("step, warmup, expected", [(0, 4, 0.25), (2, 4, 0.75), (3, 4, 1.0), (9, 4, 1.0),
                                                    (0, 0, 1.0), (7, 0, 1.0)])
def test_warmup_schedule(step, warmup, expected):
    # linear warm-up (s + 1) / W for s < W, then the peak; W = 0 is constant
    assert dpo.lr_at(step, warmup, peak=1.0) == expected


# ---------------------------------------------------------------------------------------------------------------
# Sequence log-probabilities
# ---------------------------------------------------------------------------------------------------------------
def loop_logprob(model, ids: list[int], n_prompt: int) -> float:
    """The twin: Σ over the response tokens t >= n_prompt (the EOS included) of log softmax(logits)[ids[t]], each
    prefix ids[:t] fed alone (no padding, no batch), one token at a time, summed in python floats."""
    total = 0.0
    for t in range(n_prompt, len(ids)):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[:t]])).logits[0, -1]
        total += torch.log_softmax(logits.double(), dim=-1)[ids[t]].item()
    return total


@pytest.fixture(scope="module")
def tiny(world):
    tokenizer = AutoTokenizer.from_pretrained(world.base_model)
    model = AutoModelForCausalLM.from_pretrained(world.base_model, dtype=torch.float32).eval()
    pairs = data.read_pairs(world.pairs_test)[:4]
    return tokenizer, model, pairs


def test_labels_mask_the_prompt_and_keep_the_eos(tiny):
    tokenizer, _, pairs = tiny
    (w_ids, w_labels, l_ids, l_labels), n_truncated = dpo.encode_pair(tokenizer, pairs[0], 64)
    assert n_truncated == 0
    for ids, labels, response in ((w_ids, w_labels, pairs[0]["chosen"]), (l_ids, l_labels, pairs[0]["rejected"])):
        n_prompt = len(data.prompt_ids(tokenizer, pairs[0]["prompt"]))
        r = tokenizer(response, add_special_tokens=False).input_ids
        assert labels == [-100] * n_prompt + r + [tokenizer.eos_token_id]
        assert ids[n_prompt:] == labels[n_prompt:]
    # collate: rows 0..n-1 chosen, n..2n-1 rejected; labels padded with −100, ids with PAD (≠ EOS)
    examples = [dpo.encode_pair(tokenizer, p, 64)[0] for p in pairs[:2]]
    ids, mask, labels = dpo.collate(examples, tokenizer.pad_token_id)
    assert ids.shape == labels.shape == mask.shape and ids.shape[0] == 4
    assert ids[2, : len(examples[0][2])].tolist() == examples[0][2]
    assert ((labels == -100) | (mask == 1)).all() and (ids[mask == 0] == tokenizer.pad_token_id).all()


def test_sequence_logprobs_match_the_per_token_loop(tiny):
    # The same pair's log-probabilities, batched, against the loop twin: right padding, left padding, the pair
    # alone, in other company (reversed order, a long sequence added), and packed without padding (packing.py;
    # what training and evaluation run). The twin sums in
    # float64, the function in fp32 (sums of -35 to -200 nats here): measured differences up to 2e-5; atol 5e-5,
    # far below one token's log-probability (about -6 nats on this random model), so a shift or a scored prompt
    # token shows.
    tokenizer, model, pairs = tiny
    examples = [dpo.encode_pair(tokenizer, p, 64)[0] for p in pairs]
    assert len({len(e[0]) for e in examples} | {len(e[2]) for e in examples}) > 2  # the rows do get padded
    expected = torch.tensor([loop_logprob(model, e[k], e[k + 1].count(-100)) for k in (0, 2) for e in examples],
                            dtype=torch.float64)  # (2n,) chosen rows, then rejected rows, as collate orders them
    with torch.no_grad():
        right = dpo.sequence_logprobs(model, *dpo.collate(examples, tokenizer.pad_token_id))
        left = dpo.sequence_logprobs(model, *dpo.collate(examples, tokenizer.pad_token_id, side="left"))
        alone = torch.cat([dpo.sequence_logprobs(model, *dpo.collate([e], tokenizer.pad_token_id))
                           for e in examples])  # (w0, l0, w1, l1, ...)
        long_pair = dpo.encode_pair(tokenizer, {"prompt": pairs[0]["prompt"], "chosen": pairs[0]["chosen"] * 3,
                                                "rejected": pairs[0]["rejected"] * 3}, 64)[0]
        company = dpo.sequence_logprobs(model, *dpo.collate([long_pair, *examples[::-1]], tokenizer.pad_token_id))
        packed = dpo.packed_logprobs(model, examples, tokenizer.pad_token_id)  # what training and evaluation run
    n = len(examples)
    for got in (right, left, torch.cat([alone[0::2], alone[1::2]]),
                torch.cat([company[1: n + 1].flip(0), company[n + 2:].flip(0)]), packed):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=5e-5)
    # the prompt is not scored: counting the prompt's tokens too would change every value by a lot
    w_ids, w_labels = examples[0][0], examples[0][1]
    with_prompt = loop_logprob(model, w_ids, 1)
    assert abs(with_prompt - expected[0].item()) > 1.0


# ---------------------------------------------------------------------------------------------------------------
# The stage: 1 process (in this process) and 2 processes (torchrun), 2 steps each
# ---------------------------------------------------------------------------------------------------------------
def stage_flags(world) -> list[str]:
    return ["--model", world.base_model, "--train", world.pairs_train, "--test", world.pairs_test, "--lr", str(LR),
            "--warmup-steps", "0", "--beta", "0.1", "--batch-size", "8", "--micro-batch-size", "4", "--max-len", "64",
            "--eval-batch-size", "8", "--log-every", "1", "--eval-prompts", world.eval_prompts, "--eval-samples", "4",
            "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def runs(world, run, tmp_path_factory):
    # --eval-every 1: an evaluation (no-grad forwards of both models, resharded under FSDP2) between the 2 steps
    folder = str(tmp_path_factory.mktemp("dpo"))
    one, two = os.path.join(folder, "one"), os.path.join(folder, "two")
    flags = [*stage_flags(world), "--max-steps", "2", "--eval-every", "1"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        dpo.main([*flags, "--out", one])
    rc, out, err = run(["dpo.py", *flags, "--out", two], nproc=2)
    assert rc == 0, out + err
    return dict(one=one, two=two, printed=printed.getvalue(), printed_two=out, root=folder)


def test_first_step_loss_is_log_2(runs):
    # at step 1 π_θ = π_ref = the same checkpoint on the same padded batch: bitwise equal log-probs (choice 1),
    # so every log-ratio and the margin are exactly 0 and the loss is log 2 exactly (in fp32: 0.6931471824645996)
    for folder in (runs["one"], runs["two"]):
        first = read_metrics(folder)[0]
        assert first["step"] == 1
        assert first["logratio_chosen"] == first["logratio_rejected"] == first["margin"] == 0.0
        assert first["acc"] == 0.0  # ties count as wrong (choice 6)
        assert first["loss"] == torch.tensor(math.log(2), dtype=torch.float32).item()
        assert math.isfinite(first["logp_chosen"]) and first["logp_chosen"] < 0


def test_stage_logs_saves_and_reports(world, runs):
    metrics = read_metrics(runs["one"])
    assert [m["step"] for m in metrics[:-1]] == [1, 1, 2, 2]  # step 1, eval @ 1, step 2, eval @ 2 (the final one)
    assert {"loss", "acc", "margin", "logratio_chosen", "logratio_rejected", "logp_chosen", "logp_rejected", "lr",
            "grad_norm", "pairs_per_s"} <= metrics[0].keys()
    assert {"eval_acc", "eval_margin", "eval_loss", "eval_logratio_chosen",
            "eval_logratio_rejected"} <= metrics[1].keys()
    assert ("eval_acc_gold" in metrics[1]) == world.testbed
    final = metrics[-1]
    assert 0.0 <= final["final_eos_rate"] <= 1.0 and ("final_gold_reward" in final) == world.testbed
    with open(os.path.join(runs["one"], "args.json")) as f:
        saved = json.load(f)
    assert saved["beta"] == 0.1 and saved["train"] == world.pairs_train
    assert "step 2/2 loss" in runs["printed"] and "eval @ 2:" in runs["printed"]
    assert "dpo samples: eos_rate" in runs["printed"]
    # under torchrun only rank 0 prints: each line once in the merged output of both workers
    assert runs["printed_two"].count("step 2/2 loss") == 1 and runs["printed_two"].count("eval @ 2:") == 1
    # the checkpoint is a plain AutoModelForCausalLM folder
    model = AutoModelForCausalLM.from_pretrained(runs["one"])
    assert type(model).__name__ == "LlamaForCausalLM"


def test_evaluation_against_plain_transformers(world, runs):
    # The final eval line (step 2) recomputed independently: transformers' own causal-LM loss (mean NLL over the
    # labelled tokens, shifted inside transformers) times the number of labelled tokens is −log π(y|x); each
    # sequence alone, no padding; the saved policy against the base model (= π_ref).
    tokenizer = AutoTokenizer.from_pretrained(world.base_model)
    policy = AutoModelForCausalLM.from_pretrained(runs["one"], dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(world.base_model, dtype=torch.float32).eval()

    def logp(model, prompt: str, response: str) -> float:
        ids, n_prompt, _ = data.encode(tokenizer, prompt, response, 64)
        labels = [-100] * n_prompt + ids[n_prompt:]
        with torch.no_grad():
            mean_nll = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
        return -mean_nll * (len(ids) - n_prompt)

    margins = []
    for p in data.read_pairs(world.pairs_test):
        r_w = 0.1 * (logp(policy, p["prompt"], p["chosen"]) - logp(ref, p["prompt"], p["chosen"]))
        r_l = 0.1 * (logp(policy, p["prompt"], p["rejected"]) - logp(ref, p["prompt"], p["rejected"]))
        margins.append(r_w - r_l)
    last_eval = [m for m in read_metrics(runs["one"]) if "eval_acc" in m][-1]
    assert last_eval["step"] == 2
    assert last_eval["eval_margin"] == pytest.approx(sum(margins) / len(margins), rel=1e-4, abs=1e-6)
    assert last_eval["eval_loss"] == pytest.approx(sum(math.log1p(math.exp(-m)) for m in margins) / len(margins),
                                                   rel=1e-6)
    assert last_eval["eval_acc"] == sum(m > 0 for m in margins) / len(margins)


def test_one_process_equals_two(world, runs):
    assert "x 2 accumulation x 1 processes" in runs["printed"]
    assert "x 1 accumulation x 2 processes" in runs["printed_two"]
    m1, m2 = read_metrics(runs["one"]), read_metrics(runs["two"])
    assert len(m1) == len(m2)
    for a, b in zip(m1, m2):
        assert a.keys() == b.keys() and a.get("step") == b.get("step")
        if "loss" in a:  # a training step
            assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL)
            assert b["acc"] == a["acc"]
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        for k in ("logratio_chosen", "logratio_rejected", "logp_chosen", "logp_rejected", "eval_logratio_chosen",
                  "eval_logratio_rejected"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=0, abs=LOGP_ATOL), k
        for k in ("margin", "eval_margin"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=0, abs=0.1 * LOGP_ATOL), k
        if "eval_loss" in a:
            assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=EVAL_RTOL)
            assert b["eval_acc"] == a["eval_acc"]
    diff, moved = max_param_diff(runs["one"], runs["two"], world.base_model)
    print(f"dpo: max |theta_1proc - theta_2proc| = {diff:.3g}; training moved parameters by up to {moved:.3g}")
    assert moved > 1e-4  # the steps did something
    assert diff <= PARAM_ATOL


def test_evaluate_judges_a_dpo_policy(world, runs, run):
    # evaluate.py needs nothing DPO-specific: the output folder is an AutoModelForCausalLM checkpoint
    if not world.testbed:
        pytest.skip("the gold judge needs the testbed world")
    out = os.path.join(runs["root"], "eval")
    rc, stdout, stderr = run(["evaluate.py", "--policy-a", runs["one"], "--policy-b", world.base_model, "--judge",
                              "gold", "--prompts", world.eval_prompts, "--max-new-tokens", "4", "--max-len", "64",
                              "--pairs-test", "", "--ood-pairs-test", "", "--out", out])
    assert rc == 0, stdout + stderr
    with open(os.path.join(out, "results.json")) as f:
        r = json.load(f)["win_tie_lose"]
    assert r["win"] + r["tie"] + r["lose"] == r["n"] == len(data.read_prompts(world.eval_prompts))


# ---------------------------------------------------------------------------------------------------------------
# Resume: 4 steps straight == killed right after the checkpoint of step 2 + --resume (test_reliability.py's recipe)
# ---------------------------------------------------------------------------------------------------------------
HOOKS = os.path.join("tests", "helpers", "run_with_hooks.py")


def test_resume_is_bit_identical(world, tmp_path):
    flags = [*stage_flags(world), "--max-steps", "4", "--save-every", "2", "--eval-every", "1"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")

    def crashed_then_resumed() -> str:
        p = subprocess.run([sys.executable, HOOKS, "--die-after-saves", "1", "dpo.py", *flags, "--out", resumed],
                           cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert p.returncode != 0, "the test hook should have killed the run after its first checkpoint"
        assert torch.load(os.path.join(resumed, "trainer_state.pt"), weights_only=False)["step"] == 2
        rc, out, err = run_command(["dpo.py", *flags, "--out", resumed, "--resume"])
        assert rc == 0, out + err
        return out

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        a = pool.submit(run_command, ["dpo.py", *flags, "--out", straight])
        b = pool.submit(crashed_then_resumed)
        rc, out, err = a.result()
        assert rc == 0, out + err
        printed = b.result()
    assert "--resume: continuing" in printed and "after step 2" in printed
    wa, wb = (load_file(os.path.join(f, "model.safetensors")) for f in (straight, resumed))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the same lines: steps, evaluations (π_ref's test log-probs recomputed after the resume) and the sample report
    assert read_metrics(straight, drop_timing=True) == read_metrics(resumed, drop_timing=True)
    assert [m["step"] for m in read_metrics(resumed) if "loss" in m] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, no traceback, nothing created or changed
# ---------------------------------------------------------------------------------------------------------------
# id -> (flags (with {tmp}), what the one error line must name)
CASES = {
    "missing_checkpoint": (["--model", "{tmp}/no_model"], "no_model: no such --model folder"),
    "no_weights": (["--model", "{tmp}/no_weights"], "no_weights: no *.safetensors weights"),
    "pad_is_eos": (["--model", "{tmp}/pad_is_eos"], "the tokenizer needs a PAD token distinct from EOS"),
    "malformed_jsonl": (["--train", "{tmp}/bad.jsonl"], "bad.jsonl:3: not valid JSON"),
    "missing_field": (["--test", "{tmp}/nofield.jsonl"], "nofield.jsonl:2: missing field 'rejected'"),
    "empty_file": (["--train", "{tmp}/empty.jsonl"], "empty.jsonl: empty file"),
    "missing_eval_prompts": (["--eval-prompts", "{tmp}/nope.jsonl"], "nope.jsonl: no such file"),
    "batch_not_divisible": (["--batch-size", "10"], "--batch-size 10 is not divisible by --micro-batch-size 4 x "
                                                    "world size 1"),
    "fewer_than_one_batch": (["--batch-size", "4096"], "fewer than one batch of 4096"),
    "beta_not_positive": (["--beta", "0"], "--beta 0.0: must be a finite number > 0"),
    "out_not_empty": (["--out", "{tmp}/existing"], "existing: output folder already holds files"),
    "unknown_flag": (["--betta", "0.2"], "unrecognized arguments: --betta"),
    "bad_flag_value": (["--beta", "strong"], "argument --beta: invalid float value: 'strong'"),
    "bad_choice": (["--data-format", "csv"], "argument --data-format: invalid choice: 'csv'"),
    # against a finished resumable run (--save-every 1) and one saved without --save-every (made in the fixture)
    "resume_changed_beta": (["--out", "{tmp}/resumable", "--save-every", "1", "--resume", "--beta", "0.2"],
                            "--resume with different settings than the checkpoint (--beta 0.1 -> 0.2)"),
    "resume_without_state": (["--out", "{tmp}/plain", "--resume"], "this checkpoint has no trainer_state.pt"),
    # lr 1e30: Adam's first step moves every weight by ~1e30, so step 2's forward overflows (a checkpoint per step)
    "non_finite": (["--out", "{tmp}/diverged", "--lr", "1e30", "--max-steps", "3", "--save-every", "1"],
                   "dpo step 2: gradient norm is nan; stopping (the last saved checkpoint is untouched)"),
}


def error_flags(world, out: str) -> list[str]:
    """A command line that runs (1 step, toy size) when the case's flags do not break it; those override."""
    return ["dpo.py", "--model", world.base_model, "--train", world.pairs_train, "--test", "", "--eval-prompts", "",
            "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "1", "--max-len", "64", "--out", out]


def snapshot(folder: str) -> dict:
    """name -> (mtime_ns, bytes) of every file below `folder` ({} when it does not exist)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = (os.stat(path).st_mtime_ns, f.read())
    return out


@pytest.fixture(scope="module")
def errors(world, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("dpo_errors"))
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    with open(f"{tmp}/bad.jsonl", "w") as f:
        f.write(f"{good}\n\n{{\"prompt\": \"p\", \"chosen\": \n{good}\n")  # line 3 is cut short
    with open(f"{tmp}/nofield.jsonl", "w") as f:
        f.write(good + "\n" + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    open(f"{tmp}/empty.jsonl", "w").close()
    os.makedirs(f"{tmp}/no_weights")  # config and tokenizer, but the weights never got written
    for name in os.listdir(world.base_model):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(world.base_model, name), f"{tmp}/no_weights")
    shutil.copytree(world.base_model, f"{tmp}/pad_is_eos")
    tokenizer = AutoTokenizer.from_pretrained(world.base_model)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(f"{tmp}/pad_is_eos")
    os.makedirs(f"{tmp}/existing")
    with open(f"{tmp}/existing/metrics.jsonl", "w") as f:
        f.write('{"step": 1}\n')
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        made = [pool.submit(run_command, [*error_flags(world, f"{tmp}/resumable"), "--save-every", "1"]),
                pool.submit(run_command, error_flags(world, f"{tmp}/plain"))]
        for future in made:
            rc, out, err = future.result()
            assert rc == 0, out + err

    def launch(case: str) -> dict:
        flags = [f.format(tmp=tmp) for f in CASES[case][0]]
        out = flags[flags.index("--out") + 1] if "--out" in flags else f"{tmp}/out_{case}"
        before = snapshot(out)
        rc, stdout, stderr = run_command([*error_flags(world, out), *flags], timeout=120)
        return dict(rc=rc, stdout=stdout, stderr=stderr, out=out, before=before, after=snapshot(out),
                    out_exists=os.path.exists(out))

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case: pool.submit(launch, case) for case in CASES}
        return {case: f.result() for case, f in futures.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_clear_line(errors, case):
    r = errors[case]
    lines = r["stderr"].strip().splitlines()
    assert r["rc"] == 2, r
    assert "Traceback" not in r["stdout"] + r["stderr"]
    assert lines and lines[-1].startswith("error: ") and CASES[case][1] in lines[-1], r["stderr"]
    assert sum(line.startswith("error: ") for line in lines) == 1
    if case == "non_finite":  # the checkpoint of step 1 survives; step 2 saved nothing
        assert torch.load(os.path.join(r["out"], "trainer_state.pt"), weights_only=False)["step"] == 1
    elif r["before"]:  # nothing written: an existing folder is byte for byte as it was, or no folder was created
        assert r["after"] == r["before"]
    else:
        assert not r["out_exists"], f"{r['out']} was created"


def test_resume_of_a_finished_run_does_nothing(world, errors):
    out = errors["resume_changed_beta"]["out"]
    before = snapshot(out)
    rc, stdout, stderr = run_command([*error_flags(world, out), "--save-every", "1", "--resume"])
    assert rc == 0, stderr
    assert f"--resume: {out} is a finished run (1 steps); nothing to do" in stdout
    assert snapshot(out) == before
