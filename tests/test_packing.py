"""Packed batches (packing.py) against the padded ones they replace (issue 15): the padded path is the reference.

Every stage's training forward now packs its sequences without padding. Here each packed loss, reward, log-prob and
gradient is compared with the same quantity computed from the right-padded (B, T) batch (reward.rewards,
sft.sft_loss_sum, meta_rm.meta_gradient on (ids, mask), PPO's former (B, P + R) forward written out below), fp32.
Tolerance: packing changes the shapes of the matmuls, so sums run in another order: a few ulp per term. Observed
≲ 1e-6 relative on rewards, losses and log-probs and ≲ 1.2e-5 of a tensor's largest entry on gradients (bounds
here: 1e-5 and 1e-4) — the padded fp32 gradient itself is that far from the float64 one (1.2e-5; packed: 0.8e-5,
checked below). A packing mistake (a token that sees another sequence, a wrong position id, a reward read at the
wrong token) changes them at 1e-2 or more.
"""
import json
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import meta_rm
import ppo
import reward
import sft
from plumbing import data, distributed, packing


def close(got, expected, rel=1e-5):
    """Equal to float rounding, relative to the largest entry of `expected` (gradients span many magnitudes)."""
    torch.testing.assert_close(got, expected, rtol=0, atol=rel * max(expected.abs().max().item(), 1e-3))


def assert_grads_close(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        close(g, e, rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# pack: the layout by hand
# ----------------------------------------------------------------------------------------------------------------
def test_pack_layout_by_hand():
    # lengths 3, 5, 2, 4 with capacity 8, first-fit decreasing: seq 1 (5) opens row 0; seq 3 (4) does not fit
    # beside it (9 > 8) and opens row 1; seq 0 (3) fills row 0 (5 + 3 = 8); seq 2 (2) goes after seq 3 in row 1.
    seqs = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14]]
    p = packing.pack(seqs, pad_id=0, capacity=8)
    assert p.input_ids.tolist() == [[4, 5, 6, 7, 8, 1, 2, 3], [11, 12, 13, 14, 9, 10, 0, 0]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0, 1]]
    assert p.starts.tolist() == [5, 0, 12, 8]       # row · 8 + column, in the order of `seqs`
    assert p.last.tolist() == [7, 4, 13, 11]
    flat = p.input_ids.flatten()
    for s, start in zip(seqs, p.starts.tolist()):
        assert flat[start: start + len(s)].tolist() == s
    # tokens 1..2 of seq 0, 0..2 of seq 1, none of seq 2, 3 of seq 3
    idx = p.spans(torch.tensor([1, 0, 0, 3]), torch.tensor([2, 3, 0, 1]))
    assert flat[idx].tolist() == [2, 3, 4, 5, 6, 14]
    # default: C = the longest (5) or twice that, by computed tokens x (1 + C / 512): 3 rows of 5 (15 x 1.01)
    # beat 2 rows of 9 (18 x 1.02)
    assert packing.pack(seqs, pad_id=0).input_ids.tolist() == [[4, 5, 6, 7, 8], [11, 12, 13, 14, 0],
                                                                [1, 2, 3, 9, 10]]
    # lengths 6, 4, 4, 4, 4: at C = 6 every sequence needs its own row (5 x 6 = 30 tokens); at 12, two rows (24)
    p = packing.pack([[1] * 6, [2] * 4, [3] * 4, [4] * 4, [5] * 4], pad_id=0)
    assert p.input_ids.tolist() == [[1] * 6 + [2] * 4 + [0] * 2, [3] * 4 + [4] * 4 + [5] * 4]


def test_sft_targets_never_cross_a_sequence_boundary():
    # labels as sft_labels makes them: -100 on the prompt. Two sequences in one row: [7 8 | 9] and [4 | 5 6].
    seqs = [[7, 8, 9], [4, 5, 6]]
    labels = [[-100, -100, 9], [-100, 5, 6]]
    p = packing.pack(seqs, pad_id=0, capacity=6)
    idx, targets = sft.packed_targets(p, labels)
    flat = p.input_ids.flatten()
    # position j predicts token j + 1 of the same sequence: 8 -> 9, 4 -> 5, 5 -> 6; the last token of the first
    # sequence (9) does not predict the first token of the second (4), and the prompt's 7 predicts nothing
    assert p.input_ids.tolist() == [[7, 8, 9, 4, 5, 6]]
    assert [(flat[i].item(), t) for i, t in zip(idx.tolist(), targets.tolist())] == [(8, 9), (4, 5), (5, 6)]


