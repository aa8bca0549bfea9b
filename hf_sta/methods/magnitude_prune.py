"""``magnitude_prune``: keep the largest entries of each task vector, then sum them with weights."""

from __future__ import annotations

import torch

from .registry import Parameter, check_kernel_inputs, register_merge_method
from .selection import TopkCutoff, density_to_k, magnitude_trim, topk_cutoff

DENSITY = Parameter(
    "density",
    float,
    0.2,
    "Fraction of entries of each task vector kept, by largest |tau_t|, per tensor.",
    low=0.0,
    high=1.0,
    low_inclusive=False,
)


def magnitude_trim_(
    trimmed: torch.Tensor,
    task_tensor: torch.Tensor,
    k: int,
    cutoff: TopkCutoff | None = None,
) -> TopkCutoff | None:
    """Write ``tau * topk_mask(|tau|, k)`` into ``trimmed`` (the TIES "trim" step); return the cut-off used.

    ``topk_cutoff(tau, k, magnitude=True)`` finds the threshold of ``|tau|`` (no sort), then
    ``selection.magnitude_trim`` writes ``trimmed`` in one pass. Ties at the cut-off are broken by lowest flat
    index: exactly ``k`` entries survive, the others become 0.

    Args:
        trimmed: contiguous output buffer, same shape and dtype as ``task_tensor`` (overwritten).
        task_tensor: ``[*shape]`` one task vector ``tau``. Not modified.
        k: number of entries kept, ``0 <= k <= numel``.
        cutoff: the value this function returned for the same ``task_tensor`` and ``k``: trims again in one
            elementwise pass, without searching the threshold.

    Returns:
        The ``TopkCutoff`` of ``|tau|``, or ``None`` when nothing needs a threshold (``k == 0`` or ``k == numel``).
    """
    if k == 0:
        trimmed.zero_()
        return None
    if k == task_tensor.numel():
        trimmed.copy_(task_tensor)
        return None
    if cutoff is None:
        cutoff = topk_cutoff(task_tensor, k, magnitude=True)
    magnitude_trim(task_tensor, cutoff, out=trimmed)
    return cutoff


@register_merge_method(
    "magnitude_prune",
    pretty_name="Magnitude Pruning",
    paper_title="TIES-Merging: Resolving Interference When Merging Models (trim step)",
    paper_url="https://arxiv.org/abs/2306.01708",
    parameters=(DENSITY,),
    description="Keep the top-density fraction of each task vector by magnitude, then sum with weights.",
)
def magnitude_prune(
    task_tensors: torch.Tensor,
    weights: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    density: float = 0.2,
) -> torch.Tensor:
    """Magnitude-pruned weighted sum, as ``peft.utils.merge_utils.magnitude_prune``.

    ``delta = sum_t w_t * (tau_t * m_t)`` with ``m_t = topk_mask(|tau_t|, k)``, ``k = int(density * numel)`` per
    task and per tensor. Ties at the cut-off are broken by lowest flat index (PEFT's ``topk`` may keep another member
    of a tied group; results agree elsewhere).

    Args:
        task_tensors: ``[T, *shape]`` task vectors (fp32). Not modified.
        weights: ``[T]`` per-task weights.
        generator: unused (deterministic method).
        density: fraction kept, in ``(0, 1]``.

    Returns:
        ``[*shape]`` merged delta.
    """
    weights = check_kernel_inputs(task_tensors, weights)
    num_tasks, shape = task_tensors.shape[0], task_tensors.shape[1:]
    numel = task_tensors[0].numel()
    flat = task_tensors.reshape(num_tasks, numel)
    k = density_to_k(numel, density)
    merged = torch.empty(numel, dtype=flat.dtype, device=flat.device)
    trimmed = torch.empty_like(merged)
    for task in range(num_tasks):
        magnitude_trim_(trimmed, flat[task], k)
        if task == 0:
            torch.mul(trimmed, weights[0], out=merged)
        else:
            merged.add_(trimmed.mul_(weights[task]))
    return merged.view(shape)
