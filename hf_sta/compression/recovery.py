"""Optional recovery: a short distillation of the compressed body from the uncompressed one on the kept tasks' data.

Step ``s`` takes the next micro-batch of task ``t = tasks[s mod T]`` (round robin; each task's batches cycle), runs
teacher (uncompressed body + task head, no gradient) and student (compressed body + the same head, frozen) and
minimises

    loss = T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T)) + hidden_weight * MSE(h_student, h_teacher)

with ``z`` the task's logits (``[B, C]`` for classifiers; ``[B, S, V]`` for causal LMs, averaged over non-padding
tokens) and ``h`` the last hidden state ``[B, S, hidden]`` (hidden_size is never pruned, so the two align; averaged
over non-padding tokens). The labels in the batches are not used. Only the student body is trained (AdamW,
constant learning rate, gradient norm clipped to 1); task heads are shipped unchanged. Dropout is off (eval mode),
so a run is a deterministic function of the data and seed: with a constant learning rate, the student after step
``k`` of an ``n``-step run is the student of a ``k``-step run, so one run with a ``callback`` that looks at steps
``k_1 < k_2 < ...`` tunes the number of steps.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .scoring import TaskHead

logger = logging.getLogger(__name__)

__all__ = ["distill"]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values [B, ...]`` over the entries where ``mask [B, S]`` is 1 (all entries without a mask)."""
    if mask is None or values.dim() < 2:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def _forward(model: nn.Module, batch: Mapping[str, Any]):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    outputs = model(**inputs, output_hidden_states=True)
    return outputs.logits.float(), outputs.hidden_states[-1].float()


def distill_loss(student_out, teacher_out, mask: torch.Tensor | None, temperature: float, hidden_weight: float):
    """The loss of the module docstring for one batch (``*_out = (logits, last hidden state)``)."""
    (z_s, h_s), (z_t, h_t) = student_out, teacher_out
    kl = F.kl_div(
        F.log_softmax(z_s / temperature, -1), F.log_softmax(z_t / temperature, -1), log_target=True, reduction="none"
    ).sum(-1)
    loss = temperature**2 * _masked_mean(kl, mask if kl.dim() == 2 else None)
    if hidden_weight:
        loss = loss + hidden_weight * _masked_mean((h_s - h_t).pow(2).mean(-1), mask)
    return loss


def distill(
    student: nn.Module,
    teacher: nn.Module,
    heads: Mapping[str, TaskHead],
    loaders: Mapping[str, Any],
    *,
    steps: int,
    lr: float = 5e-5,
    temperature: float = 2.0,
    hidden_weight: float = 1.0,
    seed: int = 0,
    show_progress: bool = False,
    callback: Callable[[int, nn.Module], None] | None = None,
) -> dict[str, float]:
    """Train ``student`` in place for ``steps`` steps (see the module docstring); returns the mean loss over the
    first and the last 10% of the steps (``first_loss``, ``last_loss``). ``callback(step, student)`` is called after
    each optimizer step (``step`` counts from 1), e.g. to evaluate the student on validation data."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    tasks = list(loaders)
    students = {t: heads[t].task_model(student) for t in tasks}
    teachers = {t: heads[t].task_model(teacher) for t in tasks}
    batches = {t: itertools.cycle(loaders[t]) for t in tasks}
    trainable = list(student.parameters())
    body = {id(p) for p in trainable}
    teacher_grad = {id(p): p.requires_grad for p in teacher.parameters()}
    for model in [*students.values(), teacher]:
        for p in model.parameters():
            p.requires_grad_(id(p) in body)  # heads (throwaway wrappers around shared storage) and teacher: frozen
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    student.eval()
    losses = []
    for step in tqdm(range(steps), desc="compress recovery", disable=not show_progress):
        task = tasks[step % len(tasks)]
        batch = next(batches[task])
        with torch.no_grad():
            teacher_out = _forward(teachers[task], batch)
        loss = distill_loss(_forward(students[task], batch), teacher_out, batch.get("attention_mask"), temperature,
                            hidden_weight)  # fmt: skip
        if not torch.isfinite(loss):
            raise FloatingPointError(f"compress recovery: loss is {loss.item()} at step {step} (task '{task}').")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if callback is not None:
            callback(step + 1, student)
    optimizer.zero_grad(set_to_none=True)
    for p in teacher.parameters():
        p.requires_grad_(teacher_grad[id(p)])
    student.eval()
    tenth = max(1, steps // 10)
    return {"steps": steps, "first_loss": sum(losses[:tenth]) / tenth, "last_loss": sum(losses[-tenth:]) / tenth}
