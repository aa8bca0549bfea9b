"""Unlearning you can trust and undo (FUSED-style adapters) and forgetting rules.

- ``layers``: critical-layer identification (per-layer sensitivity of the forget data relative to the retain data);
- ``objectives``: what the adapter is trained on (retain fit, gradient ascent, KL to uniform / to the label prior);
- ``data``: forget / retain sources, the overlap and emptiness checks;
- ``training``: LoRA on the chosen layers only, trained with the target frozen (accelerate, progress bar, early stop);
- ``api``: ``STAMerger.unlearn``;
- ``rules``: choosing a forgetting scaling (largest drop, closest to chance; grid or bisection);
- ``metrics``: membership-inference attack on per-example losses.
"""

from __future__ import annotations

from .config import FORGET_LOSSES, UNLEARN_METHODS, UnlearnConfig
from .layers import LayerSensitivity, candidate_layers, choose_layers, layer_of, layer_sensitivity
from .metrics import membership_attack_accuracy, membership_auc
from .objectives import forget_term, label_prior
from .rules import FORGET_RULES, Bisection, choose_scaling
from .training import UnlearningResult, unlearn_model

__all__ = [
    "FORGET_LOSSES",
    "FORGET_RULES",
    "UNLEARN_METHODS",
    "Bisection",
    "LayerSensitivity",
    "UnlearnConfig",
    "UnlearningResult",
    "candidate_layers",
    "choose_layers",
    "choose_scaling",
    "forget_term",
    "label_prior",
    "layer_of",
    "layer_sensitivity",
    "membership_attack_accuracy",
    "membership_auc",
    "unlearn_model",
]
