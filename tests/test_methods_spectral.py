"""Tests for hf_sta.methods.tsv and hf_sta.methods.iso against independent NumPy (fp64) oracles of the papers' code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_sta.methods import get_merge_method, list_merge_methods
from hf_sta.methods.iso import common_and_task_ranks, iso_c, iso_cts
from hf_sta.methods.tsv import tsv

SHAPES = [(12, 8), (8, 12)]
WEIGHTS = [1.0, 0.5, 2.0]


def random_task_tensors(shape, num_tasks=3, seed=0, dtype=torch.float32):
    return torch.randn(num_tasks, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def numpy_svd(matrix):
    left, values, right_t = np.linalg.svd(matrix, full_matrices=False)
    return left, values, right_t


def numpy_procrustes(matrix):
    left, _, right_t = numpy_svd(matrix)
    return left @ right_t


# -- oracles: the authors' loops, with NumPy, in fp64 ----------------------------------------------------------------
def oracle_tsv(task_tensors, weights, fraction=None):
    """TSV-M as in TSVM_utils.compute_and_sum_svd_mem_reduction (zero-padded buffers; the lossless variant at 1)."""
    tasks = [t.double().numpy() for t in task_tensors]
    num_tasks = len(tasks)
    rows, cols = tasks[0].shape
    rank = min(rows, cols)
    fraction = 1 / num_tasks if fraction is None else fraction
    keep = int(rank * fraction)
    width = max(rank, keep * num_tasks)
    sum_u, sum_s, sum_v = np.zeros((rows, width)), np.zeros(width), np.zeros((width, cols))
    for i, task in enumerate(tasks):
        u, s, v = numpy_svd(task)
        sum_u[:, i * keep : (i + 1) * keep] = u[:, :keep]
        sum_s[i * keep : (i + 1) * keep] = s[:keep] * weights[i]
        sum_v[i * keep : (i + 1) * keep, :] = v[:keep, :]
    u_u, _, v_u = numpy_svd(sum_u)
    u_v, _, v_v = numpy_svd(sum_v)
    return np.linalg.multi_dot((u_u, v_u, np.diag(sum_s), u_v, v_v))


def oracle_iso_c(task_tensors, weights):
    summed = sum(w * t.double().numpy() for w, t in zip(weights, task_tensors))
    u, s, v = numpy_svd(summed)
    return np.linalg.multi_dot((u, np.diag(np.full_like(s, s.mean())), v))


def oracle_iso_cts(task_tensors, weights, common_space_fraction=0.8):
    """Iso-CTS as in iso-merging's src/utils/iso.py (preallocated buffers, explicit projector)."""
    tasks = [w * t.double().numpy() for w, t in zip(weights, task_tensors)]
    num_tasks = len(tasks)
    rows, cols = tasks[0].shape
    rank = min(rows, cols)
    common = int(rank * common_space_fraction)
    common = rank - round((rank - common) / num_tasks) * num_tasks
    per_task = int((rank - common) / num_tasks)
    u, s, v = numpy_svd(sum(tasks))
    common_u, common_s, common_v = u[:, :common], s[:common], v[:common, :]
    projector = np.eye(rows) - common_u @ common_u.T
    comb_u, comb_s, comb_v = np.zeros((rows, rank)), np.zeros(rank), np.zeros((rank, cols))
    for i, task in enumerate(tasks):
        u_ts, s_ts, v_ts = numpy_svd(projector @ task)
        comb_u[:, i * per_task : (i + 1) * per_task] = u_ts[:, :per_task]
        comb_s[i * per_task : (i + 1) * per_task] = s_ts[:per_task]
        comb_v[i * per_task : (i + 1) * per_task, :] = v_ts[:per_task, :]
    start = num_tasks * per_task
    comb_u[:, start : start + common] = common_u
    comb_s[start : start + common] = common_s
    comb_v[start : start + common, :] = common_v
    return numpy_procrustes(comb_u) @ np.diag(np.full(rank, comb_s.mean())) @ numpy_procrustes(comb_v)


def assert_matches(actual, expected, tolerance=1e-5):
    torch.testing.assert_close(actual.double(), torch.from_numpy(expected), rtol=tolerance, atol=tolerance)


# -- TSV ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fraction", [None, 0.5, 1.0])
def test_tsv_matches_oracle(shape, fraction):
    task_tensors = random_task_tensors(shape)
    out = tsv(task_tensors, torch.tensor(WEIGHTS), rank_fraction=fraction)
    assert out.shape == shape and out.dtype == torch.float32
    assert_matches(out, oracle_tsv(task_tensors, WEIGHTS, fraction))


