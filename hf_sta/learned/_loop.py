"""The optimisation loop shared by AdaMerging and DV-BASI: Adam on a ``[G, D]`` coefficient table, one batch per task.

Runs unchanged on CPU, one GPU, or several processes under ``accelerate launch``. The model is frozen and never
wrapped in DDP: each process evaluates the objective on its own batches (pass dataloaders prepared by the
accelerator so that each process sees its own share) and the gradient of the tiny coefficient table is averaged across
processes before each step, so every process takes the same step and holds the same coefficients.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import send_to_device
from torch import nn

from ..importance.data import batch_size
from .functional import DirectionStack, bind_parameters, group_order, merged_parameters
from .objectives import LossFn


@dataclass
class OptimiserSettings:
    """How the coefficient table is optimised (see the callers for the defaults and their sources)."""

    steps: int
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    clamp: tuple[float, float] | None = None
    seed: int = 0
    progress: bool = True
    description: str = "coefficients"


@dataclass
class Outcome:
    """What one optimisation returns: the effective (clamped) table and what it cost."""

    table: torch.Tensor  # [G, D] fp32 on CPU, the coefficients the merge uses (after clamping)
    history: list[float]  # summed objective at step i, before that step's update
    task_history: dict[str, list[float]]
    examples_used: dict[str, int]


class TaskStream:
    """Endless batches of one task: ``data`` is iterated again when exhausted (a shuffling DataLoader reshuffles).

    ``examples_used`` counts the samples of the first pass only: the distinct examples the objective has seen.
    """

    def __init__(self, task: str, data: Iterable[Any]):
        self.task, self.data = task, data
        self._iterator: Iterator[Any] = iter(data)
        self.passes = 0
        self.examples_used = 0

    def next(self) -> Any:
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.passes += 1
            self._iterator = iter(self.data)
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise ValueError(
                    f"The data of task '{self.task}' is empty, or a one-shot iterator that is exhausted: pass a list "
                    "of batches or a DataLoader."
                ) from None
        if self.passes == 0:
            self.examples_used += batch_size(batch)
        return batch


def get_accelerator(accelerator: Any = None) -> Any:
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator()
    return accelerator


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout: the objective is a deterministic function of the coefficients) and no parameter grads."""
    flags = [(param, param.requires_grad) for param in model.parameters()]
    training = model.training
    model.eval()
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        model.train(training)


def to_device(tensors: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """``{name: tensor or list of tensors}`` on ``device`` (``accelerate.utils.send_to_device``; tensors already
    there are not copied)."""
    return send_to_device(dict(tensors), device)


def _objective(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    batches: Mapping[str, Any],
    loss_fns: Mapping[str, LossFn],
    task_parameters: Mapping[str, Mapping[str, torch.Tensor]],
) -> tuple[torch.Tensor, dict[str, float]]:
    """``sum_t loss_fn_t(model with params (+ task t's own tensors), batch_t)`` and the per-task values."""
    total: torch.Tensor | None = None
    values: dict[str, float] = {}
    for task, batch in batches.items():
        task_params = {**params, **task_parameters.get(task, {})}
        loss = loss_fns[task](bind_parameters(model, task_params), batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(f"The objective of task '{task}' must return a scalar tensor.")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"The objective of task '{task}' is {loss.item()}; stopping.")
        values[task] = float(loss.detach())
        total = loss if total is None else total + loss
    if total is None:
        raise ValueError("No task data given.")
    return total, values


def optimise_coefficients(
    model: nn.Module,
    base: Mapping[str, torch.Tensor],
    directions: Mapping[str, DirectionStack],
    groups: Mapping[str, str],
    streams: Mapping[str, TaskStream],
    loss_fns: Mapping[str, LossFn],
    task_parameters: Mapping[str, Mapping[str, torch.Tensor]],
    init: torch.Tensor,
    settings: OptimiserSettings,
    accelerator: Any,
) -> Outcome:
    """Minimise ``sum_t L_t(theta(c))`` over the coefficient table ``c`` (``[G, D]``, rows in :func:`group_order`).

    ``theta(c) = base + sum_d c_d^{group} direction_d`` (:func:`merged_parameters`, with ``c`` clamped to
    ``settings.clamp`` when given: gradients vanish outside, as in AdaMerging). Each step draws one batch per task,
    takes the gradient of the summed objective, averages it across processes and makes one AdamW step (plain Adam when
    ``weight_decay == 0``). ``base``/``directions``/``task_parameters`` must already be on ``accelerator.device``.
    """
    from tqdm.auto import tqdm

    device = accelerator.device
    rows = {group: index for index, group in enumerate(group_order(groups))}
    table = nn.Parameter(init.detach().to(device=device, dtype=torch.float32).clone())
    optimizer = torch.optim.AdamW([table], lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)
    history: list[float] = []
    task_history: dict[str, list[float]] = {task: [] for task in streams}
    bar = tqdm(
        range(settings.steps),
        desc=settings.description,
        disable=not (settings.progress and accelerator.is_main_process),
    )
    for _ in bar:
        optimizer.zero_grad(set_to_none=True)
        effective = table if settings.clamp is None else table.clamp(*settings.clamp)
        params = merged_parameters(base, directions, {g: effective[i] for g, i in rows.items()}, groups)
        batches = {task: send_to_device(stream.next(), device) for task, stream in streams.items()}
        total, values = _objective(model, params, batches, loss_fns, task_parameters)
        total.backward()
        if accelerator.num_processes > 1:
            table.grad = accelerator.reduce(table.grad, reduction="mean")
        if settings.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([table], settings.max_grad_norm)
        optimizer.step()
        history.append(_mean_across(accelerator, float(total.detach())))
        for task, value in values.items():
            task_history[task].append(value)
        bar.set_postfix(objective=f"{history[-1]:.4f}")
    bar.close()
    with torch.no_grad():
        final = table if settings.clamp is None else table.clamp(*settings.clamp)
    examples = {task: _sum_across(accelerator, stream.examples_used) for task, stream in streams.items()}
    return Outcome(final.detach().cpu(), history, task_history, examples)


def _mean_across(accelerator: Any, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    tensor = torch.tensor(value, device=accelerator.device, dtype=torch.float64)
    return float(accelerator.reduce(tensor, reduction="mean"))


def _sum_across(accelerator: Any, value: int) -> int:
    if accelerator.num_processes == 1:
        return value
    tensor = torch.tensor(value, device=accelerator.device, dtype=torch.float64)
    return int(accelerator.reduce(tensor, reduction="sum"))


@torch.no_grad()
def evaluate_objective(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    data: Mapping[str, Iterable[Any]],
    loss_fns: Mapping[str, LossFn],
    task_parameters: Mapping[str, Mapping[str, torch.Tensor]],
    accelerator: Any,
    max_batches: int | None = None,
) -> float:
    """``sum_t mean_j L_t(theta, batch_tj)`` over one pass of each task's ``data`` (at most ``max_batches`` each)."""
    total = 0.0
    for task, batches in data.items():
        values = []
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            loss, _ = _objective(
                model, params, {task: send_to_device(batch, accelerator.device)}, loss_fns, task_parameters
            )
            values.append(float(loss))
        if not values:
            raise ValueError(f"The validation data of task '{task}' is empty.")
        total += math.fsum(values) / len(values)
    return _mean_across(accelerator, total)


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global RNGs (a DataLoader without its own generator shuffles from them) and restore them after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
