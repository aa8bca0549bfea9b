"""Exact top-k selection without sorting.

Every sparsifying kernel (``ties``, ``magnitude_prune``, ``breadcrumbs``, the importance masks of STA) needs the
same primitive: a boolean mask holding *exactly* ``k`` entries of a score tensor, the largest ones. PEFT uses
``torch.topk`` and mergekit a full ``torch.argsort``; both are ``O(n log k)`` / ``O(n log n)`` and materialise
int64 indices. Here the mask is built from a threshold instead:

1. ``kth_largest_threshold`` finds the ``k``-th largest value ``t`` exactly. For large tensors it estimates the
   cut-off from a fixed pseudo-random sample, counts the entries above a narrow bracket around it and selects
   (``numpy.partition``) only in the (small) bracket, whose flat positions it keeps, so that entries tied at the
   cut-off are located without another pass; it falls back to ``torch.kthvalue`` on the whole tensor when the
   bracket misses (rare, or with massive ties). The count and the bracket come from one pass over the tensor,
   block by block (``blocks``), through NumPy on CPU; ``topk_cutoff(tau, k, magnitude=True)`` ranks ``|tau|``
   without materialising it.
2. ``topk_mask`` keeps every entry ``> t`` and, among the entries ``== t``, the ones with the lowest flat
   (row-major) index until exactly ``k`` are kept.

Tie-breaking rule (documented contract): entries are ordered by score descending, then by flat index ascending;
the mask keeps the first ``k`` entries of that order. Hence masks are nested: ``topk_mask(s, k1)`` is a subset of
``topk_mask(s, k2)`` whenever ``k1 <= k2``. Where the scores are tie-free the mask equals the one of
``torch.topk``; where ties straddle the cut-off PEFT's ``topk`` and mergekit's ``argsort`` may keep other members
of a tied group, and only the entries away from the cut-off are guaranteed to agree.

NaN scores are not supported: a ``ValueError`` is raised when they are detected (always on the ``kthvalue`` path,
when the sample holds one on the sampled path); undetected NaNs are never selected.

Timing (torch 2.13, CPU, 50M-element fp32 ``|randn|``, ``k = 0.2 * n``; the 2-core benchmark machine, idle, best of
3): ``torch.topk`` + scatter 1.95 s, ``torch.kthvalue`` + ``>=`` 0.66 s, ``topk_mask`` 0.11 s, with one thread as
with two (the blocked NumPy sweep is single-threaded). Below ``2**16`` entries the plain ``kthvalue`` path is as
fast and is used. To check on another machine::

    python -c "import time, torch; from hf_sta.methods.selection import topk_mask; x = torch.randn(50_000_000).abs_();
    t = time.perf_counter(); topk_mask(x, 10_000_000); print(time.perf_counter() - t)"
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "BLOCK_SIZE",
    "TopkCutoff",
    "block_size",
    "blocks",
    "block_buffers",
    "density_to_k",
    "kth_largest_threshold",
    "magnitude_trim",
    "topk_cutoff",
    "topk_mask",
    "topk_mask_per_row",
]

# Below this many elements a plain ``torch.kthvalue`` is as fast as the sampled bracket (measured crossover).
_SAMPLING_MIN_NUMEL = 1 << 16
# Size of the sample that estimates the cut-off: _SAMPLE_SCALE * n**(2/3), clamped to [_MIN_SAMPLE_SIZE,
# _SAMPLE_SIZE]. The bracket then holds about ``2 * _BRACKET_SIGMAS * sqrt(q(1-q)/s)`` of the tensor (q = k / n),
# e.g. 2.7% for n = 885k (s = 18.4k) and 0.7% for n = 28M (s = 262k) at q = 0.2. Selecting in the sample and
# collecting the bracket cost about as much per entry, so the total is least for s ~ n**(2/3); the scale and the
# width (a miss, probability ~1e-5, costs a fallback) were tuned on SmolLM2-135M's tensor shapes, 2-core machine:
# the cut-offs of all its tensors (three task vectors) took 0.53-0.61 s, 0.74 s with scale 1, 5 sigmas and at most
# 2**16 samples, and about 1.0 s with those and torch.kthvalue for both selections.
_SAMPLE_SCALE = 2.0
_SAMPLE_SIZE = 1 << 18
_MIN_SAMPLE_SIZE = 1 << 10
_BRACKET_SIGMAS = 4.5
# The sample only steers speed, never the result; a fixed seed keeps the running time reproducible.
_SAMPLE_SEED = 0x5EED
# Ties are located by bisection on prefix counts down to a block of this size, then by ``nonzero``.
_TIE_BLOCK = 1 << 16
# Entries per block of the blocked elementwise passes (see ``blocks``): 2**18 fp32 entries are 1 MiB, so a kernel's
# handful of block temporaries stays in the last-level cache. Measured on the 2-core benchmark machine, a chain of
# ten in-place passes over 28M entries: 63 ms unblocked, 31 ms with blocks of 2**18 or 2**20, 38 ms with 2**16
# (per-call overhead), 45 ms with 2**22.
BLOCK_SIZE = 1 << 18
# Score dtypes the threshold sweep reads through NumPy views as they are; others (bfloat16) are converted per block.
_NUMPY_DTYPES = frozenset(
    {torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8}
)


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


def blocks(numel: int, device: torch.device | str = "cpu") -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive blocks of ``BLOCK_SIZE`` entries covering ``range(numel)``.

    Kernels run their elementwise passes block by block on CPU, so that a chain of ten passes reads each entry from
    memory once and works on cache-resident temporaries of ``BLOCK_SIZE`` entries (no page faults on fresh
    full-size buffers). On other devices a single block covers everything: a kernel launch per block would cost more
    than it saves.
    """
    block = max(block_size(numel, device), 1)
    for start in range(0, numel, block):
        yield start, min(start + block, numel)


