"""Hand-derived values for evaluate.py: verdict parsing, win/tie/lose arithmetic, the judges'
bookkeeping, reward-gap normalisation, BLEU / Self-BLEU and distinct-n."""
import math
import os
import random

import pytest
import torch

import evaluate
from plumbing import figures
from plumbing.common import UserError


# --------------------------------------------------------------------------------------------------
# Judges
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "C"),
    ("[[a]]", "A"), ("[[c]]", "C"),  # lower case
    ("Reply B answers the question directly. Verdict: [[B]]", "B"),  # extra text around
    ("[[A]] ... so my final verdict is [[A]].", "A"),  # the same tag twice is one verdict
    ("garbage", None), ("", None), (None, None),
    ("[A]", None), ("[[D]]", None), ("[[ A ]]", None), ("A", None),  # not the tag
    ("[[A]] or maybe [[B]]", None), ("[[B]] [[C]]", None),  # conflicting tags: ambiguous
])
def test_parse_verdict(text, expected):
    assert evaluate.parse_verdict(text) == expected


def test_win_tie_lose_by_hand():
    # 3 wins, 1 tie, 4 losses, 2 invalid: n = 10, valid = 8 -> 3/8 = 37.5 %, 1/8 = 12.5 %,
    # 4/8 = 50 %
    t = evaluate.win_tie_lose(["win"] * 3 + ["tie"] + ["lose"] * 4 + ["invalid"] * 2)
    assert (t["win"], t["tie"], t["lose"], t["invalid"], t["n"]) == (3, 1, 4, 2, 10)
    assert (t["win_pct"], t["tie_pct"], t["lose_pct"]) == (37.5, 12.5, 50.0)
    # nothing valid: no percentages (None, not a division by zero, and not 0.0, which would read as
    # a result)
    t = evaluate.win_tie_lose(["invalid"])
    assert (t["invalid"], t["win_pct"], t["tie_pct"], t["lose_pct"]) == (1, None, None, None)


def test_judge_by_scores_margin():
    # d = 0.5 -> win; d = 0 -> tie; |d| = 0.005 < 0.01 -> tie; d = -0.3 -> lose; a missing gold
    # score -> invalid
    j = evaluate.judge_by_scores([1.0, 0.5, 0.2, 0.0, None], [0.5, 0.5, 0.205, 0.3, 1.0],
                                 margin=0.01)
    assert [x["outcome"] for x in j] == ["win", "tie", "tie", "lose", "invalid"]
    assert j[-1]["reason"]
    # margin 0: only exactly equal scores tie, so d = -0.005 loses
    j = evaluate.judge_by_scores([0.5, 0.2], [0.5, 0.205], margin=0.0)
    assert [x["outcome"] for x in j] == ["tie", "lose"]


def _shown(messages):
    """The two replies as the judge sees them: (text under [Reply A], text under [Reply B])."""
    user = messages[1]["content"]
    a = user.split("[Reply A]\n")[1].split("\n\n[Reply B]")[0]
    b = user.split("[Reply B]\n")[1].split("\n\nExplain")[0]
    return a, b


def test_position_biased_judge_gives_only_ties_with_both_orders():
    # A judge that always answers [[A]] prefers whatever is shown first. Asked in both orders it
    # names policy A once and policy B once: the orders disagree, which counts as a tie, on every
    # prompt.
    always_first = lambda messages: ("Verdict: [[A]]", None)
    n = 20
    prompts, a, b = ([f"p{i}" for i in range(n)], [f"a{i}" for i in range(n)],
                     [f"b{i}" for i in range(n)])
    j = evaluate.judge_llm(prompts, a, b, always_first, both_orders=True, seed=0)
    assert [x["outcome"] for x in j] == ["tie"] * n
    assert all(x["orders_disagree"] for x in j)
    # One order only: it "wins" exactly where A happened to be shown first; the seeded coin gives
    # both cases.
    j = evaluate.judge_llm(prompts, a, b, always_first, both_orders=False, seed=0)
    assert [x["outcome"] for x in j] == ["win" if x["a_first"] else "lose" for x in j]
    assert 0 < sum(x["a_first"] for x in j) < n
    # the same seed gives the same orders
    assert [x["a_first"] for x in j] == [x["a_first"] for x in
                                         evaluate.judge_llm(prompts, a, b, always_first,
                                                            both_orders=False, seed=0)]


