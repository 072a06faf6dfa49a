"""ppo.py end to end on the small test world: a short run raises the RM score (1 process), and the same stage runs
under torchrun with 2 processes (FSDP2 generation with ranks stopping at different lengths, checkpoints).

The models come from the real stages: sft.py on the world's demonstrations, then reward.py on pairs built from them
so that the RM has one clear preference a short PPO run can follow: for every demonstration, chosen = " Sure! " +
response, rejected = the response alone (a leading "Sure!" removed from both). On the world's own 128 noisy pairs a
tiny RM stays near chance (held-out accuracy ~0.5), and its scores are a jumble that 20 iterations of 32 rollouts
cannot be seen to climb through the sampling noise; the "Sure!" RM separates its pairs perfectly (margin ~6) and
the SFT policy already says "Sure!" now and then, so PPO has something to reinforce.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

import ppo
import reward
import sft
from plumbing import distributed


def read_metrics(folder: str) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def models(world, tmp_path_factory) -> tuple[str, str]:
    """(SFT checkpoint, RM checkpoint) trained on the world; about 20 s on 2 cores."""
    root = tmp_path_factory.mktemp("ppo_models")
    sft_dir, rm_dir, pairs_file = str(root / "sft"), str(root / "rm"), str(root / "sure_pairs.jsonl")
    sft.main(["--model", world.base_model, "--data", world.sft_train, "--out", sft_dir, "--lr", "3e-3",
              "--epochs", "6", "--batch-size", "32", "--micro-batch-size", "32", "--max-len", "96",
              "--eval-prompts", "", "--log-every", "100"])
    with open(world.sft_train) as f:
        demos = [json.loads(line) for line in f]
    with open(pairs_file, "w") as f:
        for d in demos:
            base = d["response"].strip()
            base = base[len("Sure!"):].strip() if base.startswith("Sure!") else base
            f.write(json.dumps({"prompt": d["prompt"], "chosen": " Sure! " + base, "rejected": " " + base}) + "\n")
    reward.main(["--model", sft_dir, "--train", pairs_file, "--test", "", "--out", rm_dir, "--lr", "1e-3",
                 "--batch-size", "16", "--micro-batch-size", "16", "--max-len", "96", "--eval-every", "0",
                 "--log-every", "100"])
    return sft_dir, rm_dir


PPO_FLAGS = ["--policy-lr", "3e-4", "--critic-lr", "3e-4", "--rollouts-per-prompt", "4", "--prompts-per-iteration",
             "8", "--mini-batch-size", "16", "--max-new-tokens", "16"]


def test_short_run_raises_rm_score(world, models, tmp_path, capsys):
    sft_dir, rm_dir = models
    out = str(tmp_path / "ppo")
    ppo.main(["--sft", sft_dir, "--policy", sft_dir, "--rm", rm_dir, "--prompts", world.rl_prompts, "--out", out,
              "--iterations", "20",
              "--sample-every", "10", "--seed", "0", *PPO_FLAGS])
    printed = capsys.readouterr().out
    metrics = read_metrics(out)
    assert [m["iteration"] for m in metrics] == list(range(1, 21))

    # The mean raw RM score of the rollouts, first 3 iterations vs last 3. Measured with this recipe on the test
    # world (6 % of its demonstrations start with "Sure!") on seeds 0-3: the first three lie at -3.2 .. -2.7
    # (iteration-to-iteration sd ~0.15: 32 rollouts whose scores are about +3 with "Sure!" and -3 without), the
    # rise (last 3 minus first 3) after 20 iterations was 1.46, 3.02, 3.04, 2.86. A margin of 0.7 is half the
    # smallest rise seen and over seven times the sd of a 3-iteration mean (~0.09).
    first = sum(m["score"] for m in metrics[:3]) / 3
    last = sum(m["score"] for m in metrics[-3:]) / 3
    assert last - first > 0.7, [round(m["score"], 2) for m in metrics]
    # iteration 1 samples from π = π_ref (same weights, same computation): the KL estimate is exactly 0;
    # the policy then moves away from the reference: KL estimates are positive by the end (k3 >= 0 per token)
    assert metrics[0]["kl_k1"] == 0.0 and metrics[0]["kl_k3"] == 0.0
    assert metrics[-1]["kl_k1"] > 0 and metrics[-1]["kl_k3"] > 0
    assert all(0.0 <= m["eos_rate"] <= 1.0 and 0.0 <= m["clipfrac"] <= 1.0 for m in metrics)
    assert all(m["gen_s"] > 0 and m["train_s"] > 0 for m in metrics)
    # the gold reward is reported alongside on the testbed, and only there (it never enters training)
    assert all(("gold" in m) == world.testbed for m in metrics)
    assert ("gold" in printed) == world.testbed

    # decoded samples with score, KL and total were printed at iteration 10 and 20 (3 each)
    assert sum(" score, " in line and " kl, " in line and " total] " in line for line in printed.splitlines()) == 6
    # the checkpoints load with transformers alone
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    policy = AutoModelForCausalLM.from_pretrained(out)
    critic = AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "critic"))
    assert isinstance(policy, torch.nn.Module) and critic.config.num_labels == 1


def test_two_process_run(world, models, tmp_path, run):
    sft_dir, rm_dir = models
    out = str(tmp_path / "ppo2")
    rc, stdout, stderr = run(["ppo.py", "--sft", sft_dir, "--rm", rm_dir, "--prompts", world.rl_prompts, "--out", out,
                              "--iterations", "2", "--save-every", "1", "--sample-every", "0", *PPO_FLAGS], nproc=2)
    assert rc == 0, stdout[-2000:] + stderr[-3000:]
    metrics = read_metrics(out)
    assert [m["iteration"] for m in metrics] == [1, 2]
    assert all(("gold" in m) == world.testbed for m in metrics)
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    assert os.path.isfile(os.path.join(out, "critic", "model.safetensors"))
    assert sum(line.startswith("it ") for line in stdout.splitlines()) == 2  # rank 0 prints, rank 1 does not


def test_rm_with_another_tokenizer_is_refused(world, models, tmp_path, run):
    sft_dir, _ = models
    # the world's base model has the same tokenizer; a tokenizer with a different vocabulary must be refused
    other = tmp_path / "other_rm"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sft_dir)
    tok.add_tokens(["<extra_token>"])
    rm = distributed.load_reward_model(sft_dir, 1, torch.device("cpu"))[0]
    rm.save_pretrained(str(other))
    tok.save_pretrained(str(other))
    rc, stdout, stderr = run(["ppo.py", "--sft", sft_dir, "--rm", str(other), "--prompts", world.rl_prompts,
                              "--out", str(tmp_path / "never")])
    assert rc == 2 and "its tokenizer differs" in stderr and "Traceback" not in stderr
    assert not os.path.exists(tmp_path / "never")


def test_policy_flag_starts_from_another_checkpoint(world, models, tmp_path):
    # --policy = the untrained base model (same tokenizer), --sft stays the reference: the very first rollouts
    # already differ from the reference (KL > 0), whereas with the default (--policy = --sft) it is exactly 0.
    sft_dir, rm_dir = models
    out = str(tmp_path / "ppo_from_base")
    ppo.main(["--sft", sft_dir, "--policy", world.base_model, "--rm", rm_dir, "--prompts", world.rl_prompts,
              "--out", out, "--iterations", "1", "--sample-every", "0", *PPO_FLAGS])
    assert read_metrics(out)[0]["kl_k1"] > 1.0


def test_held_out_evaluation_leaves_training_unchanged(world, models, tmp_path):
    # The over-optimisation curve (--eval-prompts) samples from its own random stream: the training metrics of a
    # run with it are identical to those of a run without it; its lines come at iterations 0, 2, 3 (every 2 and
    # the last), and at iteration 0 the policy is the reference, so its KL is exactly 0.
    sft_dir, rm_dir = models
    plain, evaluated = str(tmp_path / "plain"), str(tmp_path / "evaluated")
    base = ["--sft", sft_dir, "--rm", rm_dir, "--prompts", world.rl_prompts, "--iterations", "3", "--sample-every",
            "0", "--save-every", "0", *PPO_FLAGS]
    ppo.main([*base, "--out", plain])
    ppo.main([*base, "--out", evaluated, "--eval-prompts", world.eval_prompts, "--eval-every", "2",
              "--eval-samples", "2"])
    volatile = ("gen_s", "forward_s", "train_s", "gen_tokens_per_s", "train_tokens_per_s")
    train_lines = [{k: v for k, v in m.items() if k not in volatile} for m in read_metrics(evaluated)
                   if "eval_kl" not in m]
    assert train_lines == [{k: v for k, v in m.items() if k not in volatile} for m in read_metrics(plain)]
    evals = [m for m in read_metrics(evaluated) if "eval_kl" in m]
    assert [m["iteration"] for m in evals] == [0, 2, 3]
    assert evals[0]["eval_kl"] == 0.0 and evals[0]["eval_sqrt_kl"] == 0.0
    assert evals[-1]["eval_kl"] > 0 and evals[-1]["eval_sqrt_kl"] == pytest.approx(evals[-1]["eval_kl"] ** 0.5)
    assert all(("eval_gold" in m) == world.testbed for m in evals)
    assert all(0.0 <= m["eval_eos_rate"] <= 1.0 for m in evals)
