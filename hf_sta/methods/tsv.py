"""``tsv``: TSV-Merge, task singular vectors decorrelated by orthogonal Procrustes (Gargiulo et al., CVPR 2025).

Per 2-D tensor (an ``[out, in]`` matrix, embeddings included), with ``r = min(out, in)`` and ``k`` singular triplets
kept per task::

    tau_t = U_t S_t V_t^T                                   (thin SVD, per task)
    U     = [U_1[:, :k] ... U_T[:, :k]]                     ([out, T k])
    S     = [w_1 S_1[:k] ... w_T S_T[:k]]                   ([T k])
    V     = [V_1[:, :k] ... V_T[:, :k]]                     ([in, T k])
    U_perp = P_U Q_U^T   with U = P_U Sigma_U Q_U^T          (orthogonal Procrustes: nearest orthonormal matrix)
    V_perp = P_V Q_V^T   with V = P_V Sigma_V Q_V^T
    delta  = U_perp diag(S) V_perp^T

as ``compute_and_sum_svd_mem_reduction`` ("TSVM") of the authors' code (github.com/AntoAndGar/task_singular_vectors,
``src/utils/TSVM_utils.py``): ``k = int(r * (1 / T))`` (``rank_fraction`` overrides ``1 / T``; ``rank_fraction=1``
is the code's "lossless" variant, ``compute_and_sum_svd_mem_reduction_lossless``). The code places the ``T k``
triplets in zero-padded ``[out, r]`` / ``[r]`` / ``[r, in]`` buffers; the zero columns do not change the Procrustes
factor of the others and meet zero singular values, so the result is the same.

Weights: ``S_t`` is multiplied by ``w_t``, which is the method run on the scaled task vectors ``w_t tau_t`` (a
negative ``w_t`` flips the rows of ``V_t^T``, and the Procrustes factor commutes with that sign flip).

1x1 convolution kernels ``[out, in, 1, 1]`` are merged as their ``[out, in]`` channel matrices
(``pointwise_convolutions_as_matrices``). Other tensors that are not 2-D (biases, norms, 0-D, larger conv kernels)
are averaged, as in the code:
``delta = sum_t w_t tau_t / T`` (the plain mean for unit weights). The code also averages CLIP's ``text_projection``
matrix, by name; a kernel sees no names, so every 2-D tensor is merged as a matrix here. Where
``k = int(r / T) = 0`` (a matrix with fewer rows or columns than tasks), the code keeps no triplet and its delta is 0;
so is this one's.

Scaling: the caller applies ``theta = theta_0 + scaling * delta``; ``scaling`` is the paper's ``alpha``. TSV-M is
used with ``alpha = 1.0`` (the caller's default; also FusionBench's default for TSV-M); the authors' scripts can also
pick ``alpha`` on validation data over ``0.1, 0.2, ..., 3.0``.
"""

from __future__ import annotations

import torch

from .registry import Parameter, check_kernel_inputs, pointwise_convolutions_as_matrices, register_merge_method
from .task_arithmetic import task_arithmetic

RANK_FRACTION = Parameter(
    "rank_fraction",
    float,
    None,
    "Fraction of each task's singular triplets kept per matrix, k = int(min(out, in) * rank_fraction); "
    "unset: 1 / T (the paper's), so that the T tasks together fill the rank.",
    low=0.0,
    high=1.0,
    low_inclusive=False,
    default_text="1 / T (T: the number of merged tasks)",
)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the SVDs run in: fp64 for fp64 inputs, fp32 otherwise (no half-precision SVD)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mean_of_task_vectors(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_t w_t tau_t / T``: how the spectral methods merge tensors that are not matrices (a new tensor)."""
    return task_arithmetic(task_tensors, weights).div_(task_tensors.shape[0])


def orthogonal_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (or rows, if wide): ``P Q^T`` from ``matrix = P Sigma Q^T``.

    The polar factor of ``matrix`` ``[m, n]``, the solution of the orthogonal Procrustes problem
    ``min ||X - matrix||_F`` over ``X^T X = I`` (``X X^T = I`` when ``m < n``); shape ``[m, n]``.
    """
    left, _, right_t = torch.linalg.svd(matrix, full_matrices=False)
    return left @ right_t


@register_merge_method(
    "tsv",
    pretty_name="TSV-Merge",
    paper_title="Task Singular Vectors: Reducing Task Interference in Model Merging",
    paper_url="https://arxiv.org/abs/2412.00081",
    parameters=(RANK_FRACTION,),
    description="Keep each task's top singular vectors per matrix, decorrelate them (Procrustes), recombine.",
)
@pointwise_convolutions_as_matrices
def tsv(
    task_tensors: torch.Tensor,
    weights: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    rank_fraction: float | None = None,
) -> torch.Tensor:
    """TSV-Merge: ``delta = U_perp diag(w S) V_perp^T`` per matrix (see the module docstring for every step).

    Args:
        task_tensors: ``[T, *shape]`` task vectors (fp32; other float dtypes are computed in fp32 and cast back,
            fp64 in fp64). Not modified.
        weights: ``[T]`` per-task weights ``w_t``, multiplying each task's singular values.
        generator: unused (deterministic method).
        rank_fraction: fraction of singular triplets kept per task, in ``(0, 1]``; ``None``: ``1 / T``.

    Returns:
        ``[*shape]`` merged delta (a new tensor); for 2-D ``shape = [out, in]``, of rank at most ``T k``.
    """
    weights = check_kernel_inputs(task_tensors, weights)
    if rank_fraction is not None and not 0.0 < rank_fraction <= 1.0:
        raise ValueError(f"rank_fraction must be in (0, 1], got {rank_fraction!r}")
    if task_tensors.dim() != 3:
        return mean_of_task_vectors(task_tensors, weights)
    num_tasks, rows, cols = task_tensors.shape
    dtype = compute_dtype(task_tensors.dtype)
    # int(r * (1 / T)), not r // T: the same float arithmetic as the authors' code.
    k = int(min(rows, cols) * (1 / num_tasks if rank_fraction is None else rank_fraction))
    if k == 0:
        return task_tensors.new_zeros((rows, cols))
    lefts, values, rights_t = [], [], []
    for task in range(num_tasks):
        left, singular_values, right_t = torch.linalg.svd(task_tensors[task].to(dtype), full_matrices=False)
        lefts.append(left[:, :k])
        values.append(singular_values[:k] * weights[task].to(dtype))
        rights_t.append(right_t[:k])
    left_perp = orthogonal_factor(torch.cat(lefts, dim=1))  # [out, T k]
    right_perp_t = orthogonal_factor(torch.cat(rights_t, dim=0))  # [T k, in]
    merged = (left_perp * torch.cat(values)) @ right_perp_t
    return merged.to(task_tensors.dtype)