def test_content_judge_maps_positions_back_to_policies():
    # A judge that prefers the reply "good" wherever it is shown: policy A (always "good") wins in
    # every order.
    def prefers_good(messages):
        first, second = _shown(messages)
        assert {first, second} == {"good", "bad"}
        return ("[[A]]" if first == "good" else "[[B]]"), None

    n = 10
    j = evaluate.judge_llm(["q"] * n, ["good"] * n, ["bad"] * n, prefers_good, both_orders=False,
                           seed=1)
    assert [x["outcome"] for x in j] == ["win"] * n
    j = evaluate.judge_llm(["q"] * n, ["bad"] * n, ["good"] * n, prefers_good, both_orders=True,
                           seed=1)
    assert [x["outcome"] for x in j] == ["lose"] * n and not any(x["orders_disagree"] for x in j)
    tie = evaluate.judge_llm(["q"], ["good"], ["bad"], lambda m: ("[[C]]", None), both_orders=True,
                             seed=0)
    assert tie[0]["outcome"] == "tie" and not tie[0]["orders_disagree"]


def test_failed_or_unparseable_answers_are_invalid_with_reason():
    failed = evaluate.judge_llm(["q"], ["a"], ["b"],
                                lambda m: (None, "HTTP 500 (after 3 attempts)"),
                                both_orders=False, seed=0)
    assert failed[0]["outcome"] == "invalid"
    assert failed[0]["reason"] == "HTTP 500 (after 3 attempts)"
    garbage = evaluate.judge_llm(["q"], ["a"], ["b"], lambda m: ("I cannot decide.", None),
                                 both_orders=False, seed=0)
    assert garbage[0]["outcome"] == "invalid" and "verdict" in garbage[0]["reason"]
    # both orders: one good answer and one garbage answer -> invalid
    answers = iter([("[[A]]", None), ("[[A]] [[B]]", None)])
    mixed = evaluate.judge_llm(["q"], ["a"], ["b"], lambda m: next(answers), both_orders=True,
                               seed=0)
    assert mixed[0]["outcome"] == "invalid"
    assert evaluate.win_tie_lose([x["outcome"] for x in failed + garbage + mixed])["invalid"] == 3


def test_judge_prompt_holds_prompt_and_both_replies():
    m = evaluate.judge_messages("\n\nHuman: What is 2 plus 2?\n\nAssistant:", " 4", " five")
    assert [x["role"] for x in m] == ["system", "user"]
    assert "What is 2 plus 2?" in m[1]["content"] and _shown(m) == ("4", "five")
    for phrase in ("[[A]]", "[[B]]", "[[C]]", "helpful", "harmless", "order", "longer"):
        assert phrase in m[1]["content"]


# --------------------------------------------------------------------------------------------------
# Reward gaps (Fig. 5)
# --------------------------------------------------------------------------------------------------
def test_normalised_gaps_by_hand():
    # rewards of k = 3 responses for 2 prompts; min 0, max 4 over all six -> r̃ = r / 4:
    # prompt 1: r̃ = 0, 0.25, 1 -> pairs (0,1) 0.25, (0,2) 1, (1,2) 0.75;
    # prompt 2: all 0.5 -> gaps 0, 0, 0
    scores = torch.tensor([[0.0, 1.0, 4.0], [2.0, 2.0, 2.0]])
    expected = [0.25, 1.0, 0.75, 0.0, 0.0, 0.0]
    assert evaluate.normalised_gaps(scores).tolist() == pytest.approx(expected)
    # invariant to r -> a·r + b (a > 0): a Bradley–Terry RM's shift and scale say nothing about
    # discrimination
    assert evaluate.normalised_gaps(3.0 * scores - 7.0).tolist() == pytest.approx(expected)
    # all rewards equal: no spread at all -> all gaps 0 (not NaN)
    assert evaluate.normalised_gaps(torch.full((2, 3), 1.5)).tolist() == [0.0] * 6


