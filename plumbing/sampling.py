"""Sampling: responses from a policy, batched with the KV cache, for the meta set S, PPO rollouts
and evaluation.

Nothing in here is part of the method. Prompts are tokenised by `data.prompt_ids` exactly as in
training, so a policy samples after the same ids the reward model later reads.

- `generate`        one response per prompt, as token ids: (prompt_ids (B, P) left-padded,
                    response_ids (B, R)); under FSDP2 on the whole, gathered model (`unsharded`)
- `truncate_at_eos` each response kept up to and including its first EOS, the rest made pad
- `sample_texts`    one decoded response per prompt, the prompts spread over the processes
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from plumbing.common import autocast
from plumbing.data import pad, prompt_ids
from plumbing.distributed import decoder_layers, reshard


@contextlib.contextmanager
def unsharded(model: torch.nn.Module) -> Iterator[None]:
    """FSDP2: keep the whole model gathered for a generate call. A sharded decoder layer is
    all-gathered for its forward and freed after it (reshard_after_forward), which under `generate`
    means every layer all-gathered again for every new token; here each layer stays gathered after
    its first forward, and all are freed when the block ends. Costs the whole model's parameters in
    the compute dtype on every process for the length of the call. No-op on a plain module."""
    from torch.distributed.fsdp import FSDPModule

    layers = [m for m in decoder_layers(model) if isinstance(m, FSDPModule)]
    for layer in layers:
        layer.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_reshard_after_forward(True, recurse=False)
            layer.reshard()
        reshard(model)  # the root, which FSDP2 keeps gathered after a forward


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, prompts: list[str], *, max_new_tokens: int,
             temperature: float = 0.8, top_p: float = 0.9, repetition_penalty: float = 1.1,
             do_sample: bool = True, world: int = 1, chat_template: str = "auto",
             bf16: bool = False, max_prompt_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one response per prompt (batched, with the KV cache) -> (prompt_ids, response_ids).

    Prompts are tokenised by `prompt_ids` (the chat template where `chat_template` says so), as in
    training.

    prompt_ids   (B, P) left-padded with pad_token_id (so every prompt ends at the same column)
    response_ids (B, R) R <= max_new_tokens; each response is cut right after its first EOS, the
                 rest is pad

    `max_prompt_len` > 0 keeps the last that many tokens of a longer prompt (the start goes first,
    as data.encode cuts). `bf16`: under bf16 autocast, as the stages' training forwards.

    Under FSDP2 every rank must run the same number of forward passes (each is collective), so
    `synced_gpus=True` keeps a rank whose samples all hit EOS stepping until every rank is done;
    the model stays gathered for the call (`unsharded`).
    """
    device = next(model.parameters()).device
    ids = [prompt_ids(tokenizer, p, chat_template) for p in prompts]
    if max_prompt_len > 0:
        ids = [x[-max_prompt_len:] for x in ids]
    input_ids, attention_mask = pad(ids, tokenizer.pad_token_id, side="left")
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    kwargs: dict[str, Any] = dict(do_sample=do_sample, max_new_tokens=max_new_tokens,
                                  use_cache=True, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id,
                                  repetition_penalty=repetition_penalty, synced_gpus=world > 1)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    with unsharded(model), autocast(device, bf16):
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    response = out[:, input_ids.shape[1]:]
    return input_ids, truncate_at_eos(response, tokenizer.eos_token_id, tokenizer.pad_token_id)


def truncate_at_eos(response: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Keep each row up to and including its first EOS; everything after it becomes pad.
    (B, R) -> (B, R)."""
    is_eos = response == eos_id
    # after_eos[b, t] is True when an EOS occurred strictly before t
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return response.masked_fill(after_eos, pad_id)


def sample_texts(model: torch.nn.Module, tokenizer: Any, prompts: list[str], *, max_new_tokens: int,
                 world: int, rank: int, batch_size: int = 64,
                 **sampling: Any) -> tuple[list[str], list[bool]]:
    """Sample one response per prompt, prompts spread over ranks; every rank gets all
    (text, ended_with_eos).

    Each rank takes prompts[rank::world]; the list is first padded (repeating its last prompt) to a
    multiple of the world size so every rank runs the same number of generate calls (FSDP2 forwards
    are collective)."""
    n = len(prompts)
    padded = prompts + [prompts[-1]] * ((-n) % world)
    mine = padded[rank::world]
    texts: list[str] = []
    ended: list[bool] = []
    for i in range(0, len(mine), batch_size):
        _, resp = generate(model, tokenizer, mine[i: i + batch_size], max_new_tokens=max_new_tokens,
                           world=world, **sampling)
        for row in resp.tolist():
            ended.append(tokenizer.eos_token_id in row)
            texts.append(tokenizer.decode([t for t in row if t not in (tokenizer.eos_token_id,
                                                                      tokenizer.pad_token_id)]))
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (texts, ended))
        texts = [gathered[i % world][0][i // world] for i in range(len(padded))]
        ended = [gathered[i % world][1][i // world] for i in range(len(padded))]
    return texts[:n], ended[:n]


def sample_report(model: torch.nn.Module, tokenizer: Any, prompts: list[str], *,
                  max_new_tokens: int, world: int, rank: int, chat_template: str = "auto",
                  bf16: bool = False,
                  gold: Callable[[list[str], list[str]], list[float] | None] | None = None
                  ) -> dict[str, float]:
    """What a trained policy answers (sft.py, dpo.py after training): one sampled response per
    held-out prompt (PPO's sampling settings) -> the share that end with EOS, their mean length in
    words and, when `gold` scores them (the testbed's gold_scores; None for other prompts), their
    mean gold reward."""
    model.eval()
    texts, ended = sample_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                world=world, rank=rank, chat_template=chat_template, bf16=bf16)
    report = {"eos_rate": sum(ended) / len(ended),
              "mean_response_words": sum(len(t.split()) for t in texts) / len(texts)}
    scores = gold(prompts, texts) if gold is not None else None
    if scores is not None:
        report["gold_reward"] = sum(scores) / len(scores)
    return report
