"""Importance metrics: how much the loss depends on each parameter (first-order Taylor expansion).

Removing entry ``i`` of a parameter changes the loss by about ``|theta_i * g_i|``. Over ``J`` calibration micro-batches
with gradients ``g_j = dL(x_j)/dtheta`` taken at the fine-tuned model ``theta_t``::

    taylor       I = (1/J) sum_j |theta_t * g_j|  = |theta_t| * (1/J) sum_j |g_j|     (the STA paper's)
    taylor_delta I = (1/J) sum_j |tau_t * g_j|    = |tau_t|   * (1/J) sum_j |g_j|     (cost of removing the update)
    fisher       I = (1/J) sum_j g_j^2                                               (empirical Fisher)
    magnitude    I = |tau_t|                                                         (no data)

``theta_t`` and ``tau_t`` do not change during calibration, so the Taylor scores factor into a constant times the mean
absolute gradient: the calibration loop accumulates only ``sum_j |g_j|`` (or ``sum_j g_j^2``), one fp32 buffer per
parameter, and these functions finish the score. All functions are elementwise over tensors of one shape.
"""

from __future__ import annotations

from typing import Literal

import torch

ImportanceMetric = Literal["taylor", "taylor_delta", "fisher", "magnitude"]
METRICS: tuple[str, ...] = ("taylor", "taylor_delta", "fisher", "magnitude")
# What the calibration loop must accumulate per metric: "abs" = sum_j |g_j|, "square" = sum_j g_j^2, None = no data.
GRADIENT_STATISTIC: dict[str, str | None] = {
    "taylor": "abs",
    "taylor_delta": "abs",
    "fisher": "square",
    "magnitude": None,
}


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"Unknown importance metric '{metric}'. Available: {', '.join(METRICS)}.")
    return metric


def taylor(theta: torch.Tensor, mean_abs_grad: torch.Tensor) -> torch.Tensor:
    """``|theta| * mean_j |g_j|`` (= ``mean_j |theta * g_j|``); fp32, shape of ``theta``."""
    return theta.float().abs() * mean_abs_grad


def taylor_delta(task_vector: torch.Tensor, mean_abs_grad: torch.Tensor) -> torch.Tensor:
    """``|tau| * mean_j |g_j|`` (= ``mean_j |tau * g_j|``); fp32, shape of ``tau``."""
    return task_vector.float().abs() * mean_abs_grad


def fisher(mean_squared_grad: torch.Tensor) -> torch.Tensor:
    """Empirical Fisher diagonal ``mean_j g_j^2``."""
    return mean_squared_grad.float()


def magnitude(task_vector: torch.Tensor) -> torch.Tensor:
    """``|tau|``: the data-free baseline."""
    return task_vector.float().abs()


def finish_importance(
    metric: str,
    *,
    gradient_statistic: torch.Tensor | None,
    theta: torch.Tensor | None = None,
    task_vector: torch.Tensor | None = None,
) -> torch.Tensor:
    """Turn the accumulated mean gradient statistic of one tensor into its importance score for ``metric``."""
    check_metric(metric)
    if metric == "magnitude":
        return magnitude(task_vector)
    if gradient_statistic is None:
        raise ValueError(f"Importance metric '{metric}' needs calibration gradients.")
    if metric == "taylor":
        return taylor(theta, gradient_statistic)
    if metric == "taylor_delta":
        return taylor_delta(task_vector, gradient_statistic)
    return fisher(gradient_statistic)
