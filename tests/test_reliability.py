"""Reliability (issues 8 and 14): exact resume, preemption, crash-safe checkpoints, a full disk, one run per
folder, the NaN guard.

Resume. Each stage runs 4 optimiser steps twice with --save-every 2: straight through, and interrupted twice — the
test-only runner `tests/helpers/run_with_hooks.py --signal-after-steps 1 TERM` sends the process SIGTERM (sft:
SIGINT, as Ctrl-C) right after it logged step 1, so it must save a resumable checkpoint at that step boundary and
stop with one line (common.Preemption); then --resume, killed by `--die-after-saves 1` (SIGKILL right after its next
checkpoint, step 2, as a job killed outright); then --resume to the end. fp32 on CPU is deterministic, and the
checkpoint holds everything the remaining steps read (weights, optimiser moments, data order and generator, RNG
states), so the two final models must be bit-identical (torch.equal) and the metrics lines identical except the
wall-clock ones (throughput, seconds per step). Under torchrun only rank 0 is signalled.

Crash in mid-save. `run_with_hooks.py --slow-save 2` makes every save print a marker and sleep after writing the
temporary folder, before the rename (distributed.move_into_place); the test SIGKILLs the process at the second
save's marker. The first checkpoint must still be complete, load with transformers, and equal what the first save
wrote; --resume then finishes the run.

A full disk is injected where a real one was seen to fail (on a 64 kB tmpfs: Python's OSError ENOSPC, safetensors'
SafetensorError "os error 28", torch.save's RuntimeError "unexpected pos"): one line, the previous checkpoint intact.
A second run on the same --out meets the first one's flock (common.lock_output); SIGKILL of the first frees it.

The runs are subprocesses (the kills need them), launched two at a time.
"""
import concurrent.futures
import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from plumbing import common
from conftest import REPO, run_command, subprocess_env

TIMING = {"tokens_per_s", "pairs_per_s", "s_per_step",  # wall-clock metrics: differ between any two runs
          "gen_s", "forward_s", "train_s", "gen_tokens_per_s", "train_tokens_per_s"}


def metrics(folder: str) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def assert_same_model(a: str, b: str) -> None:
    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def command(args: list[str], nproc: int = 1) -> list[str]:
    """`python args...` or `torchrun --standalone --nproc_per_node=N args...`, as conftest.run_command runs them."""
    if nproc == 1:
        return [sys.executable, *args]
    return [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", f"--nproc_per_node={nproc}",
            *args]


HOOKS = os.path.join("tests", "helpers", "run_with_hooks.py")  # runs a stage with the test-only failure hooks


def run_hooked(hooks: list[str], args: list[str], nproc: int = 1) -> tuple[int, str, str]:
    """Like run_command, for `run_with_hooks.py HOOKS... SCRIPT FLAGS...` (the stage with test-only hooks)."""
    p = subprocess.run(command([HOOKS, *hooks, *args], nproc), cwd=REPO, env=subprocess_env(), capture_output=True,
                       text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def meta_set(world, tmp_path_factory):
    """A meta set S of fixed texts (k = 3 responses per prompt) from the training pairs."""
    path = str(tmp_path_factory.mktemp("S") / "S.jsonl")
    pairs = [json.loads(line) for line in open(world.pairs_train)]
    with open(path, "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": pairs[i]["prompt"], "responses": [
                pairs[i]["chosen"], pairs[i]["rejected"], pairs[i + 1]["chosen"]]}) + "\n")
    return path


def stage_flags(stage: str, world, meta_set: str, rm: str = "") -> list[str]:
    """4 steps at toy size, a checkpoint every 2; logging, evaluation and sampling on, so their lines are compared.
    (meta_rm.py starts from the base model, a causal LM: --fresh-head; ppo.py needs an RM: `rm`.)"""
    common = ["--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "4", "--save-every", "2",
              "--log-every", "1", "--max-len", "64"]
    if stage == "sft.py":
        return [*common, "--model", world.base_model, "--data", world.sft_train, "--lr", "1e-3", "--eval-prompts",
                world.eval_prompts, "--eval-samples", "4", "--max-new-tokens", "4"]
    if stage == "reward.py":
        return [*common, "--model", world.base_model, "--train", world.pairs_train, "--test", world.pairs_test,
                "--lr", "1e-3", "--eval-every", "1"]
    if stage == "ppo.py":
        return ["--sft", world.base_model, "--rm", rm, "--prompts", world.rl_prompts, "--iterations", "4",
                "--save-every", "2", "--prompts-per-iteration", "4", "--rollouts-per-prompt", "2", "--mini-batch-size",
                "4", "--micro-batch-size", "4", "--max-new-tokens", "6", "--policy-lr", "1e-3", "--critic-lr", "1e-3",
                "--sample-every", "0"]
    return [*common[:2], "--micro-batch-size", "8", *common[4:], "--model", world.base_model, "--fresh-head",
            "--train", world.pairs_train, "--test", world.pairs_test, "--meta", meta_set, "--meta-heldout", "",
            "--meta-batch-size", "4", "--lr", "1e-3", "--eta", "0.05", "--eval-every", "1"]


