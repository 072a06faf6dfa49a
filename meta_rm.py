"""MetaRM: reward-model training with a meta-learning step — Algorithm 1 of Dou et al. (AAAI 2025).

The policy drifts during PPO; the RM then loses its ability to tell the policy's new responses apart
(the reward differences between samples of one prompt shrink). MetaRM keeps training the RM on the
ORIGINAL preference pairs D, but takes every update at parameters θ' that were first pushed one
gradient-ASCENT step towards separating samples of the current policy (the meta set S). No new
labels are needed.

Equations (paper §3; docs/design.md §2)
    Eq. (1)  L_θ(X_t)   = − mean log σ( r_θ(x, y_w) − r_θ(x, y_l) )
             reward.bradley_terry_loss
    Eq. (2)  J_θ(x, s)  = (2 / k²) Σ_{i<j} σ( | r_θ(x, s_i) − r_θ(x, s_j) | )
             difference_loss  (maximised)

Algorithm 1, one iteration t — lines 2, 3 and 7 in `main`'s loop, lines 4–7 in `meta_gradient` (the
gradient of l.7; the optimiser applies it); each line is tagged "Alg.1 l.N" in the code:
    l.2  X_t ← n pairs (x, y_w, y_l) from D
    l.3  X_s ← m items (x, s_1..s_k) from S
    l.4  J_θ(X_s) at θ_t
    l.5  θ'_t = θ_t + η ∇_θ J_θ(X_s)                     meta-process: one gradient-ASCENT step
    l.6  L_θ'(X_t) at θ'_t
    l.7  θ_{t+1} = θ_t − α ∇_θ L_θ'(X_t)                 MetaRM-optimisation (here: AdamW with lr α)

Which code computes lines 4–7 (`--meta-impl`; `meta_route` chooses once, and an `if` in the loop
names the route that runs):
    python meta_rm.py (1 process)      `meta_gradient`, the textbook code
                                       (torch.func.functional_call), both orders
    torchrun, --meta-order 1 (default) `meta_gradient_inplace`: NOT the functional_call code, but
                                       the same first-order gradient on the sharded model
                                       (back up θ, ascend in place, backward L at θ', restore θ);
                                       `auto` picks it
    torchrun, --meta-order 2           `meta_gradient_gathered`: `meta_gradient` itself, on gathered
                                       parameters
functional_call cannot run on an FSDP2 (fully_shard-ed) module, hence the routes
(docs/design.md §9); the tests check that both give the single-process gradient.

Commands
    python meta_data.py --policy runs/testbed/sft \
        --out runs/testbed/meta_set                         # build S (k = 5 per prompt)
    python meta_rm.py                                       # 1 process, CPU, testbed
    torchrun --standalone --nproc_per_node=2 meta_rm.py     # FSDP2, 2 processes
    torchrun --nproc_per_node=8 meta_rm.py --model runs/llama2-rm --train hh_train.jsonl \
        --meta runs/S1/meta_train.jsonl --bf16

Paper defaults (Llama-2-7B): α = η = 5e-6, n = m = 16, k = 5, 1 epoch over D, lr 5e-6.

Deliberate choices (the paper is silent or we offer more)
  1. First order by default (`--meta-order 1`): θ' = θ + η·stopgrad(∇J), so ∇_θ L(θ') is the
     gradient AT θ' applied to θ — what the paper's update and the authors' implementation do
     (back up θ, ascend in place, backward L, restore θ). `--meta-order 2` is the exact gradient
     d L(θ + η ∇J(θ)) / dθ, which adds the Hessian-vector product η ∇²J · ∇L; it needs double
     backward, so the model is loaded with eager attention.
  2. J over a meta mini-batch is the MEAN over its m prompts of Eq. (2) (the paper does not say;
     mean is the natural reading). The normaliser is 2/k², as printed, not 1/C(k, 2).
  3. |·| has no derivative at 0; torch uses sign(0) = 0, so two responses with identical rewards
     push each other nowhere. (Exact ties are rare except for identical responses.)
  4. α is applied through AdamW by default (constant lr α, betas (0.9, 0.95), no weight decay,
     gradient clip 1.0), like reward.py; `--optimizer sgd` is Algorithm 1 l.7 to the letter
     (θ − α∇L). The ascent of l.5 is a raw gradient step as in the paper.
  5. `--normalize-ascent` (off by default, a deviation): θ' = θ + η ∇J / ‖∇J‖, a step of fixed
     length η. With the paper's raw step, ‖θ' − θ‖ = η‖∇J‖ can be vanishingly small (the meta step
     then does nothing); the log shows it.
  6. Under FSDP2 (world size > 1) the two routes above stand in for `meta_gradient`:
     `functional` (gathered) does both orders but holds the whole model on every rank during the
     step; `inplace` keeps everything sharded (first order only; the route that scales to
     7B on 8 GPUs).
  7. `--ascent random` (a control, not the method): θ' = θ + u with u a random direction of the
     length the gradient step would have (‖u‖ = η‖∇J‖, or η with --normalize-ascent), drawn
     afresh every step from (--seed, step) (`random_direction`, `ascent_seed`). It asks whether
     MetaRM's effect comes from ∇J's direction or from any look-ahead of that size. ∇J is still
     computed: its norm sets |u|, and the statistics report it with cos(u, ∇J). First order only.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.func import functional_call
from transformers import AutoModelForSequenceClassification

import reward
from plumbing import common, data, distributed, packing
from plumbing.common import arg, check, non_negative, or_sentinel, positive
from plumbing.data import CHAT_TEMPLATE_HELP, CHAT_TEMPLATE_MODES, DATA_FORMAT_HELP, DATA_FORMATS
from plumbing.distributed import NOT_RESUMABLE, RESUME_HELP, SAVE_EVERY_HELP


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Args:
    model: str = arg("runs/testbed/rm", "initial reward model: an RM checkpoint (reward.py or "
                     "meta_rm.py); an SFT checkpoint only with --fresh-head", essential=True)
    fresh_head: bool = arg(False, "allow a causal-LM (SFT) --model, which then gets a new, "
                                  "randomly initialised score head "
                                  "(python -m study --rm-init sft); "
                                  "without it --model must be a reward model",
                           essential=True)
    train: str = arg("runs/testbed/data/pairs_train.jsonl",
                     "preference pairs D, JSONL {prompt, chosen, rejected}", essential=True)
    test: str = arg("runs/testbed/data/pairs_test.jsonl",
                    "held-out pairs for evaluation (empty string = none)")
    meta: str = arg("runs/testbed/meta_set/meta_train.jsonl",
                    "meta set S: JSONL {prompt, responses: [k strings]} sampled from the current "
                    "policy (meta_data.py)", essential=True)
    meta_heldout: str = arg("runs/testbed/meta_set/meta_heldout.jsonl",
                            "held-out part of S for reward-gap statistics (empty string = none)")
    out: str = arg("runs/testbed/meta_rm",
                   "output folder: the RM checkpoint, metrics.jsonl, args.json")
    lr: float = arg(5e-6, "α: learning rate of the MetaRM-optimisation step, Alg. 1 l.7 "
                          "(paper: 5e-6)", essential=True, valid=positive)
    eta: float = arg(5e-6, "η: step size of the meta-process ascent, Alg. 1 l.5 (paper: 5e-6)",
                     essential=True, valid=non_negative)
    meta_order: int = arg(1, "1: first order, the gradient at θ' applied to θ (paper); "
                             "2: exact, through ∇²J", choices=[1, 2], essential=True)
    meta_impl: str = arg("auto", "how the meta step runs: "
                         "functional (torch.func.functional_call; on a gathered copy under FSDP2), "
                         "inplace (sharded: perturb θ in place and restore; order 1 only), "
                         "auto = functional at world size 1 or order 2, else inplace",
                         choices=["auto", "functional", "inplace"])
    optimizer: str = arg("adamw", "update rule of Alg. 1 l.7: adamw (like reward.py) or sgd "
                         "(θ − α∇L, the letter of Algorithm 1)", choices=["adamw", "sgd"],
                         essential=True)
    normalize_ascent: bool = arg(False, "deviation, off by default: ascend by η·∇J/‖∇J‖ "
                                        "instead of η·∇J", essential=True)
    ascent: str = arg("gradient", "direction of the look-ahead θ' of Alg. 1 l.5: gradient = "
                      "θ + η∇J (the paper); random = a control, θ + u with u a random direction "
                      "of the same length (‖u‖ = η‖∇J‖, or η with --normalize-ascent), drawn anew "
                      "every step from --seed and the step: does ∇J's direction matter, or any "
                      "look-ahead of that size? (--meta-order 1 only)",
                      choices=["gradient", "random"], essential=True)
    epochs: float = arg(1.0, "passes over D (paper: 1)", valid=positive)
    batch_size: int = arg(16, "n: preference pairs per step, global (paper: 16)", essential=True,
                          valid=positive)
    meta_batch_size: int = arg(16, "m: meta prompts per step, global (paper: 16); "
                                   "each has k responses", essential=True, valid=positive)
    micro_batch_size: int = arg(16, "pairs (and meta prompts) per forward on one process; "
                                "inplace impl only splits a step into several forwards",
                                valid=positive)
    max_len: int = arg(512, "maximum tokens of prompt + response; longer ones are truncated "
                            "(see data.encode)", essential=True, valid=positive)
    data_format: str = arg("auto", DATA_FORMAT_HELP + " (for --train and --test)",
                           choices=DATA_FORMATS, essential=True)
    preference: str = arg("safer",
                          "PKU-SafeRLHF: chosen by safer_response_id or better_response_id",
                          choices=["safer", "better"], essential=True)
    chat_template: str = arg("auto", CHAT_TEMPLATE_HELP, choices=CHAT_TEMPLATE_MODES,
                             essential=True)
    grad_clip: float = arg(1.0, "clip the global gradient norm to this value (0 = off)",
                           essential=True, valid=non_negative)
    seed: int = arg(0, "random seed (data order, head initialisation when starting from SFT)",
                    essential=True, valid=common.seed)
    bf16: bool = arg(False, "bf16: autocast, and under FSDP2 bf16 parameters and activations with "
                            "fp32 master weights and gradient reduction (MixedPrecisionPolicy); "
                            "fp32 is the reference", essential=True)
    grad_checkpointing: bool = arg(False, distributed.CHECKPOINTING_HELP + "; the in-place route "
                                   "only (--meta-impl inplace): the functional routes evaluate the "
                                   "model at θ' through functional_call, which a recomputation in "
                                   "the backward would not see")
    threads: int = arg(0, common.THREADS_HELP, valid=non_negative)
    tf32: bool = arg(False, common.TF32_HELP)
    deterministic: bool = arg(False, common.DETERMINISTIC_HELP)
    dist_timeout: float = arg(60.0, distributed.DIST_TIMEOUT_HELP, valid=positive)
    max_steps: int = arg(-1, "stop after this many steps (-1 = the whole epoch); for smoke tests",
                         valid=or_sentinel(-1, "the whole epoch"))
    eval_every: int = arg(50, "evaluate on the test pairs and held-out S every N steps "
                              "(and at the end; 0 = end)", valid=non_negative)
    eval_batch_size: int = arg(32, "sequences per forward pass during evaluation", valid=positive)
    log_every: int = arg(10, "print a metrics line every N steps", valid=positive)
    log_adapted_every: int = arg(1, "every N steps log what the ascent did (mechanism_stats, any "
                                    "route): J at θ', J of standardised rewards, the reward scale, "
                                    "cos(∇L(θ'), ∇L(θ)); costs a forward/backward of X_s and X_t "
                                    "and a forward of X_s; 0 = never",
                                 valid=non_negative)
    overwrite: bool = arg(False, "replace an existing output folder")
    save_every: int = arg(0, SAVE_EVERY_HELP, valid=non_negative)
    resume: bool = arg(False, RESUME_HELP)


# --------------------------------------------------------------------------------------------------
# Eq. (2): the difference loss
# --------------------------------------------------------------------------------------------------
def difference_loss(rewards: torch.Tensor) -> torch.Tensor:
    """Eq. (2), averaged over prompts: mean_x (2/k²) Σ_{i<j} σ(|r(x, s_i) − r(x, s_j)|).
    (m, k) -> scalar.

    To be MAXIMISED (the meta-process ascends it): a larger value means the RM spreads the k
    responses of a prompt further apart. Every term is ≥ σ(0) = 0.5, so
    J ≥ (2/k²)·C(k,2)·0.5 = (k−1)/(2k), reached when all k rewards are equal. The normaliser is 2/k²
    as printed in the paper (not 1/C(k, 2)); there is no log.
    At r_i = r_j, |·| has no derivative; torch's abs uses sign(0) = 0, so the pair
    contributes no gradient.
    """
    m, k = rewards.shape
    gaps = (rewards[:, :, None] - rewards[:, None, :]).abs()  # (m, k, k): |r_i − r_j|
    i, j = torch.triu_indices(k, k, offset=1)  # the C(k, 2) pairs i < j
    per_prompt = torch.sigmoid(gaps[:, i, j]).sum(dim=1) * 2 / k**2  # (m,)
    return per_prompt.mean()


def reward_gaps(scores: torch.Tensor) -> dict[str, float]:
    """Statistics of how well the RM separates k samples of one prompt. scores (m, k) -> dict.

    gap_mean / gap_std: of |r_i − r_j| over all pairs i < j of every prompt
        (paper Fig. 5, before normalising);
    diff12_var: variance over prompts of r(x, s_1) − r(x, s_2) (paper Fig. 1); J: Eq. (2)."""
    k = scores.shape[1]
    i, j = torch.triu_indices(k, k, offset=1)
    gaps = (scores[:, i] - scores[:, j]).abs().flatten()
    return {"gap_mean": gaps.mean().item(), "gap_std": gaps.std().item(),
            "diff12_var": (scores[:, 0] - scores[:, 1]).var().item(),
            "J": difference_loss(scores).item()}


# --------------------------------------------------------------------------------------------------
# Algorithm 1, lines 4–7: the meta step (the textbook code, torch.func.functional_call)
# --------------------------------------------------------------------------------------------------
def meta_gradient(model: torch.nn.Module, params: dict[str, torch.Tensor],
                  buffers: dict[str, torch.Tensor], pairs: packing.Packed, meta: packing.Packed,
                  k: int, eta: float, order: int, normalize_ascent: bool = False,
                  average: Callable[[torch.Tensor], torch.Tensor] = lambda g: g,
                  bf16: bool = False,
                  random_seed: int | None = None) -> tuple[list[torch.Tensor], dict[str, float]]:
    """∇_θ L_θ'(X_t) with θ' = θ + η ∇_θ J_θ(X_s) — Algorithm 1, lines 4–7 up to the optimiser step.

    params   θ by name: the model's own parameters (one process) or gathered full copies (FSDP2)
    pairs    X_t packed: 2n sequences, 0..n−1 chosen, n..2n−1 rejected (reward.pair_sequences)
    meta     X_s packed: m·k sequences, sequence i·k + j is response j of prompt i
    average  turns this process's ∇J into the mean over all processes (identity in one process);
             differentiable for order 2 (an autograd-aware all-reduce)
    random_seed  None: ascend along ∇J (the paper); a seed: `--ascent random`, θ' = θ + step·u with
             u = random_direction(∇J, ‖∇J‖, random_seed) in place of ∇J (order 1)
    Returns the gradient of every parameter (in the order of `params`) and the step's statistics.
    """
    device = next(iter(params.values())).device

    def r(theta: dict[str, torch.Tensor], batch: packing.Packed) -> torch.Tensor:
        """r_θ(x, y) at the parameters `theta`, (B,) in the model's dtype
        (bf16 autocast: float32)."""
        with common.autocast(device, bf16):
            return reward.reward_dtype(rewards_at(model, {**theta, **buffers}, batch))

    names, theta = list(params), list(params.values())

    # Alg.1 l.4: J_θ(X_s) at θ_t
    r_meta = r(params, meta)                          # (m·k,)
    J = difference_loss(r_meta.view(-1, k))           # (m, k) -> scalar

    # Alg.1 l.5: θ' = θ + η ∇θ J(X_s)   (meta-process: ASCENT, hence the plus sign)
    # First order: the ascent direction is a constant (no graph), so dθ'/dθ = I and the gradient
    # that l.7 takes at θ' is applied to θ unchanged. Second order: keep the graph (create_graph) so
    # that backpropagating through θ' also differentiates ∇J, giving dθ'/dθ = I + η ∇²J.
    grad_J = torch.autograd.grad(J, theta, create_graph=order == 2)
    grad_J = [average(g if order == 2 else g.detach()) for g in grad_J]
    grad_J_norm = torch.sqrt(sum((g.detach().double() ** 2).sum() for g in grad_J)).item()
    ascent_size = eta / max(grad_J_norm, 1e-12) if normalize_ascent else eta
    direction = grad_J
    if random_seed is not None:  # the control: a random direction as long as ∇J
        direction = random_direction(grad_J, grad_J_norm, random_seed)
    adapted = {name: p + ascent_size * d for name, p, d in zip(names, theta, direction)}  # θ'

    # Alg.1 l.6: L_θ'(X_t), the vanilla Bradley–Terry loss (Eq. 1) at the adapted parameters
    r_pairs = r(adapted, pairs)  # (2n,)
    n = r_pairs.shape[0] // 2
    L = reward.bradley_terry_loss(r_pairs[:n], r_pairs[n:])

    # Alg.1 l.7 (the gradient; the optimiser applies it with lr α): ∇θ L_θ'(X_t)
    grads = torch.autograd.grad(L, theta)
    stats = {"L_adapted": L.item(), "J": J.item(),
             "acc_adapted": (r_pairs[:n] > r_pairs[n:]).float().mean().item(),
             "step_norm": ascent_size * grad_J_norm,  # ‖θ' − θ‖
             "grad_J_norm": grad_J_norm}
    if random_seed is not None:
        stats["cos_u_grad_J"] = _global_dot(direction, grad_J) / max(grad_J_norm**2, 1e-300)
    return list(grads), stats


def ascent_seed(seed: int, step: int) -> int:
    """The seed of `--ascent random`'s u at a step (0-based): a function of --seed and the step
    alone, so a rerun (or a resumed run) draws the same u's, and every step draws a new one."""
    return seed * 1_000_003 + step


