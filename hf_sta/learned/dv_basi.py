"""DV-BASI: difference-vector-based anisotropic scaling, iterated (Wang, Gao, Zhang, Xie, AAAI 2026).

"Escaping Optimization Stagnation: Taking Steps Beyond Task Arithmetic via Difference Vectors",
https://arxiv.org/abs/2511.17987, code https://github.com/smithgun2005/DVBASI (``src/task_addition_DVBASI.py``,
``src/composition.py``). Notation: ``theta_0`` base, ``tau_t`` task vectors, ``theta^(k)`` the point after ``k`` rounds.

Round ``k = 0, 1, ...`` starts at ``theta^(k)`` and learns anisotropic coefficients (one per direction and tensor, or
per layer) over the directions

    tau_1 .. tau_T                                  (``include_task_vectors``)
    d_0 = theta^(0) - theta_0                       (the initial merge's own movement; ``include_initial_direction``)
    d_j = theta^(j) - theta^(j-1),  j = 1 .. k      (the difference vectors of the previous rounds)

    theta^(k+1)[name] = theta^(k)[name] + sum_d c_d^{group(name)} * direction_d[name]

all coefficients starting at 0, so the round starts exactly at ``theta^(k)``. The objective is supervised (cross entropy
on a few labelled examples per task, default) or unsupervised (prediction entropy, as AdaMerging), summed over tasks,
each task read out by its own head; each round makes ``steps`` Adam steps. After each round the validation objective
is measured; the iteration stops after ``rounds`` rounds or at the first round that does not lower it by more than
``min_improvement``, and the point with the lowest validation objective is returned.

Every direction is a per-tensor linear combination of the basis ``(delta_0, tau_1, ..., tau_T)`` with ``delta_0 =
theta^(0) - theta_0``, so every point is tracked exactly (float64 coordinates) as

    theta^(k)[name] = theta_0[name] + b^name * delta_0[name] + sum_t c_t^name * tau_t[name]

(``theta^(0)``: ``b = 1, c = 0``; a round moves the coordinates by ``sum_d c_d A_d`` where ``A_d`` are the direction's
coordinates). :class:`DVBASIResult` reports ``(b, c_1..c_T)`` per tensor; :meth:`DVBASIResult.reconstruct` rebuilds
the model from them alone.

What the published code does, and what was inferred (the paper body was not available to us; the official code was):

* The official ``train_one_iteration`` uses a *single* direction per round, ``theta^(k) - theta_0`` (its
  ``delta_params = optima - pretrained``), with one coefficient per tensor (``--blockwise-coef``), starting from an
  aTLAS optimum (anisotropic per-tensor coefficients over the task vectors). ``difference_vectors="cumulative"`` with
  ``include_task_vectors=False`` reproduces that search space. The default here, ``"history"`` (every ``d_j`` with its
  own coefficients, plus the task vectors), follows the method description of d_k = theta^(k) - theta^(k-1) as a new
  direction; its span per tensor contains the cumulative one (``theta^(k) - theta_0 = sum_j d_j``).
* The official code starts each round with the difference coefficient at ``--dv-init-coef 0.1`` (an initial
  perturbation along the direction); ours starts at ``difference_init=0.0`` so that a round starts at ``theta^(k)``.
* Official optimiser: AdamW, ``lr=1e-2``, ``weight_decay=0.5``, gradient clipping at 1.0, fp16 autocast, epochs over
  few-shot data with an inner early stop (patience 3 epochs). Ours: Adam (``weight_decay=0``), ``lr=1e-2``, no
  clipping, ``steps`` steps per round; ``weight_decay``/``max_grad_norm`` reproduce the official settings.
* Official outer loop: ``--dv-max-iters 1`` round by default, best round by (test) accuracy. Ours: ``rounds=3``,
  stopping and selection on the validation objective (lower is better).
* Coefficients are not clamped (aTLAS/DV-BASI coefficients may be negative).
* ``theta^(0)`` defaults to task arithmetic ``theta_0 + 0.3 * sum_t tau_t`` (any merge can be given as ``initial``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from ._loop import (
    OptimiserSettings,
    TaskStream,
    evaluate_objective,
    frozen,
    get_accelerator,
    optimise_coefficients,
    seeded,
    to_device,
)
from .functional import (
    Granularity,
    count_learnable,
    group_order,
    merged_parameters,
    parameter_groups,
    stack_directions,
)
from .objectives import LossFn, resolve_objectives

INITIAL = "initial"
Validation = Mapping[str, Iterable[Any]] | Callable[[dict[str, torch.Tensor]], float] | None


@dataclass
class DVBASIRound:
    """One round: its directions, what it learned and the validation objective at its end point."""

    index: int
    directions: list[str]
    num_learnable: int
    history: list[float]
    validation: float
    improved: bool
    coefficients: dict[str, list[float]]  # {group: [D]} learned this round, over `directions`


@dataclass
class DVBASIResult:
    """The point DV-BASI reached, expressed over the original task vectors, and the rounds that led there.

    Attributes:
        tasks: task names, in basis order.
        basis: ``["initial", *tasks]``: ``delta_0 = theta^(0) - theta_0`` then the task vectors.
        coefficients: ``{tensor name: [b, c_1, ..., c_T]}`` with ``theta = theta_0 + b delta_0 + sum_t c_t tau_t``.
        parameters: ``{tensor name: tensor}`` the returned point itself, as the optimisation computed it (CPU).
        rounds: the rounds that ran, in order.
        validation: the validation objective at ``theta^(0)``, ``theta^(1)``, ...
        best: index (into ``validation``) of the returned point: ``0`` is the initial merge.
        init_scaling: ``s`` when ``theta^(0) = theta_0 + s * sum_t tau_t`` (the default), else ``None``.
        examples_used: ``{task: distinct training samples drawn}``.
    """

    tasks: list[str]
    basis: list[str]
    coefficients: dict[str, list[float]]
    parameters: dict[str, torch.Tensor]
    rounds: list[DVBASIRound] = field(default_factory=list)
    validation: list[float] = field(default_factory=list)
    best: int = 0
    init_scaling: float | None = None
    examples_used: dict[str, int] = field(default_factory=dict)

    @property
    def num_learnable(self) -> int:
        """Coefficients learned over all rounds that ran."""
        return sum(r.num_learnable for r in self.rounds)

    @property
    def num_learnable_per_round(self) -> list[int]:
        return [r.num_learnable for r in self.rounds]

    def task_coefficients(self, fold_initial: bool = False) -> dict[str, dict[str, float]]:
        """``{tensor: {task: c_t}}``; ``fold_initial`` adds ``b * s`` (only for the task-arithmetic ``theta^(0)``)."""
        if fold_initial and self.init_scaling is None:
            raise ValueError("fold_initial needs theta^(0) = theta_0 + s * sum tau (no `initial` given).")
        extra = self.init_scaling if fold_initial else 0.0
        return {
            name: {task: c + values[0] * extra for task, c in zip(self.tasks, values[1:])}
            for name, values in self.coefficients.items()
        }

    @torch.no_grad()
    def reconstruct(
        self,
        base: Mapping[str, torch.Tensor],
        task_vectors: Mapping[str, Mapping[str, torch.Tensor]],
        initial: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``theta_0 + b delta_0 + sum_t c_t tau_t`` from the coefficients alone (float64 sum, base dtype out)."""
        if initial is None and self.init_scaling is None:
            raise ValueError("This result started from a given `initial` merge: pass it to reconstruct.")
        out = {}
        for name, values in self.coefficients.items():
            theta_0 = base[name].double()
            taus = [task_vectors[task][name].double() for task in self.tasks]
            if initial is None:
                delta_0 = self.init_scaling * sum(taus)
            else:
                delta_0 = initial[name].double() - theta_0
            value = theta_0 + values[0] * delta_0
            for coefficient, tau in zip(values[1:], taus):
                value = value + coefficient * tau
            out[name] = value.to(base[name].dtype)
        return out


