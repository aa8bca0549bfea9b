"""Registry of merge methods: each kernel is registered by name with its paper and typed parameters.

The CLI lists methods and validates ``--param`` values through it, and the model card reads ``pretty_name``,
``paper_title`` and ``paper_url`` from it. A new method is one file in ``hf_sta/methods/`` that decorates its kernel
with ``@register_merge_method(...)`` and one import line in ``hf_sta/methods/__init__.py``::

    @register_merge_method(
        "my_method",
        pretty_name="My Method",
        paper_title="...",
        paper_url="https://arxiv.org/abs/...",
        parameters=(Parameter("density", float, 0.2, "Fraction kept.", low=0.0, high=1.0, low_inclusive=False),),
        description="One line shown by `hf-sta methods`.",
    )
    def my_method(task_tensors, weights, *, generator=None, density=0.2): ...

Kernel contract: ``fn(task_tensors [T, *shape], weights [T], *, generator=None, **params) -> delta [*shape]``.

What a method needs beyond the task vectors it declares in ``requires``; the engine then passes, per tensor, one
keyword argument per requirement (see ``REQUIREMENTS``):

- ``"importance"``: ``importance=[T, *shape]`` fp32 scores of ``merger.compute_importance`` / ``load_importance``;
- ``"fisher"``: ``fisher=[T, *shape]``, the raw diagonal Fisher of ``compute_importance(..., metric="fisher")``;
- ``"gram"``: ``gram=[T, in, in]`` (or ``None`` for a tensor no statistics cover) and ``gram_layout`` (``"out_in"``
  for ``nn.Linear`` weights, ``"in_out"`` for ``Conv1D``) from ``merger.compute_activation_statistics``;
- ``"objective"``: data and a per-task loss or prediction function; the method's ``prepare`` hook learns what the
  kernel then receives per tensor (coefficients).

A ``prepare(context, params) -> Prepared`` hook runs once before the tensors stream: it may compute global values
(STA's model-wide threshold, learned coefficients) and returns them with a per-tensor function and a record for the
recipe and the model card.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "REQUIREMENTS",
    "MergeKernel",
    "Prepared",
    "MergeMethod",
    "Parameter",
    "check_kernel_inputs",
    "get_merge_method",
    "list_merge_methods",
    "register_merge_method",
]

REQUIREMENTS: tuple[str, ...] = ("importance", "fisher", "gram", "objective")
"""What a method can declare in ``requires``."""

MergeKernel = Callable[..., torch.Tensor]
"""``fn(task_tensors: Tensor [T, *shape], weights: Tensor [T], *, generator=None, **params) -> Tensor [*shape]``."""

_TYPE_NAMES = {float: "a float", int: "an int", str: "a string", bool: "a bool"}
_TRUE_STRINGS = frozenset({"true", "1", "yes", "on"})
_FALSE_STRINGS = frozenset({"false", "0", "no", "off"})


def _format_number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Parameter:
    """A typed, documented hyper-parameter of a merge method.

    Args:
        name: keyword the kernel receives (e.g. ``"density"``).
        type: one of ``float``, ``int``, ``str``, ``bool``; values are coerced to it (``"0.5"`` -> ``0.5``,
            ``1`` -> ``1.0``, ``"true"`` -> ``True``), so CLI strings validate like Python values.
        default: value used when the parameter is not given.
        doc: one sentence for ``--help`` and the model card.
        choices: allowed values, if the parameter is an enumeration.
        low, high: bounds of the allowed interval (``None``: unbounded on that side).
        low_inclusive, high_inclusive: whether the bounds themselves are allowed.
        default_text: what ``hf-sta methods`` and the model card show as the default when ``default`` is ``None``
            because the kernel chooses (STA's density: ``"0.7 (merging), 0.2 (forgetting)"``).
    """

    name: str
    type: type
    default: Any
    doc: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    default_text: str | None = None

    @property
    def shown_default(self) -> str:
        """The default as users read it: ``default_text``, else the value (``none`` for ``None``)."""
        if self.default_text is not None:
            return self.default_text
        return "none" if self.default is None else str(self.default)

    def __post_init__(self) -> None:
        if self.type not in _TYPE_NAMES:
            raise ValueError(f"Parameter {self.name!r}: type must be float, int, str or bool, got {self.type!r}")
        if self.choices is not None and not isinstance(self.choices, tuple):
            raise ValueError(f"Parameter {self.name!r}: choices must be a tuple, got {self.choices!r}")
        if self.default is not None:
            self.validate(self.default)  # a bad default is a programming error: fail at registration

    @property
    def interval(self) -> str | None:
        """The allowed interval in mathematical notation, e.g. ``"(0, 1]"``; ``None`` if unbounded."""
        if self.low is None and self.high is None:
            return None
        left = "(-inf" if self.low is None else ("[" if self.low_inclusive else "(") + _format_number(self.low)
        right = "inf)" if self.high is None else _format_number(self.high) + ("]" if self.high_inclusive else ")")
        return f"{left}, {right}"

    def _coerce(self, value: Any) -> Any:
        expected = _TYPE_NAMES[self.type]
        error = ValueError(f"{self.name} must be {expected}, got {value!r}")
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.strip().lower() in _TRUE_STRINGS | _FALSE_STRINGS:
                return value.strip().lower() in _TRUE_STRINGS
            raise error
        if isinstance(value, bool):  # bool is an int subclass; True is no density
            raise error
        if self.type is float:
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    raise error from None
            raise error
        if self.type is int:
            if isinstance(value, int):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                try:
                    return int(value)
                except ValueError:
                    raise error from None
            raise error
        if isinstance(value, str):
            return value
        raise error

    def validate(self, value: Any) -> Any:
        """Coerce ``value`` to ``self.type`` and check it against ``choices`` and the interval.

        Returns:
            The coerced value.

        Raises:
            ValueError: naming the parameter, the value and what is valid, e.g.
                ``"density must be in (0, 1], got 1.5"``.
        """
        value = self._coerce(value)
        if self.choices is not None and value not in self.choices:
            valid = ", ".join(repr(choice) for choice in self.choices)
            raise ValueError(f"{self.name} must be one of {valid}, got {value!r}")
        if self.type in (float, int) and (self.low is not None or self.high is not None):
            inside = not (isinstance(value, float) and math.isnan(value))
            if inside and self.low is not None:
                inside = value >= self.low if self.low_inclusive else value > self.low
            if inside and self.high is not None:
                inside = value <= self.high if self.high_inclusive else value < self.high
            if not inside:
                raise ValueError(f"{self.name} must be in {self.interval}, got {value!r}")
        return value


@dataclass
class Prepared:
    """What a method's ``prepare`` hook hands the engine.

    Args:
        params: extra keyword arguments for every tensor (e.g. STA's ``global_threshold``).
        per_tensor: ``fn(key) -> dict`` of keyword arguments for the tensor ``key`` (e.g. its learned coefficients).
        record: JSON-serialisable facts written to the recipe and the model card (e.g. the learned coefficients, the
            number of learnable parameters, the examples used).
    """

    params: dict[str, Any] = field(default_factory=dict)
    per_tensor: Callable[[str], dict[str, Any]] | None = None
    record: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge kernel and the metadata the CLI and the model card show.

    Args:
        name: registry key (``"ties"``).
        function: the kernel, ``fn(task_tensors [T, *shape], weights [T], *, generator=None, **params)``.
        pretty_name: human name (``"TIES-Merging"``).
        paper_title: title of the source paper.
        paper_url: link to the paper, or ``None``.
        parameters: the kernel's keyword parameters (``scaling`` and ``seed`` are not among them: the caller applies
            ``theta = theta_0 + scaling * delta`` and builds ``generator`` from the seed).
        requires: what the method needs beyond the task vectors (a subset of ``REQUIREMENTS``).
        prepare: optional hook ``prepare(context, params) -> Prepared`` run once before the tensors stream.
        description: one line.
        stochastic: whether the kernel draws random numbers from ``generator`` (DARE); the caller must then pass a
            generator seeded per tensor for reproducible merges.
        default_scaling: the ``scaling`` a merge uses when none is given (1 unless the method's defaults were chosen
            with another: a sparse selection such as STA's keeps a fraction of each task vector).
    """

    name: str
    function: MergeKernel
    pretty_name: str
    paper_title: str
    paper_url: str | None
    parameters: tuple[Parameter, ...]
    requires: tuple[str, ...] = ()
    prepare: Callable[..., Prepared] | None = None
    description: str = ""
    stochastic: bool = False
    default_scaling: float = 1.0

    @property
    def requires_importance(self) -> bool:
        """Whether the kernel needs per-parameter importance scores."""
        return "importance" in self.requires

    @property
    def parameter_names(self) -> list[str]:
        return [parameter.name for parameter in self.parameters]

    @property
    def defaults(self) -> dict[str, Any]:
        """``{name: default}`` of every parameter."""
        return {parameter.name: parameter.default for parameter in self.parameters}

    def validate_params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """Check ``params`` against ``self.parameters``, fill defaults and coerce values.

        Returns:
            A new dict with one entry per declared parameter, ready for ``self.function(..., **params)``.

        Raises:
            ValueError: for unknown keys (listing the valid parameter names) or invalid values.
        """
        params = dict(params or {})
        known = {parameter.name: parameter for parameter in self.parameters}
        unknown = sorted(set(params) - set(known))
        if unknown:
            valid = ", ".join(known) if known else "(none)"
            names = ", ".join(repr(name) for name in unknown)
            raise ValueError(f"Unknown parameter(s) {names} for merge method '{self.name}'. Valid parameters: {valid}")
        return {
            name: parameter.validate(params[name]) if name in params else parameter.default
            for name, parameter in known.items()
        }


_REGISTRY: dict[str, MergeMethod] = {}


def register_merge_method(
    name: str,
    *,
    pretty_name: str,
    paper_title: str,
    paper_url: str | None,
    parameters: tuple[Parameter, ...] = (),
    requires: tuple[str, ...] = (),
    prepare: Callable[..., Prepared] | None = None,
    description: str = "",
    stochastic: bool = False,
    default_scaling: float = 1.0,
) -> Callable[[MergeKernel], MergeKernel]:
    """Decorator registering a merge kernel under ``name``; returns the kernel unchanged.

    Raises:
        ValueError: if ``name`` is already registered or ``requires`` names an unknown requirement.
    """
    unknown = sorted(set(requires) - set(REQUIREMENTS))
    if unknown:
        raise ValueError(f"Merge method '{name}': unknown requirement(s) {unknown}; valid: {', '.join(REQUIREMENTS)}")

    def decorator(function: MergeKernel) -> MergeKernel:
        if name in _REGISTRY:
            raise ValueError(f"Merge method '{name}' is already registered (by {_REGISTRY[name].function.__module__})")
        _REGISTRY[name] = MergeMethod(
            name=name,
            function=function,
            pretty_name=pretty_name,
            paper_title=paper_title,
            paper_url=paper_url,
            parameters=tuple(parameters),
            requires=tuple(requires),
            prepare=prepare,
            description=description,
            stochastic=stochastic,
            default_scaling=default_scaling,
        )
        return function

    return decorator


def get_merge_method(name: str) -> MergeMethod:
    """The registered ``MergeMethod`` called ``name``.

    Raises:
        ValueError: ``"Unknown merge method 'x'. Available: average, breadcrumbs, ..."``.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown merge method {name!r}. Available: {', '.join(list_merge_methods())}") from None


def list_merge_methods() -> list[str]:
    """Sorted names of the registered merge methods."""
    return sorted(_REGISTRY)


def check_kernel_inputs(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Check the inputs of a merge kernel and return ``weights`` on the device and dtype of ``task_tensors``.

    Args:
        task_tensors: floating tensor of shape ``[T, *shape]``, ``T >= 1``.
        weights: tensor of shape ``[T]``.

    Raises:
        ValueError: on a shape or dtype mismatch, naming both shapes.
    """
    if task_tensors.dim() < 1 or task_tensors.shape[0] < 1:
        raise ValueError(f"task_tensors must have shape [T, *shape] with T >= 1, got {list(task_tensors.shape)}")
    if not task_tensors.is_floating_point():
        raise ValueError(f"task_tensors must be floating point, got dtype {task_tensors.dtype}")
    num_tasks = task_tensors.shape[0]
    if weights.shape != (num_tasks,):
        raise ValueError(
            f"weights must have shape [{num_tasks}] (one per task of task_tensors {list(task_tensors.shape)}), "
            f"got {list(weights.shape)}"
        )
    return weights.to(device=task_tensors.device, dtype=task_tensors.dtype)


def pointwise_convolutions_as_matrices(kernel: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Let a per-matrix kernel merge 1x1 convolution kernels as the matrices they are.

    A ``[T, out, in, 1, 1]`` stack (pointwise ``nn.Conv2d`` weights) is the ``[T, out, in]`` stack of the linear maps
    the convolutions apply to every position's channels (as RegMean treats them); the kernel runs on that view and
    its ``[out, in]`` result is returned as ``[out, in, 1, 1]``. Every other shape goes to the kernel unchanged (its
    own rule for tensors that are not 2-D applies, e.g. to 3x3 and depthwise kernels).
    """

    @functools.wraps(kernel)
    def wrapped(task_tensors: torch.Tensor, weights: torch.Tensor, **params: Any) -> torch.Tensor:
        if task_tensors.dim() == 5 and tuple(task_tensors.shape[-2:]) == (1, 1):
            return kernel(task_tensors.flatten(2), weights, **params).view(task_tensors.shape[1:])
        return kernel(task_tensors, weights, **params)

    return wrapped
