"""Exact top-k selection without sorting.

Every sparsifying kernel (``ties``, ``magnitude_prune``, ``breadcrumbs``, the importance masks of STA) needs the
same primitive: a boolean mask holding *exactly* ``k`` entries of a score tensor, the largest ones. PEFT uses
``torch.topk`` and mergekit a full ``torch.argsort``; both are ``O(n log k)`` / ``O(n log n)`` and materialise
int64 indices. Here the mask is built from a threshold instead:

1. ``kth_largest_threshold`` finds the ``k``-th largest value ``t`` exactly. For large tensors it estimates the
   cut-off from a fixed pseudo-random sample, counts the entries above a narrow bracket around it and runs
   ``torch.kthvalue`` only on the (small) bracket, whose flat positions it keeps, so that entries tied at the
   cut-off are located without another pass; it falls back to ``torch.kthvalue`` on the whole tensor when the
   bracket misses (rare, or with massive ties).
2. ``topk_mask`` keeps every entry ``> t`` and, among the entries ``== t``, the ones with the lowest flat
   (row-major) index until exactly ``k`` are kept.

Tie-breaking rule (documented contract): entries are ordered by score descending, then by flat index ascending;
the mask keeps the first ``k`` entries of that order. Hence masks are nested: ``topk_mask(s, k1)`` is a subset of
``topk_mask(s, k2)`` whenever ``k1 <= k2``. Where the scores are tie-free the mask equals the one of
``torch.topk``; where ties straddle the cut-off PEFT's ``topk`` and mergekit's ``argsort`` may keep other members
of a tied group, and only the entries away from the cut-off are guaranteed to agree.

NaN scores are not supported: a ``ValueError`` is raised when they are detected (always on the ``kthvalue`` path,
when the sample holds one on the sampled path); undetected NaNs are never selected.

Timing (torch 2.13, CPU, 50M-element fp32 ``|randn|``, ``k = 0.2 * n``; a shared 2-core machine, so best of a few
runs): one thread, CPU time: ``torch.topk`` + scatter 1.03 s, ``torch.kthvalue`` + ``>=`` 0.96 s, ``topk_mask``
0.20 s; two threads, wall time under load: 0.79 s, 0.71 s and 0.42 s. Below ``2**16`` entries the plain
``kthvalue`` path is as fast and is used. To check on another machine::

    python -c "import time, torch; from hf_sta.methods.selection import topk_mask; x = torch.randn(50_000_000).abs_();
    t = time.perf_counter(); topk_mask(x, 10_000_000); print(time.perf_counter() - t)"
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "TopkCutoff",
    "density_to_k",
    "kth_largest_threshold",
    "magnitude_trim",
    "signed_trim_",
    "topk_cutoff",
    "topk_mask",
    "topk_mask_per_row",
]

# Below this many elements a plain ``torch.kthvalue`` is as fast as the sampled bracket (measured crossover).
_SAMPLING_MIN_NUMEL = 1 << 16
# Size of the sample that estimates the cut-off: n / 32, clamped to [_MIN_SAMPLE_SIZE, _SAMPLE_SIZE]. The bracket
# holds about ``2 * _BRACKET_SIGMAS * sqrt(q(1-q)/s)`` of the tensor (q = k / n), e.g. ~1.6% for s = 65536, q = 0.2.
_SAMPLE_SIZE = 1 << 16
_MIN_SAMPLE_SIZE = 1 << 10
_BRACKET_SIGMAS = 5.0
# The sample only steers speed, never the result; a fixed seed keeps the running time reproducible.
_SAMPLE_SEED = 0x5EED
# Ties are located by bisection on prefix counts down to a block of this size, then by ``nonzero``.
_TIE_BLOCK = 1 << 16


def density_to_k(numel: int, density: float) -> int:
    """Number of entries kept by a ``density`` fraction of ``numel`` entries.

    ``k = int(density * numel)`` (truncation towards zero), exactly as PEFT's ``magnitude_based_pruning`` and
    mergekit's ``sparsify.magnitude``, so that results agree with them. Note the floating-point product, e.g.
    ``int(0.29 * 100) == 28``, and that a small tensor may get ``k = 0`` (everything pruned).

    Args:
        numel: number of entries of the tensor (>= 0).
        density: fraction of entries to keep, in [0, 1].

    Returns:
        ``k``, clamped to ``[0, numel]``.
    """
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    return min(max(int(density * numel), 0), numel)


def _check_scores(scores: torch.Tensor) -> None:
    if scores.dtype == torch.bool or scores.is_complex():
        raise ValueError(f"scores must be a real floating-point or integer tensor, got dtype {scores.dtype}")


def _check_k(k: int, numel: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {k!r}")
    if not 0 <= k <= numel:
        raise ValueError(f"k must be in [0, {numel}] (the number of scores), got {k}")


def _kthvalue_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """``k``-th largest value of a 1-D tensor via ``torch.kthvalue`` (which counts from the smallest)."""
    return torch.kthvalue(flat, flat.numel() - k + 1).values


def _sampled_bracket_cutoff(flat: torch.Tensor, k: int, workspace: torch.Tensor) -> TopkCutoff | None:
    """The cut-off of the ``k`` largest entries of 1-D ``flat``, found in a sampled bracket; ``None`` on a miss.

    With ``q = k / n``, the sample's order statistics at ranks ``q*s -/+ m`` (``m`` a few standard deviations of
    the rank estimate) give ``hi >= t >= lo`` with high probability. Then ``c_hi = #(x > hi)``; if
    ``c_hi < k <= c_hi + |B|`` for the bracket ``B = {x : lo <= x <= hi}``, which is small, ``t`` is the
    ``(k - c_hi)``-th largest entry of ``B``, ``#(x > t) = c_hi + #(B > t)``, and the entries tied at ``t`` all lie
    in ``B``, whose flat positions are known: the tie split costs no pass over ``flat``. Costs two comparisons, a
    count and a ``nonzero`` over ``flat`` and no sort of it; the two masks live in ``workspace``.
    """
    n = flat.numel()
    generator = torch.Generator(device=flat.device).manual_seed(_SAMPLE_SEED)
    sample_size = min(_SAMPLE_SIZE, max(_MIN_SAMPLE_SIZE, n // 32))
    index = torch.randint(n, (sample_size,), generator=generator, device=flat.device)
    sample = flat[index]
    if sample.is_floating_point() and bool(torch.isnan(sample).any()):
        return None  # let the kthvalue path report the NaNs
    s = sample.numel()
    q = k / n
    margin = _BRACKET_SIGMAS * math.sqrt(s * q * (1.0 - q)) + 2.0
    hi_rank = math.floor(q * s - margin)  # 0-based ranks in the descending sample
    lo_rank = math.ceil(q * s + margin)
    if hi_rank < 0 and lo_rank >= s:  # the bracket would be the whole tensor
        return None

    count_above_bracket = 0
    above_hi = None
    if hi_rank >= 0:
        # Count `> hi` (not `n - #(<= hi)`), so that NaNs, which compare False, are never counted as selected.
        hi = _kthvalue_largest(sample, hi_rank + 1)
        above_hi = torch.gt(flat, hi, out=workspace[n : 2 * n])
        count_above_bracket = int(torch.count_nonzero(above_hi))
        if count_above_bracket >= k:  # hi below the cut-off
            return None
    if lo_rank < s:
        in_bracket = torch.ge(flat, _kthvalue_largest(sample, lo_rank + 1), out=workspace[:n])
        if above_hi is not None:  # x > hi implies x >= lo: [x >= lo] - [x > hi] is [lo <= x <= hi], bytewise
            in_bracket.view(torch.uint8).sub_(above_hi.view(torch.uint8))
    else:
        in_bracket = torch.le(flat, hi, out=workspace[:n])
    positions = torch.nonzero(in_bracket).view(-1)  # ascending flat indices
    bracket = torch.index_select(flat, 0, positions)
    rank_in_bracket = k - count_above_bracket
    if rank_in_bracket > bracket.numel():  # lo above the cut-off
        return None
    threshold = _kthvalue_largest(bracket, rank_in_bracket)
    count_above = count_above_bracket + int(torch.count_nonzero(bracket > threshold))
    tied = positions[bracket == threshold]
    split = n if count_above + tied.numel() == k else int(tied[k - count_above - 1]) + 1
    return TopkCutoff(threshold=threshold, split=split, k=k)


@dataclass(frozen=True)
class TopkCutoff:
    """Where the top ``k`` of a score tensor end, as a threshold instead of an index set.

    Entry ``i`` (flat, row-major) is among the top ``k`` iff ``s_i > threshold``, or ``s_i == threshold`` and
    ``i < split``. ``split == numel`` unless more entries tie at the threshold than fit in ``k``; then ``split`` is
    one past the flat index of the last tied entry kept.

    Attributes:
        threshold: 0-dim tensor (dtype and device of the scores), the ``k``-th largest score.
        split: flat index bounding the kept ties, ``0 < split <= numel``.
        k: number of entries selected.
    """

    threshold: torch.Tensor
    split: int
    k: int


def kth_largest_threshold(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Exact ``k``-th largest value of ``scores`` (over all entries), without sorting the tensor.

    ``t = kth_largest_threshold(s, k)`` satisfies ``#(s > t) < k <= #(s >= t)``.

    Args:
        scores: real tensor of any shape and dtype (floating or integer), without NaN.
        k: rank from the top, ``1 <= k <= scores.numel()``.

    Returns:
        0-dim tensor of ``scores.dtype`` on ``scores.device``.
    """
    return topk_cutoff(scores, k).threshold


