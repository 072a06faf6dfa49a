"""study/best_of_n.py: the expected best-of-n reward against brute force over every subset; the KL formula; a run."""
import itertools
import json
import os

import pytest
import torch

from study import best_of_n


def test_expected_best_of_n_matches_every_subset():
    # independent twin: for each prompt, average the gold (and proxy) of the proxy-argmax over all C(N, n) subsets
    g = torch.Generator().manual_seed(0)
    proxy, gold = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    for n in range(1, 7):
        want_gold, want_proxy = 0.0, 0.0
        for p in range(3):
            subsets = list(itertools.combinations(range(6), n))
            picks = [max(s, key=lambda i: proxy[p, i].item()) for s in subsets]
            want_gold += sum(gold[p, i].item() for i in picks) / len(subsets) / 3
            want_proxy += sum(proxy[p, i].item() for i in picks) / len(subsets) / 3
        got_gold, got_proxy = best_of_n.expected_best_of_n(proxy, gold, n)
        assert got_gold == pytest.approx(want_gold, abs=1e-6) and got_proxy == pytest.approx(want_proxy, abs=1e-6)
    # n = 1 is the mean of all samples; n = N the sample the proxy ranks first
    assert best_of_n.expected_best_of_n(proxy, gold, 1)[0] == pytest.approx(gold.mean().item(), abs=1e-6)
    top = gold[torch.arange(3), proxy.argmax(1)].mean().item()
    assert best_of_n.expected_best_of_n(proxy, gold, 6)[0] == pytest.approx(top, abs=1e-6)


def test_kl_best_of_n_closed_form():
    # log n - (n - 1)/n: 0 for n = 1; for n = 2, log 2 - 1/2 = 0.19315; grows like log n
    assert best_of_n.kl_best_of_n(1) == 0.0
    assert best_of_n.kl_best_of_n(2) == pytest.approx(0.6931471805599453 - 0.5)
    assert best_of_n.kl_best_of_n(64) == pytest.approx(4.1588830833596715 - 63 / 64)


def test_run_on_the_world(world, tmp_path, run):
    if not world.testbed:
        pytest.skip("needs the testbed: best-of-n reports the gold reward")
    rm = str(tmp_path / "rm")
    rc, out, err = run(["reward.py", "--model", world.base_model, "--train", world.pairs_train, "--test", "",
                        "--out", rm, "--max-steps", "2", "--batch-size", "8", "--micro-batch-size", "8",
                        "--max-len", "64"])
    assert rc == 0, err[-2000:]
    rc, out, err = run(["-m", "study.best_of_n", "--policy", world.base_model, "--rm", rm, "--prompts", world.eval_prompts,
                        "--samples", "8", "--max-prompts", "4", "--max-new-tokens", "6", "--out", str(tmp_path / "bon")])
    assert rc == 0, err[-2000:]
    res = json.load(open(os.path.join(tmp_path, "bon", "results.json")))
    assert res["n"] == [1, 2, 4, 8] and res["prompts"] == 4
    # the proxy of the chosen response can only rise with n (the max over more samples)
    assert all(b >= a - 1e-9 for a, b in zip(res["proxy"], res["proxy"][1:]))
    assert res["kl"] == pytest.approx([best_of_n.kl_best_of_n(n) for n in (1, 2, 4, 8)])
