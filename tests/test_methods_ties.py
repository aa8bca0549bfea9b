"""Tests for hf_sta.methods.ties against peft.utils.merge_utils.ties."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from hf_sta.methods import selection
from hf_sta.methods.selection import density_to_k, kth_largest_threshold
from hf_sta.methods.ties import sign_elected_disjoint_mean, ties

pytestmark = pytest.mark.filterwarnings("ignore:The density .* no pruning will be performed")


@pytest.fixture(params=["kthvalue", "sampled"])
def path(request, monkeypatch):
    if request.param == "sampled":
        monkeypatch.setattr(selection, "_SAMPLING_MIN_NUMEL", 0)
        monkeypatch.setattr(selection, "_SAMPLE_SIZE", 512)
        monkeypatch.setattr(selection, "BLOCK_SIZE", 97)  # many blocks, the tie split inside one of them
    return request.param


@pytest.mark.parametrize("majority_sign_method", ["total", "frequency"])
@pytest.mark.parametrize("shape", [(3, 2000), (2, 30, 40), (4, 6, 7, 8), (1, 500)])
@pytest.mark.parametrize("density", [0.1, 0.2, 0.6, 1.0])
def test_matches_peft_without_ties(path, majority_sign_method, shape, density):
    generator = torch.Generator().manual_seed(0)
    task_tensors = torch.randn(shape, generator=generator, dtype=torch.float64).float()
    weights = torch.tensor([1.0, 0.3, -0.7, 2.0][: shape[0]])
    expected = merge_utils.ties(list(task_tensors), weights, density, majority_sign_method)
    out = ties(task_tensors, weights, density=density, majority_sign_method=majority_sign_method)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("majority_sign_method", ["total", "frequency"])
def test_large_tensor_default_path(majority_sign_method):
    generator = torch.Generator().manual_seed(1)
    task_tensors = torch.randn(3, 300_000, generator=generator, dtype=torch.float64).float()
    weights = torch.tensor([1.0, 0.5, 1.5])
    expected = merge_utils.ties(list(task_tensors), weights, 0.2, majority_sign_method)
    out = ties(task_tensors, weights, density=0.2, majority_sign_method=majority_sign_method)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("majority_sign_method", ["total", "frequency"])
def test_ties_at_cutoff_agree_away_from_it(path, majority_sign_method):
    generator = torch.Generator().manual_seed(2)
    task_tensors = torch.randint(-6, 7, (3, 50, 40), generator=generator).float() / 8
    weights = torch.tensor([1.0, 2.0, 0.5])
    density = 0.25
    k = density_to_k(2000, density)
    out = ties(task_tensors, weights, density=density, majority_sign_method=majority_sign_method)
    expected = merge_utils.ties(list(task_tensors), weights, density, majority_sign_method)
    # Trimming, election and the disjoint mean are entrywise: only entries at some task's cut-off can differ.
    away = torch.ones(50, 40, dtype=torch.bool)
    for task in range(3):
        magnitudes = task_tensors[task].abs()
        away &= magnitudes != kth_largest_threshold(magnitudes, k)
    assert away.sum() > 100
    assert torch.equal(out[away], expected[away])


def test_exactly_k_kept_with_ties(path):
    task_tensors = torch.randint(1, 4, (1, 30, 30), generator=torch.Generator().manual_seed(3)).float()
    task_tensors[0, ::2] *= -1
    out = ties(task_tensors, torch.ones(1), density=0.3)
    assert int(torch.count_nonzero(out)) == density_to_k(900, 0.3)


def test_closed_form_small():
    # density 1 (no trim). Entry 0: signs +,+,- ; total = 2 + 1 - 4 = -1 -> elected -, only task 2 agrees.
    # Entry 1: +3, -1, +1 -> total 3 -> +, tasks 0 and 2 agree -> (w0*3 + w2*1) / 2.
    # Entry 2: all zero -> 0.
    task_tensors = torch.tensor([[2.0, 3.0, 0.0], [1.0, -1.0, 0.0], [-4.0, 1.0, 0.0]])
    weights = torch.tensor([1.0, 1.0, 2.0])
    out = ties(task_tensors, weights, density=1.0, majority_sign_method="total")
    assert torch.equal(out, torch.tensor([-8.0, 2.5, 0.0]))
    # frequency: entry 0 votes +,+,- -> +, tasks 0 and 1 -> (2 + 1) / 2.
    out = ties(task_tensors, weights, density=1.0, majority_sign_method="frequency")
    assert torch.equal(out, torch.tensor([1.5, 2.5, 0.0]))


def test_sign_tie_elects_plus():
    task_tensors = torch.tensor([[1.0], [-1.0]])
    assert torch.equal(ties(task_tensors, torch.ones(2), density=1.0), torch.tensor([1.0]))
    assert torch.equal(ties(task_tensors, torch.ones(2), density=1.0, majority_sign_method="frequency"), torch.ones(1))


def test_inputs_unchanged():
    task_tensors = torch.randn(3, 40, 30)
    weights = torch.tensor([1.0, 2.0, 3.0])
    before = task_tensors.clone()
    ties(task_tensors, weights, density=0.2)
    ties(task_tensors, weights, density=0.2, majority_sign_method="frequency")
    assert torch.equal(task_tensors, before) and torch.equal(weights, torch.tensor([1.0, 2.0, 3.0]))


def test_bad_majority_sign_method():
    with pytest.raises(ValueError, match="majority_sign_method must be one of"):
        ties(torch.randn(2, 5), torch.ones(2), majority_sign_method="sum")
    with pytest.raises(ValueError, match="majority_sign_method must be one of"):
        sign_elected_disjoint_mean(
            lambda task, start, stop, out: out,
            torch.ones(2),
            torch.zeros(2, 3),
            "mean",
        )


def test_many_tasks_count_dtype():
    # More than 255 tasks switch the agreement count from uint8 to int32.
    task_tensors = torch.ones(300, 4)
    assert torch.equal(ties(task_tensors, torch.ones(300), density=1.0), torch.ones(4))


def _mergekit_ties(task_tensors: torch.Tensor, weights: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit's ties written out densely: trim each task vector, weight it, elect the sign of the weighted sum,
    divide the agreeing weighted sum by the agreeing weights' sum (0 -> 1)."""
    flat = task_tensors.reshape(task_tensors.shape[0], -1)
    k = int(density * flat.shape[1])
    trimmed = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        keep = flat[t].abs().argsort(descending=True, stable=True)[:k]
        trimmed[t, keep] = flat[t, keep]
    weighted = trimmed * weights[:, None]
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    mask = (torch.sign(weighted) == sign).float()
    divisor = (weights[:, None] * mask).sum(0)
    divisor[divisor == 0] = 1
    return ((weighted * mask).sum(0) / divisor).view(task_tensors.shape[1:])


