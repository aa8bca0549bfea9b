"""``regmean``: Regression Mean, the closed-form merge of linear layers from their input Gram matrices (Jin et al., 2023).

For a linear layer ``y = x W^T`` (``W`` of shape ``[out, in]``) and task ``t``'s calibration inputs ``X_t`` (``[n_t, in]``,
one row per token), the merged weight minimises ``sum_t ||X_t W^T - X_t W_t^T||^2``; the minimiser only needs the Gram
matrices ``G_t = X_t^T X_t``::

    W* = (sum_t W_t G_t) (sum_t G_t)^-1

The paper shrinks the off-diagonal part of each Gram matrix towards its diagonal, ``G~_t = alpha G_t + (1 - alpha)
diag(G_t)``, which keeps the sum well conditioned and interpolates between the exact regression (``alpha = 1``) and a
per-input-feature weighted mean (``alpha = 0``). Since ``(sum_t theta_0 G~_t)(sum_t G~_t)^-1 = theta_0``, the kernel
works on task vectors: ``delta = (sum_t tau_t G~_t)(sum_t G~_t)^-1`` and ``theta_0 + delta`` is ``W*``. Tensors that no
Gram matrix covers (biases, embeddings, norms) are averaged as in the paper.

Gram matrices come from ``hf_sta.importance.accumulate_input_grams`` (sums of ``X^T X`` over the unpadded tokens of the
calibration data); ``gram_layout`` says how the weight is stored: ``"out_in"`` for ``nn.Linear`` (``[out, in]``),
``"in_out"`` for transformers' ``Conv1D`` (GPT-2, ``[in, out]``, ``y = x W``), where ``delta = (sum_t G~_t)^-1
(sum_t G~_t tau_t)``.
"""

from __future__ import annotations

import logging

import torch

from .average import average
from .fisher import _check_merge_weights
from .registry import Parameter, check_kernel_inputs, register_merge_method
from .task_arithmetic import task_arithmetic

logger = logging.getLogger(__name__)

GRAM_LAYOUTS = ("out_in", "in_out")


def _solve(gram_sum: torch.Tensor, rhs: torch.Tensor, fallback: torch.Tensor, tolerance: float) -> torch.Tensor:
    """``X`` with ``gram_sum @ X = rhs`` for a symmetric positive semi-definite ``gram_sum`` ``[in, in]``, ``rhs [in, k]``.

    The system is first scaled to a unit diagonal, ``S gram_sum S`` with ``S = diag(gram_sum)^-1/2`` (activations of
    language models differ in scale by orders of magnitude between features; the scaled matrix has the same solution
    and a rank test that does not depend on those scales). Cholesky when the scaled matrix is numerically positive
    definite: every pivot ``L_ii^2`` above ``tolerance``. Otherwise (an input feature no calibration token activated,
    fewer tokens than features with ``alpha = 1``, or directions reached only at the rounding level of the Gram
    matrices' dtype) the system is solved by least squares (SVD, singular values below ``tolerance`` truncated) for the
    correction ``X - fallback`` of smallest scaled norm: features without any input keep ``fallback`` (the weighted mean
    of the task vectors) exactly, and other undetermined directions stay as close to it as the data allows.
    """
    diagonal = gram_sum.diagonal()
    live = diagonal > 0
    scale = torch.where(live, diagonal.clamp_min(torch.finfo(diagonal.dtype).tiny).rsqrt(), torch.ones_like(diagonal))
    scaled = gram_sum * scale[:, None] * scale[None, :]
    if bool(live.all()):
        factor, info = torch.linalg.cholesky_ex(scaled)
        if int(info) == 0 and float(factor.diagonal().square().min()) > tolerance:
            return torch.cholesky_solve(rhs * scale[:, None], factor).mul_(scale[:, None])
    logger.warning(
        "regmean: the summed Gram matrix [%d x %d] is singular (%d input features never activated) or not numerically "
        "positive definite; solving by least squares, undetermined directions keep the weighted mean.",
        gram_sum.shape[0],
        gram_sum.shape[1],
        int((~live).sum()),
    )
    if not bool(live.any()):  # no input reached the layer at all
        return fallback.clone()
    # gelsd (SVD based, handles rank deficiency) exists on CPU only; this path is rare.
    device = rhs.device
    scaled, scale = scaled.cpu(), scale.cpu()
    residual = rhs.cpu() - gram_sum.cpu() @ fallback.cpu()
    correction = torch.linalg.lstsq(scaled, residual * scale[:, None], rcond=tolerance, driver="gelsd").solution
    return (fallback.cpu() + correction * scale[:, None]).to(device)


