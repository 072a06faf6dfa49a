"""Hand-derived values for the pieces of sft.py: prompt masking, the shifted NLL, the learning-rate schedule."""
import math

import pytest
import torch

import sft


def test_labels_mask_the_prompt_and_keep_the_eos():
    # ids = 2 prompt tokens, 2 response tokens, EOS (id 0): the loss targets are exactly the last three.
    assert sft.sft_labels([11, 12, 21, 22, 0], n_prompt=2) == [-100, -100, 21, 22, 0]


def test_loss_sum_shifts_by_one_token():
    # Vocabulary of 3. Sequence of length 4 whose labels are [-100, -100, 2, 0]: positions 1 and 2 of the
    # logits predict tokens 2 and 3 (labels 2 and 0); positions 0 and 3 predict nothing.
    # Logits at position 1 give token 2 probability e^2/(e^2+1+1); at position 2 they are uniform (1/3).
    # NLL = -log(e^2/(e^2+2)) + log 3 = log(1 + 2e^-2) + log 3.
    logits = torch.zeros(1, 4, 3)
    logits[0, 1, 2] = 2.0
    logits[0, 0] = torch.tensor([50.0, -50.0, 0.0])  # position 0 predicts a prompt token: must not count
    logits[0, 3] = torch.tensor([-50.0, 50.0, 0.0])  # the last position predicts nothing: must not count
    labels = torch.tensor([[-100, -100, 2, 0]])
    expected = math.log(1 + 2 * math.exp(-2)) + math.log(3)
    assert sft.sft_loss_sum(logits, labels).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("step, expected", [
    (0, 1 / 3),      # warm-up: (0 + 1) / 3
    (1, 2 / 3),      # (1 + 1) / 3
    (2, 1.0),        # the W-th step reaches the peak
    (3, 1.0),        # decay starts at the peak: (10 - 3) / (10 - 3)
    (6, 4 / 7),      # (10 - 6) / 7
    (9, 1 / 7),      # the last step still moves: (10 - 9) / 7
])
def test_lr_schedule(step, expected):
    # T = 10 optimiser steps, W = 3 warm-up steps, peak 1.0 (formulas in sft.lr_at's docstring)
    assert sft.lr_at(step, total_steps=10, warmup_steps=3, peak=1.0) == pytest.approx(expected)
