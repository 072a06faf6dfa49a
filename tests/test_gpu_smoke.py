"""tools/gpu_smoke.py in its CPU mode: the script the GPU machine runs, with gloo at toy sizes, so
its plumbing (the worlds, each stage under torchrun, the device worker, the resume runs, the
report) has run before the one GPU session that runs it for real. The GPU-only numbers (memory,
MFU) read "n/a (CPU)".

About 1.5-2.5 minutes on the 2-core machine (13 processes, each importing torch and transformers).
"""
import json
import math
import tarfile

from conftest import run_command
from tools import gpu_smoke

STAGES = ("sft", "reward", "meta_data", "meta_rm functional", "meta_rm inplace", "ppo", "dpo",
          "evaluate")


def test_the_smoke_script_passes_on_cpu(tmp_path):
    out = tmp_path / "smoke"
    rc, stdout, stderr = run_command(["-m", "tools.gpu_smoke", "--cpu", "--out", str(out)],
                                     timeout=600)
    assert rc == 0, stdout[-6000:] + stderr[-3000:]
    summary = json.loads((out / "smoke.json").read_text())
    assert summary["passed"] and summary["mode"] == "cpu"
    rows = {(r["stage"], r["model"]): r for r in summary["stages"]}
    assert sorted(rows) == sorted((stage, "testbed") for stage in STAGES)
    for row in rows.values():
        assert (row["status"], row["device"], row["backend"]) == ("pass", "cpu", "gloo"), row
    checks = {c["name"]: c["status"] for c in summary["checks"]}
    assert checks["fsdp2 == plain (testbed)"] == checks["resume (testbed)"] == "pass", checks
    assert all(status == "pass" for status in checks.values()), checks
    # the speed plumbing produced numbers: step times from the printed step lines, the probe's
    # generation times, ppo's own
    for stage in ("sft", "reward", "meta_rm functional", "meta_rm inplace", "ppo", "dpo"):
        assert rows[(stage, "testbed")]["s_per_step"] > 0, stage
    for stage in ("meta_data", "evaluate", "ppo"):
        assert rows[(stage, "testbed")]["gen_ms_per_step"] > 0, stage
    table = (out / "smoke.md").read_text()
    assert table.startswith("# GPU smoke test: PASSED") and "| sft | testbed | pass |" in table
    assert "n/a (CPU)" in table
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("_sft_testbed.log") for n in names)
    assert any(n.endswith("_resume_interrupted.log") for n in names)


def test_step_lines_timing_and_finiteness():
    # the lines the stages print at --log-every 1 (sft, reward, dpo, meta_rm: "step"; ppo: "it")
    for line in ("step 3/8 loss 5.79 lr 1e-3", "it 2/3 score -0.066 gold 0.0",
                 "[rank0]: step 1/4 L_adapted 0.69"):
        assert gpu_smoke.STEP_LINE.search(line), line
    assert not gpu_smoke.STEP_LINE.search("eval @ 2: acc 0.5")
    # the first step (warm-up) is left out: 3 steps in 1.5 s after it
    assert gpu_smoke.seconds_per_step([(10.0, 1), (10.5, 2), (11.0, 3), (11.5, 4)]) == 0.5
    assert gpu_smoke.seconds_per_step([(10.0, 1)]) is None
    assert gpu_smoke.not_finite([{"loss": 1.0, "n": 3, "ok": True},
                                 {"x": {"y": [math.nan, math.inf]}}]) == ["1.x.y.0 = nan",
                                                                          "1.x.y.1 = inf"]
    # an on-policy accuracy over no pairs is undefined, not a fault; over some pairs a NaN is one
    assert gpu_smoke.not_finite([{"eval_onpolicy_acc": math.nan, "eval_onpolicy_pairs": 0}]) == []
    assert gpu_smoke.not_finite([{"eval_onpolicy_acc": math.nan, "eval_onpolicy_pairs": 3}]) == [
        "0.eval_onpolicy_acc = nan"]
