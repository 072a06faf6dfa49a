"""PPO, the RL stage of every round: per-token KL penalty, GAE, a critic initialised from the RM.

The policy π_θ starts from the SFT checkpoint and is trained to maximise the reward model's score
while a per-token KL penalty keeps it near the frozen SFT model π_ref
(paper §"Experimental settings"; docs/design.md §4, §6). One PPO iteration has six steps; the code
repeats these numbers as `# PPO step k:` tags.

  1. rollouts   draw a batch of prompts; sample n responses per prompt from π_θ (nucleus sampling
                T 0.8, top-p 0.9, repetition penalty 1.1, KV cache, batched); cut each response
                right after its first EOS
  2. score      s = r_φ(x, y), the frozen RM's score read at the EOS; normalised (choice 10) and
                clipped to [-0.8, 0.8]; a response without EOS gets the penalty score
                `--missing-eos-score` instead (the RM's score is defined at the EOS only)
  3. forward    log π_θ(y_t | x, y_<t) with the logits divided by the sampling temperature,
                log π_ref(y_t | ...), and the critic's values V(x, y_<t); each computed once per
                rollout batch, without gradients
  4. rewards    r_t = −β (log π_θ − log π_ref) on every response token (the k1 estimate of the KL),
                plus s on the last response token (the EOS): the score belongs to the whole
                response, the KL to each token
  5. GAE        δ_t = r_t + γ V_{t+1} − V_t,  A_t = δ_t + γλ A_{t+1},  returns R_t = A_t + V_t,
                with V = 0 after the last response token; advantages whitened over the valid
                tokens of the whole batch
  6. update     PPO epochs over mini-batches: clipped surrogate (ratio clip 0.2) for the policy,
                clipped value loss (0.2) for the critic, separate AdamW optimisers, gradient-norm
                clipping

Models: the policy (trained; from --policy, default the SFT folder) and the reference (frozen; the
SFT folder) are AutoModelForCausalLM; the reward model (frozen) and the critic (trained) are
AutoModelForSequenceClassification loaded from the RM folder — the critic's value at every position
is the RM's linear head applied to that position's final hidden state.

Commands
    python ppo.py  # 1 process, CPU, the built-in testbed (paper values)
    torchrun --standalone --nproc_per_node=2 ppo.py  # FSDP2 over 2 processes (gloo on CPU)
    torchrun --nproc_per_node=8 ppo.py --sft runs/llama2-sft --rm runs/llama2-rm \\
        --prompts hh_prompts.jsonl --bf16

    # the testbed (tiny model, short answers): larger learning rates, fewer and shorter
      rollouts, e.g.
    python ppo.py --sft runs/testbed/sft --rm runs/testbed/rm --out runs/testbed/ppo \\
        --policy-lr 1e-4 \\
        --critic-lr 1e-4 --rollouts-per-prompt 4 --prompts-per-iteration 16 --mini-batch-size 32 \\
        --max-new-tokens 32 --iterations 60
    measured (the default pipeline's runs/testbed/sft and runs/testbed/rm, 1 process, 2 cores): mean
    RM score 0.38 -> 0.70 and gold reward 1.34 -> 1.53 (first vs last 5 iterations), KL 2.6 nats per
    response at the end, EOS rate 1.0; 0.7 s per iteration on an idle machine = generation 0.08 s +
    step 3's forwards 0.14 s + update 0.46 s (about 7,000 tokens/s through policy and critic, ~35%
    of the 2-core fp32 matmul peak)

Paper defaults (Llama-2-7B): policy lr 5e-7, critic lr 1.5e-6, 16 rollouts per query, T 0.8,
top-p 0.9, repetition penalty 1.1, β = 0.05, score clip 0.8, GAE λ 0.95 γ 1, critic from the RM,
512 new tokens at most. The ratio and value clips 0.2 and advantage whitening are the usual PPO
details (docs/design.md §6).

Output layout: `out/` holds the policy (loads with AutoModelForCausalLM, so it is the next stage's
--model/--sft), `out/critic/` the critic (an AutoModelForSequenceClassification),
`out/metrics.jsonl` one line per iteration.

Deliberate choices the paper leaves open
  1. Prompts per iteration (8), PPO epochs (2) and mini-batch size (64 rollouts) are not stated;
     with 16 rollouts per prompt an iteration has 128 rollouts = 2 mini-batches x 2 epochs =
     4 optimiser steps per model.
  2. Log-probs are those of the temperature-scaled model distribution softmax(logits / T). Top-p and
     the repetition penalty also shape what is sampled, but PPO's ratio uses π_θ / T for both old
     and new log-probs, as common RLHF implementations do; the ratio is 1 (up to float rounding) at
     the first mini-batch.
  3. A response that hits --max-new-tokens without EOS gets score --missing-eos-score (-1.0: below
     every clipped score, so not stopping never pays); the KL penalty still applies to its tokens.
  4. Mini-batch membership is strided: local rollout i belongs to mini-batch i mod M. A global
     mini-batch is then the same set of rollouts for any world size (so 1 process == N processes
     exactly on the same rollouts), and the n rollouts of one prompt are spread over the M
     mini-batches. The order of the mini-batches is shuffled every epoch with a generator shared by
     all ranks.
  5. Loss normalisation: each loss is the mean over the valid response tokens of the whole global
     mini-batch (token counts all-reduced), the same for every split into micro-batches and ranks.
     Advantage whitening and explained variance use statistics over the whole global batch
     (all-reduced). Variances are population ones.
  6. The value loss is 0.5 · max((V − R)², (V_clip − R)²) (the OpenAI baselines form); the value
     clip is absolute (0.2 in score units, scores lie in [-1, 0.8]).
  7. Dropout is off in all four models (eval mode) also while training, so the log-probs of step 3
     and step 6 agree when the parameters have not changed.
  8. AdamW betas (0.9, 0.95), no weight decay, constant learning rates, gradient norms clipped to
     1.0.
  9. KL metrics are per response: the sum over its tokens of the k1 estimate log π/π_ref and of the
     k3 estimate (π_ref/π − 1 − log π_ref/π), averaged over the rollouts.
 10. Score normalisation before the clip (--score-norm init): a Bradley-Terry RM is defined only up
     to an added constant, so a clip at ±0.8 means nothing for raw scores (measured: an RM of
     reward.py on a small testbed world scored the SFT policy's samples at +1.6 on average, so
     nearly all of them clipped to 0.8 and the score carried no signal). Like Ziegler et al. (2019),
     scores are normalised with the mean and std of the RM's scores on the first iteration's
     rollouts (the SFT policy's), fixed for the rest of the run: the clip then acts at 0.8 standard
     deviations of the initial policy's scores. --score-norm none clips the raw scores.
"""
from __future__ import annotations

import dataclasses
import os
import time

