"""Tests for hf_sta.methods.wudi and hf_sta.methods.cart against independent oracles."""

from __future__ import annotations

import pytest
import torch

from hf_sta.methods import get_merge_method, list_merge_methods
from hf_sta.methods.cart import cart
from hf_sta.methods.wudi import wudi


def task_vectors(num_tasks: int, rows: int, cols: int, seed: int, scale: float = 1e-3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(num_tasks, rows, cols, generator=generator, dtype=torch.float64) * scale).float()


def wudi_objective(delta: torch.Tensor, taus: torch.Tensor, weights: torch.Tensor) -> float:
    """sum_t w_t / ||tau_t||^2 ||(delta - tau_t) tau_t^T||_F^2, in fp64, written from the paper's formula."""
    delta, taus, weights = delta.double(), taus.double(), weights.double()
    total = 0.0
    for task in range(taus.shape[0]):
        residual = (delta - taus[task]) @ taus[task].T
        total += float(weights[task] / taus[task].norm() ** 2 * residual.norm() ** 2)
    return total


def wudi_lstsq_oracle(taus: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The objective as one least-squares problem: ||tau_t delta^T - tau_t tau_t^T||^2 = ||(delta - tau_t) tau_t^T||^2.

    Design matrix: rows sqrt(w_t) / ||tau_t|| tau_t stacked over t ([T out, in]); targets the same rows times
    tau_t^T ([T out, out]); the minimum-norm solution is delta^T.
    """
    taus, weights = taus.double(), weights.double()
    factors = [weights[t].sqrt() / taus[t].norm() for t in range(taus.shape[0])]
    design = torch.cat([factor * taus[t] for t, factor in enumerate(factors)])
    targets = torch.cat([factor * taus[t] @ taus[t].T for t, factor in enumerate(factors)])
    return torch.linalg.lstsq(design, targets, driver="gelsd").solution.T


def torch_adam_oracle(taus: torch.Tensor, steps: int, learning_rate: float) -> torch.Tensor:
    """The authors' loop (vit/wudi_main.py) with torch.optim.Adam and autograd."""
    vectors = taus.clone()
    merged = torch.nn.Parameter(vectors.sum(dim=0))
    optimizer = torch.optim.Adam([merged], lr=learning_rate, weight_decay=0)
    squared_norms = vectors.reshape(vectors.shape[0], -1).norm(dim=-1).square()
    for _ in range(steps):
        product = (merged.unsqueeze(0) - vectors) @ vectors.transpose(1, 2)
        loss = torch.sum(product.square() / squared_norms[:, None, None])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return merged.detach()


def cart_oracle(taus: torch.Tensor, weights: torch.Tensor, rank_ratio: float, coefficient: float) -> torch.Tensor:
    """theta_avg + lambda sum_t SVD_k(theta_t - theta_avg), with theta_0 = 0, in fp64, one task at a time."""
    taus, weights = taus.double(), weights.double()
    normalised = weights / weights.sum()
    theta_avg = sum(normalised[t] * taus[t] for t in range(taus.shape[0]))
    rank = max(1, int(rank_ratio * min(taus.shape[1:])))
    low_rank_sum = torch.zeros_like(theta_avg)
    for t in range(taus.shape[0]):
        left, values, right_t = torch.linalg.svd(taus[t] - theta_avg)
        truncated = torch.zeros_like(theta_avg)
        for i in range(rank):  # rank-one terms, written independently of the kernel's slicing
            truncated += values[i] * torch.outer(left[:, i], right_t[i])
        low_rank_sum += taus.shape[0] * normalised[t] * truncated
    return theta_avg + coefficient * low_rank_sum


# ---- WUDI ----


@pytest.mark.parametrize("shape", [(3, 12, 8), (4, 6, 10), (2, 9, 9)])
@pytest.mark.parametrize("weighted", [False, True])
def test_wudi_closed_form_matches_lstsq(shape, weighted):
    taus = task_vectors(*shape, seed=0)
    weights = torch.tensor([1.0, 0.5, 2.0, 0.25][: shape[0]]) if weighted else torch.ones(shape[0])
    expected = wudi_lstsq_oracle(taus, weights).float()
    out = wudi(taus, weights, solver="closed_form", ridge=1e-9)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-7)
    # The oracle is the minimiser: the merge reduces the objective below that of task arithmetic's sum.
    assert wudi_objective(out, taus, weights) < wudi_objective(taus.sum(0), taus, weights)


