"""meta_rm.py's `--ascent random` control: θ' = θ + u with u a random direction as long as the step
the paper's ascent would take (‖u‖ = η‖∇J‖), instead of θ + η∇J. Checked on the float64 GPT-2 of
tests/test_meta_rm.py against the same mathematics written again here with plain autograd: the
length and direction of the step actually taken, the meta gradient at θ + u with u drawn again by
hand from the documented seed, the functional and in-place routes against each other, the seeding,
the refusal of --meta-order 2, a short meta_rm.py run twice, and the in-place route under FSDP2 on
two processes.
"""
from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch

import meta_rm
from conftest import run_command
from plumbing import common
from test_meta_rm import ETA64, K64, gpt2_float64, max_relative_difference, packed

HERE = os.path.abspath(__file__)
SEED, STEP = 7, 3


# --------------------------------------------------------------------------------------------------
# The mathematics again, with plain autograd (no meta_rm code)
# --------------------------------------------------------------------------------------------------
def rewards(model, params: dict, batch) -> torch.Tensor:
    """r at the parameters `params` on a right-padded (ids, mask) batch."""
    return torch.func.functional_call(model, {**params, **dict(model.named_buffers())}, args=(),
                                      kwargs=dict(input_ids=batch[0], attention_mask=batch[1])
                                      ).logits[:, 0]


def grad_J(model, X_s) -> list[torch.Tensor]:
    """∇J(θ), Eq. (2) averaged over prompts: (2/k²) Σ_{i<j} σ(|r_i − r_j|)."""
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    s = rewards(model, theta, X_s).view(-1, K64)
    i, j = torch.triu_indices(K64, K64, offset=1)
    J = (torch.sigmoid((s[:, i] - s[:, j]).abs()).sum(1) * 2 / K64**2).mean()
    return list(torch.autograd.grad(J, list(theta.values())))


def J_at(model, params: dict, X_s) -> float:
    s = rewards(model, params, X_s).view(-1, K64)
    i, j = torch.triu_indices(K64, K64, offset=1)
    return (torch.sigmoid((s[:, i] - s[:, j]).abs()).sum(1) * 2 / K64**2).mean().item()


def grad_L_at(model, params: dict, X_t) -> list[torch.Tensor]:
    """∇L at the given parameters: Eq. (1), −mean log σ(r_w − r_l)."""
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    r = rewards(model, theta, X_t)
    n = r.shape[0] // 2
    L = -torch.nn.functional.logsigmoid(r[:n] - r[n:]).mean()
    return list(torch.autograd.grad(L, list(theta.values())))


def norm(xs: list[torch.Tensor]) -> float:
    return math.sqrt(sum((x.double() ** 2).sum().item() for x in xs))