class _Trajectory:
    """The points ``theta^(0..k)``, the difference vectors between them, and their exact basis coordinates."""

    def __init__(self, base: dict, task_vectors: dict, initial: dict, names: list[str]):
        self.base, self.task_vectors, self.names = base, task_vectors, names
        self.tasks = list(task_vectors)
        self.width = 1 + len(self.tasks)
        unit = self._unit(0)
        self.points = [initial]
        self.coordinates = [{name: unit.clone() for name in names}]
        self.differences = [{name: initial[name] - base[name] for name in names}]
        self.difference_coordinates = [dict.fromkeys(names, unit)]

    def _unit(self, index: int) -> torch.Tensor:
        unit = torch.zeros(self.width, dtype=torch.float64)
        unit[index] = 1.0
        return unit

    def directions(
        self, include_task_vectors: bool, mode: str, include_initial: bool
    ) -> tuple[list[str], dict[str, list[torch.Tensor]], dict[str, torch.Tensor]]:
        """``(labels, {name: [D tensors]}, {name: [D, 1 + T] coordinates})`` of the next round's directions."""
        entries: list[tuple[str, Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]] = []
        if include_task_vectors:
            for index, task in enumerate(self.tasks):
                unit = self._unit(1 + index)
                entries.append((f"tau:{task}", self.task_vectors[task], dict.fromkeys(self.names, unit)))
        k = len(self.points) - 1
        if mode == "history":
            for j in range(0 if include_initial else 1, k + 1):
                entries.append((f"d{j}", self.differences[j], self.difference_coordinates[j]))
        elif k > 0 or include_initial:
            moved = {name: self.points[k][name] - self.base[name] for name in self.names}
            entries.append((f"theta{k}-theta_0", moved, self.coordinates[k]))
        if not entries:
            raise ValueError("This DV-BASI round has no direction (no task vectors and no difference vector yet).")
        labels = [label for label, _, _ in entries]
        stacks = {name: [tensors[name] for _, tensors, _ in entries] for name in self.names}
        algebra = {name: torch.stack([coords[name] for _, _, coords in entries]) for name in self.names}
        return labels, stacks, algebra

    def advance(self, point: dict, moves: Mapping[str, torch.Tensor], algebra: Mapping[str, torch.Tensor]) -> None:
        """Append ``theta^(k+1) = point``; ``moves[name]`` (``[D]``) are the coefficients the round applied."""
        current = self.coordinates[-1]
        step = {name: moves[name].double() @ algebra[name] for name in self.names}
        self.differences.append({name: point[name] - self.points[-1][name] for name in self.names})
        self.difference_coordinates.append(step)
        self.coordinates.append({name: current[name] + step[name] for name in self.names})
        self.points.append(point)