def test_wudi_closed_form_rank_deficient_is_minimum_norm():
    # T * out = 8 < in = 20: M has rank 8, the minimiser is not unique; a small ridge picks the minimum-norm one.
    taus = task_vectors(2, 4, 20, seed=1)
    weights = torch.ones(2)
    expected = wudi_lstsq_oracle(taus, weights)
    start = wudi_objective(taus.sum(0), taus, weights)
    # In fp64 (computed in fp64 throughout) a tiny ridge gives the minimum-norm solution itself.
    out = wudi(taus.double(), weights.double(), solver="closed_form", ridge=1e-8)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-10)
    # Here the minimum is 0: delta agrees with every tau_t on tau_t's own row space.
    assert wudi_objective(out, taus, weights) < 1e-12 * start
    # In fp32 the default ridge stays near it, without blowing up the directions M lacks.
    out = wudi(taus, weights, solver="closed_form")
    assert wudi_objective(out, taus, weights) < 1e-5 * start
    assert (out.double() - expected).norm() < 1e-2 * expected.norm()  # the ridge's shrinkage


def test_wudi_closed_form_singular_system_falls_back_to_lstsq():
    # The last 3 inputs are never used by any task: M has exact zero rows and columns, and ridge 0 leaves it singular.
    taus = task_vectors(3, 5, 8, seed=2)
    taus[:, :, 5:] = 0.0
    weights = torch.tensor([1.0, 2.0, 1.0])
    gram = sum(taus[t].T @ taus[t] for t in range(3))
    assert int(torch.linalg.solve_ex(gram.double(), torch.ones(8, 1, dtype=torch.float64)).info) != 0
    out = wudi(taus, weights, solver="closed_form", ridge=0.0)
    torch.testing.assert_close(out, wudi_lstsq_oracle(taus, weights).float(), rtol=1e-4, atol=1e-7)
    assert torch.equal(out[:, 5:], torch.zeros(5, 3))  # the minimum-norm solution leaves unused inputs alone


def test_wudi_adam_matches_authors_loop():
    taus = task_vectors(3, 20, 12, seed=3)
    expected = torch_adam_oracle(taus, steps=300, learning_rate=1e-5)
    out = wudi(taus, torch.ones(3))  # the defaults: solver="adam", 300 steps, lr 1e-5
    assert (expected - taus.sum(0)).abs().max() > 1e-3  # Adam moved (the check below is not trivial)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)


def test_wudi_adam_reaches_closed_form_objective():
    # Well-conditioned: out * T >> in, entries O(1); a learning rate matched to that scale.
    taus = task_vectors(3, 30, 6, seed=4, scale=1.0)
    weights = torch.tensor([1.0, 2.0, 0.5])
    closed = wudi(taus, weights, solver="closed_form")
    adam = wudi(taus, weights, solver="adam", steps=1000, learning_rate=1e-2)
    start, best = wudi_objective(taus.sum(0), taus, weights), wudi_objective(closed, taus, weights)
    assert best < 0.5 * start
    assert wudi_objective(adam, taus, weights) - best < 1e-5 * (start - best)
    torch.testing.assert_close(adam, closed, rtol=0, atol=1e-2)


def test_wudi_steps_zero_returns_start_and_zero_weights_drop_tasks():
    taus = task_vectors(3, 8, 5, seed=5)
    torch.testing.assert_close(wudi(taus, torch.ones(3), steps=0), taus.sum(0))
    # A zero weight removes the task from the objective and from Adam's start.
    weights = torch.tensor([1.0, 0.0, 1.0])
    for solver in ("adam", "closed_form"):
        out = wudi(taus, weights, solver=solver)
        expected = wudi(taus[[0, 2]], torch.ones(2), solver=solver)
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("solver", ["adam", "closed_form"])
def test_wudi_single_task_returns_it(solver):
    taus = task_vectors(1, 7, 5, seed=6)
    out = wudi(taus, torch.tensor([0.3]), solver=solver)
    if solver == "adam":
        assert torch.equal(out, taus[0])  # the gradient at the start is exactly 0
    else:
        tiny_ridge = wudi(taus, torch.tensor([0.3]), solver=solver, ridge=1e-10)
        torch.testing.assert_close(tiny_ridge, taus[0], rtol=1e-4, atol=1e-9)
        assert (out - taus[0]).norm() < 1e-2 * taus[0].norm()  # the default ridge shrinks a little