# ----------------------------------------------------------------------------------------------------------------
# Reward model, SFT, meta step: packed vs padded on the test world's tiny Llama (fp32)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(world):
    return AutoTokenizer.from_pretrained(world.base_model)


@pytest.fixture(scope="module")
def pairs(world):
    return [json.loads(line) for line in open(world.pairs_train)][:8]


def rm(world, tok, attn="sdpa"):
    torch.manual_seed(0)
    model, _ = distributed.load_reward_model(world.base_model, 1, torch.device("cpu"), attn_implementation=attn)
    return model.train()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rm_packed_rewards_and_gradient_equal_padded(world, tok, pairs, attn):
    model = rm(world, tok, attn)
    ids, mask, _ = reward.pair_batch(tok, pairs, 128)
    seqs, _ = reward.pair_sequences(tok, pairs, 128)
    packed = packing.pack(seqs, tok.pad_token_id)
    assert packed.input_ids.shape[0] < ids.shape[0]       # it did pack: several sequences share rows
    theta = list(model.parameters())
    r_pad = reward.rewards(model, ids, mask)
    g_pad = torch.autograd.grad(reward.bradley_terry_loss(r_pad[:8], r_pad[8:]), theta)
    r_pack = reward.packed_rewards(model, packed)
    g_pack = torch.autograd.grad(reward.bradley_terry_loss(r_pack[:8], r_pack[8:]), theta)
    close(r_pack, r_pad)
    assert_grads_close(g_pack, g_pad)
    # the same at explicit parameters (functional_call, as meta_rm does)
    r_fn = meta_rm.rewards_at(model, {**dict(model.named_parameters()), **dict(model.named_buffers())}, packed)
    close(r_fn, r_pad)
    # the packed fp32 gradient is no further from the exact (float64, padded) one than the padded fp32 gradient is
    model.double()
    r64 = reward.rewards(model, ids, mask)
    g64 = torch.autograd.grad(reward.bradley_terry_loss(r64[:8], r64[8:]), list(model.parameters()))
    error = lambda g: max(((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(g, g64))
    assert error(g_pack) <= 2 * error(g_pad) + 1e-7, (error(g_pack), error(g_pad))


def test_sft_packed_loss_and_gradient_equal_padded(world, tok):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(world.base_model, dtype=torch.float32).train()
    records = [json.loads(line) for line in open(world.sft_train)][:12]
    enc = [data.encode(tok, r["prompt"], r["response"], 128) for r in records]
    seqs, labels = [x for x, _, _ in enc], [sft.sft_labels(x, n) for x, n, _ in enc]
    ids, mask = data.pad(seqs, tok.pad_token_id)
    label_ids, _ = data.pad(labels, -100)
    theta = list(model.parameters())
    loss_pad = sft.sft_loss_sum(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, label_ids)
    g_pad = torch.autograd.grad(loss_pad, theta)
    packed = packing.pack(seqs, tok.pad_token_id)
    idx, targets = sft.packed_targets(packed, labels)
    assert len(idx) == (label_ids[:, 1:] != -100).sum()  # every labelled token once
    loss_pack = sft.packed_loss_sum(model, packed, idx, targets)
    g_pack = torch.autograd.grad(loss_pack, theta)
    close(loss_pack, loss_pad)
    assert_grads_close(g_pack, g_pad)


def test_response_logprobs_equal_padded(world, tok, pairs):
    # what dpo.py will read: Σ log π over each response, chosen and rejected of n pairs, vs the padded batch
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(world.base_model, dtype=torch.float32).train()
    enc = [data.encode(tok, p["prompt"], p[k], 128) for k in ("chosen", "rejected") for p in pairs]
    ids, mask = data.pad([x for x, _, _ in enc], tok.pad_token_id)
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1], -1)
    token_logp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T - 1): log π(token t + 1)
    response = torch.zeros_like(token_logp)
    for i, (x, n, _) in enumerate(enc):
        response[i, n - 1: len(x) - 1] = 1  # the positions that predict the response tokens
    expected = (token_logp * response).sum(1)
    theta = list(model.parameters())
    g_pad = torch.autograd.grad(expected.sum(), theta)
    got = packing.response_logprobs(model, packing.pack([x for x, _, _ in enc], tok.pad_token_id),
                                    torch.tensor([n for _, n, _ in enc]))
    close(got, expected)
    assert_grads_close(torch.autograd.grad(got.sum(), theta), g_pad)


