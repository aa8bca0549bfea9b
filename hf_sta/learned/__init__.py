"""Learned merge coefficients: AdaMerging and DV-BASI over in-memory directions, with ``torch.func.functional_call``.

No merged model is ever materialised per task: ``theta(c) = theta_0 + sum_d c_d^{group} direction_d`` is computed as a
differentiable function of the coefficients and the frozen model is run on it with ``functional_call``.
"""

from .adamerging import LearnedCoefficients, learn_coefficients
from .dv_basi import DVBASIResult, DVBASIRound, dv_basi, dv_basi_finetune
from .functional import (
    GRANULARITIES,
    Granularity,
    bind_parameters,
    call_with_parameters,
    count_learnable,
    layer_of,
    merged_parameters,
    parameter_groups,
    split_batch,
    stack_directions,
)
from .objectives import (
    OBJECTIVES,
    LossFn,
    cross_entropy,
    cross_entropy_objective,
    entropy_objective,
    logits_from,
    model_loss_objective,
    prediction_entropy,
)

__all__ = [
    "GRANULARITIES",
    "OBJECTIVES",
    "DVBASIResult",
    "DVBASIRound",
    "Granularity",
    "LearnedCoefficients",
    "LossFn",
    "bind_parameters",
    "call_with_parameters",
    "count_learnable",
    "cross_entropy",
    "cross_entropy_objective",
    "dv_basi",
    "dv_basi_finetune",
    "entropy_objective",
    "layer_of",
    "learn_coefficients",
    "logits_from",
    "merged_parameters",
    "model_loss_objective",
    "parameter_groups",
    "prediction_entropy",
    "split_batch",
    "stack_directions",
]
