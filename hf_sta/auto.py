"""``scaling="auto"`` and ``density="auto"``: a merge's global scaling and density chosen on calibration data.

For a method ``M`` the merged delta at density ``d`` (scaling 1) is ``delta(d) = M({tau_t}, w; density=d)``, computed
by the method's own kernel through the engine's stream, and the merge is ``theta(lambda, d) = theta_0 + lambda *
delta(d)``. ``auto`` returns the grid point with the lowest calibration objective

    J(lambda, d) = sum_t mean_j L_t(theta(lambda, d) with task t's own head, batch_tj)

where ``L_t`` is the user's ``loss_fn[t](model, batch)`` (supervised), the prediction entropy of
``predict_fn[t](model, batch)`` (unlabelled, AdaMerging's objective), or, when neither is given, the cross entropy
of the model's logits against the batch labels. Every ``J`` is one *calibration pass*: one forward pass (no backward)
over every task's calibration batches, run with ``torch.func.functional_call`` over ``theta_0 + lambda * delta(d)``
(no ``T`` models in memory, nothing written per grid point). ``delta(d)`` is computed once per density and scaled.

Grids (documented defaults; a list given instead of ``"auto"`` is searched as it is):

* ``scaling="auto"``: :data:`SCALING_GRID` (6 points: task arithmetic's best on our benchmarks is 0.3-0.7,
  TIES' and STA's 1.0; 1.4 for methods that average and so under-shoot), at the given density: 6 passes.
* ``density="auto"`` (``sta``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``):
  :data:`DENSITY_GRIDS` (4 points each), at the given scaling: 4 passes.
* both: coordinate search, scaling over its grid at the method's default density, then density over its grid at the
  chosen scaling (the point already evaluated is not evaluated again): 6 + 4 - 1 = 9 passes.

Ties go to the first grid point listed (smaller scalings, smaller densities). The search, its every evaluation and the
chosen values go to ``merger.last_record["auto"]``, the recipe (``merge.auto``, with the chosen ``scaling`` and
``density`` in their usual fields, so the recipe reproduces the merge without data) and the model card.
The entropy objective rewards confident predictions, so it tends towards the larger scalings of the grid; prefer a
labelled ``loss_fn`` when labels exist.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import MergeConfig
from .errors import ConfigError
from .methods.registry import MergeMethod, Prepared

__all__ = ["AUTO", "DENSITY_GRIDS", "SCALING_GRID", "AutoRequest", "search_settings", "split_auto"]

logger = logging.getLogger(__name__)

AUTO = "auto"
SCALING_GRID: tuple[float, ...] = (0.2, 0.3, 0.5, 0.7, 1.0, 1.4)
DENSITY_GRIDS: dict[str, tuple[float, ...]] = {
    "sta": (0.2, 0.4, 0.7, 0.9),
    "ties": (0.1, 0.2, 0.4, 0.7),
    "dare_linear": (0.1, 0.3, 0.5, 0.7),
    "dare_ties": (0.1, 0.3, 0.5, 0.7),
    "magnitude_prune": (0.1, 0.2, 0.4, 0.7),
}
BATCH_SIZE = 16  # calibration examples per forward pass
DEFAULT_OBJECTIVE = "cross_entropy"


@dataclass(frozen=True)
class AutoRequest:
    """What ``auto`` searches: the scaling grid and/or the density grid (``None``: that value is fixed)."""

    scaling: tuple[float, ...] | None = None
    density: tuple[float, ...] | None = None


def _is_search(value: Any) -> bool:
    return (isinstance(value, str) and value == AUTO) or isinstance(value, list | tuple)


def _grid(value: Any, name: str, default: Sequence[float] | None, method: str) -> tuple[float, ...] | None:
    """``default`` for ``"auto"``, the values of a list, ``None`` for a fixed value."""
    if not _is_search(value):
        return None
    if isinstance(value, str):
        if default is None:
            raise ConfigError(
                f"{name}='auto' is not available for method='{method}'; it is for "
                f"{', '.join(sorted(DENSITY_GRIDS))} (or give a list of {name} values to search)."
            )
        return tuple(default)
    if not value or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{name} as a list is a grid to search and needs numbers, got {value!r}.")
    if not all(math.isfinite(float(v)) for v in value):
        raise ConfigError(f"{name} grid values must be finite, got {value!r}.")
    return tuple(float(v) for v in value)


def split_auto(config: MergeConfig) -> tuple[MergeConfig, AutoRequest | None]:
    """``(config without the searched values, request)``; ``request`` is ``None`` when nothing is ``"auto"``.

    The searched fields are replaced by placeholders the method validates (scaling 1, the method's default density);
    :func:`search_settings` puts the chosen values back.

    Raises:
        ConfigError: ``density="auto"`` for a method without a density grid.
    """
    from .methods import get_merge_method

    spec = get_merge_method(config.method)
    scaling = _grid(config.scaling, "scaling", SCALING_GRID, config.method)
    density = None
    if _is_search(config.params.get("density")):
        if "density" not in spec.parameter_names:
            raise ConfigError(f"density='auto' needs a method with a density; method='{config.method}' has none.")
        density = _grid(config.params["density"], "density", DENSITY_GRIDS.get(config.method), config.method)
    if scaling is None and density is None:
        return config, None
    params = {k: v for k, v in config.params.items() if not (k == "density" and density is not None)}
    placeholder = dataclasses.replace(config, scaling=1.0 if scaling is not None else config.scaling, params=params)
    return placeholder, AutoRequest(scaling=scaling, density=density)


@dataclass
class CalibrationInputs:
    """What each calibration pass needs, under the calibration model's parameter names."""

    model: torch.nn.Module
    base: dict[str, torch.Tensor]  # {model name: theta_0}, on the device
    to_base: dict[str, str]  # {model name: base key}
    heads: dict[str, dict[str, torch.Tensor]]  # {task: {model name: its own head}}, on the device
    batches: dict[str, list[Any]]
    loss_fns: dict[str, Callable]
    objective: str  # "loss_fn", "entropy" or "cross_entropy"
    accelerator: Any
    examples: dict[str, int] = field(default_factory=dict)


def calibration_inputs(context: Any, searched: str) -> CalibrationInputs:
    """Model, base weights, heads and batches of ``context.tasks`` for the objective.

    Raises:
        ConfigError: naming ``data=`` and the tasks without it.
    """
    from .learned._loop import batch_size
    from .learned.bridge import _batches, _objectives
    from .learned.objectives import resolve_objectives
    from .measure import default_accelerator, load_finetuned_model, parameter_names

    tasks, data = context.tasks, context.objective.get("data") or {}
    missing = [t for t in tasks if t not in data]
    if missing:
        raise ConfigError(
            f"{searched}='auto' chooses its value on calibration data and data= has none for task(s) "
            f"{', '.join(missing)}: pass data={{task: dataset}} with loss_fn={{task: fn(model, batch) -> loss}}, "
            "predict_fn={task: fn(model, batch) -> logits} (entropy), or labelled data (cross entropy)."
        )
    objectives, supervised = _objectives(context, tasks, DEFAULT_OBJECTIVE)
    given = context.objective
    name = (
        "loss_fn" if given.get("loss_fn") is not None else "entropy" if given.get("predict_fn") else DEFAULT_OBJECTIVE
    )
    model = given.get("model")
    model = load_finetuned_model(context.pool, tasks[0]) if model is None else model
    accelerator = default_accelerator(given.get("accelerator"))
    device = accelerator.device
    model.to(device)
    to_base: dict[str, str] = {}
    for task in tasks:
        to_base.update(parameter_names(context.pool, task, model))
    base = {n: context.pool.base.get_tensor(k).float().to(device) for n, k in to_base.items()}
    vectors = context.pool.task_vectors
    heads = {
        t: {n: v.to(device) for n, v in vectors[t].heads().items()}
        for t in tasks
        if getattr(vectors[t], "head_keys", None)
    }
    batches = {
        t: _batches(context, t, model, data[t], accelerator, supervised, {"batch_size": BATCH_SIZE}) for t in tasks
    }
    examples = {t: sum(batch_size(b) for b in batches[t]) for t in tasks}
    loss_fns = resolve_objectives(objectives, tasks, DEFAULT_OBJECTIVE)
    return CalibrationInputs(model, base, to_base, heads, batches, loss_fns, name, accelerator, examples)


def merged_delta(context: Any, config: MergeConfig, spec: MergeMethod, keys: set[str]) -> tuple[Prepared, dict]:
    """``(prepared, {base key: delta})``: the method's merged delta at scaling 1 for ``keys``, through the engine's
    stream (the same kernel inputs, per-tensor seeds and ``prepare`` hook as the final merge)."""
    from .engine import plan_tensors, stream_merge

    config = dataclasses.replace(config, scaling=1.0).validated()
    prepared = spec.prepare(context, config.params) if spec.prepare is not None else Prepared()
    plan = [item for item in plan_tensors(context.pool.base, None) if item.name in keys]
    deltas = {}
    for item, _, delta, _ in stream_merge(context, config, spec, prepared, plan, {}, ordered=False, combine=False):
        if delta is not None:
            deltas[item.name] = delta.float()
    return prepared, deltas


class Search:
    """Evaluates ``J(lambda, d)`` on the calibration inputs, caching ``delta(d)`` and every ``J`` it computed."""

    def __init__(self, context: Any, config: MergeConfig, spec: MergeMethod, inputs: CalibrationInputs, bar: Any):
        self.context, self.config, self.spec, self.inputs, self.bar = context, config, spec, inputs, bar
        self.deltas: dict[float | None, tuple[Prepared, dict[str, torch.Tensor]]] = {}
        self.values: dict[tuple[float, float | None], float] = {}
        self.evaluations: list[dict[str, Any]] = []

    def prepared_delta(self, density: float | None) -> tuple[Prepared, dict[str, torch.Tensor]]:
        if density not in self.deltas:
            params = dict(self.config.params) if density is None else {**self.config.params, "density": density}
            config = dataclasses.replace(self.config, params=params)
            prepared, deltas = merged_delta(self.context, config, self.spec, set(self.inputs.to_base.values()))
            device = self.inputs.accelerator.device
            self.deltas[density] = (prepared, {k: v.to(device) for k, v in deltas.items()})
        return self.deltas[density]

    def objective(self, scaling: float, density: float | None) -> float:
        """``J(scaling, density)`` (one calibration pass; cached)."""
        from .learned._loop import evaluate_objective, frozen

        if (scaling, density) in self.values:
            return self.values[(scaling, density)]
        _, deltas = self.prepared_delta(density)
        inputs = self.inputs
        params = {}
        with torch.no_grad():
            for name, theta in inputs.base.items():
                key = inputs.to_base[name]
                params[name] = theta + scaling * deltas[key] if key in deltas else theta
        with frozen(inputs.model):
            try:
                value = evaluate_objective(
                    inputs.model, params, inputs.batches, inputs.loss_fns, inputs.heads, inputs.accelerator
                )
            except FloatingPointError:  # a diverged grid point loses
                value = math.inf
        self.values[(scaling, density)] = value
        self.evaluations.append({"scaling": scaling, "density": density, "objective": round(value, 6)})
        self.bar.update(1)
        self.bar.set_postfix(scaling=scaling, density=density, objective=f"{value:.4f}")
        return value

    def best(self, points: Sequence[tuple[float, float | None]]) -> tuple[float, float | None]:
        """The first point of ``points`` with the lowest objective."""
        values = [self.objective(*point) for point in points]
        return points[min(range(len(points)), key=values.__getitem__)]


def default_density(config: MergeConfig, spec: MergeMethod) -> float | None:
    """The density a method runs with when none is given (STA's ``None`` is its ``DEFAULT_DENSITY``)."""
    value = config.params.get("density", spec.defaults.get("density"))
    if value is None and config.method == "sta":
        from .methods.sta import DEFAULT_DENSITY

        value = DEFAULT_DENSITY
    return value


def search_settings(
    context: Any, config: MergeConfig, spec: MergeMethod, request: AutoRequest
) -> tuple[MergeConfig, Prepared]:
    """Run the grid search of ``request`` (module docstring) and return the config with the chosen values and the
    chosen point's :class:`Prepared` (its ``record`` gains ``"auto"``: grids, every evaluation, the choice, cost)."""
    from tqdm.auto import tqdm

    names = [n for n, grid in (("scaling", request.scaling), ("density", request.density)) if grid]
    inputs = calibration_inputs(context, names[0])
    scaling, density = config.scaling, default_density(config, spec)
    densities = request.density or ()
    if request.scaling and request.density and density not in densities:
        densities = tuple(sorted({*densities, density}))  # the point the scaling sweep ran at
    total = len(request.scaling or ()) + len(densities) - (bool(request.scaling) and bool(densities))
    main = getattr(inputs.accelerator, "is_main_process", True)
    with tqdm(total=total, desc=f"auto {' and '.join(names)}", disable=not main) as bar:
        search = Search(context, config, spec, inputs, bar)
        if request.scaling:
            fixed = density if request.density else config.params.get("density")
            scaling, density = search.best([(s, fixed) for s in request.scaling])
        if densities:
            scaling, density = search.best([(scaling, d) for d in densities])
    prepared, _ = search.prepared_delta(density)
    params = dict(config.params) if density is None else {**config.params, "density": density}
    chosen = dataclasses.replace(config, scaling=float(scaling), params=params).validated()
    batches = sum(len(b) for b in inputs.batches.values())
    record = {
        "searched": names,
        "objective": inputs.objective,
        "grid": {"scaling": list(request.scaling or ()), "density": list(request.density or ())},
        "evaluations": search.evaluations,
        "chosen": {"scaling": float(scaling), **({"density": density} if request.density else {})},
        "calibration_passes": len(search.evaluations),
        "forward_batches": len(search.evaluations) * batches,
        "examples": inputs.examples,
    }
    logger.info("auto: chose %s (objective %s) in %d calibration passes", record["chosen"],
                search.values[(scaling, density)], len(search.evaluations))  # fmt: skip
    return chosen, dataclasses.replace(prepared, record={**prepared.record, "auto": record})