import torch
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import reward
from plumbing import common, data, distributed, packing, sampling
from plumbing.common import arg, check, finite, in_unit, in_unit_above_0, non_negative, positive
from plumbing.data import CHAT_TEMPLATE_HELP, CHAT_TEMPLATE_MODES, DATA_FORMAT_HELP, DATA_FORMATS
from testbed.gold import gold_scores


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Args:
    sft: str = arg("runs/testbed/sft",
                   "SFT checkpoint: the frozen reference policy (and the initial policy)",
                   essential=True)
    policy: str = arg("", "initial policy, a save_pretrained folder such as the previous round's "
                          "PPO output (empty = --sft); the KL reference stays --sft",
                      essential=True)
    rm: str = arg("runs/testbed/rm",
                  "reward-model checkpoint (reward.py or meta_rm.py): the frozen RM and the "
                  "critic's initialisation", essential=True)
    prompts: str = arg("runs/testbed/data/rl_prompts.jsonl", "PPO prompts, JSONL records {prompt}",
                       essential=True)
    data_format: str = arg("auto", DATA_FORMAT_HELP + " (for --prompts)", choices=DATA_FORMATS,
                           essential=True)
    chat_template: str = arg("auto", CHAT_TEMPLATE_HELP, choices=CHAT_TEMPLATE_MODES,
                             essential=True)
    out: str = arg("runs/testbed/ppo", "output folder: the policy, critic/ and metrics.jsonl")
    iterations: int = arg(100, "PPO iterations (rollouts + update); the paper does not "
                               "state its number", essential=True, valid=positive)
    prompts_per_iteration: int = arg(8, "prompts drawn per iteration, over all processes "
                                        "(divisible by world size)", essential=True, valid=positive)
    rollouts_per_prompt: int = arg(16, "responses sampled per prompt (paper: 16 per query)",
                                   essential=True, valid=positive)
    max_new_tokens: int = arg(512, "maximum response tokens (paper: 512)", essential=True,
                              valid=positive)
    max_prompt_len: int = arg(512, "prompts longer than this many tokens keep their last ones (the "
                                   "start is cut first, as data.encode does); bounds the rollouts' "
                                   "length and the KV cache; 0 = no cap", essential=True,
                              valid=non_negative)
    temperature: float = arg(0.8, "sampling temperature; log-probs use logits / temperature "
                                  "(paper: 0.8)", essential=True, valid=positive)
    top_p: float = arg(0.9, "nucleus sampling mass (paper: 0.9)", essential=True,
                       valid=in_unit_above_0)
    repetition_penalty: float = arg(1.1, "repetition penalty while sampling (paper: 1.1)",
                                    essential=True, valid=positive)
    kl_coef: float = arg(0.05, "β of the per-token KL penalty −β (log π − log π_ref) "
                               "(paper: 0.05)", essential=True, valid=non_negative)
    score_clip: float = arg(0.8, "the RM score is clipped to [-score_clip, score_clip] "
                                 "(paper: 0.8; 0 = off)", essential=True, valid=non_negative)
    score_norm: str = arg("init", "init: normalise RM scores with the mean and std of the first "
                                  "iteration's rollouts, fixed for the run (then clip); none: "
                                  "clip the raw scores",
                          choices=("init", "none"), essential=True)
    missing_eos_score: float = arg(-1.0,
                                   "score given instead of the RM's to a response without EOS",
                                   essential=True, valid=finite)
    gamma: float = arg(1.0, "GAE discount γ (paper: 1)", essential=True, valid=in_unit)
    lam: float = arg(0.95, "GAE λ (paper: 0.95)", essential=True, valid=in_unit)
    policy_lr: float = arg(5e-7, "policy learning rate (paper: 5e-7)", essential=True,
                           valid=positive)
    critic_lr: float = arg(1.5e-6, "critic learning rate (paper: 1.5e-6)", essential=True,
                           valid=positive)
    ppo_epochs: int = arg(2, "passes over each rollout batch", essential=True, valid=positive)
    mini_batch_size: int = arg(64, "rollouts per optimiser step, over all processes",
                               essential=True, valid=positive)
    micro_batch_size: int = arg(8, "rollouts per forward/backward on one process "
                                   "(also for step 3's forwards)", valid=positive)
    generation_batch_size: int = arg(64, "rollouts sampled per generate() call on one process",
                                     valid=positive)
    ratio_clip: float = arg(0.2,
                            "PPO ratio clip ε: ratios outside [1 − ε, 1 + ε] get no gradient",
                            essential=True, valid=positive)
    value_clip: float = arg(0.2, "critic values may move at most this far from their "
                                 "rollout-time value", essential=True, valid=positive)
    whiten_advantages: bool = arg(True, "normalise advantages to mean 0, std 1 over the valid "
                                        "tokens of the batch", essential=True)
    grad_clip: float = arg(1.0, "clip each model's global gradient norm to this value (0 = off)",
                           essential=True, valid=non_negative)
    seed: int = arg(0, "random seed: prompt order (shared by all ranks) and sampling (seed + rank)",
                    essential=True, valid=common.seed)
    bf16: bool = arg(False, "bf16: autocast for generation and forward/backward, under FSDP2 bf16 "
                            "parameters and activations with fp32 master weights and gradient "
                            "reduction (MixedPrecisionPolicy), and the frozen reference and RM in "
                            "bf16; fp32 is the reference (in bf16 the log-probs of steps 3 and 6 "
                            "differ by rounding, so the ratio is not 1 at the start)",
                     essential=True)
    grad_checkpointing: bool = arg(False, distributed.CHECKPOINTING_HELP + " (policy and critic)")
    threads: int = arg(0, common.THREADS_HELP, valid=non_negative)
    tf32: bool = arg(False, common.TF32_HELP)
    deterministic: bool = arg(False, common.DETERMINISTIC_HELP)
    dist_timeout: float = arg(60.0, distributed.DIST_TIMEOUT_HELP, valid=positive)
    eval_prompts: str = arg("", "held-out prompts, JSONL {prompt}: every --eval-every iterations "
                                "(and before the first and after the last) the policy is sampled "
                                "on them and the gold reward (on the testbed), the RM's score and "
                                "KL(π‖π_SFT) are logged — the over-optimisation curve; empty = off")
    eval_every: int = arg(10, "iterations between held-out evaluations (with --eval-prompts)",
                          valid=positive)
    eval_samples: int = arg(2, "responses sampled per held-out prompt at each evaluation",
                            valid=positive)
    sample_every: int = arg(10, "print a few decoded rollouts with score, KL and total every N "
                                "iterations (0 = never)", valid=non_negative)
    samples_to_print: int = arg(3, "how many rollouts to print (each from a different prompt)",
                                valid=non_negative)
    save_every: int = arg(50, "save policy and critic every N iterations, resumable with --resume "
                              "(and at the end; 0 = only the final models, not resumable)",
                          valid=non_negative)
    overwrite: bool = arg(False, "replace an existing output folder")
    resume: bool = arg(False, "continue the run in --out from its latest --save-every checkpoint "
                              "(policy, critic, both optimisers, prompt order, RNG states, score "
                              "normalisation); the same essential flags are required")