def test_tsv_fp64_matches_oracle_tightly():
    task_tensors = random_task_tensors((12, 8), dtype=torch.float64)
    out = tsv(task_tensors, torch.tensor(WEIGHTS))
    assert out.dtype == torch.float64
    assert_matches(out, oracle_tsv(task_tensors, WEIGHTS), tolerance=1e-10)


def test_tsv_singular_values_are_the_kept_weighted_ones():
    """U_perp, V_perp are orthonormal: the spectrum of delta is {|w_t| s_t,i : i < k}, k = int(8 / 3) = 2."""
    task_tensors = random_task_tensors((12, 8))
    weights = torch.tensor([1.0, -0.5, 2.0])
    out = tsv(task_tensors, weights).double()
    kept = torch.cat([w.abs() * torch.linalg.svdvals(t.double())[:2] for w, t in zip(weights.double(), task_tensors)])
    spectrum = torch.linalg.svdvals(out)
    torch.testing.assert_close(spectrum[:6], kept.sort(descending=True).values, rtol=1e-5, atol=1e-5)
    assert spectrum[6:].abs().max() < 1e-5  # rank T k = 6 of 8


def test_tsv_weights_equal_scaled_task_vectors():
    task_tensors = random_task_tensors((8, 12))
    weights = torch.tensor([1.5, -0.5, 2.0])
    scaled = task_tensors * weights.view(-1, 1, 1)
    torch.testing.assert_close(tsv(task_tensors, weights), tsv(scaled, torch.ones(3)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_tsv_single_task_full_rank_is_identity(shape):
    task_tensors = random_task_tensors(shape, num_tasks=1)
    torch.testing.assert_close(tsv(task_tensors, torch.ones(1)), task_tensors[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tsv(task_tensors, torch.tensor([3.0])), 3 * task_tensors[0], rtol=1e-5, atol=1e-5)


def test_tsv_keeps_top_triplets_of_a_single_task():
    task_tensors = random_task_tensors((12, 8), num_tasks=1)
    u, s, v = torch.linalg.svd(task_tensors[0].double(), full_matrices=False)
    expected = (u[:, :4] * s[:4]) @ v[:4]
    torch.testing.assert_close(
        tsv(task_tensors, torch.ones(1), rank_fraction=0.5).double(), expected, atol=1e-5, rtol=0
    )


def test_tsv_matrix_with_fewer_rows_than_tasks_is_zero():
    out = tsv(random_task_tensors((2, 5)), torch.ones(3))  # k = int(2 / 3) = 0, as in the authors' code
    assert torch.equal(out, torch.zeros(2, 5))


# -- Iso-C / Iso-CTS ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_iso_c_matches_oracle(shape):
    task_tensors = random_task_tensors(shape, seed=1)
    out = iso_c(task_tensors, torch.tensor(WEIGHTS))
    assert out.shape == shape and out.dtype == torch.float32
    assert_matches(out, oracle_iso_c(task_tensors, WEIGHTS))


def test_iso_c_single_task():
    task = random_task_tensors((8, 12), num_tasks=1, seed=2)
    u, s, v = np.linalg.svd(task[0].double().numpy(), full_matrices=False)
    assert_matches(iso_c(task, torch.ones(1)), s.mean() * (u @ v))
    spectrum = torch.linalg.svdvals(iso_c(task, torch.ones(1)).double())
    torch.testing.assert_close(spectrum, torch.full((8,), float(s.mean()), dtype=torch.float64), rtol=1e-5, atol=0)


def test_iso_c_rank_tolerance_flattens_only_the_numerical_rank_of_low_rank_task_vectors():
    """Closed form: three rank-2 updates on orthonormal directions sum to U diag(s) V^T of rank 6, known exactly;
    with a tolerance above the SVD's noise, Iso-C is mean(s) U V^T (rank 6); at 0 the mean spreads over all 20."""
    generator = torch.Generator().manual_seed(5)
    left = torch.linalg.qr(torch.randn(20, 6, dtype=torch.float64, generator=generator))[0]
    right = torch.linalg.qr(torch.randn(30, 6, dtype=torch.float64, generator=generator))[0]
    values = torch.tensor([5.0, 4.0, 3.0, 2.5, 2.0, 1.0], dtype=torch.float64)
    tasks = torch.stack([left[:, 2 * t : 2 * t + 2] @ torch.diag(values[2 * t : 2 * t + 2]) @ right[:, 2 * t : 2 * t + 2].T
                         for t in range(3)])  # fmt: skip
    out = iso_c(tasks, torch.ones(3, dtype=torch.float64), rank_tolerance=1e-6)
    torch.testing.assert_close(out, values.mean() * left @ right.T, rtol=1e-10, atol=1e-12)
    assert int(torch.linalg.matrix_rank(out)) == 6
    # the paper's (all 20 values flattened): 14 of the 20 directions are an arbitrary basis of the sum's null space
    # (no oracle can match them); on the signal subspace the update is values.sum() / 20, not values.mean()
    full = iso_c(tasks, torch.ones(3, dtype=torch.float64))
    flat = float(values.sum()) / 20
    torch.testing.assert_close(torch.linalg.svdvals(full), torch.full((20,), flat, dtype=torch.float64))
    torch.testing.assert_close(left.T @ full @ right, flat * torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(iso_c(tasks, torch.ones(3, dtype=torch.float64), rank_tolerance=0.45),
                               values[:4].mean() * left[:, :4] @ right[:, :4].T, rtol=1e-10, atol=1e-12)  # fmt: skip
    with pytest.raises(ValueError, match="rank_tolerance must be in"):
        iso_c(tasks, torch.ones(3, dtype=torch.float64), rank_tolerance=1.5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.3])
def test_iso_cts_matches_oracle(shape, fraction):
    task_tensors = random_task_tensors(shape, seed=3)
    out = iso_cts(task_tensors, torch.tensor(WEIGHTS), common_space_fraction=fraction)
    assert out.shape == shape and out.dtype == torch.float32
    assert_matches(out, oracle_iso_cts(task_tensors, WEIGHTS, fraction))


def test_iso_cts_fp64_matches_oracle_tightly():
    task_tensors = random_task_tensors((8, 12), seed=4, dtype=torch.float64)
    assert_matches(iso_cts(task_tensors, torch.tensor(WEIGHTS)), oracle_iso_cts(task_tensors, WEIGHTS), 1e-10)


def test_iso_cts_spectrum_is_isotropic_and_differs_from_iso_c():
    task_tensors = random_task_tensors((12, 8), seed=5)
    out = iso_cts(task_tensors, torch.ones(3)).double()
    spectrum = torch.linalg.svdvals(out)
    torch.testing.assert_close(spectrum, spectrum.mean().expand(8), rtol=1e-5, atol=0)
    assert (out - iso_c(task_tensors, torch.ones(3)).double()).abs().max() > 1e-2  # the task subspaces matter


def test_iso_cts_all_common_is_iso_c():
    task_tensors = random_task_tensors((12, 8), seed=6)
    weights = torch.tensor(WEIGHTS)
    torch.testing.assert_close(
        iso_cts(task_tensors, weights, common_space_fraction=1.0), iso_c(task_tensors, weights), rtol=1e-5, atol=1e-5
    )


def test_common_and_task_ranks():
    assert common_and_task_ranks(8, 3, 0.8) == (5, 1)  # int(6.4) = 6; round(2 / 3) = 1
    assert common_and_task_ranks(768, 8, 0.8) == (616, 19)  # ViT-B MLP: int(614.4) = 614; round(19.25) = 19
    assert common_and_task_ranks(8, 3, 1.0) == (8, 0)
    assert common_and_task_ranks(10, 4, 0.0) == (2, 2)  # round(2.5) = 2 (half to even, as Python)
    assert common_and_task_ranks(10, 6, 0.0) == (4, 1)  # the authors' formula gives d = 2, c = -2: capped
    out = iso_cts(random_task_tensors((10, 12), num_tasks=6), torch.ones(6), common_space_fraction=0.0)
    assert out.shape == (10, 12) and torch.isfinite(out).all()


# -- shared behaviour --------------------------------------------------------------------------------------------------
KERNELS = [tsv, iso_c, iso_cts]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [(), (7,), (4, 3, 2)])
def test_non_matrices_are_averaged(kernel, shape):
    task_tensors = random_task_tensors(shape)
    weights = torch.tensor(WEIGHTS)
    expected = sum(w * t for w, t in zip(WEIGHTS, task_tensors.double())) / 3
    out = kernel(task_tensors, weights)
    assert out.shape == shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [(12, 8), (7,)])
def test_inputs_unchanged_and_new_tensor(kernel, shape):
    for num_tasks in (1, 3):
        task_tensors = random_task_tensors(shape, num_tasks=num_tasks)
        weights = torch.linspace(0.5, 1.5, num_tasks)
        before = (task_tensors.clone(), weights.clone())
        out = kernel(task_tensors, weights)
        assert torch.equal(task_tensors, before[0]) and torch.equal(weights, before[1])
        out.add_(1.0)
        assert torch.equal(task_tensors, before[0])


@pytest.mark.parametrize("kernel", KERNELS)
def test_half_precision_is_computed_in_fp32(kernel):
    task_tensors = random_task_tensors((12, 8)).to(torch.bfloat16)
    out = kernel(task_tensors, torch.ones(3))
    expected = kernel(task_tensors.float(), torch.ones(3))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.to(torch.bfloat16).float())


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_boundary_checks(kernel):
    with pytest.raises(ValueError, match="weights must have shape"):
        kernel(random_task_tensors((4, 5)), torch.ones(2))
    with pytest.raises(ValueError, match="task_tensors must"):
        kernel(torch.ones(3, 4, 5, dtype=torch.int64), torch.ones(3))


