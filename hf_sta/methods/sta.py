"""Selective Task Arithmetic (STA): keep only the entries of each task vector that its loss depends on.

Per tensor, for task ``t`` with importance ``I_t`` (see ``hf_sta.importance``)::

    I_hat_t = normalize(I_t)                    max: I_t / max(I_t)   mean: I_t / mean(I_t)   none: I_t
    m_t     = [I_hat_t >= threshold]            or the top ``density`` fraction of I_hat_t (per tensor, or over the
                                                whole model with ``density_scope="global"``)
    merge:  delta = sum_t w_t m_t tau_t                                          (overlap="sum", the paper's)
                    sum_t w_t m_t tau_t / max(1, sum_t m_t)                      (overlap="mean")
                    w_t* tau_t*,  t* = argmax_t m_t I_hat_t                      (overlap="max_importance")
                    sum_t a_t w_t m_t tau_t / max(1, sum_t a_t)                  (overlap="elect")
                      with gamma = sign(sum_t w_t m_t tau_t) (+1 where 0) and a_t = [gamma * w_t m_t tau_t > 0]:
                      TIES' sign election and disjoint mean over the importance-selected entries
    forget: theta' = theta - scaling * m_f tau_f

and ``theta = theta_0 + scaling * delta`` is applied by the caller. ``threshold`` and ``density`` are alternatives:
``density`` (when set) wins; when neither is set, ``density = DEFAULT_DENSITY`` for merging and
``DEFAULT_FORGET_DENSITY`` for forgetting.

Defaults (``overlap="elect"``, ``density=0.2``, and the method's ``default_scaling`` 2.0) were chosen by
leave-one-suite-out over three task suites of different domains (``benchmarks/sta_defaults.py``; README, "Choosing
STA's defaults by leave-one-suite-out"): of the overlap x density x scaling grid, the cell whose worst validation
score over the suites is the highest. A sparse selection keeps a fraction of each task vector's norm (STA's masks
overlap across tasks, so TIES' election removes little), hence a scaling above 1. The previous defaults (elect, 0.7,
scaling 1) had been chosen on the six-task MiniLM and EfficientNet-Lite0 benchmarks alone and lost 2-5 points on the
other suites.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .registry import Parameter, Prepared, register_merge_method
from .selection import density_to_k, topk_mask

NORMALIZATIONS = ("max", "mean", "none")
OVERLAPS = ("sum", "mean", "max_importance", "elect")
DENSITY_SCOPES = ("tensor", "global")
DEFAULT_DENSITY = 0.2
DEFAULT_SCALING = 2.0
DEFAULT_FORGET_DENSITY = 0.2

STA_PARAMETERS = (
    Parameter(
        "threshold",
        float,
        None,
        "Keep entries whose normalised importance is >= threshold (used when density is not set).",
        low=0.0,
        default_text="none (density is used)",
    ),
    Parameter(
        "density",
        float,
        None,
        "Fraction of each task's entries kept, the most important first (wins over threshold; when neither is set, "
        f"{DEFAULT_DENSITY} for a merge and {DEFAULT_FORGET_DENSITY} for forgetting).",
        low=0.0,
        high=1.0,
        low_inclusive=False,
        default_text=f"{DEFAULT_DENSITY} (merging), {DEFAULT_FORGET_DENSITY} (forgetting), unless threshold is set",
    ),
    Parameter(
        "density_scope",
        str,
        "tensor",
        "Rank importance within each tensor, or over the whole model (streaming quantile).",
        choices=DENSITY_SCOPES,
    ),
    Parameter("normalize", str, "max", "Per-tensor importance normalisation.", choices=NORMALIZATIONS),
    Parameter(
        "overlap",
        str,
        "elect",
        "How entries selected by several tasks combine: elect (sign election + disjoint mean), sum (the paper's), "
        "mean, max_importance.",
        choices=OVERLAPS,
    ),
)


def normalize_importance(importance: torch.Tensor, normalize: str) -> torch.Tensor:
    """Per-row normalisation of ``importance`` ``[T, *shape]`` (or ``[*shape]`` for a single task); new fp32 tensor."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    scores = importance.float().clone()
    if normalize == "none":
        return scores
    rows = scores.reshape(scores.shape[0], -1) if scores.dim() > 1 else scores.reshape(1, -1)
    scale = rows.amax(dim=1) if normalize == "max" else rows.mean(dim=1)
    rows.div_(torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1))
    return scores