def test_wudi_all_zero_and_not_2d():
    zeros = torch.zeros(2, 4, 3)
    assert torch.equal(wudi(zeros, torch.ones(2)), torch.zeros(4, 3))
    biases = task_vectors(3, 1, 6, seed=7)[:, 0]  # [T, 6]
    weights = torch.tensor([1.0, 2.0, 3.0])
    weighted_sum = (weights[:, None] * biases).sum(0)
    torch.testing.assert_close(wudi(biases, weights), weighted_sum / 3)
    torch.testing.assert_close(wudi(biases, weights, other_tensors="sum"), weighted_sum)
    assert torch.equal(wudi(biases, weights, other_tensors="zero"), torch.zeros(6))
    conv = task_vectors(2, 4, 9, seed=8).reshape(2, 4, 1, 3, 3)
    torch.testing.assert_close(wudi(conv, torch.ones(2)), conv.mean(0))


def test_wudi_float64_and_unmodified_inputs():
    taus = task_vectors(3, 6, 4, seed=9).double()
    weights = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    copies = taus.clone(), weights.clone()
    for solver in ("adam", "closed_form"):
        out = wudi(taus, weights, solver=solver)
        assert out.dtype == torch.float64 and out.shape == (6, 4)
    assert torch.equal(taus, copies[0]) and torch.equal(weights, copies[1])


@pytest.mark.parametrize(
    "params",
    [
        {"solver": "sgd"},
        {"steps": -1},
        {"steps": 2.5},
        {"learning_rate": 0.0},
        {"ridge": -1e-3},
        {"other_tensors": "max"},
    ],
)
def test_wudi_invalid_params(params):
    with pytest.raises(ValueError):
        wudi(task_vectors(2, 3, 3, seed=0), torch.ones(2), **params)
    with pytest.raises(ValueError):
        get_merge_method("wudi").validate_params(params)


def test_wudi_negative_weight_raises():
    with pytest.raises(ValueError, match="non-negative"):
        wudi(task_vectors(2, 3, 3, seed=0), torch.tensor([1.0, -1.0]))


# ---- CART ----


@pytest.mark.parametrize("shape", [(3, 20, 12), (4, 10, 25), (2, 16, 16)])
@pytest.mark.parametrize("rank_ratio, coefficient", [(0.08, 2.0), (0.25, 1.5), (0.5, 0.7)])
def test_cart_matches_direct_implementation(shape, rank_ratio, coefficient):
    taus = task_vectors(*shape, seed=10)
    weights = torch.ones(shape[0])
    expected = cart_oracle(taus, weights, rank_ratio, coefficient).float()
    out = cart(taus, weights, rank_ratio=rank_ratio, low_rank_coefficient=coefficient)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-7)
    gap = (out - taus.mean(0)).abs().max()
    if shape[0] == 2:  # c_2 = -c_1, so SVD_k(c_2) = -SVD_k(c_1): two equally weighted tasks give the average
        assert gap < 1e-8
    else:
        assert gap > 1e-4  # the low-rank part is there


def test_cart_weighted_matches_direct_implementation_and_is_scale_invariant():
    taus = task_vectors(3, 14, 9, seed=11)
    weights = torch.tensor([1.0, 3.0, 0.5])
    expected = cart_oracle(taus, weights, 0.3, 2.0).float()
    out = cart(taus, weights, rank_ratio=0.3)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(cart(taus, 10 * weights, rank_ratio=0.3), out, rtol=1e-4, atol=1e-7)


