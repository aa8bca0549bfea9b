"""``ties``: TIES-Merging, trim + elect sign + disjoint mean (Yadav et al., 2023)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .magnitude_prune import DENSITY
from .registry import Parameter, check_kernel_inputs, register_merge_method
from .selection import TopkCutoff, block_buffers, blocks, density_to_k, magnitude_trim, topk_cutoff

MAJORITY_SIGN_METHOD = Parameter(
    "majority_sign_method",
    str,
    "total",
    "How the sign of each entry is elected: 'total' = sign of sum_t trimmed tau_t (mass), "
    "'frequency' = sign of sum_t sign(trimmed tau_t) (vote count); a tie (0) elects +.",
    choices=("total", "frequency"),
)
WEIGHTING = Parameter(
    "weighting",
    str,
    "peft",
    "Where the per-task weights w_t enter: 'peft' = elect the sign on the unweighted trims and divide the weighted "
    "sum by the count of agreeing tasks (PEFT's merge_utils.ties); 'mergekit' = elect on w_t * trims and divide by the "
    "sum of the agreeing weights (mergekit's ties). Equal under unit weights; uniform weights c scale the 'peft' "
    "delta by c and leave the 'mergekit' one unchanged.",
    choices=("peft", "mergekit"),
)


def sign_elected_disjoint_mean(
    task_block: Callable[[int, int, int, torch.Tensor], torch.Tensor],
    weights: torch.Tensor,
    task_tensors: torch.Tensor,
    majority_sign_method: str = "total",
    weighting: str = "peft",
) -> torch.Tensor:
    """TIES sign election and disjoint weighted mean over trimmed task vectors, as ``peft.utils.merge_utils.ties``.

    With ``x_t`` the trimmed task vectors (flat, ``[N]`` each)::

        s     = sign(sum_t x_t)              ("total")   or   sign(sum_t sign(x_t))   ("frequency")
        gamma = +1 where s >= 0 else -1      (elected sign; ties go to +)
        a_t   = [sign(x_t) == gamma]         (agreeing, hence non-zero, entries)
        delta = sum_t w_t x_t a_t / max(1, sum_t a_t)

    The weights are applied after the election, which uses the unweighted ``x_t``, as in PEFT. With
    ``weighting="mergekit"`` (mergekit's ``ties``) the election uses ``w_t x_t`` and the divisor is the sum of the
    agreeing weights: ``delta = sum_t w_t x_t a_t / sum_t w_t a_t`` (``a_t`` from ``sign(w_t x_t) == gamma``; a
    divisor of 0 is taken as 1). Computed as
    ``gamma * sum_t w_t relu(gamma x_t) / max(1, sum_t [gamma x_t > 0])``, which is bit-identical (the factor
    ``gamma`` is exact; a weight of 1 is not multiplied). ``gamma = copysign(1, s)`` in one pass: ``s`` is ``-0``
    only where every ``x_t`` is zero, where no task agrees and ``gamma`` does not matter.

    Everything is entrywise, so it runs block by block (``selection.blocks``): for each block the ``T`` blocks
    ``x_t`` are built once into block-sized buffers that stay in the CPU caches and serve both the election and the
    agreement pass, and the block of the result is written once. Besides the result nothing of size ``N`` is
    allocated, and each task vector is read from memory once.

    Args:
        task_block: ``task_block(t, start, stop, out)`` returns ``x_t[start:stop]``: written into ``out`` (a buffer
            of ``stop - start`` entries), or any tensor of those entries left unchanged until the block is done
            (e.g. a view of the task vector where nothing is trimmed).
        weights: ``[T]`` per-task weights, on the device and dtype of the task tensors.
        task_tensors: the ``[T, N]`` flat task vectors ``task_block`` reads: gives ``N``, the dtype and the device.
        majority_sign_method: ``"total"`` or ``"frequency"``.
        weighting: ``"peft"`` or ``"mergekit"`` (see above).

    Returns:
        ``[N]`` merged delta.
    """
    if majority_sign_method not in MAJORITY_SIGN_METHOD.choices:
        raise ValueError(f"majority_sign_method must be one of 'total', 'frequency', got {majority_sign_method!r}")
    if weighting not in WEIGHTING.choices:
        raise ValueError(f"weighting must be one of 'peft', 'mergekit', got {weighting!r}")
    num_tasks, numel = task_tensors.shape
    dtype, device = task_tensors.dtype, task_tensors.device
    frequency = majority_sign_method == "frequency"
    unit_weights = (weights == 1).tolist()
    mergekit = weighting == "mergekit" and not all(unit_weights)  # unit weights: both conventions coincide
    if mergekit:  # the trims are weighted before the election; the numerator then needs no weights
        unweighted_block = task_block

        def task_block(task: int, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
            return torch.mul(unweighted_block(task, start, stop, out), weights[task], out=out)

    kept = block_buffers("ties.kept", num_tasks, numel, dtype, device)
    election, scratch, count = block_buffers("ties.work", 3, numel, dtype, device)
    one = torch.ones((), dtype=dtype, device=device)
    merged = torch.empty(numel, dtype=dtype, device=device)
    for start, stop in blocks(numel, device):
        width = stop - start
        score, work, counted = election[:width], scratch[:width], count[:width]
        trimmed = [task_block(task, start, stop, kept[task, :width]) for task in range(num_tasks)]
        if frequency:
            torch.sign(trimmed[0], out=score)
            for values in trimmed[1:]:
                score.add_(torch.sign(values, out=work))
        elif num_tasks == 1:
            score.copy_(trimmed[0])
        else:
            torch.add(trimmed[0], trimmed[1], out=score)
            for values in trimmed[2:]:
                score.add_(values)
        # gamma = +1 where the score is >= +0, -1 elsewhere, in place.
        majority_sign = torch.copysign(one, score, out=score)
        block = merged[start:stop]
        for task, values in enumerate(trimmed):
            agreeing = torch.mul(values, majority_sign, out=block if task == 0 else work).clamp_(min=0)
            # The count of agreeing tasks, in floats: sign() of the (non-negative) agreeing terms is 0 or 1; a
            # float pass is several times cheaper on CPU than a comparison into a bool mask.
            if task == 0:
                torch.sign(agreeing, out=counted)
                if mergekit:
                    counted.mul_(weights[0])
            elif mergekit:  # the sum of the agreeing weights, sum_t w_t a_t
                counted.add_(torch.sign(agreeing, out=kept[task - 1, :width]), alpha=float(weights[task]))
            else:
                counted.add_(torch.sign(agreeing, out=kept[task - 1, :width]))  # x_{task-1} is no longer needed
            if not unit_weights[task] and not mergekit:
                agreeing.mul_(weights[task])
            if task > 0:
                block.add_(agreeing)
        block.mul_(majority_sign)
        block.div_(torch.where(counted == 0, one, counted) if mergekit else counted.clamp_(min=1))
    return merged


@register_merge_method(
    "ties",
    pretty_name="TIES-Merging",
    paper_title="TIES-Merging: Resolving Interference When Merging Models",
    paper_url="https://arxiv.org/abs/2306.01708",
    parameters=(DENSITY, MAJORITY_SIGN_METHOD, WEIGHTING),
    description="Trim each task vector to its top-density magnitudes, elect a sign per entry, average the agreeing ones.",
)
def ties(
    task_tensors: torch.Tensor,
    weights: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    density: float = 0.2,
    majority_sign_method: str = "total",
    weighting: str = "peft",
) -> torch.Tensor:
    """TIES-Merging, numerically as ``peft.utils.merge_utils.ties``.

    1. Trim: ``x_t = tau_t * topk_mask(|tau_t|, k)``, ``k = int(density * numel)`` per task, per tensor (ties at the
       cut-off broken by lowest flat index; PEFT's ``topk`` may keep another member of a tied group).
    2. Elect: ``gamma = sign(sum_t x_t)`` ("total") or ``sign(sum_t sign(x_t))`` ("frequency"), 0 -> +1.
    3. Disjoint mean: ``delta = sum_t w_t x_t [sign(x_t) == gamma] / max(1, sum_t [sign(x_t) == gamma])``.

    ``weighting="mergekit"``: steps 2-3 on ``w_t x_t`` with the divisor ``sum_t w_t [agreeing]`` (mergekit's ties).

    Memory: besides the inputs, the result and block-sized buffers (``selection.blocks``); no ``[T, numel]`` copy:
    steps 2 and 3 run block by block on the trims of the block, built once from the cut-offs of step 1.

    Args:
        task_tensors: ``[T, *shape]`` task vectors (fp32). Not modified.
        weights: ``[T]`` per-task weights.
        generator: unused (deterministic method).
        density: fraction of each task vector kept, in ``(0, 1]``.
        majority_sign_method: ``"total"`` or ``"frequency"``.
        weighting: ``"peft"`` (default) or ``"mergekit"``: where the weights enter (see ``WEIGHTING``).

    Returns:
        ``[*shape]`` merged delta.
    """
    weights = check_kernel_inputs(task_tensors, weights)
    num_tasks, shape = task_tensors.shape[0], task_tensors.shape[1:]
    numel = task_tensors[0].numel()
    flat = task_tensors.reshape(num_tasks, numel)
    k = density_to_k(numel, density)
    if k == 0:
        return torch.zeros(shape, dtype=flat.dtype, device=flat.device)
    # Step 1's threshold search (one blocked sweep per task) runs once; the trims are applied block by block.
    cutoffs: list[TopkCutoff | None] = [
        None if k == numel else topk_cutoff(flat[task], k, magnitude=True) for task in range(num_tasks)
    ]

    def trimmed_task(task: int, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        values, cutoff = flat[task, start:stop], cutoffs[task]
        return values if cutoff is None else magnitude_trim(values, cutoff, out=out, offset=start)

    return sign_elected_disjoint_mean(trimmed_task, weights, flat, majority_sign_method, weighting).view(shape)
