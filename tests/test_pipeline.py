"""The rounds pipeline end to end at toy size: every stage runs, the report, JSON and figures appear, and a second
run with the same command resumes (skips every finished stage) instead of redoing the work."""
import json
import os

from conftest import run_command


def test_pipeline_toy_run_and_resume(tmp_path):
    out = tmp_path / "pipe"
    rc, stdout, stderr = run_command(["pipeline.py", "--toy", "--rounds", "1", "--out", str(out)], timeout=600)
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    stages = ["testbed", "sft", "round0/rm", "round0/ppo", "round1/meta_set", "round1/meta_rm", "round1/ppo",
              "eval/round0_vs_sft", "eval/round1_vs_sft", "eval/round1_vs_vanilla", "eval/rms"]
    for stage in stages:
        assert (out / ".done" / stage).exists(), stage
    results = json.loads((out / "results.json").read_text())
    # Table 1 rows (vs SFT): round 0 = vanilla PPO and round 1; Table 2 (vs vanilla PPO): round 1
    assert list(results["vs_sft"]) == ["vanilla PPO", "MetaRM round 1"]
    assert list(results["vs_vanilla"]) == ["MetaRM round 1"]
    for res in list(results["vs_sft"].values()) + list(results["vs_vanilla"].values()):
        w = res["win_tie_lose"]
        assert w["win"] + w["tie"] + w["lose"] + w["invalid"] == 8  # the toy world has 8 evaluation prompts
    assert set(results["rms"]["reward_models"]) == {"vanilla", "metarm_r1"}
    report = (out / "report.md").read_text()
    assert "Table 1" in report and "| MetaRM round 1 |" in report and "| metarm_r1 |" in report
    for png in ("reward_gaps.png", "rm_accuracy.png", "ppo_rewards.png", "diff_variance.png"):
        assert (out / "eval" / "rms" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the policy of round 1 is a plain transformers checkpoint
    assert os.path.exists(out / "round1" / "ppo" / "model.safetensors")

    # resume: the same command again finds every stage done and only rewrites the report
    rc, stdout, stderr = run_command(["pipeline.py", "--toy", "--rounds", "1", "--out", str(out)], timeout=300)
    assert rc == 0, stderr[-3000:]
    assert stdout.count("done already") == len(stages)
    assert "$ " not in stdout  # no stage command was run again