@dataclass
class _Setup:
    """Everything a round needs, on the accelerator's device."""

    model: nn.Module
    accelerator: Any
    extras: dict[str, torch.Tensor]  # base tensors without task vectors (passed through unchanged)
    heads: dict[str, dict[str, torch.Tensor]]
    loss_fns: dict[str, LossFn]
    streams: dict[str, TaskStream]
    granularity: Granularity
    settings: OptimiserSettings


def _initial_point(base: dict, task_vectors: dict, names: list[str], initial: Mapping | None, scaling: float) -> dict:
    """``theta^(0)``: ``initial`` as given, or ``theta_0 + s tau_1 + s tau_2 + ...`` (in task order)."""
    if initial is not None:
        missing = [name for name in names if name not in initial]
        if missing:
            raise KeyError(f"The initial merge has no tensor '{missing[0]}'.")
        return {name: initial[name].to(base[name].device, base[name].dtype) for name in names}
    point = {}
    for name in names:
        value = base[name]
        for task_vector in task_vectors.values():
            value = value + scaling * task_vector[name]
        point[name] = value
    return point


def _run_round(
    setup: _Setup, trajectory: _Trajectory, index: int, options: dict[str, Any]
) -> tuple[list[str], dict[str, list[float]], list[float], int]:
    """Learn one round's coefficients from ``theta^(k)`` and append ``theta^(k+1)`` to the trajectory."""
    labels, stacks, algebra = trajectory.directions(
        options["include_task_vectors"], options["difference_vectors"], options["include_initial_direction"]
    )
    groups = parameter_groups(trajectory.names, setup.granularity)
    order = group_order(groups)
    init = torch.zeros(len(order), len(labels))
    if options["difference_init"] and not labels[-1].startswith("tau:"):
        init[:, -1] = options["difference_init"]
    settings = replace(setup.settings, description=f"DV-BASI round {index}")
    current = {**setup.extras, **trajectory.points[-1]}
    outcome = optimise_coefficients(
        setup.model,
        current,
        stacks,
        groups,
        setup.streams,
        setup.loss_fns,
        setup.heads,
        init,
        settings,
        setup.accelerator,
    )
    rows = {group: row for row, group in enumerate(order)}
    table = outcome.table.to(setup.accelerator.device)
    with torch.no_grad():
        moved = merged_parameters(trajectory.points[-1], stacks, {g: table[r] for g, r in rows.items()}, groups)
    moves = {name: outcome.table[rows[groups[name]]] for name in trajectory.names}
    trajectory.advance({name: moved[name].detach() for name in trajectory.names}, moves, algebra)
    coefficients = {group: outcome.table[row].tolist() for row, group in enumerate(order)}
    return labels, coefficients, outcome.history, count_learnable(groups, len(labels))


