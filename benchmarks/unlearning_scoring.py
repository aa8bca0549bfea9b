"""Scoring for the unlearning benchmark: logits of a body + task head (or of a full classifier) on tokenized rows,
accuracy, per-example losses and the membership-inference attack (``hf_sta.unlearning.metrics``).

Rows are tokenized once per (name, rows) and batched in order of length; scoring runs under CPU bf16 autocast when
``bf16`` (every row of a table is scored the same way) and in fp32 otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from hf_sta.unlearning import membership_attack_accuracy, membership_auc

Forward = Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]


def body_forward(head: tuple[torch.Tensor, torch.Tensor]) -> Forward:
    """``classifier(pooler_output(body(inputs)))``: ``BertForSequenceClassification``'s eval computation."""
    weight, bias = head

    def forward(model, inputs):
        return model(**inputs).pooler_output.float() @ weight.T + bias

    return forward


def model_forward(model, inputs) -> torch.Tensor:
    """A full sequence classifier: ``model(**inputs).logits``."""
    return model(**inputs).logits.float()


def head_loss(head: tuple[torch.Tensor, torch.Tensor]) -> Callable:
    """``loss_fn(model, batch)`` for ``STAMerger.unlearn`` on a shared body: cross entropy through ``head``."""
    forward = body_forward(head)

    def loss_fn(model, batch):
        return F.cross_entropy(forward(model, {k: v for k, v in batch.items() if k != "labels"}), batch["labels"])

    return loss_fn


def head_predict(head: tuple[torch.Tensor, torch.Tensor]) -> Callable:
    """``predict_fn(model, batch)``: the head's logits."""
    forward = body_forward(head)
    return lambda model, batch: forward(model, {k: v for k, v in batch.items() if k != "labels"})


@dataclass
class Scorer:
    """Tokenized row sets by name, scored with a forward function."""

    tokenizer: Any
    max_length: int
    bf16: bool = True
    batch_size: int = 64
    _rows: dict[str, tuple[list, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def add(self, name: str, rows) -> None:
        """Tokenize ``rows`` (``text``/``label`` columns) once under ``name``."""
        if name in self._rows:
            return
        texts, labels = list(rows["text"]), torch.tensor(rows["label"])
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        batches = []
        for start in range(0, len(order), self.batch_size):
            indices = order[start : start + self.batch_size]
            inputs = self.tokenizer([texts[i] for i in indices], padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt")  # fmt: skip
            batches.append(dict(inputs))
        self._rows[name] = (batches, torch.tensor(order), labels)

    def first_batch(self, name: str) -> dict[str, torch.Tensor]:
        """The first tokenized batch of ``name`` (a probe for exact-equality checks)."""
        return self._rows[name][0][0]

    @torch.inference_mode()
    def logits(self, model: torch.nn.Module, name: str, forward: Forward) -> tuple[torch.Tensor, torch.Tensor]:
        """``([N, C] logits in row order, [N] labels)``."""
        batches, order, labels = self._rows[name]
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            parts = [forward(model, inputs).float() for inputs in batches]
        logits = torch.empty(len(order), parts[0].shape[-1])
        logits[order] = torch.cat(parts)
        return logits, labels

    def accuracy(self, model, name: str, forward: Forward) -> float:
        logits, labels = self.logits(model, name, forward)
        return float((logits.argmax(-1) == labels).double().mean())

    def losses(self, model, name: str, forward: Forward) -> torch.Tensor:
        logits, labels = self.logits(model, name, forward)
        return F.cross_entropy(logits, labels, reduction="none")

    def membership(self, model, members: str, nonmembers: str, forward: Forward) -> dict[str, float]:
        """Loss-threshold attack: AUC and best balanced accuracy, ``members`` vs ``nonmembers`` rows."""
        member_losses, nonmember_losses = self.losses(model, members, forward), self.losses(model, nonmembers, forward)
        return {
            "mia_auc": membership_auc(member_losses, nonmember_losses),
            "mia_accuracy": membership_attack_accuracy(member_losses, nonmember_losses),
        }


def majority_rate(labels) -> float:
    """Accuracy of always predicting the most frequent label (the benchmark's "chance")."""
    counts = torch.bincount(torch.as_tensor(list(labels)))
    return float(counts.max() / counts.sum())