def importance_masks(
    importance: torch.Tensor,
    *,
    threshold: float | None,
    density: float | None,
    density_scope: str = "tensor",
    normalize: str = "max",
    global_threshold: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, I_hat)`` for stacked importance ``[T, *shape]``: bool masks and normalised scores, both ``[T, *shape]``.

    ``density`` with ``density_scope="tensor"`` keeps exactly ``int(density * numel)`` entries per row (ties broken by
    lowest index); with ``"global"`` the caller passes ``global_threshold`` ``[T]`` (see :func:`global_thresholds`)
    and ``m = I_hat >= global_threshold``. Without ``density``, ``m = I_hat >= threshold``.
    """
    scores = normalize_importance(importance, normalize)
    if density is None and threshold is None:
        density = DEFAULT_DENSITY
    if density is not None:
        if density_scope == "global":
            if global_threshold is None:
                raise ValueError("density_scope='global' needs the per-task global thresholds.")
            shape = (-1,) + (1,) * (scores.dim() - 1)
            return scores >= global_threshold.reshape(shape).to(scores.dtype), scores
        k = density_to_k(scores[0].numel(), density)
        masks = torch.stack([topk_mask(row, k) for row in scores]) if k else torch.zeros_like(scores, dtype=torch.bool)
        return masks, scores
    return scores >= threshold, scores


def prepare_sta(context, params: dict) -> Prepared:
    """With ``density_scope="global"``, the per-task thresholds keeping the top ``density`` of the whole model."""
    if params.get("density") is None or params.get("density_scope") != "global":
        return Prepared()
    thresholds = global_thresholds(
        context.importance_rows, len(context.tasks), params["density"], params.get("normalize", "max")
    )
    return Prepared(params={"global_threshold": thresholds})


@register_merge_method(
    "sta",
    pretty_name="Selective Task Arithmetic",
    paper_title="Selective Task Arithmetic: loss-sensitive parameter selection for merging and forgetting tasks",
    paper_url=None,
    parameters=STA_PARAMETERS,
    requires=("importance",),
    prepare=prepare_sta,
    description="Keep each task's important entries (first-order Taylor importance) and add them up.",
    default_scaling=DEFAULT_SCALING,
)
def sta(
    task_tensors: torch.Tensor,
    weights: torch.Tensor,
    *,
    importance: torch.Tensor,
    generator: torch.Generator | None = None,
    threshold: float | None = None,
    density: float | None = None,
    density_scope: str = "tensor",
    normalize: str = "max",
    overlap: str = "elect",
    global_threshold: torch.Tensor | None = None,
    stats: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """STA merge of one tensor. ``task_tensors`` and ``importance`` are ``[T, *shape]``; returns ``delta [*shape]``.

    See the module docstring for the formulas of the masks and of each ``overlap`` rule. When ``stats`` is a dict,
    ``stats["kept_fraction"]`` receives the fraction of entries each task keeps, ``[T]`` (for the model card).
    """
    if importance.shape != task_tensors.shape:
        raise ValueError(f"importance shape {tuple(importance.shape)} != task tensors {tuple(task_tensors.shape)}")
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap must be one of {', '.join(OVERLAPS)}, got {overlap!r}")
    masks, scores = importance_masks(
        importance,
        threshold=threshold,
        density=density,
        density_scope=density_scope,
        normalize=normalize,
        global_threshold=global_threshold,
    )
    if stats is not None:
        stats["kept_fraction"] = masks.reshape(masks.shape[0], -1).float().mean(dim=1)
    shape = (-1,) + (1,) * (task_tensors.dim() - 1)
    weighted = task_tensors * weights.reshape(shape) * masks
    if overlap == "sum":
        return weighted.sum(dim=0)
    if overlap == "mean":
        return weighted.sum(dim=0) / masks.sum(dim=0).clamp(min=1)
    if overlap == "elect":
        elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
        agree = (weighted * elected) > 0
        return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    # max_importance: each entry goes to the selecting task with the largest normalised importance.
    winner = torch.where(masks, scores, torch.full_like(scores, -1.0)).argmax(dim=0, keepdim=True)
    return weighted.gather(0, winner).squeeze(0)


def global_thresholds(
    importance_rows: Callable[[], Iterable[torch.Tensor]], num_tasks: int, density: float, normalize: str = "max"
) -> torch.Tensor:
    """Per-task threshold ``t_t`` on normalised importance keeping the top ``density`` of the whole model; ``[T]``.

    ``importance_rows()`` yields, tensor by tensor, stacked importance ``[T, *shape]``; it is called twice (two
    streaming passes) and nothing but one tensor and two histograms is held. Pass 1 histograms the non-negative fp32
    scores by the top 16 bits of their IEEE-754 bit pattern (monotone in the value) to find the bucket holding the
    ``k``-th largest score; pass 2 gathers that bucket's values and takes the exact ``k``-th value. Entries equal to
    the threshold are all kept (``m = I_hat >= t``).
    """
    buckets = 1 << 15  # sign bit is 0 for non-negative floats
    counts = torch.zeros((num_tasks, buckets), dtype=torch.int64)
    total = 0
    for stacked in importance_rows():
        scores = normalize_importance(stacked, normalize).clamp_(min=0).reshape(num_tasks, -1)
        total += scores.shape[1]
        keys = scores.view(torch.int32) >> 16
        for task in range(num_tasks):
            counts[task] += torch.bincount(keys[task], minlength=buckets)
    k = density_to_k(total, density)
    if k == 0:
        return torch.full((num_tasks,), float("inf"))
    # Bucket b holding the k-th largest: cumulative count from the top first reaches k there.
    from_top = counts.flip(1).cumsum(1)
    bucket = buckets - 1 - (from_top >= k).int().argmax(dim=1)
    above = torch.stack([counts[t, bucket[t] + 1 :].sum() for t in range(num_tasks)])
    candidates: list[list[torch.Tensor]] = [[] for _ in range(num_tasks)]
    for stacked in importance_rows():
        scores = normalize_importance(stacked, normalize).clamp_(min=0).reshape(num_tasks, -1)
        keys = scores.view(torch.int32) >> 16
        for task in range(num_tasks):
            candidates[task].append(scores[task][keys[task] == bucket[task]])
    thresholds = torch.empty(num_tasks)
    for task in range(num_tasks):
        values = torch.cat(candidates[task])
        rank = k - int(above[task])  # rank from the top inside the bucket, >= 1
        thresholds[task] = torch.kthvalue(values, values.numel() - rank + 1).values
    return thresholds


def forget_delta(
    task_vector: torch.Tensor,
    importance: torch.Tensor | None,
    *,
    threshold: float | None = None,
    density: float | None = None,
    density_scope: str = "tensor",
    normalize: str = "max",
    global_threshold: torch.Tensor | None = None,
) -> torch.Tensor:
    """``m_f * tau_f`` for one tensor (the edit whose ``scaling`` multiple forgetting subtracts); ``importance=None``
    gives plain task-vector negation (``m_f = 1``). Without ``threshold`` and ``density``, the top
    ``DEFAULT_FORGET_DENSITY`` of the task's entries are selected."""
    if importance is None:
        return task_vector.clone()
    if density is None and threshold is None:
        density = DEFAULT_FORGET_DENSITY
    masks, _ = importance_masks(
        importance.unsqueeze(0),
        threshold=threshold,
        density=density,
        density_scope=density_scope,
        normalize=normalize,
        global_threshold=None if global_threshold is None else global_threshold.reshape(1),
    )
    return task_vector * masks[0]
