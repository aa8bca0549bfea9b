"""``cart``: CART, Centered Arithmetic with Rank-reduced Task vectors (Choi et al., 2024).

"Revisiting Weight Averaging for Model Merging" (arXiv 2412.12153): weight averaging is task arithmetic centred at
the average, ``theta_avg = theta_0 + mean_t tau_t`` and ``theta_t = theta_avg + c_t`` with the centred task vectors
``c_t = tau_t - mean_t tau_t``, which sum to 0. CART adds back a low-rank approximation of each centred vector, per
2-D tensor (an ``[out, in]`` matrix)::

    tau_bar = sum_t p_t tau_t / T,            p_t = T w_t / sum_s w_s     (p_t = 1 for unit weights)
    c_t     = tau_t - tau_bar
    delta   = tau_bar + lambda * sum_t p_t SVD_k(c_t),    SVD_k(c) = U[:, :k] diag(S[:k]) V[:, :k]^T (thin SVD)
    k       = max(1, int(rank_ratio * min(out, in)))

so that ``theta = theta_0 + delta = theta_avg + lambda sum_t SVD_k(theta_t - theta_avg)``, as ``_merge_weights``
("CART") and ``_get_truncated_task_vectors`` of the authors' code (github.com/JH-GEECS/CART, ``src/merging.py``;
``k`` computed as there). Since ``sum_t p_t c_t = 0``, ``rank_ratio = 1`` gives the weighted average exactly, and so
does ``rank_ratio = 0`` (the code's special case: nothing is added back).

Defaults: ``rank_ratio = 0.08``, the rank the paper finds near-optimal across settings (its analysis: about 8% of
the full rank); ``low_rank_coefficient`` (``lambda``, the code's ``prior``) ``= 2.0``, the authors' setting for
eight tasks with ViT-B/32 (``configs/CART/ViT-b-32_8_CART.yaml``, which pairs it with ``rank_ratio = 0.12``; their
14- and 20-task configs use ``1.5 / 0.16`` and ``1.9 / 0.32``). The paper tunes ``lambda`` on validation data.

Scaling: the caller applies ``theta = theta_0 + scaling * delta`` and its ``scaling`` multiplies the whole delta,
the average included; CART's own coefficient is ``low_rank_coefficient``, and ``scaling = 1`` (the caller's default)
is the paper's method.

Weights: ``w_t`` weight the average (as ``average``: their sum must not be 0) and each task's low-rank term, through
``p_t``, normalised to a mean of 1 so that unit weights are the paper's and a common factor changes nothing.

Orientation: any 2-D tensor is a matrix (a kernel sees no names); the SVD does not depend on its orientation, so
``[in, out]`` (``Conv1D``) weights give the transposed result. The code merges only the attention and MLP weight
matrices by name and gives every other tensor the average; here 1x1 convolution kernels ``[out, in, 1, 1]`` are
merged as their ``[out, in]`` channel matrices (``pointwise_convolutions_as_matrices``) and the other tensors that
are not 2-D (biases, norms, larger conv kernels) get the average ``tau_bar``.
"""

from __future__ import annotations

import torch

from .average import average
from .registry import Parameter, check_kernel_inputs, pointwise_convolutions_as_matrices, register_merge_method

RANK_RATIO = Parameter(
    "rank_ratio",
    float,
    0.08,
    "Fraction of each matrix's rank min(out, in) kept per centred task vector, k = max(1, int(rank_ratio * "
    "min(out, in))); 0 or 1 give the weighted average. 0.08: the paper's near-optimal rank.",
    low=0.0,
    high=1.0,
)
LOW_RANK_COEFFICIENT = Parameter(
    "low_rank_coefficient",
    float,
    2.0,
    "lambda: coefficient of the sum of the rank-reduced centred task vectors added to the average "
    "(2.0: the authors' 8-task ViT-B/32 setting; the caller's scaling multiplies the whole delta).",
    low=0.0,
)
PARAMETERS = (RANK_RATIO, LOW_RANK_COEFFICIENT)


def truncated_rank(rows: int, cols: int, rank_ratio: float) -> int:
    """``k = max(1, int(rank_ratio * min(rows, cols)))`` (the authors' float arithmetic)."""
    return max(1, int(rank_ratio * min(rows, cols)))


@register_merge_method(
    "cart",
    pretty_name="CART",
    paper_title="Revisiting Weight Averaging for Model Merging",
    paper_url="https://arxiv.org/abs/2412.12153",
    parameters=PARAMETERS,
    description="Weight average plus lambda times low-rank (SVD) approximations of the task vectors centred on it.",
)
@pointwise_convolutions_as_matrices
def cart(
    task_tensors: torch.Tensor,
    weights: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    rank_ratio: float = 0.08,
    low_rank_coefficient: float = 2.0,
) -> torch.Tensor:
    """CART: ``delta = tau_bar + lambda sum_t p_t SVD_k(tau_t - tau_bar)`` per 2-D tensor (module docstring).

    Args:
        task_tensors: ``[T, *shape]`` task vectors (fp32; fp64 is computed in fp64, other float dtypes in fp32 and
            cast back). Not modified.
        weights: ``[T]`` per-task weights ``w_t`` (non-zero sum).
        generator: unused (deterministic method).
        rank_ratio: fraction of ``min(out, in)`` kept per centred task vector, in ``[0, 1]``.
        low_rank_coefficient: ``lambda >= 0``, the coefficient of the low-rank sum.

    Returns:
        ``[*shape]`` merged delta (a new tensor); ``tau_bar = sum_t w_t tau_t / sum_t w_t`` for tensors that are not
        2-D.

    Raises:
        ValueError: for an invalid parameter or weights summing to 0.
    """
    weights = check_kernel_inputs(task_tensors, weights)
    rank_ratio = RANK_RATIO.validate(rank_ratio)
    low_rank_coefficient = LOW_RANK_COEFFICIENT.validate(low_rank_coefficient)
    if float(weights.sum()) == 0.0:
        raise ValueError(f"cart needs weights with a non-zero sum, got {weights.tolist()}")
    dtype = torch.float64 if task_tensors.dtype == torch.float64 else torch.float32
    mean = average(task_tensors.to(dtype), weights.to(dtype))  # tau_bar, a new tensor
    if task_tensors.dim() != 3 or rank_ratio in (0.0, 1.0) or low_rank_coefficient == 0.0:
        return mean.to(task_tensors.dtype)
    num_tasks, rows, cols = task_tensors.shape
    rank = truncated_rank(rows, cols, rank_ratio)
    relative_weights = weights.to(dtype) * (num_tasks / weights.to(dtype).sum())  # p_t, mean 1
    merged = mean.clone()
    for task in range(num_tasks):
        centred = task_tensors[task].to(dtype) - mean
        left, singular_values, right_t = torch.linalg.svd(centred, full_matrices=False)
        coefficient = low_rank_coefficient * float(relative_weights[task])
        merged.addmm_(left[:, :rank] * singular_values[:rank], right_t[:rank], alpha=coefficient)
    return merged.to(task_tensors.dtype)