# --------------------------------------------------------------------------------------------------
# Rollouts: one layout for every forward pass. Prompts are left-padded and responses right-padded,
# so every response starts at column P and position t of the response is column P + t:
#     input_ids (B, P + R) = [pad pad prompt prompt | resp resp EOS pad]
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Rollouts:
    prompts: list[str]            # the prompt text of each row (for printing and the testbed's
                                  # gold reward)
    input_ids: torch.Tensor       # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R) 1 on prompt and response tokens, 0 on padding
    response_mask: torch.Tensor   # (B, R) 1 on the response tokens, up to and including the
                                  # first EOS
    ended: torch.Tensor           # (B,) bool: the response ends with EOS
    prompt_len: int               # P

    def rows(self, idx: torch.Tensor | slice) -> Rollouts:
        """A subset of the rows, keeping the column layout (so per-token tensors stay aligned)."""
        picked = range(len(self.prompts))[idx] if isinstance(idx, slice) else idx.tolist()
        return Rollouts([self.prompts[i] for i in picked], self.input_ids[idx],
                        self.attention_mask[idx], self.response_mask[idx], self.ended[idx],
                        self.prompt_len)

    @property
    def response(self) -> torch.Tensor:  # (B, R)
        return self.input_ids[:, self.prompt_len:]


def collate(prompts: list[str], queries: list[list[int]], responses: list[list[int]], pad_id: int,
            eos_id: int) -> Rollouts:
    """Token lists -> Rollouts. Each response must already be cut right after its first EOS (or have
    no EOS)."""
    P, R = max(len(q) for q in queries), max(len(r) for r in responses)
    ids = torch.full((len(queries), P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(ids)
    response_mask = torch.zeros((len(queries), R), dtype=torch.long)
    for i, (q, r) in enumerate(zip(queries, responses)):
        ids[i, P - len(q): P] = torch.tensor(q)
        ids[i, P: P + len(r)] = torch.tensor(r)
        attention_mask[i, P - len(q): P + len(r)] = 1
        response_mask[i, : len(r)] = 1
    ended = torch.tensor([len(r) > 0 and r[-1] == eos_id for r in responses])
    return Rollouts(list(prompts), ids, attention_mask, response_mask, ended, P)


@torch.no_grad()
def rollout(policy, tokenizer, prompts: list[str], args: Args, world: int,
            device: torch.device) -> Rollouts:
    """PPO step 1: sample one response per prompt (prompts already repeated n times), in generate()
    calls of --generation-batch-size. Every rank has the same number of prompts, so every rank makes
    the same number of generate calls; sampling.generate keeps ranks stepping together (synced_gpus)
    until all are done."""
    queries, responses = [], []
    for start in range(0, len(prompts), args.generation_batch_size):
        q, r = sampling.generate(policy, tokenizer,
                                 prompts[start: start + args.generation_batch_size],
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                                 world=world, chat_template=args.chat_template, bf16=args.bf16,
                                 max_prompt_len=args.max_prompt_len)
        for q_row, r_row in zip(q.tolist(), r.tolist()):
            # drop the left padding
            queries.append([t for t in q_row if t != tokenizer.pad_token_id])
            # keep up to and including the first EOS (sampling.generate has padded
            # everything after it)
            responses.append(r_row[: r_row.index(tokenizer.eos_token_id) + 1]
                             if tokenizer.eos_token_id in r_row else r_row)
    return collate(prompts, queries, responses, tokenizer.pad_token_id, tokenizer.eos_token_id)


# --------------------------------------------------------------------------------------------------
# Forward passes (PPO step 3, and again with gradients in step 6). The (B, P + R) layout above is
# what the method's tensors use; the models never see it: each micro-batch is packed without padding
# (packing.py) — a rollout is its prompt + response tokens, positions from 0 — and each head runs
# only where it is read: the LM head and the critic's head at the positions that predict a response
# token, the RM's head at the last one. Same numbers as the padded (B, P + R) forward to float
# rounding (tests/test_packing.py), no FLOPs on padding columns.
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PackedRollouts:
    packed: packing.Packed      # the rollouts' tokens without padding
    predict: torch.Tensor       # (N,) flat index of the position that predicts each response token
    tokens: torch.Tensor        # (N,) the response tokens, in the order of response_mask's ones,
                                # row by row
    response_mask: torch.Tensor  # (B, R) bool

    def grid(self, values: torch.Tensor) -> torch.Tensor:
        """Per-response-token values (N,) -> (B, R), zero on padding (differentiable)."""
        return torch.zeros(self.response_mask.shape, dtype=values.dtype, device=values.device
                           ).masked_scatter(self.response_mask.to(values.device), values)


def pack_rollouts(batch: Rollouts, device: torch.device) -> PackedRollouts:
    """A micro-batch of rollouts, packed once for all the models that read it. Rollout b is its q_b
    prompt tokens and r_b response tokens; response token t is predicted at position q_b − 1 + t of
    it."""
    P = batch.prompt_len
    q_len, r_len = batch.attention_mask[:, :P].sum(1), batch.response_mask.sum(1)
    seqs = [row[P - q: P + r]
            for row, q, r in zip(batch.input_ids.tolist(), q_len.tolist(), r_len.tolist())]
    packed = packing.pack(seqs, pad_id=0)  # the tail's token ids are never read
    mask = batch.response_mask.bool()
    return PackedRollouts(packed.to(device), packed.spans(q_len - 1, r_len).to(device),
                          batch.response[mask].to(device), mask.to(device))


def response_logits(policy, pr: PackedRollouts, bf16: bool = False) -> torch.Tensor:
    """Logits that predict each response token: (N, V) float32, the LM head on those N positions
    only."""
    with common.autocast(pr.tokens.device, bf16):
        return policy.lm_head(packing.hidden(policy, pr.packed)[pr.predict]).float()


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
                         with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(y_t) of the sampled tokens under softmax(logits / T), and (`with_entropy`:
    make_experience's policy only, a metric) the entropy of that distribution:
    (N, V), (N,) -> (N,), (N,) or None.

    Dividing by the sampling temperature makes this the distribution the tokens were sampled from
    (before top-p and the repetition penalty, see deliberate choice 2); without it the ratio of
    step 6 would not start at 1. Without the entropy only the gather is kept: no (N, V) exp and
    product for the reference model and the update."""
    logp = torch.log_softmax(logits / temperature, dim=-1)  # (N, V)
    logprobs = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return logprobs, (-(logp.exp() * logp).sum(-1) if with_entropy else None)


def critic_values(critic, pr: PackedRollouts, bf16: bool = False) -> torch.Tensor:
    """V(x, y_<t) for every response token t: the value of the state *before* token t is emitted,
    read at the position that predicts it (as the logits). The critic is RM-shaped
    (AutoModelForSequenceClassification): its linear head applied to those positions' final hidden
    states. (B, R), zero on padding.

    Under FSDP2 the head is called after the root forward, whose pre-forward hook gathered the
    root's parameters (embeddings, final norm, head) and leaves them unsharded until backward, where
    the root's gradients are reduce-scattered as usual (packing.hidden; checked: 2 processes == 1,
    tests/test_ppo_distributed.py)."""
    with common.autocast(pr.tokens.device, bf16):
        values = critic.score(packing.hidden(critic, pr.packed)[pr.predict])[:, 0].float()  # (N,)
    return pr.grid(values)


def rm_scores(rm, pr: PackedRollouts, bf16: bool = False) -> torch.Tensor:
    """r_φ(x, y) read at the last response token (the EOS), as the RM was trained
    (reward.packed_rewards). (B,)"""
    with common.autocast(pr.tokens.device, bf16):
        return reward.packed_rewards(rm, pr.packed).float()


# --------------------------------------------------------------------------------------------------
# The pieces that are the method (steps 4-6)
# --------------------------------------------------------------------------------------------------
def per_token_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor,
                      mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO step 4: r_t = −β (log π(y_t) − log π_ref(y_t)) on every response token, plus the score on
    the last one. (B, R), (B, R), (B,), (B, R) -> rewards (B, R), per-token k1 KL (B, R); both zero
    on padding."""
    kl = (logprobs - ref_logprobs) * mask  # (B, R) k1 estimate of KL(π || π_ref) per token
    rewards = -kl_coef * kl
    last = mask.sum(1).long() - 1  # (B,) index of the last response token (the EOS)
    # the score is for the whole response: on its last token
    rewards[torch.arange(len(last)), last] += scores
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO step 5: generalised advantage estimation. All (B, T); mask is 1 on a prefix of each row
    (the response).

        δ_t = r_t + γ V_{t+1} − V_t  with V_{t+1} = 0 after the last valid token (the episode
                                     has ended)
        A_t = δ_t + γ λ A_{t+1}      with A = 0 after the last valid token
        R_t = A_t + V_t              the critic's regression target (the λ-return)

    Returns (advantages, returns), both zero where mask is 0."""
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_values = (values[:, t + 1] * mask[:, t + 1] if t + 1 < T
                       else torch.zeros_like(lastgaelam))
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        lastgaelam = (delta + gamma * lam * lastgaelam) * mask[:, t]  # reset to 0 on padding
        advantages[:, t] = lastgaelam
    returns = (advantages + values) * mask
    return advantages, returns


def masked_mean(x: torch.Tensor, mask: torch.Tensor, world: int = 1) -> torch.Tensor:
    """Mean of x over the positions where mask is 1, over all ranks (one all-reduce of
    [sum, count])."""
    stats = torch.stack([(x * mask).sum(), mask.sum()]).double()
    if world > 1:
        torch.distributed.all_reduce(stats)
    return (stats[0] / stats[1]).to(x.dtype)


def whiten(x: torch.Tensor, mask: torch.Tensor, world: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the valid positions of the whole (global) batch; zero on padding.
    (B, T) -> (B, T)"""
    mean = masked_mean(x, mask, world)
    var = masked_mean((x - mean) ** 2, mask, world)  # population variance
    return (x - mean) * torch.rsqrt(var + eps) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip: float) -> torch.Tensor:
    """PPO's clipped surrogate per token, as a loss to minimise: max(−A ρ, −A clip(ρ, 1−ε, 1+ε)),
    with ρ = π/π_old. All (B, T) -> (B, T), zero on padding. The max picks the pessimistic term:
    once ρ has moved past 1 ± ε in the direction the advantage favours, the clipped (constant) term
    wins and the token gives no gradient."""
    ratio = torch.exp(logprobs - old_logprobs)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    return torch.max(pg_loss1, pg_loss2) * mask


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip: float) -> torch.Tensor:
    """Clipped value loss per token: 0.5 max((V − R)², (V_old + clip(V − V_old, −c, c) − R)²).
    (B, T) -> (B, T), zero on padding. Like the ratio clip, it removes the incentive to move V more
    than c from its rollout-time value."""
    values_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    vf_loss1 = (values - returns) ** 2
    vf_loss2 = (values_clipped - returns) ** 2
    return 0.5 * torch.max(vf_loss1, vf_loss2) * mask


