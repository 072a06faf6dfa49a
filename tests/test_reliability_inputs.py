"""Bad input of issue 8 not covered by test_foundation_errors.py: over-long sequences (truncated by the rule of
data.encode, counted, reported), --resume against a different or non-resumable run, a finished run resumed, and
flag values outside their choices. Each error is one line, exit status 2, no traceback, and no file changed.
(Missing/half-written checkpoints, malformed JSONL, an occupied output folder: test_foundation_errors.py; an RM with
another tokenizer: test_ppo_run.py; k < 2: test_meta_rm.py.)
"""
import concurrent.futures
import os
import re

import pytest

from conftest import run_command


def snapshot(folder: str) -> dict:
    """name -> (mtime_ns, bytes) of every file in `folder`."""
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = (os.stat(path).st_mtime_ns, f.read())
    return out


def reward_flags(world, out: str) -> list[str]:
    return ["reward.py", "--model", world.base_model, "--train", world.pairs_train, "--test", "", "--batch-size",
            "8", "--micro-batch-size", "8", "--max-steps", "1", "--lr", "1e-3", "--out", out]


def one_error_line(rc: int, stderr: str, needle: str) -> None:
    lines = stderr.strip().splitlines()
    assert rc == 2, stderr
    assert "Traceback" not in stderr
    assert lines and lines[-1].startswith("error: ") and needle in lines[-1], stderr
    assert sum(line.startswith("error: ") for line in lines) == 1


@pytest.fixture(scope="module")
def checkpoints(world, tmp_path_factory):
    """A finished resumable reward run (--save-every 1) and a finished one saved without --save-every."""
    root = str(tmp_path_factory.mktemp("resume_inputs"))
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        a = pool.submit(run_command, [*reward_flags(world, f"{root}/resumable"), "--save-every", "1"])
        b = pool.submit(run_command, reward_flags(world, f"{root}/plain"))
        for rc, out, err in (a.result(), b.result()):
            assert rc == 0, out + err
    return root


def test_resume_with_other_settings_is_refused(world, checkpoints):
    out = f"{checkpoints}/resumable"
    before = snapshot(out)
    rc, _, stderr = run_command([*reward_flags(world, out), "--save-every", "1", "--resume", "--lr", "2e-3"])
    one_error_line(rc, stderr, "--resume with different settings than the checkpoint (--lr 0.001 -> 0.002)")
    assert snapshot(out) == before


def test_resume_of_a_checkpoint_without_trainer_state_is_refused(world, checkpoints):
    out = f"{checkpoints}/plain"
    before = snapshot(out)
    rc, _, stderr = run_command([*reward_flags(world, out), "--resume"])
    one_error_line(rc, stderr, "this checkpoint has no trainer_state.pt (it was saved without --save-every)")
    assert snapshot(out) == before


def test_resume_of_a_finished_run_does_nothing(world, checkpoints):
    out = f"{checkpoints}/resumable"
    before = snapshot(out)
    rc, stdout, stderr = run_command([*reward_flags(world, out), "--save-every", "1", "--resume"])
    assert rc == 0, stderr
    assert f"--resume: {out} is a finished run (1 steps); nothing to do" in stdout
    assert snapshot(out) == before


@pytest.mark.parametrize("script, flag, value", [("meta_rm.py", "--meta-order", "3"),
                                                 ("sft.py", "--data-format", "csv")])
def test_flag_value_outside_its_choices(world, tmp_path, script, flag, value):
    rc, _, stderr = run_command([script, "--model", world.base_model, flag, value, "--out", str(tmp_path / "o")])
    one_error_line(rc, stderr, f"argument {flag}: invalid choice: '{value}'" if flag == "--data-format"
                   else f"argument {flag}: invalid choice: {value}")
    assert not os.path.exists(tmp_path / "o")


def test_over_long_sequences_are_truncated_counted_and_reported(world, tmp_path):
    # data.encode keeps the end of the prompt and the start of the response; each stage reports how many it cut
    from transformers import AutoTokenizer

    from plumbing import data

    sft = ["sft.py", "--model", world.base_model, "--data", world.sft_train, "--eval-prompts", "", "--batch-size",
           "8", "--micro-batch-size", "8", "--max-steps", "1", "--max-len", "16", "--out", str(tmp_path / "sft")]
    reward = [*reward_flags(world, str(tmp_path / "rm")), "--max-len", "16"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        (rc_s, out_s, err_s), (rc_r, out_r, err_r) = pool.map(run_command, [sft, reward])
    assert rc_s == 0 and rc_r == 0, err_s + err_r
    # sft encodes every demonstration up front: the count is over the whole file, recomputed here
    tokenizer = AutoTokenizer.from_pretrained(world.base_model)
    records = data.read_demonstrations(world.sft_train)
    expected = sum(data.encode(tokenizer, r["prompt"], r["response"], 16)[2] for r in records)
    assert expected > 0
    assert f"sft: {len(records)} examples ({expected} truncated to 16 tokens)" in out_s
    # reward.py counts the sequences it trained on (8 pairs = 16 sequences in its one step)
    m = re.search(r"note: (\d+) sequences were longer than --max-len 16 and were truncated", out_r)
    assert m and 0 < int(m.group(1)) <= 16, out_r
