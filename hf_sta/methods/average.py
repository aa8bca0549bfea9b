"""``average``: the weighted mean of the fine-tuned models (a "model soup")."""

from __future__ import annotations

import torch

from .registry import check_kernel_inputs, register_merge_method
from .task_arithmetic import task_arithmetic


@register_merge_method(
    "linear",
    pretty_name="Linear (weighted average)",
    paper_title="Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing inference time",
    paper_url="https://arxiv.org/abs/2203.05482",
    parameters=(),
    description="mergekit's name for 'average': delta = sum_t w_t tau_t / sum_t w_t.",
)
@register_merge_method(
    "average",
    pretty_name="Weighted Average",
    paper_title="Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing inference time",
    paper_url="https://arxiv.org/abs/2203.05482",
    parameters=(),
    description="Weighted mean of the fine-tuned models: delta = sum_t w_t tau_t / sum_t w_t.",
)
def average(
    task_tensors: torch.Tensor, weights: torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Weighted mean of the task vectors.

    ``delta = sum_t w_t * tau_t / sum_t w_t``, so that ``theta_0 + delta = sum_t w_t theta_t / sum_t w_t`` (with
    ``scaling = 1``).

    Args:
        task_tensors: ``[T, *shape]`` task vectors ``tau_t = theta_t - theta_0`` (fp32). Not modified.
        weights: ``[T]`` per-task weights ``w_t``; their sum must not be 0.
        generator: unused (deterministic method).

    Returns:
        ``[*shape]`` merged delta.
    """
    weights = check_kernel_inputs(task_tensors, weights)
    total = weights.sum()
    if total == 0:
        raise ValueError(f"average needs weights with a non-zero sum, got {weights.tolist()}")
    return task_arithmetic(task_tensors, weights).div_(total)
