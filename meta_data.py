"""MetaRM's meta set S: k responses per prompt sampled from the current policy (§3, rounds).

Round r ≥ 1 of the paper's procedure builds S_r by sampling k = 5 responses for each training prompt
from the latest policy (round 1: the SFT model; later: the previous round's PPO policy). No labels:
Eq. (2) only needs the RM's rewards of the k samples. A held-out part of the prompts is kept apart
for the reward-gap statistics (Fig. 1, 5).

Output, in --out:
    meta_train.jsonl    {prompt, responses: [k strings]}    the S that meta_rm.py trains with
    meta_heldout.jsonl  {prompt, responses: [k strings]}    held-out prompts (disjoint), for
                                                            evaluation only
    oracle_pairs.jsonl  {prompt, chosen, rejected}          with --oracle-pairs (testbed only): the
                                                            train prompts' responses, two by two,
                                                            labelled by the testbed's annotator
                                                            (testbed.label_meta_set)
    oracle_pairs_matched.jsonl                              with --oracle-pairs: a cycle of k
                                                            pairs per prompt, one label per sample

Commands
    python meta_data.py                                    # the testbed's SFT policy, 1 process
    torchrun --standalone --nproc_per_node=2 meta_data.py  # prompts split over 2 processes (FSDP2)

Choices (the paper gives k = 5 and allows a slightly higher temperature than PPO's 0.8 so that
samples differ)
  1. Default temperature 1.0, top-p 0.9, repetition penalty 1.1 (PPO's nucleus settings, hotter).
  2. The held-out split is by prompt, drawn with the seed before sampling; the same seed and world
     size give the same file (each process samples with seed + rank).
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer

from plumbing import common, data, distributed, sampling
from plumbing.common import (arg, at_least, check, in_unit_above_0, non_negative, or_sentinel,
                             positive)
from plumbing.data import CHAT_TEMPLATE_HELP, CHAT_TEMPLATE_MODES, DATA_FORMAT_HELP, DATA_FORMATS
from testbed.gold import gold_scores, label_meta_set, parse_prompt


@dataclasses.dataclass
class Args:
    policy: str = arg("runs/testbed/sft", "policy checkpoint to sample from (SFT or a PPO policy)")
    prompts: str = arg("runs/testbed/data/rl_prompts.jsonl",
                       "prompts, JSONL {prompt}, or any public format (--data-format; OOD variant: "
                       "OASST1 / PKU prompts)")
    data_format: str = arg("auto", DATA_FORMAT_HELP + " (for --prompts)", choices=DATA_FORMATS)
    chat_template: str = arg("auto", CHAT_TEMPLATE_HELP, choices=CHAT_TEMPLATE_MODES)
    out: str = arg("runs/testbed/meta_set",
                   "output folder for meta_train.jsonl and meta_heldout.jsonl")
    k: int = arg(5, "responses sampled per prompt (paper: 5); at least 2",
                 valid=at_least(2, "the difference loss compares responses"))
    max_prompts: int = arg(-1, "use only the first N prompts (-1 = all)",
                           valid=or_sentinel(-1, "all"))
    heldout: int = arg(64, "prompts kept out of meta_train.jsonl for the reward-gap evaluation",
                       valid=non_negative)
    temperature: float = arg(1.0, "sampling temperature (PPO uses 0.8; a little hotter so "
                                  "samples differ)", valid=positive)
    top_p: float = arg(0.9, "nucleus sampling: keep the smallest token set with this "
                            "much probability", valid=in_unit_above_0)
    repetition_penalty: float = arg(1.1, "repetition penalty (paper's PPO sampling: 1.1)",
                                    valid=positive)
    max_new_tokens: int = arg(48, "maximum new tokens per response", valid=positive)
    batch_size: int = arg(64, "sequences per generate call on one process (prompts x k)",
                          valid=positive)
    bf16: bool = arg(False, "bf16: generate under bf16 autocast, and under FSDP2 with bf16 "
                            "parameters; fp32 is the reference")
    seed: int = arg(0, "random seed (held-out split, sampling, the oracle's labels)",
                    valid=common.seed)
    threads: int = arg(0, common.THREADS_HELP, valid=non_negative)
    tf32: bool = arg(False, common.TF32_HELP)
    deterministic: bool = arg(False, common.DETERMINISTIC_HELP)
    dist_timeout: float = arg(60.0, distributed.DIST_TIMEOUT_HELP, valid=positive)
    oracle_pairs: bool = arg(False, "testbed only: also write oracle_pairs.jsonl, every two "
                                    "responses of each meta_train prompt labelled by the "
                                    "testbed's Bradley-Terry annotator (the study's oracle arm: "
                                    "fresh labels on the current policy's samples), and "
                                    "oracle_pairs_matched.jsonl, a cycle of k pairs per prompt "
                                    "(as many labels as meta samples: the matched oracle)")
    oracle_tau: float = arg(1.0, "τ of that annotator, P(a > b) = sigmoid((gold_a - gold_b) / τ); "
                                 "use the testbed's --label-noise", valid=positive)
    overwrite: bool = arg(False, "replace existing output files")


def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(Args, argv)
    common.configure_process(args.threads, args.tf32, args.deterministic)
    rank, world, device = distributed.init_distributed(args.dist_timeout)
    check(args.batch_size >= args.k, f"--batch-size {args.batch_size} must hold at least the "
                                     f"k = {args.k} samples of one prompt")
    distributed.check_causal_lm(args.policy, "--policy")
    distributed.check_positions(args.policy, "--max-new-tokens", args.max_new_tokens, reserve=1)
    prompts = data.read_prompts(args.prompts, args.data_format)
    if args.max_prompts > 0:
        prompts = prompts[: args.max_prompts]
    check(0 <= args.heldout < len(prompts),
          f"--heldout {args.heldout} must be below the {len(prompts)} prompts")
    check(not args.oracle_pairs or all(parse_prompt(p) is not None for p in prompts),
          f"--oracle-pairs: {args.prompts} holds prompts that are not the testbed's (the oracle "
          "needs its gold reward)")
    check(args.oracle_tau > 0, "--oracle-tau must be positive")
    common.prepare_output(args.out, args.overwrite)
    common.seed_everything(args.seed, rank)

    # held-out split by prompt, the same on every rank
    order = torch.randperm(len(prompts),
                           generator=torch.Generator().manual_seed(args.seed)).tolist()
    heldout = set(order[: args.heldout])

    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    # the architecture on the meta device
    model = distributed.empty_model(AutoModelForCausalLM, args.policy)
    if world > 1:  # FSDP2: each decoder layer one unit (gathered for its forward), then the root
        mp = distributed.fsdp_precision(args.bf16)  # --bf16: bf16 compute, fp32 master weights
        for layer in distributed.decoder_layers(model):
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    # rank 0 reads, broadcasts the shards
    model = distributed.load_weights(model, args.policy, world, device)
    model.eval()
    # each prompt repeated k times, so one generate call samples all k responses of several
    # prompts at once
    per_call = args.batch_size // args.k
    responses: list[str] = []
    bar = common.progress(total=len(prompts), desc=f"sampling S (k = {args.k})")
    for start in range(0, len(prompts), per_call * world):
        chunk = prompts[start: start + per_call * world]
        texts, _ = sampling.sample_texts(model, tokenizer,
                                         [p for p in chunk for _ in range(args.k)],
                                         max_new_tokens=args.max_new_tokens, world=world,
                                         rank=rank, batch_size=args.batch_size,
                                         temperature=args.temperature, top_p=args.top_p,
                                         repetition_penalty=args.repetition_penalty,
                                         chat_template=args.chat_template, bf16=args.bf16)
        responses += texts
        bar.update(len(chunk))
    bar.close()

    records = [{"prompt": p, "responses": responses[i * args.k: (i + 1) * args.k]}
               for i, p in enumerate(prompts)]
    if common.is_main():
        data.write_jsonl(os.path.join(args.out, "meta_train.jsonl"),
                         [r for i, r in enumerate(records) if i not in heldout])
        data.write_jsonl(os.path.join(args.out, "meta_heldout.jsonl"),
                         [r for i, r in enumerate(records) if i in heldout])
        if args.oracle_pairs:
            oracle = label_meta_set([r for i, r in enumerate(records) if i not in heldout],
                                    args.oracle_tau, args.seed)
            data.write_jsonl(os.path.join(args.out, "oracle_pairs.jsonl"), oracle)
            # the matched oracle control: one gold label per meta sample (a cycle of k pairs)
            matched = label_meta_set([r for i, r in enumerate(records) if i not in heldout],
                                     args.oracle_tau, args.seed + 1, matched=True)
            data.write_jsonl(os.path.join(args.out, "oracle_pairs_matched.jsonl"), matched)
            common.print0(f"wrote {len(oracle)} gold-labelled pairs to "
                          f"{args.out}/oracle_pairs.jsonl and {len(matched)} (one per sample) to "
                          "oracle_pairs_matched.jsonl")
        common.save_args(args, args.out)
        distinct = sum(len(set(r["responses"])) for r in records) / len(records)
        common.print0(f"wrote {len(records) - len(heldout)} train + {len(heldout)} held-out "
                      f"prompts x k = {args.k} to {args.out} ({distinct:.2f} distinct responses "
                      "per prompt on average)")
        stats = {"prompts": len(records), "k": args.k, "distinct_per_prompt": distinct}
        gold = gold_scores([r["prompt"] for r in records for _ in range(args.k)],
                                   [s for r in records for s in r["responses"]])
        if gold is not None:
            stats["gold_mean"] = sum(gold) / len(gold)
            common.print0(f"mean gold reward of the samples: {stats['gold_mean']:.3f}")
        with open(os.path.join(args.out, "stats.json"), "w") as f:
            json.dump(stats, f, indent=2)
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    common.run_main(main)
