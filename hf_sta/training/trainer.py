"""``SAMTrainer``: a ``transformers.Trainer`` whose every optimizer step is a SAM / ASAM step.

```python
from hf_sta.training import SAMTrainer

trainer = SAMTrainer(model=model, args=args, train_dataset=train, sam_rho=0.05, sam_adaptive=False)
trainer.train()
```

How the step is built (transformers 5 ``Trainer._run_epoch``): for one optimizer step the Trainer calls
:meth:`training_step` on each of its ``gradient_accumulation_steps`` micro-batches, then clips the gradients and
calls ``optimizer.step()``. ``SAMTrainer.training_step`` runs the normal forward/backward and keeps the micro-batch;
on the last micro-batch of the step (``accelerator.sync_gradients``) ``.grad`` holds the gradient at ``theta``
accumulated over the whole step (and all-reduced: under DDP the last micro-batch's backward runs outside
``no_sync``). It then

1. moves the trainable parameters to ``theta + e`` (:func:`~hf_sta.training.sam.perturb`, ``e = rho T^2 g / ||T g||``),
2. zeroes the gradients and re-runs forward/backward on every kept micro-batch (all but the last under ``no_sync``,
   so the gradient at ``theta + e`` is accumulated and all-reduced the same way),
3. puts ``theta`` back.

The Trainer then clips that gradient and steps its own optimizer (``args.optim``, its scheduler, its checkpoints:
nothing about the optimizer changes, so ``SAMTrainer`` takes the Trainer's arguments plus ``sam_rho`` /
``sam_adaptive`` / ``sam_eta``). Clipping the first gradient is not needed: ``e`` is invariant to scaling ``g``.
Under fp16 the gradient scaler's factor cancels in ``e`` likewise; an overflowed (non-finite) first gradient gives
no perturbation and the scaler skips the step. The reported loss is the loss at ``theta``.

Not supported: DeepSpeed and FSDP (their engines own the step / shard the parameters), SageMaker model parallel.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from transformers import Trainer

from ..errors import ConfigError
from .sam import perturb, restore

logger = logging.getLogger(__name__)

__all__ = ["SAMTrainer"]


class SAMTrainer(Trainer):
    """``transformers.Trainer`` with sharpness-aware steps (module docstring: how the step is built).

    Args:
        sam_rho: neighbourhood radius ``rho`` (the authors' defaults: 0.05 for SAM, 0.5 for ASAM); 0 gives the
            plain Trainer's updates at twice the cost.
        sam_adaptive: ASAM (``T = |theta| + sam_eta``) instead of SAM (``T = 1``).
        sam_eta: ASAM's offset (default 0: ``T = |theta|``).
        *args, **kwargs: as for ``transformers.Trainer``.

    The perturbation covers the parameters the Trainer's optimizer updates that have a gradient (a PEFT model's
    adapter only). :attr:`sam_seconds` accumulates the time of the extra passes.
    """

    def __init__(
        self, *args: Any, sam_rho: float = 0.05, sam_adaptive: bool = False, sam_eta: float = 0.0, **kwargs: Any
    ) -> None:
        if sam_rho < 0:
            raise ConfigError(f"sam_rho must be >= 0, got {sam_rho}")
        if sam_eta < 0:
            raise ConfigError(f"sam_eta must be >= 0, got {sam_eta}")
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ConfigError("SAMTrainer: DeepSpeed and FSDP are not supported (the engine owns the optimizer step)")
        self.sam_rho = float(sam_rho)
        self.sam_adaptive = bool(sam_adaptive)
        self.sam_eta = float(sam_eta)
        self.sam_seconds = 0.0
        self._sam_micro_batches: list[tuple[dict[str, Any], Any]] = []
        self._sam_recomputing = False

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._sam_recomputing:
            return loss
        self._sam_micro_batches.append((inputs, num_items_in_batch))
        if self.accelerator.sync_gradients:  # the last micro-batch of this optimizer step
            try:
                self._sam_second_pass(model)
            finally:
                self._sam_micro_batches = []
        return loss

    def _sam_second_pass(self, model: torch.nn.Module) -> None:
        """Gradient at ``theta + e`` of the whole step into ``.grad``; parameters back at ``theta`` afterwards."""
        import time

        started = time.perf_counter()
        saved = perturb(self.optimizer.param_groups, rho=self.sam_rho, adaptive=self.sam_adaptive, eta=self.sam_eta)
        if not saved:
            return
        self._sam_recomputing = True
        try:
            model.zero_grad(set_to_none=True)
            last = len(self._sam_micro_batches) - 1
            for index, (inputs, num_items_in_batch) in enumerate(self._sam_micro_batches):
                sync = contextlib.nullcontext() if index == last else self.accelerator.no_sync(model)
                with sync:
                    super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._sam_recomputing = False
            restore(saved)
        self.sam_seconds += time.perf_counter() - started
