"""What a GPU run does differently, checked on CPU wherever CPU can show the bug class.

A run on GPUs differs from the CPU runs of the other tests in ways that used to break it at its first step or
make it not fit, and none of which a CPU run noticed: the NCCL backend has no CPU implementation (the stages
reduce python numbers as CPU tensors); NCCL's 10-minute default timeout; bf16 meant autocast only (FSDP2
all-gathered fp32 weights); frozen models in fp32; no activation checkpointing; no prompt-length cap; a
generate call on an FSDP2 model all-gathered every layer for every token. Each test below fails on the code
before these changes. What only a GPU can show (NCCL itself, CUDA kernels' determinism, memory in bytes) is
asserted by tools/gpu_smoke.py.

Some tests run themselves under torchrun (2 processes, gloo): `python tests/test_gpu_paths.py CASE RESULT`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from plumbing import common, distributed, sampling  # noqa: E402
from plumbing.common import UserError  # noqa: E402

HERE = os.path.abspath(__file__)


def run_two(case: str, tmp_path) -> dict:
    from conftest import run_command

    result = str(tmp_path / f"{case}.json")
    rc, out, err = run_command([HERE, case, result], nproc=2, timeout=240)
    assert rc == 0, out + err
    with open(result) as f:
        return json.load(f)


def tiny_llama(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         pad_token_id=1, eos_token_id=2, bos_token_id=None, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


# ----------------------------------------------------------------------------------------------------------------
# The process group: CPU tensors are legal on the GPU backend; the timeout is the flag's; one GPU per process
# ----------------------------------------------------------------------------------------------------------------
def test_the_gpu_process_group_carries_the_cpu_collectives(tmp_path):
    # gloo bound to "cuda" only stands in for NCCL, a backend without a CPU implementation: on it, the CPU
    # all-reduce the stages make (losses, counters, the preemption flag) raises, as NCCL's does. The backend
    # string a CUDA run uses, with NCCL replaced by that stand-in, must carry every collective of plumbing.
    r = run_two("backend", tmp_path)
    assert "No backend type associated with device type cpu" in r["nccl_like"]
    assert r["backend"] == "cpu:gloo,cuda:nccl"
    assert r["all_reduce_mean"] == {"a": 0.5, "b": 2.0}  # ranks send (0, 1) and (1, 3): means 0.5 and 2
    assert r["all_reduce_sum"] == 1.0 and r["preemption"] is False and r["objects"] == [[0, "x"], [1, "x"]]


def test_more_processes_than_gpus_is_one_line():
    distributed.check_gpu_count(local_rank=1, local_world=2, gpus=2)  # one GPU each: fine
    with pytest.raises(UserError, match=r"^torchrun started 4 processes on this machine, which has 2 GPU\(s\): "
                                        r"one GPU per process, so --nproc_per_node=2 at most"):
        distributed.check_gpu_count(local_rank=2, local_world=4, gpus=2)


def test_the_timeout_reaches_the_process_group(tmp_path):
    # --dist-timeout 0.02 minutes (1.2 s): rank 1 waits in an all-reduce that rank 0 joins only after 6 s,
    # so it must fail after about 1.2 s (gloo raises on its side), far below gloo's own default of 30 minutes
    r = run_two("timeout", tmp_path)
    assert r["raised"] and r["waited"] < 5.0, r


# ----------------------------------------------------------------------------------------------------------------
# bf16 the way FSDP2 means it
# ----------------------------------------------------------------------------------------------------------------
def test_mixed_precision_keeps_fp32_shards_and_computes_in_bf16(tmp_path):
    # FSDP2 with distributed.fsdp_precision(True) on 2 processes: the shards (master weights) and their
    # gradients stay fp32, the parameters a layer computes with are bf16, and the loss matches one process
    # computing the same forward in bf16 autocast (different rounding: |Δ| < 2e-2 relative)
    r = run_two("mixed", tmp_path)
    assert r["shard_dtype"] == "torch.float32" and r["grad_dtype"] == "torch.float32"
    assert r["compute_dtype"] == "torch.bfloat16"
    assert abs(r["loss"] - r["reference"]) < 2e-2 * abs(r["reference"]), r
    assert r["plain_policy_is_a_no_op"]


def test_generation_does_not_gather_the_model_for_every_token(tmp_path):
    # a 2-layer FSDP2 model generating 12 new tokens: each of its 3 FSDP units (2 layers + root) is gathered
    # once per generate call, not once per token (12 x 3 = 36 at least, before)
    r = run_two("generate", tmp_path)
    assert r["new_tokens"] == 12 and r["all_gathers"] <= 2 * 3, r
    assert r["resharded"]  # after the call, the layers hold their shards only again


# ----------------------------------------------------------------------------------------------------------------
# One process: prompt cap, autocast in generation, the process switches
# ----------------------------------------------------------------------------------------------------------------
class _Tokenizer:
    """Just what sampling.generate reads: token ids of a prompt, pad and EOS."""
    pad_token_id, eos_token_id, chat_template = 1, 2, None

    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": [int(w) for w in text.split()]})()


def test_a_long_prompt_keeps_its_last_tokens():
    # data.prompt_ids reads "5 6 7 8 9" as those 5 ids; --max-prompt-len 3 keeps 7 8 9 (the start goes first,
    # as data.encode cuts a long prompt)
    model, tok = tiny_llama(), _Tokenizer()
    prompt_ids, _ = sampling.generate(model, tok, ["5 6 7 8 9", "10 11"], max_new_tokens=2, do_sample=False,
                                      chat_template="off", max_prompt_len=3)
    assert prompt_ids.tolist() == [[7, 8, 9], [1, 10, 11]]  # left-padded with pad id 1
    full, _ = sampling.generate(model, tok, ["5 6 7 8 9"], max_new_tokens=2, do_sample=False, chat_template="off")
    assert full.tolist() == [[5, 6, 7, 8, 9]]  # 0: no cap


def test_generation_runs_under_bf16_autocast_when_asked():
    model, tok = tiny_llama(), _Tokenizer()
    seen = []
    hook = model.model.layers[0].mlp.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    sampling.generate(model, tok, ["5 6 7"], max_new_tokens=2, do_sample=False, chat_template="off", bf16=True)
    sampling.generate(model, tok, ["5 6 7"], max_new_tokens=2, do_sample=False, chat_template="off")
    hook.remove()
    assert seen[0] == torch.bfloat16 and seen[-1] == torch.float32


def test_tf32_and_deterministic_switches():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.are_deterministic_algorithms_enabled(),
              os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    try:
        common.configure_process(1, tf32=True, deterministic=True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # set before any cuBLAS call
        # the flash / memory-efficient SDPA backward is not deterministic on CUDA: the math kernel then
        assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.mem_efficient_sdp_enabled()
        common.configure_process(1)
        assert not torch.backends.cuda.matmul.allow_tf32  # the default is exact fp32
        assert torch.backends.cuda.flash_sdp_enabled() and not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before[0]
        torch.use_deterministic_algorithms(before[1])
        if before[2] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


@dataclasses.dataclass
class _Out:
    out: str  # an Args with no essential flag: only the folder matters here


def test_a_trainer_state_saved_on_gpus_loads_on_cpu(tmp_path, monkeypatch):
    # resume_state reads trainer_state.pt with map_location="cpu": optimiser tensors saved on cuda:N load on a
    # machine without that GPU (they go back to their device when the optimiser loads them)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "args.json").write_text("{}")
    (folder / "config.json").write_text("{}")
    torch.save({"step": 1, "finished": False}, folder / distributed.TRAINER_STATE)
    seen = {}
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.update(k) or real(*a, **k))
    args = _Out(str(folder))
    assert distributed.resume_state(args)["step"] == 1
    assert seen["map_location"] == "cpu"


# ----------------------------------------------------------------------------------------------------------------
# The stages: activation checkpointing changes memory, not numbers; frozen models in bf16; checkpoint kinds
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def count_mlp_calls(monkeypatch):
    """Counts LlamaMLP forwards: a checkpointed layer runs its MLP again in the backward."""
    from transformers.models.llama import modeling_llama

    calls = []
    real = modeling_llama.LlamaMLP.forward
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", lambda self, x: calls.append(1) or real(self, x))
    return calls


def _weights(folder: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def test_checkpointing_trains_the_same_weights_sft_reward_dpo(world, tmp_path, count_mlp_calls):
    # Two optimiser steps with and without --grad-checkpointing: on CPU the recomputed forward is the same
    # arithmetic, so the weights must be bit-identical; and the MLPs must have run more often (the recompute).
    # A transformers layer checkpoints only in training mode: dpo.py keeps its models in eval mode (no dropout)
    # and must still checkpoint (distributed.keep_layers_training).
    import dpo
    import reward
    import sft

    stages = {
        "sft": (sft, ["--model", world.base_model, "--data", world.sft_train, "--batch-size", "8",
                      "--micro-batch-size", "8", "--max-len", "64", "--max-steps", "2", "--eval-prompts", ""]),
        "reward": (reward, ["--model", world.base_model, "--train", world.pairs_train, "--test", "",
                            "--batch-size", "8", "--micro-batch-size", "8", "--max-len", "64", "--max-steps",
                            "2"]),
        "dpo": (dpo, ["--model", world.base_model, "--train", world.pairs_train, "--test", "", "--batch-size",
                      "8", "--micro-batch-size", "8", "--max-len", "64", "--max-steps", "2", "--eval-prompts",
                      ""]),
    }
    for name, (stage, flags) in stages.items():
        counts = []
        for ckpt in (False, True):
            count_mlp_calls.clear()
            stage.main([*flags, "--out", str(tmp_path / f"{name}{ckpt}"), "--threads", "1",
                        *(["--grad-checkpointing"] if ckpt else [])])
            counts.append(len(count_mlp_calls))
        a, b = _weights(str(tmp_path / f"{name}False")), _weights(str(tmp_path / f"{name}True"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert counts[1] > counts[0], (name, counts)


def test_checkpointing_under_fsdp2_trains_the_same_weights(world, tmp_path):
    # reward.py and meta_rm.py (the in-place route, the one that allows checkpointing) on 2 processes with
    # and without --grad-checkpointing: the same weights, bit for bit (CPU)
    from conftest import run_command

    meta = tmp_path / "S.jsonl"
    pairs = [json.loads(line) for line in open(world.pairs_train)][:16]
    meta.write_text("".join(json.dumps({"prompt": p["prompt"], "responses": [p["chosen"], p["rejected"]]})
                            + "\n" for p in pairs))
    common_flags = ["--train", world.pairs_train, "--test", "", "--batch-size", "8", "--micro-batch-size", "2",
                    "--max-len", "64", "--max-steps", "2"]
    runs = {"reward": ["reward.py", "--model", world.base_model, *common_flags],
            "meta_rm": ["meta_rm.py", "--model", world.base_model, "--fresh-head", *common_flags, "--meta",
                        str(meta), "--meta-heldout", "", "--meta-batch-size", "4", "--eta", "0.3",
                        "--meta-impl", "inplace", "--log-adapted-every", "1", "--eval-every", "0"]}
    for name, argv in runs.items():
        for ckpt in (False, True):
            rc, out, err = run_command([*argv, "--out", str(tmp_path / f"{name}{ckpt}"),
                                        *(["--grad-checkpointing"] if ckpt else [])], nproc=2)
            assert rc == 0, out + err
        a, b = _weights(str(tmp_path / f"{name}False")), _weights(str(tmp_path / f"{name}True"))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_ppo_checkpoints_its_trained_models_and_keeps_the_frozen_ones_in_bf16(world, rm_checkpoint, tmp_path,
                                                                            count_mlp_calls, capsys):
    import ppo

    flags = ["--sft", world.base_model, "--rm", rm_checkpoint, "--prompts", world.rl_prompts, "--iterations",
             "1", "--prompts-per-iteration", "4", "--rollouts-per-prompt", "2", "--mini-batch-size", "8",
             "--micro-batch-size", "8", "--max-new-tokens", "6", "--save-every", "0", "--threads", "1"]
    counts = []
    for ckpt in (False, True):
        count_mlp_calls.clear()
        ppo.main([*flags, "--out", str(tmp_path / f"ppo{ckpt}"), *(["--grad-checkpointing"] if ckpt else [])])
        counts.append(len(count_mlp_calls))
    a, b = _weights(str(tmp_path / "ppoFalse")), _weights(str(tmp_path / "ppoTrue"))
    assert all(torch.equal(a[k], b[k]) for k in a) and counts[1] > counts[0], counts
    capsys.readouterr()
    ppo.main([*flags, "--out", str(tmp_path / "bf16"), "--bf16"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("ppo: "))
    assert "policy and critic torch.float32 (trained), reference and RM torch.bfloat16 (frozen)" in line


def test_a_reward_model_where_a_causal_lm_belongs_is_one_line(world, rm_checkpoint, tmp_path):
    # before: sft.py --model <RM> and ppo.py --sft <RM> ran, the RM's missing LM head drawn at random
    from conftest import run_command

    expected = (f"error: {rm_checkpoint}: {{flag}} must be a causal language model (a base model, or what "
                "sft.py, ppo.py or dpo.py save), but this is a LlamaForSequenceClassification checkpoint (a "
                "reward model)")
    for argv, flag in ((["sft.py", "--model", rm_checkpoint, "--data", world.sft_train], "--model"),
                       (["ppo.py", "--sft", rm_checkpoint, "--rm", rm_checkpoint], "--sft"),
                       (["ppo.py", "--sft", world.base_model, "--policy", rm_checkpoint, "--rm", rm_checkpoint],
                        "--policy"),
                       (["meta_data.py", "--policy", rm_checkpoint, "--prompts", world.rl_prompts], "--policy")):
        out = tmp_path / argv[0]
        rc, _, err = run_command([*argv, "--out", str(out)])
        assert (rc, err.strip()) == (2, expected.format(flag=flag)) and not out.exists(), argv


def test_meta_rm_refuses_checkpointing_on_a_functional_route(world, rm_checkpoint, tmp_path):
    import meta_rm

    with pytest.raises(UserError, match=r"^--grad-checkpointing needs --meta-impl inplace \(this run's route is "
                                        r"functional\)"):
        meta_rm.main(["--model", rm_checkpoint, "--train", world.pairs_train, "--meta", "unused.jsonl",
                      "--out", str(tmp_path / "m"), "--grad-checkpointing"])


# ----------------------------------------------------------------------------------------------------------------
# The 2-process cases (run by torchrun)
# ----------------------------------------------------------------------------------------------------------------
def _backend(out: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group(backend="cuda:gloo")  # NCCL's shape: no CPU backend
    try:
        dist.all_reduce(torch.ones(1))
        out["nccl_like"] = "no error"
    except RuntimeError as e:
        out["nccl_like"] = str(e)
    dist.destroy_process_group()
    out["backend"] = distributed.process_group_backend("cuda")
    dist.init_process_group(backend=out["backend"].replace("nccl", "gloo"))
    rank = dist.get_rank()
    out["all_reduce_mean"] = distributed.all_reduce_mean({"a": float(rank), "b": 1.0 + 2 * rank}, 2)
    out["all_reduce_sum"] = distributed.all_reduce_sum(0.5, 2)
    out["preemption"] = common.Preemption(resumable=True).requested(2, 1, 3)
    objects: list = [None, None]
    dist.all_gather_object(objects, [rank, "x"])
    out["objects"] = objects


def _timeout(out: dict) -> None:
    import time

    import torch.distributed as dist

    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    distributed.init_distributed(timeout_minutes=0.02)
    if dist.get_rank() == 0:
        time.sleep(6)
        out["rank0"] = True
        return
    t0 = time.time()
    try:
        dist.all_reduce(torch.ones(1))
        out["raised"] = False
    except RuntimeError:
        out["raised"] = True
    out["waited"] = time.time() - t0


def _mixed(out: dict) -> None:
    import copy

    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dist.init_process_group(backend="gloo")
    model = tiny_llama().train()
    reference = copy.deepcopy(model)
    ids = torch.randint(3, 64, (4, 10), generator=torch.Generator().manual_seed(0))
    mp = distributed.fsdp_precision(True)
    out["plain_policy_is_a_no_op"] = distributed.fsdp_precision(False) == MixedPrecisionPolicy()
    for layer in distributed.decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    seen = []
    hook = model.model.layers[0].mlp.register_forward_pre_hook(
        lambda m, i: seen.append(m.gate_proj.weight.dtype))
    half = ids[dist.get_rank() * 2: dist.get_rank() * 2 + 2]
    loss = model(input_ids=half, labels=half).loss
    loss.backward()
    hook.remove()
    total = torch.tensor([loss.item()])
    dist.all_reduce(total)
    out["loss"] = total.item() / 2
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the same forward, bf16, in one process
        out["reference"] = sum(reference(input_ids=ids[i: i + 2], labels=ids[i: i + 2]).loss.item()
                               for i in (0, 2)) / 2
    out["compute_dtype"] = str(seen[0])
    out["shard_dtype"] = str(next(model.parameters()).dtype)
    out["grad_dtype"] = str(next(model.parameters()).grad.dtype)


def _generate(out: dict) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group(backend="gloo")
    model = tiny_llama()
    model.generation_config.eos_token_id = None  # never stop early: every step is a forward
    for layer in distributed.decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    calls = []
    real = dist.all_gather_single

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    dist.all_gather_single = counting
    tok = _Tokenizer()
    tok.eos_token_id = 63  # an id the tiny model's 12 greedy steps are not asked to stop at
    _, response = sampling.generate(model, tok, ["5 6 7"], max_new_tokens=12, do_sample=False, world=2,
                                    chat_template="off")
    dist.all_gather_single = real
    out["all_gathers"] = len(calls)
    out["new_tokens"] = response.shape[1]
    out["resharded"] = all(hasattr(p, "to_local") for p in model.model.layers[0].parameters())


if __name__ == "__main__":  # torchrun ... tests/test_gpu_paths.py CASE RESULT
    case, result = sys.argv[1], sys.argv[2]
    out: dict = {}
    {"backend": _backend, "timeout": _timeout, "mixed": _mixed, "generate": _generate}[case](out)
    import torch.distributed as dist

    writer = "waited" in out if case == "timeout" else dist.get_rank() == 0
    if writer:
        with open(result, "w") as f:
            json.dump(out, f)
    os._exit(0)