def test_registry_metadata():
    names = list_merge_methods()
    expected = {
        "tsv": ("TSV-Merge", "https://arxiv.org/abs/2412.00081", {"rank_fraction": None}),
        "iso_c": ("Iso-C", "https://arxiv.org/abs/2502.04959", {"rank_tolerance": 0.0}),
        "iso_cts": ("Iso-CTS", "https://arxiv.org/abs/2502.04959", {"common_space_fraction": 0.8}),
    }
    for name, (pretty_name, paper_url, defaults) in expected.items():
        assert name in names
        method = get_merge_method(name)
        assert method.pretty_name == pretty_name and method.paper_url == paper_url and method.paper_title
        assert method.defaults == defaults and not method.stochastic and method.requires == ()
        assert method.function is {"tsv": tsv, "iso_c": iso_c, "iso_cts": iso_cts}[name]


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("tsv", {"rank_fraction": 0.0}),
        ("tsv", {"rank_fraction": 1.5}),
        ("tsv", {"rank_fraction": "many"}),
        ("iso_cts", {"common_space_fraction": -0.1}),
        ("iso_cts", {"common_space_fraction": 1.1}),
        ("iso_c", {"common_space_fraction": 0.5}),
    ],
)
def test_invalid_params_raise(name, params):
    with pytest.raises(ValueError, match=next(iter(params))):
        get_merge_method(name).validate_params(params)


