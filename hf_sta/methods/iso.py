"""``iso_c`` / ``iso_cts``: isotropic merging in the common (and task-specific) subspaces (Marczak et al., ICML 2025).

Per 2-D tensor (an ``[out, in]`` matrix, embeddings included), with ``r = min(out, in)`` and thin SVDs throughout:

Iso-C (``iso_c``), with ``eps = rank_tolerance``::

    M     = sum_t w_t tau_t = U S V^T                        (the task arithmetic sum)
    k     = #{i : s_i >= eps s_1}                            (eps = 0, the default: k = r)
    delta = mean(S_k) U_k V_k^T                              (the top-k singular values replaced by their mean)

Iso-CTS (``iso_cts``), with ``f = common_space_fraction``::

    c0 = int(r f);  d = round((r - c0) / T);  c = r - T d    (common rank c, d directions per task; c + T d = r)
    U_c, S_c, V_c = top-c triplets of SVD(M)                 (the common subspace)
    x_t = w_t tau_t - U_c U_c^T (w_t tau_t)                  (task t outside the common column space)
    U_t, S_t, V_t = top-d triplets of SVD(x_t)               (its task-specific subspace)
    U = [U_1 ... U_T U_c] ([out, r]),  S = [S_1 ... S_T S_c] ([r]),  V = [V_1 ... V_T V_c] ([in, r])
    delta = mean(S) U_perp V_perp^T,   U_perp = P Q^T for U = P Sigma Q^T (orthogonal Procrustes), same for V

as ``iso_c`` / ``iso_cts`` of the authors' code (github.com/danielm1405/iso-merging, ``src/utils/iso.py``;
``common_space_fraction: 0.8`` in ``config/method/iso_cts.yaml``). ``round`` is Python's (half to even), as there.
One guard the code lacks: ``d`` is capped at ``r // T``, so that ``c >= 0`` for small ``f`` and many tasks (e.g.
``f = 0``, ``r = 10``, ``T = 6`` gives ``d = 2`` and ``c = -2`` there); at the default ``f`` nothing changes. With
``f = 1`` (``d = 0``) Iso-CTS is Iso-C.

Weights: the methods run on the scaled task vectors ``w_t tau_t`` (the code has no weights: unit weights are it).
1x1 convolution kernels ``[out, in, 1, 1]`` are merged as their ``[out, in]`` channel matrices
(``pointwise_convolutions_as_matrices``). Other tensors that are not 2-D (biases, norms, 0-D, larger conv kernels)
are averaged, as in the code:
``delta = sum_t w_t tau_t / T``. The code also averages CLIP's ``text_projection`` matrix, by name; a kernel sees no
names, so every 2-D tensor is merged as a matrix here.

Scaling: the caller applies ``theta = theta_0 + scaling * delta``; ``scaling`` is the paper's ``alpha``, which the
authors select on validation data over ``0.1, 0.2, ..., 3.0``; FusionBench's examples use 1.5 for CLIP ViT-B/32 and
ViT-L/14 on eight tasks. The caller's default of 1.0 is not the paper's choice: set it.

``rank_tolerance`` is ours, not the paper's (its code flattens all ``r`` values, ``eps = 0``). It is for task vectors
of low rank: the sum of ``T`` LoRA updates of rank ``q`` has rank ``<= T q``, far below ``r``; flattening all ``r``
values spreads the mean over arbitrary directions of its null space (numerical noise) and divides the signal by
``r / k``. On three rank-8 SmolLM2 adapters (``k <= 24``, ``r = 576``) this took the merge back to the zero-shot
base (README, LoRA benchmark). With ``eps`` above the noise (``1e-3``) only the sum's numerical rank is flattened,
and the merged delta keeps that rank (it can be written as a LoRA adapter of rank ``k``).
"""

from __future__ import annotations

import torch

from .registry import Parameter, check_kernel_inputs, pointwise_convolutions_as_matrices, register_merge_method
from .task_arithmetic import task_arithmetic
from .tsv import compute_dtype, mean_of_task_vectors, orthogonal_factor

PAPER_TITLE = "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces"
PAPER_URL = "https://arxiv.org/abs/2502.04959"

RANK_TOLERANCE = Parameter(
    "rank_tolerance",
    float,
    0.0,
    "Iso-C flattens only the singular values >= rank_tolerance x the largest (the sum's numerical rank); 0 flattens "
    "all min(out, in), as the paper; ~1e-3 for LoRA task vectors, whose sum has a low rank.",
    low=0.0,
    high=1.0,
)
COMMON_SPACE_FRACTION = Parameter(
    "common_space_fraction",
    float,
    0.8,
    "Fraction of each matrix's rank min(out, in) given to the common subspace (top singular vectors of the sum); "
    "the rest is split equally among the tasks (0.8: the paper's).",
    low=0.0,
    high=1.0,
)


