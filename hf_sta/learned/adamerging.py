"""AdaMerging: merge coefficients learned by minimising the prediction entropy on unlabelled data.

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024 (https://arxiv.org/abs/2310.02575),
code https://github.com/EnnengYang/AdaMerging. The merged model is

    theta[name] = theta_0[name] + sum_t clamp(lambda_t^{group(name)}, 0, 1) * tau_t[name]

and the coefficients minimise ``sum_t mean_{x in B_t} H(softmax(f_t(x; theta)))``: the entropy of task ``t``'s
predictions on an unlabelled batch ``B_t`` of that task, each task read out by its own classifier head.

Defaults, from ``src/main_layer_wise_adamerging.py`` / ``main_task_wise_adamerging.py`` of the official code:

* ``init=0.3`` (``prior = 0.3``), coefficients clamped to ``[0, 1]`` in every forward (``torch.clamp``);
* ``torch.optim.Adam(lr=1e-3, betas=(0.9, 0.999), weight_decay=0)``;
* ``steps=500`` (``epochs = 500``: one optimiser step per "epoch");
* ``granularity="tensor"``: the paper's "layer-wise" AdaMerging learns one coefficient per *parameter tensor* and task
  (``lambdas_raw`` has shape ``[len(params), T]``); ``"task"`` is task-wise AdaMerging; ``"layer"`` (one coefficient
  per numbered block) is a coarser option of ours.
* Data: the official loop takes, every step, two shuffled test batches of 16 per task (its ``if i > 0: break``) and
  sums their entropies. Here each step draws one batch per task from ``data`` (cycled; use batches of 16, or 32 to
  match the official samples per step); shuffling is the DataLoader's, seeded by ``seed``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._loop import OptimiserSettings, TaskStream, frozen, get_accelerator, optimise_coefficients, seeded, to_device
from .functional import (
    DirectionStack,
    Granularity,
    count_learnable,
    group_order,
    merged_parameters,
    parameter_groups,
    stack_directions,
)
from .objectives import LossFn, resolve_objectives


@dataclass
class LearnedCoefficients:
    """Merge coefficients learned over ``D`` directions, with how they were learned.

    Attributes:
        direction_names: the ``D`` directions, in coefficient order (task names for task vectors).
        granularity: ``"task"``, ``"layer"`` or ``"tensor"``.
        coefficients: ``{group: [D floats]}``, the coefficients the merge uses (clamped, when a clamp was set).
        groups: ``{tensor name: group}``.
        history: the summed objective ``sum_t L_t`` at each step, before that step's update.
        task_history: ``{task: [L_t per step]}``.
        num_learnable: ``D * number of groups``.
        examples_used: ``{task: distinct samples drawn}`` (the first pass over each task's data).
    """

    direction_names: list[str]
    granularity: str
    coefficients: dict[str, list[float]]
    groups: dict[str, str]
    history: list[float] = field(default_factory=list)
    task_history: dict[str, list[float]] = field(default_factory=dict)
    num_learnable: int = 0
    examples_used: dict[str, int] = field(default_factory=dict)

    def coefficient_tensors(self) -> dict[str, torch.Tensor]:
        """``{group: [D] fp32 tensor}``."""
        return {group: torch.tensor(values, dtype=torch.float32) for group, values in self.coefficients.items()}

    def tensor_coefficients(self) -> dict[str, dict[str, float]]:
        """``{tensor name: {direction: coefficient}}``, the per-tensor view of any granularity."""
        return {name: dict(zip(self.direction_names, self.coefficients[group])) for name, group in self.groups.items()}

    @torch.no_grad()
    def merged_parameters(
        self, base: Mapping[str, torch.Tensor], directions: Mapping[str, Any]
    ) -> dict[str, torch.Tensor]:
        """``theta_0 + sum_d c_d tau_d`` with the learned coefficients (``directions`` as given to the learner)."""
        _, stacked = _as_stacked(directions, base, self.direction_names)
        return merged_parameters(base, stacked, self.coefficient_tensors(), self.groups)


def _as_stacked(
    directions: Mapping[str, Any], base: Mapping[str, torch.Tensor], names: Sequence[str] | None
) -> tuple[list[str], dict[str, DirectionStack]]:
    """Directions as ``(names, {tensor: [D, *shape] or D tensors})`` from stacked tensors or ``{task: task vector}``."""
    first = next(iter(directions.values()), None)
    if first is None:
        raise ValueError("No directions given.")
    if isinstance(first, Mapping) or hasattr(first, "keys"):
        tensor_names = [name for name in base if name in first]
        found, stacked = stack_directions(directions, tensor_names)
        if names is not None and list(names) != found:
            raise ValueError(f"direction_names {list(names)} do not match the task vectors {found}.")
        return found, stacked
    stacked = dict(directions)
    count = len(first)
    if names is None:
        names = [f"direction_{index}" for index in range(count)]
    if len(names) != count:
        raise ValueError(f"{len(names)} direction names for {count} stacked directions.")
    unknown = [name for name in stacked if name not in base]
    if unknown:
        raise KeyError(f"Directions for tensors absent from the base: {', '.join(unknown[:5])}.")
    return list(names), stacked


def _initial_table(init: float | Sequence[float], num_groups: int, num_directions: int) -> torch.Tensor:
    values = torch.as_tensor(init, dtype=torch.float32)
    if values.dim() == 0:
        values = values.expand(num_directions)
    if values.shape != (num_directions,):
        raise ValueError(f"init must be a float or {num_directions} floats, got shape {tuple(values.shape)}.")
    return values.unsqueeze(0).repeat(num_groups, 1)


def learn_coefficients(
    model: nn.Module,
    base: Mapping[str, torch.Tensor],
    directions: Mapping[str, Any],
    data: Mapping[str, Iterable[Any]],
    *,
    direction_names: Sequence[str] | None = None,
    loss_fn: str | LossFn | Mapping[str, str | LossFn] | None = None,
    task_parameters: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    granularity: Granularity = "tensor",
    init: float | Sequence[float] = 0.3,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    steps: int = 500,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    seed: int = 0,
    accelerator: Any = None,
    progress: bool = True,
) -> LearnedCoefficients:
    """Learn merge coefficients ``c`` (AdaMerging by default): ``theta = theta_0 + sum_d c_d^{group} direction_d``.

    Args:
        model: the architecture, in the dtype to run; moved to the accelerator's device, frozen, in eval mode during
            the loop (restored after). Tensors not in ``base`` or ``task_parameters`` are the model's own.
        base: ``{name: [*shape]}`` base weights ``theta_0`` (names as in ``model.state_dict()``).
        directions: ``{task: {name: tau_t[name]}}`` task vectors (a :class:`~hf_sta.TaskVector` works), or stacked
            ``{name: [D, *shape]}``.
        data: ``{task: batches}``; every step takes one batch of each task (cycled; a list of batches or a DataLoader,
            prepared by ``accelerator`` under several processes). Batches: dicts (``model(**batch)``) or
            ``(inputs, labels)`` tuples.
        direction_names: names of stacked directions (default ``direction_0, ...``); task vectors name themselves.
        loss_fn: ``"entropy"`` (default, unlabelled), ``"cross_entropy"``, ``"model_loss"``, a callable
            ``loss_fn(model_fn, batch) -> scalar``, or one of those per task.
        task_parameters: ``{task: {name: tensor}}`` added to / overriding the merged parameters when evaluating that
            task (its own classifier head, of its own shape).
        granularity: ``"task"``, ``"layer"`` or ``"tensor"`` (:func:`~hf_sta.learned.functional.parameter_groups`).
        init, lr, betas, weight_decay, steps, clamp: see the module docstring for the official values.
        seed: seeds torch's RNGs for the loop (DataLoader shuffling without its own generator), restored after.
        accelerator: an ``accelerate.Accelerator``; default one built here.
        progress: show a progress bar with the objective (main process only).

    Returns:
        :class:`LearnedCoefficients`.
    """
    accelerator = get_accelerator(accelerator)
    device = accelerator.device
    names, stacked = _as_stacked(directions, base, direction_names)
    groups = parameter_groups(list(stacked), granularity)
    loss_fns = resolve_objectives(loss_fn, data, default="entropy")
    settings = OptimiserSettings(
        steps=steps,
        lr=lr,
        betas=betas,
        weight_decay=weight_decay,
        clamp=clamp,
        seed=seed,
        progress=progress,
        description="AdaMerging",
    )
    init_table = _initial_table(init, len(group_order(groups)), len(names))
    model.to(device)
    base_on_device = to_device(base, device)
    stacked_on_device = to_device(stacked, device)
    heads = {task: to_device(params, device) for task, params in (task_parameters or {}).items()}
    with seeded(seed, device), frozen(model):
        streams = {task: TaskStream(task, batches) for task, batches in data.items()}
        outcome = optimise_coefficients(
            model,
            base_on_device,
            stacked_on_device,
            groups,
            streams,
            loss_fns,
            heads,
            init_table,
            settings,
            accelerator,
        )
    coefficients = {group: outcome.table[row].tolist() for row, group in enumerate(group_order(groups))}
    return LearnedCoefficients(
        direction_names=names,
        granularity=granularity,
        coefficients=coefficients,
        groups=groups,
        history=outcome.history,
        task_history=outcome.task_history,
        num_learnable=count_learnable(groups, len(names)),
        examples_used=outcome.examples_used,
    )
