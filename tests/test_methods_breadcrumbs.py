"""Tests for hf_sta.methods.breadcrumbs: drop the largest outliers and the smallest entries."""

from __future__ import annotations

import pytest
import torch

from hf_sta.methods import selection
from hf_sta.methods.breadcrumbs import breadcrumbs, breadcrumbs_counts


@pytest.fixture(params=["kthvalue", "sampled"])
def path(request, monkeypatch):
    if request.param == "sampled":
        monkeypatch.setattr(selection, "_SAMPLING_MIN_NUMEL", 0)
        monkeypatch.setattr(selection, "_SAMPLE_SIZE", 64)
        monkeypatch.setattr(selection, "BLOCK_SIZE", 97)
    return request.param


def reference(task_tensors: torch.Tensor, weights: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Sort-based: rank by |tau| descending, ties by lowest flat index; keep ranks [n_top, n_top + n_keep)."""
    num_tasks = task_tensors.shape[0]
    flat = task_tensors.reshape(num_tasks, -1)
    n_top, n_keep = breadcrumbs_counts(flat.shape[1], density, gamma)
    merged = torch.zeros(flat.shape[1])
    for task in range(num_tasks):
        order = torch.sort(flat[task].abs(), descending=True, stable=True).indices
        mask = torch.zeros(flat.shape[1], dtype=torch.bool)
        mask[order[n_top : n_top + n_keep]] = True
        merged += weights[task] * flat[task] * mask
    return merged.view(task_tensors.shape[1:])


def test_closed_form_hand_made(path):
    # |tau| ranks: 10 (outlier, dropped), 9..5 kept (density 0.5 of 10 = 5), 4..1 dropped.
    tau = torch.tensor([[3.0, -10.0, 9.0, 1.0, -8.0, 7.0, -2.0, 6.0, -5.0, 4.0]])
    out = breadcrumbs(tau, torch.ones(1), density=0.5, gamma=0.1)
    assert torch.equal(out, torch.tensor([0.0, 0.0, 9.0, 0.0, -8.0, 7.0, 0.0, 6.0, -5.0, 0.0]))
    # Two tasks, weights: the second task keeps ranks 1..5 of its own magnitudes.
    tau2 = torch.stack([tau[0], torch.arange(10.0)])  # second: 9 dropped, 8..4 kept
    out = breadcrumbs(tau2, torch.tensor([1.0, 2.0]), density=0.5, gamma=0.1)
    second = torch.tensor([0.0, 0.0, 0.0, 0.0, 8.0, 10.0, 12.0, 14.0, 16.0, 0.0])
    assert torch.equal(out, torch.tensor([0.0, 0.0, 9.0, 0.0, -8.0, 7.0, 0.0, 6.0, -5.0, 0.0]) + second)


def test_counts():
    assert breadcrumbs_counts(1000, 0.9, 0.01) == (10, 900)
    assert breadcrumbs_counts(20, 0.95, 0.1) == (1, 19)  # density + gamma > 1: fewer outliers removed
    assert breadcrumbs_counts(10, 1.0, 0.5) == (0, 10)
    assert breadcrumbs_counts(10, 0.5, 0.0) == (0, 5)


@pytest.mark.parametrize(("density", "gamma"), [(0.9, 0.01), (0.5, 0.1), (0.3, 0.0), (0.95, 0.1), (1.0, 0.01)])
def test_matches_sort_reference(path, density, gamma):
    generator = torch.Generator().manual_seed(0)
    task_tensors = torch.randn(3, 20, 30, generator=generator)
    weights = torch.tensor([1.0, -0.5, 2.0])
    out = breadcrumbs(task_tensors, weights, density=density, gamma=gamma)
    torch.testing.assert_close(out, reference(task_tensors, weights, density, gamma), rtol=1e-6, atol=1e-7)


def test_exact_count_with_ties(path):
    task_tensors = torch.randint(1, 5, (1, 600), generator=torch.Generator().manual_seed(1)).float()
    n_top, n_keep = breadcrumbs_counts(600, 0.6, 0.05)
    out = breadcrumbs(task_tensors, torch.ones(1), density=0.6, gamma=0.05)
    assert int(torch.count_nonzero(out)) == n_keep
    assert torch.equal(out, reference(task_tensors, torch.ones(1), 0.6, 0.05))


def test_tiny_tensor_and_inputs_unchanged():
    task_tensors = torch.randn(2, 3)
    before = task_tensors.clone()
    assert not breadcrumbs(task_tensors, torch.ones(2), density=0.2).any()  # int(0.6) == 0 kept
    assert torch.equal(task_tensors, before)
