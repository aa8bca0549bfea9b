"""One fine-tuning loop for AdamW, SAM and ASAM, shared by ``examples/finetune_sam.py`` and the benchmarks.

```python
from hf_sta.training import FinetuneConfig, finetune, text_classification_collator

result = finetune(
    model,                                        # e.g. AutoModelForSequenceClassification, trained in place
    rows,                                         # a datasets.Dataset or a list of {"text": ..., "label": ...}
    collate_fn=text_classification_collator(tokenizer, max_length=128),
    config=FinetuneConfig(optimizer="sam"),       # rho defaults to 0.05 (SAM) / 0.5 (ASAM)
)
result.seconds_per_step
```

Recipe (the MiniLM benchmark's, ``benchmarks/finetune.py``): AdamW (weight decay on every trainable tensor except
biases and LayerNorm), linear warmup over ``warmup_ratio`` of the steps then linear decay to 0, gradient clipping at
``max_grad_norm``, ``epochs`` passes over the rows in an order drawn from ``torch.randperm`` with a generator seeded by
``seed`` (the last batch of an epoch may be smaller). With ``optimizer="sam"`` / ``"asam"`` the same AdamW makes the
update from the gradient at ``theta + e`` (:class:`~hf_sta.training.SAM`); that second gradient is the one clipped
(the first one needs no clipping: ``e`` does not change when ``g`` is scaled). With ``optimizer="adamw"`` the loop is
step for step the benchmark's original loop (same weights, bit for bit).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch

from ..errors import ConfigError
from .sam import SAM

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_RHO",
    "FinetuneConfig",
    "FinetuneResult",
    "finetune",
    "make_optimizer",
    "text_classification_collator",
    "training_step",
]

OPTIMIZERS = ("adamw", "sam", "asam")
DEFAULT_RHO = {"sam": 0.05, "asam": 0.5}
"""The authors' public defaults (SAM: Foret et al. 2021; ASAM: Kwon et al. 2021)."""


