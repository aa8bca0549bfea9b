"""``dare_linear`` and ``dare_ties``: random drop and rescale, then sum or TIES (Yu et al., 2024).

The keep masks come from at most 16 random bits per entry (``dare_keep_mask``), not from ``torch.bernoulli``, which
costs 4-6 times more on CPU (a float draw and a comparison per entry): the keep probability is ``density`` rounded to
a multiple of ``2**-16``, and an entry draws only as many bits as that probability needs (1 for 0.5, 2 for 0.25 or
0.75, ..., 16 for 0.3). Masks are reproducible from the generator's seed, but they are not the draws PEFT's
``random_pruning`` or mergekit make for the same seed; given the same masks the results equal PEFT's.
"""

from __future__ import annotations

import torch

from .registry import Parameter, check_kernel_inputs, register_merge_method
from .task_arithmetic import task_arithmetic
from .ties import MAJORITY_SIGN_METHOD, sign_elected_disjoint_mean

PAPER_TITLE = "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch"
PAPER_URL = "https://arxiv.org/abs/2311.03099"

DARE_DENSITY = Parameter(
    "density",
    float,
    0.5,
    "Probability of keeping each entry of each task vector (1 - drop rate p), resolved to 1/65536 (the masks draw "
    "fewer random bits for 0.5, 0.25, ... : faster); 0.5 is the conventional default.",
    low=0.0,
    high=1.0,
    low_inclusive=False,
)
# The keep probability is resolved to 2**-_RESOLUTION_BITS; an entry draws at most that many random bits.
_RESOLUTION_BITS = 16


def _keep_levels(density: float) -> int:
    """``levels = round(density * 2**16)``, clamped to ``[1, 2**16 - 1]`` so that ``0 < density < 1`` never keeps
    all or nothing: an entry is kept with probability ``levels / 2**16``."""
    return min(max(round(density * 2**_RESOLUTION_BITS), 1), 2**_RESOLUTION_BITS - 1)


def _draw_bits(levels: int) -> int:
    """Random bits per entry: the fewest of 1, 2, 4, 8, 16 in which ``levels / 2**16`` is a whole number of steps."""
    for bits in (1, 2, 4, 8):
        if levels % (1 << (_RESOLUTION_BITS - bits)) == 0:
            return bits
    return _RESOLUTION_BITS


