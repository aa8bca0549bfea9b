"""Tests for hf_sta.methods.average: the weighted mean of the fine-tuned models."""

from __future__ import annotations

import pytest
import torch

from hf_sta.methods.average import average


def test_closed_form():
    task_tensors = torch.tensor([[1.0, 2.0, 3.0], [3.0, 6.0, -3.0]])
    assert torch.equal(average(task_tensors, torch.ones(2)), torch.tensor([2.0, 4.0, 0.0]))
    assert torch.equal(average(task_tensors, torch.tensor([3.0, 1.0])), torch.tensor([1.5, 3.0, 1.5]))


def test_base_plus_delta_is_weighted_mean_of_models():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 7, generator=generator)
    finetuned = base + torch.randn(4, 6, 7, generator=generator)
    weights = torch.tensor([1.0, 2.0, 0.5, 0.5])
    merged = base + average(finetuned - base, weights)
    expected = (finetuned * weights[:, None, None]).sum(0) / weights.sum()
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-6)


def test_single_task_is_identity():
    tau = torch.randn(1, 9)
    torch.testing.assert_close(average(tau, torch.tensor([3.0])), tau[0])


def test_zero_weight_sum_raises():
    with pytest.raises(ValueError, match="non-zero sum"):
        average(torch.randn(2, 3), torch.tensor([1.0, -1.0]))
