"""Best-of-n under the proxy RM: the over-optimisation sanity check (Gao, Schulman & Hilton 2022).

Sample N responses per held-out prompt from a policy (the SFT model), score each with the proxy RM
and with the testbed's hidden gold reward, and report, for n = 1, 2, 4, ..., N, the gold and proxy
reward of the response the proxy ranks first among n. Best-of-n is the simplest optimiser of a
proxy: if even it shows no gold gain at small n, PPO against that proxy cannot either; if its gold
curve turns down at large n while the proxy keeps rising, the proxy can be over-optimised. The KL of
the best-of-n policy from the sampling policy has a closed form,
KL_bon(n) = log n − (n − 1) / n (nats), so the curve can be drawn against √KL like PPO's.

The expected value over random subsets (not one draw): with the N samples of a prompt sorted by
proxy score ascending, the i-th (1-based) is the proxy's choice from a uniformly random n-subset
with probability C(i − 1, n − 1) / C(N, n) (it must be in the subset and the other n − 1 members
must be among the i − 1 below it), so
E[gold of the choice] = Σ_i gold_(i) C(i − 1, n − 1) / C(N, n) — every n from the same N samples,
without resampling noise (`expected_best_of_n`).

Commands
    python -m study.best_of_n --policy runs/testbed/sft --rm runs/testbed/rm --out runs/testbed/bon
    torchrun --standalone --nproc_per_node=2 -m study.best_of_n ...   # sampling and scoring
                                                                        over 2 processes

Output: OUT/results.json {"n": [...], "gold": [...], "proxy": [...], "kl": [...], "sqrt_kl": [...]}
and args.json.

Choices
  1. Samples use PPO's sampler (T 0.8, top-p 0.9, repetition penalty 1.1), the distribution PPO
     starts from.
  2. Ties in the proxy score (identical responses) are broken by sample order; with float scores
     they only occur for identical texts, whose gold rewards are equal too, so the order does not
     change the result.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import reward
from plumbing import common, data, distributed, sampling
from plumbing.common import arg, check, in_unit_above_0, non_negative, or_sentinel, positive
from plumbing.data import CHAT_TEMPLATE_HELP, CHAT_TEMPLATE_MODES, DATA_FORMAT_HELP, DATA_FORMATS
from testbed.gold import gold_scores


@dataclasses.dataclass
class Args:
    policy: str = arg("runs/testbed/sft",
                      "the policy to sample from (the SFT model: best-of-n's starting point)")
    rm: str = arg("runs/testbed/rm",
                  "the proxy reward model that picks the best of n (reward.py output)")
    prompts: str = arg("runs/testbed/data/eval_prompts.jsonl", "held-out prompts, JSONL {prompt}")
    data_format: str = arg("auto", DATA_FORMAT_HELP + " (for --prompts)", choices=DATA_FORMATS)
    chat_template: str = arg("auto", CHAT_TEMPLATE_HELP, choices=CHAT_TEMPLATE_MODES)
    out: str = arg("runs/testbed/bon", "output folder: results.json, args.json")
    samples: int = arg(64, "samples per prompt N; results for n = 1, 2, 4, ... up to N (not --n: "
                           "torchrun would take that for an abbreviation of its own --nnodes)",
                       valid=positive)
    max_prompts: int = arg(-1, "use only the first N prompts (-1 = all)",
                           valid=or_sentinel(-1, "all"))
    temperature: float = arg(0.8, "sampling temperature (PPO's, paper: 0.8)", valid=positive)
    top_p: float = arg(0.9, "nucleus sampling mass (paper: 0.9)", valid=in_unit_above_0)
    repetition_penalty: float = arg(1.1, "repetition penalty (paper: 1.1)", valid=positive)
    max_new_tokens: int = arg(64, "maximum response tokens", valid=positive)
    max_len: int = arg(512, "maximum tokens of prompt + response when the RM scores them",
                       valid=positive)
    batch_size: int = arg(64, "sequences per generate call / RM forward on one process",
                          valid=positive)
    seed: int = arg(0, "random seed of the sampling (seed + rank)", valid=common.seed)
    threads: int = arg(0, common.THREADS_HELP, valid=non_negative)
    tf32: bool = arg(False, common.TF32_HELP)
    deterministic: bool = arg(False, common.DETERMINISTIC_HELP)
    dist_timeout: float = arg(60.0, distributed.DIST_TIMEOUT_HELP, valid=positive)
    bf16: bool = arg(False, "bf16 autocast for sampling and scoring; fp32 is the reference")
    overwrite: bool = arg(False, "replace an existing output folder")


def expected_best_of_n(proxy: torch.Tensor, gold: torch.Tensor, n: int) -> tuple[float, float]:
    """(E[gold], E[proxy]) of the proxy's choice among a uniformly random n-subset of each prompt's
    N samples, averaged over prompts. proxy, gold: (prompts, N). Exact (see the module docstring).
    """
    P, N = proxy.shape
    order = torch.argsort(proxy, dim=1, stable=True)                       # ascending proxy score
    gold_sorted = torch.gather(gold, 1, order).double()                    # (P, N)
    proxy_sorted = torch.gather(proxy, 1, order).double()
    # weight of the i-th lowest (0-based i): C(i, n − 1) / C(N, n); zero for i < n − 1
    weights = torch.tensor([math.comb(i, n - 1) / math.comb(N, n) for i in range(N)],
                           dtype=torch.float64)
    return (gold_sorted @ weights).mean().item(), (proxy_sorted @ weights).mean().item()


def kl_best_of_n(n: int) -> float:
    """KL(π_bon ‖ π) = log n − (n − 1) / n nats, the closed form of Stiennon et al. (2020) used by
    Gao et al."""
    return math.log(n) - (n - 1) / n


def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(Args, argv)
    common.configure_process(args.threads, args.tf32, args.deterministic)
    rank, world, device = distributed.init_distributed(args.dist_timeout)
    distributed.check_causal_lm(args.policy, "--policy")
    distributed.check_positions(args.policy, "--max-new-tokens", args.max_new_tokens, reserve=1)
    distributed.check_reward_model(args.rm, "--rm")  # a causal LM would pick with a random head
    distributed.check_reward_tokenizer(args.rm, "--rm")
    distributed.check_positions(args.rm, "--max-len", args.max_len)
    prompts = data.read_prompts(args.prompts, args.data_format)
    prompts = prompts[: args.max_prompts] if args.max_prompts > 0 else prompts
    check(gold_scores(prompts[:1], [""]) is not None,
          f"{args.prompts}: not the testbed's prompts; best-of-n needs the gold reward to be "
          "worth running")
    common.prepare_output(args.out, args.overwrite)
    common.seed_everything(args.seed, rank)

    # ---- N samples per prompt from the policy ----
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    policy = distributed.load_model(AutoModelForCausalLM, args.policy, world, device)  # FSDP2 > 1
    policy.eval()
    # prompt-major: row i·N + j: sample j of prompt i
    repeated = [p for p in prompts for _ in range(args.samples)]
    texts, _ = sampling.sample_texts(policy, tokenizer, repeated,
                                     max_new_tokens=args.max_new_tokens, world=world, rank=rank,
                                     batch_size=args.batch_size, temperature=args.temperature,
                                     top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                                     chat_template=args.chat_template, bf16=args.bf16)
    del policy

    # ---- proxy and gold rewards of every sample ----
    rm, rm_tokenizer = distributed.load_reward_model(args.rm, world, device)
    rm.eval()
    proxy = reward.score_texts(rm, rm_tokenizer, repeated, texts, max_len=args.max_len,
                               world=world, rank=rank, batch_size=args.batch_size, bf16=args.bf16,
                               chat_template=args.chat_template)
    gold = torch.tensor(gold_scores(repeated, texts), dtype=torch.float64)
    proxy, gold = proxy.view(len(prompts), args.samples), gold.view(len(prompts), args.samples)

    # ---- the curve ----
    ns = [2 ** i for i in range(int(math.log2(args.samples)) + 1)]
    ns += [args.samples] if ns[-1] != args.samples else []
    results: dict[str, list[float]] = {"n": ns, "gold": [], "proxy": [], "kl": [], "sqrt_kl": []}
    for n in ns:
        g, r = expected_best_of_n(proxy, gold, n)
        results["gold"].append(g)
        results["proxy"].append(r)
        results["kl"].append(kl_best_of_n(n))
        results["sqrt_kl"].append(math.sqrt(kl_best_of_n(n)))
        common.print0(f"best of {n:3d}: gold {g:.3f}, proxy {r:+.3f}, "
                      f"KL {kl_best_of_n(n):.3f} nats")
    if common.is_main():
        common.save_args(args, args.out)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({**results, "prompts": len(prompts), "samples_per_prompt": args.samples},
                      f, indent=2)
    common.print0(f"wrote {args.out}/results.json")


if __name__ == "__main__":
    common.run_main(main)