def dare_keep_mask(
    numel: int,
    density: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool ``[numel]`` mask, ``True`` (kept) with probability ``density`` (to ``2**-16``) independently per entry.

    With ``levels = round(density * 2**16)`` (see ``_keep_levels``) and ``b`` the fewest bits among 1, 2, 4, 8, 16
    such that ``levels`` is a multiple of ``2**(16 - b)`` (``_draw_bits``: 1 for density 0.5, 16 for 0.3),
    ``ceil(numel * b / 64)`` int64 words of 64 uniform random bits are drawn from ``generator`` (``random_`` over the
    full int64 range). Entry ``i`` reads bits ``[i*b, (i+1)*b)`` of their little-endian bit stream as an unsigned
    integer ``r_i`` (for ``b = 16``: the ``i``-th int16 of the words, offset by ``2**15``) and is kept iff
    ``r_i < levels / 2**(16 - b)``, i.e. with probability exactly ``levels / 2**16``. Same generator state, same mask.

    Args:
        numel: number of entries.
        density: keep probability, in ``(0, 1)``.
        generator: source of the bits; ``None`` uses torch's global generator.
        device: where the mask lives (the generator's device).
        out: optional bool tensor of ``numel`` entries to write the mask into.
    """
    levels = _keep_levels(density)
    bits = _draw_bits(levels)
    per_word = 64 // bits
    words = torch.empty(-(-numel // per_word), dtype=torch.int64, device=device).random_(
        -(2**63), None, generator=generator
    )
    if bits == _RESOLUTION_BITS:  # int16 draws, compared signed: r - 2**15 < levels - 2**15
        return torch.lt(words.view(torch.int16)[:numel], levels - 2 ** (_RESOLUTION_BITS - 1), out=out)
    bound = levels >> (_RESOLUTION_BITS - bits)
    stream = words.view(torch.uint8)
    if bits == 8:
        return torch.lt(stream[:numel], bound, out=out)
    per_byte = 8 // bits
    draws = torch.empty((stream.numel(), per_byte), dtype=torch.uint8, device=stream.device)
    for slot in range(per_byte):  # entry per_byte * j + slot reads bits [slot * b, (slot + 1) * b) of byte j
        torch.bitwise_and(torch.bitwise_right_shift(stream, slot * bits), (1 << bits) - 1, out=draws[:, slot])
    return torch.lt(draws.view(-1)[:numel], bound, out=out)


RESCALE = Parameter(
    "rescale",
    bool,
    True,
    "Divide the kept entries by density, so that the expected pruned task vector equals the original one.",
)


def dare_drop(
    task_tensors: torch.Tensor,
    density: float,
    *,
    rescale: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Drop And REscale: ``x_t = tau_t * m_t / density`` with ``m_t`` i.i.d. Bernoulli(``density``) per entry.

    The masks are drawn task after task in flat (row-major) order with ``dare_keep_mask`` (up to 16 random bits per
    entry: the keep probability is ``density`` to ``2**-16``). ``density >= 1`` keeps everything and draws nothing (as PEFT).

    Args:
        task_tensors: ``[T, N]`` flat task vectors. Not modified.
        density: keep probability, in ``(0, 1]``.
        rescale: divide kept entries by ``density`` (``E[x_t] = tau_t``); without it, ``E[x_t] = density * tau_t``.
        generator: source of the draws (on the device of ``task_tensors``); ``None`` uses torch's global generator.

    Returns:
        ``[T, N]`` new tensor of the dropped (and rescaled) task vectors.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if density >= 1.0:
        return task_tensors.clone()
    num_tasks, numel = task_tensors.shape[0], task_tensors[0].numel()
    dropped = torch.empty_like(task_tensors)
    keep = torch.empty(numel, dtype=torch.bool, device=task_tensors.device)
    for task in range(num_tasks):
        dare_keep_mask(numel, density, generator=generator, device=task_tensors.device, out=keep)
        _drop_into(dropped[task], task_tensors[task], keep, density, rescale)
    return dropped


def _drop_into(
    out: torch.Tensor, task_tensor: torch.Tensor, keep: torch.Tensor, density: float, rescale: bool
) -> torch.Tensor:
    """``out = task_tensor * keep [/ density]`` for a bool mask ``keep``, as PEFT's ``tensor * mask / density``."""
    torch.mul(task_tensor, keep.view(torch.uint8), out=out)  # times 1 or 0 (promoted to float): the same bits
    if rescale:
        out.div_(density)  # divide (not multiply by 1/density): bit-identical to PEFT
    return out


@register_merge_method(
    "dare_linear",
    pretty_name="DARE (linear)",
    paper_title=PAPER_TITLE,
    paper_url=PAPER_URL,
    parameters=(DARE_DENSITY, RESCALE),
    description="Randomly drop entries of each task vector with probability 1 - density, rescale, sum with weights.",
    stochastic=True,
)
def dare_linear(
    task_tensors: torch.Tensor,
    weights: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    density: float = 0.5,
    rescale: bool = True,
) -> torch.Tensor:
    """DARE followed by a weighted sum, as ``peft.utils.merge_utils.dare_linear``.

    ``delta = sum_t w_t * tau_t * m_t / density``, ``m_t ~ Bernoulli(density)`` per entry (see ``dare_drop``).

    Args:
        task_tensors: ``[T, *shape]`` task vectors (fp32). Not modified.
        weights: ``[T]`` per-task weights.
        generator: random source; the caller seeds one per tensor for reproducible merges. ``None``: global RNG.
        density: keep probability, in ``(0, 1]``.
        rescale: divide kept entries by ``density``.

    Returns:
        ``[*shape]`` merged delta.
    """
    weights = check_kernel_inputs(task_tensors, weights)
    num_tasks, shape = task_tensors.shape[0], task_tensors.shape[1:]
    flat = task_tensors.reshape(num_tasks, task_tensors[0].numel())
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if density >= 1.0:
        return task_arithmetic(task_tensors, weights)
    # Same draws as dare_drop, one task at a time, so that no [T, N] copy is needed.
    numel = flat.shape[1]
    keep = torch.empty(numel, dtype=torch.bool, device=flat.device)
    dropped = torch.empty_like(flat[0])
    merged = torch.zeros_like(flat[0])
    for task in range(num_tasks):
        dare_keep_mask(numel, density, generator=generator, device=flat.device, out=keep)
        merged.add_(_drop_into(dropped, flat[task], keep, density, rescale).mul_(weights[task]))
    return merged.view(shape)


@register_merge_method(
    "dare_ties",
    pretty_name="DARE (TIES)",
    paper_title=PAPER_TITLE,
    paper_url=PAPER_URL,
    parameters=(DARE_DENSITY, MAJORITY_SIGN_METHOD, RESCALE),
    description="Randomly drop and rescale each task vector, then TIES sign election and disjoint mean.",
    stochastic=True,
)
def dare_ties(
    task_tensors: torch.Tensor,
    weights: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    density: float = 0.5,
    majority_sign_method: str = "total",
    rescale: bool = True,
) -> torch.Tensor:
    """DARE followed by TIES sign election and disjoint mean, as ``peft.utils.merge_utils.dare_ties``.

    ``x_t = tau_t * m_t / density`` (``dare_drop``), then
    ``delta = sum_t w_t x_t [sign(x_t) == gamma] / max(1, sum_t [sign(x_t) == gamma])`` with ``gamma`` elected from
    the ``x_t`` (see ``ties.sign_elected_disjoint_mean``).

    Args:
        task_tensors: ``[T, *shape]`` task vectors (fp32). Not modified.
        weights: ``[T]`` per-task weights.
        generator: random source; the caller seeds one per tensor for reproducible merges. ``None``: global RNG.
        density: keep probability, in ``(0, 1]``.
        majority_sign_method: ``"total"`` or ``"frequency"``.
        rescale: divide kept entries by ``density``.

    Returns:
        ``[*shape]`` merged delta.
    """
    weights = check_kernel_inputs(task_tensors, weights)
    num_tasks, shape = task_tensors.shape[0], task_tensors.shape[1:]
    numel = task_tensors[0].numel()
    flat = task_tensors.reshape(num_tasks, numel)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    # The masks (1 byte per entry and task), not the dropped task vectors (4 bytes): x_t is rebuilt per block.
    keeps = None
    if density < 1.0:
        keeps = torch.empty((num_tasks, numel), dtype=torch.bool, device=flat.device)
        for task in range(num_tasks):
            dare_keep_mask(numel, density, generator=generator, device=flat.device, out=keeps[task])

    def dropped_task(task: int, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        values = flat[task, start:stop]
        return values if keeps is None else _drop_into(out, values, keeps[task, start:stop], density, rescale)

    return sign_elected_disjoint_mean(dropped_task, weights, flat, majority_sign_method).view(shape)
