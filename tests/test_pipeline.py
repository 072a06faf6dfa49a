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


def test_micro_batches_are_split_over_processes():
    # TESTBED's micro-batch sizes are per process for 1 process; with 2 processes each takes half, so that
    # micro-batch x accumulation x processes is the same global batch (32 = 16 x 1 x 2); other flags are untouched.
    import pipeline

    flags = ["--lr", "3e-3", "--micro-batch-size", "32", "--max-len", "64"]
    assert pipeline.per_process(flags, 2) == ["--lr", "3e-3", "--micro-batch-size", "16", "--max-len", "64"]
    assert pipeline.per_process(flags, 1) == flags


def test_pipeline_toy_run_two_processes(tmp_path):
    # `python pipeline.py --nproc 2`: every stage under torchrun (FSDP2, gloo), the global batches unchanged
    out = tmp_path / "pipe2"
    rc, stdout, stderr = run_command(["pipeline.py", "--toy", "--rounds", "1", "--nproc", "2", "--out", str(out)],
                                     timeout=900)
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    assert stdout.count("$ torchrun --standalone --nproc_per_node=2 ") == 10  # every stage but the testbed
    assert stdout.count("$ python testbed.py") == 1
    results = json.loads((out / "results.json").read_text())
    assert list(results["vs_sft"]) == ["vanilla PPO", "MetaRM round 1"]