def random_direction(like: list[torch.Tensor], norm: float, seed: int) -> list[torch.Tensor]:
    """`--ascent random`'s stand-in for ∇J: u ~ N(0, I) in the shapes of `like` (∇J), rescaled to
    ‖u‖ = `norm` (‖∇J‖). θ + step·u then moves exactly as far as θ + step·∇J would, in a direction
    that knows nothing of J: E[cos(u, ∇J)] = 0, with |cos| of order 1/√(number of parameters).

    u is drawn in float64 on the CPU from a torch.Generator seeded with seed·4096 + rank, where
    seed = `ascent_seed`(--seed, step), so the same seed gives the same u on any device. Plain
    tensors (one process, or the gathered route's full copies) use rank 0: every process draws the
    same full u. FSDP2 shards (DTensors, the in-place route): each process draws its own shard
    with its own rank, and ‖u‖ is taken over all shards (`_global_dot`)."""
    sharded = any(hasattr(t, "to_local") for t in like)
    generator = torch.Generator().manual_seed(seed * 4_096 + (dist.get_rank() if sharded else 0))
    u = []
    for t in like:
        shard = t.to_local() if sharded else t
        x = torch.randn(shard.shape, generator=generator, dtype=torch.float64).to(shard.device)
        if sharded:
            from torch.distributed.tensor import DTensor
            x = DTensor.from_local(x, t.device_mesh, t.placements, shape=t.shape, stride=t.stride())
        u.append(x)
    scale = norm / max(math.sqrt(_global_dot(u, u)), 1e-300)
    return [(x * scale).to(t.dtype) for x, t in zip(u, like)]


