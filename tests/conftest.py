"""Shared test fixtures: a small synthetic world (data + tiny base model) and a subprocess runner.

`world` (session scope) is what every stage test trains on. It is generated once per test session into a temporary
folder by `python -m testbed --out DIR` with small sizes (a few hundred records, the ~1M-parameter tiny Llama;
about 5 s). When the testbed package is not in the checkout, a throwaway world with the same file names is built instead
(random words, a byte-level BPE tokenizer, a 2-layer Llama), so the plumbing tests never depend on it.

This process and every subprocess use one thread (OMP_NUM_THREADS=1).

`run_command(args, nproc=1)` runs `python SCRIPT ...` (nproc 1) or `torchrun --standalone --nproc_per_node=N
SCRIPT ...` with OMP_NUM_THREADS=1 (two processes share two cores) and PYTHONPATH = the repository root, and
returns (returncode, stdout, stderr). Import it (`from conftest import run_command`) or take the `run` fixture.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys

import pytest

# One thread per process, in this process too: the tiny models gain nothing from a second thread, and when two
# processes (or another job) share the two cores, OpenMP's spinning threads make a forward pass ~50x slower.
os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402  (after OMP_NUM_THREADS)

torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Sizes of the test world: enough records for a few global batches of 8-16, small enough to build in seconds.
WORLD_SIZES = dict(n_sft=256, n_pairs_train=128, n_pairs_test=32, n_rl_prompts=64, n_eval_prompts=16,
                   n_ood_prompts=16, n_ood_pairs_test=16, vocab_size=300)


def subprocess_env() -> dict[str, str]:
    """The environment of every stage launched by a test: one thread per process, the repo importable, offline."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    return env


def run_command(args: list[str], nproc: int = 1, timeout: float = 180) -> tuple[int, str, str]:
    """Run `python args...` (nproc 1) or `torchrun --standalone --nproc_per_node=nproc args...` in the repository
    root; return (returncode, stdout, stderr). A command that outlives `timeout` seconds fails the test."""
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        launcher = [torchrun] if os.path.exists(torchrun) else [sys.executable, "-m", "torch.distributed.run"]
        cmd = [*launcher, "--standalone", f"--nproc_per_node={nproc}", *args]
    try:
        p = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {timeout} s: {' '.join(cmd)}\nstdout:\n{e.stdout}\nstderr:\n{e.stderr}")
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="session")
def run():
    """The subprocess runner `run_command` as a fixture."""
    return run_command


@dataclasses.dataclass(frozen=True)
class World:
    """Paths of a generated world. `testbed` is True when it came from the testbed package (then gold rewards exist)."""
    root: str
    base_model: str        # save_pretrained folder: tiny LlamaForCausalLM + tokenizer (EOS != PAD)
    sft_train: str         # {prompt, response}
    pairs_train: str       # {prompt, chosen, rejected}
    pairs_test: str        # {prompt, chosen, rejected}
    rl_prompts: str        # {prompt}
    eval_prompts: str      # {prompt}
    ood_prompts: str       # {prompt}
    ood_pairs_test: str    # {prompt, chosen, rejected}
    testbed: bool


def _world_paths(root: str, testbed: bool) -> World:
    data = os.path.join(root, "data")
    names = ("sft_train", "pairs_train", "pairs_test", "rl_prompts", "eval_prompts", "ood_prompts", "ood_pairs_test")
    return World(root=root, base_model=os.path.join(root, "base_model"), testbed=testbed,
                 **{n: os.path.join(data, f"{n}.jsonl") for n in names})


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    root = str(tmp_path_factory.mktemp("world"))
    # TEST_WORLD=throwaway forces the fallback world (to check that the plumbing tests do not need the testbed)
    if os.path.exists(os.path.join(REPO, "testbed", "world.py")) and os.environ.get("TEST_WORLD") != "throwaway":
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in WORLD_SIZES.items()]
        rc, out, err = run_command(["-m", "testbed", "--out", root, "--seed", "0", "--overwrite", *flags], timeout=120)
        assert rc == 0, f"python -m testbed failed:\n{out}\n{err}"
        return _world_paths(root, testbed=True)
    _build_throwaway_world(root)
    return _world_paths(root, testbed=False)


@pytest.fixture(scope="session")
def rm_checkpoint(world, tmp_path_factory) -> str:
    """A reward-model folder as reward.py saves one (LlamaForSequenceClassification, one label, score weight in the
    safetensors): the world's base model with a head drawn under seed 0, untrained. The stages refuse a causal LM
    where they need an RM (distributed.check_reward_model), so tests that only need some RM use this."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(tmp_path_factory.mktemp("rm_checkpoint"))
    tokenizer = AutoTokenizer.from_pretrained(world.base_model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(world.base_model, num_labels=1,
                                                                   pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _build_throwaway_world(root: str) -> None:
    """Random-word data in the testbed's file layout + a byte-level BPE tokenizer + a tiny Llama (2 layers, 64 wide)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    words = "apple banana cherry dog cat red blue green one two three four five".split()

    def prompt() -> str:
        return f"\n\nHuman: say {rng.choice(words)} {rng.randint(1, 4)} times\n\nAssistant:"

    def response(n_max: int = 6) -> str:
        return " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, n_max)))

    def pairs(n: int) -> list[dict]:
        return [{"prompt": prompt(), "chosen": response(2), "rejected": response()} for _ in range(n)]

    s = WORLD_SIZES
    files = {"sft_train": [{"prompt": prompt(), "response": response()} for _ in range(s["n_sft"])],
             "pairs_train": pairs(s["n_pairs_train"]), "pairs_test": pairs(s["n_pairs_test"]),
             "rl_prompts": [{"prompt": prompt()} for _ in range(s["n_rl_prompts"])],
             "eval_prompts": [{"prompt": prompt()} for _ in range(s["n_eval_prompts"])],
             "ood_prompts": [{"prompt": prompt()} for _ in range(s["n_ood_prompts"])],
             "ood_pairs_test": pairs(s["n_ood_pairs_test"])}
    os.makedirs(os.path.join(root, "data"))
    for name, records in files.items():
        with open(os.path.join(root, "data", f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [v for records in files.values() for r in records for v in r.values()]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(os.path.join(root, "base_model"))
    tokenizer.save_pretrained(os.path.join(root, "base_model"))
