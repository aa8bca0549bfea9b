"""RegMean and Fisher merging against their closed forms: least squares on stacked inputs, the Fisher-weighted mean."""

from __future__ import annotations

import logging

import pytest
import torch

from hf_sta.methods import get_merge_method
from hf_sta.methods.fisher import fisher
from hf_sta.methods.regmean import regmean


def _regression_problem(num_tasks=3, out_features=4, in_features=6, rows=(10, 12, 9), seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    inputs = [torch.randn(n, in_features, generator=generator, dtype=torch.float64) for n in rows[:num_tasks]]
    taus = torch.randn(num_tasks, out_features, in_features, generator=generator, dtype=torch.float64) * 0.1
    grams = torch.stack([x.T @ x for x in inputs])
    return base, inputs, taus, grams


# -- RegMean -------------------------------------------------------------------------------------------------------


def test_regmean_alpha_one_is_least_squares_on_the_stacked_inputs():
    base, inputs, taus, grams = _regression_problem()
    delta = regmean(taus.float(), torch.ones(3), gram=grams.float(), gram_layout="out_in", alpha=1.0)
    finetuned = base + taus
    # argmin_W sum_t ||X_t W^T - X_t W_t^T||^2 = lstsq(vstack X_t, vstack X_t W_t^T)^T
    stacked_inputs = torch.cat(inputs)
    stacked_targets = torch.cat([x @ w.T for x, w in zip(inputs, finetuned)])
    expected = torch.linalg.lstsq(stacked_inputs, stacked_targets).solution.T
    torch.testing.assert_close((base + delta.double()), expected, atol=1e-4, rtol=1e-4)
    assert delta.dtype == torch.float32 and delta.shape == (4, 6)


def test_regmean_shrunk_grams_and_weights_follow_the_formula():
    base, _, taus, grams = _regression_problem(seed=1)
    weights = torch.tensor([0.5, 1.0, 2.0])
    alpha = 0.6
    delta = regmean(taus.float(), weights, gram=grams.float(), alpha=alpha)
    shrunk = [w * (alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))) for w, g in zip(weights.double(), grams)]
    finetuned = base + taus
    numerator = sum(w_t @ g_t for w_t, g_t in zip(finetuned, shrunk))
    expected = numerator @ torch.linalg.inv(sum(shrunk))  # the paper's formula, written with an inverse on purpose
    torch.testing.assert_close(base + delta.double(), expected, atol=1e-5, rtol=1e-5)


def test_regmean_alpha_zero_is_a_per_input_feature_weighted_mean():
    _, _, taus, grams = _regression_problem(seed=2)
    delta = regmean(taus.float(), torch.ones(3), gram=grams.float(), alpha=0.0)
    diagonals = torch.diagonal(grams, dim1=1, dim2=2)  # [T, in]
    expected = (taus * diagonals[:, None, :]).sum(0) / diagonals.sum(0)
    torch.testing.assert_close(delta.double(), expected, atol=1e-6, rtol=1e-5)


def test_regmean_equal_weights_change_nothing():
    _, _, taus, grams = _regression_problem(seed=3)
    ones = regmean(taus.float(), torch.ones(3), gram=grams.float())
    thirds = regmean(taus.float(), torch.full((3,), 1 / 3), gram=grams.float())
    torch.testing.assert_close(ones, thirds, atol=1e-6, rtol=1e-5)


def test_regmean_in_out_layout_is_the_transposed_problem():
    _, _, taus, grams = _regression_problem(seed=4)
    weights = torch.tensor([1.0, 0.3, 0.7])
    out_in = regmean(taus.float(), weights, gram=grams.float(), gram_layout="out_in", alpha=0.8)
    in_out = regmean(taus.transpose(1, 2).float(), weights, gram=grams.float(), gram_layout="in_out", alpha=0.8)
    assert in_out.shape == (6, 4)
    torch.testing.assert_close(in_out, out_in.T, atol=1e-6, rtol=1e-5)


def test_regmean_without_gram_averages_or_adds():
    taus = torch.randn(3, 5, generator=torch.Generator().manual_seed(5))
    weights = torch.tensor([1.0, 2.0, 3.0])
    expected_sum = (weights[:, None] * taus).sum(0)
    torch.testing.assert_close(regmean(taus, weights, gram=None), expected_sum / 6.0)
    torch.testing.assert_close(regmean(taus, weights, gram=None, other="task_arithmetic"), expected_sum)


