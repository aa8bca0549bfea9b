"""``dv_basi``: anisotropic scaling over task vectors and difference vectors, iterated past task arithmetic.

Wang et al., "Escaping Optimization Stagnation: Taking Steps Beyond Task Arithmetic via Difference Vectors"
(DV-BASI; code github.com/smithgun2005/DVBASI). Round 0 is a registered merge ``theta^(0)`` (``initial_method``,
task arithmetic at ``init_scaling`` by default); round ``k`` starts at ``theta^(k-1)`` and learns one coefficient
per direction and tensor (``granularity="tensor"``, or per layer) over the task vectors, ``d_0 = theta^(0) -
theta_0`` and the difference vectors of the previous rounds ``d_j = theta^(j) - theta^(j-1)``, by a supervised
loss (cross entropy on a few labelled examples per task, the default) or the entropy of the predictions
(``predict_fn=``). It stops after ``rounds`` or when the validation objective (``validation_data=``, else the
training objective) stops improving; the best point is kept. Every point is ``theta_0 + b d_0 + sum_t c_t^key
tau_t^key`` exactly, so the merge streams like any other. See ``hf_sta.learned.dv_basi`` for what was inferred where
the paper was silent. The caller's ``scaling`` multiplies the learned delta (keep 1); ``weights`` are not used.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .adamerging import LEARNING_PARAMETERS, coefficient_sum, rounded, sta_masks
from .registry import Parameter, Prepared, get_merge_method, register_merge_method


def _initial_deltas(context, params: dict, to_base: dict[str, str], masks) -> dict[str, torch.Tensor] | None:
    """``{base key: d_0}`` of a registered data-free ``initial_method`` (``None`` for task arithmetic)."""
    if params["initial_method"] == "task_arithmetic" and masks is None:
        return None
    spec = get_merge_method(params["initial_method"])
    if spec.requires or spec.stochastic:
        raise ConfigError(f"initial_method='{spec.name}' must be a deterministic, data-free merge method.")
    kernel_params = spec.validate_params({})
    deltas = {}
    for key in to_base.values():
        stacked = context.stacked_tau(key)
        if masks is not None:
            stacked = stacked * masks(key, tuple(stacked.shape[1:]))
        deltas[key] = params["init_scaling"] * spec.function(stacked, torch.ones(len(context.tasks)), **kernel_params)
    return deltas


def prepare_dv_basi(context, params: dict) -> Prepared:
    """Run the DV-BASI rounds (:func:`hf_sta.learned.dv_basi`) and hand the final coefficients to the kernel."""
    from ..learned import dv_basi
    from ..learned.bridge import learning_inputs

    masks = sta_masks(context, params)
    inputs = learning_inputs(context, "dv_basi", params, default_objective="cross_entropy", masks=masks)
    deltas = _initial_deltas(context, params, inputs.to_base, masks)
    initial = None
    if deltas is not None:
        initial = {name: inputs.base[name] + deltas[key] for name, key in inputs.to_base.items()}
    result = dv_basi(
        inputs.model, inputs.base, inputs.vectors, inputs.data, initial=initial, init_scaling=params["init_scaling"],
        loss_fn=inputs.loss_fn, validation=inputs.validation, task_parameters=inputs.heads,
        granularity=params["granularity"], rounds=params["rounds"], steps=params["steps"], lr=params["lr"],
        min_improvement=params["min_improvement"], seed=context.seed, accelerator=inputs.accelerator,
    )  # fmt: skip
    by_key = {inputs.to_base[name]: values for name, values in result.coefficients.items()}

    def per_tensor(key: str) -> dict:
        values = by_key.get(key)
        if values is None:
            raise ConfigError(f"dv_basi: tensor '{key}' is not a parameter of the calibration model.")
        b, tasks = float(values[0]), torch.tensor(values[1:], dtype=torch.float32)
        if deltas is None:  # theta^(0) = theta_0 + s sum tau: b d_0 folds into the task coefficients
            return {"coefficients": tasks + b * params["init_scaling"], "initial": None, "masks": None}
        return {
            "coefficients": tasks,
            "initial": b * deltas[key],
            "masks": masks(key, deltas[key].shape) if masks else None,
        }

    record = {
        "method": "dv_basi", "tasks": list(context.tasks), "basis": list(result.basis),
        "granularity": params["granularity"], "rounds_run": len(result.rounds), "best_round": result.best,
        "num_learnable": result.num_learnable, "num_learnable_per_round": result.num_learnable_per_round,
        "examples_used": dict(result.examples_used), "validation": [round(v, 6) for v in result.validation],
        "coefficients": rounded(result.coefficients),
    }  # fmt: skip
    return Prepared(per_tensor=per_tensor, record=record)


@register_merge_method(
    "dv_basi",
    pretty_name="DV-BASI",
    paper_title="Escaping Optimization Stagnation: Taking Steps Beyond Task Arithmetic via Difference Vectors",
    paper_url=None,
    parameters=(
        Parameter("initial_method", str, "task_arithmetic", "Round 0: a registered data-free merge."),
        Parameter("init_scaling", float, 0.3, "Scaling of the round-0 merge.", low=0.0),
        Parameter("rounds", int, 3, "Rounds of difference vectors at most.", low=1),
        Parameter("lr", float, 1e-2, "Adam learning rate (the authors' code).", low=0.0, low_inclusive=False),
        Parameter("min_improvement", float, 0.0, "Stop when the validation objective improves by no more.", low=0.0),
        *[
            p
            if p.name != "granularity"
            else Parameter(
                "granularity",
                str,
                "tensor",
                "Coefficients per direction and tensor (anisotropic), layer or task.",
                choices=p.choices,
            )
            for p in LEARNING_PARAMETERS
        ],
    ),  # fmt: skip
    requires=("objective",),
    prepare=prepare_dv_basi,
    description="Per-tensor coefficients over task and difference vectors, learned in rounds (few labelled examples).",
)
def dv_basi_merge(
    task_tensors: torch.Tensor,
    weights: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    coefficients: torch.Tensor,
    initial: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    **learning_params,
) -> torch.Tensor:
    """``delta = b d_0 + sum_t c_t m_t tau_t`` for one tensor ``[T, *shape] -> [*shape]`` (from the prepare hook)."""
    delta = coefficient_sum(task_tensors, coefficients, masks)
    return delta if initial is None else delta.add_(initial)
