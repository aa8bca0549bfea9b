"""Normalisation statistics after merging: running means and variances are not task vectors.

Merged weights change every layer's activations, so BatchNorm running statistics copied from the base (or averaged)
no longer match them. Re-estimating them on a small public batch, with no labels and no gradient, restores them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from accelerate.utils import send_to_device
from torch import nn

logger = logging.getLogger(__name__)


def _forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, list | tuple):
        return model(batch[0])
    return model(batch)


@torch.no_grad()
def reestimate_batchnorm(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Recompute every BatchNorm layer's ``running_mean`` / ``running_var`` on ``batches``, in place.

    The statistics are reset and accumulated with ``momentum=None`` (PyTorch's cumulative average), so after ``J``
    batches ``running_mean = (1/J) sum_j mean_j`` and ``running_var = (1/J) sum_j var_j`` (unbiased per-batch
    variance): exact averages rather than exponential ones. Only BatchNorm layers run in training mode; dropout and
    everything else stay in eval mode. ``batches`` are inputs (a tensor, a ``(inputs, ...)`` tuple whose first item is
    fed, or a dict of keyword arguments); ``forward_fn(model, batch)`` overrides how they are fed.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        logger.info("No BatchNorm layer with running statistics: nothing to re-estimate.")
        return model
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    forward_fn = forward_fn or _forward
    count = 0
    try:
        for batch in batches:
            if device is not None:
                batch = send_to_device(batch, device)
            forward_fn(model, batch)
            count += 1
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.train(was_training)
    if count == 0:
        raise ValueError("No batch given to re-estimate BatchNorm statistics.")
    logger.info("Re-estimated %d BatchNorm layer(s) on %d batch(es).", len(norms), count)
    return model