def stopped_line(stage: str, signame: str, out: str, unit: str = "step") -> str:
    """The one line a stage prints when a signal stopped it after step 1 of 4 (common.Preemption.stop)."""
    return (f"{stage}: stopped by {signame} after {unit} 1 of 4; a resumable checkpoint is in {out}: run the same "
            "command with --resume to continue (the result is the same as an uninterrupted run)")


def straight_and_interrupted(script: str, flags: list[str], root: str, nproc: int = 1, signame: str = "TERM",
                             saves_per_checkpoint: int = 1) -> tuple[str, str, list, str]:
    """Run `script` straight, and in parallel the same run interrupted twice:
      1. the test hook signals it (SIG`signame`; under torchrun rank 0 only) right after it logged step 1, which is
         not a --save-every step: the stage must save a checkpoint of step 1 at that step boundary and stop;
      2. --resume, and the hook SIGKILLs it right after its next checkpoint (step 2), as a job killed outright;
      3. --resume to the end.
    Return the two folders, the (returncode, stdout, stderr) of the two interrupted runs and the last run's stdout."""
    straight, resumed = os.path.join(root, "straight"), os.path.join(root, "resumed")
    chain = [(["--signal-after-steps", "1", signame], [], 1),
             (["--die-after-saves", str(saves_per_checkpoint)], ["--resume"], 2)]

    def interrupted_then_resumed() -> tuple[list, str]:
        runs = []
        for hooks, again, step in chain:
            runs.append(run_hooked(hooks, [script, *flags, "--out", resumed, *again], nproc))
            assert runs[-1][0] != 0, "the test hook should have ended the run early"
            assert torch.load(os.path.join(resumed, "trainer_state.pt"), weights_only=False)["step"] == step
        rc, out, err = run_command([script, *flags, "--out", resumed, "--resume"], nproc=nproc)
        assert rc == 0, out + err
        return runs, out

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        a = pool.submit(run_command, [script, *flags, "--out", straight], nproc)
        b = pool.submit(interrupted_then_resumed)
        rc, out, err = a.result()
        assert rc == 0, out + err
        assert "\r" not in err  # a log, not a terminal: no progress-bar redraws (common.progress)
        runs, printed = b.result()
        return straight, resumed, runs, printed


@pytest.mark.parametrize("script, signame", [("sft.py", "INT"), ("reward.py", "TERM"), ("meta_rm.py", "TERM")])
def test_resume_is_bit_identical(world, meta_set, tmp_path, script, signame):
    # Ctrl-C (SIGINT) or a preemption (SIGTERM) after step 1, then a SIGKILL after the step-2 checkpoint, then
    # --resume: the same final weights (torch.equal) and metrics lines as the uninterrupted run
    straight, resumed, runs, printed = straight_and_interrupted(script, stage_flags(script, world, meta_set),
                                                                str(tmp_path), signame=signame)
    (rc, _, stderr), (_, stdout_2, _) = runs
    assert rc == 128 + getattr(signal, "SIG" + signame) and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == stopped_line(script[:-3], "SIG" + signame, resumed)
    assert "--resume: continuing" in stdout_2 and "after step 1" in stdout_2
    assert "--resume: continuing" in printed and "after step 2" in printed
    assert_same_model(straight, resumed)
    assert metrics(straight) == metrics(resumed)
    assert [m["step"] for m in metrics(resumed) if "loss" in m or "L_adapted" in m] == [1, 2, 3, 4]


def test_ppo_resume_is_bit_identical(world, rm_checkpoint, tmp_path):
    # ppo.py saves the critic (out/critic) and then the policy with the trainer state (out/) at every checkpoint, so
    # the kill comes after the 2nd save of the resumed run: iteration 2 complete. Sampling draws from the restored
    # RNG states, the prompt and mini-batch order from the restored generator, the score normalisation is the saved
    # one.
    straight, resumed, runs, printed = straight_and_interrupted(
        "ppo.py", stage_flags("ppo.py", world, "", rm_checkpoint), str(tmp_path), saves_per_checkpoint=2)
    rc, _, stderr = runs[0]
    assert rc == 128 + signal.SIGTERM
    assert stderr.strip().splitlines()[-1] == stopped_line("ppo", "SIGTERM", resumed, unit="iteration")
    assert "--resume: continuing" in printed and "after step 2" in printed
    assert_same_model(straight, resumed)
    assert_same_model(os.path.join(straight, "critic"), os.path.join(resumed, "critic"))
    assert metrics(straight) == metrics(resumed)
    assert [m["iteration"] for m in metrics(resumed)] == [1, 2, 3, 4]


