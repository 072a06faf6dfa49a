"""PPO pieces on values derived by hand (derivations in comments) and against independent reference code:
GAE (hand 2x3 example and a plain Python loop), whitening, per-token reward shaping, the clipped policy and value
losses (values and gradients), log-probs recomputed from the model vs those of generation, EOS truncation, and the
RM score read in PPO's left-padded layout vs reward.py's."""
from __future__ import annotations

import math
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

import ppo
import reward
from plumbing import data, sampling


# ---------------------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------------------
def test_gae_hand_example():
    # γ = 0.9, λ = 0.5. Row 0 has 3 valid tokens, row 1 has 2: its third reward (5) and value (9) are padding and
    # must be ignored; the value after the last valid token is 0.
    # Row 0: t=2: δ = 2 + 0.9·0 − 1.5 = 0.5                       A = 0.5
    #        t=1: δ = 0 + 0.9·1.5 − 1 = 0.35                      A = 0.35 + 0.45·0.5   = 0.575
    #        t=0: δ = 1 + 0.9·1 − 0.5 = 1.4                       A = 1.4  + 0.45·0.575 = 1.65875
    #        returns A + V = 2.15875, 1.575, 2.0
    # Row 1: t=1: δ = 1 + 0.9·0 − 2 = −1  (not 0.9·9: padding)    A = −1
    #        t=0: δ = 0.5 + 0.9·2 − 1 = 1.3                       A = 1.3 + 0.45·(−1)  = 0.85
    #        returns 1.85, 1.0, 0 (padding)
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 5.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 1.0, 1.5], [1.0, 2.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    adv, ret = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[1.65875, 0.575, 0.5], [0.85, -1.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[2.15875, 1.575, 2.0], [1.85, 1.0, 0.0]], dtype=torch.float64))


def gae_loop(rewards, values, lengths, gamma, lam):
    """The textbook recursion, one row and one token at a time, on python floats."""
    adv = [[0.0] * len(r) for r in rewards]
    for b, L in enumerate(lengths):
        a = 0.0
        for t in reversed(range(L)):
            next_value = values[b][t + 1] if t + 1 < L else 0.0
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            a = delta + gamma * lam * a
            adv[b][t] = a
    ret = [[adv[b][t] + values[b][t] if t < L else 0.0 for t in range(len(rewards[b]))] for b, L in enumerate(lengths)]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_python_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, T = 5, 9
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = [9, 1, 4, 7, 2]
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).double()
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    adv_ref, ret_ref = gae_loop(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(adv_ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, torch.tensor(ret_ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_whiten_over_valid_tokens():
    # valid values 1, 2, 3, 4: mean 2.5, population variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -7.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    s = math.sqrt(1.25)
    expected = torch.tensor([[-1.5 / s, -0.5 / s, 0.5 / s], [1.5 / s, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(ppo.whiten(x, mask, eps=0.0), expected)


# ---------------------------------------------------------------------------------------------------------------
# Reward shaping (step 4)
# ---------------------------------------------------------------------------------------------------------------
def test_per_token_rewards_hand_example():
    # β = 0.1. Row 0 (3 tokens): KL = log π − log π_ref = [0.5, −1, 0] -> −β·KL = [−0.05, 0.1, 0], score 0.8 on
    # the last token -> [−0.05, 0.1, 0.8]. Row 1 (2 tokens; the third is padding with a large fake KL that must
    # vanish): KL = [1, 0, (pad)] -> [−0.1, 0, 0], score −0.3 on token 1 -> [−0.1, −0.3, 0].
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -3.0]], dtype=torch.float64)
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    scores = torch.tensor([0.8, -0.3], dtype=torch.float64)
    rewards, kl = ppo.per_token_rewards(logprobs, ref_logprobs, scores, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 0.8], [-0.1, -0.3, 0.0]], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# Clipped losses (step 6)
# ---------------------------------------------------------------------------------------------------------------
def test_policy_loss_hand_values_and_gradients():
    # ε = 0.2, old log-prob 0, so ratio ρ = exp(logprob). loss = max(−Aρ, −A·clip(ρ, 0.8, 1.2)).
    #   ρ    A    −Aρ    −A·clip    loss    d loss / d logprob (= −Aρ if the unclipped term wins, else 0)
    #  1.1   2   −2.2    −2.2      −2.2    −2.2   inside the range: both terms equal
    #  1.5   2   −3.0    −2.4      −2.4     0     good token already pushed past 1+ε: clipped, no gradient
    #  1.5  −1    1.5     1.2       1.5     1.5   bad token made more likely: pessimistic term is unclipped
    #  0.5  −1    0.5     0.8       0.8     0     bad token already pushed below 1−ε: clipped, no gradient
    #  0.5   2   −1.0    −1.6      −1.0    −1.0   good token made less likely: unclipped, gradient pulls it back
    #  (pad) 5                      0       0
    ratios = [1.1, 1.5, 1.5, 0.5, 0.5, 3.0]
    logprobs = torch.tensor([[math.log(r) for r in ratios]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 6, dtype=torch.float64)
    adv = torch.tensor([[2.0, 2.0, -1.0, -1.0, 2.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    loss = ppo.policy_loss(logprobs, old, adv, mask, clip=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-2.2, -2.4, 1.5, 0.8, -1.0, 0.0]], dtype=torch.float64))
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-2.2, 0.0, 1.5, 0.0, -1.0, 0.0]], dtype=torch.float64))


