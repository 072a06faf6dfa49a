"""Golden-value checks of MetaRM (meta_rm.py): Eq. (2) by hand, the meta gradient of Algorithm 1 against
independent computations (manual perturb-restore, finite differences, the vanilla gradient), and FSDP2 vs 1 process.
"""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

import meta_rm
import reward
from plumbing import packing
from conftest import run_command

HERE = os.path.abspath(__file__)

sig = lambda x: 1 / (1 + math.exp(-x))


# ----------------------------------------------------------------------------------------------------------------
# Eq. (2) by hand
# ----------------------------------------------------------------------------------------------------------------
def test_difference_loss_k2_by_hand():
    # k = 2, rewards (1, 3): one pair, |1 − 3| = 2 -> (2 / 2²) σ(2) = 0.5 σ(2) = 0.44039854
    assert meta_rm.difference_loss(torch.tensor([[1.0, 3.0]])).item() == pytest.approx(0.5 * sig(2), rel=1e-6)


def test_difference_loss_k3_by_hand():
    # k = 3, rewards (0, 1, 3): pairs (0,1), (0,2), (1,2) have gaps 1, 3, 2 -> (2 / 9)(σ(1) + σ(3) + σ(2))
    expected = 2 / 9 * (sig(1) + sig(3) + sig(2))  # = 0.56987329
    assert meta_rm.difference_loss(torch.tensor([[0.0, 1.0, 3.0]])).item() == pytest.approx(expected, rel=1e-6)
    # the order of the k responses does not matter
    assert meta_rm.difference_loss(torch.tensor([[3.0, 0.0, 1.0]])).item() == pytest.approx(expected, rel=1e-6)


def test_difference_loss_is_the_mean_over_prompts():
    # prompt 1: (1, 3) -> 0.5 σ(2); prompt 2: (2, 2) -> 0.5 σ(0) = 0.25. Mean of the two.
    value = meta_rm.difference_loss(torch.tensor([[1.0, 3.0], [2.0, 2.0]])).item()
    assert value == pytest.approx((0.5 * sig(2) + 0.25) / 2, rel=1e-6)


def test_difference_loss_gradient_widens_the_gaps():
    # J = 0.5 σ(|r1 − r2|) with r = (1, 3): dJ/dr2 = 0.5 σ'(2) = 0.5 σ(2)(1 − σ(2)) = +0.0524969, dJ/dr1 = −0.0524969.
    # Ascent (r + η ∇J) raises the higher reward and lowers the lower one: the gap grows.
    r = torch.tensor([[1.0, 3.0]], requires_grad=True)
    meta_rm.difference_loss(r).backward()
    d = 0.5 * sig(2) * (1 - sig(2))
    assert r.grad[0].tolist() == pytest.approx([-d, d], rel=1e-6)
    # at a tie |·| has no derivative; torch's sign(0) = 0 gives the zero subgradient (documented choice)
    tie = torch.tensor([[2.0, 2.0]], requires_grad=True)
    meta_rm.difference_loss(tie).backward()
    assert tie.grad.tolist() == [[0.0, 0.0]]