def test_resume_two_processes_is_bit_identical(world, meta_set, tmp_path):
    # reward.py under torchrun (FSDP2, gloo): optimiser state gathered to rank 0 and scattered back, RNG per rank.
    # Only rank 0 is signalled; the flag is all-reduced at every step boundary, so rank 1 stops at the same step
    # (a rank that went on alone would wait forever in the next collective).
    flags = stage_flags("reward.py", world, meta_set)
    straight, resumed, runs, _ = straight_and_interrupted("reward.py", flags, str(tmp_path), nproc=2)
    rc, _, stderr = runs[0]
    assert rc != 0 and stderr.count(stopped_line("reward", "SIGTERM", resumed)) == 1  # rank 0 says it, once
    assert_same_model(straight, resumed)
    assert metrics(straight) == metrics(resumed)


def test_a_signal_without_save_every_stops_at_once_with_one_line(world, meta_set, tmp_path):
    out = str(tmp_path / "rm")
    flags = stage_flags("reward.py", world, meta_set)
    flags[flags.index("--save-every") + 1] = "0"
    rc, stdout, stderr = run_hooked(["--signal-after-steps", "1", "TERM"], ["reward.py", *flags, "--out", out])
    assert rc == 128 + signal.SIGTERM
    assert stderr.strip().splitlines()[-1] == ("stopped by SIGTERM; no checkpoint was written (--save-every 0); with "
                                               "--save-every N a stage stops at the next step boundary after saving "
                                               "a resumable one")