def cos(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    return sum((x * y).sum().item() for x, y in zip(xs, ys)) / (norm(xs) * norm(ys))


def u_by_hand(model, seed: int, step: int, length: float) -> list[torch.Tensor]:
    """The documented draw: float64 N(0, 1) on the CPU, parameter after parameter, from a generator
    seeded with (seed·1_000_003 + step)·4096 + rank (rank 0: one process), scaled to `length`."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) * 4_096)
    u = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in model.parameters()]
    return [x * (length / norm(u)) for x in u]


def steps_taken(model, route) -> list[list[torch.Tensor]]:
    """The parameters at every forward pass of the model while `route()` runs."""
    seen = []
    hook = model.register_forward_pre_hook(
        lambda module, args: seen.append([p.detach().clone() for p in module.parameters()]))
    try:
        route()
    finally:
        hook.remove()
    return seen


# --------------------------------------------------------------------------------------------------
# (1) the step's length is the gradient step's, its direction is not ∇J's
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [False, True])
def test_random_step_has_the_gradient_steps_length_not_its_direction(normalize):
    model, X_t, X_s = gpt2_float64()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 5_000
    g = grad_J(model, X_s)
    # the in-place route runs the module's own forward: J at θ, then L at θ'
    seen = steps_taken(model, lambda: meta_rm.meta_gradient_inplace(
        model, [packed(X_t)], [packed(X_s)], K64, ETA64, n_pairs=4, n_prompts=2,
        normalize_ascent=normalize, random_seed=meta_rm.ascent_seed(SEED, STEP)))
    assert len(seen) == 2
    step = [b - a for a, b in zip(*seen)]  # θ' − θ
    expected = ETA64 if normalize else ETA64 * norm(g)  # ‖θ' − θ‖ of the paper's ascent
    assert norm(step) == pytest.approx(expected, rel=1e-6)
    # a random direction in ~7,500 dimensions: |cos| of order 1/√7500 ≈ 0.012
    assert abs(cos(step, g)) < 0.2
    # teeth: the paper's ascent moves along ∇J itself
    model.zero_grad(set_to_none=True)
    seen = steps_taken(model, lambda: meta_rm.meta_gradient_inplace(
        model, [packed(X_t)], [packed(X_s)], K64, ETA64, n_pairs=4, n_prompts=2,
        normalize_ascent=normalize))
    assert cos([b - a for a, b in zip(*seen)], g) == pytest.approx(1.0, abs=1e-9)


# --------------------------------------------------------------------------------------------------
# (2) the meta gradient is ∇L at θ + u, u drawn again by hand
# --------------------------------------------------------------------------------------------------
def test_meta_gradient_is_the_pair_gradient_at_theta_plus_u():
    model, X_t, X_s = gpt2_float64()
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    grads, stats = meta_rm.meta_gradient(model, params, buffers, packed(X_t), packed(X_s), k=K64,
                                         eta=ETA64, order=1,
                                         random_seed=meta_rm.ascent_seed(SEED, STEP))
    g = grad_J(model, X_s)
    u = u_by_hand(model, SEED, STEP, ETA64 * norm(g))  # θ' − θ, ‖u‖ = η‖∇J‖
    adapted = {n: p.detach() + x for (n, p), x in zip(params.items(), u)}
    reference = grad_L_at(model, adapted, X_t)
    # float64 throughout: the two computations differ by a few ulp (test_meta_rm.py's tolerance)
    assert max_relative_difference(grads, reference) < 1e-10
    assert stats["grad_J_norm"] == pytest.approx(norm(g), rel=1e-10)
    assert stats["step_norm"] == pytest.approx(ETA64 * norm(g), rel=1e-10)
    assert stats["cos_u_grad_J"] == pytest.approx(cos(u, g), rel=1e-8, abs=1e-12)
    # teeth: the paper's meta gradient (θ + η∇J) is a different one
    paper, paper_stats = meta_rm.meta_gradient(model, params, buffers, packed(X_t), packed(X_s),
                                               k=K64, eta=ETA64, order=1)
    assert max_relative_difference(paper, reference) > 1e-3
    assert "cos_u_grad_J" not in paper_stats

    # mechanism_stats forms the same θ' (the logged J_adapted is J at θ + u)
    for p, gr in zip(params.values(), grads):
        p.grad = gr
    before = [p.detach().clone() for p in params.values()]
    mech = meta_rm.mechanism_stats(model, [packed(X_t)], [packed(X_s)], k=K64, eta=ETA64,
                                   normalize_ascent=False, n_pairs=4, n_prompts=2, bf16=False,
                                   random_seed=meta_rm.ascent_seed(SEED, STEP))
    with torch.no_grad():
        assert mech["J_adapted"] == pytest.approx(J_at(model, adapted, X_s), rel=1e-10)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params.values(), before))
    assert all(p.grad is gr for p, gr in zip(params.values(), grads))


# --------------------------------------------------------------------------------------------------
# (3) the functional and in-place routes take the same u
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [False, True])
def test_functional_and_inplace_routes_agree(normalize):
    model, X_t, X_s = gpt2_float64()
    params = dict(model.named_parameters())
    seed_u = meta_rm.ascent_seed(SEED, STEP)
    grads, stats = meta_rm.meta_gradient(model, params, dict(model.named_buffers()), packed(X_t),
                                         packed(X_s), k=K64, eta=ETA64, order=1,
                                         normalize_ascent=normalize, random_seed=seed_u)
    before = [p.detach().clone() for p in model.parameters()]
    inplace = meta_rm.meta_gradient_inplace(model, [packed(X_t)], [packed(X_s)], K64, ETA64,
                                            n_pairs=4, n_prompts=2, normalize_ascent=normalize,
                                            random_seed=seed_u)
    # the same u, the same θ' (p + step·u, the same arithmetic): the same gradient, bit for bit
    for p, gr in zip(model.parameters(), grads):
        assert torch.equal(p.grad, gr)
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    for key in ("step_norm", "grad_J_norm", "cos_u_grad_J", "L_adapted"):
        assert inplace[key] == pytest.approx(stats[key], rel=1e-12), key


# --------------------------------------------------------------------------------------------------
# (4) the seeding: same (--seed, step) -> same u; another step or seed -> another u
# --------------------------------------------------------------------------------------------------
def test_same_seed_and_step_give_the_same_u_another_step_another():
    model, _, _ = gpt2_float64()
    like = [p.detach() for p in model.parameters()]
    u = lambda seed, step: meta_rm.random_direction(like, 2.5, meta_rm.ascent_seed(seed, step))
    first = u(SEED, STEP)
    assert norm(first) == pytest.approx(2.5, rel=1e-12)
    assert all(x.shape == p.shape and x.dtype == p.dtype for x, p in zip(first, like))
    assert all(torch.equal(a, b) for a, b in zip(first, u(SEED, STEP)))
    for other in (u(SEED, STEP + 1), u(SEED + 1, STEP)):
        assert abs(cos(first, other)) < 0.2  # independent draws: nearly orthogonal
    # the documented draw (u_by_hand) is what random_direction does in one process
    assert max_relative_difference(first, u_by_hand(model, SEED, STEP, 2.5)) < 1e-14
    # the seeds of different steps and runs do not collide
    assert len({meta_rm.ascent_seed(s, t) for s in range(3) for t in range(1000)}) == 3000


# --------------------------------------------------------------------------------------------------
# (5) the flag: refused with order 2, explained in --help
# --------------------------------------------------------------------------------------------------
def test_order_two_with_random_ascent_is_refused(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(common.UserError, match="--ascent random.*--meta-order 1"):
        meta_rm.main(["--meta-order", "2", "--ascent", "random", "--out", str(out)])
    assert not out.exists()


def test_help_explains_the_flag(capsys):
    with pytest.raises(SystemExit):
        common.parse_args(meta_rm.Args, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--ascent {gradient,random}" in text and "random direction of the same length" in text
    assert meta_rm.Args().ascent == "gradient"  # the paper by default


# --------------------------------------------------------------------------------------------------
# meta_rm.py end to end: the loop hands each step its own u, and a rerun draws the same ones
# --------------------------------------------------------------------------------------------------
def test_a_short_random_ascent_run_is_reproducible(world, tmp_path):
    pairs = [json.loads(line) for line in open(world.pairs_train)]
    S = tmp_path / "S.jsonl"  # k = 3 fixed responses per prompt, as in tests/test_meta_rm.py
    S.write_text("".join(json.dumps({"prompt": pairs[i]["prompt"], "responses": [
        pairs[i]["chosen"], pairs[i]["rejected"], pairs[i + 1]["chosen"]]}) + "\n"
        for i in range(8)))
    flags = ["--model", world.base_model, "--fresh-head", "--train", world.pairs_train,
             "--test", "", "--meta", str(S), "--meta-heldout", "", "--max-steps", "2",
             "--batch-size", "4", "--meta-batch-size", "4", "--micro-batch-size", "4",
             "--eta", "0.05", "--max-len", "64", "--ascent", "random"]
    logs = []
    for name in ("a", "b"):
        meta_rm.main([*flags, "--out", str(tmp_path / name)])
        with open(tmp_path / name / "metrics.jsonl") as f:
            logs.append([m for m in map(json.loads, f) if "L_adapted" in m])
    a, b = logs
    assert len(a) == 2
    for m in a:
        assert m["step_norm"] == pytest.approx(0.05 * m["grad_J_norm"], rel=1e-9)
        assert abs(m["cos_u_grad_J"]) < 0.2
    assert a[0]["cos_u_grad_J"] != a[1]["cos_u_grad_J"]  # a new u every step
    volatile = ("s_per_step",)
    assert ([{k: v for k, v in m.items() if k not in volatile} for m in a]
            == [{k: v for k, v in m.items() if k not in volatile} for m in b])


# --------------------------------------------------------------------------------------------------
# The in-place route under FSDP2 (2 processes): each process draws its own shard, ‖u‖ is global
# --------------------------------------------------------------------------------------------------
def test_inplace_random_ascent_on_two_processes(tmp_path):
    result = str(tmp_path / "result.json")
    rc, out, err = run_command([HERE, result], nproc=2)
    assert rc == 0, out + err
    with open(result) as f:
        r = json.load(f)
    assert r["u norm"] < 1e-12            # ‖u‖ over both shards is the norm asked for
    assert r["shards differ"]             # rank 1's shard is not a copy of rank 0's draw
    assert r["step_norm"] < 1e-12         # the reported ‖θ' − θ‖ = η‖∇J‖ (∇J of the full batch)
    assert r["gradient"] < 1e-10          # ∇L at θ + η·u of the full batch
    assert r["restores theta"]


def _two_process_random(result: str) -> None:
    """Run by torchrun (tests/test_controls.py RESULT): the sharded float64 GPT-2, each process
    with half of X_t (2 pairs) and of X_s (1 prompt), as in tests/test_meta_rm.py."""
    import torch.distributed as dist

    from plumbing import distributed

    rank, world, _ = distributed.init_distributed()
    model, X_t, X_s = gpt2_float64()
    rows = [rank * 2, rank * 2 + 1, 4 + rank * 2, 4 + rank * 2 + 1]  # chosen rows, then rejected
    local_t = packed((X_t[0][rows], X_t[1][rows]))
    local_s = packed((X_s[0][rank * K64:(rank + 1) * K64], X_s[1][rank * K64:(rank + 1) * K64]))
    g = grad_J(model, X_s)  # the full batch's ∇J (the mean over both processes' prompts)
    seed_u = meta_rm.ascent_seed(SEED, STEP)
    sharded = distributed.shard(copy.deepcopy(model), world)
    # the route's u, as it draws it from the shards; gathered here to build the reference
    u = [x.full_tensor() for x in meta_rm.random_direction(list(sharded.parameters()), norm(g),
                                                           seed_u)]
    stats = meta_rm.meta_gradient_inplace(sharded, [local_t], [local_s], K64, ETA64, n_pairs=2,
                                          n_prompts=1, random_seed=seed_u)
    grads = [p.grad.full_tensor() for p in sharded.parameters()]
    restored = [p.detach().full_tensor() for p in sharded.parameters()]
    if rank == 0:
        params = dict(model.named_parameters())
        adapted = {n: p.detach() + ETA64 * x for (n, p), x in zip(params.items(), u)}
        wte = u[0]  # (40, 16): rows 0..19 on rank 0, 20..39 on rank 1
        out = {"u norm": abs(norm(u) - norm(g)) / norm(g),
               "shards differ": not torch.equal(wte[:20], wte[20:]),
               "step_norm": abs(stats["step_norm"] - ETA64 * norm(g)) / (ETA64 * norm(g)),
               "gradient": max_relative_difference(grads, grad_L_at(model, adapted, X_t)),
               "restores theta": all(torch.equal(a, b) for a, b in zip(restored,
                                                                       model.parameters()))}
        with open(result, "w") as f:
            json.dump(out, f)
    dist.barrier()


if __name__ == "__main__":
    import sys

    common.run_main(lambda: _two_process_random(sys.argv[1]))
