"""Merged parameters as a differentiable function of merge coefficients, evaluated with ``torch.func.functional_call``.

A merge with learned coefficients never builds ``T`` models: the base weights ``theta_0`` and the stacked directions
(task vectors, difference vectors) stay in memory once, and every step computes

    theta[name] = theta_0[name] + sum_d c_d^{group(name)} * direction_d[name]

as a graph that autograd differentiates in ``c``. ``functional_call`` runs the (frozen) model with these tensors in place
of its own parameters; buffers and every tensor not passed stay the module's own.

Coefficient granularity (how tensors share coefficients), :func:`parameter_groups`:

* ``"task"``: one group (``"all"``) for every tensor: ``c`` has ``D`` entries (task-wise AdaMerging).
* ``"layer"``: one group per numbered layer. The group of a tensor is its name up to and including the *first*
  numeric path component (``bert.encoder.layer.3.attention.self.query.weight`` -> ``bert.encoder.layer.3``,
  ``model.layers.10.mlp.up_proj.weight`` -> ``model.layers.10``, ``0.weight`` of an ``nn.Sequential`` -> ``0``).
  Tensors outside numbered layers go to ``"embeddings"`` when a path component contains ``embed`` (``embeddings``,
  ``embed_tokens``, ``patch_embed``), and to ``"other"`` otherwise (pooler, final norm, ``lm_head``).
* ``"tensor"``: each tensor is its own group (AdaMerging's "layer-wise" code learns exactly this: one coefficient per
  parameter tensor and task).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call

Granularity = Literal["task", "layer", "tensor"]
GRANULARITIES: tuple[str, ...] = ("task", "layer", "tensor")
TASK_GROUP = "all"
EMBEDDINGS_GROUP = "embeddings"
OTHER_GROUP = "other"

# A direction set for one tensor: a ``[D, *shape]`` tensor, or ``D`` tensors of ``shape`` (no stacked copy).
DirectionStack = torch.Tensor | Sequence[torch.Tensor]
ModelFn = Callable[..., Any]


def layer_of(name: str) -> str:
    """The ``"layer"`` group of a tensor name (see the module docstring for the rule)."""
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    if any("embed" in part.lower() for part in parts):
        return EMBEDDINGS_GROUP
    return OTHER_GROUP


def parameter_groups(names: Iterable[str], granularity: Granularity) -> dict[str, str]:
    """``{tensor name: group}`` for a coefficient granularity: ``"task"``, ``"layer"`` or ``"tensor"``."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
    if granularity == "task":
        return dict.fromkeys(names, TASK_GROUP)
    if granularity == "layer":
        return {name: layer_of(name) for name in names}
    return {name: name for name in names}


def group_order(groups: Mapping[str, str]) -> list[str]:
    """The distinct groups of ``groups`` in order of first appearance (the row order of coefficient tables)."""
    return list(dict.fromkeys(groups.values()))


def count_learnable(groups: Mapping[str, str], num_directions: int) -> int:
    """Learnable coefficients of a granularity: ``num_directions * number of distinct groups``."""
    return num_directions * len(group_order(groups))


def stack_directions(
    vectors: Mapping[str, Mapping[str, torch.Tensor]], names: Iterable[str]
) -> tuple[list[str], dict[str, list[torch.Tensor]]]:
    """``(direction names, {tensor name: [D tensors]})`` from ``{direction: {tensor name: tensor}}`` (task vectors).

    Every direction must hold every tensor of ``names`` with one shape; nothing is copied (the lists hold the given
    tensors, in the order of ``vectors``).
    """
    directions = list(vectors)
    if not directions:
        raise ValueError("No directions given (an empty mapping of task vectors).")
    stacked: dict[str, list[torch.Tensor]] = {}
    for name in names:
        tensors = []
        for direction in directions:
            if name not in vectors[direction]:
                raise KeyError(f"Direction '{direction}' has no tensor '{name}'.")
            tensors.append(vectors[direction][name])
        if any(t.shape != tensors[0].shape for t in tensors):
            shapes = {d: tuple(t.shape) for d, t in zip(directions, tensors)}
            raise ValueError(f"Tensor '{name}' has different shapes across directions: {shapes}.")
        stacked[name] = tensors
    return directions, stacked


