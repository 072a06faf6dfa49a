"""Checkpoints of the wrong kind are refused: where a stage needs a reward model (ppo --rm, evaluate --rms /
--judge-rm, meta_rm --model), a causal-LM checkpoint (SFT, a PPO policy) is one line that names the stage that makes
an RM, before anything is loaded or written. Loading it anyway would give it a randomly initialised score head, and
PPO would train against noise without a word. An RM is what reward.py / meta_rm.py save: a
...ForSequenceClassification config with one label and the score head's weight in the safetensors."""
import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

import evaluate
import meta_rm
import ppo
import reward
from plumbing import distributed
from plumbing.common import UserError
from conftest import run_command


def refusal(path: str, flag: str, kind: str) -> str:
    return (f"{path}: {flag} must be a reward model (one score head, trained: what reward.py or meta_rm.py saves), "
            f"but this is a {kind} checkpoint")


def test_check_reward_model_by_hand(world, rm_checkpoint, tmp_path):
    distributed.check_reward_model(rm_checkpoint, "--rm")  # what reward.py saves: accepted
    with pytest.raises(UserError) as e:
        distributed.check_reward_model(world.base_model, "--rm")
    assert str(e.value) == (refusal(world.base_model, "--rm", "LlamaForCausalLM")
                            + f"; train one with reward.py --model {world.base_model}")
    # a classifier with two labels is not an RM
    two = str(tmp_path / "two_labels")
    shutil.copytree(rm_checkpoint, two)
    config = json.load(open(os.path.join(two, "config.json")))
    config["id2label"], config["label2id"] = {"0": "A", "1": "B"}, {"A": 0, "B": 1}
    json.dump(config, open(os.path.join(two, "config.json"), "w"))
    with pytest.raises(UserError, match="LlamaForSequenceClassification checkpoint with 2 labels"):
        distributed.check_reward_model(two, "--rm")
    # the right config, but no score head in the weights (it would be initialised at random)
    headless = str(tmp_path / "headless")
    shutil.copytree(rm_checkpoint, headless)
    weights = load_file(os.path.join(headless, "model.safetensors"))
    del weights["score.weight"]
    save_file(weights, os.path.join(headless, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="LlamaForSequenceClassification checkpoint without score.weight in its "
                                        "safetensors"):
        distributed.check_reward_model(headless, "--rm")


def test_every_stage_that_needs_an_rm_refuses_a_causal_lm(world, rm_checkpoint, tmp_path):
    sft_like = world.base_model  # a LlamaForCausalLM folder, as sft.py and ppo.py save
    out = str(tmp_path / "o")
    # toy sizes: where the check is missing, each command would run (and must not run for long)
    tiny_ppo = ["--iterations", "1", "--prompts-per-iteration", "2", "--rollouts-per-prompt", "2",
                "--mini-batch-size", "4", "--micro-batch-size", "4", "--max-new-tokens", "4"]
    tiny_rm = ["--max-steps", "1", "--batch-size", "4", "--meta-batch-size", "4", "--micro-batch-size", "4",
               "--max-len", "64", "--test", "", "--meta-heldout", ""]
    cases = [
        (ppo.main, ["--sft", sft_like, "--rm", sft_like, "--prompts", world.rl_prompts, *tiny_ppo], "--rm", ""),
        (meta_rm.main, ["--model", sft_like, "--train", world.pairs_train, *tiny_rm], "--model",
         " (or pass --fresh-head to start from it with a new head)"),
        (evaluate.main, ["--rms", f"a={rm_checkpoint},b={sft_like}", "--max-len", "64", "--pairs-test",
                         world.pairs_test, "--ood-pairs-test", ""], "--rms", ""),
        (evaluate.main, ["--policy-a", sft_like, "--policy-b", sft_like, "--prompts", world.eval_prompts,
                         "--max-prompts", "2", "--max-new-tokens", "4", "--judge", "rm", "--judge-rm", sft_like],
         "--judge-rm", ""),
    ]
    for main, argv, flag, alternative in cases:
        with pytest.raises(UserError) as e:
            main([*argv, "--out", out])
        assert str(e.value) == (refusal(sft_like, flag, "LlamaForCausalLM") + f"; train one with reward.py --model "
                                f"{sft_like}{alternative}")
        assert not os.path.exists(out)


def test_ppo_with_an_sft_checkpoint_as_rm_is_one_line(world, tmp_path):
    out = tmp_path / "ppo"
    rc, stdout, stderr = run_command(["ppo.py", "--sft", world.base_model, "--rm", world.base_model, "--prompts",
                                      world.rl_prompts, "--out", str(out), "--iterations", "1",
                                      "--prompts-per-iteration", "2", "--rollouts-per-prompt", "2",
                                      "--mini-batch-size", "4", "--micro-batch-size", "4", "--max-new-tokens", "4"])
    lines = stderr.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: {refusal(world.base_model, '--rm', '')[:40]}")
    assert "reward.py" in lines[0] and not out.exists()
