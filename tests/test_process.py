"""What every stage process does first (common.configure_process): it sets its intra-op threads from the cores it may
use and the processes that share them, and, when its output goes to a log rather than a terminal, it draws no
progress bars (one carriage-return redraw per step) while its periodic metric lines stay."""
import os
import subprocess
import sys

import torch

from plumbing import common
from conftest import REPO, subprocess_env


def test_threads_for_by_hand(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})  # this process may use 4 cores
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert common.threads_for(0) == 4  # one process: all 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert common.threads_for(0) == 2  # torchrun with 2 processes on this machine: 4 / 2 each
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert common.threads_for(0) == 1  # more processes than cores: 1 each, never 0
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert common.threads_for(0) == 3  # set by the user: respected
    assert common.threads_for(5) == 5  # --threads 5: wins over everything
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert common.threads_for(0) == 1  # empty is unset: back to 4 cores / 8 processes


def test_configure_process_sets_torch_threads():
    try:
        assert common.configure_process(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)  # conftest's one thread for the rest of the session


def test_a_stage_in_a_log_sets_its_threads_and_draws_no_progress_bar(world, tmp_path):
    # no OMP_NUM_THREADS, LOCAL_WORLD_SIZE 2 (as torchrun sets it for 2 processes): the cores this process may use,
    # halved; its output is captured (a pipe, not a terminal): metric lines, no "\r" redraws
    env = subprocess_env()
    env.pop("OMP_NUM_THREADS")
    env["LOCAL_WORLD_SIZE"] = "2"
    expected = max(1, len(os.sched_getaffinity(0)) // 2)
    p = subprocess.run([sys.executable, "sft.py", "--model", world.base_model, "--data", world.sft_train,
                        "--eval-prompts", "", "--batch-size", "8", "--micro-batch-size", "8", "--max-steps", "3",
                        "--max-len", "64", "--log-every", "1", "--out", str(tmp_path / "sft")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    assert f"x 1 processes, {expected} thread(s) each" in p.stdout
    assert [line.split(" loss ")[0] for line in p.stdout.splitlines() if line.startswith("step ")] == [
        "step 1/3", "step 2/3", "step 3/3"]
    assert "\r" not in p.stderr and "\r" not in p.stdout
