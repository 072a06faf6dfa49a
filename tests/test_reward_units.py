"""Hand-derived values for Eq. (1), the Bradley–Terry loss of reward.py."""
import math

import pytest
import torch

import reward


def test_bradley_terry_loss_by_hand():
    # pairs with margins 1 and 0: loss = mean(-log σ(1), -log σ(0)) = (log(1 + e^-1) + log 2) / 2
    r_w, r_l = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    expected = (math.log(1 + math.exp(-1)) + math.log(2)) / 2  # = 0.503204...
    assert reward.bradley_terry_loss(r_w, r_l).item() == pytest.approx(expected, rel=1e-7)


def test_bradley_terry_gradient_by_hand():
    # d/dr_w of -log σ(r_w - r_l) = -(1 - σ(d)) = -σ(-d); the mean over n = 2 pairs divides by 2.
    r_w = torch.tensor([1.0, 0.0], requires_grad=True)
    r_l = torch.tensor([0.0, 0.0], requires_grad=True)
    reward.bradley_terry_loss(r_w, r_l).backward()
    sig = lambda x: 1 / (1 + math.exp(-x))
    assert r_w.grad.tolist() == pytest.approx([-sig(-1) / 2, -sig(0) / 2], rel=1e-6)
    assert r_l.grad.tolist() == pytest.approx([sig(-1) / 2, sig(0) / 2], rel=1e-6)


def test_bradley_terry_is_finite_for_huge_margins():
    # margin -100: -log σ(-100) = log(1 + e^100) = 100 + log(1 + e^-100) ≈ 100; log(sigmoid(.)) would give inf
    loss = reward.bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([0.0]))
    assert loss.item() == pytest.approx(100.0, rel=1e-6)