def test_kernels_reject_invalid_params_directly():
    task_tensors = random_task_tensors((12, 8))
    with pytest.raises(ValueError, match="rank_fraction"):
        tsv(task_tensors, torch.ones(3), rank_fraction=0.0)
    with pytest.raises(ValueError, match="common_space_fraction"):
        iso_cts(task_tensors, torch.ones(3), common_space_fraction=1.5)
    assert get_merge_method("tsv").validate_params({"rank_fraction": "0.25"}) == {"rank_fraction": 0.25}


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts", "cart", "wudi"])
def test_pointwise_convolutions_are_merged_as_their_channel_matrices(name):
    """A [T, out, in, 1, 1] stack gives the [out, in] matrix result of the same numbers, reshaped; a 3x3 kernel gets
    the method's rule for tensors that are not matrices (never the matrix path)."""
    kernel = get_merge_method(name).function
    matrices = random_task_tensors((6, 5), seed=7)
    weights = torch.tensor(WEIGHTS)
    params = {"steps": 20} if name == "wudi" else {}
    expected = kernel(matrices, weights, **params)
    merged = kernel(matrices.reshape(3, 6, 5, 1, 1), weights, **params)
    assert merged.shape == (6, 5, 1, 1)
    torch.testing.assert_close(merged.reshape(6, 5), expected, rtol=0, atol=0)
    assert not torch.allclose(expected, matrices.mean(0))  # the matrix path is not the mean
    spatial = random_task_tensors((6, 5, 3, 3), seed=8)
    mean = (spatial * weights.view(-1, 1, 1, 1, 1)).sum(0) / (weights.sum() if name == "cart" else 3)
    torch.testing.assert_close(kernel(spatial, weights, **params), mean)
