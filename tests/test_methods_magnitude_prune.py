"""Tests for hf_sta.methods.magnitude_prune against peft.utils.merge_utils.magnitude_prune."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from hf_sta.methods import selection
from hf_sta.methods.magnitude_prune import magnitude_prune, magnitude_trim_
from hf_sta.methods.selection import density_to_k, kth_largest_threshold

# PEFT warns that density 1 prunes nothing; so do we, silently.
pytestmark = pytest.mark.filterwarnings("ignore:The density .* no pruning will be performed")


@pytest.fixture(params=["kthvalue", "sampled"])
def path(request, monkeypatch):
    if request.param == "sampled":
        monkeypatch.setattr(selection, "_SAMPLING_MIN_NUMEL", 0)
        monkeypatch.setattr(selection, "_SAMPLE_SIZE", 512)
        monkeypatch.setattr(selection, "BLOCK_SIZE", 97)
    return request.param


@pytest.mark.parametrize("shape", [(3, 1000), (2, 30, 40), (4, 5, 6, 7)])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.7, 1.0])
def test_matches_peft_without_ties(path, shape, density):
    generator = torch.Generator().manual_seed(0)
    task_tensors = torch.randn(shape, generator=generator, dtype=torch.float64).float()
    weights = torch.tensor([1.0, -0.5, 2.0, 0.25][: shape[0]])
    expected = merge_utils.magnitude_prune(list(task_tensors), weights, density)
    out = magnitude_prune(task_tensors, weights, density=density)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)


def test_large_tensor_default_path():
    generator = torch.Generator().manual_seed(1)
    task_tensors = torch.randn(2, 300_000, generator=generator, dtype=torch.float64).float()
    weights = torch.tensor([0.7, 1.3])
    expected = merge_utils.magnitude_prune(list(task_tensors), weights, 0.2)
    torch.testing.assert_close(magnitude_prune(task_tensors, weights, density=0.2), expected, rtol=1e-6, atol=0)


def test_ties_at_cutoff_keep_exactly_k(path):
    # Quantised deltas: many entries share the cut-off magnitude.
    generator = torch.Generator().manual_seed(2)
    task_tensors = torch.randint(-4, 5, (3, 40, 50), generator=generator).float()
    task_tensors[task_tensors == 0] = 5.0  # no zeros, so that every kept entry is visible
    weights = torch.tensor([1.0, 2.0, -1.0])
    density = 0.3
    k = density_to_k(2000, density)
    for task in range(3):
        single = magnitude_prune(task_tensors[task : task + 1], torch.ones(1), density=density)
        assert int(torch.count_nonzero(single)) == k
    out = magnitude_prune(task_tensors, weights, density=density)
    expected = merge_utils.magnitude_prune(list(task_tensors), weights, density)
    away = torch.ones(40, 50, dtype=torch.bool)
    for task in range(3):
        magnitudes = task_tensors[task].abs()
        away &= magnitudes != kth_largest_threshold(magnitudes, k)
    assert away.any()
    assert torch.equal(out[away], expected[away])


def test_tiny_tensor_prunes_everything_like_peft():
    task_tensors = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    out = magnitude_prune(task_tensors, torch.ones(2), density=0.2)  # int(0.6) == 0
    assert torch.equal(out, merge_utils.magnitude_prune(list(task_tensors), torch.ones(2), 0.2))
    assert not out.any()


def test_trim_helper_reuses_cutoff():
    tau = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    buffer = torch.empty_like(tau)
    cutoff = magnitude_trim_(buffer, tau, 100)
    first = buffer.clone()
    buffer.fill_(7.0)
    assert magnitude_trim_(buffer, tau, 100, cutoff) is cutoff
    assert torch.equal(buffer, first) and int(torch.count_nonzero(first)) == 100
    assert magnitude_trim_(buffer, tau, 0) is None and not buffer.any()
    assert magnitude_trim_(buffer, tau, 1000) is None and torch.equal(buffer, tau)


def test_inputs_unchanged():
    task_tensors = torch.randn(3, 50)
    weights = torch.ones(3)
    before = task_tensors.clone()
    magnitude_prune(task_tensors, weights, density=0.5)
    assert torch.equal(task_tensors, before) and torch.equal(weights, torch.ones(3))
