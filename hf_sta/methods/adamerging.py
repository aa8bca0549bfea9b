"""``adamerging``: merge coefficients per task (or per task and layer / tensor) learned on unlabelled data.

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024. The merge is

    theta[key] = theta_0[key] + sum_t lambda_t^{g(key)} m_t[key] * tau_t[key]

with ``g(key)`` the coefficient group of the tensor (``granularity``: one per task, per task and layer, or per task
and tensor, which is what the paper's code calls "layer-wise"), ``m_t`` all ones or STA's importance mask
(``selection="sta"``: the STA paper's composition, coefficients learned over the important entries only), and
``lambda`` learned by Adam on the entropy of each task's predictions on its own unlabelled inputs (test-time
adaptation; each task read out by its own head), or on a supervised loss when ``loss_fn=`` is given. The optimiser
runs ``torch.func.functional_call`` over ``theta_0 + sum lambda m tau`` (``hf_sta.learned``); the T models are never
built. The coefficients are recorded in the recipe and the card. The caller's ``scaling`` multiplies the learned
delta (keep 1); ``weights`` are not used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ConfigError
from .registry import Parameter, Prepared, register_merge_method
from .sta import importance_masks

GRANULARITIES = ("task", "layer", "tensor")
SELECTIONS = ("none", "sta")

LEARNING_PARAMETERS = (
    Parameter("steps", int, 100, "Optimiser steps (one batch of every task per step).", low=0),
    Parameter("batch_size", int, 16, "Examples per task and step.", low=1),
    Parameter("num_samples", int, None, "Examples per task used.", low=1, default_text="all given"),
    Parameter(
        "granularity",
        str,
        "layer",
        "One coefficient per task, per task and layer, or per task and tensor.",
        choices=GRANULARITIES,
    ),  # fmt: skip
    Parameter(
        "selection", str, "none", "'sta': coefficients over STA's importance-masked task vectors.", choices=SELECTIONS
    ),  # fmt: skip
    Parameter(
        "density",
        float,
        0.7,
        "With selection='sta': fraction of each task's entries kept.",
        low=0.0,
        high=1.0,
        low_inclusive=False,
    ),  # fmt: skip
)

Masks = Callable[[str, tuple[int, ...]], torch.Tensor]


def sta_masks(context, params: dict) -> Masks | None:
    """``masks(key, shape) -> [T, *shape]`` bool, STA's per-tensor top-``density`` masks; ``None`` without selection.

    Raises:
        ConfigError: naming the tasks without importance and the call that provides it.
    """
    if params["selection"] != "sta":
        return None
    missing = [t for t in context.tasks if t not in context.importance]
    if missing:
        raise ConfigError(
            f"selection='sta' needs importance for task(s) {', '.join(missing)}: call "
            "merger.compute_importance(task, calibration_data) or merger.load_importance(task, path)."
        )

    def masks(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        scores = context.stacked_scores(key, shape)
        kept, _ = importance_masks(
            scores, threshold=None, density=params["density"], density_scope="tensor", normalize="max"
        )
        return kept

    return masks


def coefficient_inputs(context, per_key: dict[str, dict[str, float]], masks: Masks | None, default: float):
    """``per_tensor(key) -> {"coefficients": [T], "masks": [T, *shape] or None}`` for the engine; tensors the
    calibration model never used (none, normally) keep ``default`` for every task."""

    def per_tensor(key: str) -> dict:
        values = per_key.get(key)
        coefficients = torch.tensor([values[t] if values else default for t in context.tasks], dtype=torch.float32)
        shape = tuple(context.pool.base.shape(key))
        return {"coefficients": coefficients, "masks": masks(key, shape) if masks is not None else None}

    return per_tensor


def rounded(coefficients: dict[str, list[float]]) -> dict[str, list[float]]:
    return {key: [round(float(c), 6) for c in values] for key, values in coefficients.items()}


def prepare_adamerging(context, params: dict) -> Prepared:
    """Learn the coefficients (:func:`hf_sta.learned.learn_coefficients`) and hand them to the kernel per tensor."""
    from ..learned import learn_coefficients
    from ..learned.bridge import learning_inputs

    masks = sta_masks(context, params)
    inputs = learning_inputs(context, "adamerging", params, default_objective="entropy", masks=masks)
    learned = learn_coefficients(
        inputs.model, inputs.base, inputs.vectors, inputs.data, loss_fn=inputs.loss_fn, task_parameters=inputs.heads,
        granularity=params["granularity"], init=params["init"], lr=params["lr"], steps=params["steps"],
        clamp=(0.0, 1.0) if params["clamp"] else None, seed=context.seed, accelerator=inputs.accelerator,
    )  # fmt: skip
    per_key = {inputs.to_base[name]: values for name, values in learned.tensor_coefficients().items()}
    record = {
        "method": "adamerging", "tasks": list(context.tasks), "granularity": params["granularity"],
        "num_learnable": learned.num_learnable, "examples_used": dict(learned.examples_used), "steps": params["steps"],
        "objective": [round(learned.history[0], 6), round(learned.history[-1], 6)] if learned.history else None,
        "coefficients": rounded(learned.coefficients),
    }  # fmt: skip
    return Prepared(per_tensor=coefficient_inputs(context, per_key, masks, params["init"]), record=record)


def coefficient_sum(task_tensors: torch.Tensor, coefficients: torch.Tensor, masks: torch.Tensor | None = None):
    """``sum_t c_t (m_t * tau_t)`` for ``[T, *shape]`` task vectors, ``[T]`` coefficients and optional masks."""
    if masks is not None:
        task_tensors = task_tensors * masks
    shape = (-1,) + (1,) * (task_tensors.dim() - 1)
    return (task_tensors * coefficients.to(task_tensors.dtype).reshape(shape)).sum(dim=0)


@register_merge_method(
    "adamerging",
    pretty_name="AdaMerging",
    paper_title="AdaMerging: Adaptive Model Merging for Multi-Task Learning",
    paper_url="https://arxiv.org/abs/2310.02575",
    parameters=(
        Parameter("init", float, 0.3, "Initial coefficient (the paper's prior).", low=0.0),
        Parameter("lr", float, 1e-3, "Adam learning rate (the paper's).", low=0.0, low_inclusive=False),
        Parameter("clamp", bool, True, "Clamp the coefficients to [0, 1] (the paper's)."),
        *LEARNING_PARAMETERS,
    ),
    requires=("objective",),
    prepare=prepare_adamerging,
    description="Task(-and-layer) coefficients learned by entropy minimisation on unlabelled inputs of each task.",
)
def adamerging(
    task_tensors: torch.Tensor,
    weights: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    coefficients: torch.Tensor,
    masks: torch.Tensor | None = None,
    **learning_params,
) -> torch.Tensor:
    """``delta = sum_t lambda_t m_t tau_t`` for one tensor ``[T, *shape] -> [*shape]``; ``coefficients`` ``[T]`` and
    ``masks`` come from the prepare hook (``learning_params`` are the method's, used there)."""
    return coefficient_sum(task_tensors, coefficients, masks)
