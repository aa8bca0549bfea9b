"""What the unlearning adapter is trained on: ``L = L_retain + forget_weight * L_forget``.

``L_retain`` is the model's own loss on a batch of retained data (FUSED's knowledge overwriting: the adapted layers are
fitted to what must be kept). ``L_forget``, on a batch of forget inputs with logits ``z`` (``[B, C]``) and
``p = softmax(z)``:

- ``"none"``: 0. The paper's recipe and the default: its fixed point is a model fitted to the retained data only, which
  is what retraining without the forget data produces; the forget data is used only to find the layers and to decide
  when to stop.
- ``"ascent"``: ``-CE(z, y)`` (gradient ascent on the forget data's own loss). Unbounded: without an early stop it
  drives the forget accuracy below chance (the model learns to prefer wrong labels).
- ``"uniform"``: ``KL(u || p) = -log C - mean_c log p_c`` per example, averaged (``u`` uniform over the ``C`` classes).
- ``"prior"``: ``KL(q || p) = sum_c q_c (log q_c - log p_c)``, ``q`` the label frequencies of the forget data: the
  input-independent prediction of a model that knows nothing of these inputs. Its arg max is the majority class, so
  forget accuracy settles on the majority-class rate (the usual "chance" of a classification benchmark), where
  ``"uniform"`` leaves the arg max to noise.

Use ``"none"`` when the forget data comes from the distribution of the retained data (a client's or some samples'
data: retraining would still predict it well) and ``"prior"``/``"uniform"`` when it is a task or class of its own that
a model without it should not predict.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["forget_term", "label_prior"]


def label_prior(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``q_c`` = fraction of ``labels`` (int ``[N]``, ``-100`` ignored) equal to ``c``; ``[num_classes]`` fp32."""
    labels = labels[labels >= 0]
    if labels.numel() == 0:
        raise ValueError("label_prior: no labels.")
    if int(labels.max()) >= num_classes:
        raise ValueError(f"label_prior: label {int(labels.max())} >= num_classes={num_classes}.")
    return torch.bincount(labels, minlength=num_classes).float() / labels.numel()


def forget_term(
    kind: str, logits: torch.Tensor | None, *, loss: torch.Tensor | None = None, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """``L_forget`` of the module docstring for one batch.

    Args:
        kind: ``"ascent"``, ``"uniform"`` or ``"prior"``.
        logits: ``[B, C]`` logits on the forget inputs (``"uniform"``, ``"prior"``).
        loss: the model's own scalar loss on the batch (``"ascent"``).
        prior: ``[C]`` label frequencies ``q`` (``"prior"``).
    """
    if kind == "ascent":
        if loss is None:
            raise ValueError("forget_term('ascent') needs the batch loss.")
        return -loss
    if logits is None or logits.dim() != 2:
        raise ValueError(
            f"forget_term('{kind}') needs [batch, classes] logits, got "
            f"{None if logits is None else tuple(logits.shape)}."
        )
    log_p = F.log_softmax(logits.float(), dim=-1)
    if kind == "uniform":
        return (-math.log(logits.shape[-1]) - log_p.mean(dim=-1)).mean()
    if kind == "prior":
        if prior is None or prior.shape != (logits.shape[-1],):
            raise ValueError(f"forget_term('prior') needs a [{logits.shape[-1]}] prior.")
        q = prior.to(log_p)
        entropy_term = torch.where(q > 0, q * q.clamp_min(1e-30).log(), torch.zeros_like(q)).sum()
        return entropy_term - (log_p * q).sum(dim=-1).mean()
    raise ValueError(f"Unknown forget loss {kind!r}.")
