"""Packing: a batch of sequences laid end to end in a few rows, so no FLOP is spent on padding
(issue 15).

Nothing in here is part of the method. A right-padded (B, T) batch computes every layer on B·T
tokens; with real preference data half of them are padding (mean length far below the longest).
Packed, the same sequences fill rows of at most `capacity` tokens, and the model computes on
(rows · C) ≈ Σ lengths tokens instead.

It is exact, not an approximation: transformers (5.x) reads packed rows from `position_ids` alone —
positions restart at 0 at every sequence, and with `attention_mask=None` and no cache
`masking_utils` turns every restart into the boundary of a block-diagonal causal mask
(`find_packed_sequence_indices`), for SDPA and eager attention alike. So a token attends to the
tokens of its own sequence and nothing else, sees the same rotary positions as in the padded batch,
and every per-token output equals the padded one up to float rounding (the matmuls sum the same
terms over rows of another shape). tests/test_packing.py holds every stage's packed loss and
gradient to the padded one. The block-diagonal mask is materialised per row, so attention costs
O(C²) per row and Σ lengths · C in all. `pack` therefore picks the row length C from two candidates,
the longest sequence L (attention per row as in the padded batch) and 2L (fewer tail tokens when
many sequences are longer than L / 2), by the smaller computed tokens x (1 + C / ATTENTION_TOKENS).
Measured on a tiny Llama RM step (32 sequences, fp32, 1 thread): realistic lengths (mean 50,
longest 147; 55 % padding): 1.8–2.1x faster than padded at C = L (the rule's pick), 1.8–2.2x at 2L,
1.5–1.7x at 4L; the testbed's short, even lengths (mean 25, longest 38; 28 % padding): 1.02–1.06x
at L (two sequences of 20+ tokens never share a row), 1.09–1.24x at 2L (the pick), 0.92–1.13x at 4L;
PPO-like lengths with 5 % padding: 0.97x at L (the pick), 0.90x at 2L. ATTENTION_TOKENS fits that
last case (2L cost 8.5 % more for the same tokens); for larger models attention is a smaller share,
so the rule errs towards C = L.

- `pack`      lists of ids -> `Packed` (rows, C) with position ids and where each sequence sits
- `hidden`    the final (normed) hidden state of every packed token, (rows · C, d): the caller reads
              only the positions it needs (the EOS for a reward, the response tokens for log-probs
              and values) and applies the model's head there, so the head never runs on padding or
              on prompt tokens either
- `Packed.last`, `Packed.spans`  flat indices (row · C + column) of each sequence's last token / of
                                 a range of it
- `response_logprobs`  Σ log π(y_t | x, y_<t) over each sequence's response tokens: what DPO needs

How a stage uses it (reward.packed_rewards, sft.packed_loss_sum, ppo.pack_rollouts are the three
readers):
    packed = pack(seqs, pad_id)         # inside one micro-batch, so the data order is unchanged
    h = hidden(model, packed)           # (rows · C, d), under autocast as the stage's forward was
    r = model.score(h[packed.last])     # a reward at each EOS, or: the LM head where it is needed
dpo.py (issue 12; not on this branch): pack the 2n sequences prompt + chosen + EOS and
prompt + rejected + EOS of a micro-batch once (`seqs = chosen + rejected`), and take the policy's
and, under no_grad, the reference's `response_logprobs(model, packed, n_prompt)` with n_prompt the
prompt length of each sequence (data.encode's second value) — (2n,) summed log-probs in the order of
`seqs`, rows 0..n-1 chosen; the DPO loss reads them unchanged.
Test it as tests/test_packing.py does: the loss and gradient against the right-padded batch, fp32.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch


@dataclasses.dataclass
class Packed:
    """Sequences packed into rows. Sequence i sits in row starts[i] // C from column starts[i] % C
    on, lengths[i] tokens; the rest of each row is pad tokens at positions 0, 1, ... of their own
    (a block nobody reads)."""
    input_ids: torch.Tensor     # (rows, C)
    position_ids: torch.Tensor  # (rows, C) 0, 1, ... restarting at every sequence
    starts: torch.Tensor        # (S,) flat index row · C + column of each sequence's first token
    lengths: torch.Tensor       # (S,)

    @property
    def last(self) -> torch.Tensor:
        """(S,) flat index of each sequence's last token (the EOS that data.encode appends)."""
        return self.starts + self.lengths - 1

    def spans(self, first: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Flat indices of tokens first[i] .. first[i] + count[i] − 1 of every sequence i,
        concatenated in sequence order: (Σ count,). The order is that of a boolean mask over a
        (S, max count) grid, row by row, so `grid[mask] = values` puts them back
        (ppo.scatter_rows)."""
        offsets = torch.repeat_interleave(self.starts + first, count)
        within = (torch.arange(int(count.sum()), device=count.device)
                  - torch.repeat_interleave(count.cumsum(0) - count, count))
        return offsets + within

    def to(self, device: torch.device) -> Packed:
        return Packed(*(t.to(device)
                        for t in (self.input_ids, self.position_ids, self.starts, self.lengths)))

    @property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def computed_tokens(self) -> int:
        return self.input_ids.numel()


# row length at which a token's attention costs as much as the rest of its layer (fitted)
ATTENTION_TOKENS = 512


def first_fit(lengths: list[int], capacity: int) -> tuple[list[tuple[int, int]], list[int]]:
    """First-fit decreasing: the longest sequence first, each into the first row with room for it.
    Returns (row, column) of every sequence and the tokens used per row. Deterministic
    (ties by position)."""
    fill: list[int] = []
    where: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = next((r for r, used in enumerate(fill) if used + lengths[i] <= capacity), len(fill))
        if row == len(fill):
            fill.append(0)
        where[i] = (row, fill[row])
        fill[row] += lengths[i]
    return where, fill


def pack(seqs: list[list[int]], pad_id: int, capacity: int | None = None) -> Packed:
    """Pack `seqs` into rows of at most `capacity` tokens (default: the longest sequence or twice
    that, whichever the cost rule of the module docstring prefers), first fit decreasing; rows are
    cut to the fullest row's length. The order of `seqs` is what `starts` keeps."""
    lengths = [len(s) for s in seqs]
    assert lengths and min(lengths) > 0, "pack: every sequence needs at least one token"
    candidates = [max(capacity, max(lengths))] if capacity else [max(lengths), 2 * max(lengths)]
    cost = lambda fill: len(fill) * max(fill) * (1 + max(fill) / ATTENTION_TOKENS)
    where, fill = min((first_fit(lengths, c) for c in candidates), key=lambda wf: cost(wf[1]))
    C = max(fill)
    ids = torch.full((len(fill), C), pad_id, dtype=torch.long)
    positions = torch.empty((len(fill), C), dtype=torch.long)
    for r, used in enumerate(fill):
        positions[r, used:] = torch.arange(C - used)  # the tail: a block of its own, never read
    for s, (r, c) in zip(seqs, where):
        ids[r, c: c + len(s)] = torch.tensor(s, dtype=torch.long)
        positions[r, c: c + len(s)] = torch.arange(len(s))
    starts = torch.tensor([r * C + c for r, c in where], dtype=torch.long)
    return Packed(ids, positions, starts, torch.tensor(lengths, dtype=torch.long))


def hidden(model: torch.nn.Module, packed: Packed,
           call: Callable[..., Any] | None = None) -> torch.Tensor:
    """The final hidden state (after the last norm) of every packed token: (rows · C, d). Runs the
    *root* forward (under FSDP2 the root's pre-forward hook gathers the embeddings, final norm and
    head, which stay unsharded until backward, so the caller may apply
    `model.score` / `model.lm_head` to the result; docs/design.md §9). `call` replaces `model(...)`
    (meta_rm: torch.func.functional_call at other parameters). A causal LM is asked for the logits
    of one column only (`logits_to_keep=1`): the caller applies the head where it needs it."""
    kwargs: dict[str, Any] = dict(input_ids=packed.input_ids, position_ids=packed.position_ids,
                                  use_cache=False, output_hidden_states=True)
    if hasattr(model, "lm_head"):
        kwargs["logits_to_keep"] = 1
    # attention_mask=None: the packed rows' mask comes from position_ids
    out = (call or model)(**kwargs)
    return out.hidden_states[-1].flatten(0, 1)


def response_logprobs(model: torch.nn.Module, packed: Packed,
                      n_prompt: torch.Tensor) -> torch.Tensor:
    """Σ_t log π(y_t | x, y_<t) over each packed sequence's tokens after its first n_prompt[i]
    (its response and EOS), for a causal LM: (S,), in the order of the packed sequences. The LM head
    runs only on the positions that predict a response token. Differentiable (the policy) or under
    no_grad (a reference model)."""
    n_prompt = n_prompt.to(packed.lengths.device)
    count = packed.lengths - n_prompt                     # response tokens of each sequence
    idx = packed.spans(n_prompt - 1, count)               # the position that predicts each of them
    targets = packed.input_ids.flatten()[idx + 1]
    logits = model.lm_head(hidden(model, packed)[idx]).float()  # (N, V)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    owner = torch.repeat_interleave(torch.arange(len(count), device=logp.device),
                                    count.to(logp.device))
    return torch.zeros(len(count), dtype=logp.dtype, device=logp.device).index_add(0, owner, logp)