def _validator(setup: _Setup, validation: Validation, data: Mapping, max_batches: int | None) -> Callable:
    """``point -> validation objective`` (lower is better): a callable, validation batches, or the training data."""
    if callable(validation):
        return lambda point: float(validation({**setup.extras, **point}))
    source = data if validation is None else validation
    missing = [task for task in setup.loss_fns if task not in source]
    if missing:
        raise KeyError(f"No validation data for tasks: {', '.join(missing)}.")
    return lambda point: evaluate_objective(
        setup.model, {**setup.extras, **point}, source, setup.loss_fns, setup.heads, setup.accelerator, max_batches
    )


def _iterate(
    setup: _Setup, trajectory: _Trajectory, validate: Callable, rounds: int, min_improvement: float, options: dict
) -> tuple[list[DVBASIRound], list[float], int]:
    """The outer loop: rounds until ``rounds`` or the first that lowers the validation by ``<= min_improvement``."""
    values = [validate(trajectory.points[0])]
    best = 0
    records: list[DVBASIRound] = []
    for index in range(rounds):
        labels, coefficients, history, learnable = _run_round(setup, trajectory, index, options)
        value = validate(trajectory.points[-1])
        improved = value < values[best] - min_improvement
        values.append(value)
        if value < values[best]:
            best = len(values) - 1
        records.append(DVBASIRound(index, labels, learnable, history, value, improved, coefficients))
        if not improved:
            break
    return records, values, best