@pytest.fixture(scope="module")
def meta_batches(tok, pairs):
    items = [{"prompt": p["prompt"], "responses": [p["chosen"], p["rejected"], pairs[(i + 1) % 8]["chosen"]]}
             for i, p in enumerate(pairs[:4])]
    padded = (reward.pair_batch(tok, pairs, 128)[:2],
              data.pad(meta_rm.meta_sequences(tok, items, 128), tok.pad_token_id))
    packed = (packing.pack(reward.pair_sequences(tok, pairs, 128)[0], tok.pad_token_id),
              packing.pack(meta_rm.meta_sequences(tok, items, 128), tok.pad_token_id))
    return padded, packed


def meta_gradient_padded(model, X_t, X_s, k: int, eta: float, order: int) -> tuple[list, dict]:
    """The padded twin of meta_rm.meta_gradient (which takes packed batches only): Algorithm 1 l.4–7 written
    again on right-padded (ids, mask) batches, the rewards read by transformers' own pooling at the last
    non-pad token (reward.rewards) at θ and θ' through torch.func.functional_call."""
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    theta = list(params.values())

    def r(at: dict, batch) -> torch.Tensor:
        return torch.func.functional_call(model, {**at, **buffers}, args=(), kwargs=dict(
            input_ids=batch[0], attention_mask=batch[1], use_cache=False)).logits[:, 0]

    J = meta_rm.difference_loss(r(params, X_s).view(-1, k))
    grad_J = torch.autograd.grad(J, theta, create_graph=order == 2)
    adapted = {n: p + eta * (g if order == 2 else g.detach()) for (n, p), g in zip(params.items(), grad_J)}
    r_t = r(adapted, X_t)
    n = r_t.shape[0] // 2
    L = reward.bradley_terry_loss(r_t[:n], r_t[n:])
    with torch.no_grad():
        J_adapted = meta_rm.difference_loss(r(adapted, X_s).view(-1, k))
    grad_J_norm = torch.sqrt(sum((g.detach().double() ** 2).sum() for g in grad_J)).item()
    stats = {"J": J.item(), "J_adapted": J_adapted.item(), "L_adapted": L.item(), "grad_J_norm": grad_J_norm,
             "acc_adapted": (r_t[:n] > r_t[n:]).float().mean().item()}
    return list(torch.autograd.grad(L, theta)), stats


