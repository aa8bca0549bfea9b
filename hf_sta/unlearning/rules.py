"""Forgetting rules: which scaling of a forgetting edit to keep, given how the edited model scores.

Each evaluated point is ``{"scaling", "target", "control"}``: the forgotten task's metric and the mean metric of the
other (control) tasks on the edited model. A point is *allowed* when ``control >= min_control * control(unedited)``.

- ``"largest_drop"`` (task-vector negation's rule; Ilharco et al. 2023): the allowed point with the lowest target
  (ties: the smaller scaling). It keeps going past chance: a larger edit that makes the model prefer wrong labels
  still "drops" the metric.
- ``"closest_to_chance"``: the allowed point whose target is nearest ``chance`` (ties: the smaller scaling), the
  unedited model (scaling 0) included, so a task already at chance is left alone. Forgetting means *not knowing*,
  which is chance-level accuracy, not below it.

``scalings`` is a grid (every value evaluated) or a :class:`Bisection` for ``closest_to_chance``: the target is assumed
to fall as the scaling grows, so the scaling where it crosses ``chance`` within the allowed range is bracketed by
halving ``[low, high]``: a point that is allowed and still above chance moves ``low`` up, any other moves ``high``
down.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ConfigError

__all__ = ["FORGET_RULES", "Bisection", "choose_scaling", "resolve_scalings"]

FORGET_RULES = ("largest_drop", "closest_to_chance")
DEFAULT_MIN_CONTROL = {"largest_drop": 0.95, "closest_to_chance": 0.98}

Point = dict[str, float]


@dataclasses.dataclass(frozen=True)
class Bisection:
    """Search ``[low, high]`` for the scaling that brings the target to chance in at most ``steps`` evaluations;
    stop early once a point is allowed and within ``tolerance`` of chance."""

    low: float = 0.0
    high: float = 4.0
    steps: int = 8
    tolerance: float = 0.005

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and 0.0 <= self.low < self.high):
            raise ConfigError(f"Bisection needs finite 0 <= low < high, got low={self.low}, high={self.high}.")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"Bisection steps must be a positive integer, got {self.steps!r}.")
        if not self.tolerance >= 0:
            raise ConfigError(f"Bisection tolerance must be >= 0, got {self.tolerance!r}.")


def resolve_scalings(scalings: Any, rule: str) -> Sequence[float] | Bisection:
    """A grid (finite numbers) or a :class:`Bisection` (``"bisect"`` is ``Bisection()``), checked against ``rule``."""
    if rule not in FORGET_RULES:
        raise ConfigError(f"rule must be one of {', '.join(FORGET_RULES)}, got {rule!r}.")
    if isinstance(scalings, str) and scalings == "bisect":
        scalings = Bisection()
    if isinstance(scalings, Bisection):
        if rule != "closest_to_chance":
            raise ConfigError("scalings='bisect' is for rule='closest_to_chance'; give the largest-drop rule a grid.")
        return scalings
    if isinstance(scalings, str) or not isinstance(scalings, Sequence) or not scalings:
        raise ConfigError(f"scalings must be a non-empty sequence of numbers or 'bisect', got {scalings!r}.")
    for value in scalings:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"scalings must be finite numbers, got {value!r}.")
    return [float(s) for s in scalings]


def _allowed(point: Point, baseline: Point, min_control: float) -> bool:
    return point["control"] >= min_control * baseline["control"]


def _best(points: list[Point], baseline: Point, rule: str, chance: float | None, min_control: float) -> Point | None:
    allowed = [p for p in points if _allowed(p, baseline, min_control)]
    if rule == "largest_drop":
        return min(allowed, key=lambda p: (p["target"], p["scaling"])) if allowed else None
    candidates = [{"scaling": 0.0, **baseline}, *allowed]
    return min(candidates, key=lambda p: (abs(p["target"] - chance), p["scaling"]))


def _bisect(evaluate: Callable[[float], Point], search: Bisection, baseline: Point, chance: float,
            min_control: float) -> list[Point]:  # fmt: skip
    points = [evaluate(search.high)]
    if _allowed(points[0], baseline, min_control) and points[0]["target"] >= chance:
        return points  # the whole range is allowed and still above chance: nothing to halve
    low, high = search.low, search.high
    if low > 0:
        points.append(evaluate(low))
    while len(points) < search.steps:
        point = evaluate((low + high) / 2)
        points.append(point)
        allowed = _allowed(point, baseline, min_control)
        if allowed and abs(point["target"] - chance) <= search.tolerance:
            break
        if allowed and point["target"] > chance:
            low = point["scaling"]
        else:
            high = point["scaling"]
    return sorted(points, key=lambda p: p["scaling"])


def choose_scaling(
    evaluate: Callable[[float], Point],
    baseline: Point,
    *,
    rule: str,
    scalings: Sequence[float] | Bisection,
    min_control: float,
    chance: float | None = None,
) -> tuple[list[Point], float | None]:
    """Evaluate the scalings (``evaluate(s) -> point``) and return ``(points, chosen scaling or None)``.

    ``None``: no scaling keeps the controls (``largest_drop``). ``closest_to_chance`` always returns a scaling (0 when
    the unedited model is nearest chance or nothing else keeps the controls).
    """
    if rule == "closest_to_chance" and (chance is None or isinstance(chance, bool) or not math.isfinite(chance)):
        raise ConfigError(
            f"rule='closest_to_chance' needs chance= (the forgotten task's chance level), got {chance!r}."
        )
    if isinstance(scalings, Bisection):
        points = _bisect(evaluate, scalings, baseline, chance, min_control)
    else:
        points = [evaluate(s) for s in scalings]
    best = _best(points, baseline, rule, chance, min_control)
    return points, best["scaling"] if best is not None else None