@pytest.mark.parametrize("weights", [[0.5, 0.5, 0.5], [0.2, 1.0, 0.7], [1.0, 1.0, 1.0]])
def test_mergekit_weighting_matches_mergekit_formula(weights):
    generator = torch.Generator().manual_seed(3)
    task_tensors = torch.randn(3, 16, 24, generator=generator)
    weights = torch.tensor(weights)
    out = ties(task_tensors, weights, density=0.4, weighting="mergekit")
    torch.testing.assert_close(out, _mergekit_ties(task_tensors, weights, 0.4), rtol=1e-6, atol=1e-6)


def test_uniform_weights_scale_peft_convention_only():
    generator = torch.Generator().manual_seed(4)
    task_tensors = torch.randn(3, 50, generator=generator)
    ones, halves = torch.ones(3), torch.full((3,), 0.5)
    unit = ties(task_tensors, ones, density=0.3)
    torch.testing.assert_close(ties(task_tensors, halves, density=0.3), 0.5 * unit)
    torch.testing.assert_close(ties(task_tensors, halves, density=0.3, weighting="mergekit"), unit)
    assert torch.equal(ties(task_tensors, ones, density=0.3, weighting="mergekit"), unit)


def test_linear_is_average_for_mergekit_users():
    from hf_sta.methods import get_merge_method

    generator = torch.Generator().manual_seed(5)
    task_tensors, weights = torch.randn(2, 7, generator=generator), torch.tensor([1.0, 3.0])
    linear = get_merge_method("linear")
    assert linear.function is get_merge_method("average").function
    torch.testing.assert_close(linear.function(task_tensors, weights), (task_tensors[0] + 3 * task_tensors[1]) / 4)