def topk_cutoff(scores: torch.Tensor, k: int, *, workspace: torch.Tensor | None = None) -> TopkCutoff:
    """The cut-off of the ``k`` largest ``scores``, with ties broken by lowest flat index (see ``TopkCutoff``).

    For tensors of at least ``2**16`` entries the threshold comes from a sampled bracket (a few elementwise passes),
    otherwise, or when the bracket misses, from ``torch.kthvalue`` over the whole tensor.

    Args:
        scores: real tensor of any shape, floating or integer, without NaN. Not modified.
        k: ``1 <= k <= scores.numel()``.
        workspace: optional bool tensor of at least ``2 * scores.numel()`` entries (contents ignored, overwritten)
            for the temporary masks. Kernels calling this once per task pass one, allocated once: on CPU, touching
            fresh memory for the first time (page faults) costs more than the comparisons themselves.
    """
    _check_scores(scores)
    numel = scores.numel()
    _check_k(k, numel)
    if k == 0:
        raise ValueError("k must be >= 1 for a cut-off (nothing is selected with k = 0)")
    flat = scores.reshape(-1)
    if workspace is None:
        workspace = torch.empty(2 * numel, dtype=torch.bool, device=flat.device)
    elif workspace.dtype != torch.bool or workspace.numel() < 2 * numel or workspace.device != flat.device:
        raise ValueError(
            f"workspace must be a bool tensor of >= {2 * numel} entries on {flat.device}, "
            f"got {workspace.dtype} with {workspace.numel()} entries on {workspace.device}"
        )
    workspace = workspace.view(-1)
    found = _sampled_bracket_cutoff(flat, k, workspace) if numel >= _SAMPLING_MIN_NUMEL else None
    if found is not None:
        return found
    threshold = _kthvalue_largest(flat, k)
    count_above = int(torch.count_nonzero(torch.gt(flat, threshold, out=workspace[:numel])))
    count_equal = int(torch.count_nonzero(torch.eq(flat, threshold, out=workspace[:numel])))
    if count_above + count_equal < k:
        raise ValueError(
            f"cannot select the top {k} scores: only {count_above + count_equal} compare as ordered (NaN scores?)"
        )
    split = numel
    if count_above + count_equal > k:
        # More entries tie at the cut-off than fit: keep the first ones by flat index.
        split = _index_of_nth_true(torch.eq(flat, threshold, out=workspace[:numel]), k - count_above) + 1
    return TopkCutoff(threshold=threshold, split=split, k=k)


