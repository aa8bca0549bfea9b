"""Fine-tuning for mergeability: sharpness-aware minimisation (SAM / ASAM) as an optimizer, a Trainer and a loop.

* :class:`SAM`: a ``torch.optim.Optimizer`` around any base optimizer (``first_step`` / ``second_step`` /
  ``step(closure)``).
* :class:`SAMTrainer`: a ``transformers.Trainer`` whose steps are SAM steps (``sam_rho``, ``sam_adaptive``).
* :func:`finetune`: the AdamW / SAM / ASAM fine-tuning loop the benchmarks and ``examples/finetune_sam.py`` share;
  :func:`finetune_classifier` runs it on a text dataset from a base checkpoint and saves the classifier
  (``hf-sta finetune``).

Lee, Jung & Baik (ICLR 2025, "Mitigating Parameter Interference in Model Merging via Sharpness-Aware Fine-Tuning")
report that SAM fine-tunes merge with less interference between task vectors than AdamW fine-tunes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY_ATTRIBUTES = {
    "SAM": "sam",
    "perturb": "sam",
    "restore": "sam",
    "sam_perturbation": "sam",
    "SAMTrainer": "trainer",
    "TRAINING_RECORD": "classifier",
    "class_labels": "classifier",
    "finetune_classifier": "classifier",
    "DEFAULT_RHO": "loop",
    "FinetuneConfig": "loop",
    "FinetuneResult": "loop",
    "finetune": "loop",
    "make_optimizer": "loop",
    "text_classification_collator": "loop",
    "training_step": "loop",
}

__all__ = [
    "DEFAULT_RHO",
    "SAM",
    "SAMTrainer",
    "TRAINING_RECORD",
    "FinetuneConfig",
    "FinetuneResult",
    "class_labels",
    "finetune",
    "finetune_classifier",
    "make_optimizer",
    "perturb",
    "restore",
    "sam_perturbation",
    "text_classification_collator",
    "training_step",
]

if TYPE_CHECKING:
    from .classifier import TRAINING_RECORD, class_labels, finetune_classifier
    from .loop import (
        DEFAULT_RHO,
        FinetuneConfig,
        FinetuneResult,
        finetune,
        make_optimizer,
        text_classification_collator,
        training_step,
    )
    from .sam import SAM, perturb, restore, sam_perturbation
    from .trainer import SAMTrainer


def __getattr__(name: str) -> Any:
    """Import the submodule defining ``name`` on first use (``SAMTrainer`` needs transformers, ``SAM`` only torch)."""
    module_name = _LAZY_ATTRIBUTES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'hf_sta.training' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value
