"""A user's mistake ends a stage with exactly one line on stderr that names the file:line / field / flag, a non-zero
exit status, no traceback, and nothing created or changed in the output folder (inputs are validated first).

The cases run as subprocesses (`python sft.py ...` / `python reward.py ...`), two at a time, launched once for the
module; each test then checks one case.
"""
import concurrent.futures
import json
import os
import shutil

import pytest

# id -> (script, flags (with {world paths} and {tmp}), what the one error line must name)
CASES = {
    "malformed_jsonl": ("sft.py", ["--data", "{tmp}/bad.jsonl"], "bad.jsonl:3: not valid JSON"),
    "missing_field": ("reward.py", ["--train", "{tmp}/nofield.jsonl"], "nofield.jsonl:2: missing field 'rejected'"),
    "empty_file": ("sft.py", ["--data", "{tmp}/empty.jsonl"], "empty.jsonl: empty file"),
    "missing_test_file": ("reward.py", ["--test", "{tmp}/nope.jsonl"], "nope.jsonl: no such file"),
    "missing_eval_prompts": ("sft.py", ["--eval-prompts", "{tmp}/nope.jsonl"], "nope.jsonl: no such file"),
    "missing_checkpoint": ("sft.py", ["--model", "{tmp}/no_model"], "no_model: no such --model folder"),
    "no_weights": ("reward.py", ["--model", "{tmp}/no_weights"], "no_weights: no *.safetensors weights"),
    "batch_not_divisible": ("sft.py", ["--batch-size", "10", "--micro-batch-size", "4"],
                            "--batch-size 10 is not divisible by --micro-batch-size 4 x world size 1"),
    "fewer_than_one_batch": ("reward.py", ["--batch-size", "256", "--micro-batch-size", "8"],
                             "fewer than one batch of 256"),
    "out_not_empty": ("sft.py", ["--out", "{tmp}/existing"], "existing: output folder already holds files"),
    "unknown_flag": ("reward.py", ["--metaorder", "2"], "unrecognized arguments: --metaorder"),
    "bad_flag_value": ("sft.py", ["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
}


def base_flags(script: str, world, out: str) -> list[str]:
    """A command line that would run (toy size) if the case's flags did not break it; the case's flags override."""
    if script == "sft.py":
        return ["--model", world.base_model, "--data", world.sft_train, "--eval-prompts", world.eval_prompts,
                "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "1", "--out", out]
    return ["--model", world.base_model, "--train", world.pairs_train, "--test", world.pairs_test,
            "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "1", "--out", out]


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
def results(world, run, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("errors"))
    good = json.dumps({"prompt": "p", "response": "r"})
    with open(f"{tmp}/bad.jsonl", "w") as f:
        f.write(f"{good}\n\n{{\"prompt\": \"p\", \"response\": \n{good}\n")  # line 3 is cut short
    with open(f"{tmp}/nofield.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    open(f"{tmp}/empty.jsonl", "w").close()
    os.makedirs(f"{tmp}/no_weights")  # config and tokenizer, but the weights never got written
    for name in os.listdir(world.base_model):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(world.base_model, name), f"{tmp}/no_weights")
    os.makedirs(f"{tmp}/existing")
    with open(f"{tmp}/existing/metrics.jsonl", "w") as f:
        f.write('{"step": 1}\n')

    def launch(case: str):
        script, flags, _ = CASES[case]
        out = flags[flags.index("--out") + 1].format(tmp=tmp) if "--out" in flags else f"{tmp}/out_{case}"
        before = snapshot(out)
        argv = base_flags(script, world, out) + [f.format(tmp=tmp) for f in flags]
        rc, stdout, stderr = run([script, *argv], timeout=120)
        return dict(rc=rc, stdout=stdout, stderr=stderr, out=out, before=before, after=snapshot(out),
                    out_exists=os.path.exists(out))

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case: pool.submit(launch, case) for case in CASES}
        return {case: f.result() for case, f in futures.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_clear_line(results, case):
    r = results[case]
    needle = CASES[case][2]
    lines = r["stderr"].strip().splitlines()
    assert r["rc"] == 2, r
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r["stderr"]
    assert "Traceback" not in r["stdout"] + r["stderr"]
    # nothing written: the output folder was not created, or an existing one is byte-for-byte as it was
    if r["before"]:
        assert r["after"] == r["before"]
    else:
        assert not r["out_exists"], f"{r['out']} was created"


def test_error_under_torchrun_is_printed_once(world, run, tmp_path):
    # 6 pairs per step cannot be split into micro-batches of 4 on 2 processes: both ranks find it, rank 0 says it.
    # (torchrun then reports the failed workers itself, with its own traceback; that part is torchrun's.)
    out = str(tmp_path / "out")
    rc, stdout, stderr = run(["sft.py", *base_flags("sft.py", world, out), "--batch-size", "6"], nproc=2)
    assert rc != 0
    message = "error: --batch-size 6 is not divisible by --micro-batch-size 4 x world size 2"
    assert (stdout + stderr).count(message) == 1
    assert not os.path.exists(out)
