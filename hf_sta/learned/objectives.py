"""Objectives for learning merge coefficients: prediction entropy (unlabelled, AdaMerging) and cross entropy (labelled).

An objective is ``loss_fn(model_fn, batch) -> scalar``: ``model_fn`` behaves like the model (it is the model run with
the merged parameters, :func:`~hf_sta.learned.functional.bind_parameters`) and ``batch`` is one batch of one task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .functional import ModelFn, split_batch

LossFn = Callable[[ModelFn, Any], torch.Tensor]


def logits_from(outputs: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, ``outputs.logits`` (transformers), ``outputs["logits"]``, or ``[0]``."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if logits is None and isinstance(outputs, list | tuple) and outputs:
        logits = outputs[0]
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"Cannot find logits in a model output of type {type(outputs).__name__}.")
    return logits


def prediction_entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Shannon entropy of the predicted distributions (the objective of AdaMerging, Yang et al., ICLR 2024).

    ``H = mean_i ( -sum_c p_ic log p_ic )`` with ``p_i = softmax(logits_i)`` over the last dimension, computed in fp32
    from ``log_softmax`` (stable for large logits).

    Args:
        logits: ``[..., C]``, e.g. ``[B, C]`` for a classifier or ``[B, L, V]`` per token.
        mask: optional ``[...]`` (``logits.shape[:-1]``) of 0/1: average only where 1 (padding excluded).

    Returns:
        A scalar tensor.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    if mask is None:
        return entropy.mean()
    mask = mask.to(entropy.dtype)
    if mask.shape != entropy.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the predictions {tuple(entropy.shape)}.")
    return (entropy * mask).sum() / mask.sum().clamp_min(1.0)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy ``-mean_i log softmax(logits_i)[y_i]`` over ``[..., C]`` logits; labels ``-100`` ignored."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def entropy_objective(model_fn: ModelFn, batch: Any) -> torch.Tensor:
    """Unlabelled objective: :func:`prediction_entropy` of the model's logits on ``batch`` (labels, if any, unused).

    Per-token logits ``[B, L, V]`` are averaged over the batch's ``attention_mask`` when it has one.
    """
    args, kwargs, _ = split_batch(batch)
    logits = logits_from(model_fn(*args, **kwargs))
    mask = kwargs.get("attention_mask")
    if mask is not None and logits.dim() == 3 and tuple(mask.shape) == tuple(logits.shape[:2]):
        return prediction_entropy(logits, mask)
    return prediction_entropy(logits)


def cross_entropy_objective(model_fn: ModelFn, batch: Any) -> torch.Tensor:
    """Labelled objective: :func:`cross_entropy` of the logits on ``batch`` against its labels.

    Labels are ``batch["labels"]`` or the second element of a tuple batch, with the shape of ``logits[..., 0]`` (a
    class per example, or per token for token classification). For causal LMs use ``"model_loss"`` (the model shifts
    its labels itself).
    """
    args, kwargs, labels = split_batch(batch)
    if labels is None:
        raise ValueError("cross_entropy_objective needs labelled batches ('labels' key or (inputs, labels) tuples).")
    return cross_entropy(logits_from(model_fn(*args, **kwargs)), labels)


def model_loss_objective(model_fn: ModelFn, batch: Mapping[str, Any]) -> torch.Tensor:
    """The model's own loss: ``model_fn(**batch).loss`` (transformers models with ``labels`` in the batch)."""
    if not isinstance(batch, Mapping):
        raise ValueError("model_loss_objective needs dict batches (model(**batch) with 'labels').")
    loss = getattr(model_fn(**batch), "loss", None)
    if loss is None:
        raise ValueError("The model returned no loss: the batch has no 'labels'.")
    return loss


OBJECTIVES: dict[str, LossFn] = {
    "entropy": entropy_objective,
    "cross_entropy": cross_entropy_objective,
    "model_loss": model_loss_objective,
}


def resolve_objectives(
    loss_fn: str | LossFn | Mapping[str, str | LossFn] | None, tasks: Iterable[str], default: str
) -> dict[str, LossFn]:
    """``{task: loss_fn}`` from one objective for all tasks or one per task (a name of :data:`OBJECTIVES` or a callable)."""

    def resolve(value: str | LossFn | None, task: str) -> LossFn:
        value = default if value is None else value
        if isinstance(value, str):
            if value not in OBJECTIVES:
                raise ValueError(f"Unknown objective {value!r} for task '{task}'; choose from {sorted(OBJECTIVES)}.")
            return OBJECTIVES[value]
        if not callable(value):
            raise TypeError(
                f"The objective of task '{task}' must be a name or a callable, got {type(value).__name__}."
            )
        return value

    tasks = list(tasks)
    if isinstance(loss_fn, Mapping):
        missing = [task for task in tasks if task not in loss_fn]
        if missing:
            raise KeyError(f"No objective given for tasks: {', '.join(missing)}.")
        return {task: resolve(loss_fn[task], task) for task in tasks}
    return {task: resolve(loss_fn, task) for task in tasks}