def rewards_at(model: torch.nn.Module, params: dict[str, torch.Tensor],
               batch: packing.Packed) -> torch.Tensor:
    """r_θ(x, y) of packed sequences at the parameters `params` (θ or θ' by name, with the buffers),
    not at the module's own: torch.func.functional_call runs the module's forward with them. The
    same computation as reward.packed_rewards: the head (no bias) on each sequence's final hidden
    state at its last token, the EOS. (S,)"""
    call = lambda **kwargs: functional_call(model, params, args=(), kwargs=kwargs)
    hidden = packing.hidden(model, batch, call)[batch.last]  # (S, d)
    return F.linear(hidden, params["score.weight"])[:, 0]


# --------------------------------------------------------------------------------------------------
# Algorithm 1 under FSDP2: two routes that stand in for `meta_gradient`
#
# `torch.func.functional_call` cannot run on a `fully_shard`-ed module: its parameters are sharded
# DTensors that FSDP2 all-gathers inside its own forward hooks, so parameters passed in from outside
# never enter the graph (docs/design.md §9). Two ways round it, each checked against one process
# (tests/test_meta_rm.py); `main`'s loop names the one that runs:
#   gathered  (`--meta-impl functional` under torchrun; the route for --meta-order 2) IS
#             `meta_gradient`, run on full copies of the parameters and a plain twin of the model;
#             the gradient goes back into shards. Both orders; the whole model on every rank.
#   in-place  (`--meta-impl inplace`; `auto` under torchrun at --meta-order 1) equals
#             `meta_gradient(order=1)` bit for bit in one process: the authors' recipe on the
#             sharded model. First order only; nothing is gathered in full, so it scales to
#             7B on 8 GPUs.
# --------------------------------------------------------------------------------------------------
def meta_gradient_gathered(model: torch.nn.Module, twin: torch.nn.Module, pairs: packing.Packed,
                           meta: packing.Packed, k: int, eta: float, order: int,
                           normalize_ascent: bool, bf16: bool,
                           random_seed: int | None = None) -> dict[str, float]:
    """`meta_gradient` on an FSDP2 model: all-gather each parameter into a full tensor, run the
    textbook code on `twin` (a plain, meta-device copy of the architecture whose weights come only
    from functional_call), then turn each full gradient back into this process's shard in `p.grad`.

    ∇J is averaged over processes with an autograd-aware all-reduce, so order 2 differentiates
    through it; the final gradients are averaged by redistributing Partial("avg") -> Shard(0)."""
    from torch.distributed._functional_collectives import all_reduce
    from torch.distributed.tensor import DTensor, Partial, Shard

    world = dist.get_world_size()
    sharded = dict(model.named_parameters())
    full = {n: p.full_tensor().detach().requires_grad_(True) for n, p in sharded.items()}
    buffers = dict(model.named_buffers())
    average = lambda g: all_reduce(g, "sum", dist.group.WORLD) / world  # differentiable mean
    grads, stats = meta_gradient(twin, full, buffers, pairs, meta, k, eta, order, normalize_ascent,
                                 average, bf16, random_seed)
    for p, g in zip(sharded.values(), grads):
        p.grad = DTensor.from_local(g, p.device_mesh, [Partial("avg")]).redistribute(
            p.device_mesh, [Shard(0)])
    # each process measured its own share of X_t and X_s; report the mean
    local = {key: stats[key] for key in ("L_adapted", "acc_adapted", "J")}
    return {**stats, **distributed.all_reduce_mean(local, world)}