def test_regmean_dead_input_features_fall_back_and_keep_the_mean(caplog):
    generator = torch.Generator().manual_seed(6)
    inputs = [torch.randn(20, 6, generator=generator, dtype=torch.float64) for _ in range(2)]
    for x in inputs:
        x[:, [1, 4]] = 0.0  # features no calibration token activates
    grams = torch.stack([x.T @ x for x in inputs])
    taus = torch.randn(2, 3, 6, generator=generator, dtype=torch.float64)
    weights = torch.tensor([1.0, 2.0])
    with caplog.at_level(logging.WARNING, logger="hf_sta.methods.regmean"):
        delta = regmean(taus.float(), weights, gram=grams.float(), alpha=0.9).double()
    assert "singular" in caplog.text
    assert torch.isfinite(delta).all()
    mean = (taus[0] + 2 * taus[1]) / 3
    torch.testing.assert_close(delta[:, [1, 4]], mean[:, [1, 4]], atol=1e-6, rtol=1e-6)
    # The live features are the regression on the live inputs alone.
    live = [0, 2, 3, 5]
    live_delta = regmean(taus[:, :, live].float(), weights, gram=grams[:, live][:, :, live].float(), alpha=0.9)
    torch.testing.assert_close(delta[:, live], live_delta.double(), atol=1e-5, rtol=1e-5)


def test_regmean_rank_deficient_gram_falls_back_to_least_squares(caplog):
    generator = torch.Generator().manual_seed(7)
    basis = torch.randn(2, 6, generator=generator, dtype=torch.float64)  # inputs span 2 of 6 directions
    inputs = [torch.randn(8, 2, generator=generator, dtype=torch.float64) @ basis for _ in range(2)]
    grams = torch.stack([x.T @ x for x in inputs])
    taus = torch.randn(2, 3, 6, generator=generator, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="hf_sta.methods.regmean"):
        delta = regmean(taus.float(), torch.ones(2), gram=grams.float(), alpha=1.0).double()
    assert "singular" in caplog.text
    assert torch.isfinite(delta).all() and delta.abs().max() < 10 * taus.abs().max()
    # The merged layer reproduces the least-squares outputs on the data it was given.
    stacked = torch.cat(inputs)
    targets = torch.cat([x @ t.T for x, t in zip(inputs, taus)])
    expected = torch.linalg.lstsq(stacked, targets, driver="gelsd").solution.T
    torch.testing.assert_close(stacked @ delta.T, stacked @ expected.T, atol=1e-3, rtol=1e-4)


def test_regmean_badly_scaled_features_are_not_singular(caplog):
    """Activations of language models differ in scale by orders of magnitude; that is no reason to fall back."""
    generator = torch.Generator().manual_seed(8)
    scales = torch.tensor([1e-3, 1e-2, 1.0, 10.0, 1e2, 1e3], dtype=torch.float64)
    inputs = [torch.randn(30, 6, generator=generator, dtype=torch.float64) * scales for _ in range(2)]
    grams = torch.stack([x.T @ x for x in inputs])
    taus = torch.randn(2, 3, 6, generator=generator, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="hf_sta.methods.regmean"):
        delta = regmean(taus, torch.ones(2, dtype=torch.float64), gram=grams, alpha=1.0)
    assert caplog.text == ""
    targets = torch.cat([x @ t.T for x, t in zip(inputs, taus)])
    expected = torch.linalg.lstsq(torch.cat(inputs), targets).solution.T
    torch.testing.assert_close(delta, expected, atol=1e-8, rtol=1e-6)


def test_regmean_all_zero_gram_gives_the_mean():
    taus = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(7))
    delta = regmean(taus, torch.tensor([1.0, 3.0]), gram=torch.zeros(2, 4, 4), alpha=0.9)
    torch.testing.assert_close(delta, (taus[0] + 3 * taus[1]) / 4, atol=1e-6, rtol=1e-5)


def test_regmean_does_not_modify_its_inputs():
    _, _, taus, grams = _regression_problem(seed=8)
    taus_before, grams_before = taus.clone(), grams.clone()
    regmean(taus, torch.ones(3, dtype=torch.float64), gram=grams, alpha=0.5)  # fp64 inputs: no copy by .to()
    assert torch.equal(taus, taus_before) and torch.equal(grams, grams_before)


def test_regmean_rejects_bad_inputs():
    _, _, taus, grams = _regression_problem()
    taus = taus.float()
    with pytest.raises(ValueError, match=r"gram must have shape \[3, 6, 6\]"):
        regmean(taus, torch.ones(3), gram=grams[:, :5, :5].float())
    with pytest.raises(ValueError, match="gram_layout"):
        regmean(taus, torch.ones(3), gram=grams.float(), gram_layout="rows")
    with pytest.raises(ValueError, match="w_t >= 0"):
        regmean(taus, torch.tensor([1.0, -1.0, 1.0]), gram=grams.float())
    with pytest.raises(ValueError, match="2-D weights"):
        regmean(torch.zeros(3, 6), torch.ones(3), gram=grams.float())


