"""``task_arithmetic``: the weighted sum of task vectors (Ilharco et al., 2023)."""

from __future__ import annotations

import torch

from .registry import check_kernel_inputs, register_merge_method


@register_merge_method(
    "task_arithmetic",
    pretty_name="Task Arithmetic",
    paper_title="Editing Models with Task Arithmetic",
    paper_url="https://arxiv.org/abs/2212.04089",
    parameters=(),
    description="Weighted sum of the task vectors: delta = sum_t w_t tau_t.",
)
def task_arithmetic(
    task_tensors: torch.Tensor, weights: torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Weighted sum of the task vectors.

    ``delta = sum_t w_t * tau_t``, accumulated in task order as ``peft.utils.merge_utils.task_arithmetic`` does
    (bit-identical to it up to the sign of zeros).

    Args:
        task_tensors: ``[T, *shape]`` task vectors (fp32). Not modified.
        weights: ``[T]`` per-task weights ``w_t``.
        generator: unused (deterministic method).

    Returns:
        ``[*shape]`` merged delta (a new tensor).
    """
    weights = check_kernel_inputs(task_tensors, weights)
    merged = torch.mul(task_tensors[0], weights[0])
    if task_tensors.shape[0] > 1:
        weighted = torch.empty_like(merged)
        for task in range(1, task_tensors.shape[0]):
            merged.add_(torch.mul(task_tensors[task], weights[task], out=weighted))
    return merged