# --------------------------------------------------------------------------------------------------
# One iteration after sampling: steps 2-3 (make_experience), steps 2, 4, 5 (compute_advantages),
# step 6 (ppo_update)
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def make_experience(policy, ref, rm, critic, batch: Rollouts, args: Args,
                    world: int) -> dict[str, torch.Tensor]:
    """Steps 2-3 on this rank's rollouts: every forward pass runs once, in micro-batches, without
    gradients. Returns tensors on CPU: raw_scores (B,), logprobs, ref_logprobs, entropy,
    values (B, R)."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("raw_scores", "logprobs",
                                                            "ref_logprobs", "entropy", "values")}
    device = next(policy.parameters()).device
    for start in range(0, len(batch.prompts), args.micro_batch_size):
        pr = pack_rollouts(batch.rows(slice(start, start + args.micro_batch_size)), device)
        # PPO step 2: the RM's score at the EOS
        parts["raw_scores"].append(rm_scores(rm, pr, args.bf16).cpu())
        # PPO step 3: log π_θ (with its entropy), log π_ref and V, all at temperature T / on the
        # same tokens
        logprobs, entropy = logprobs_and_entropy(response_logits(policy, pr, args.bf16), pr.tokens,
                                                 args.temperature, with_entropy=True)
        parts["logprobs"].append(pr.grid(logprobs).cpu())
        parts["entropy"].append(pr.grid(entropy).cpu())
        ref_logprobs, _ = logprobs_and_entropy(response_logits(ref, pr, args.bf16), pr.tokens,
                                               args.temperature)
        parts["ref_logprobs"].append(pr.grid(ref_logprobs).cpu())
        # (b, R), zero on padding
        parts["values"].append(critic_values(critic, pr, args.bf16).cpu())
    distributed.reshard(policy, ref, rm, critic)
    return {k: torch.cat(v) for k, v in parts.items()}


def score_stats(raw_scores: torch.Tensor, world: int) -> tuple[float, float]:
    """Mean and (population) standard deviation of the RM's scores over the rollouts of all
    ranks."""
    ones = torch.ones_like(raw_scores)
    mean = masked_mean(raw_scores, ones, world)
    std = masked_mean((raw_scores - mean) ** 2, ones, world).sqrt().item()
    # a constant RM (std 0) keeps its scores at 0 instead of dividing by 0
    return mean.item(), max(std, 1e-6)


def compute_advantages(exp: dict[str, torch.Tensor], batch: Rollouts, args: Args, world: int,
                       score_mean: float = 0.0, score_std: float = 1.0) -> None:
    """Steps 2 (normalise and clip the score), 4 (per-token rewards) and 5 (GAE, whitening); adds
    scores (B,), rewards, kl, advantages, returns (B, R) to `exp`."""
    mask = batch.response_mask.float()  # (B, R)
    # PPO step 2: normalise (choice 10) and clip the score; a response without EOS gets the penalty
    # score instead
    scores = (exp["raw_scores"] - score_mean) / score_std
    scores = scores.clamp(-args.score_clip, args.score_clip) if args.score_clip > 0 else scores
    exp["scores"] = torch.where(batch.ended, scores,
                                torch.full_like(scores, args.missing_eos_score))  # (B,)
    # PPO step 4: per-token rewards
    exp["rewards"], exp["kl"] = per_token_rewards(exp["logprobs"], exp["ref_logprobs"],
                                                  exp["scores"], mask, args.kl_coef)
    # PPO step 5: advantages and returns; whitening over the valid tokens of the global batch
    advantages, exp["returns"] = gae(exp["rewards"], exp["values"], mask, args.gamma, args.lam)
    exp["advantages"] = whiten(advantages, mask, world) if args.whiten_advantages else advantages


def ppo_update(policy, critic, policy_opt, critic_opt, batch: Rollouts,
               exp: dict[str, torch.Tensor], args: Args,
               world: int, generator: torch.Generator) -> dict[str, float]:
    """PPO step 6: --ppo-epochs passes over this rank's rollouts in mini-batches; one AdamW step per
    model per mini-batch. Returns metrics averaged over all mini-batches and ranks."""
    B = len(batch.prompts)                                   # rollouts on this rank
    device = next(policy.parameters()).device
    n_minibatches = B * world // args.mini_batch_size        # M
    mask = batch.response_mask.float()
    sums = dict(policy_loss=0.0, value_loss=0.0, clipfrac=0.0, approx_kl=0.0, tokens=0.0)
    grad_norms = dict(policy_grad_norm=0.0, critic_grad_norm=0.0)
    for epoch in range(args.ppo_epochs):
        for j in torch.randperm(n_minibatches, generator=generator).tolist():
            rows = torch.arange(j, B, n_minibatches)  # strided membership (deliberate choice 4)
            # Loss normalisation: each loss is the mean over the valid response tokens of the
            # *global* mini-batch, so a micro-batch contributes (its summed loss) / (tokens in the
            # global mini-batch). FSDP2 averages gradients over ranks, so x world turns that average
            # back into the sum over ranks.
            n_tokens = distributed.all_reduce_sum(mask[rows].sum().item(), world)
            for start in range(0, len(rows), args.micro_batch_size):
                idx = rows[start: start + args.micro_batch_size]
                pr = pack_rollouts(batch.rows(idx), device)
                old = {k: exp[k][idx].to(device)
                       for k in ("logprobs", "advantages", "values", "returns")}
                mb_mask = mask[idx].to(device)
                logprobs, _ = logprobs_and_entropy(response_logits(policy, pr, args.bf16),
                                                   pr.tokens, args.temperature)
                logprobs = pr.grid(logprobs)                                         # (b, R)
                pg = policy_loss(logprobs, old["logprobs"], old["advantages"], mb_mask,
                                 args.ratio_clip)
                (pg.sum() * world / n_tokens).backward()
                values = critic_values(critic, pr, args.bf16)                       # (b, R)
                vf = value_loss(values, old["values"], old["returns"], mb_mask, args.value_clip)
                (vf.sum() * world / n_tokens).backward()
                with torch.no_grad():
                    log_ratio = logprobs - old["logprobs"]
                    sums["policy_loss"] += pg.sum().item()
                    sums["value_loss"] += vf.sum().item()
                    sums["clipfrac"] += (((log_ratio.exp() - 1).abs() > args.ratio_clip).float()
                                         * mb_mask).sum().item()
                    # k3 of π_old‖π
                    sums["approx_kl"] += (((log_ratio.exp() - 1) - log_ratio)
                                          * mb_mask).sum().item()
                    sums["tokens"] += mb_mask.sum().item()
            grad_norms["policy_grad_norm"] += distributed.clip_grad_norm(policy, args.grad_clip)
            grad_norms["critic_grad_norm"] += distributed.clip_grad_norm(critic, args.grad_clip)
            policy_opt.step()
            critic_opt.step()
            policy_opt.zero_grad(set_to_none=True)
            critic_opt.zero_grad(set_to_none=True)
    totals = {k: distributed.all_reduce_sum(v, world) for k, v in sums.items()}
    out = {k: totals[k] / totals["tokens"]
           for k in ("policy_loss", "value_loss", "clipfrac", "approx_kl")}
    # norms are global
    out.update({k: v / (args.ppo_epochs * n_minibatches) for k, v in grad_norms.items()})
    common.check_finite(out["policy_loss"] + out["value_loss"], "ppo loss")
    return out


# --------------------------------------------------------------------------------------------------
# Held-out evaluation: gold reward, proxy score and KL(π‖π_SFT) on fixed prompts
# (the over-optimisation curve)
# --------------------------------------------------------------------------------------------------
def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(π(·|ctx) ‖ π_ref(·|ctx)) at every position, exactly over the vocabulary, for
    π = softmax(logits / T) and π_ref = softmax(ref_logits / T): (..., V), (..., V) -> (...)
    (ppo.py passes the (N, V) logits of the packed response tokens).

    Summed over the tokens of a response sampled from π, it is an unbiased estimate of the
    sequence-level KL(π(·|x) ‖ π_ref(·|x)) (the chain rule: the sequence KL is the expected sum of
    the per-step KLs along π's own samples), with less variance than the sampled log-ratio
    log π(y) − log π_ref(y) that step 4 uses."""
    logp = torch.log_softmax(logits / temperature, dim=-1)
    logq = torch.log_softmax(ref_logits / temperature, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def onpolicy_sums(scores: torch.Tensor, golds: torch.Tensor | None,
                  k: int) -> dict[str, float]:
    """Sums over prompts of how well the RM tells apart the policy's own samples. scores, golds:
    (N,) per response, N = m·k; responses i·k .. i·k + k − 1 are the k samples of prompt i. golds
    None (prompts without a gold reward): the gold sums are 0.

      agree          Σ over pairs i < j of one prompt with g_i ≠ g_j of
                     1[sign(s_i − s_j) = sign(g_i − g_j)] + ½·1[s_i = s_j]   (an RM tie is a coin)
      pairs          the number of those pairs (pairs of equal gold have no right order: left out)
      reward_spread  Σ over prompts of the population std of s over its k samples
      gold_spread    the same for g
      prompts        m
    Sums rather than means, so that ranks add them (distributed.all_reduce_sum) before
    `onpolicy_metrics` divides."""
    s = scores.double().view(-1, k)                                   # (m, k)
    i, j = torch.triu_indices(k, k, offset=1)                         # the C(k, 2) pairs i < j
    sums = dict(agree=0.0, pairs=0.0, reward_spread=s.std(1, unbiased=False).sum().item(),
                gold_spread=0.0, prompts=float(s.shape[0]))
    if golds is not None:
        g = golds.double().view(-1, k)
        d_rm, d_gold = s[:, i] - s[:, j], g[:, i] - g[:, j]            # (m, C(k, 2))
        ordered = d_gold != 0
        agree = (torch.sign(d_rm) == torch.sign(d_gold)).double() + 0.5 * (d_rm == 0).double()
        sums.update(agree=agree[ordered].sum().item(), pairs=ordered.sum().item(),
                    gold_spread=g.std(1, unbiased=False).sum().item())
    return sums


def onpolicy_metrics(totals: dict[str, float], has_gold: bool) -> dict[str, float]:
    """`onpolicy_sums` (summed over ranks) -> eval_reward_spread and, with gold, eval_onpolicy_acc
    (agree / pairs; NaN without pairs), eval_onpolicy_pairs, eval_gold_spread."""
    out = {"eval_reward_spread": totals["reward_spread"] / totals["prompts"]}
    if has_gold:
        out["eval_onpolicy_acc"] = (totals["agree"] / totals["pairs"] if totals["pairs"] > 0
                                    else float("nan"))
        out["eval_onpolicy_pairs"] = int(totals["pairs"])
        out["eval_gold_spread"] = totals["gold_spread"] / totals["prompts"]
    return out


@torch.no_grad()
def evaluate_policy(policy, ref, rm, tokenizer, prompts: list[str], args: Args, world: int,
                    rank: int, device: torch.device) -> dict[str, float]:
    """Sample --eval-samples responses per held-out prompt with the rollouts' sampler (T, top-p,
    repetition penalty: what the policy actually answers) and return the means over all of them:
    gold reward (testbed prompts only), the RM's raw score, KL(π_T‖π_ref,T) per response (token_kl
    summed over the response) and its square root, response length, EOS rate.

    The KL is that of the temperature-scaled models (the distributions of PPO's log-probs and KL
    penalty), taken along the sampled responses. Top-p cuts the tails, so the responses are not
    drawn from π_T exactly and the sum is a (slightly) biased estimate of the sequence KL; plain
    temperature sampling would remove the bias but would score the policy on tail tokens that PPO
    never samples and never trains (on the testbed its gold is ~0.7 lower).

    Gao et al. (2022) plot gold reward against d = √KL; `eval_sqrt_kl` is √ of the mean KL (the d of
    the policy), not the mean of per-response roots. Prompts are dealt to ranks in turn; a tail that
    does not fill every rank is left out so that all ranks run the same number of collective forward
    passes.

    On-policy separation (does the RM still tell apart the policy's own samples?), from the k =
    --eval-samples responses of each prompt (`onpolicy_sums`): `eval_onpolicy_acc`, over the pairs
    of one prompt's samples whose gold rewards differ, the share the RM orders as the gold does (a
    tie in the RM's scores counts ½), and `eval_onpolicy_pairs`, how many such pairs there were;
    `eval_reward_spread` and `eval_gold_spread`, the mean over prompts of the population std of
    the RM's scores and of the gold rewards over the k samples. The gold ones on testbed prompts
    only."""
    n = len(prompts) // world * world
    mine = [p for p in prompts[:n][rank::world] for _ in range(args.eval_samples)]
    sums = dict(gold=0.0, score=0.0, kl=0.0, response_len=0.0, eos_rate=0.0, count=0.0)
    has_gold = True
    # the RM's score and the gold of every response, in the order of `mine`: a prompt's k samples
    # may span two generation chunks, so onpolicy_sums groups them after the loop
    scores, golds = [], []
    for start in range(0, len(mine), args.generation_batch_size):
        chunk = mine[start: start + args.generation_batch_size]
        q, r = sampling.generate(policy, tokenizer, chunk, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_p=args.top_p,
                                 repetition_penalty=args.repetition_penalty, world=world,
                                 chat_template=args.chat_template, bf16=args.bf16,
                                 max_prompt_len=args.max_prompt_len)
        queries = [[t for t in row if t != tokenizer.pad_token_id] for row in q.tolist()]
        responses = [row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row
                     else row for row in r.tolist()]
        batch = collate(chunk, queries, responses, tokenizer.pad_token_id, tokenizer.eos_token_id)
        for m_start in range(0, len(chunk), args.micro_batch_size):
            part = batch.rows(slice(m_start, m_start + args.micro_batch_size))
            pr = pack_rollouts(part, device)
            # (N,): one per response token of the micro-batch
            kl = token_kl(response_logits(policy, pr, args.bf16),
                          response_logits(ref, pr, args.bf16), args.temperature)
            sums["kl"] += kl.sum().item()
            score = rm_scores(rm, pr, args.bf16).float().cpu()  # (b,)
            sums["score"] += score.sum().item()
            scores.append(score)
            gold = gold_scores(part.prompts, response_texts(part, tokenizer))
            has_gold = has_gold and gold is not None
            sums["gold"] += sum(gold) if gold is not None else 0.0
            golds.extend(gold or [])
            sums["response_len"] += part.response_mask.sum().item()
            sums["eos_rate"] += part.ended.float().sum().item()
            sums["count"] += len(part.prompts)
    distributed.reshard(policy, ref, rm)
    totals = {k: distributed.all_reduce_sum(v, world) for k, v in sums.items()}
    out = {f"eval_{k}": totals[k] / totals["count"]
           for k in sums if k != "count" and (k != "gold" or has_gold)}
    out["eval_sqrt_kl"] = max(out["eval_kl"], 0.0) ** 0.5
    # gold in float64: two equal gold rewards stay equal, two different ones stay apart
    gold_tensor = torch.tensor(golds, dtype=torch.float64) if has_gold and golds else None
    onpolicy = onpolicy_sums(torch.cat(scores) if scores else torch.zeros(0), gold_tensor,
                             args.eval_samples)
    onpolicy = {k: distributed.all_reduce_sum(v, world) for k, v in onpolicy.items()}
    out.update(onpolicy_metrics(onpolicy, has_gold))
    return out


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------
def response_texts(batch: Rollouts, tokenizer) -> list[str]:
    """Decoded responses without the EOS (the testbed's gold reward and the printed samples read
    plain text)."""
    texts = []
    for row, n in zip(batch.response.tolist(), batch.response_mask.sum(1).tolist()):
        ids = row[:n]
        texts.append(tokenizer.decode(ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id
                                      else ids))
    return texts


def rollout_metrics(batch: Rollouts, exp: dict[str, torch.Tensor], texts: list[str],
                    world: int) -> dict[str, float]:
    """Means over the rollouts of all ranks (every rank has the same number of rollouts)."""
    mask = batch.response_mask.float()
    log_ratio = exp["ref_logprobs"] - exp["logprobs"]
    k3 = (log_ratio.exp() - 1 - log_ratio) * mask  # (B, R) k3 estimate of KL(π || π_ref) per token
    metrics = {"score": exp["raw_scores"].mean().item(),      # the RM's score before clipping
               "score_clipped": exp["scores"].mean().item(),  # normalised, clipped, missing-EOS
                                                              # penalty applied
               "kl_k1": exp["kl"].sum(1).mean().item(),       # per response (deliberate choice 9)
               "kl_k3": k3.sum(1).mean().item(),
               "total_reward": exp["rewards"].sum(1).mean().item(),
               "response_len": mask.sum(1).mean().item(),
               "eos_rate": batch.ended.float().mean().item()}
    gold = gold_scores(batch.prompts, texts)  # None when the prompts are not the testbed's
    if gold is not None:
        metrics["gold"] = sum(gold) / len(gold)
    metrics = distributed.all_reduce_mean(metrics, world)
    # token-level statistics over the whole global batch
    metrics["entropy"] = masked_mean(exp["entropy"], mask, world).item()
    var_returns = masked_mean((exp["returns"] - masked_mean(exp["returns"], mask, world)) ** 2,
                              mask, world)
    residual = exp["returns"] - exp["values"]
    var_residual = masked_mean((residual - masked_mean(residual, mask, world)) ** 2, mask, world)
    # 1: the critic predicts the returns exactly
    metrics["explained_var"] = (1 - var_residual / var_returns).item()
    return metrics


# --------------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(Args, argv)
    threads = common.configure_process(args.threads, args.tf32, args.deterministic)
    rank, world, device = distributed.init_distributed(args.dist_timeout)
    check(args.prompts_per_iteration % world == 0,
          f"--prompts-per-iteration {args.prompts_per_iteration} is not divisible by "
          f"world size {world}")
    rollouts_per_iteration = args.prompts_per_iteration * args.rollouts_per_prompt
    check(rollouts_per_iteration % args.mini_batch_size == 0,
          f"rollouts per iteration {rollouts_per_iteration} (= prompts x rollouts per prompt) is "
          f"not divisible by --mini-batch-size {args.mini_batch_size}")
    common.split_batch(args.mini_batch_size, args.micro_batch_size, world, "--mini-batch-size")
    common.seed_everything(args.seed, rank)  # seed + rank: every rank samples different responses

    # ---- tokenizers: the RM reads the policy's token ids, so both must be the same tokenizer ----
    args.policy = args.policy or args.sft
    for flag, path in (("--sft", args.sft), ("--policy", args.policy)):
        distributed.check_causal_lm(path, flag)
        distributed.check_positions(path, "--max-new-tokens", args.max_new_tokens, reserve=1)
        if args.max_prompt_len > 0:  # a rollout is at most a capped prompt and its response
            distributed.check_positions(path, "--max-prompt-len + --max-new-tokens",
                                        args.max_prompt_len + args.max_new_tokens)
    # an SFT checkpoint here would be PPO against a random head
    distributed.check_reward_model(args.rm, "--rm")
    tokenizer = AutoTokenizer.from_pretrained(args.sft)
    for path in (args.policy, args.rm):
        other = AutoTokenizer.from_pretrained(path)
        same_specials = ((tokenizer.eos_token_id, tokenizer.pad_token_id)
                         == (other.eos_token_id, other.pad_token_id))
        check(tokenizer.get_vocab() == other.get_vocab() and same_specials,
              f"{path}: its tokenizer differs from the SFT model's ({args.sft}); PPO feeds the "
              f"policy's token ids to the reference, the RM and the critic, so all must share one "
              f"tokenizer (train them from this SFT)")
    check(tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id,
          f"{args.sft}: the tokenizer needs a PAD token distinct from EOS (responses are cut at "
          "the first EOS)")
    prompts = data.read_prompts(args.prompts, args.data_format)
    eval_prompts = (data.read_prompts(args.eval_prompts, args.data_format) if args.eval_prompts
                    else [])
    check(not eval_prompts or len(eval_prompts) >= world,
          f"{args.eval_prompts}: {len(eval_prompts)} prompts, fewer than the {world} processes")
    state = distributed.resume_state(args) if args.resume else None  # None: start from scratch
    critic_path = os.path.join(args.out, "critic")
    # the critic is saved just before the policy: a crash between the two saves leaves them apart
    if state:
        critic_step = torch.load(os.path.join(critic_path, distributed.TRAINER_STATE),
                                 weights_only=True, map_location="cpu")["step"]
        check(critic_step == state["step"],
              f"{args.out}: the critic was saved after iteration {critic_step}, the policy after "
              f"{state['step']} (a crash between the two saves); pass --overwrite to start again")
    common.prepare_output(args.out, args.overwrite, args.resume, state)

    # ---- models: policy and critic are trained; reference and RM are frozen.
    # Dropout off everywhere (choice 7) ----
    def load(cls, path: str, trained: bool, **overrides) -> torch.nn.Module:
        # the trained models in fp32 (the master weights), the frozen ones in bf16 under --bf16
        dtype = torch.bfloat16 if args.bf16 and not trained else torch.float32
        model = distributed.empty_model(cls, path, dtype, **overrides)  # meta device
        if world > 1:  # FSDP2: each decoder layer one unit (gathered for its forward), the root
            mp = distributed.fsdp_precision(args.bf16)  # --bf16: bf16 compute, fp32 master weights
            for layer in distributed.decoder_layers(model):
                fully_shard(layer, mp_policy=mp)
            fully_shard(model, mp_policy=mp)
        model = distributed.load_weights(model, path, world, device)  # rank 0 reads, broadcasts
        model.eval()
        if trained and args.grad_checkpointing:  # keep each layer's input only, recompute it
            distributed.checkpoint_activations(model)
            distributed.keep_layers_training(model)  # transformers checkpoints training layers only
        return model

    head = dict(num_labels=1, pad_token_id=tokenizer.pad_token_id)  # the RM's and critic's output
    policy = load(AutoModelForCausalLM, args.out if state else args.policy, trained=True)
    ref = load(AutoModelForCausalLM, args.sft, trained=False)
    rm = load(AutoModelForSequenceClassification, args.rm, trained=False, **head)
    critic = load(AutoModelForSequenceClassification, critic_path if state else args.rm,
                  trained=True, **head)
    ref.requires_grad_(False)
    rm.requires_grad_(False)
    policy_opt = torch.optim.AdamW(policy.parameters(), lr=args.policy_lr, betas=(0.9, 0.95),
                                   weight_decay=0.0)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, betas=(0.9, 0.95),
                                   weight_decay=0.0)
    optimizers = [(policy, policy_opt), (critic, critic_opt)]
    log = common.MetricsLog(os.path.join(args.out, "metrics.jsonl"))
    common.print0(f"ppo: {len(prompts)} prompts; per iteration {args.prompts_per_iteration} "
                  f"prompts x {args.rollouts_per_prompt} rollouts = {rollouts_per_iteration}, "
                  f"{args.ppo_epochs} epochs x {rollouts_per_iteration // args.mini_batch_size} "
                  f"mini-batches of {args.mini_batch_size}, {world} processes, "
                  f"{threads} thread(s) each; policy and critic {next(policy.parameters()).dtype} "
                  f"(trained), reference and RM {next(ref.parameters()).dtype} (frozen)")

    # ---- loop ----
    # the prompt order, the same on every rank; its generator also shuffles the mini-batches of
    # step 6
    prompt_order = common.Shuffled(len(prompts), args.prompts_per_iteration, args.seed,
                                   whole_batches=False)
    per_rank = args.prompts_per_iteration // world
    # --score-norm none; set from the first batch with --score-norm init
    score_mean, score_std = 0.0, 1.0
    start = 0
    # --resume: both optimisers, RNG states, prompt order and the score normalisation of the run
    if state:
        extra = distributed.restore_training_state(state, optimizers, world, rank,
                                                   order=prompt_order)
        start, score_mean, score_std = state["step"], extra["score_mean"], extra["score_std"]

    def save(iteration: int) -> None:
        """The critic into out/critic, then the policy into out/ (save_model carries out/critic
        over). With --save-every the policy's save also holds what --resume needs; the critic's
        records its iteration."""
        resumable = args.save_every > 0
        distributed.save_model(critic, tokenizer, critic_path, world, args,
                               {"step": iteration} if resumable else None)
        trainer_state = None
        if resumable:
            trainer_state = distributed.training_state(iteration, optimizers, world, log,
                                                       iteration == args.iterations,
                                                       order=prompt_order, score_mean=score_mean,
                                                       score_std=score_std)
        distributed.save_model(policy, tokenizer, args.out, world, args, trainer_state)

    def held_out_eval(iteration: int) -> None:
        """The over-optimisation curve: one evaluate_policy line in metrics.jsonl. It samples from
        its own random stream (seeded by --seed, the iteration and the rank), so the training run is
        the same with or without it."""
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(args.seed * 100_003 + iteration * 101 + rank)
            metrics = evaluate_policy(policy, ref, rm, tokenizer, eval_prompts, args, world, rank,
                                      device)
        log.log(iteration=iteration, **metrics)
        gold = f"gold {metrics['eval_gold']:.3f}, " if "eval_gold" in metrics else ""
        spread = f"; RM spread {metrics['eval_reward_spread']:.3f}"
        if "eval_onpolicy_acc" in metrics:  # testbed prompts: the RM vs the gold on π's samples
            spread += (f" (gold {metrics['eval_gold_spread']:.3f}), on-policy RM accuracy "
                       f"{metrics['eval_onpolicy_acc']:.3f} on {metrics['eval_onpolicy_pairs']} "
                       f"pairs")
        common.print0(f"eval @ {iteration}: {gold}score {metrics['eval_score']:.3f}, "
                      f"KL {metrics['eval_kl']:.3f} (sqrt {metrics['eval_sqrt_kl']:.3f}) on "
                      f"{len(eval_prompts)} held-out prompts{spread}")

    if eval_prompts and start == 0:
        held_out_eval(0)
    preemption = common.Preemption(args.save_every > 0, "ppo", args.out, distributed.NOT_RESUMABLE,
                                   unit="iteration")
    bar = common.progress(range(start, args.iterations), desc="ppo")
    for it in bar:
        # PPO step 1: this rank's share of the prompt batch, each repeated n times; sample the
        # rollouts
        batch_prompts = [prompts[i] for i in prompt_order.take()]
        # the n rollouts of a prompt are consecutive rows
        mine = [p for p in batch_prompts[rank * per_rank: (rank + 1) * per_rank]
                for _ in range(args.rollouts_per_prompt)]
        t0 = time.time()
        batch = rollout(policy, tokenizer, mine, args, world, device)
        t1 = time.time()
        # PPO steps 2-5 (the first iteration also fixes the score normalisation, choice 10)
        exp = make_experience(policy, ref, rm, critic, batch, args, world)
        if it == 0 and args.score_norm == "init":
            score_mean, score_std = score_stats(exp["raw_scores"], world)
            common.print0(f"score normalisation: the SFT policy's rollouts score {score_mean:.4f} "
                          f"+- {score_std:.4f}")
        compute_advantages(exp, batch, args, world, score_mean, score_std)
        t2 = time.time()
        # PPO step 6
        train = ppo_update(policy, critic, policy_opt, critic_opt, batch, exp, args, world,
                           prompt_order.generator)
        t3 = time.time()

        texts = response_texts(batch, tokenizer)
        metrics = rollout_metrics(batch, exp, texts, world)
        generated = distributed.all_reduce_sum(batch.response_mask.sum().item(), world)
        trained = (distributed.all_reduce_sum(batch.attention_mask.sum().item(), world)
                   * args.ppo_epochs)
        metrics.update(train, score_norm_mean=score_mean, score_norm_std=score_std)
        metrics.update(gen_s=t1 - t0, forward_s=t2 - t1, train_s=t3 - t2,
                       gen_tokens_per_s=generated / (t1 - t0),
                       train_tokens_per_s=trained / (t3 - t2))
        log.log(iteration=it + 1, **metrics)
        bar.set_postfix(score=f"{metrics['score']:.3f}", kl=f"{metrics['kl_k1']:.3f}")
        print_iteration(it, args, metrics, exp, batch, texts, (t0, t1, t2, t3))
        if eval_prompts and (common.due(args.eval_every, it + 1, args.iterations)
                             or it + 1 == args.iterations):
            held_out_eval(it + 1)
        stop = preemption.requested(world, it + 1, args.iterations)  # SIGINT / SIGTERM (collective)
        if common.due(args.save_every, it + 1, args.iterations) or stop:
            save(it + 1)
            preemption.stop(it + 1, args.iterations)  # SIGINT / SIGTERM: stop here, resumable

    # ---- save ----
    save(args.iterations)
    common.print0(f"saved {args.out} (policy) and {os.path.join(args.out, 'critic')} (critic)")


