"""From a merger's task pool to the inputs of a learned merge: one model, its base weights and task vectors under
the model's parameter names, each task's own head, and each task's batches and objective.

Learned methods hold the ``T`` task vectors of the merged tensors in memory (they are the directions the
optimiser combines, through ``torch.func.functional_call``; the ``T`` models are never built), so they suit models
that fit in memory a few times over; the final merge is then streamed like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..measure import calibration_loader, default_accelerator, load_finetuned_model, parameter_names
from .objectives import prediction_entropy

__all__ = ["LearningInputs", "learning_inputs"]

LABEL_KEYS = ("labels", "label")


@dataclass
class LearningInputs:
    """Everything a learned method optimises over, under the calibration model's parameter names."""

    model: torch.nn.Module
    base: dict[str, torch.Tensor]  # {model name: theta_0}
    vectors: dict[str, dict[str, torch.Tensor]]  # {task: {model name: (masked) tau_t}}
    heads: dict[str, dict[str, torch.Tensor]]  # {task: {model name: its own head tensor}}
    data: dict[str, list[Any]]  # {task: batches}
    validation: dict[str, list[Any]] | None
    loss_fn: dict[str, Any]  # {task: objective name or fn(model_fn, batch)}
    to_base: dict[str, str]  # {model name: base name}
    accelerator: Any


def _objectives(context, tasks: list[str], default: str) -> tuple[dict[str, Any], bool]:
    """``({task: objective}, supervised)`` from ``loss_fn`` (supervised) or ``predict_fn`` (entropy) or ``default``."""
    loss_fn, predict_fn = context.objective.get("loss_fn"), context.objective.get("predict_fn")
    if loss_fn is not None and predict_fn is not None:
        raise ConfigError("Give loss_fn= (supervised) or predict_fn= (entropy), not both.")
    for name, given in (("loss_fn", loss_fn), ("predict_fn", predict_fn)):
        missing = [t for t in tasks if given is not None and t not in given]
        if missing:
            raise ConfigError(f"{name}= has no entry for task(s) {', '.join(missing)}; pass {name}={{task: fn}}.")
    if loss_fn is not None:
        return {t: _user_loss(loss_fn[t]) for t in tasks}, True
    if predict_fn is not None:
        return {t: _entropy_of(predict_fn[t]) for t in tasks}, False
    return dict.fromkeys(tasks, default), default != "entropy"


def _user_loss(function: Callable) -> Callable:
    return lambda model_fn, batch: function(model_fn, batch)


def _entropy_of(predict: Callable) -> Callable:
    return lambda model_fn, batch: prediction_entropy(predict(model_fn, batch))


def _batches(context, task: str, model, data, accelerator, supervised: bool, params: dict) -> list[Any]:
    loader = calibration_loader(
        context.pool, task, model, data, accelerator, num_samples=params.get("num_samples"),
        micro_batch_size=params["batch_size"], needs_labels=supervised,
    )  # fmt: skip
    batches = list(loader)
    if not supervised:  # an unsupervised objective never sees the labels
        batches = [
            {k: v for k, v in b.items() if k not in LABEL_KEYS} if isinstance(b, Mapping) else b for b in batches
        ]
    if not batches:
        raise ValueError(f"The data of task '{task}' is empty.")
    return batches


def learning_inputs(
    context, method: str, params: dict, *, default_objective: str, masks: Callable | None = None
) -> LearningInputs:
    """Build :class:`LearningInputs` for ``context.tasks`` (``masks(key, shape) -> [T, *shape]`` bool selects entries
    of the task vectors, e.g. STA's importance masks).

    Raises:
        ConfigError: naming the tasks without data and the call that provides it.
    """
    tasks, data = context.tasks, context.objective.get("data") or {}
    missing = [t for t in tasks if t not in data]
    if missing:
        raise ConfigError(
            f"method='{method}' learns its coefficients from data and has none for task(s) {', '.join(missing)}: "
            f"call merger.merge(method='{method}', data={{task: dataset}}, loss_fn={{task: fn(model, batch)}} or "
            "predict_fn={task: fn(model, batch) -> logits})."
        )
    loss_fn, supervised = _objectives(context, tasks, default_objective)
    model = context.objective.get("model")
    model = load_finetuned_model(context.pool, tasks[0]) if model is None else model
    accelerator = default_accelerator(context.objective.get("accelerator"))
    to_base: dict[str, str] = {}
    for task in tasks:
        to_base.update(parameter_names(context.pool, task, model))
    base = {name: context.pool.base.get_tensor(key).float() for name, key in to_base.items()}
    vectors: dict[str, dict[str, torch.Tensor]] = {t: {} for t in tasks}
    for name, key in to_base.items():
        stacked = context.stacked_tau(key)
        stacked = stacked * masks(key, tuple(stacked.shape[1:])) if masks is not None else stacked
        for index, task in enumerate(tasks):
            vectors[task][name] = stacked[index]
    vectors_by_task = context.pool.task_vectors
    heads = {t: dict(vectors_by_task[t].heads()) for t in tasks if getattr(vectors_by_task[t], "head_keys", None)}
    batches = {t: _batches(context, t, model, data[t], accelerator, supervised, params) for t in tasks}
    validation_data = context.objective.get("validation_data")
    validation = None
    if validation_data is not None:
        validation = {
            t: _batches(context, t, model, validation_data[t], accelerator, supervised, params) for t in tasks
        }
    return LearningInputs(model, base, vectors, heads, batches, validation, loss_fn, to_base, accelerator)