def common_and_task_ranks(rank: int, num_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """``(c, d)``: the common rank and the rank per task of Iso-CTS, with ``c + T d = rank`` (module docstring)."""
    per_task = round((rank - int(rank * common_space_fraction)) / num_tasks)
    per_task = min(per_task, rank // num_tasks)
    return rank - num_tasks * per_task, per_task


@register_merge_method(
    "iso_c",
    pretty_name="Iso-C",
    paper_title=PAPER_TITLE,
    paper_url=PAPER_URL,
    parameters=(RANK_TOLERANCE,),
    description="Sum the task vectors, then flatten each matrix's singular value spectrum to its mean.",
)
@pointwise_convolutions_as_matrices
def iso_c(
    task_tensors: torch.Tensor,
    weights: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    rank_tolerance: float = 0.0,
) -> torch.Tensor:
    """Iso-C: ``delta = mean(S_k) U_k V_k^T`` with ``sum_t w_t tau_t = U S V^T``, per matrix (module docstring).

    Args:
        task_tensors: ``[T, *shape]`` task vectors (fp32; other float dtypes are computed in fp32 and cast back,
            fp64 in fp64). Not modified.
        weights: ``[T]`` per-task weights ``w_t``.
        generator: unused (deterministic method).
        rank_tolerance: ``eps`` in ``[0, 1]``: keep the singular values ``>= eps * s_1`` (0: all of them).

    Returns:
        ``[*shape]`` merged delta (a new tensor); non-2-D tensors: ``sum_t w_t tau_t / T``.
    """
    weights = check_kernel_inputs(task_tensors, weights)
    if not 0.0 <= rank_tolerance <= 1.0:
        raise ValueError(f"rank_tolerance must be in [0, 1], got {rank_tolerance!r}")
    if task_tensors.dim() != 3:
        return mean_of_task_vectors(task_tensors, weights)
    dtype = compute_dtype(task_tensors.dtype)
    summed = task_arithmetic(task_tensors.to(dtype), weights.to(dtype))
    left, singular_values, right_t = torch.linalg.svd(summed, full_matrices=False)
    if rank_tolerance > 0:  # the values are sorted: keep the leading ones (at least the first)
        rank = int((singular_values >= rank_tolerance * singular_values[0]).sum())
        left, singular_values, right_t = left[:, :rank], singular_values[:rank], right_t[:rank]
    return (singular_values.mean() * (left @ right_t)).to(task_tensors.dtype)


@register_merge_method(
    "iso_cts",
    pretty_name="Iso-CTS",
    paper_title=PAPER_TITLE,
    paper_url=PAPER_URL,
    parameters=(COMMON_SPACE_FRACTION,),
    description="Common subspace of the sum plus per-task subspaces outside it, orthogonalised, isotropic spectrum.",
)
@pointwise_convolutions_as_matrices
def iso_cts(
    task_tensors: torch.Tensor,
    weights: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    common_space_fraction: float = 0.8,
) -> torch.Tensor:
    """Iso-CTS: ``delta = mean(S) U_perp V_perp^T`` over common and task triplets, per matrix (module docstring).

    Args:
        task_tensors: ``[T, *shape]`` task vectors (fp32; other float dtypes are computed in fp32 and cast back,
            fp64 in fp64). Not modified.
        weights: ``[T]`` per-task weights ``w_t``.
        generator: unused (deterministic method).
        common_space_fraction: fraction of the rank given to the common subspace, in ``[0, 1]``.

    Returns:
        ``[*shape]`` merged delta (a new tensor); non-2-D tensors: ``sum_t w_t tau_t / T``.
    """
    weights = check_kernel_inputs(task_tensors, weights)
    if not 0.0 <= common_space_fraction <= 1.0:
        raise ValueError(f"common_space_fraction must be in [0, 1], got {common_space_fraction!r}")
    if task_tensors.dim() != 3:
        return mean_of_task_vectors(task_tensors, weights)
    num_tasks, rows, cols = task_tensors.shape
    dtype = compute_dtype(task_tensors.dtype)
    scaled = task_tensors.to(dtype) * weights.to(dtype).view(-1, 1, 1)  # w_t tau_t, a new [T, out, in] tensor
    common, per_task = common_and_task_ranks(min(rows, cols), num_tasks, common_space_fraction)
    left, singular_values, right_t = torch.linalg.svd(scaled.sum(dim=0), full_matrices=False)
    common_left = left[:, :common]
    lefts, values, rights_t = [], [], []
    if per_task > 0:
        for task in range(num_tasks):
            outside = scaled[task] - common_left @ (common_left.T @ scaled[task])
            task_left, task_values, task_right_t = torch.linalg.svd(outside, full_matrices=False)
            lefts.append(task_left[:, :per_task])
            values.append(task_values[:per_task])
            rights_t.append(task_right_t[:per_task])
    left_perp = orthogonal_factor(torch.cat([*lefts, common_left], dim=1))  # [out, r]
    right_perp_t = orthogonal_factor(torch.cat([*rights_t, right_t[:common]], dim=0))  # [r, in]
    isotropic = torch.cat([*values, singular_values[:common]]).mean()
    return (isotropic * (left_perp @ right_perp_t)).to(task_tensors.dtype)