def print_iteration(it: int, args: Args, metrics: dict[str, float], exp: dict[str, torch.Tensor],
                    batch: Rollouts, texts: list[str],
                    times: tuple[float, float, float, float]) -> None:
    """One line of an iteration's metrics and, every --sample-every iterations, a few decoded
    rollouts with their score, KL and total (rank 0 prints)."""
    t0, t1, t2, t3 = times
    gold = f" gold {metrics['gold']:.3f}" if "gold" in metrics else ""
    common.print0(f"it {it + 1}/{args.iterations} score {metrics['score']:.3f}{gold} "
                  f"kl {metrics['kl_k1']:.4f} (k3 {metrics['kl_k3']:.4f}) "
                  f"ent {metrics['entropy']:.3f} len {metrics['response_len']:.1f} "
                  f"eos {metrics['eos_rate']:.2f} clipfrac {metrics['clipfrac']:.3f} "
                  f"approx_kl {metrics['approx_kl']:.4f} vloss {metrics['value_loss']:.4f} "
                  f"ev {metrics['explained_var']:.2f} | gen {t1 - t0:.1f}s fwd {t2 - t1:.1f}s "
                  f"train {t3 - t2:.1f}s")
    if args.sample_every > 0 and (it + 1) % args.sample_every == 0:
        for i in range(0, len(texts), args.rollouts_per_prompt)[: args.samples_to_print]:
            score, kl = exp["scores"][i].item(), exp["kl"][i].sum().item()
            common.print0(f"  [{score:+.3f} score, {kl:.3f} kl, {score - args.kl_coef * kl:+.3f} "
                          f"total] {batch.prompts[i]!r} -> {texts[i]!r}")


if __name__ == "__main__":
    common.run_main(main)
