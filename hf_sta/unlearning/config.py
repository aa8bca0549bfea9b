"""``UnlearnConfig``: how :meth:`STAMerger.unlearn` picks layers and trains the unlearning adapter (one dataclass for
the Python API and any front end built on it)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

from ..errors import ConfigError

__all__ = ["FORGET_LOSSES", "UNLEARN_METHODS", "UnlearnConfig"]

UNLEARN_METHODS = ("fused",)
FORGET_LOSSES = ("none", "ascent", "uniform", "prior")
"""What the forget data adds to the objective (see :mod:`hf_sta.unlearning.objectives`)."""


def _positive(name: str, value: Any, *, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"unlearn: {name} must be a positive {'integer' if integer else 'number'}, got {value!r}.")


@dataclasses.dataclass
class UnlearnConfig:
    """Hyper-parameters of FUSED-style unlearning (defaults: the FUSED authors' adapter, this project's training).

    Layers:
        layers: ``"auto"`` (every candidate layer whose sensitivity score is > 1, i.e. that holds a larger share of
            the forget data's importance than of the retain data's; at least the top one), an ``int`` ``k`` (the
            ``k`` highest scores), or a list of layer names (``"bert.encoder.layer.3"``) or block indices (``3``).
        sensitivity_samples: forget and retain examples (each) the layer scores are measured on.
    Adapter (``peft.LoraConfig``, the values of the FUSED authors' public code):
        rank: ``r = 16``; lora_alpha: ``32``; lora_dropout: ``0.1``.
    Objective ``L = L_retain + forget_weight * L_forget`` (:mod:`~hf_sta.unlearning.objectives`):
        forget_loss: ``"none"`` (FUSED: fit the retained data only; the default), ``"ascent"`` (``-CE`` on forget
            inputs), ``"uniform"`` (``KL(uniform || p)``) or ``"prior"`` (``KL(q || p)``, ``q`` the forget data's
            label frequencies).
        forget_weight: weight of ``L_forget``.
    Training (AdamW over the LoRA factors only):
        learning_rate, weight_decay, batch_size, max_steps, max_length (tokenized text), seed.
    Early stop:
        goal: stop once the forget metric (accuracy on the first ``eval_samples`` forget examples, or ``eval_fn``)
            is ``<= goal``; ``None``: run ``max_steps``. eval_steps: how often it is measured.
    """

    method: Literal["fused"] = "fused"
    layers: str | int | Sequence[str | int] = "auto"
    sensitivity_samples: int = 64
    rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    forget_loss: Literal["none", "ascent", "uniform", "prior"] = "none"
    forget_weight: float = 1.0
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 16
    max_steps: int = 100
    max_length: int = 128
    goal: float | None = None
    eval_steps: int = 10
    eval_samples: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in UNLEARN_METHODS:
            raise ConfigError(f"unlearn: method must be one of {', '.join(UNLEARN_METHODS)}, got {self.method!r}.")
        if self.forget_loss not in FORGET_LOSSES:
            raise ConfigError(
                f"unlearn: forget_loss must be one of {', '.join(FORGET_LOSSES)}, got {self.forget_loss!r}."
            )
        self.layers = self._checked_layers(self.layers)
        for name in ("rank", "batch_size", "max_steps", "max_length", "eval_steps", "eval_samples",
                     "sensitivity_samples"):  # fmt: skip
            _positive(name, getattr(self, name), integer=True)
        for name in ("lora_alpha", "learning_rate", "forget_weight"):
            _positive(name, getattr(self, name))
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"unlearn: lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.weight_decay < 0:
            raise ConfigError(f"unlearn: weight_decay must be >= 0, got {self.weight_decay!r}.")
        if self.goal is not None and (isinstance(self.goal, bool) or not math.isfinite(self.goal)):
            raise ConfigError(f"unlearn: goal must be a finite number or None, got {self.goal!r}.")

    @staticmethod
    def _checked_layers(layers: Any) -> str | int | list[str | int]:
        if layers == "auto":
            return layers
        if isinstance(layers, int) and not isinstance(layers, bool):
            _positive("layers", layers, integer=True)
            return layers
        if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
            raise ConfigError(
                f"unlearn: layers must be 'auto', a positive int (top k) or a non-empty list of layer names or block "
                f"indices, got {layers!r}."
            )
        bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, str | int)]
        if bad:
            raise ConfigError(f"unlearn: layers entries must be layer names or block indices, got {bad[0]!r}.")
        return list(dict.fromkeys(layers))