def test_reward_gaps_by_hand():
    # two prompts, k = 3: gaps of (0, 1, 3) are 1, 3, 2 and of (0, 0, 2) are 0, 2, 2 -> mean 10 / 6
    # r1 − r2 per prompt: −1 and 0 -> variance (unbiased, n − 1 = 1): ((−1 + 0.5)² + (0 + 0.5)²) / 1 = 0.5
    stats = meta_rm.reward_gaps(torch.tensor([[0.0, 1.0, 3.0], [0.0, 0.0, 2.0]]))
    assert stats["gap_mean"] == pytest.approx(10 / 6)
    assert stats["diff12_var"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------------------------
# The meta gradient vs independent computations (tiny Llama RM from the test world, fp32)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rm_and_batches(world):
    tokenizer = AutoTokenizer.from_pretrained(world.base_model)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(world.base_model, num_labels=1,
                                                               pad_token_id=tokenizer.pad_token_id,
                                                               attn_implementation="eager")
    model.train()
    pairs = [json.loads(line) for line in open(world.pairs_train)][:4]
    # a meta batch of m = 3 prompts with k = 3 responses each, made from the pairs' responses
    items = [{"prompt": p["prompt"], "responses": [p["chosen"], p["rejected"], pairs[(i + 1) % 4]["chosen"]]}
             for i, p in enumerate(pairs[:3])]
    X_t = packing.pack(reward.pair_sequences(tokenizer, pairs, 128)[0], tokenizer.pad_token_id)
    X_s = packing.pack(meta_rm.meta_sequences(tokenizer, items, 128), tokenizer.pad_token_id)
    return model, X_t, X_s  # packed, as meta_rm.py runs them


def _functional(model, X_t, X_s, eta, order, measure=False):
    """meta_rm.py's one-process loop body up to the optimiser: meta_gradient, the gradients into p.grad, and
    with `measure` the mechanism statistics it logs every --log-adapted-every steps. p.grad is cleared after."""
    params = dict(model.named_parameters())
    grads, stats = meta_rm.meta_gradient(model, params, dict(model.named_buffers()), X_t, X_s, k=3, eta=eta,
                                         order=order)
    if measure:
        for p, g in zip(params.values(), grads):
            p.grad = g
        before = [p.detach().clone() for p in params.values()]
        stats.update(meta_rm.mechanism_stats(model, [X_t], [X_s], k=3, eta=eta, normalize_ascent=False,
                                             n_pairs=4, n_prompts=3, bf16=False))
        # mechanism_stats moves θ to θ' and back, and recomputes gradients: θ and p.grad are left exactly as found
        assert all(torch.equal(p.detach(), b) for p, b in zip(params.values(), before))
        assert all(p.grad is g for p, g in zip(params.values(), grads))
        model.zero_grad(set_to_none=True)
    return grads, stats


def _manual_first_order(model, X_t, X_s, eta):
    """The authors' recipe written out independently: back up θ, ascend on J in place, backward L at θ', restore."""
    params = list(model.parameters())
    backup = [p.detach().clone() for p in params]
    model.zero_grad(set_to_none=True)
    r = reward.packed_rewards(model, X_s).view(3, 3)  # the module's own forward (no functional_call)
    i, j = (0, 0, 1), (1, 2, 2)
    J = (torch.sigmoid((r[:, i] - r[:, j]).abs()).sum(1) * 2 / 9).mean()  # Eq. (2), written again
    J.backward()
    with torch.no_grad():
        for p in params:
            p.copy_(p + eta * p.grad)
    model.zero_grad(set_to_none=True)
    r = reward.packed_rewards(model, X_t)
    n = r.shape[0] // 2
    (-torch.nn.functional.logsigmoid(r[:n] - r[n:]).mean()).backward()
    grads = [p.grad.clone() for p in params]
    with torch.no_grad():
        for p, b in zip(params, backup):
            p.copy_(b)
    model.zero_grad(set_to_none=True)
    return grads


def test_first_order_equals_manual_perturb_restore_exactly(rm_and_batches):
    model, X_t, X_s = rm_and_batches
    before = [p.detach().clone() for p in model.parameters()]
    grads, _ = _functional(model, X_t, X_s, eta=0.05, order=1)
    manual = _manual_first_order(model, X_t, X_s, eta=0.05)
    # same dtype, same operations in the same order -> bit-identical
    for g, h in zip(grads, manual):
        assert torch.equal(g, h)
    # the in-place (sharded-path) implementation leaves the same gradient and restores θ bit for bit
    model.zero_grad(set_to_none=True)
    meta_rm.meta_gradient_inplace(model, [X_t], [X_s], k=3, eta=0.05, n_pairs=4, n_prompts=3)
    for p, h, b in zip(model.parameters(), manual, before):
        assert torch.equal(p.grad, h)
        assert torch.equal(p.detach(), b)
    model.zero_grad(set_to_none=True)


def test_eta_zero_is_the_vanilla_gradient(rm_and_batches):
    model, X_t, X_s = rm_and_batches
    grads, _ = _functional(model, X_t, X_s, eta=0.0, order=1)
    r = reward.packed_rewards(model, X_t)
    vanilla = torch.autograd.grad(reward.bradley_terry_loss(r[:4], r[4:]), list(model.parameters()))
    for g, h in zip(grads, vanilla):
        assert torch.equal(g, h)


def test_ascent_raises_J(rm_and_batches):
    # with a small η the look-ahead must increase Eq. (2) on the same X_s (a first-order Taylor argument:
    # J(θ + η g) ≈ J(θ) + η ‖g‖² > J(θ))
    model, X_t, X_s = rm_and_batches
    _, stats = _functional(model, X_t, X_s, eta=0.05, order=1, measure=True)
    assert stats["J_adapted"] > stats["J"]
    assert stats["step_norm"] == pytest.approx(0.05 * stats["grad_J_norm"])


def test_mechanism_stats_against_independent_computations(rm_and_batches):
    # reward scale and standardised J recomputed from the model's own forward (reward.rewards), cos of the two
    # gradients from reward.py's vanilla gradient; at η = 0, θ' = θ, so cos is 1 and every "adapted" value
    # equals its value at θ
    model, X_t, X_s = rm_and_batches
    grads, stats = _functional(model, X_t, X_s, eta=0.05, order=1, measure=True)
    with torch.no_grad():
        r_s, r_d = reward.packed_rewards(model, X_s), reward.packed_rewards(model, X_t)
    assert stats["reward_std_S"] == pytest.approx(r_s.std(unbiased=False).item(), rel=1e-5)
    assert stats["reward_std_D"] == pytest.approx(r_d.std(unbiased=False).item(), rel=1e-5)
    z = ((r_s - r_s.mean()) / r_s.std(unbiased=False)).view(3, 3)
    assert stats["J_std"] == pytest.approx(meta_rm.difference_loss(z).item(), rel=1e-5)
    r = reward.packed_rewards(model, X_t)
    vanilla = torch.autograd.grad(reward.bradley_terry_loss(r[:4], r[4:]), list(model.parameters()))
    dot = sum((a * b).sum() for a, b in zip(grads, vanilla))
    cos = dot / (sum((a * a).sum() for a in grads) * sum((b * b).sum() for b in vanilla)).sqrt()
    assert stats["cos_grad"] == pytest.approx(cos.item(), rel=1e-5) and stats["cos_grad"] < 1.0
    _, still = _functional(model, X_t, X_s, eta=0.0, order=1, measure=True)
    assert still["cos_grad"] == pytest.approx(1.0, abs=1e-9)
    assert still["J_adapted"] == pytest.approx(still["J"], abs=1e-7)
    assert still["J_std_adapted"] == pytest.approx(still["J_std"], abs=1e-7)


def test_standardised_J_ignores_the_reward_scale():
    # J(a·r + b) grows with a (σ(|Δ|) at larger gaps) while the ranking is unchanged; J of standardised rewards
    # does not move: (a·r + b − mean) / std = (r − mean(r)) / std(r) for a > 0
    r = torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.5, -1.0]])
    assert meta_rm.difference_loss(3 * r + 1) > meta_rm.difference_loss(r)
    assert meta_rm.difference_loss(meta_rm.standardised(3 * r + 1)).item() == pytest.approx(
        meta_rm.difference_loss(meta_rm.standardised(r)).item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Float64 golden tests on a tiny GPT-2, which stays float64 end to end (docs/design.md §9): the meta step of meta_rm.py
# (order 1, order 2, in place; 1 and 2 processes) against the same mathematics written again here with plain autograd.
# The rewards keep the model's dtype (reward.reward_dtype), so nothing is rounded to float32 on the way: two float64
# computations of the same gradient that add the same terms in another order differ by a few ulp of the largest terms
# (~1e-16 relative; measured below 1e-14), hence the tolerance 1e-10 relative to the gradient's largest entry —
# far below the 1e-7 that one rounding of the rewards to float32 leaves (what the tests allowed before).
# ----------------------------------------------------------------------------------------------------------------
ETA64, K64 = 0.5, 3  # η large, so that the Hessian term of order 2 is far above every rounding error


def gpt2_float64():
    """(model, X_t, X_s): a 2-layer GPT-2 RM in float64 with a large head (J is not flat), 4 pairs, m = 2 prompts x
    k = 3 responses, some right padding. Built from seeds: every process builds the same one."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2, num_labels=1, pad_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    model = GPT2ForSequenceClassification(config).double()
    model.score.weight.data.normal_(0, 1.0)
    ids = torch.randint(1, 40, (8 + 6, 7), generator=torch.Generator().manual_seed(0))
    ids[3, 5:] = 0  # some right padding (pad id 0)
    ids[9, 4:] = 0
    mask = (ids != 0).long()
    return model, (ids[:8], mask[:8]), (ids[8:], mask[8:])


def packed(batch: tuple[torch.Tensor, torch.Tensor]) -> packing.Packed:
    """A right-padded (ids, mask) batch as meta_rm.py runs it: its sequences packed without padding."""
    ids, mask = batch
    return packing.pack([row[m.bool()].tolist() for row, m in zip(ids, mask)], pad_id=0)


def reference_gradient(model, X_t, X_s, eta: float, order: int) -> list[torch.Tensor]:
    """d/dθ of L(θ') with θ' = θ + η ∇J(θ), by plain autograd, written here without meta_rm's code: order 1
    treats ∇J as a constant (the gradient of L at θ'); order 2 differentiates through it (create_graph)."""
    buffers = dict(model.named_buffers())
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}

    def r(params, batch):
        return torch.func.functional_call(model, {**params, **buffers}, args=(), kwargs=dict(
            input_ids=batch[0], attention_mask=batch[1])).logits[:, 0]

    s = r(theta, X_s).view(-1, K64)
    i, j = torch.triu_indices(K64, K64, offset=1)
    J = (torch.sigmoid((s[:, i] - s[:, j]).abs()).sum(1) * 2 / K64**2).mean()  # Eq. (2), written again
    g = torch.autograd.grad(J, list(theta.values()), create_graph=order == 2)
    adapted = {n: t + eta * (gi if order == 2 else gi.detach()) for (n, t), gi in zip(theta.items(), g)}
    rt = r(adapted, X_t)
    n = rt.shape[0] // 2
    L = -torch.nn.functional.logsigmoid(rt[:n] - rt[n:]).mean()  # Eq. (1), written again
    return list(torch.autograd.grad(L, list(theta.values())))


def max_relative_difference(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    scale = max(g.abs().max().item() for g in reference)
    return max((a - b).abs().max().item() for a, b in zip(grads, reference)) / scale


@pytest.mark.parametrize("order", [1, 2])
def test_float64_meta_gradient_matches_an_independent_computation(order):
    model, X_t, X_s = gpt2_float64()
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    # meta_rm.py's packed batches against the reference's padded ones: two layouts, the same mathematics
    grads, _ = meta_rm.meta_gradient(model, params, buffers, packed(X_t), packed(X_s), k=K64, eta=ETA64,
                                     order=order)
    assert all(g.dtype == torch.float64 for g in grads)
    assert max_relative_difference(grads, reference_gradient(model, X_t, X_s, ETA64, order)) < 1e-10
    if order == 1:  # the in-place route (what torchrun runs by default) gives the same, and puts θ back exactly
        before = [p.detach().clone() for p in model.parameters()]
        meta_rm.meta_gradient_inplace(model, [packed(X_t)], [packed(X_s)], k=K64, eta=ETA64, n_pairs=4,
                                      n_prompts=2)
        inplace = [p.grad for p in model.parameters()]
        assert max_relative_difference(inplace, reference_gradient(model, X_t, X_s, ETA64, 1)) < 1e-10
        assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


def test_second_order_matches_finite_differences():
    # An independent check of the order-2 gradient that shares no autograd with it: central differences of
    # F(θ) = L(θ + η ∇J(θ)) along random directions v, against <∇F, v>.
    model, X_t, X_s = gpt2_float64()
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    grads2, _ = meta_rm.meta_gradient(model, params, buffers, packed(X_t), packed(X_s), k=K64, eta=ETA64, order=2)
    grads1, _ = meta_rm.meta_gradient(model, params, buffers, packed(X_t), packed(X_s), k=K64, eta=ETA64, order=1)
    names = list(params)

    def F(theta: dict) -> float:
        """F(θ) = L(θ + η ∇J(θ)), computed from scratch with plain autograd (no meta_rm code)."""
        theta = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
        r = torch.func.functional_call(model, {**theta, **buffers}, args=(), kwargs=dict(
            input_ids=X_s[0], attention_mask=X_s[1])).logits[:, 0].view(2, 3)
        i, j = (0, 0, 1), (1, 2, 2)
        J = (torch.sigmoid((r[:, i] - r[:, j]).abs()).sum(1) * 2 / 9).mean()
        g = torch.autograd.grad(J, list(theta.values()))
        adapted = {n: theta[n].detach() + ETA64 * gi for n, gi in zip(names, g)}
        r = torch.func.functional_call(model, {**adapted, **buffers}, args=(), kwargs=dict(
            input_ids=X_t[0], attention_mask=X_t[1])).logits[:, 0]
        return (-torch.nn.functional.logsigmoid(r[:4] - r[4:]).mean()).item()

    gen = torch.Generator().manual_seed(1)
    # 4-point central differences (error O(h⁴)) in float64. F is strongly curved here (η = 0.5 and a large head).
    # Measured on these 3 directions: the 2-point stencil at h = 1e-6 is off by 4e-7..6e-7 relative (falling as h²);
    # the 4-point one by 4e-10..5e-7 at h = 1e-5 (falling as h⁴) and by 3e-11..6e-11 at h = 1e-6, the round-off floor
    # ~1e-16·|F| / (h·|F'|). Hence h = 1e-6 and a tolerance of 1e-9 (15x the worst direction), still 1e6 times below
    # the first-order error this test must expose. (While the rewards were rounded to float32, an error of ~1e-7
    # relative, the test allowed 1e-6 with a 2-point stencil.)
    h = 1e-6
    for _ in range(3):
        v = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()}
        f = lambda c: F({n: params[n].detach() + c * h * v[n] for n in names})
        fd = (-f(2) + 8 * f(1) - 8 * f(-1) + f(-2)) / (12 * h)
        exact = sum((g * v[n]).sum() for g, n in zip(grads2, names)).item()
        first = sum((g * v[n]).sum() for g, n in zip(grads1, names)).item()
        assert abs(exact - fd) / abs(fd) < 1e-9, (exact, fd)
        # teeth: the first-order gradient misses the Hessian term, so it does not match F's derivative
        assert abs(first - fd) / abs(fd) > 1e-3, (first, fd)


def test_float64_meta_step_on_two_processes_matches_one(tmp_path):
    # torchrun, 2 processes (FSDP2, gloo): each process takes half of X_t (2 pairs) and of X_s (1 prompt); both
    # routes (gathered: orders 1 and 2; in place: order 1) must give the full-batch gradient of
    # `reference_gradient`, computed by rank 0 on a plain model, to 1e-10 (the all-reduces add float64 terms in
    # another order: ~1e-16)
    result = str(tmp_path / "result.json")
    rc, out, err = run_command([HERE, result], nproc=2)
    assert rc == 0, out + err
    with open(result) as f:
        r = json.load(f)
    assert r["dtype"] == "torch.float64"
    for route in ("gathered order 1", "gathered order 2", "inplace order 1"):
        assert r[route] < 1e-10, (route, r)
    assert r["inplace restores theta"]


def _two_process_float64(result: str) -> None:
    """Run by torchrun (python -m torch.distributed.run --nproc_per_node=2 tests/test_meta_rm.py RESULT)."""
    import copy

    import torch.distributed as dist

    from plumbing import distributed

    rank, world, _ = distributed.init_distributed()
    model, X_t, X_s = gpt2_float64()
    # this process's half: pairs rank*2 .. rank*2+1 (chosen rows, then the same pairs' rejected rows), prompt rank
    pairs = [r for r in (rank * 2, rank * 2 + 1)] + [4 + r for r in (rank * 2, rank * 2 + 1)]
    local_t = packed((X_t[0][pairs], X_t[1][pairs]))
    local_s = packed((X_s[0][rank * K64:(rank + 1) * K64], X_s[1][rank * K64:(rank + 1) * K64]))
    out = {}
    with torch.device("meta"):
        twin = GPT2ForSequenceClassification(model.config).double()
    twin.train()
    for order in (1, 2):
        sharded = distributed.shard(copy.deepcopy(model), world)
        meta_rm.meta_gradient_gathered(sharded, twin, local_t, local_s, K64, ETA64, order, False, False)
        grads = [p.grad.full_tensor() for p in sharded.parameters()]
        if rank == 0:
            out[f"gathered order {order}"] = max_relative_difference(
                grads, reference_gradient(model, X_t, X_s, ETA64, order))
            out["dtype"] = str(grads[0].dtype)
    sharded = distributed.shard(copy.deepcopy(model), world)
    meta_rm.meta_gradient_inplace(sharded, [local_t], [local_s], K64, ETA64, n_pairs=2, n_prompts=1)
    grads = [p.grad.full_tensor() for p in sharded.parameters()]
    restored = [p.detach().full_tensor() for p in sharded.parameters()]
    if rank == 0:
        out["inplace order 1"] = max_relative_difference(grads, reference_gradient(model, X_t, X_s, ETA64, 1))
        out["inplace restores theta"] = all(torch.equal(a, b) for a, b in zip(restored, model.parameters()))
        with open(result, "w") as f:
            json.dump(out, f)
    dist.barrier()


# ----------------------------------------------------------------------------------------------------------------
# meta_rm.py end to end: 1 process vs FSDP2 on 2 processes, functional vs in-place
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def meta_inputs(world, tmp_path_factory):
    """An RM checkpoint (the base model with a fresh head, trained 2 steps by reward.py) and a meta set S."""
    root = str(tmp_path_factory.mktemp("meta"))
    rc, out, err = run_command(["reward.py", "--model", world.base_model, "--train", world.pairs_train, "--test", "",
                                "--out", f"{root}/rm", "--max-steps", "2", "--batch-size", "8", "--lr", "1e-3"])
    assert rc == 0, err
    pairs = [json.loads(line) for line in open(world.pairs_train)]
    # S from fixed texts (not sampled), so both runs read the same file: k = 3 responses per prompt
    with open(f"{root}/S.jsonl", "w") as f:
        for i in range(32):
            f.write(json.dumps({"prompt": pairs[i]["prompt"], "responses": [
                pairs[i]["chosen"], pairs[i]["rejected"], pairs[i + 1]["chosen"]]}) + "\n")
    return root


def _run_meta(world, root, name, nproc, *extra):
    flags = ["meta_rm.py", "--model", f"{root}/rm", "--train", world.pairs_train, "--test", "", "--meta",
             f"{root}/S.jsonl", "--meta-heldout", "", "--out", f"{root}/{name}", "--max-steps", "2", "--batch-size",
             "4", "--meta-batch-size", "4", "--micro-batch-size", "4", "--eta", "0.05", "--lr", "0.1", "--optimizer", "sgd",
             "--grad-clip", "0", *extra]
    rc, out, err = run_command(flags, nproc=nproc)
    assert rc == 0, out + err
    return load_file(f"{root}/{name}/model.safetensors"), [json.loads(l) for l in open(f"{root}/{name}/metrics.jsonl")]


@pytest.mark.parametrize("order", [1, 2])
def test_fsdp2_two_processes_match_one(world, meta_inputs, order):
    # Plain SGD (Alg. 1 l.7 to the letter) so parameters are θ0 − α(g1 + g2) and any gradient difference shows up
    # scaled by α, not hidden by Adam's normalisation. Tolerance: fp32 sums of the same terms in another order (two
    # half-batches averaged across processes vs one batch) differ by a few ulp of the gradient's terms; the
    # gradients here are O(0.1–1), so α = 0.1 turns that into ≲ 1e-7 on the parameters; 1e-6 leaves room for
    # the second step's dependence on the first. A wrong meta step (no ascent, wrong ∇J average, missing Hessian
    # term) changes gradients by O(η‖∇²J‖) ~ 1e-2 relative -> ~1e-3 on the parameters.
    one, log1 = _run_meta(world, meta_inputs, f"w1_o{order}", 1, "--meta-order", str(order))
    impls = ["functional"] if order == 2 else ["functional", "inplace"]
    for impl in impls:
        two, log2 = _run_meta(world, meta_inputs, f"w2_o{order}_{impl}", 2, "--meta-order", str(order),
                              "--meta-impl", impl)
        for key in one:
            torch.testing.assert_close(two[key], one[key], atol=1e-6, rtol=0)
        steps1 = [m for m in log1 if "L_adapted" in m]
        steps2 = [m for m in log2 if "L_adapted" in m]
        for a, b in zip(steps1, steps2):
            for key in ("L_adapted", "J", "J_adapted", "step_norm"):
                assert b[key] == pytest.approx(a[key], rel=1e-5), (impl, key)


def test_order_two_differs_from_order_one(world, meta_inputs):
    # with η = 0.05 the Hessian term changes the update: the two orders must not produce the same model
    one, _ = _run_meta(world, meta_inputs, "w1_o1_again", 1, "--meta-order", "1")
    two, _ = _run_meta(world, meta_inputs, "w1_o2_again", 1, "--meta-order", "2")
    assert max((one[k] - two[k]).abs().max().item() for k in one) > 1e-6


def test_eta_zero_run_is_one_more_vanilla_epoch(world, meta_inputs):
    # The study's η = 0 control trains with reward.py instead of meta_rm.py --eta 0 (a third of the cost): the same
    # pairs in the same order (both draw it with common.Shuffled from --seed), the same AdamW, the same clip, and at
    # η = 0 meta_gradient's θ' is θ + 0 = θ exactly - so the two runs must end with bit-identical weights.
    root = meta_inputs
    flags = ["--model", f"{root}/rm", "--train", world.pairs_train, "--test", "", "--max-steps", "3", "--batch-size",
             "4", "--micro-batch-size", "4", "--lr", "1e-3", "--seed", "5"]
    rc, out, err = run_command(["meta_rm.py", *flags, "--meta", f"{root}/S.jsonl", "--meta-heldout", "",
                                "--meta-batch-size", "4", "--eta", "0", "--out", f"{root}/eta0_meta"])
    assert rc == 0, err
    rc, out, err = run_command(["reward.py", *flags, "--out", f"{root}/eta0_vanilla"])
    assert rc == 0, err
    meta, vanilla = load_file(f"{root}/eta0_meta/model.safetensors"), load_file(f"{root}/eta0_vanilla/model.safetensors")
    assert meta.keys() == vanilla.keys()
    for key in meta:
        assert torch.equal(meta[key], vanilla[key]), key
    start = load_file(f"{root}/rm/model.safetensors")
    assert any(not torch.equal(meta[k], start[k]) for k in meta)  # three steps did move the weights


# ----------------------------------------------------------------------------------------------------------------
# The meta data set S
# ----------------------------------------------------------------------------------------------------------------
def test_meta_data_k_responses_heldout_disjoint_and_deterministic(world, tmp_path):
    outs = []
    for name in ("a", "b"):
        rc, out, err = run_command(["meta_data.py", "--policy", world.base_model, "--prompts", world.rl_prompts,
                                    "--out", str(tmp_path / name), "--k", "3", "--max-prompts", "12", "--heldout",
                                    "4", "--max-new-tokens", "6", "--seed", "3"])
        assert rc == 0, out + err
        outs.append(tmp_path / name)
    train = [json.loads(l) for l in open(outs[0] / "meta_train.jsonl")]
    held = [json.loads(l) for l in open(outs[0] / "meta_heldout.jsonl")]
    assert len(train) == 8 and len(held) == 4
    assert all(len(r["responses"]) == 3 for r in train + held)
    prompts = [json.loads(l)["prompt"] for l in open(world.rl_prompts)][:12]
    assert sorted(r["prompt"] for r in train + held) == sorted(prompts)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held} or len(set(prompts)) < 12
    for name in ("meta_train.jsonl", "meta_heldout.jsonl"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()


def test_meta_set_with_k_below_two_is_refused(world, tmp_path):
    bad = tmp_path / "S.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "responses": ["only one"]}) + "\n")
    rc, out, err = run_command(["meta_rm.py", "--model", world.base_model, "--fresh-head", "--train",
                                world.pairs_train, "--test", "", "--meta", str(bad), "--meta-heldout", "", "--out",
                                str(tmp_path / "o")])
    assert rc == 2 and "k >= 2" in err and "Traceback" not in out + err
    assert not (tmp_path / "o").exists()


if __name__ == "__main__":
    import sys

    from plumbing import common

    common.run_main(lambda: _two_process_float64(sys.argv[1]))
