"""``ties``: TIES-Merging, trim + elect sign + disjoint mean (Yadav et al., 2023)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .magnitude_prune import DENSITY, magnitude_trim_
from .registry import Parameter, check_kernel_inputs, register_merge_method
from .selection import TopkCutoff, density_to_k

MAJORITY_SIGN_METHOD = Parameter(
    "majority_sign_method",
    str,
    "total",
    "How the sign of each entry is elected: 'total' = sign of sum_t trimmed tau_t (mass), "
    "'frequency' = sign of sum_t sign(trimmed tau_t) (vote count); a tie (0) elects +.",
    choices=("total", "frequency"),
)


def sign_elected_disjoint_mean(
    trimmed_task: Callable[[int], torch.Tensor],
    weights: torch.Tensor,
    majority_sign_method: str = "total",
    *,
    mask_buffer: torch.Tensor | None = None,
) -> torch.Tensor:
    """TIES sign election and disjoint weighted mean over trimmed task vectors, as ``peft.utils.merge_utils.ties``.

    With ``x_t`` the trimmed task vectors (flat, ``[N]`` each)::

        s     = sign(sum_t x_t)              ("total")   or   sign(sum_t sign(x_t))   ("frequency")
        gamma = +1 where s >= 0 else -1      (elected sign; ties go to +)
        a_t   = [sign(x_t) == gamma]         (agreeing, hence non-zero, entries)
        delta = sum_t w_t x_t a_t / max(1, sum_t a_t)

    The weights are applied after the election, which uses the unweighted ``x_t``, as in PEFT. Computed as
    ``gamma * sum_t w_t relu(gamma x_t) / max(1, sum_t [gamma x_t > 0])``, which is bit-identical (the factor
    ``gamma`` is exact). Allocates the result, the election scores (reused for ``gamma``), a uint8 count and, unless
    given, one ``[N]`` bool buffer.

    Args:
        trimmed_task: ``trimmed_task(t)`` returns ``x_t`` as a contiguous ``[N]`` tensor. It is called twice per
            task (election, then merge) and must return the same values each time; the second time the returned
            tensor is overwritten, so it may be a shared scratch buffer or storage the caller no longer needs.
        weights: ``[T]`` per-task weights, on the device and dtype of the task tensors.
        majority_sign_method: ``"total"`` or ``"frequency"``.
        mask_buffer: optional reusable bool tensor of ``N`` entries (overwritten).

    Returns:
        ``[N]`` merged delta.
    """
    if majority_sign_method not in MAJORITY_SIGN_METHOD.choices:
        raise ValueError(f"majority_sign_method must be one of 'total', 'frequency', got {majority_sign_method!r}")
    num_tasks = weights.shape[0]
    first = trimmed_task(0)
    numel, dtype, device = first.numel(), first.dtype, first.device
    # Few, reused buffers: on CPU the first touch of fresh memory costs more than an elementwise pass.
    merged = torch.empty(numel, dtype=dtype, device=device)
    if mask_buffer is None:
        mask_buffer = torch.empty(numel, dtype=torch.bool, device=device)

    if majority_sign_method == "total":
        election = first.clone()
        for task in range(1, num_tasks):
            election.add_(trimmed_task(task))
    else:
        election = torch.sign(first)
        for task in range(1, num_tasks):
            election.add_(torch.sign(trimmed_task(task), out=merged))  # `merged` is free scratch until below
    # gamma = +1 where the score is >= 0, -1 elsewhere, in place: sign -> {-1, 0, 1}, + 0.5, sign -> {-1, 1, 1}.
    majority_sign = election.sign_().add_(0.5).sign_()

    count_dtype = torch.uint8 if num_tasks < 256 else torch.int32
    count = torch.zeros(numel, dtype=count_dtype, device=device)
    agree = mask_buffer.view(torch.uint8) if count_dtype == torch.uint8 else mask_buffer  # no cast in add_
    for task in range(num_tasks):
        agreeing = trimmed_task(task).mul_(majority_sign).clamp_(min=0)  # |x_t| where sign(x_t) == gamma, else 0
        torch.gt(agreeing, 0, out=mask_buffer)
        count.add_(agree)
        if task == 0:
            torch.mul(agreeing, weights[0], out=merged)
        else:
            merged.add_(agreeing.mul_(weights[task]))
    merged.mul_(majority_sign)
    # Divide by max(1, count) converted into the (now free) sign buffer: a mixed-dtype div_ would allocate.
    return merged.div_(majority_sign.copy_(count).clamp_(min=1))


@register_merge_method(
    "ties",
    pretty_name="TIES-Merging",
    paper_title="TIES-Merging: Resolving Interference When Merging Models",
    paper_url="https://arxiv.org/abs/2306.01708",
    parameters=(DENSITY, MAJORITY_SIGN_METHOD),
    description="Trim each task vector to its top-density magnitudes, elect a sign per entry, average the agreeing ones.",
)
def ties(
    task_tensors: torch.Tensor,
    weights: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    density: float = 0.2,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """TIES-Merging, numerically as ``peft.utils.merge_utils.ties``.

    1. Trim: ``x_t = tau_t * topk_mask(|tau_t|, k)``, ``k = int(density * numel)`` per task, per tensor (ties at the
       cut-off broken by lowest flat index; PEFT's ``topk`` may keep another member of a tied group).
    2. Elect: ``gamma = sign(sum_t x_t)`` ("total") or ``sign(sum_t sign(x_t))`` ("frequency"), 0 -> +1.
    3. Disjoint mean: ``delta = sum_t w_t x_t [sign(x_t) == gamma] / max(1, sum_t [sign(x_t) == gamma])``.

    Memory: besides the inputs, three ``[numel]`` buffers of the task dtype (one is the result), a uint8 count and
    a ``[2, numel]`` bool workspace, i.e. ``15 * numel`` bytes for fp32; no ``[T, numel]`` copy. The trim of each
    task is recomputed in step 3 from its cached threshold (one elementwise pass) rather than stored.

    Args:
        task_tensors: ``[T, *shape]`` task vectors (fp32). Not modified.
        weights: ``[T]`` per-task weights.
        generator: unused (deterministic method).
        density: fraction of each task vector kept, in ``(0, 1]``.
        majority_sign_method: ``"total"`` or ``"frequency"``.

    Returns:
        ``[*shape]`` merged delta.
    """
    weights = check_kernel_inputs(task_tensors, weights)
    num_tasks, shape = task_tensors.shape[0], task_tensors.shape[1:]
    numel = task_tensors[0].numel()
    flat = task_tensors.reshape(num_tasks, numel)
    k = density_to_k(numel, density)
    buffer = torch.empty(numel, dtype=flat.dtype, device=flat.device)
    workspace = torch.empty(2 * numel, dtype=torch.bool, device=flat.device)  # masks of the threshold search
    # Trimming twice (election, then merge) costs less than keeping T trimmed copies; the threshold search, the
    # expensive part, runs once per task and is cached here.
    cutoffs: dict[int, TopkCutoff | None] = {}

    def trimmed_task(task: int) -> torch.Tensor:
        cutoffs[task] = magnitude_trim_(buffer, flat[task], k, cutoffs.get(task), workspace=workspace)
        return buffer

    merged = sign_elected_disjoint_mean(trimmed_task, weights, majority_sign_method, mask_buffer=workspace[:numel])
    return merged.view(shape)
