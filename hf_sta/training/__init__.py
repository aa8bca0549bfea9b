"""Fine-tuning for mergeability: sharpness-aware minimisation (SAM / ASAM) as an optimizer, a Trainer and a loop.

* :class:`SAM`: a ``torch.optim.Optimizer`` around any base optimizer (``first_step`` / ``second_step`` /
  ``step(closure)``).
* :class:`SAMTrainer`: a ``transformers.Trainer`` whose steps are SAM steps (``sam_rho``, ``sam_adaptive``).
* :func:`finetune`: the AdamW / SAM / ASAM fine-tuning loop the benchmarks and ``examples/finetune_sam.py`` share.

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
    "FinetuneConfig",
    "FinetuneResult",
    "finetune",
    "make_optimizer",
    "perturb",
    "restore",
    "sam_perturbation",
    "text_classification_collator",
    "training_step",
]

if TYPE_CHECKING:
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