def test_regmean_registration():
    method = get_merge_method("regmean")
    assert method.requires == ("gram",)
    assert method.validate_params({}) == {"alpha": 0.9, "other": "average"}
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        method.validate_params({"alpha": 1.5})
    with pytest.raises(ValueError, match="other must be one of"):
        method.validate_params({"other": "ties"})
    assert method.paper_url == "https://arxiv.org/abs/2212.09849"


# -- Fisher ----------------------------------------------------------------------------------------------------------


def test_fisher_is_the_fisher_weighted_mean():
    generator = torch.Generator().manual_seed(10)
    taus = torch.randn(3, 4, 5, generator=generator)
    fishers = torch.rand(3, 4, 5, generator=generator) + 1e-3  # above the floor: the floor changes nothing
    weights = torch.tensor([0.2, 0.5, 0.3])
    delta = fisher(taus, weights, fisher=fishers)
    weighted = weights[:, None, None] * fishers
    torch.testing.assert_close(delta, (weighted * taus).sum(0) / weighted.sum(0))
    # theta_0 + delta is the Fisher-weighted mean of the fine-tuned models.
    base = torch.randn(4, 5, generator=generator)
    expected = (weighted * (base + taus)).sum(0) / weighted.sum(0)
    torch.testing.assert_close(base + delta, expected, atol=1e-6, rtol=1e-5)


def test_fisher_entries_without_information_keep_the_weighted_mean():
    taus = torch.tensor([[1.0, 2.0, 3.0], [5.0, 6.0, 7.0]])
    fishers = torch.tensor([[0.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
    weights = torch.tensor([1.0, 3.0])
    mean = (taus[0] + 3 * taus[1]) / 4
    for eps in (0.0, 1e-6):
        delta = fisher(taus, weights, fisher=fishers, eps=eps)
        torch.testing.assert_close(delta[[0, 2]], mean[[0, 2]])
        torch.testing.assert_close(delta[1], (1 * 1 * 2.0 + 3 * 3 * 6.0) / (1 + 9) * torch.ones(()))


def test_fisher_floor():
    taus = torch.tensor([[1.0], [3.0]])
    tiny = torch.tensor([[0.0], [1e-8]])
    weights = torch.ones(2)
    # Without a floor the one task with any information wins the entry.
    torch.testing.assert_close(fisher(taus, weights, fisher=tiny, eps=0.0), torch.tensor([3.0]))
    # With the floor both values count as eps: the plain mean.
    torch.testing.assert_close(fisher(taus, weights, fisher=tiny, eps=1e-6), torch.tensor([2.0]))
    # A floor is a max, not an addition: values above it are untouched.
    large = torch.tensor([[1e-2], [3e-2]])
    torch.testing.assert_close(fisher(taus, weights, fisher=large, eps=1e-6), torch.tensor([(1e-2 + 9e-2) / 4e-2]))
    # Negative values (not a Fisher) count as zero information.
    negative = torch.tensor([[-5.0], [1.0]])
    torch.testing.assert_close(fisher(taus, weights, fisher=negative, eps=0.0), torch.tensor([3.0]))


def test_fisher_rejects_bad_inputs():
    taus = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="metric='fisher'"):
        fisher(taus, torch.ones(2))
    with pytest.raises(ValueError, match="shape of task_tensors"):
        fisher(taus, torch.ones(2), fisher=torch.ones(2, 4))
    with pytest.raises(ValueError, match="non-finite"):
        fisher(taus, torch.ones(2), fisher=torch.tensor([[1.0, float("inf"), 1.0], [1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="w_t >= 0"):
        fisher(taus, torch.tensor([1.0, -2.0]), fisher=torch.ones(2, 3))
    with pytest.raises(ValueError, match="w_t >= 0"):
        fisher(taus, torch.zeros(2), fisher=torch.ones(2, 3))


def test_fisher_registration_and_inputs_untouched():
    method = get_merge_method("fisher")
    assert method.requires == ("fisher",)
    assert method.validate_params({}) == {"eps": 1e-6}
    with pytest.raises(ValueError, match="eps must be in"):
        method.validate_params({"eps": -1.0})
    taus = torch.randn(2, 3)
    fishers = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 1.0]])
    taus_before, fishers_before = taus.clone(), fishers.clone()
    fisher(taus, torch.ones(2), fisher=fishers)
    assert torch.equal(taus, taus_before) and torch.equal(fishers, fishers_before)