# ---------------------------------------------------------------------------------------------------------------
# A crash in the middle of a save
# ---------------------------------------------------------------------------------------------------------------
def files(folder: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


def test_sigkill_during_save_keeps_the_previous_checkpoint(world, meta_set, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = str(tmp_path / "rm")
    flags = [*stage_flags("reward.py", world, meta_set), "--out", out]
    log = open(tmp_path / "stderr.txt", "w")
    p = subprocess.Popen(command([HOOKS, "--slow-save", "2", "reward.py", *flags]), cwd=REPO, stdout=subprocess.PIPE,
                         stderr=log, text=True, env=subprocess_env())
    markers = 0
    for line in p.stdout:
        if line.startswith("test hook:"):
            markers += 1
            if markers == 2:  # the final save (step 4) is written to rm.tmp and about to be renamed: kill it now
                before = files(out)
                os.kill(p.pid, signal.SIGKILL)
                break
    p.wait(timeout=60)
    log.close()
    assert markers == 2 and p.returncode == -signal.SIGKILL
    assert os.path.isdir(out + ".tmp")  # the interrupted save
    # the previous checkpoint (step 2) is complete, byte for byte what the first save wrote, and loads
    assert files(out) == before
    assert torch.load(os.path.join(out, "trainer_state.pt"), weights_only=False)["step"] == 2
    model = AutoModelForSequenceClassification.from_pretrained(out)
    saved = load_file(os.path.join(out, "model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items() if k in saved)
    # --resume finishes the run from step 2: steps 3 and 4 logged once, the leftover temporary folder removed
    rc, stdout, stderr = run_command(["reward.py", *flags, "--resume"])
    assert rc == 0, stdout + stderr
    assert "continuing" in stdout and "after step 2" in stdout
    assert not os.path.exists(out + ".tmp")
    assert [m["step"] for m in metrics(out) if "loss" in m] == [1, 2, 3, 4]


def test_save_killed_between_the_renames_is_recovered(world, tmp_path):
    # The one moment when FOLDER does not exist: save_model has moved the old checkpoint to FOLDER.old and not yet
    # renamed FOLDER.tmp into place. --resume (distributed.recover_save) moves FOLDER.old back.
    from plumbing import distributed

    out = str(tmp_path / "rm")
    shutil.copytree(world.base_model, out + ".old")
    os.makedirs(out + ".tmp")  # half-written new checkpoint
    distributed.recover_save(out)
    assert sorted(os.listdir(out)) == sorted(os.listdir(world.base_model))
    assert not os.path.exists(out + ".old") and not os.path.exists(out + ".tmp")


# ---------------------------------------------------------------------------------------------------------------
# NaN / inf guard
# ---------------------------------------------------------------------------------------------------------------
def test_non_finite_gradient_stops_and_keeps_the_last_checkpoint(world, tmp_path):
    # lr 1e30: Adam's first step moves every weight by ~1e30 (still finite in fp32), so step 2's forward overflows
    # and its gradient is NaN. A checkpoint is saved every step; the one of step 1 must survive untouched.
    flags = ["reward.py", "--model", world.base_model, "--train", world.pairs_train, "--test", "", "--batch-size", "8",
             "--micro-batch-size", "8", "--lr", "1e30", "--save-every", "1"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        bad = pool.submit(run_command, [*flags, "--max-steps", "3", "--out", str(tmp_path / "bad")])
        one = pool.submit(run_command, [*flags, "--max-steps", "1", "--out", str(tmp_path / "one")])
        (rc, stdout, stderr), (rc_one, _, err_one) = bad.result(), one.result()
    assert rc_one == 0, err_one
    assert rc == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == ("error: reward step 2: gradient norm is nan; stopping (the last saved "
                                               "checkpoint is untouched)")
    assert torch.load(str(tmp_path / "bad" / "trainer_state.pt"), weights_only=False)["step"] == 1
    assert_same_model(str(tmp_path / "bad"), str(tmp_path / "one"))  # the step-1 weights, bit for bit


# ---------------------------------------------------------------------------------------------------------------
# A full disk during a save; a second run on the same --out
# ---------------------------------------------------------------------------------------------------------------
def _disk_full_at(target: str):
    """A replacement for `target` that fails like a full disk (each failure as it was seen on a full tmpfs)."""
    from safetensors import SafetensorError

    if target == "fsync":
        return lambda folder: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device", folder))
    if target == "torch.save":
        return lambda *a, **k: (_ for _ in ()).throw(RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"))
    return lambda *a, **k: (_ for _ in ()).throw(SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"))


@pytest.mark.parametrize("target", ["fsync", "torch.save", "safetensors"])
def test_disk_full_during_a_save_is_one_line_and_the_previous_checkpoint_stays(world, tmp_path, monkeypatch,
                                                                                target):
    from plumbing import distributed
    import reward

    out = str(tmp_path / "rm")
    argv = ["--model", world.base_model, "--train", world.pairs_train, "--test", "", "--batch-size", "8",
            "--micro-batch-size", "8", "--max-steps", "3", "--lr", "1e-3", "--save-every", "1", "--max-len", "64",
            "--out", out]
    saves = [0]
    save_model = distributed.save_model

    def second_save_fails(*a, **k):  # the first save (step 1) goes through; the second runs out of disk
        saves[0] += 1
        if saves[0] == 2:
            if target == "fsync":
                monkeypatch.setattr(distributed, "_fsync_folder", _disk_full_at(target))
            elif target == "torch.save":
                monkeypatch.setattr(torch, "save", _disk_full_at(target))
            else:
                import transformers.modeling_utils

                monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", _disk_full_at(target))
        return save_model(*a, **k)

    monkeypatch.setattr(distributed, "save_model", second_save_fails)
    with pytest.raises(common.UserError) as e:
        reward.main(argv)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{out}: could not write the checkpoint (")
    assert message.endswith(f"; is the disk full?); the previous checkpoint in {out} is untouched")
    monkeypatch.undo()
    # the step-1 checkpoint is complete and loads; nothing of the failed save is left behind
    assert torch.load(os.path.join(out, "trainer_state.pt"), weights_only=False)["step"] == 1
    assert not os.path.exists(out + ".tmp") and not os.path.exists(out + ".old")
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(out)


def test_disk_full_anywhere_else_is_one_line(tmp_path):
    # e.g. appending to metrics.jsonl: common.run_main turns an OSError of a full disk into one line, exit 2
    code = ("import errno; from plumbing import common; common.run_main(lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "
            "'No space left on device', '/data/run/metrics.jsonl')))")
    rc, stdout, stderr = run_command(["-c", code])
    assert (rc, stderr.strip()) == (2, "error: /data/run/metrics.jsonl: No space left on device")


def test_a_second_run_on_the_same_out_is_refused_until_the_first_is_gone(world, tmp_path):
    import reward

    out = str(tmp_path / "rm")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from plumbing import common; common.lock_output(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(120)", out], cwd=REPO, env=subprocess_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = ["--model", world.base_model, "--train", world.pairs_train, "--test", "", "--batch-size", "8",
                "--micro-batch-size", "8", "--max-steps", "1", "--max-len", "64", "--out", out]
        for extra in ([], ["--overwrite"], ["--resume"]):  # also --overwrite and --resume: the folder is in use
            with pytest.raises(common.UserError) as e:
                reward.main(argv + extra)
            assert str(e.value) == (f"{out}: another run (pid {holder.pid}) is writing into this folder; wait for it "
                                    "to end or choose another --out")
        assert not os.path.exists(out)
    finally:
        holder.kill()  # SIGKILL: no chance to clean up; the kernel drops its flock
        holder.wait()
    reward.main(argv)  # the lock of a killed run is not stuck
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
