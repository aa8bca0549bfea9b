"""``ties``: TIES-Merging, trim + elect sign + disjoint mean (Yadav et al., 2023)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .magnitude_prune import DENSITY
from .registry import Parameter, check_kernel_inputs, register_merge_method
from .selection import TopkCutoff, density_to_k, magnitude_trim, signed_trim_, topk_cutoff

MAJORITY_SIGN_METHOD = Parameter(
    "majority_sign_method",
    str,
    "total",
    "How the sign of each entry is elected: 'total' = sign of sum_t trimmed tau_t (mass), "
    "'frequency' = sign of sum_t sign(trimmed tau_t) (vote count); a tie (0) elects +.",
    choices=("total", "frequency"),
)


def sign_elected_disjoint_mean(
    trimmed_task: Callable[[int, torch.Tensor], torch.Tensor],
    agreeing_task: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
    weights: torch.Tensor,
    scratch: torch.Tensor,
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
    ``gamma`` is exact; a weight of 1 is not multiplied). ``gamma = copysign(1, s)`` in one pass: ``s`` is ``-0``
    only where every ``x_t`` is zero, where no task agrees and ``gamma`` does not matter. Allocates the result, the
    election scores (reused for ``gamma``), a uint8 count and, unless given, one ``[N]`` bool buffer.

    Args:
        trimmed_task: ``trimmed_task(t, out)`` writes ``x_t`` into the ``[N]`` tensor ``out`` and returns it.
        agreeing_task: ``agreeing_task(t, gamma, out)`` writes ``relu(gamma * x_t)`` (``|x_t|`` where
            ``sign(x_t) == gamma``, else 0) into ``out`` and returns it; kernels fuse it with their trim.
        weights: ``[T]`` per-task weights, on the device and dtype of the task tensors.
        scratch: ``[N]`` buffer of the task dtype (overwritten); gives the size, dtype and device.
        majority_sign_method: ``"total"`` or ``"frequency"``.
        mask_buffer: optional reusable bool tensor of ``N`` entries (overwritten).

    Returns:
        ``[N]`` merged delta.
    """
    if majority_sign_method not in MAJORITY_SIGN_METHOD.choices:
        raise ValueError(f"majority_sign_method must be one of 'total', 'frequency', got {majority_sign_method!r}")
    num_tasks = weights.shape[0]
    numel, device = scratch.numel(), scratch.device
    # Few, reused buffers: on CPU the first touch of fresh memory costs more than an elementwise pass.
    election = torch.empty_like(scratch)
    if mask_buffer is None:
        mask_buffer = torch.empty(numel, dtype=torch.bool, device=device)

    frequency = majority_sign_method == "frequency"
    trimmed_task(0, election)
    if frequency:
        election.sign_()
    for task in range(1, num_tasks):
        trimmed = trimmed_task(task, scratch)
        election.add_(trimmed.sign_() if frequency else trimmed)
    # gamma = +1 where the score is >= +0, -1 elsewhere, in place.
    majority_sign = torch.copysign(torch.ones((), dtype=election.dtype, device=device), election, out=election)

    count_dtype = torch.uint8 if num_tasks < 256 else torch.int32
    count = torch.zeros(numel, dtype=count_dtype, device=device)
    agree = mask_buffer.view(torch.uint8) if count_dtype == torch.uint8 else mask_buffer  # no cast in add_
    unit_weights = (weights == 1).tolist()
    merged = torch.empty_like(scratch)
    for task in range(num_tasks):
        agreeing = agreeing_task(task, majority_sign, merged if task == 0 else scratch)
        torch.gt(agreeing, 0, out=mask_buffer)
        count.add_(agree)
        if not unit_weights[task]:
            agreeing.mul_(weights[task])
        if task > 0:
            merged.add_(agreeing)
    merged.mul_(majority_sign)
    # Divide by max(1, count) converted into the (now free) sign buffer: a mixed-dtype div_ would allocate.
    return merged.div_(majority_sign.copy_(count.clamp_(min=1)))


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
    a ``[2, numel]`` bool workspace, i.e. ``15 * numel`` bytes for fp32; no ``[T, numel]`` copy. Step 3 does not
    store the trims of step 2: it recomputes ``relu(gamma * x_t)`` from ``gamma * tau_t`` and the task's cached
    threshold in two elementwise passes (``selection.signed_trim_``).

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
    scratch = torch.empty(numel, dtype=flat.dtype, device=flat.device)
    workspace = torch.empty(2 * numel, dtype=torch.bool, device=flat.device)  # masks of the threshold search
    # Trimming twice (election, then merge) costs less than keeping T trimmed copies; the threshold search, the
    # expensive part, runs once per task and is kept here.
    cutoffs: list[TopkCutoff | None] = [None] * num_tasks

    def trimmed_task(task: int, out: torch.Tensor) -> torch.Tensor:
        if k == 0 or k == numel:
            return out.zero_() if k == 0 else out.copy_(flat[task])
        cutoffs[task] = topk_cutoff(torch.abs(flat[task], out=out), k, workspace=workspace)
        return magnitude_trim(flat[task], cutoffs[task], out=out)

    def agreeing_task(task: int, majority_sign: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if k == 0:
            return out.zero_()
        signed = torch.mul(flat[task], majority_sign, out=out)
        cutoff = cutoffs[task]
        return signed.clamp_(min=0) if cutoff is None else signed_trim_(signed, cutoff)

    merged = sign_elected_disjoint_mean(
        trimmed_task, agreeing_task, weights, scratch, majority_sign_method, mask_buffer=workspace[:numel]
    )
    return merged.view(shape)