def test_value_loss_hand_values_and_gradients():
    # c = 0.2, V_old = 1. loss = 0.5·max((V − R)², (V_clip − R)²), V_clip = 1 + clip(V − 1, −0.2, 0.2).
    #   V    R    (V−R)²  V_clip  (V_clip−R)²  loss    d loss / dV (= V − R if the unclipped term wins, else 0)
    #  1.1   2    0.81    1.1     0.81         0.405   −0.9   inside the range
    #  1.5   2    0.25    1.2     0.64         0.32     0     moved 0.5 towards R: the clipped term wins
    #  1.5   0    2.25    1.2     1.44         1.125    1.5   moved away from R: the unclipped term wins
    #  0.5   0    0.25    0.8     0.64         0.32     0
    #  (pad)                                   0        0
    values = torch.tensor([[1.1, 1.5, 1.5, 0.5, 7.0]], dtype=torch.float64, requires_grad=True)
    old = torch.ones(1, 5, dtype=torch.float64)
    returns = torch.tensor([[2.0, 2.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    loss = ppo.value_loss(values, old, returns, mask, clip=0.2)
    torch.testing.assert_close(loss, torch.tensor([[0.405, 0.32, 1.125, 0.32, 0.0]], dtype=torch.float64))
    loss.sum().backward()
    torch.testing.assert_close(values.grad, torch.tensor([[-0.9, 0.0, 1.5, 0.0, 0.0]], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# Tiny models for the sampling and scoring checks
# ---------------------------------------------------------------------------------------------------------------
WORDS = ["<eos>", "<pad>"] + list("abcdefghijklmn")


@pytest.fixture(scope="module")
def tok():
    """A 16-token word-level tokenizer: id 0 is EOS, id 1 is PAD, then the letters a..n."""
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="a"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", pad_token="<pad>")


def tiny_config(tok, **kw):
    return LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None, **kw)


PROMPTS = ["a b c d e f", "g h", "i j k", "m"]  # different lengths: left padding of 0, 4, 3 and 5 tokens


def test_logprobs_recomputed_equal_generation_scores_and_eos_truncation(tok):
    # Reference: the per-step scores of Hugging Face's generate (KV cache, left padding, its own position ids) with
    # only the temperature warper active (top_k=0, top_p=1, no repetition penalty), so log_softmax(scores) is the
    # log-probability the token was sampled with. ppo recomputes it with one full forward in its own layout.
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(tok)).eval()
    T = 0.7
    enc = tok(PROMPTS * 3, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**enc, do_sample=True, temperature=T, top_k=0, top_p=1.0, repetition_penalty=1.0,
                         max_new_tokens=10, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         output_scores=True, return_dict_in_generate=True)
    P = enc.input_ids.shape[1]
    response = sampling.truncate_at_eos(out.sequences[:, P:], tok.eos_token_id, tok.pad_token_id)
    gen_logprobs = torch.stack([torch.log_softmax(s, -1) for s in out.scores], dim=1)  # (B, R, V)
    gen_logprobs = gen_logprobs.gather(-1, response.unsqueeze(-1)).squeeze(-1)          # (B, R)

    queries = [[t for t in q if t != tok.pad_token_id] for q in enc.input_ids.tolist()]
    responses = [r[: r.index(tok.eos_token_id) + 1] if tok.eos_token_id in r else r for r in response.tolist()]
    batch = ppo.collate(PROMPTS * 3, queries, responses, tok.pad_token_id, tok.eos_token_id)
    pr = ppo.pack_rollouts(batch, torch.device("cpu"))  # ppo's packed forward (no padding columns)
    with torch.no_grad():
        logprobs = pr.grid(ppo.logprobs_and_entropy(ppo.response_logits(model, pr), pr.tokens, T)[0])
    mask = batch.response_mask.bool()
    assert mask.sum() > 30
    # float32: KV-cached decoding and one full forward sum in different orders; observed differences ~1e-6
    torch.testing.assert_close(logprobs[mask], gen_logprobs[:, : mask.shape[1]][mask], rtol=0, atol=1e-5)
    # without the division by T the log-probs would be clearly different
    with torch.no_grad():
        untempered = pr.grid(ppo.logprobs_and_entropy(ppo.response_logits(model, pr), pr.tokens, 1.0)[0])
    assert (untempered[mask] - gen_logprobs[:, : mask.shape[1]][mask]).abs().max() > 1e-2

    # truncation: the mask covers exactly the tokens up to and including the first EOS; nothing after it
    lengths = batch.response_mask.sum(1).tolist()
    for row, L, ended in zip(response.tolist(), lengths, batch.ended.tolist()):
        if tok.eos_token_id in row:
            assert ended and L == row.index(tok.eos_token_id) + 1
            assert all(t == tok.pad_token_id for t in row[L:])
        else:
            assert not ended and L == 10
    assert 0 < sum(batch.ended.tolist()) < len(lengths)  # this seed gives both kinds of rows
    assert any(L < 10 for L in lengths)


def test_rollout_cuts_each_response_after_its_first_eos(tok):
    # ppo.rollout (sampling.generate with the paper's sampling settings): every row's mask ends at its first EOS,
    # the columns after it are PAD with mask 0, and rows without EOS run to max_new_tokens.
    torch.manual_seed(1)
    model = LlamaForCausalLM(tiny_config(tok)).eval()
    args = ppo.Args(max_new_tokens=12, generation_batch_size=5)
    batch = ppo.rollout(model, tok, PROMPTS * 4, args, world=1, device=torch.device("cpu"))
    assert batch.input_ids.shape[0] == 16
    for prompt, ids, amask, rmask, ended in zip(batch.prompts, batch.input_ids.tolist(), batch.attention_mask.tolist(),
                                                batch.response_mask.tolist(), batch.ended.tolist()):
        P = batch.prompt_len
        resp = ids[P:]
        L = sum(rmask)
        assert rmask == [1] * L + [0] * (len(resp) - L)
        assert ids[:P][P - len(prompt.split()):] == tok(prompt).input_ids  # prompt right-aligned at column P
        assert amask[P:] == rmask
        assert (tok.eos_token_id in resp[:L]) == ended
        if ended:
            assert resp.index(tok.eos_token_id) == L - 1
        else:
            assert L == 12
        assert all(t == tok.pad_token_id for t in resp[L:])
    assert 0 < sum(batch.ended.tolist()) < 16


def test_rm_score_in_ppo_layout_equals_reward_py(tok):
    # The RM is trained on [prompt response EOS] (reward.py); PPO rebuilds each rollout from its left-padded prompt
    # and right-padded response columns, packs it and reads the head at its EOS. Both must give the same r(x, y).
    torch.manual_seed(2)
    rm = LlamaForSequenceClassification(tiny_config(tok, num_labels=1)).eval()
    rng = random.Random(0)
    responses = [" ".join(rng.choice(WORDS[2:]) for _ in range(rng.randint(1, 6))) for _ in PROMPTS]
    seqs = [data.encode(tok, p, r, max_len=64)[0] for p, r in zip(PROMPTS, responses)]
    ids, mask = data.pad(seqs, tok.pad_token_id)
    with torch.no_grad():
        expected = reward.rewards(rm, ids, mask)
    queries = [tok(p).input_ids for p in PROMPTS]
    resp_ids = [tok(r, add_special_tokens=False).input_ids + [tok.eos_token_id] for r in responses]
    batch = ppo.collate(PROMPTS, queries, resp_ids, tok.pad_token_id, tok.eos_token_id)
    with torch.no_grad():
        pr = ppo.pack_rollouts(batch, torch.device("cpu"))
        got = ppo.rm_scores(rm, pr)
        values = ppo.critic_values(rm, pr)  # the same head at the position before each response token
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert values.shape == batch.response_mask.shape


def test_token_kl_is_the_exact_kl_of_two_categoricals():
    # KL(p || q) = sum_v p_v log(p_v / q_v), written out with python floats, for p = softmax(a / T), q = softmax(b / T)
    import math

    a, b, T = [1.0, -0.5, 2.0, 0.0], [0.3, 0.3, -1.0, 1.5], 0.8

    def softmax(x):
        e = [math.exp(v / T) for v in x]
        return [v / sum(e) for v in e]

    p, q = softmax(a), softmax(b)
    exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    got = ppo.token_kl(torch.tensor([[a]], dtype=torch.float64), torch.tensor([[b]], dtype=torch.float64), T)
    assert got.shape == (1, 1) and got.item() == pytest.approx(exact, rel=1e-12)
    assert ppo.token_kl(torch.tensor([[a]]), torch.tensor([[a]]), T).item() == pytest.approx(0.0, abs=1e-7)


def test_summed_token_kl_along_samples_is_the_sequence_kl():
    # A two-token "language model" over 3 symbols: pi(y1), pi(y2 | y1) and the same for the reference. The
    # sequence KL by enumerating all 9 sequences, sum_y pi(y) log(pi(y) / ref(y)), equals the expectation under pi
    # of token_kl at step 1 plus token_kl at step 2 (given the sampled y1) - the chain rule the estimator rests on.
    import itertools
    import math

    g = torch.Generator().manual_seed(0)
    pi1, ref1 = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    pi2, ref2 = torch.randn(3, 3, generator=g, dtype=torch.float64), torch.randn(3, 3, generator=g, dtype=torch.float64)
    P1, R1 = torch.softmax(pi1, -1), torch.softmax(ref1, -1)
    P2, R2 = torch.softmax(pi2, -1), torch.softmax(ref2, -1)
    exact = sum(P1[i] * P2[i, j] * math.log(P1[i] * P2[i, j] / (R1[i] * R2[i, j]))
                for i, j in itertools.product(range(3), range(3)))
    expected_sum = 0.0
    for i in range(3):  # weight of each first token under pi; the second step's KL given that token
        steps = ppo.token_kl(torch.stack([pi1, pi2[i]])[None], torch.stack([ref1, ref2[i]])[None], 1.0)  # (1, 2)
        expected_sum += P1[i] * steps.sum()
    assert float(expected_sum) == pytest.approx(float(exact), rel=1e-12)
