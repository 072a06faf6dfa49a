"""ppo.py's on-policy separation metrics of the held-out evaluation (evaluate_policy): does the RM
still order the policy's own samples of one prompt as the gold reward does, and how far apart does
it score them? The pure functions (onpolicy_sums, onpolicy_metrics) against hand-derived values and
against a brute-force count over itertools.combinations; then one short ppo.py run on the test
world, whose eval lines in metrics.jsonl must carry the new keys.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import statistics

import pytest
import torch

import ppo


def brute_force(scores: list[float], golds: list[float], k: int) -> dict[str, float]:
    """The metrics written out again with plain Python: every pair of one prompt's k samples, ties
    spelled out, pairs of equal gold skipped; population std by statistics.pstdev."""
    agree, pairs, r_spread, g_spread = 0.0, 0, [], []
    for p in range(len(scores) // k):
        s, g = scores[p * k:(p + 1) * k], golds[p * k:(p + 1) * k]
        for a, b in itertools.combinations(range(k), 2):
            if g[a] == g[b]:
                continue  # no right order: left out
            pairs += 1
            if s[a] == s[b]:
                agree += 0.5  # an RM tie
            elif (s[a] > s[b]) == (g[a] > g[b]):
                agree += 1.0
        r_spread.append(statistics.pstdev(s))
        g_spread.append(statistics.pstdev(g))
    return {"eval_onpolicy_acc": agree / pairs if pairs else float("nan"),
            "eval_onpolicy_pairs": pairs,
            "eval_reward_spread": sum(r_spread) / len(r_spread),
            "eval_gold_spread": sum(g_spread) / len(g_spread)}


def metrics(scores: list[float], golds: list[float] | None, k: int) -> dict[str, float]:
    """onpolicy_sums then onpolicy_metrics, as evaluate_policy calls them (one process)."""
    g = torch.tensor(golds, dtype=torch.float64) if golds is not None else None
    sums = ppo.onpolicy_sums(torch.tensor(scores), g, k)
    return ppo.onpolicy_metrics(sums, has_gold=golds is not None)


def assert_same(got: dict[str, float], expected: dict[str, float]) -> None:
    assert got.keys() == expected.keys()
    for key, v in expected.items():
        if math.isnan(v):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(v, rel=1e-12, abs=1e-12), key


def test_hand_example_k3():
    # k = 3, scores (1, 2, 3), gold (0, 1, 1):
    #   pair (0, 1): RM 1 < 2, gold 0 < 1 -> agrees
    #   pair (0, 2): RM 1 < 3, gold 0 < 1 -> agrees
    #   pair (1, 2): gold 1 = 1           -> left out
    # acc = 2 / 2 = 1.0 on 2 pairs; RM spread = pstdev(1, 2, 3) = √((1 + 0 + 1) / 3) = √(2/3);
    # gold spread = pstdev(0, 1, 1): mean 2/3, √((4/9 + 1/9 + 1/9) / 3) = √(2/9) = √2 / 3
    got = metrics([1.0, 2.0, 3.0], [0.0, 1.0, 1.0], k=3)
    assert got["eval_onpolicy_acc"] == 1.0 and got["eval_onpolicy_pairs"] == 2
    assert got["eval_reward_spread"] == pytest.approx(math.sqrt(2 / 3), rel=1e-12)
    assert got["eval_gold_spread"] == pytest.approx(math.sqrt(2) / 3, rel=1e-12)
    assert_same(got, brute_force([1.0, 2.0, 3.0], [0.0, 1.0, 1.0], 3))


def test_hand_example_ties_and_disagreements():
    # two prompts, k = 3
    # prompt 0: scores (3, 1, 1), gold (0, 1, 2)
    #   (0, 1): RM 3 > 1, gold 0 < 1 -> disagrees (0)
    #   (0, 2): RM 3 > 1, gold 0 < 2 -> disagrees (0)
    #   (1, 2): RM tie 1 = 1, gold 1 < 2 -> 0.5
    # prompt 1: scores (0, 5, 2), gold (4, 4, 4): every gold equal -> all three pairs left out
    # acc = 0.5 / 3 on 3 pairs;
    # RM spread = mean(pstdev(3, 1, 1), pstdev(0, 5, 2)):
    #   (3, 1, 1): mean 5/3, squares 16/9 + 4/9 + 4/9 = 24/9, / 3 -> 8/9, std √8 / 3
    #   (0, 5, 2): mean 7/3, squares 49/9 + 64/9 + 1/9 = 114/9, / 3 -> 38/9, std √38 / 3
    # gold spread = mean(pstdev(0, 1, 2), 0) = mean(√(2/3), 0)
    scores, golds = [3.0, 1.0, 1.0, 0.0, 5.0, 2.0], [0.0, 1.0, 2.0, 4.0, 4.0, 4.0]
    got = metrics(scores, golds, k=3)
    assert got["eval_onpolicy_acc"] == pytest.approx(0.5 / 3, rel=1e-12)
    assert got["eval_onpolicy_pairs"] == 3
    assert got["eval_reward_spread"] == pytest.approx((math.sqrt(8) + math.sqrt(38)) / 6, rel=1e-12)
    assert got["eval_gold_spread"] == pytest.approx(math.sqrt(2 / 3) / 2, rel=1e-12)
    assert_same(got, brute_force(scores, golds, 3))


def test_no_pairs_is_nan_and_no_gold_leaves_the_gold_keys_out():
    # gold all equal within each prompt: no pair has a right order -> acc NaN, 0 pairs
    got = metrics([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 2.0, 2.0], k=2)
    assert math.isnan(got["eval_onpolicy_acc"]) and got["eval_onpolicy_pairs"] == 0
    assert got["eval_reward_spread"] == pytest.approx(0.5)  # pstdev of (1, 2) and of (3, 4): 0.5
    # prompts without gold (not the testbed's): only the RM's spread
    assert metrics([1.0, 2.0, 3.0, 4.0], None, k=2) == {"eval_reward_spread": 0.5}


@pytest.mark.parametrize("k", [2, 3, 5])
def test_random_tensors_match_brute_force(k):
    gen = torch.Generator().manual_seed(k)
    for trial in range(20):
        m = int(torch.randint(1, 6, (1,), generator=gen))
        if trial % 2 == 0:  # small integers: many RM ties and many equal-gold pairs
            scores = torch.randint(0, 3, (m * k,), generator=gen).float().tolist()
            golds = torch.randint(0, 3, (m * k,), generator=gen).double().tolist()
        else:               # continuous: no ties
            scores = torch.randn(m * k, generator=gen).tolist()
            golds = torch.randn(m * k, generator=gen, dtype=torch.float64).tolist()
        assert_same(metrics(scores, golds, k), brute_force(scores, golds, k))


def test_sums_add_over_ranks():
    # what all_reduce_sum does: the sums of two halves (two ranks, whole prompts each) added give
    # the metrics of the whole
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (4 * 3,), generator=gen).float()
    golds = torch.randint(0, 4, (4 * 3,), generator=gen).double()
    halves = [ppo.onpolicy_sums(scores[r * 6:(r + 1) * 6], golds[r * 6:(r + 1) * 6], 3)
              for r in (0, 1)]
    total = {key: halves[0][key] + halves[1][key] for key in halves[0]}
    assert_same(ppo.onpolicy_metrics(total, has_gold=True),
                brute_force(scores.tolist(), golds.tolist(), 3))


def test_eval_lines_of_a_short_run_carry_the_onpolicy_metrics(world, rm_checkpoint, tmp_path,
                                                             capsys):
    # one PPO iteration from the world's base model with an untrained RM head; the held-out eval at
    # iterations 0 and 1 samples k = 3 responses per prompt in generate() calls of 4, so most
    # prompts' samples span two calls (evaluate_policy groups them after the loop)
    out = str(tmp_path / "ppo")
    ppo.main(["--sft", world.base_model, "--rm", rm_checkpoint, "--prompts", world.rl_prompts,
              "--out", out, "--iterations", "1", "--sample-every", "0", "--save-every", "0",
              "--rollouts-per-prompt", "2", "--prompts-per-iteration", "4",
              "--mini-batch-size", "8", "--max-new-tokens", "8",
              "--eval-prompts", world.eval_prompts, "--eval-samples", "3",
              "--generation-batch-size", "4", "--micro-batch-size", "4"])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        evals = [m for m in map(json.loads, f) if "eval_kl" in m]
    assert [m["iteration"] for m in evals] == [0, 1]
    n_prompts = sum(1 for _ in open(world.eval_prompts))
    for m in evals:
        assert m["eval_reward_spread"] >= 0.0
        if world.testbed:
            assert 0 <= m["eval_onpolicy_pairs"] <= n_prompts * 3  # C(3, 2) = 3 pairs per prompt
            acc = m["eval_onpolicy_acc"]
            assert math.isnan(acc) if m["eval_onpolicy_pairs"] == 0 else 0.0 <= acc <= 1.0
            assert m["eval_gold_spread"] >= 0.0
        else:
            assert "eval_onpolicy_acc" not in m and "eval_gold_spread" not in m
    # an untrained head on random weights does score different responses differently
    assert evals[0]["eval_reward_spread"] > 0
    printed = capsys.readouterr().out
    assert sum("RM spread" in line for line in printed.splitlines()) == 2
    assert ("on-policy RM accuracy" in printed) == world.testbed
