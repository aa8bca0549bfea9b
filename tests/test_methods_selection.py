"""Tests for hf_sta.methods.selection: exact top-k masks by threshold, checked against torch.topk."""

from __future__ import annotations

import pytest
import torch

from hf_sta.methods import selection
from hf_sta.methods.selection import (
    density_to_k,
    kth_largest_threshold,
    magnitude_trim,
    topk_cutoff,
    topk_mask,
    topk_mask_per_row,
)


@pytest.fixture(params=["kthvalue", "sampled"])
def path(request, monkeypatch):
    """Run a test on both threshold paths: plain kthvalue, and the sampled bracket (forced on small tensors)."""
    monkeypatch.setattr(selection, "_TIE_BLOCK", 8)  # exercise the bisection of the kthvalue path's tie search
    if request.param == "sampled":
        monkeypatch.setattr(selection, "_SAMPLING_MIN_NUMEL", 0)
        monkeypatch.setattr(selection, "_SAMPLE_SIZE", 256)
        monkeypatch.setattr(selection, "BLOCK_SIZE", 97)  # many blocks, none aligned with the test shapes
    return request.param


def reference_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top k by (score descending, flat index ascending): the documented tie-breaking, via a stable sort."""
    flat = scores.reshape(-1).double()
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view(scores.shape)


@pytest.mark.parametrize("shape", [(1000,), (37, 53), (4, 5, 6)])
@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.99])
def test_matches_torch_topk_without_ties(path, shape, density):
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    assert torch.unique(scores).numel() == scores.numel()
    k = density_to_k(scores.numel(), density)
    mask = topk_mask(scores, k)
    expected = torch.zeros(scores.numel(), dtype=torch.bool)
    expected[torch.topk(scores.flatten(), k).indices] = True
    assert mask.shape == scores.shape and mask.dtype == torch.bool
    assert torch.equal(mask, expected.view(shape))


@pytest.mark.parametrize("levels", [1, 2, 3, 10])
@pytest.mark.parametrize("k", [0, 1, 7, 250, 499, 500])
def test_exact_count_and_lowest_index_tie_break(path, levels, k):
    scores = torch.randint(0, levels, (20, 25), generator=torch.Generator().manual_seed(1)).float()
    mask = topk_mask(scores, k)
    assert int(mask.sum()) == k
    assert torch.equal(mask, reference_mask(scores, k))


def test_all_equal_keeps_first_k(path):
    scores = torch.full((1000,), 3.0)
    mask = topk_mask(scores, 123)
    assert mask[:123].all() and not mask[123:].any()


def test_masks_are_nested(path):
    scores = torch.randint(0, 5, (400,), generator=torch.Generator().manual_seed(2)).float()
    previous = topk_mask(scores, 0)
    for k in range(0, 401, 37):
        mask = topk_mask(scores, k)
        assert not (previous & ~mask).any()
        previous = mask


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.uint8]
)
def test_dtypes_with_integer_scores(path, dtype):
    # Integer-valued scores: massive ties, exactly representable in every dtype.
    scores = torch.randint(0, 20, (30, 40), generator=torch.Generator().manual_seed(3)).to(dtype)
    for k in (0, 1, 333, 600, 1199, 1200):
        mask = topk_mask(scores, k)
        assert int(mask.sum()) == k
        assert torch.equal(mask, reference_mask(scores.double(), k))


def test_edge_cases(path):
    one = torch.tensor([2.5])
    assert torch.equal(topk_mask(one, 1), torch.tensor([True]))
    assert torch.equal(topk_mask(one, 0), torch.tensor([False]))
    scalar = torch.tensor(1.0)
    assert topk_mask(scalar, 1).shape == () and bool(topk_mask(scalar, 1))
    empty = torch.empty(0, 3)
    assert topk_mask(empty, 0).shape == (0, 3)
    scores = torch.randn(10, 10)
    assert topk_mask(scores, 100).all()
    assert not topk_mask(scores, 0).any()
    negative = -torch.arange(1.0, 11.0)  # all negative, largest is -1
    assert torch.equal(topk_mask(negative, 3), torch.arange(10) < 3)
    with_inf = torch.tensor([1.0, float("inf"), -float("inf"), 0.0])
    assert torch.equal(topk_mask(with_inf, 2), torch.tensor([True, True, False, False]))


def test_non_contiguous_input_and_input_unchanged(path):
    base = torch.randn(50, 40)
    scores = base.t()
    before = scores.clone()
    mask = topk_mask(scores, 300)
    assert torch.equal(scores, before)
    assert torch.equal(mask, reference_mask(scores.contiguous(), 300))


def test_invalid_arguments():
    scores = torch.randn(10)
    for k in (-1, 11):
        with pytest.raises(ValueError, match="k must be in"):
            topk_mask(scores, k)
    with pytest.raises(ValueError, match="k must be an int"):
        topk_mask(scores, 2.0)
    with pytest.raises(ValueError, match="real"):
        topk_mask(torch.ones(3, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        kth_largest_threshold(scores, 0)


def test_nan_scores_raise_when_selection_impossible(path):
    scores = torch.tensor([float("nan")] * 5 + [1.0])
    with pytest.raises(ValueError, match="NaN"):
        topk_mask(scores, 3)


def test_kth_largest_threshold(path):
    scores = torch.randn(5000, generator=torch.Generator().manual_seed(4))
    for k in (1, 10, 2500, 5000):
        threshold = kth_largest_threshold(scores, k)
        assert threshold.shape == ()
        assert threshold == torch.sort(scores, descending=True).values[k - 1]
        assert int((scores > threshold).sum()) < k <= int((scores >= threshold).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cutoff_and_magnitude_trim_match_mask(path, dtype):
    values = torch.randint(-5, 6, (3000,), generator=torch.Generator().manual_seed(5)).to(dtype)
    for k in (1, 500, 1234, 2999, 3000):
        cutoff = topk_cutoff(values.abs(), k)
        assert cutoff.k == k and 0 < cutoff.split <= values.numel()
        assert topk_cutoff(values, k, magnitude=True) == cutoff  # |values| never materialised, same cut-off
        expected = values * reference_mask(values.abs(), k)
        assert torch.equal(magnitude_trim(values, cutoff), expected)
        out = torch.full_like(values, 9.0)
        assert magnitude_trim(values, cutoff, out=out) is out and torch.equal(out, expected)
        # Block by block, with the block's flat offset: the same trim, whichever side of the tie split a block is.
        for start, stop in ((0, 1), (0, cutoff.split), (cutoff.split - 1, cutoff.split + 1), (1000, 3000)):
            start, stop = max(start, 0), min(stop, values.numel())
            block = magnitude_trim(values[start:stop], cutoff, offset=start)
            assert torch.equal(block, expected[start:stop])


def test_magnitude_trim_keeps_threshold_itself():
    values = torch.tensor([0.5, -0.25, -0.75, 0.25, 0.1])
    cutoff = topk_cutoff(values.abs(), 3)  # keeps 0.75, 0.5 and the first 0.25
    assert cutoff.threshold == 0.25 and cutoff.split == 2
    assert torch.equal(magnitude_trim(values, cutoff), torch.tensor([0.5, -0.25, -0.75, 0.0, 0.0]))
    zeros = torch.tensor([0.0, 3.0, 0.0, -0.0])
    cutoff = topk_cutoff(zeros.abs(), 3)  # threshold 0: the first two zeros count as kept, values unchanged
    assert cutoff.threshold == 0 and torch.equal(magnitude_trim(zeros, cutoff), zeros)
    with pytest.raises(ValueError, match="floating"):
        magnitude_trim(torch.arange(3), cutoff)


def test_large_tensor_default_path_matches_topk():
    # Large enough for the sampled bracket with the production constants.
    scores = torch.rand(300_000, generator=torch.Generator().manual_seed(6), dtype=torch.float64).float()
    for density in (0.001, 0.2, 0.9):
        k = density_to_k(scores.numel(), density)
        expected = torch.zeros(scores.numel(), dtype=torch.bool)
        expected[torch.topk(scores, k).indices] = True
        mask = topk_mask(scores, k)
        assert int(mask.sum()) == k
        # fp32 draws may repeat; away from ties the masks agree exactly.
        threshold = kth_largest_threshold(scores, k)
        away = scores != threshold
        assert torch.equal(mask[away], expected[away])


def test_per_row():
    scores = torch.randn(3, 7, 11, generator=torch.Generator().manual_seed(7))
    masks = topk_mask_per_row(scores, 20)
    assert masks.shape == scores.shape
    for row in range(3):
        assert torch.equal(masks[row], topk_mask(scores[row], 20))
    with pytest.raises(ValueError):
        topk_mask_per_row(torch.tensor(1.0), 1)


def test_density_to_k_matches_peft():
    assert density_to_k(10, 0.2) == 2
    assert density_to_k(100, 0.29) == 28  # int(28.999999999999996), as PEFT
    assert density_to_k(3, 0.2) == 0
    assert density_to_k(7, 1.0) == 7
    assert density_to_k(0, 0.5) == 0
    with pytest.raises(ValueError, match="density"):
        density_to_k(10, 1.5)
    with pytest.raises(ValueError, match="numel"):
        density_to_k(-1, 0.5)


def test_nan_scores_never_selected_or_raise(path):
    scores = torch.rand(1000, generator=torch.Generator().manual_seed(8))
    scores[::50] = float("nan")
    for k in (5, 500, 990):
        try:
            mask = topk_mask(scores, k)
        except ValueError as error:
            assert "NaN" in str(error)
        else:
            assert int(mask.sum()) == k and not mask[scores.isnan()].any()