def test_gap_histogram_by_hand():
    # 2 bins over [0, 1]: [0, 0.5) holds 0 and 0.25; [0.5, 1] holds 0.5 and 1.0 (the last bin
    # includes 1)
    h = evaluate.gap_histogram(torch.tensor([0.0, 0.25, 0.5, 1.0]), bins=2)
    assert h["edges"] == [0.0, 0.5, 1.0] and h["fractions"] == [0.5, 0.5]


# --------------------------------------------------------------------------------------------------
# Diversity (Table 3)
# --------------------------------------------------------------------------------------------------
def test_distinct_n_by_hand():
    texts = ["a b a b", "a b c"]
    # unigrams: a b a b a b c -> 7 in all, 3 unique
    assert evaluate.distinct_n(texts, 1) == pytest.approx(3 / 7)
    # bigrams: (a b) (b a) (a b) | (a b) (b c) -> 5 in all, unique {ab, ba, bc} = 3
    assert evaluate.distinct_n(texts, 2) == pytest.approx(3 / 5)
    # trigrams: (a b a) (b a b) | (a b c) -> 3, all unique
    assert evaluate.distinct_n(texts, 3) == 1.0
    assert evaluate.distinct_n(texts, 5) == 0.0  # no 5-gram anywhere


def test_bleu_by_hand():
    # clipping: hyp "a a a a" vs ref "a a b c": 'a' counts at most 2 times -> p1 = 2/4; lengths
    # equal -> BP 1
    assert evaluate.bleu("a a a a", ["a a b c"], 1) == pytest.approx(0.5)
    # p1 = 2/3 (the, cat), p2 = 1/2 (the cat); c = r = 3 -> BLEU-2 = sqrt(2/3 · 1/2) = sqrt(1/3)
    assert evaluate.bleu("the cat sat", ["the cat ran"], 2) == pytest.approx(math.sqrt(1 / 3))
    # no matching trigram -> 0 (no smoothing)
    assert evaluate.bleu("the cat sat", ["the cat ran"], 3) == 0.0
    # brevity penalty: p1 = p2 = 1 but c = 2 < r = 4 -> exp(1 − 4/2) = e^-1
    assert evaluate.bleu("a b", ["a b c d"], 2) == pytest.approx(math.exp(-1))
    # closest reference length: hyp "a b c" (c = 3) vs refs "a" (1) and "a b c d e" (5): both at
    # distance 2, the shorter wins -> r = 1 < c -> BP = 1 (the longer would give exp(1 − 5/3));
    # p1 = 3/3, p2 = 2/2 from the long ref
    assert evaluate.bleu("a b c", ["a", "a b c d e"], 2) == pytest.approx(1.0)
    # several references: the clipping count is the max over references: 'a' twice in ref 2
    # -> p1 = 2/2, p2 = 1/1
    assert evaluate.bleu("a a", ["a b", "a a"], 2) == pytest.approx(1.0)
    assert evaluate.bleu("", ["a b"], 2) == 0.0


