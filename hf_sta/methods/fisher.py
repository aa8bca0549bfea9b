"""``fisher``: Fisher-weighted averaging of the fine-tuned models (Matena & Raffel, 2022).

Each fine-tuned model is read as a Gaussian posterior whose precision is its diagonal Fisher ``F_t``; the merge is the
mode of their (weighted) product, entry by entry::

    theta = sum_t w_t F~_t theta_t / sum_t w_t F~_t,   F~_t = max(F_t, eps)

Because ``sum_t w_t F~_t theta_0 / sum_t w_t F~_t = theta_0``, the kernel returns the same ratio over task vectors,
``delta = sum_t w_t F~_t tau_t / sum_t w_t F~_t``, and ``theta_0 + delta`` (``scaling = 1``) is the merged model.

The Fisher the engine passes is the one ``merger.compute_importance(task, data, metric="fisher")`` stores: the mean
over calibration micro-batches ``j`` of the squared gradient ``g_t(x_j)^2`` of the task's own loss at ``theta_t``. With
``micro_batch_size=1`` that is the standard per-sample empirical Fisher; larger micro-batches square the gradient of
the micro-batch's mean loss, a cheaper, lower-variance-per-step but biased (smaller) estimate.
"""

from __future__ import annotations

import torch

from .registry import Parameter, check_kernel_inputs, register_merge_method


def _check_merge_weights(weights: torch.Tensor, method: str) -> None:
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(
            f"{method} weights every task's precision by w_t and needs w_t >= 0 with a positive sum, "
            f"got {weights.tolist()}"
        )


@register_merge_method(
    "fisher",
    pretty_name="Fisher Merging",
    paper_title="Merging Models with Fisher Weighting",
    paper_url="https://arxiv.org/abs/2111.09832",
    parameters=(
        Parameter(
            "eps",
            float,
            1e-6,
            "Floor on the Fisher values, F~ = max(F, eps) (the paper's 1e-6); 0 disables it.",
            low=0.0,
        ),
    ),
    requires=("fisher",),
    description="Per-entry Fisher-weighted mean: delta = sum_t w_t F_t tau_t / sum_t w_t F_t.",
)
def fisher(
    task_tensors: torch.Tensor,
    weights: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    fisher: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Fisher-weighted mean of the task vectors.

    ``delta = sum_t w_t F~_t tau_t / sum_t w_t F~_t`` per entry, with ``F~_t = max(F_t, eps)``: the floor keeps entries
    that no task's gradient reached (or that underflowed) from dividing by zero and pulls them towards the plain
    weighted mean; negative values (not a Fisher, but possible in a hand-made score file) count as 0. Entries where
    ``sum_t w_t F~_t == 0`` (only possible with ``eps=0``, when every ``F_t`` there is 0) get the weighted mean
    ``sum_t w_t tau_t / sum_t w_t``; with ``eps > 0`` that is what those entries get anyway.

    Args:
        task_tensors: ``[T, *shape]`` task vectors ``tau_t = theta_t - theta_0`` (fp32). Not modified.
        weights: ``[T]`` per-task weights ``w_t`` (the paper's model coefficients), ``>= 0`` with a positive sum.
        generator: unused (deterministic method).
        fisher: ``[T, *shape]`` diagonal Fisher of each task (see the module docstring for the estimator).
        eps: floor on the Fisher values, ``>= 0``.

    Returns:
        ``[*shape]`` merged delta.

    Raises:
        ValueError: if ``fisher`` is missing, of another shape, or not finite, or the weights are invalid.
    """
    weights = check_kernel_inputs(task_tensors, weights)
    if fisher is None:
        raise ValueError(
            "fisher merging needs the diagonal Fisher of every task: "
            "merger.compute_importance(task, data, metric='fisher') for each task."
        )
    if fisher.shape != task_tensors.shape:
        raise ValueError(
            f"fisher must have the shape of task_tensors {list(task_tensors.shape)}, got {list(fisher.shape)}"
        )
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    _check_merge_weights(weights, "fisher")
    fisher = fisher.to(device=task_tensors.device, dtype=task_tensors.dtype)
    if not torch.isfinite(fisher).all():
        raise ValueError("fisher holds non-finite values (inf or nan); recompute it.")

    # One task at a time: O(shape) extra memory instead of [T, *shape] temporaries.
    numerator = torch.zeros_like(task_tensors[0])
    denominator = torch.zeros_like(task_tensors[0])
    precision = torch.empty_like(task_tensors[0])
    for task in range(task_tensors.shape[0]):
        torch.clamp_min(fisher[task], eps, out=precision).mul_(weights[task])
        denominator.add_(precision)
        numerator.add_(precision.mul_(task_tensors[task]))
    empty = denominator == 0
    if empty.any():
        mean = torch.tensordot(weights, task_tensors, dims=1).div_(weights.sum())
        numerator = torch.where(empty, mean, numerator)
        denominator = torch.where(empty, torch.ones_like(denominator), denominator)
    return numerator.div_(denominator)
