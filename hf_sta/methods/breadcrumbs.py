"""``breadcrumbs``: Model Breadcrumbs, drop the largest outliers and the smallest entries (Davari & Belilovsky, 2024)."""

from __future__ import annotations

import torch

from .registry import Parameter, check_kernel_inputs, register_merge_method
from .selection import density_to_k, magnitude_trim, topk_cutoff, topk_mask

BREADCRUMBS_DENSITY = Parameter(
    "density",
    float,
    0.9,
    "Fraction of entries of each task vector kept, per tensor, after removing the gamma largest (mergekit naming).",
    low=0.0,
    high=1.0,
    low_inclusive=False,
)
GAMMA = Parameter(
    "gamma",
    float,
    0.01,
    "Fraction of entries with the largest |tau_t| removed as outliers, per tensor (mergekit naming).",
    low=0.0,
    high=1.0,
    high_inclusive=False,
)


def breadcrumbs_counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """``(n_top, n_keep)``: the ``n_top`` largest entries are dropped, the next ``n_keep`` kept, the rest dropped.

    ``n_keep = int(density * numel)``, ``n_top = min(int(gamma * numel), numel - n_keep)`` (mergekit's
    ``magnitude_outliers``: when ``density + gamma > 1`` fewer outliers are removed so that ``density`` is met).
    """
    n_keep = density_to_k(numel, density)
    n_top = min(density_to_k(numel, gamma), numel - n_keep)
    return n_top, n_keep


@register_merge_method(
    "breadcrumbs",
    pretty_name="Model Breadcrumbs",
    paper_title="Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
    paper_url="https://arxiv.org/abs/2312.06795",
    parameters=(BREADCRUMBS_DENSITY, GAMMA),
    description="Drop the gamma largest (outliers) and the smallest entries of each task vector, keep density; sum.",
)
def breadcrumbs(
    task_tensors: torch.Tensor,
    weights: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    density: float = 0.9,
    gamma: float = 0.01,
) -> torch.Tensor:
    """Model Breadcrumbs with weighted sum, as mergekit's ``breadcrumbs`` (``magnitude_outliers`` sparsification).

    Per task and per tensor, rank the entries by ``|tau_t|`` descending (ties by lowest flat index); with
    ``(n_top, n_keep) = breadcrumbs_counts(numel, density, gamma)`` keep the ranks ``[n_top, n_top + n_keep)``::

        m_t   = topk_mask(|tau_t|, n_top + n_keep) & ~topk_mask(|tau_t|, n_top)
        delta = sum_t w_t * tau_t * m_t

    Exactly ``n_keep`` entries of each task survive. Defaults ``density = 0.9``, ``gamma = 0.01`` (mergekit's
    default gamma) remove the top 1% and the bottom 9% of each tensor.

    Args:
        task_tensors: ``[T, *shape]`` task vectors (fp32). Not modified.
        weights: ``[T]`` per-task weights.
        generator: unused (deterministic method).
        density: fraction kept, in ``(0, 1]``.
        gamma: fraction of largest entries removed, in ``[0, 1)``.

    Returns:
        ``[*shape]`` merged delta.
    """
    weights = check_kernel_inputs(task_tensors, weights)
    num_tasks, shape = task_tensors.shape[0], task_tensors.shape[1:]
    numel = task_tensors[0].numel()
    flat = task_tensors.reshape(num_tasks, numel)
    n_top, n_keep = breadcrumbs_counts(numel, density, gamma)
    merged = torch.zeros(numel, dtype=flat.dtype, device=flat.device)
    if n_keep == 0:
        return merged.view(shape)
    trimmed = torch.empty_like(merged)
    for task in range(num_tasks):
        magnitudes = torch.abs(flat[task], out=trimmed)
        outliers = topk_mask(magnitudes, n_top) if n_top > 0 else None
        if n_top + n_keep < numel:
            magnitude_trim(flat[task], topk_cutoff(magnitudes, n_top + n_keep), out=trimmed)
        else:
            trimmed.copy_(flat[task])
        if outliers is not None:
            trimmed.masked_fill_(outliers, 0.0)
        merged.add_(trimmed.mul_(weights[task]))
    return merged.view(shape)