def test_self_bleu_by_hand():
    # identical texts: every p_n = 1 and lengths equal -> 1 for n up to the text length (4); no
    # 5-gram -> 0
    same = ["a b c d"] * 3
    assert [evaluate.self_bleu(same, n) for n in (2, 3, 4)] == pytest.approx([1.0, 1.0, 1.0])
    assert evaluate.self_bleu(same, 5) == 0.0
    # two texts: each is the other's only reference; BLEU-2 = sqrt(1/3) both ways
    # (test_bleu_by_hand)
    assert evaluate.self_bleu(["the cat sat", "the cat ran"], 2) == pytest.approx(math.sqrt(1 / 3))
    # "a b" vs two copies of "a b c d": precisions 1, c = 2, r = 4 -> e^-1; each "a b c d" vs
    # {"a b", "a b c d"}: precisions 1 (its copy), closest length 4 -> BP 1 -> 1.
    # Mean (e^-1 + 1 + 1) / 3
    assert evaluate.self_bleu(["a b", "a b c d", "a b c d"], 2) == pytest.approx(
        (math.exp(-1) + 2) / 3)
    # all different words: nothing matches -> 0 (most diverse)
    assert evaluate.self_bleu(["a b", "c d", "e f"], 2) == 0.0
    with pytest.raises(UserError):
        evaluate.self_bleu(["only one"], 2)


def test_self_bleu_equals_bleu_against_all_others():
    # the linear-time Self-BLEU (largest / second-largest counts) == the textbook loop over
    # bleu(text, others)
    rng = random.Random(0)
    texts = [" ".join(rng.choice("a b c d e") for _ in range(rng.randint(0, 9))) for _ in range(30)]
    texts += [texts[3], texts[3]]  # duplicates: the n-gram's largest count is held by several texts
    for n in (2, 3, 4, 5):
        loop = sum(evaluate.bleu(t, texts[:i] + texts[i + 1:], n)
                   for i, t in enumerate(texts)) / len(texts)
        assert evaluate.self_bleu(texts, n) == pytest.approx(loop, abs=1e-12)


def test_diversity_keys():
    d = evaluate.diversity(["a b c d e f", "a b c x y z", "q r s t u v"])
    assert sorted(d) == sorted([f"self_bleu_{n}" for n in range(2, 6)]
                               + [f"distinct_{n}" for n in range(2, 6)])


# --------------------------------------------------------------------------------------------------
# Plumbing
# --------------------------------------------------------------------------------------------------
def test_parse_named():
    assert evaluate.parse_named("vanilla=runs/rm, meta=runs/r1/meta_rm", "--rms") == {
        "vanilla": "runs/rm", "meta": "runs/r1/meta_rm"}
    assert evaluate.parse_named("runs/r1/rm/,runs/r2/ppo/metrics.jsonl", "--x") == {
        "rm": "runs/r1/rm/", "ppo": "runs/r2/ppo/metrics.jsonl"}
    assert evaluate.parse_named("", "--rms") == {}
    with pytest.raises(UserError, match="twice"):
        evaluate.parse_named("runs/a/rm,runs/b/rm", "--rms")


def test_figures_are_pngs(tmp_path):
    rows = {f"round {r} vs SFT": evaluate.win_tie_lose(["win"] * r + ["tie"] * 2 + ["lose"])
            for r in (1, 2, 3)}
    figures.plot_win_tie_lose(rows, str(tmp_path / "wtl.png"))
    figures.plot_gap_histograms({"vanilla": [0.0, 0.1, 0.15],
                                 "metarm": torch.tensor([0.2, 0.6, 1.0])},
                                str(tmp_path / "gaps.png"), bins=10)
    figures.plot_curves({"score": {"run": ([1, 2, 3], [0.1, 0.2, 0.4])},
                         "gold": {"run": (["sft", "r1"], [1, 2])}},
                        str(tmp_path / "curves.png"), xlabel="x")
    for name in ("wtl.png", "gaps.png", "curves.png"):
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(tmp_path / "wtl.png") > 1000


def test_markdown_table():
    # a header line, a separator with one "---|" per column, then one line per row; a float cell
    # gets 4 decimals, anything else its str()
    assert figures.markdown_table(["run", "acc", "n"], [["a", 0.5, 3], ["b", 2 / 3, "-"]]) == (
        "| run | acc | n |\n"
        "|---|---|---|\n"
        "| a | 0.5000 | 3 |\n"
        "| b | 0.6667 | - |\n")