@dataclasses.dataclass
class FinetuneConfig:
    """Hyper-parameters of :func:`finetune` (defaults: the MiniLM benchmark's recipe).

    ``rho=None`` takes :data:`DEFAULT_RHO` for the optimizer; ``eta`` is ASAM's offset in ``T = |theta| + eta``.
    """

    optimizer: Literal["adamw", "sam", "asam"] = "adamw"
    learning_rate: float = 1e-4
    epochs: int = 2
    batch_size: int = 16
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    rho: float | None = None
    eta: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got '{self.optimizer}'")
        if self.optimizer == "adamw" and self.rho not in (None, 0, 0.0):
            raise ConfigError(f"rho is for optimizer='sam' or 'asam', not 'adamw' (got rho={self.rho})")
        for name in ("learning_rate", "epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.rho is not None and self.rho < 0:
            raise ConfigError(f"rho must be >= 0, got {self.rho}")

    @property
    def resolved_rho(self) -> float | None:
        """``rho`` as used: the given one, else the optimizer's default; ``None`` for AdamW."""
        if self.optimizer == "adamw":
            return None
        return DEFAULT_RHO[self.optimizer] if self.rho is None else float(self.rho)


@dataclasses.dataclass
class FinetuneResult:
    """What a :func:`finetune` run measured: wall time of the training loop, steps and mean loss per epoch."""

    train_seconds: float
    steps: int
    epoch_losses: list[float]

    @property
    def seconds_per_step(self) -> float:
        return self.train_seconds / max(self.steps, 1)


def _no_decay(name: str) -> bool:
    return name.endswith("bias") or "LayerNorm" in name


def make_optimizer(model: torch.nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (groups: decayed, then biases / LayerNorm at 0), wrapped in SAM for
    ``sam`` / ``asam``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("model: no parameter requires a gradient")
    groups = [
        {"params": [p for n, p in named if not _no_decay(n)], "weight_decay": config.weight_decay},
        {"params": [p for n, p in named if _no_decay(n)], "weight_decay": 0.0},
    ]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.learning_rate)
    return SAM(
        groups,
        torch.optim.AdamW,
        rho=config.resolved_rho,
        adaptive=config.optimizer == "asam",
        eta=config.eta,
        lr=config.learning_rate,
    )


def text_classification_collator(
    tokenizer: Any, *, max_length: int = 128, text_column: str = "text", label_column: str = "label"
) -> Callable[[Sequence[Mapping[str, Any]]], dict[str, torch.Tensor]]:
    """Rows ``{text, label}`` -> ``tokenizer(texts, padding=True, truncation=True)`` + ``labels`` (dynamic padding)."""

    def collate(rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        inputs = tokenizer(
            [row[text_column] for row in rows],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        return {**inputs, "labels": torch.tensor([row[label_column] for row in rows])}

    return collate


def _loss(model: torch.nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    return model(**inputs).loss


def training_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: Mapping[str, Any],
    max_grad_norm: float | None = None,
) -> torch.Tensor:
    """One update of ``model`` on one batch; returns the loss at ``theta`` (detached).

    AdamW (any plain optimizer): forward, backward, clip the gradient to ``max_grad_norm``, step. :class:`SAM`:
    gradient at ``theta`` (unclipped: ``e`` is invariant to its scale), ``first_step``, gradient at ``theta + e``
    (clipped), ``second_step``. The gradients are left in ``.grad`` (zero them before the next step).
    """
    parameters = [p for p in model.parameters() if p.requires_grad]  # model order: the clipping norm's summation

    def backward() -> torch.Tensor:
        loss = _loss(model, inputs)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        return loss

    if not isinstance(optimizer, SAM):
        loss = backward()
        optimizer.step()
        return loss.detach()
    loss = _loss(model, inputs)
    loss.backward()

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        return backward()

    optimizer.step(closure)  # first_step, closure (the gradient at theta + e), second_step; schedulers see a step
    return loss.detach()


def finetune(
    model: torch.nn.Module,
    train_dataset: Sequence[Mapping[str, Any]],
    collate_fn: Callable[[Sequence[Mapping[str, Any]]], Mapping[str, Any]] | None = None,
    config: FinetuneConfig | None = None,
    *,
    show_progress: bool = True,
    **config_overrides: Any,
) -> FinetuneResult:
    """Fine-tune ``model`` in place on ``train_dataset`` with AdamW, SAM or ASAM (module docstring: the recipe).

    Args:
        model: a model whose forward takes the collated batch and returns an output with ``.loss``.
        train_dataset: rows (a ``datasets.Dataset`` or a list of dicts), indexed ``train_dataset[i]``.
        collate_fn: list of rows -> model inputs with labels; default ``transformers.default_data_collator``.
        config: :class:`FinetuneConfig`; ``config_overrides`` replace its fields (``optimizer="sam", rho=0.1``).
        show_progress: a tqdm bar over the steps.
    """
    from tqdm.auto import tqdm
    from transformers import default_data_collator, get_linear_schedule_with_warmup

    config = dataclasses.replace(config or FinetuneConfig(), **config_overrides)
    collate_fn = collate_fn or default_data_collator
    num_rows = len(train_dataset)
    if num_rows == 0:
        raise ConfigError("train_dataset is empty")
    optimizer = make_optimizer(model, config)
    steps_per_epoch = -(-num_rows // config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    scheduler = get_linear_schedule_with_warmup(optimizer, round(config.warmup_ratio * total_steps), total_steps)
    generator = torch.Generator().manual_seed(config.seed)
    logger.info(
        "Fine-tuning with %s (rho %s): %d rows, %d epochs, %d steps, lr %g, seed %d",
        config.optimizer,
        config.resolved_rho,
        num_rows,
        config.epochs,
        total_steps,
        config.learning_rate,
        config.seed,
    )
    started = time.perf_counter()
    model.train()
    epoch_losses = []
    progress = tqdm(
        total=total_steps, desc=f"fine-tuning ({config.optimizer})", unit="step", disable=not show_progress
    )
    for _ in range(config.epochs):
        order = torch.randperm(num_rows, generator=generator).tolist()
        running_loss = 0.0
        for step in range(steps_per_epoch):
            inputs = collate_fn(
                [train_dataset[i] for i in order[step * config.batch_size : (step + 1) * config.batch_size]]
            )
            loss = training_step(model, optimizer, inputs, config.max_grad_norm)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running_loss += loss.item()
            progress.update(1)
        epoch_losses.append(running_loss / steps_per_epoch)
        logger.info("epoch %d/%d: mean train loss %.4f", len(epoch_losses), config.epochs, epoch_losses[-1])
    progress.close()
    return FinetuneResult(time.perf_counter() - started, total_steps, epoch_losses)