def block_size(numel: int, device: torch.device | str = "cpu") -> int:
    """Entries in the largest block ``blocks(numel, device)`` yields: the size of a kernel's block buffers."""
    return min(BLOCK_SIZE, numel) if torch.device(device).type == "cpu" else numel


_block_buffers = threading.local()


def block_buffers(
    name: str, rows: int, numel: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``[rows, block_size(numel, device)]`` scratch buffers for a blocked kernel, reused by its later calls.

    On CPU the buffers of each ``name`` (one per call site: a kernel must not hand out the same name twice at once)
    and dtype are kept per thread and grown as needed, at most ``rows * BLOCK_SIZE`` entries: a merge calls a kernel
    for every tensor, and fresh allocations of a few MiB are returned to the system and faulted in again each time
    (several microseconds per 4 KiB page on a VM). Their content is undefined. Elsewhere they are plain
    ``torch.empty`` (one block spans the whole tensor there).
    """
    size = block_size(numel, device)
    if torch.device(device).type != "cpu":
        return torch.empty((rows, size), dtype=dtype, device=device)
    cache = _block_buffers.__dict__.setdefault("buffers", {})
    buffer = cache.get((name, dtype))
    if buffer is None or buffer.numel() < rows * size:
        buffer = cache[(name, dtype)] = torch.empty(rows * size, dtype=dtype)
    return buffer[: rows * size].view(rows, size)


@functools.lru_cache(maxsize=16)
def _sample_index(numel: int, sample_size: int) -> np.ndarray:
    """``sample_size`` fixed pseudo-random positions in ``range(numel)``, ascending (the sample is gathered in one
    forward sweep), cached: every task vector of a tensor (and every tensor of the same size) is sampled at the same
    positions."""
    return np.sort(np.random.default_rng(_SAMPLE_SEED).integers(numel, size=sample_size))


def _sampled_bracket_cutoff(flat: torch.Tensor, k: int, magnitude: bool) -> TopkCutoff | None:
    """The cut-off of the ``k`` largest entries of 1-D CPU ``flat`` (of ``|flat|`` with ``magnitude``), found in a
    sampled bracket; ``None`` on a miss.

    With ``q = k / n``, the sample's order statistics at ranks ``q*s -/+ m`` (``m`` a few standard deviations of
    the rank estimate) give ``hi >= t >= lo`` with high probability. Then ``c_hi = #(x > hi)``; if
    ``c_hi < k <= c_hi + |B|`` for the bracket ``B = {x : lo <= x <= hi}``, which is small, ``t`` is the
    ``(k - c_hi)``-th largest entry of ``B``, ``#(x > t) = c_hi + #(B > t)``, and the entries tied at ``t`` all lie
    in ``B``, whose flat positions are known: the tie split costs no pass over ``flat``. One blocked sweep over
    ``flat`` (``abs``, two comparisons, a count and a ``nonzero`` per block, see ``blocks``), no sort of it and no
    full-size temporary. The two selections (in the sample, in the bracket) are ``numpy.partition`` (introselect).
    """
    n = flat.numel()
    sample_size = min(_SAMPLE_SIZE, max(_MIN_SAMPLE_SIZE, round(_SAMPLE_SCALE * n ** (2 / 3))))
    index = _sample_index(n, sample_size)
    if flat.dtype in _NUMPY_DTYPES:
        sample = flat.detach().numpy()[index]  # a copy
    else:  # bfloat16: exactly in fp32
        sample = flat[torch.from_numpy(index)].float().numpy()
    if magnitude:
        np.abs(sample, out=sample)
    if sample.dtype.kind == "f" and bool(np.isnan(sample).any()):
        return None  # let the kthvalue path report the NaNs
    s = sample.size
    q = k / n
    margin = _BRACKET_SIGMAS * math.sqrt(s * q * (1.0 - q)) + 2.0
    hi_rank = math.floor(q * s - margin)  # 0-based ranks in the descending sample: ascending index s - 1 - rank
    lo_rank = math.ceil(q * s + margin)
    if hi_rank < 0 and lo_rank >= s:  # the bracket would be the whole tensor
        return None
    sample.partition([s - 1 - rank for rank in (hi_rank, lo_rank) if 0 <= rank < s])
    # Count `> hi` (not `n - #(<= hi)`), so that NaNs, which compare False, are never counted as selected.
    hi = sample[s - 1 - hi_rank] if hi_rank >= 0 else None
    lo = sample[s - 1 - lo_rank] if lo_rank < s else None

    found = _bracket_sweep(flat, k, lo, hi, magnitude)
    if found is None:  # hi below the cut-off
        return None
    count_above_bracket, positions, bracket = found
    rank = k - count_above_bracket  # of the cut-off in the bracket, from its top (1-based)
    if rank > bracket.size:  # lo above the cut-off
        return None
    pivot = bracket.size - rank
    ordered = np.partition(bracket, pivot)  # a copy: `bracket` keeps the order of `positions`
    threshold = ordered[pivot]
    count_above = count_above_bracket + int(np.count_nonzero(ordered[pivot + 1 :] > threshold))
    tied = positions[bracket == threshold]
    split = n if count_above + tied.size == k else int(tied[k - count_above - 1]) + 1
    # exact: a value of flat (bfloat16 ones come back as the same fp32 value)
    return TopkCutoff(threshold=torch.tensor(threshold).to(flat.dtype), split=split, k=k)


def _bracket_sweep(
    flat: torch.Tensor, k: int, lo: np.generic | None, hi: np.generic | None, magnitude: bool
) -> tuple[int, np.ndarray, np.ndarray] | None:
    """One blocked pass over ``s = flat`` (``|flat|`` with ``magnitude``), a 1-D CPU tensor: ``(#(s > hi), positions,
    values)`` of the bracket ``lo <= s <= hi`` (positions ascending, int64), or ``None`` as soon as
    ``#(s > hi) >= k``. A missing ``hi`` (``lo``) leaves the bracket open above (below).

    Through NumPy views of the same memory (no copy of ``flat``): the sweep is comparisons into bool masks, their
    counts and the positions of a sparse mask, which NumPy runs several times faster than torch on CPU (2**18 fp32
    entries, 2-core benchmark machine: ``>`` 16 us vs 106 us, bool count 10 us vs 43 us, positions of a 2% mask 44 us
    vs 210 us), single-threaded. Dtypes NumPy lacks (bfloat16) are converted block by block to fp32, exactly; the
    values come back in fp32 then. Comparisons are exact and NaNs compare False, as in torch.
    """
    native = flat.dtype in _NUMPY_DTYPES
    array = flat.detach().numpy() if native else None
    n = flat.numel()
    magnitudes = (
        block_buffers("sweep", 1, n, flat.dtype if native else torch.float32)[0].numpy() if magnitude else None
    )
    above_hi, in_bracket = block_buffers("sweep", 2, n, torch.bool).numpy()
    count_above_bracket = 0
    positions, values = [], []
    for start, stop in blocks(n):
        width = stop - start
        chunk = array[start:stop] if native else flat[start:stop].float().numpy()
        block = chunk if magnitudes is None else np.abs(chunk, out=magnitudes[:width])
        above = None
        if hi is not None:
            above = np.greater(block, hi, out=above_hi[:width])
            count_above_bracket += int(np.count_nonzero(above))
            if count_above_bracket >= k:
                return None
        if lo is not None:
            inside = np.greater_equal(block, lo, out=in_bracket[:width])
            if above is not None:  # x > hi implies x >= lo: the bracket is [x >= lo] xor [x > hi]
                np.logical_xor(inside, above, out=inside)
        else:
            inside = np.less_equal(block, hi, out=in_bracket[:width])
        local = np.flatnonzero(inside)  # ascending
        values.append(block[local])
        positions.append(local + start)
    return count_above_bracket, np.concatenate(positions).astype(np.int64, copy=False), np.concatenate(values)


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
    _levels: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def levels(self, dtype: torch.dtype) -> tuple[float, float]:
        """``(below, at)``: ``x > below`` keeps ``x >= threshold`` (before ``split``), ``x > at`` keeps
        ``x > threshold`` (from ``split`` on), with the threshold cast to ``dtype``; cached per dtype."""
        if dtype not in self._levels:
            threshold = self.threshold.to(dtype)
            below = torch.nextafter(threshold, torch.full_like(threshold, -math.inf))
            self._levels[dtype] = (below.item(), threshold.item())
        return self._levels[dtype]


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


def topk_cutoff(scores: torch.Tensor, k: int, *, magnitude: bool = False) -> TopkCutoff:
    """The cut-off of the ``k`` largest ``scores`` (``|scores|`` with ``magnitude``), ties broken by lowest flat
    index (see ``TopkCutoff``).

    On CPU, for tensors of at least ``2**16`` entries, the threshold comes from a sampled bracket (one blocked sweep,
    no full-size temporary); otherwise (smaller tensors, other devices), or when the bracket misses, from
    ``torch.kthvalue`` over the whole tensor.

    Args:
        scores: real tensor of any shape, floating or integer, without NaN. Not modified.
        k: ``1 <= k <= scores.numel()``.
        magnitude: rank by absolute value (a task vector's magnitudes) without materialising ``|scores|``.
    """
    _check_scores(scores)
    numel = scores.numel()
    _check_k(k, numel)
    if k == 0:
        raise ValueError("k must be >= 1 for a cut-off (nothing is selected with k = 0)")
    flat = scores.reshape(-1)
    sampled = numel >= _SAMPLING_MIN_NUMEL and flat.device.type == "cpu"
    found = _sampled_bracket_cutoff(flat, k, magnitude) if sampled else None
    if found is not None:
        return found
    if magnitude:
        flat = flat.abs()
    threshold = _kthvalue_largest(flat, k)
    count_above = int(torch.count_nonzero(flat > threshold))
    equal = flat == threshold
    count_equal = int(torch.count_nonzero(equal))
    if count_above + count_equal < k:
        raise ValueError(
            f"cannot select the top {k} scores: only {count_above + count_equal} compare as ordered (NaN scores?)"
        )
    split = numel
    if count_above + count_equal > k:
        # More entries tie at the cut-off than fit: keep the first ones by flat index.
        split = _index_of_nth_true(equal, k - count_above) + 1
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


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of ``scores``; exactly ``k`` entries are ``True``.

    ``mask = (scores > t) | ((scores == t) & first_ties)``, with ``t`` the ``k``-th largest value and
    ``first_ties`` the ``k - #(scores > t)`` entries equal to ``t`` with the lowest flat (row-major) index.
    Equivalently: order the entries by score descending, then flat index ascending, and keep the first ``k``.
    Equals the index set of ``torch.topk(scores.flatten(), k)`` when the scores are tie-free; does not sort and
    allocates no index tensor.

    Args:
        scores: real tensor of any shape, floating (fp32/fp16/bf16/fp64) or integer, without NaN. Not modified.
        k: number of entries to keep, ``0 <= k <= scores.numel()``.

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
    cutoff = topk_cutoff(flat, k)
    mask = flat >= cutoff.threshold
    if cutoff.split < numel:
        torch.gt(flat[cutoff.split :], cutoff.threshold, out=mask[cutoff.split :])
    return mask.view(scores.shape)


def _split_in(cutoff: TopkCutoff, offset: int, numel: int) -> int:
    """Where ``cutoff.split`` falls in a block of ``numel`` entries starting at flat index ``offset``."""
    return min(max(cutoff.split - offset, 0), numel)


def magnitude_trim(
    values: torch.Tensor, cutoff: TopkCutoff, *, out: torch.Tensor | None = None, offset: int = 0
) -> torch.Tensor:
    """``values * topk_mask(|values|, k)`` in one elementwise pass, given ``cutoff = topk_cutoff(|values|, k)``.

    ``hardshrink(x, l) = x if |x| > l else 0`` does it: ``l = nextafter(t, -inf)`` (keeps ``|x| >= t``) before
    ``cutoff.split`` and ``l = t`` (keeps ``|x| > t``) from there on. No boolean mask, no ``abs``/``where``
    temporaries; dropped entries become ``0``. Once the cut-off is known, re-trimming costs one pass.

    Args:
        values: floating tensor (e.g. one task vector ``tau``, or a block of it). Not modified.
        cutoff: ``topk_cutoff`` of ``|tau|`` (any shape with the same flat order).
        out: optional contiguous output of ``values``' shape and dtype (must not alias ``values``).
        offset: flat index in ``tau`` of ``values``' first entry, when ``values`` is the block
            ``tau.reshape(-1)[offset : offset + values.numel()]``.

    Returns:
        ``out`` (or a new tensor) of ``values.shape``.
    """
    if not values.is_floating_point():
        raise ValueError(f"magnitude_trim needs a floating-point tensor, got dtype {values.dtype}")
    if out is None:
        out = torch.empty_like(values, memory_format=torch.contiguous_format)
    flat_values = values.reshape(-1)
    flat_out = out.view(-1)
    below, at = cutoff.levels(values.dtype)
    split = _split_in(cutoff, offset, flat_values.numel())
    # aten's out= variant of F.hardshrink, which has none: writes straight into the caller's buffer.
    if split > 0:
        torch.ops.aten.hardshrink.out(flat_values[:split], below, out=flat_out[:split])
    if split < flat_values.numel():
        torch.ops.aten.hardshrink.out(flat_values[split:], at, out=flat_out[split:])
    return out


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