def dv_basi(
    model: nn.Module,
    base: Mapping[str, torch.Tensor],
    task_vectors: Mapping[str, Mapping[str, torch.Tensor]],
    data: Mapping[str, Iterable[Any]],
    *,
    initial: Mapping[str, torch.Tensor] | None = None,
    init_scaling: float = 0.3,
    loss_fn: str | LossFn | Mapping[str, str | LossFn] | None = "cross_entropy",
    validation: Validation = None,
    task_parameters: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    granularity: Granularity = "tensor",
    rounds: int = 3,
    steps: int = 100,
    lr: float = 1e-2,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    min_improvement: float = 0.0,
    include_task_vectors: bool = True,
    include_initial_direction: bool = True,
    difference_vectors: Literal["history", "cumulative"] = "history",
    difference_init: float = 0.0,
    max_validation_batches: int | None = None,
    seed: int = 0,
    accelerator: Any = None,
    progress: bool = True,
) -> DVBASIResult:
    """Merge by DV-BASI (see the module docstring for the algorithm, defaults and what was inferred).

    Args:
        model: the architecture; moved to the accelerator's device, frozen and in eval mode during the rounds.
        base: ``{name: theta_0}``; task vectors ``{task: {name: tau_t}}`` over (a subset of) its names. Base tensors
            without task vectors are passed through unchanged.
        data: ``{task: batches}`` (few labelled examples per task; cycled, one batch per task per step).
        initial: ``theta^(0)`` over the task vectors' names (e.g. a TIES merge); default ``theta_0 + init_scaling *
            sum_t tau_t``.
        loss_fn: ``"cross_entropy"`` (supervised, default), ``"entropy"`` (unsupervised), ``"model_loss"``, a callable
            ``loss_fn(model_fn, batch)``, or one per task.
        validation: a callable ``{name: tensor} -> float`` (lower is better), ``{task: batches}`` scored with the same
            objective, or ``None``: the objective on one pass over the training ``data``.
        task_parameters: ``{task: {name: tensor}}`` per-task tensors (classifier heads) used when evaluating that task.
        granularity: ``"tensor"`` (anisotropic, default) or ``"layer"`` (or ``"task"``).
        rounds, steps, lr, betas, weight_decay, max_grad_norm, min_improvement: the iteration and its optimiser.
        include_task_vectors, include_initial_direction, difference_vectors, difference_init: the search space.
        max_validation_batches: cap on the batches per task of a validation pass.
        seed: seeds torch's RNGs during the rounds (restored after).
    """
    accelerator = get_accelerator(accelerator)
    device = accelerator.device
    if not task_vectors:
        raise ValueError("DV-BASI needs at least one task vector.")
    names = [name for name in base if name in next(iter(task_vectors.values()))]
    tasks, _ = stack_directions(task_vectors, names)  # checks every task vector holds every name, one shape
    base_on_device = to_device({name: base[name] for name in names}, device)
    vectors = {task: to_device({name: task_vectors[task][name] for name in names}, device) for task in tasks}
    settings = OptimiserSettings(
        steps=steps,
        lr=lr,
        betas=betas,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        seed=seed,
        progress=progress,
    )
    model.to(device)
    with seeded(seed, device), frozen(model):
        setup = _Setup(
            model,
            accelerator,
            to_device({n: t for n, t in base.items() if n not in base_on_device}, device),
            {task: to_device(params, device) for task, params in (task_parameters or {}).items()},
            resolve_objectives(loss_fn, data, default="cross_entropy"),
            {task: TaskStream(task, batches) for task, batches in data.items()},
            granularity,
            settings,
        )
        start = _initial_point(base_on_device, vectors, names, initial, init_scaling)
        trajectory = _Trajectory(base_on_device, vectors, start, names)
        options = dict(
            include_task_vectors=include_task_vectors,
            include_initial_direction=include_initial_direction,
            difference_vectors=difference_vectors,
            difference_init=difference_init,
        )
        validate = _validator(setup, validation, data, max_validation_batches)
        records, values, best = _iterate(setup, trajectory, validate, rounds, min_improvement, options)
    return DVBASIResult(
        tasks=tasks,
        basis=[INITIAL, *tasks],
        coefficients={name: trajectory.coordinates[best][name].tolist() for name in names},
        parameters={name: tensor.detach().cpu() for name, tensor in trajectory.points[best].items()},
        rounds=records,
        validation=values,
        best=best,
        init_scaling=init_scaling if initial is None else None,
        examples_used={task: stream.examples_used for task, stream in setup.streams.items()},
    )


def dv_basi_finetune(
    model: nn.Module,
    base: Mapping[str, torch.Tensor],
    task_vector: Mapping[str, torch.Tensor],
    data: Iterable[Any],
    *,
    task: str = "task",
    head: Mapping[str, torch.Tensor] | None = None,
    validation: Iterable[Any] | Callable[[dict[str, torch.Tensor]], float] | None = None,
    **options: Any,
) -> DVBASIResult:
    """Difference vectors as a low-parameter fine-tuning of one model ``theta_1 = theta_0 + tau``.

    Rounds start at the fine-tuned model (``init_scaling=1``) and search along ``tau`` and the difference vectors of
    the previous rounds (``d_0 = tau`` itself is not repeated), with one coefficient per tensor and direction: a round
    learns ``(1 + k) * num_tensors`` numbers. The result's ``task_coefficients(fold_initial=True)`` gives the final
    ``c^name`` with ``theta = theta_0 + c^name * tau``. Other keyword arguments are those of :func:`dv_basi`.
    """
    if validation is not None and not callable(validation) and not isinstance(validation, Mapping):
        validation = {task: validation}
    options.setdefault("include_initial_direction", False)
    return dv_basi(
        model,
        base,
        {task: task_vector},
        {task: data},
        init_scaling=1.0,
        validation=validation,
        task_parameters={task: dict(head)} if head is not None else None,
        **options,
    )