def meta_gradient_inplace(model: torch.nn.Module, pairs: list[packing.Packed],
                          meta: list[packing.Packed], k: int, eta: float, n_pairs: int,
                          n_prompts: int, normalize_ascent: bool = False,
                          bf16: bool = False, random_seed: int | None = None) -> dict[str, float]:
    """`meta_gradient(order=1)` without functional_call — the same lines 4–7 in the authors' recipe,
    which keeps FSDP2 parameters sharded: back up θ, add η·∇J to the parameters in place,
    backpropagate L at θ', restore θ exactly. Leaves ∇_θ L_θ'(X_t) in each `p.grad` and returns
    the same statistics. `pairs`, `meta`: micro-batches; n_pairs, n_prompts: this process's totals,
    which weight each micro-batch's share of the mean. random_seed: as in `meta_gradient` (under
    FSDP2 each process draws its own shard of u)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    theta = list(model.parameters())
    backup = [p.detach().clone() for p in theta]  # θ_t, to restore bit for bit after the look-ahead

    # Alg.1 l.4: J at θ; backward leaves ∇J in p.grad (FSDP2 averages it over processes)
    J = 0.0
    for batch in meta:
        r = own_rewards(model, batch, bf16).view(-1, k)  # (b, k)
        J_micro = difference_loss(r) * r.shape[0] / n_prompts
        J_micro.backward()
        J += J_micro.item()
    J = distributed.all_reduce_mean({"J": J}, world)["J"]

    # Alg.1 l.5: θ' = θ + η ∇J, in place
    grad_J = [p.grad for p in theta]
    grad_J_norm = distributed.global_norm(grad_J)
    ascent_size = eta / max(grad_J_norm, 1e-12) if normalize_ascent else eta
    direction = grad_J
    if random_seed is not None:  # the control: a random direction as long as ∇J
        direction = random_direction(grad_J, grad_J_norm, random_seed)
        cos_u = _global_dot(direction, grad_J) / max(grad_J_norm**2, 1e-300)
    with torch.no_grad():
        for p, d in zip(theta, direction):
            p.copy_(p + ascent_size * d)  # same arithmetic as meta_gradient, bit for bit
            p.grad = None

    # Alg.1 l.6: L at θ'; backward leaves ∇L(θ') in p.grad
    L, correct = 0.0, 0.0
    for batch in pairs:
        r = own_rewards(model, batch, bf16)
        b = r.shape[0] // 2
        L_micro = reward.bradley_terry_loss(r[:b], r[b:]) * b / n_pairs
        L_micro.backward()
        L += L_micro.item()
        correct += (r[:b] > r[b:]).sum().item()

    # Alg.1 l.7 needs the gradient at θ' but applies it to θ: restore θ, keep p.grad
    with torch.no_grad():
        for p, saved in zip(theta, backup):
            p.copy_(saved)
    metrics = distributed.all_reduce_mean({"L": L, "acc": correct / n_pairs}, world)
    stats = {"L_adapted": metrics["L"], "J": J, "acc_adapted": metrics["acc"],
             "step_norm": ascent_size * grad_J_norm, "grad_J_norm": grad_J_norm}
    if random_seed is not None:
        stats["cos_u_grad_J"] = cos_u
    return stats


def own_rewards(model: torch.nn.Module, batch: packing.Packed, bf16: bool) -> torch.Tensor:
    """r at the module's own (current) parameters: (B,), in the model's dtype."""
    device = next(model.parameters()).device
    with common.autocast(device, bf16):
        return reward.reward_dtype(reward.packed_rewards(model, batch))


def meta_route(args: Args, world: int) -> str:
    """Which code computes Alg. 1 l.4–7: `functional` (`meta_gradient` on the model itself: one
    process), `gathered` (`meta_gradient` on gathered parameters: `--meta-impl functional` under
    torchrun) or `inplace`. `--meta-impl auto` is functional in one process and under torchrun
    gathered at order 2, in place at order 1."""
    impl = args.meta_impl if args.meta_impl != "auto" else (
        "functional" if world == 1 or args.meta_order == 2 else "inplace")
    check(not (impl == "inplace" and args.meta_order == 2),
          "--meta-impl inplace computes the first-order gradient only; use --meta-impl functional "
          "for --meta-order 2")
    return "gathered" if impl == "functional" and world > 1 else impl


# --------------------------------------------------------------------------------------------------
# What the meta step did (every --log-adapted-every steps, called from the loop after the meta step)
# --------------------------------------------------------------------------------------------------
def standardised(x: torch.Tensor) -> torch.Tensor:
    """(x − mean) / std over all entries (population std): rewards on a scale-free footing."""
    return (x - x.mean()) / x.std(unbiased=False).clamp(min=1e-12)


def mechanism_stats(model: torch.nn.Module, pairs: list[packing.Packed],
                    meta: list[packing.Packed], k: int, eta: float, normalize_ascent: bool,
                    n_pairs: int, n_prompts: int, bf16: bool,
                    random_seed: int | None = None) -> dict[str, float]:
    """What the meta step did, beyond "J went up". Called after any route, before the optimiser
    step: `p.grad` holds ∇L(θ'), the model is at θ. Works on a plain or an FSDP2 module alike (it
    moves the module's own parameters to θ' and back, as the in-place route does); `p.grad` and θ
    are left exactly as found. Costs a forward/backward of X_s and X_t and a forward of X_s.
    random_seed: the route's (`--ascent random`: θ' is θ + step·u with the same u).

    Eq. (2) rewards a larger reward *scale* as much as a better *separation*: σ(|Δr|) grows when
    every reward is multiplied by 2, although the ranking is unchanged, and PPO's score
    normalisation cancels the scale again. So:
      J_adapted                 J at θ' (the ascent should raise it)
      J_std, J_std_adapted      J of the standardised rewards at θ and θ': rises only if the
                                separation improved
      reward_std_S, _D          the reward scale: std of r over the X_s responses and over the X_t
                                sequences at θ
      cos_grad                  cos(∇L(θ'), ∇L(θ)): 1 means the look-ahead changed nothing
    Under FSDP2 each process measures its own share; the means over processes are returned (the
    cosine is exact: its dot products are summed over the shards).
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    theta = list(model.parameters())
    grads_adapted = [p.grad for p in theta]  # ∇L(θ'), put back at the end
    backup = [p.detach().clone() for p in theta]

    def backward_into_grads(batches: list[packing.Packed], loss) -> torch.Tensor:
        """Σ over micro-batches of loss(r) backward into fresh p.grad; returns every r, detached."""
        for p in theta:
            p.grad = None
        rewards = []
        for batch in batches:
            r = own_rewards(model, batch, bf16)
            loss(r).backward()
            rewards.append(r.detach())
        return torch.cat(rewards)

    # ∇J at θ again (the route's own ∇J is gone), then θ' = θ + η ∇J exactly as the routes form it
    r_meta = backward_into_grads(meta, lambda r: difference_loss(r.view(-1, k)) * r.shape[0]
                                 / (k * n_prompts))
    grad_J_norm = distributed.global_norm([p.grad for p in theta])
    ascent_size = eta / max(grad_J_norm, 1e-12) if normalize_ascent else eta
    direction = [p.grad for p in theta]
    if random_seed is not None:  # the control: the route's random direction
        direction = random_direction(direction, grad_J_norm, random_seed)
    with torch.no_grad():
        for p, d in zip(theta, direction):
            p.copy_(p + ascent_size * d)
        r_meta_adapted = torch.cat([own_rewards(model, batch, bf16) for batch in meta])
        distributed.reshard(model)  # a no-grad forward leaves an FSDP2 root unsharded
        for p, saved in zip(theta, backup):
            p.copy_(saved)

    # ∇L at θ, to compare with ∇L(θ')
    r_pairs = backward_into_grads(pairs, lambda r: reward.bradley_terry_loss(
        r[: r.shape[0] // 2], r[r.shape[0] // 2:]) * (r.shape[0] // 2) / n_pairs)
    grads_at_theta = [p.grad for p in theta]
    dot = _global_dot(grads_adapted, grads_at_theta)
    norms = _global_dot(grads_adapted, grads_adapted) * _global_dot(grads_at_theta, grads_at_theta)
    for p, g in zip(theta, grads_adapted):
        p.grad = g
    local = {"J_adapted": difference_loss(r_meta_adapted.view(-1, k)).item(),
             "J_std": difference_loss(standardised(r_meta).view(-1, k)).item(),
             "J_std_adapted": difference_loss(standardised(r_meta_adapted).view(-1, k)).item(),
             "reward_std_S": r_meta.std(unbiased=False).item(),
             "reward_std_D": r_pairs.std(unbiased=False).item()}
    return {**distributed.all_reduce_mean(local, world),
            "cos_grad": dot / max(math.sqrt(norms), 1e-300)}


def _global_dot(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    """Σ_i <x_i, y_i> in float64 over all processes
    (FSDP2 shards: each process adds its own part)."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    dot = sum((local(x).double() * local(y).double()).sum() for x, y in zip(xs, ys)).item()
    world = dist.get_world_size() if dist.is_initialized() else 1
    return (distributed.all_reduce_sum(dot, world) if any(hasattr(x, "to_local") for x in xs)
            else dot)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def meta_sequences(tokenizer, items: list[dict], max_len: int,
                   chat_template: str = "auto") -> list[list[int]]:
    """X_s: m items {prompt, responses[k]} -> m·k token-id lists,
    sequence i·k + j = response j of prompt i."""
    return [data.encode(tokenizer, it["prompt"], resp, max_len, chat_template)[0]
            for it in items for resp in it["responses"]]


def micro_batches(tokenizer, X_t: list[dict], X_s: list[dict], size: int, max_len: int,
                  chat_template: str, device: torch.device) -> tuple[list[packing.Packed],
                                                                      list[packing.Packed]]:
    """This process's share of X_t and X_s as packed micro-batches of at most `size` pairs / prompts
    (packing.py: no FLOPs on padding): (pairs, meta), each a list; one of each when `size` holds
    them all (the functional routes)."""
    pad = tokenizer.pad_token_id
    pairs = [reward.pair_sequences(tokenizer, X_t[i: i + size], max_len, chat_template)[0]
             for i in range(0, len(X_t), size)]
    meta = [meta_sequences(tokenizer, X_s[i: i + size], max_len, chat_template)
            for i in range(0, len(X_s), size)]
    return ([packing.pack(seqs, pad).to(device) for seqs in pairs],
            [packing.pack(seqs, pad).to(device) for seqs in meta])


def read_meta_set(path: str) -> tuple[list[dict], int]:
    """Read S; every record needs `prompt` and the same number k ≥ 2 of string `responses`.
    Returns (items, k)."""
    items = data.read_jsonl(path, ["prompt", "responses"])
    k = len(items[0]["responses"])
    for lineno, it in enumerate(items, start=1):
        ok = isinstance(it["responses"], list) and all(isinstance(s, str) for s in it["responses"])
        check(ok, f"{path}:{lineno}: 'responses' must be a list of strings")
        check(len(it["responses"]) == k,
              f"{path}:{lineno}: {len(it['responses'])} responses, the first record has {k}")
    check(k >= 2, f"{path}: k = {k} responses per prompt; the difference loss needs k >= 2")
    return items, k


def heldout_gaps(model, tokenizer, items: list[dict], k: int, args: Args, world: int,
                 rank: int) -> dict[str, float]:
    """Reward-gap statistics (reward_gaps) of the RM on held-out items of S."""
    prompts = [it["prompt"] for it in items for _ in range(k)]
    responses = [s for it in items for s in it["responses"]]
    with common.eval_mode(model):
        scores = reward.score_texts(model, tokenizer, prompts, responses, max_len=args.max_len,
                                    world=world, rank=rank, batch_size=args.eval_batch_size,
                                    bf16=args.bf16, chat_template=args.chat_template).view(-1, k)
    return reward_gaps(scores)


# --------------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(Args, argv)
    threads = common.configure_process(args.threads, args.tf32, args.deterministic)
    rank, world, device = distributed.init_distributed(args.dist_timeout)
    route = meta_route(args, world)  # which code computes Alg. 1 l.4–7 (the loop names it)
    check(not (args.ascent == "random" and args.meta_order == 2),
          "--ascent random is a first-order control (θ' = θ + u with u a constant); it has no "
          "--meta-order 2 (nothing to differentiate through): use --meta-order 1")
    check(not args.grad_checkpointing or route == "inplace",
          f"--grad-checkpointing needs --meta-impl inplace (this run's route is {route}): the "
          "functional routes evaluate the model at θ' through torch.func.functional_call, and a "
          "layer recomputed in the backward would run at the module's own parameters instead")
    for flag, size in (("--batch-size", args.batch_size),
                       ("--meta-batch-size", args.meta_batch_size)):
        check(size % world == 0, f"{flag} {size} is not divisible by the world size {world}")
    n_local, m_local = args.batch_size // world, args.meta_batch_size // world
    if route != "inplace":
        check(args.micro_batch_size >= max(n_local, m_local),
              f"--meta-impl functional runs X_t and X_s in one forward each ({n_local} pairs, "
              f"{m_local} prompts per process); raise --micro-batch-size to "
              f"{max(n_local, m_local)} or use --meta-impl inplace")
    if args.fresh_head:
        distributed.check_checkpoint(args.model, "--model")
    else:  # a causal LM would get a random head without a word
        distributed.check_reward_model(args.model, "--model",
                                       " (or pass --fresh-head to start from it with a new head)")
    distributed.check_positions(args.model, "--max-len", args.max_len)
    pairs = data.read_pairs(args.train, args.data_format, args.preference)
    test_pairs = data.read_pairs(args.test, args.data_format, args.preference) if args.test else []
    meta_items, k = read_meta_set(args.meta)
    heldout = read_meta_set(args.meta_heldout)[0] if args.meta_heldout else []
    state = distributed.resume_state(args) if args.resume else None  # None: start from scratch
    common.prepare_output(args.out, args.overwrite, args.resume, state)
    common.seed_everything(args.seed, 0)

    # ---- model: the RM (r_θ: a linear head on the last token),
    # FSDP2 over the processes; optimiser ----
    path = args.out if state else args.model
    tokenizer = distributed.check_reward_tokenizer(path)
    # Order 2 differentiates twice through attention;
    # the fused SDPA kernels have no double backward.
    attn = {"attn_implementation": "eager"} if args.meta_order == 2 else {}
    model = distributed.empty_model(AutoModelForSequenceClassification, path, num_labels=1,
                                    pad_token_id=tokenizer.pad_token_id, **attn)  # meta device
    if world > 1:  # FSDP2: each decoder layer one unit (gathered for its forward), then the root
        mp = distributed.fsdp_precision(args.bf16)  # --bf16: bf16 compute, fp32 master weights
        for layer in distributed.decoder_layers(model):
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    # rank 0 reads, every rank gets its shards
    model = distributed.load_weights(model, path, world, device)
    if args.grad_checkpointing:  # each layer keeps its input only and is recomputed in backward
        distributed.checkpoint_activations(model)
    model.train()
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    # a plain copy of the architecture; its weights come from functional_call
    if route == "gathered":
        with torch.device("meta"):
            twin = AutoModelForSequenceClassification.from_config(model.config)
        twin.train()
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                      weight_decay=0.0)
    log = common.MetricsLog(os.path.join(args.out, "metrics.jsonl"))

    _, total_steps = common.count_steps(len(pairs), args.batch_size, args.epochs, args.max_steps,
                                        f"{args.train}: {len(pairs)} pairs")
    check(len(meta_items) >= args.meta_batch_size,
          f"{args.meta}: {len(meta_items)} items, fewer than one meta batch of "
          f"{args.meta_batch_size}")
    common.print0(f"meta_rm: {len(pairs)} pairs, S has {len(meta_items)} prompts x k = {k}; "
                  f"{total_steps} steps of n = {args.batch_size} pairs, "
                  f"m = {args.meta_batch_size} prompts; order {args.meta_order}, "
                  f"{route} on {world} process(es), {threads} thread(s) each; "
                  f"η = {args.eta}, α = {args.lr}"
                  + (", ascent along a random direction (control)"
                     if args.ascent == "random" else ""))

    def run_eval(step: int) -> None:
        metrics = {}
        if test_pairs:
            metrics.update(reward.evaluate(model, tokenizer, test_pairs, max_len=args.max_len,
                                           world=world, rank=rank, batch_size=args.eval_batch_size,
                                           bf16=args.bf16, chat_template=args.chat_template))
        if heldout:
            metrics.update({"heldout_" + key: v for key, v in
                            heldout_gaps(model, tokenizer, heldout, k, args, world, rank).items()})
        if metrics:
            log.log(step=step, **{"eval_" + key: v for key, v in metrics.items()})
            common.print0(f"eval @ {step}: "
                          + ", ".join(f"{key} {v:.4f}" for key, v in metrics.items()))

    if state is None:
        run_eval(0)  # the starting point, so every change is visible

    # ---- loop: Algorithm 1 ----
    # the orders of D and of S: the same on every rank, so all ranks agree on X_t and X_s
    pair_order = common.Shuffled(len(pairs), args.batch_size, args.seed, whole_batches=True)
    s_order = common.Shuffled(len(meta_items), args.meta_batch_size, args.seed + 1,
                              whole_batches=False)
    start = 0
    # --resume: optimiser, RNG states, and the orders of D and S where the checkpoint left them
    if state:
        distributed.restore_training_state(state, [(model, optimizer)], world, rank,
                                           pair_order=pair_order, s_order=s_order)
        start = state["step"]

    def save(step: int, finished: bool = False) -> None:  # collective: every rank calls it
        trainer_state = None
        if args.save_every > 0:  # resumable checkpoints: also what --resume needs
            trainer_state = distributed.training_state(step, [(model, optimizer)], world, log,
                                                       finished, pair_order=pair_order,
                                                       s_order=s_order)
        distributed.save_model(model, tokenizer, args.out, world, args, trainer_state)

    preemption = common.Preemption(args.save_every > 0, "meta_rm", args.out, NOT_RESUMABLE)
    bar = common.progress(range(start, total_steps), desc=f"meta_rm (order {args.meta_order})")
    t0 = time.time()
    for step in bar:
        # Alg.1 l.2: X_t ← n pairs from D (one epoch in a shuffled order);
        # this process takes its n / world of them
        X_t = [pairs[i] for i in pair_order.take()][rank * n_local: (rank + 1) * n_local]
        # Alg.1 l.3: X_s ← m items from S
        # (S is cycled through in shuffled order, independently of D)
        X_s = [meta_items[i] for i in s_order.take()][rank * m_local: (rank + 1) * m_local]
        pairs_t, meta_s = micro_batches(tokenizer, X_t, X_s, args.micro_batch_size, args.max_len,
                                        args.chat_template, device)  # this process's share, packed
        # Alg.1 l.4–l.6 and the gradient of l.7: ∇θ L_θ'(X_t) into every p.grad, by the route chosen
        # before the loop (meta_route; docs/design.md §9: functional_call cannot run under FSDP2)
        # --ascent random (a control): ascend along a random u of ∇J's length, drawn from this seed
        seed_u = ascent_seed(args.seed, step) if args.ascent == "random" else None
        if route == "functional":
            # the textbook code: torch.func.functional_call at θ' (1 process)
            grads, stats = meta_gradient(model, params, buffers, pairs_t[0], meta_s[0], k, args.eta,
                                         args.meta_order, args.normalize_ascent, bf16=args.bf16,
                                         random_seed=seed_u)
            for p, g in zip(params.values(), grads):
                p.grad = g
        elif route == "inplace":
            # FSDP2, order 1: ascend the shards in place, backward L, restore θ
            stats = meta_gradient_inplace(model, pairs_t, meta_s, k, args.eta, n_local, m_local,
                                          args.normalize_ascent, args.bf16, seed_u)
        else:
            # "gathered" (FSDP2, order 2): meta_gradient on gathered parameters and a plain twin
            stats = meta_gradient_gathered(model, twin, pairs_t[0], meta_s[0], k, args.eta,
                                           args.meta_order, args.normalize_ascent, args.bf16,
                                           seed_u)
        if args.log_adapted_every > 0 and step % args.log_adapted_every == 0:
            # what the ascent did: J at θ', J of standardised rewards, reward scale,
            # cos(∇L(θ'), ∇L(θ))
            stats.update(mechanism_stats(model, pairs_t, meta_s, k, args.eta, args.normalize_ascent,
                                         n_local, m_local, args.bf16, seed_u))
        # Alg.1 l.7: θ_{t+1} = θ_t − α ∇θ L_θ'(X_t)   (AdamW with lr α, or plain SGD)
        grad_norm = distributed.clip_grad_norm(model, args.grad_clip,
                                               f"meta_rm step {step + 1}: gradient norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        common.check_finite(stats["L_adapted"], f"meta_rm step {step + 1}: L(θ')")
        log.log(step=step + 1, grad_norm=grad_norm, **stats,
                s_per_step=(time.time() - t0) / (step + 1 - start))
        bar.set_postfix(L=f"{stats['L_adapted']:.3f}", J=f"{stats['J']:.4f}")
        if (step + 1) % args.log_every == 0 or step + 1 == total_steps:
            common.print0(f"step {step + 1}/{total_steps} "
                          + " ".join(f"{key} {v:.4g}" for key, v in stats.items()))
        if common.due(args.eval_every, step + 1, total_steps):
            run_eval(step + 1)
        if (common.due(args.save_every, step + 1, total_steps)
                or preemption.requested(world, step + 1, total_steps)):
            save(step + 1)
            preemption.stop(step + 1, total_steps)  # SIGINT / SIGTERM: stop here, resumable

    run_eval(total_steps)
    save(total_steps, finished=True)
    common.print0(f"saved {args.out}")


if __name__ == "__main__":
    common.run_main(main)
