"""Tests for hf_sta.methods.task_arithmetic against peft.utils.merge_utils.task_arithmetic."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from hf_sta.methods.task_arithmetic import task_arithmetic


@pytest.mark.parametrize("shape", [(3, 17), (2, 8, 9), (5, 4, 3, 2), (1, 10)])
def test_matches_peft(shape):
    generator = torch.Generator().manual_seed(0)
    task_tensors = torch.randn(shape, generator=generator)
    weights = torch.randn(shape[0], generator=generator)
    expected = merge_utils.task_arithmetic(list(task_tensors), weights)
    torch.testing.assert_close(task_arithmetic(task_tensors, weights), expected, rtol=1e-6, atol=0)


def test_closed_form():
    task_tensors = torch.tensor([[1.0, 2.0], [10.0, -20.0]])
    out = task_arithmetic(task_tensors, torch.tensor([0.5, 2.0]))
    assert torch.equal(out, torch.tensor([20.5, -39.0]))


def test_inputs_unchanged_and_new_tensor():
    task_tensors = torch.randn(3, 5)
    before = task_tensors.clone()
    out = task_arithmetic(task_tensors, torch.ones(3))
    out.add_(1.0)
    assert torch.equal(task_tensors, before)
