"""``dare_linear`` and ``dare_ties``: random drop and rescale, then sum or TIES (Yu et al., 2024)."""

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
    "Probability of keeping each entry of each task vector (1 - drop rate p); 0.5 is the conventional default.",
    low=0.0,
    high=1.0,
    low_inclusive=False,
)
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
    """Drop And REscale: ``x_t = tau_t * m_t / density`` with ``m_t ~ Bernoulli(density)`` i.i.d. per entry.

    The masks are drawn task after task in flat (row-major) order with
    ``torch.bernoulli(full(density), generator=generator)``, the same draws PEFT's ``random_pruning`` and mergekit's
    ``bernoulli`` make from the global generator: seeding ``generator`` like ``torch.manual_seed`` reproduces their
    masks exactly. ``density >= 1`` keeps everything and draws nothing (as PEFT).

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
    dropped = torch.empty_like(task_tensors)
    probabilities = torch.full_like(task_tensors[0], density)
    for task in range(task_tensors.shape[0]):
        _drop_into(dropped[task], task_tensors[task], probabilities, density, rescale, generator)
    return dropped


def _drop_into(
    out: torch.Tensor,
    task_tensor: torch.Tensor,
    probabilities: torch.Tensor,
    density: float,
    rescale: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``out = task_tensor * Bernoulli(density) [/ density]``; ``probabilities`` is filled with ``density``."""
    torch.bernoulli(probabilities, generator=generator, out=out)  # 1.0 kept, 0.0 dropped
    out.mul_(task_tensor)
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
    probabilities = torch.full_like(flat[0], density)
    dropped = torch.empty_like(flat[0])
    merged = torch.zeros_like(flat[0])
    for task in range(num_tasks):
        merged.add_(_drop_into(dropped, flat[task], probabilities, density, rescale, generator).mul_(weights[task]))
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
    flat = task_tensors.reshape(num_tasks, task_tensors[0].numel())
    dropped = dare_drop(flat, density, rescale=rescale, generator=generator)
    return sign_elected_disjoint_mean(lambda task: dropped[task], weights, majority_sign_method).view(shape)
