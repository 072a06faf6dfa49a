"""evaluate.py end to end at toy size on the test world, as a user runs it (a subprocess): every part at once, then
the numbers that are known without running the code, and the files a reader opens (JSON, markdown, PNGs).

Known values: policy A and policy B are the same checkpoint decoded greedily, so their responses are identical and
every gold judgment is a tie. The two "reward models" are the same checkpoint (the base model with a fresh head,
seeded), so their accuracies, gaps and variances are equal. The two Fig. 1 checkpoints are the same policy sampled
with the same seed, so their variances are equal. The curves come from metrics files written here by hand.
"""
import json
import os

import pytest

import evaluate
from plumbing.common import UserError
from conftest import run_command

PNG = b"\x89PNG\r\n\x1a\n"


def test_evaluate_end_to_end(world, rm_checkpoint, tmp_path):
    rm_log, ppo_log = tmp_path / "rm_metrics.jsonl", tmp_path / "ppo_metrics.jsonl"
    rm_log.write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "loss": 0.7},                                   # a training line: no eval keys, skipped
        {"step": 0, "eval_acc": 0.5, "eval_acc_gold": 0.55},
        {"step": 10, "eval_acc": 0.625, "eval_acc_gold": 0.75}]))
    ppo_log.write_text("".join(json.dumps({"iteration": i, "score": 0.1 * i, "gold": 1.0 - 0.2 * i}) + "\n"
                               for i in (1, 2, 3)))
    out = tmp_path / "eval"
    n = 6
    rc, stdout, stderr = run_command([
        "evaluate.py", "--policy-a", world.base_model, "--policy-b", world.base_model, "--judge", "gold",
        "--prompts", world.eval_prompts, "--max-prompts", str(n), "--max-new-tokens", "8",
        "--rms", f"first={rm_checkpoint},second={rm_checkpoint}",
        "--pairs-test", world.pairs_test, "--ood-pairs-test", world.ood_pairs_test,
        "--gap-policy", world.base_model, "--gap-k", "3", "--gap-bins", "10",
        "--diff-checkpoints", f"early={world.base_model},late={world.base_model}",
        "--rm-metrics", f"r0={rm_log}", "--ppo-metrics", f"p0={ppo_log}", "--out", str(out),
        # off the testbed the gold judge knows no prompt: every judgment is invalid, which would fail the run
        *([] if world.testbed else ["--max-invalid", "1"])], timeout=120)
    assert rc == 0, stderr
    results = json.loads((out / "results.json").read_text())

    # win / tie / lose: identical greedy responses -> all ties on the testbed (no gold reward elsewhere: invalid)
    w = results["win_tie_lose"]
    assert w["n"] == n and w["a"] == "base_model (A)" and w["b"] == "base_model (B)"
    if world.testbed:
        assert (w["win"], w["tie"], w["lose"], w["invalid"], w["tie_pct"]) == (0, n, 0, 0, 100.0)
        assert w["gold_mean_a"] == w["gold_mean_b"]
    else:
        assert w["invalid"] == n
    judgments = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(judgments) == n and all(j["response_a"] == j["response_b"] for j in judgments)

    # reward models: the same checkpoint twice -> the same numbers
    rms = results["reward_models"]
    assert list(rms) == ["first", "second"]
    for split in ("test", "ood_test"):
        assert 0.0 <= rms["first"][split]["acc"] <= 1.0
        assert rms["first"][split] == rms["second"][split]
    gaps = rms["first"]["gaps"]
    assert gaps["k"] == 3 and gaps["prompts"] == n
    assert len(gaps["histogram"]["fractions"]) == 10 and sum(gaps["histogram"]["fractions"]) == pytest.approx(1.0)
    assert 0.0 <= gaps["normalised_mean"] <= 1.0
    assert gaps == rms["second"]["gaps"]
    # Fig. 1: the same policy, the same seed -> the same samples -> the same variance, for each RM
    assert list(rms["first"]["diff12_var"]) == ["early", "late"]
    assert rms["first"]["diff12_var"]["early"] == rms["first"]["diff12_var"]["late"]
    gap_lines = (out / "gap_scores.jsonl").read_text().splitlines()
    assert len(gap_lines) == n and len(json.loads(gap_lines[0])["scores"]["first"]) == 3

    # diversity of every set of responses, Self-BLEU in [0, 1]
    assert set(results["diversity"]) == {"base_model (A)", "base_model (B)", "checkpoint early", "checkpoint late"}
    assert all(0.0 <= v <= 1.0 for d in results["diversity"].values() for v in d.values())

    # curves: exactly the hand-written numbers, eval lines only
    assert results["rm_curves"]["r0"]["eval_acc"] == [[0, 10], [0.5, 0.625]]
    assert results["ppo_curves"]["p0"]["gold"] == [[1, 2, 3], pytest.approx([0.8, 0.6, 0.4])]

    # figures and report
    for name in ("win_tie_lose", "reward_gaps", "diff_variance", "rm_accuracy", "ppo_rewards"):
        assert results["figures"][name] == f"{name}.png"
        assert (out / f"{name}.png").read_bytes()[:8] == PNG
    report = (out / "report.md").read_text()
    for section in ("Win / tie / lose", "Reward-model accuracy", "Distinguishing ability", "Fig. 1", "Diversity",
                    "RM accuracy over training steps", "gold reward over PPO"):
        assert section in report
    if world.testbed:
        assert "| base_model (A) vs base_model (B) | 0.0 | 100.0 | 0.0 | 0 | 6 | 0 | 0 |" in report
    assert "| r0 | 0.6250 | 0.7500 |" in report
    assert "![reward gaps](reward_gaps.png)" in report


def test_user_errors_are_one_line_before_anything_is_written(world, tmp_path):
    out = tmp_path / "never"
    cases = [
        (["--policy-a", world.base_model], "go together"),
        (["--policy-a", world.base_model, "--policy-b", world.base_model, "--judge", "rm"], "--judge-rm"),
        ([], "nothing to evaluate"),
        (["--rms", world.base_model, "--gap-set", "x.jsonl", "--gap-policy", world.base_model], "alternatives"),
        (["--gap-policy", world.base_model], "--rms"),
        (["--rms", str(tmp_path / "missing")], "no such"),
        (["--rm-metrics", str(tmp_path / "missing.jsonl")], "no such metrics file"),
    ]
    # the world's files, not the defaults (runs/testbed/... does not exist in a fresh checkout)
    files = ["--prompts", world.eval_prompts, "--pairs-test", world.pairs_test, "--ood-pairs-test", world.ood_pairs_test]
    for argv, message in cases:
        with pytest.raises(UserError, match=message):
            evaluate.main(argv + files + ["--out", str(out)])
    assert not os.path.exists(out)
    # the same through the command line: exit status 2, one line, no traceback
    rc, stdout, stderr = run_command(["evaluate.py", "--policy-a", world.base_model, "--out", str(out)])
    assert rc == 2 and stderr.strip().startswith("error:") and len(stderr.strip().splitlines()) == 1