@register_merge_method(
    "regmean",
    pretty_name="RegMean",
    paper_title="Dataless Knowledge Fusion by Merging Weights of Language Models",
    paper_url="https://arxiv.org/abs/2212.09849",
    parameters=(
        Parameter(
            "alpha",
            float,
            0.9,
            "Off-diagonal scale of the Gram matrices, G~ = alpha G + (1 - alpha) diag(G); 1 is the exact regression.",
            low=0.0,
            high=1.0,
        ),
        Parameter(
            "other",
            str,
            "average",
            "How tensors without Gram matrices (biases, embeddings, norms) merge: the paper's weighted average, or "
            "task arithmetic.",
            choices=("average", "task_arithmetic"),
        ),
    ),
    requires=("gram",),
    description="Closed-form least-squares merge of linear layers from input Gram matrices; other tensors averaged.",
)
def regmean(
    task_tensors: torch.Tensor,
    weights: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    gram: torch.Tensor | None = None,
    gram_layout: str = "out_in",
    alpha: float = 0.9,
    other: str = "average",
) -> torch.Tensor:
    """RegMean merge of one tensor.

    With ``gram`` (``[T, in, in]``): ``G~_t = w_t (alpha G_t + (1 - alpha) diag(G_t))`` and, for ``gram_layout="out_in"``
    (``tau_t`` of shape ``[out, in]``), ``delta = (sum_t tau_t G~_t)(sum_t G~_t)^-1``; for ``"in_out"`` (``[in, out]``),
    ``delta = (sum_t G~_t)^-1 (sum_t G~_t tau_t)``. The weights ``w_t`` scale each task's Gram matrix, i.e. its term of
    the regression objective ``sum_t w_t ||X_t W - X_t W_t||^2``; weights that are all equal change nothing. The linear
    system is solved in fp64 by Cholesky (never an explicit inverse); a singular sum falls back to least squares with a
    warning (see ``_solve``).

    Without ``gram`` (``None``): ``other="average"`` gives ``sum_t w_t tau_t / sum_t w_t`` (the paper),
    ``"task_arithmetic"`` gives ``sum_t w_t tau_t``.

    Args:
        task_tensors: ``[T, *shape]`` task vectors (fp32); with ``gram``, ``[T, out, in]`` (or ``[T, in, out]``), or
            ``[T, out, in, 1, 1]`` for a pointwise ``nn.Conv2d``. Not modified.
        weights: ``[T]`` per-task weights; with ``gram``, ``>= 0`` with a positive sum.
        generator: unused (deterministic method).
        gram: ``[T, in, in]`` input Gram matrices ``X_t^T X_t`` of the layer, or ``None``.
        gram_layout: ``"out_in"`` (``nn.Linear``) or ``"in_out"`` (``Conv1D``).
        alpha: in ``[0, 1]``.
        other: ``"average"`` or ``"task_arithmetic"``.

    Returns:
        ``[*shape]`` merged delta, in the dtype and on the device of ``task_tensors``.

    Raises:
        ValueError: on a bad layout, ``alpha``, ``other``, weights, or shapes that do not match.
    """
    weights = check_kernel_inputs(task_tensors, weights)
    if other not in ("average", "task_arithmetic"):
        raise ValueError(f"other must be 'average' or 'task_arithmetic', got {other!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if gram is None:
        if other == "average":
            return average(task_tensors, weights)
        return task_arithmetic(task_tensors, weights)

    if gram_layout not in GRAM_LAYOUTS:
        raise ValueError(f"gram_layout must be 'out_in' or 'in_out', got {gram_layout!r}")
    if task_tensors.dim() == 5 and tuple(task_tensors.shape[3:]) == (1, 1) and gram_layout == "out_in":
        # A pointwise convolution, [T, out, in, 1, 1]: the linear layer of its channels.
        merged = regmean(task_tensors[..., 0, 0], weights, gram=gram, gram_layout=gram_layout, alpha=alpha)
        return merged[..., None, None]
    num_tasks = task_tensors.shape[0]
    if task_tensors.dim() != 3:
        raise ValueError(f"regmean with a Gram matrix needs 2-D weights, got task_tensors {list(task_tensors.shape)}")
    in_features = task_tensors.shape[2] if gram_layout == "out_in" else task_tensors.shape[1]
    if gram.shape != (num_tasks, in_features, in_features):
        raise ValueError(
            f"gram must have shape [{num_tasks}, {in_features}, {in_features}] for task_tensors "
            f"{list(task_tensors.shape)} in layout {gram_layout!r}, got {list(gram.shape)}"
        )
    _check_merge_weights(weights, "regmean")

    device = task_tensors.device
    weights64 = weights.to(torch.float64)
    gram_sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
    # Work in the in_out orientation, [in, out]: rhs = sum_t G~_t tau_t and delta = gram_sum^-1 rhs.
    out_features = task_tensors.shape[1] if gram_layout == "out_in" else task_tensors.shape[2]
    rhs = torch.zeros(in_features, out_features, dtype=torch.float64, device=device)
    mean = torch.zeros_like(rhs)
    for task in range(num_tasks):
        shrunk = gram[task].to(device=device, dtype=torch.float64, copy=True)  # scaled in place below
        if alpha != 1.0:
            diagonal = shrunk.diagonal().clone()
            shrunk.mul_(alpha).diagonal().add_(diagonal, alpha=1.0 - alpha)
        shrunk.mul_(weights64[task])
        tau = task_tensors[task].to(torch.float64)
        tau = tau.T if gram_layout == "out_in" else tau
        gram_sum.add_(shrunk)
        rhs.addmm_(shrunk, tau)
        mean.add_(tau, alpha=float(weights64[task]))
    mean.div_(weights64.sum())
    # Rank tolerance of the unit-diagonal system: the rounding level of Gram matrices accumulated in their own dtype
    # (numpy's matrix_rank convention, max(M, N) * eps).
    tolerance = in_features * torch.finfo(gram.dtype if gram.is_floating_point() else torch.float32).eps
    delta = _solve(gram_sum, rhs, mean, tolerance)
    delta = delta.T if gram_layout == "out_in" else delta
    return delta.to(dtype=task_tensors.dtype).contiguous()
