"""Reliability (issue 8): exact resume, crash-safe checkpoints, the NaN guard.

Resume. Each stage runs 4 optimiser steps twice with --save-every 2: straight through, and "crashed" — the test-only
runner `tests/helpers/run_with_hooks.py --die-after-saves 1` makes the process SIGKILL itself right after its first
checkpoint (step 2, as a preempted job would die), then the same command with --resume runs steps 3-4. fp32 on CPU is
deterministic, and the checkpoint holds everything the remaining steps read (weights, optimiser moments, data order
and generator, RNG states), so the two final models must be bit-identical (torch.equal) and the metrics lines
identical except the wall-clock ones (throughput, seconds per step).

Crash in mid-save. `run_with_hooks.py --slow-save 2` makes every save print a marker and sleep after writing the
temporary folder, before the rename (distributed.move_into_place); the test SIGKILLs the process at the second
save's marker. The first checkpoint must still be complete, load with transformers, and equal what the first save
wrote; --resume then finishes the run.

The runs are subprocesses (the kills need them), launched two at a time.
"""
import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

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


def stage_flags(stage: str, world, meta_set: str) -> list[str]:
    """4 steps at toy size, a checkpoint every 2; logging, evaluation and sampling on, so their lines are compared."""
    common = ["--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "4", "--save-every", "2",
              "--log-every", "1", "--max-len", "64"]
    if stage == "sft.py":
        return [*common, "--model", world.base_model, "--data", world.sft_train, "--lr", "1e-3", "--eval-prompts",
                world.eval_prompts, "--eval-samples", "4", "--max-new-tokens", "4"]
    if stage == "reward.py":
        return [*common, "--model", world.base_model, "--train", world.pairs_train, "--test", world.pairs_test,
                "--lr", "1e-3", "--eval-every", "1"]
    return [*common[:2], "--micro-batch-size", "8", *common[4:], "--model", world.base_model, "--train",
            world.pairs_train, "--test", world.pairs_test, "--meta", meta_set, "--meta-heldout", "",
            "--meta-batch-size", "4", "--lr", "1e-3", "--eta", "0.05", "--eval-every", "1"]


def straight_and_resumed(script: str, flags: list[str], root: str, nproc: int = 1,
                         die_after_saves: int = 1) -> tuple[str, str, str]:
    """Run `script` straight and crashed-after-the-first-checkpoint + --resume (in parallel); return the folders and
    the resumed run's stdout."""
    straight, resumed = os.path.join(root, "straight"), os.path.join(root, "resumed")

    def crashed_then_resumed() -> str:
        rc, out, err = run_hooked(["--die-after-saves", str(die_after_saves)], [script, *flags, "--out", resumed],
                                  nproc)
        assert rc != 0, "the test hook should have killed the run after its first checkpoint"
        assert torch.load(os.path.join(resumed, "trainer_state.pt"), weights_only=False)["step"] == 2
        rc, out, err = run_command([script, *flags, "--out", resumed, "--resume"], nproc=nproc)
        assert rc == 0, out + err
        return out

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        a = pool.submit(run_command, [script, *flags, "--out", straight], nproc)
        b = pool.submit(crashed_then_resumed)
        rc, out, err = a.result()
        assert rc == 0, out + err
        return straight, resumed, b.result()


@pytest.mark.parametrize("script", ["sft.py", "reward.py", "meta_rm.py"])
def test_resume_is_bit_identical(world, meta_set, tmp_path, script):
    straight, resumed, printed = straight_and_resumed(script, stage_flags(script, world, meta_set), str(tmp_path))
    assert "--resume: continuing" in printed and "after step 2" in printed
    assert_same_model(straight, resumed)
    assert metrics(straight) == metrics(resumed)
    assert [m["step"] for m in metrics(resumed) if "loss" in m or "L_adapted" in m] == [1, 2, 3, 4]


def test_ppo_resume_is_bit_identical(world, tmp_path):
    # ppo.py saves the critic (out/critic) and then the policy with the trainer state (out/) at every checkpoint, so
    # the hook kills it after its 2nd save: iteration 2 complete. Sampling draws from the restored RNG states, the
    # prompt and mini-batch order from the restored generator, the score normalisation is the saved one.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = str(tmp_path / "rm")
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(world.base_model)
    AutoModelForSequenceClassification.from_pretrained(world.base_model, num_labels=1,
                                                       pad_token_id=tokenizer.pad_token_id).save_pretrained(rm)
    tokenizer.save_pretrained(rm)
    flags = ["ppo.py", "--sft", world.base_model, "--rm", rm, "--prompts", world.rl_prompts, "--iterations", "4",
             "--save-every", "2", "--prompts-per-iteration", "4", "--rollouts-per-prompt", "2", "--mini-batch-size",
             "4", "--micro-batch-size", "4", "--max-new-tokens", "6", "--policy-lr", "1e-3", "--critic-lr", "1e-3",
             "--sample-every", "0"]
    straight, resumed, printed = straight_and_resumed(flags[0], flags[1:], str(tmp_path), die_after_saves=2)
    assert "--resume: continuing" in printed and "after step 2" in printed
    assert_same_model(straight, resumed)
    assert_same_model(os.path.join(straight, "critic"), os.path.join(resumed, "critic"))
    assert metrics(straight) == metrics(resumed)
    assert [m["iteration"] for m in metrics(resumed)] == [1, 2, 3, 4]


def test_resume_two_processes_is_bit_identical(world, meta_set, tmp_path):
    # reward.py under torchrun (FSDP2, gloo): optimiser state gathered to rank 0 and scattered back, RNG per rank
    flags = stage_flags("reward.py", world, meta_set)
    straight, resumed, _ = straight_and_resumed("reward.py", flags, str(tmp_path), nproc=2)
    assert_same_model(straight, resumed)
    assert metrics(straight) == metrics(resumed)


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
    import distributed

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
