"""study/stats.py: the exact bootstrap against a hand-derived case and against brute force; the verdict rule."""
import itertools
import random

import pytest

from study import stats


def test_bootstrap_three_values_by_hand():
    # Resampling 3 seeds with values 0, 1, 2: the 27 equally likely index triples give these means
    #   0: (000)                         1/27      4/3: (112)x3 (022)x3      6/27
    #   1/3: (001)x3                     3/27      5/3: (122)x3              3/27
    #   2/3: (002)x3 (011)x3             6/27      2: (222)                  1/27
    #   1: (111) + (012)x6               7/27
    # CDF: 1/27 = .037 at 0, 4/27 = .148 at 1/3, ..., 26/27 = .963 at 5/3, 1 at 2.
    # 95 %: the 0.025 quantile is 0 (.037 >= .025), the 0.975 quantile is 2 (.963 < .975).
    # 90 %: the 0.05 quantile is 1/3 (.037 < .05 <= .148), the 0.95 quantile is 5/3 (.963 >= .95).
    dist = dict((round(v, 9), 0.0) for v, _ in stats.bootstrap_distribution([0.0, 1.0, 2.0]))
    for v, p in stats.bootstrap_distribution([0.0, 1.0, 2.0]):
        dist[round(v, 9)] += p
    expected = {0: 1, 1 / 3: 3, 2 / 3: 6, 1: 7, 4 / 3: 6, 5 / 3: 3, 2: 1}
    assert {round(k, 9): pytest.approx(v / 27) for k, v in expected.items()} == dist
    assert stats.bootstrap_ci([0, 1, 2]) == (1.0, 0.0, 2.0)
    mean, low, high = stats.bootstrap_ci([0, 1, 2], level=0.9)
    assert (mean, low, high) == (1.0, pytest.approx(1 / 3), pytest.approx(5 / 3))


def test_bootstrap_matches_brute_force_over_all_index_tuples():
    # independent twin: all n^n ordered resamples, each with probability n^-n, quantiles by sorting
    values = [0.3, -1.2, 2.5, 0.7, 1.1]
    n = len(values)
    means = sorted(sum(values[i] for i in idx) / n for idx in itertools.product(range(n), repeat=n))

    def brute_quantile(q):  # smallest v with (count of means <= v) / n^n >= q
        for k, v in enumerate(means, start=1):
            if k / len(means) >= q - 1e-12:
                return v

    mean, low, high = stats.bootstrap_ci(values)
    assert mean == pytest.approx(sum(values) / n)
    assert low == pytest.approx(brute_quantile(0.025), abs=1e-12)
    assert high == pytest.approx(brute_quantile(0.975), abs=1e-12)


def test_bootstrap_agrees_with_monte_carlo_resampling():
    rng = random.Random(0)
    values = [rng.gauss(0, 1) for _ in range(6)]
    draws = sorted(sum(rng.choices(values, k=6)) / 6 for _ in range(100_000))
    _, low, high = stats.bootstrap_ci(values)
    assert low == pytest.approx(draws[2_500], abs=0.03)
    assert high == pytest.approx(draws[97_500], abs=0.03)


def test_paired_difference_uses_shared_seeds_only():
    a = {0: 1.0, 1: 2.0, 2: 3.0, 7: 100.0}
    b = {0: 0.5, 1: 1.0, 2: 1.5}
    d = stats.paired_difference(a, b)
    # differences 0.5, 1.0, 1.5: as the hand case above scaled by 0.5 and shifted by 0.5 -> [0.5, 1.5]
    assert d == {"mean": pytest.approx(1.0), "low": pytest.approx(0.5), "high": pytest.approx(1.5), "n": 3}
    with pytest.raises(ValueError):
        stats.paired_difference({0: 1.0}, {1: 1.0})


@pytest.mark.parametrize("low, high, reading", [(0.01, 0.2, "higher"), (-0.3, -0.02, "lower"),
                                                (-0.05, 0.13, "no detectable difference"),
                                                (0.0, 0.1, "no detectable difference")])
def test_verdict_follows_the_interval(low, high, reading):
    line = stats.verdict("MetaRM r2 - vanilla", {"mean": 0.04, "low": low, "high": high, "n": 5}, "gold")
    assert line.startswith("MetaRM r2 - vanilla: +0.040 gold [")
    assert line.endswith(f"(5 seeds): {reading}")


def test_verdict_refuses_one_seed():
    line = stats.verdict("x", {"mean": 0.5, "low": 0.5, "high": 0.5, "n": 1})
    assert "anecdote" in line and "higher" not in line
