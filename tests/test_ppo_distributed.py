"""One PPO update (steps 2-6) on fixed rollouts: 2 processes (torchrun, FSDP2, gloo) == 1 process.

The test writes a tiny SFT model and a tiny RM, then runs this file as a worker once with `python` and once with
`torchrun --nproc_per_node=2`. Each worker builds the same 16 fixed rollouts (rank r takes rows 8r..8r+7), runs
ppo.make_experience, ppo.compute_advantages and ppo.ppo_update (2 epochs x 2 mini-batches, micro-batches of 2)
and saves the updated policy and critic, the whitened advantages and the metrics. This covers the pieces that only
matter with several ranks: score normalisation, whitening and token counts all-reduced, gradients averaged by FSDP2
(x world in the loss), the strided mini-batch membership, the critic's head applied outside the FSDP2 root forward,
and the global gradient-norm clipping.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

N_ROLLOUTS = 16


def fixed_rollouts(tok):
    """16 rollouts drawn from a fixed generator: prompts of 2-6 tokens, responses of 1-8 tokens, about 3 in 4 ending
    with EOS (the others run to the maximum length without it)."""
    import ppo

    g = torch.Generator().manual_seed(0)
    letters = list(range(2, 16))
    prompts, queries, responses = [], [], []
    for i in range(N_ROLLOUTS):
        q = [letters[j] for j in torch.randint(0, 14, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g)]
        ended = torch.rand(1, generator=g).item() < 0.75
        n = int(torch.randint(1, 8, (1,), generator=g)) if ended else 8
        r = [letters[j] for j in torch.randint(0, 14, (n,), generator=g)]
        prompts.append(f"prompt {i}")
        queries.append(q)
        responses.append(r[:-1] + [tok.eos_token_id] if ended else r)
    return ppo.collate(prompts, queries, responses, tok.pad_token_id, tok.eos_token_id)


def worker(folder: str, out_file: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from plumbing import common
    from plumbing import distributed
    import ppo
    import reward

    rank, world, device = distributed.init_distributed()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(os.path.join(folder, "sft"))
    policy = distributed.load_model(AutoModelForCausalLM, os.path.join(folder, "sft"), world, device)
    ref = distributed.load_model(AutoModelForCausalLM, os.path.join(folder, "sft"), world, device)
    rm, _ = distributed.load_reward_model(os.path.join(folder, "rm"), world, device)
    critic, _ = distributed.load_reward_model(os.path.join(folder, "rm"), world, device)
    for m in (policy, ref, rm, critic):
        m.eval()
    args = ppo.Args(mini_batch_size=8, micro_batch_size=2, ppo_epochs=2, policy_lr=1e-3, critic_lr=1e-3,
                    kl_coef=0.05, score_clip=0.8)
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=args.policy_lr, betas=(0.9, 0.95), weight_decay=0.0)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, betas=(0.9, 0.95), weight_decay=0.0)

    share = N_ROLLOUTS // world
    batch = fixed_rollouts(tok).rows(slice(rank * share, (rank + 1) * share))
    exp = ppo.make_experience(policy, ref, rm, critic, batch, args, world)
    score_mean, score_std = ppo.score_stats(exp["raw_scores"], world)  # --score-norm init: global statistics
    ppo.compute_advantages(exp, batch, args, world, score_mean, score_std)
    metrics = ppo.ppo_update(policy, critic, policy_opt, critic_opt, batch, exp, args, world,
                             torch.Generator().manual_seed(0))
    advantages = exp["advantages"]
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, advantages)
        advantages = torch.cat(parts)
    policy_state = distributed.full_state_dict(policy, world)
    critic_state = distributed.full_state_dict(critic, world)
    if common.is_main():
        torch.save(dict(policy=policy_state, critic=critic_state, metrics=metrics, advantages=advantages), out_file)


def make_checkpoints(folder: str) -> None:
    """A 16-token tokenizer, a tiny Llama as the 'SFT' model and a tiny Llama classifier as the 'RM'."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

    words = ["<eos>", "<pad>"] + list("abcdefghijklmn")
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="a"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", pad_token="<pad>")
    cfg = dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=1,
               eos_token_id=0, bos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(os.path.join(folder, "sft"))
    tok.save_pretrained(os.path.join(folder, "sft"))
    rm = LlamaForSequenceClassification(LlamaConfig(num_labels=1, **cfg))
    torch.nn.init.normal_(rm.score.weight, std=0.3)  # scores of order 1, so the score clip at 0.8 is exercised
    rm.save_pretrained(os.path.join(folder, "rm"))
    tok.save_pretrained(os.path.join(folder, "rm"))


def run_worker(folder: str, out_file: str, world: int) -> None:
    if world == 1:
        cmd = [sys.executable, __file__, folder, out_file]
    else:
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        cmd = [torchrun, "--standalone", f"--nproc_per_node={world}", __file__, folder, out_file]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def test_one_ppo_update_two_processes_equals_one(tmp_path):
    make_checkpoints(str(tmp_path))
    run_worker(str(tmp_path), str(tmp_path / "w1.pt"), 1)
    run_worker(str(tmp_path), str(tmp_path / "w2.pt"), 2)
    one, two = torch.load(tmp_path / "w1.pt"), torch.load(tmp_path / "w2.pt")

    # whitening uses global statistics: identical advantages up to float32 summation order (observed 2e-7)
    torch.testing.assert_close(two["advantages"], one["advantages"], rtol=0, atol=1e-5)
    for k in ("policy_loss", "value_loss", "clipfrac", "approx_kl", "policy_grad_norm", "critic_grad_norm"):
        assert two["metrics"][k] == pytest.approx(one["metrics"][k], rel=1e-4, abs=1e-7), k
    assert one["metrics"]["clipfrac"] > 0  # the update moved ratios past 1 ± ε, so clipping is part of the check
    # Parameters after 4 AdamW steps at lr 1e-3 (each step moves a parameter by up to ~lr, observed max 4e-3).
    # Float32 forwards on different batch shapes and a reduce-scatter sum gradients in different orders
    # (relative ~1e-7); Adam's step ~lr·g/|g| is insensitive to that except where |g| itself is near the noise.
    # Observed max difference 2e-6 (policy) and 6e-8 (critic); tolerance 2e-5. A mistake in the loss
    # normalisation, the whitening or the sharding shows up at the scale of the update itself (~1e-3).
    from safetensors.torch import load_file

    for name, folder in (("policy", "sft"), ("critic", "rm")):
        init = load_file(str(tmp_path / folder / "model.safetensors"))
        assert max((one[name][k] - v).abs().max().item() for k, v in init.items()) > 1e-3  # it did move
        for key, value in one[name].items():
            torch.testing.assert_close(two[name][key], value, rtol=0, atol=2e-5, msg=f"{name} {key}")

if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
    from plumbing import common

    common.run_main(lambda: None)  # tears down the process group and exits cleanly under torchrun