@pytest.mark.parametrize("order", [1, 2])
def test_meta_gradient_packed_equals_padded(world, tok, meta_batches, order):
    # order 2 differentiates twice through attention: eager attention, as meta_rm.py loads it
    model = rm(world, tok, "eager" if order == 2 else "sdpa")
    (X_t, X_s), (P_t, P_s) = meta_batches
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    g_pad, s_pad = meta_gradient_padded(model, X_t, X_s, k=3, eta=0.5, order=order)
    g_pack, s_pack = meta_rm.meta_gradient(model, params, buffers, P_t, P_s, k=3, eta=0.5, order=order)
    assert_grads_close(g_pack, g_pad)
    for p, g in zip(params.values(), g_pack):  # what the loop does before it logs the mechanism
        p.grad = g
    s_pack.update(meta_rm.mechanism_stats(model, [P_t], [P_s], k=3, eta=0.5, normalize_ascent=False, n_pairs=8,
                                          n_prompts=4, bf16=False))
    for key in ("J", "J_adapted", "L_adapted", "grad_J_norm", "acc_adapted"):
        assert s_pack[key] == pytest.approx(s_pad[key], rel=1e-5), key
    if order == 1:  # the in-place route (FSDP2's) on packed micro-batches: the same gradient, θ restored exactly
        before = [p.detach().clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        meta_rm.meta_gradient_inplace(model, [P_t], [P_s], k=3, eta=0.5, n_pairs=8, n_prompts=4)
        assert_grads_close([p.grad for p in model.parameters()], g_pad)
        assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


# ----------------------------------------------------------------------------------------------------------------
# PPO: the packed forwards and update vs the former (B, P + R) padded forward
# ----------------------------------------------------------------------------------------------------------------
def padded_forward(model, batch: ppo.Rollouts):
    """PPO's forward before packing: the whole (B, P + R) grid, position ids that skip the left padding."""
    mask = batch.attention_mask
    return model(input_ids=batch.input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                 use_cache=False, output_hidden_states=True)


def padded_logprobs(policy, batch, T):
    logits = padded_forward(policy, batch).logits[:, batch.prompt_len - 1: -1]  # (B, R, V)
    logp = torch.log_softmax(logits / T, -1)
    return logp.gather(-1, batch.response.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def padded_values(critic, batch):
    return critic.score(padded_forward(critic, batch).hidden_states[-1])[..., 0][:, batch.prompt_len - 1: -1]


@pytest.fixture(scope="module")
def ppo_world(world, tok):
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(world.base_model, dtype=torch.float32).eval()
    critic, _ = distributed.load_reward_model(world.base_model, 1, torch.device("cpu"))
    critic.eval()
    prompts = [json.loads(line)["prompt"] for line in open(world.rl_prompts)][:6]
    args = ppo.Args(max_new_tokens=12, generation_batch_size=24, temperature=0.8)
    torch.manual_seed(1)
    batch = ppo.rollout(policy, tok, [p for p in prompts for _ in range(4)], args, 1, torch.device("cpu"))
    assert len(set(batch.response_mask.sum(1).tolist())) > 1 and len(set(batch.attention_mask.sum(1).tolist())) > 1
    return policy, critic, batch, args


def test_ppo_experience_packed_equals_padded(ppo_world):
    policy, critic, batch, args = ppo_world
    mask = batch.response_mask.bool()
    pr = ppo.pack_rollouts(batch, torch.device("cpu"))
    with torch.no_grad():
        lp, ent = ppo.logprobs_and_entropy(ppo.response_logits(policy, pr), pr.tokens, args.temperature, True)
        lp_pad, ent_pad = padded_logprobs(policy, batch, args.temperature)
        close(pr.grid(lp)[mask], lp_pad[mask])
        close(pr.grid(ent)[mask], ent_pad[mask])
        assert (pr.grid(lp)[~mask] == 0).all()
        values = ppo.critic_values(critic, pr)
        close(values[mask], padded_values(critic, batch)[mask])
        last = batch.prompt_len + batch.response_mask.sum(1) - 1
        scores = critic.score(padded_forward(critic, batch).hidden_states[-1])[..., 0][torch.arange(len(last)), last]
        close(ppo.rm_scores(critic, pr), scores)


def test_ppo_update_gradients_packed_equal_padded(ppo_world):
    # the losses of step 6 (policy_loss, value_loss over the valid tokens) and their gradients, on rollouts whose
    # old log-probs / values are perturbed so that the ratio and value clips are active on some tokens
    policy, critic, batch, args = ppo_world
    mask = batch.response_mask.float()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        old_lp = padded_logprobs(policy, batch, args.temperature)[0] + 0.3 * torch.randn(mask.shape, generator=gen)
        old_v = padded_values(critic, batch) + 0.3 * torch.randn(mask.shape, generator=gen)
    adv, ret = torch.randn(mask.shape, generator=gen) * mask, torch.randn(mask.shape, generator=gen) * mask
    policy.train(False), critic.train(False)

    def losses(lp, v):
        pg = ppo.policy_loss(lp, old_lp, adv, mask, 0.2).sum() / mask.sum()
        return pg, ppo.value_loss(v, old_v, ret, mask, 0.2).sum() / mask.sum()

    theta_p, theta_c = list(policy.parameters()), list(critic.parameters())
    pg_pad, vf_pad = losses(padded_logprobs(policy, batch, args.temperature)[0], padded_values(critic, batch))
    pr = ppo.pack_rollouts(batch, torch.device("cpu"))
    pg, vf = losses(pr.grid(ppo.logprobs_and_entropy(ppo.response_logits(policy, pr), pr.tokens,
                                                     args.temperature)[0]), ppo.critic_values(critic, pr))
    close(pg, pg_pad)
    close(vf, vf_pad)
    assert_grads_close(torch.autograd.grad(pg, theta_p), torch.autograd.grad(pg_pad, theta_p))
    assert_grads_close(torch.autograd.grad(vf, theta_c), torch.autograd.grad(vf_pad, theta_c))