def _index_of_nth_true(mask: torch.Tensor, n: int) -> int:
    """Flat index of the ``n``-th (1-based) ``True`` entry of a 1-D bool tensor holding at least ``n`` of them.

    Bisection on prefix counts (``count_nonzero`` of halves, about 2 passes over the mask in total) down to a
    block of ``_TIE_BLOCK`` entries, then ``nonzero`` inside the block; no int64 index tensor of the full size.
    """
    start, stop, before = 0, mask.numel(), 0  # the answer lies in [start, stop); `before` Trues precede `start`
    while stop - start > _TIE_BLOCK:
        middle = (start + stop) // 2
        left = int(torch.count_nonzero(mask[start:middle]))
        if before + left >= n:
            stop = middle
        else:
            start, before = middle, before + left
    positions = torch.nonzero(mask[start:stop]).flatten()
    return start + int(positions[n - before - 1])


def topk_mask(scores: torch.Tensor, k: int, *, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of ``scores``; exactly ``k`` entries are ``True``.

    ``mask = (scores > t) | ((scores == t) & first_ties)``, with ``t`` the ``k``-th largest value and
    ``first_ties`` the ``k - #(scores > t)`` entries equal to ``t`` with the lowest flat (row-major) index.
    Equivalently: order the entries by score descending, then flat index ascending, and keep the first ``k``.
    Equals the index set of ``torch.topk(scores.flatten(), k)`` when the scores are tie-free; does not sort and
    allocates no index tensor.

    Args:
        scores: real tensor of any shape, floating (fp32/fp16/bf16/fp64) or integer, without NaN. Not modified.
        k: number of entries to keep, ``0 <= k <= scores.numel()``.
        workspace: optional reusable bool buffer of ``>= 2 * numel`` entries, see ``topk_cutoff``.

    Returns:
        Bool tensor of ``scores.shape``.
    """
    _check_scores(scores)
    numel = scores.numel()
    _check_k(k, numel)
    if k == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k == numel:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    flat = scores.reshape(-1)
    cutoff = topk_cutoff(flat, k, workspace=workspace)
    mask = flat >= cutoff.threshold
    if cutoff.split < numel:
        torch.gt(flat[cutoff.split :], cutoff.threshold, out=mask[cutoff.split :])
    return mask.view(scores.shape)


def magnitude_trim(values: torch.Tensor, cutoff: TopkCutoff, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``values * topk_mask(|values|, k)`` in one elementwise pass, given ``cutoff = topk_cutoff(|values|, k)``.

    ``hardshrink(x, l) = x if |x| > l else 0`` does it: ``l = nextafter(t, -inf)`` (keeps ``|x| >= t``) before
    ``cutoff.split`` and ``l = t`` (keeps ``|x| > t``) from there on. No boolean mask, no ``abs``/``where``
    temporaries; dropped entries become ``0``. Once the cut-off is known, re-trimming costs one pass.

    Args:
        values: floating tensor (e.g. one task vector ``tau``). Not modified.
        cutoff: ``topk_cutoff`` of ``values.abs()`` (any shape with the same flat order).
        out: optional contiguous output of ``values``' shape and dtype (must not alias ``values``).

    Returns:
        ``out`` (or a new tensor) of ``values.shape``.
    """
    if not values.is_floating_point():
        raise ValueError(f"magnitude_trim needs a floating-point tensor, got dtype {values.dtype}")
    if out is None:
        out = torch.empty_like(values, memory_format=torch.contiguous_format)
    flat_values = values.reshape(-1)
    flat_out = out.view(-1)
    threshold = cutoff.threshold.to(values.dtype)
    below = torch.nextafter(threshold, torch.full_like(threshold, -math.inf))
    split = cutoff.split
    # aten's out= variant of F.hardshrink, which has none: writes straight into the caller's buffer.
    torch.ops.aten.hardshrink.out(flat_values[:split], below.item(), out=flat_out[:split])
    if split < flat_values.numel():
        torch.ops.aten.hardshrink.out(flat_values[split:], threshold.item(), out=flat_out[split:])
    return out


def signed_trim_(signed: torch.Tensor, cutoff: TopkCutoff) -> torch.Tensor:
    """In place: ``v_i`` where ``v_i >= t`` (flat ``i < cutoff.split``) or ``v_i > t`` (``i >= split``), else ``0``.

    For ``v = gamma * tau`` (``gamma`` in ``{-1, +1}`` per entry) and ``cutoff = topk_cutoff(|tau|, k)``, this is
    ``relu(gamma * magnitude_trim(tau, cutoff))``: the magnitudes of the kept entries of ``tau`` whose sign is
    ``gamma``, zero elsewhere (entries kept at a threshold of 0 are zeros either way). One pass of
    ``torch.threshold`` (``x if x > l else 0``, with ``l`` as in ``magnitude_trim``), no mask.

    Args:
        signed: contiguous floating tensor, overwritten.
        cutoff: ``topk_cutoff`` of the magnitudes (any shape with the same flat order), threshold ``>= 0``.

    Returns:
        ``signed``.
    """
    flat = signed.view(-1)
    threshold = cutoff.threshold.to(signed.dtype)
    below = torch.nextafter(threshold, torch.full_like(threshold, -math.inf))
    split = cutoff.split
    torch.threshold_(flat[:split], below.item(), 0.0)
    if split < flat.numel():
        torch.threshold_(flat[split:], threshold.item(), 0.0)
    return signed


def topk_mask_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Row-wise ``topk_mask``: ``mask[t] = topk_mask(scores[t], k)`` for each leading index ``t``.

    Args:
        scores: real tensor of shape ``[T, *shape]`` (e.g. ``T`` stacked task vectors' magnitudes).
        k: number of entries kept in each row, ``0 <= k <= prod(shape)``.

    Returns:
        Bool tensor of shape ``[T, *shape]`` with exactly ``k`` ``True`` entries per row.
    """
    if scores.dim() < 1:
        raise ValueError("scores must have a leading row dimension, got a 0-dim tensor")
    mask = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    for row in range(scores.shape[0]):
        mask[row] = topk_mask(scores[row], k)
    return mask