def merged_parameters(
    base: Mapping[str, torch.Tensor],
    directions: Mapping[str, DirectionStack],
    coefficients: Mapping[str, torch.Tensor],
    groups: Mapping[str, str],
) -> dict[str, torch.Tensor]:
    """``theta[name] = base[name] + sum_d c_d^{groups[name]} * directions[name][d]``, differentiable in ``c``.

    Args:
        base: ``{name: [*shape]}`` the point the directions start from (``theta_0``, or the current DV-BASI point).
        directions: ``{name: [D, *shape]}`` stacked directions (or a sequence of ``D`` tensors of ``[*shape]``).
            Tensors of ``base`` without an entry are returned as they are.
        coefficients: ``{group: [D]}`` coefficients (grad flows into them).
        groups: ``{name: group}`` for every name in ``directions`` (:func:`parameter_groups`).

    Returns:
        ``{name: [*shape]}`` for every name of ``base``. The sum runs in direction order, one ``c_d * direction_d`` at a
        time (no ``[D, *shape]`` temporary), so fixed coefficients give bit-for-bit
        ``((theta_0 + c_0 tau_0) + c_1 tau_1) + ...``, the hand-written task arithmetic.
    """
    merged: dict[str, torch.Tensor] = {}
    for name, theta in base.items():
        stack = directions.get(name)
        if stack is None:
            merged[name] = theta
            continue
        if name not in groups:
            raise KeyError(f"Tensor '{name}' has directions but no coefficient group.")
        coefficient = coefficients[groups[name]]
        if coefficient.shape != (len(stack),):
            raise ValueError(
                f"Tensor '{name}': {len(stack)} directions but coefficients of shape {tuple(coefficient.shape)} "
                f"(group '{groups[name]}')."
            )
        value = theta
        for index in range(len(stack)):
            direction = stack[index]
            if direction.shape != theta.shape:
                raise ValueError(
                    f"Tensor '{name}': direction {index} has shape {tuple(direction.shape)}, base {tuple(theta.shape)}."
                )
            value = value + coefficient[index] * direction
        merged[name] = value
    return merged


def split_batch(batch: Any) -> tuple[tuple, dict[str, Any], torch.Tensor | None]:
    """``(args, kwargs, labels)`` of a batch: how the objectives call a model on it.

    A mapping (a transformers batch) becomes keyword arguments without ``labels``; a tuple or list ``(inputs, labels,
    ...)`` (a ``TensorDataset`` batch) calls ``model(inputs)``; anything else is the single positional input.
    """
    if isinstance(batch, Mapping):
        return (), {k: v for k, v in batch.items() if k != "labels"}, batch.get("labels")
    if isinstance(batch, list | tuple):
        if not batch:
            raise ValueError("Empty batch (an empty tuple or list).")
        return (batch[0],), {}, (batch[1] if len(batch) > 1 else None)
    return (batch,), {}, None


def bind_parameters(model: nn.Module, params: Mapping[str, torch.Tensor]) -> ModelFn:
    """A callable that runs ``model(*args, **kwargs)`` with ``params`` in place of the module's own tensors.

    ``params`` may replace or add any subset of parameters (per-task classifier heads too, even of another shape);
    buffers and every tensor not given stay the module's own. Tied weights follow the tensor given for either name.
    """
    params = dict(params)

    def forward(*args: Any, **kwargs: Any) -> Any:
        return functional_call(model, params, args, kwargs, tie_weights=True, strict=False)

    return forward


def call_with_parameters(model: nn.Module, params: Mapping[str, torch.Tensor], batch: Any) -> Any:
    """``model`` output on ``batch`` (see :func:`split_batch`) computed with ``params`` via ``functional_call``."""
    args, kwargs, _ = split_batch(batch)
    return bind_parameters(model, params)(*args, **kwargs)