def test_cart_defaults_and_registry_defaults_agree():
    method = get_merge_method("cart")
    assert method.defaults == {"rank_ratio": 0.08, "low_rank_coefficient": 2.0}
    taus = task_vectors(3, 40, 30, seed=12)  # k = max(1, int(0.08 * 30)) = 2
    expected = cart_oracle(taus, torch.ones(3), 0.08, 2.0).float()
    torch.testing.assert_close(cart(taus, torch.ones(3)), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("rank_ratio", [0.0, 1.0])
def test_cart_extreme_ranks_give_the_average(rank_ratio):
    taus = task_vectors(3, 8, 6, seed=13)
    weights = torch.tensor([1.0, 2.0, 1.0])
    average = (weights[:, None, None] * taus).sum(0) / weights.sum()
    torch.testing.assert_close(cart(taus, weights, rank_ratio=rank_ratio), average)
    if rank_ratio == 1.0:  # the full-rank sum of the centred vectors really is 0
        oracle = cart_oracle(taus, weights, 1.0, 2.0).float()
        torch.testing.assert_close(oracle, average, rtol=1e-4, atol=1e-7)


def test_cart_single_task_and_not_2d():
    taus = task_vectors(1, 6, 5, seed=14)
    torch.testing.assert_close(cart(taus, torch.ones(1)), taus[0])
    torch.testing.assert_close(cart(taus, torch.tensor([0.2])), taus[0])
    biases = task_vectors(3, 1, 7, seed=15)[:, 0]
    weights = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(cart(biases, weights), (weights[:, None] * biases).sum(0) / 6)


def test_cart_float64_and_unmodified_inputs():
    taus = task_vectors(3, 9, 7, seed=16).double()
    weights = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    copies = taus.clone(), weights.clone()
    out = cart(taus, weights, rank_ratio=0.3)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, cart_oracle(taus, weights, 0.3, 2.0), rtol=1e-10, atol=1e-14)
    assert torch.equal(taus, copies[0]) and torch.equal(weights, copies[1])


@pytest.mark.parametrize("params", [{"rank_ratio": -0.1}, {"rank_ratio": 1.5}, {"low_rank_coefficient": -1.0}])
def test_cart_invalid_params(params):
    with pytest.raises(ValueError):
        cart(task_vectors(2, 3, 3, seed=0), torch.ones(2), **params)
    with pytest.raises(ValueError):
        get_merge_method("cart").validate_params(params)


def test_cart_zero_weight_sum_raises():
    with pytest.raises(ValueError, match="non-zero sum"):
        cart(task_vectors(2, 3, 3, seed=0), torch.tensor([1.0, -1.0]))


# ---- registry ----


@pytest.mark.parametrize(
    "name, url", [("wudi", "https://arxiv.org/abs/2503.08099"), ("cart", "https://arxiv.org/abs/2412.12153")]
)
def test_registered_with_paper(name, url):
    assert name in list_merge_methods()
    method = get_merge_method(name)
    assert method.paper_url == url
    assert method.paper_title and method.pretty_name and method.description
    assert not method.stochastic and method.requires == ()
    assert method.function is {"wudi": wudi, "cart": cart}[name]


def test_wudi_registry_defaults():
    assert get_merge_method("wudi").defaults == {
        "solver": "adam",
        "steps": 300,
        "learning_rate": 1e-5,
        "ridge": 1e-4,
        "other_tensors": "mean",
    }


@pytest.mark.parametrize("name", ["wudi", "cart"])
def test_kernel_contract(name):
    method = get_merge_method(name)
    params = method.validate_params({})
    task_tensors = task_vectors(3, 4, 5, seed=17)
    weights = torch.tensor([1.0, 0.5, 2.0])
    before = task_tensors.clone(), weights.clone()
    out = method.function(task_tensors, weights, generator=torch.Generator().manual_seed(1), **params)
    assert out.shape == (4, 5) and out.dtype == torch.float32
    assert torch.equal(task_tensors, before[0]) and torch.equal(weights, before[1])
    assert method.function(torch.randn(1, 7), torch.ones(1), **params).shape == (7,)
    assert method.function(torch.randn(2), torch.ones(2), **params).shape == ()
    with pytest.raises(ValueError, match="weights must have shape"):
        method.function(task_tensors, torch.ones(2), **params)
    with pytest.raises(ValueError, match="task_tensors must"):
        method.function(torch.ones(3, 4, dtype=torch.int64), weights, **params)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["wudi", "cart"])
def test_half_precision_inputs_are_computed_in_fp32(name, dtype):
    method = get_merge_method(name)
    params = method.validate_params({})
    task_tensors = task_vectors(3, 10, 20, seed=18)
    out = method.function(task_tensors.to(dtype), torch.ones(3), **params)
    assert out.shape == (10, 20) and out.dtype == dtype and torch.isfinite(out).all()
    expected = method.function(task_tensors.to(dtype).float(), torch.ones(3), **params)
    torch.testing.assert_close(out, expected.to(dtype))
