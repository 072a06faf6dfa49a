"""How sure are we? Intervals over seeds, paired differences, and the verdict rule of the study.

A study runs every arm (vanilla PPO, MetaRM rounds, controls) with several seeds. One number per
(arm, seed) — a mean gold reward, a win rate, an RM accuracy — is the unit of evidence: prompts
within one run are not independent replications of the training procedure, seeds are. So every
interval here is over seeds.

- `bootstrap_ci(values)`        the exact percentile bootstrap interval of the mean over seeds
- `paired_difference(a, b)`     per-seed differences a_s − b_s (arms that share a seed share the
                                testbed, the SFT model and the vanilla RM), their mean and bootstrap
                                interval
- `verdict(name, diff)`         one plain-words line computed from that interval

The bootstrap is exact, not Monte Carlo: resampling n seeds with replacement can only produce the
multisets of size n, each with its multinomial probability n! / (c_1! ... c_n! n^n), so the
bootstrap distribution of the mean is enumerated (C(2n−1, n) multisets: 126 for 5 seeds, 6,435
for 8, 92,378 for 10) and its quantiles read off exactly. Same input, same interval, with no
random-number generator and no resampling error. With few seeds the percentile interval is narrow
by construction (it cannot reach beyond the observed values); the report says how many seeds stand
behind every interval.
"""
from __future__ import annotations

import itertools
import math
from collections import Counter
from typing import Sequence

MAX_EXACT_SEEDS = 12  # C(23, 12) = 1.35M multisets; beyond that the enumeration would take seconds


def bootstrap_distribution(values: Sequence[float]) -> list[tuple[float, float]]:
    """The exact bootstrap distribution of the mean of `values`: (mean of the resample,
    probability), sorted by the mean. Every multiset of n indices drawn with replacement from n
    appears once, with probability n! / (Π c_i!) / n^n where c_i counts index i."""
    n = len(values)
    if not 1 <= n <= MAX_EXACT_SEEDS:
        raise ValueError(f"bootstrap over {n} values: expected 1 to {MAX_EXACT_SEEDS}")
    log_norm = math.lgamma(n + 1) - n * math.log(n)
    dist = []
    for combo in itertools.combinations_with_replacement(range(n), n):
        counts = Counter(combo).values()
        p = math.exp(log_norm - sum(math.lgamma(c + 1) for c in counts))
        dist.append((sum(values[i] for i in combo) / n, p))
    dist.sort()
    return dist


def quantile(dist: list[tuple[float, float]], q: float) -> float:
    """The smallest value v of a discrete distribution [(value, probability), sorted] with
    P(X <= v) >= q. A tolerance of 1e-12 on the cumulative sum keeps float rounding from skipping a
    value that reaches q exactly."""
    cum = 0.0
    for v, p in dist:
        cum += p
        if cum >= q - 1e-12:
            return v
    return dist[-1][0]


def bootstrap_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and the percentile bootstrap interval at `level` (the
    (1 − level)/2 and (1 + level)/2 quantiles of the exact bootstrap distribution of the mean)."""
    values = [float(v) for v in values]
    dist = bootstrap_distribution(values)
    alpha = (1 - level) / 2
    return sum(values) / len(values), quantile(dist, alpha), quantile(dist, 1 - alpha)


def paired_difference(a: dict[int, float], b: dict[int, float],
                      level: float = 0.95) -> dict[str, float]:
    """Per-seed differences a[s] − b[s] over the seeds both have -> {mean, low, high, n}."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("paired_difference: the two arms share no seed")
    mean, low, high = bootstrap_ci([a[s] - b[s] for s in seeds], level)
    return {"mean": mean, "low": low, "high": high, "n": len(seeds)}


def verdict(name: str, diff: dict[str, float], unit: str = "", decimals: int = 3) -> str:
    """One line from a paired difference: "<name>: +0.040 gold [-0.050, +0.130] (5 seeds): no
    detectable difference". The interval decides, never the sign of the mean: an interval above 0 is
    "higher", below 0 "lower", one that contains 0 "no detectable difference". One seed gives no
    interval and no verdict."""
    f = f"{{:+.{decimals}f}}"
    unit = f" {unit}" if unit else ""
    if diff["n"] < 2:
        return (f"{name}: {f.format(diff['mean'])}{unit} (1 seed): one run, no interval - "
                "an anecdote, not a verdict")
    if diff["low"] > 0:
        reading = "higher"
    elif diff["high"] < 0:
        reading = "lower"
    else:
        reading = "no detectable difference"
    return (f"{name}: {f.format(diff['mean'])}{unit} "
            f"[{f.format(diff['low'])}, {f.format(diff['high'])}] ({diff['n']} seeds): {reading}")
