"""Group importance of every prunable structure, per kept task, and the rule that fuses the kept tasks.

For task ``t`` with calibration micro-batches ``j = 1..J`` (its own data, its own head on the shared body), the
per-entry Taylor importance is ``I_t[i] = (1/J) sum_j |theta_i * g_ij|`` (``hf_sta.importance.metrics.taylor``),
and a structure ``S`` (a key/value group with its query heads, an FFN neuron, a layer; see ``architecture``) scores

    I_t(S) = sum_{i in S} I_t[i]                                          (group Taylor importance)

Fusion (``fusion=``): each task's scores of one kind (groups, neurons, layers) are first normalised to sum to 1
over all structures of that kind in the model, ``Ī_t(S) = I_t(S) / sum_S' I_t(S')``, so a task with a larger loss
scale does not dominate; then ``mean`` takes ``(1/T) sum_t Ī_t(S)`` (keep what matters to the kept tasks on
average) and ``max`` takes ``max_t Ī_t(S)`` (keep what matters a lot to any one kept task).

Baselines: ``importance="magnitude"`` scores ``sum_{i in S} |theta_i|`` (data-free L1 of the group);
``"random"`` draws uniform scores from ``seed``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..importance.calibration import accumulate_gradient_statistics
from ..importance.metrics import taylor
from .architecture import ArchitectureSpec, Widths, layer_list

logger = logging.getLogger(__name__)

__all__ = ["FUSIONS", "IMPORTANCES", "StructureScores", "TaskHead", "fuse", "structure_scores", "task_scores"]

FUSIONS = ("mean", "max")
IMPORTANCES = ("taylor", "magnitude", "random")


@dataclass
class TaskHead:
    """What a task adds to the shared body: its head tensors (named as in its fine-tuned model, e.g.
    ``classifier.weight``) and that model's ``config.json`` (whose ``architectures[0]`` wraps body and head).
    No tensors (a causal LM whose ``lm_head`` is part of the body): the body itself is the task's model."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] | None = None

    def task_model(self, body: nn.Module) -> nn.Module:
        """``architectures[0]`` of the fine-tuned config with ``body.base_model`` as its base model (shared, not
        copied: gradients land on the body's parameters) and this head loaded."""
        if not self.tensors:
            return body
        import transformers

        architectures = (self.config or {}).get("architectures") or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
        if model_class is None:
            raise ConfigError(
                f"compress: a task head needs its fine-tuned config's architectures (got {architectures or None})."
            )
        config = model_class.config_class.from_dict(dict(self.config))
        with torch.device("meta"):
            model = model_class(config)
        setattr(model, model_class.base_model_prefix, body.base_model)
        model.load_state_dict(self.tensors, strict=False, assign=True)
        missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if missing:
            raise CheckpointError(f"compress: the task head has no value for {', '.join(missing[:5])}.")
        return model.eval()


@dataclass
class StructureScores:
    """Scores of one task (or fused): ``groups [L, G]`` (key/value groups with their query heads; with
    ``G = num_attention_heads`` for MHA), ``neurons [L, F]``, ``layers [L]``."""

    groups: torch.Tensor
    neurons: torch.Tensor
    layers: torch.Tensor

    def normalised(self) -> StructureScores:
        return StructureScores(*(t / t.sum().clamp_min(torch.finfo(torch.float32).tiny) for t in self.astuple()))

    def astuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.groups, self.neurons, self.layers


def structure_scores(entries: Mapping[str, torch.Tensor], spec: ArchitectureSpec, widths: Widths) -> StructureScores:
    """Sum per-entry scores ``{"<layer>.<tensor>": tensor}`` (names relative to the layer list) into structures.

    Group ``g``: rows of its ``n_rep`` query heads in ``q`` (``[H*d, h] -> [G, n_rep*d]``), the same columns of ``o``,
    rows ``[g*d, (g+1)*d)`` of ``k`` and ``v``, biases included. Neuron ``j``: row ``j`` of each FFN input, column
    ``j`` of the FFN output. Layer: every entry of the layer.
    """
    L, G, F = widths.num_hidden_layers, widths.num_key_value_heads, widths.intermediate_size  # noqa: N806
    groups, neurons, layers = torch.zeros(L, G), torch.zeros(L, F), torch.zeros(L)

    def get(i: int, name: str) -> torch.Tensor | None:
        return entries.get(f"{i}.{name}")

    for i in range(L):
        for name, tensor in entries.items():
            if name.startswith(f"{i}."):
                layers[i] += tensor.sum()
        for module, axis in ((spec.query, 1), (spec.key, 1), (spec.value, 1), (spec.out, 0)):
            weight = get(i, f"{module}.weight")
            if weight is None:
                raise CheckpointError(f"compress: no scores for '{i}.{module}.weight' (layer {i}).")
            per_row = weight.sum(axis)
            bias = get(i, f"{module}.bias")
            if bias is not None and module != spec.out:  # o's bias has hidden_size entries: no head owns it
                per_row = per_row + bias
            groups[i] += per_row.view(G, -1).sum(1)
        for module in spec.ffn_in:
            neurons[i] += get(i, f"{module}.weight").sum(1)
            bias = get(i, f"{module}.bias")
            if bias is not None:
                neurons[i] += bias
        neurons[i] += get(i, f"{spec.ffn_out}.weight").sum(0)
    return StructureScores(groups, neurons, layers)


def fuse(per_task: Mapping[str, StructureScores], fusion: str) -> StructureScores:
    """Normalise each task's scores per kind (sum 1) and take their ``mean`` or ``max`` over tasks."""
    if fusion not in FUSIONS:
        raise ConfigError(f"compress: fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}.")
    normalised = [s.normalised().astuple() for s in per_task.values()]
    stacked = [torch.stack(kind) for kind in zip(*normalised, strict=True)]
    fused = [s.mean(0) if fusion == "mean" else s.amax(0) for s in stacked]
    return StructureScores(*fused)


def _layer_parameters(model: nn.Module, layers: nn.ModuleList) -> dict[str, str]:
    """``{state-dict key of model: "<layer>.<tensor>"}`` for the parameters of ``layers`` (found by identity)."""
    prefix = next((name for name, module in model.named_modules() if module is layers), None)
    if prefix is None:
        raise CheckpointError("compress: the task model does not contain the body's layers.")
    state = model.state_dict(keep_vars=True)
    return {
        key: key[len(prefix) + 1 :]
        for key, value in state.items()
        if key.startswith(prefix + ".") and isinstance(value, nn.Parameter)
    }


def task_scores(
    body: nn.Module,
    spec: ArchitectureSpec,
    widths: Widths,
    *,
    importance: str,
    head: TaskHead | None = None,
    loader: Any = None,
    loss_fn: Callable | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    show_progress: bool = False,
    task: str = "task",
) -> StructureScores:
    """One task's :class:`StructureScores` for ``importance`` (taylor: gradients of the task's loss with its head on
    ``loader``'s micro-batches; ``loss_fn(task_model, batch)`` overrides ``task_model(**batch).loss``)."""
    layers = layer_list(body, spec)
    if importance == "random":
        generator = torch.Generator().manual_seed(seed)
        L, G, F = widths.num_hidden_layers, widths.num_key_value_heads, widths.intermediate_size  # noqa: N806
        return StructureScores(*(torch.rand(s, generator=generator) for s in ((L, G), (L, F), (L,))))
    theta = {name: p.detach().float().cpu() for name, p in layers.named_parameters()}
    if importance == "magnitude":
        return structure_scores({k: v.abs() for k, v in theta.items()}, spec, widths)
    if importance != "taylor":
        raise ConfigError(f"compress: importance must be one of {', '.join(IMPORTANCES)}, got {importance!r}.")
    if loader is None:
        raise ConfigError(f"compress: importance='taylor' needs calibration data for task '{task}' (data={{...}}).")
    model = (head or TaskHead()).task_model(body)
    names = _layer_parameters(model, layers)
    gradients, _, samples = accumulate_gradient_statistics(
        model, loader, statistic="abs", parameter_names=names, loss_fn=loss_fn, num_samples=num_samples,
        show_progress=show_progress, description=f"compress importance[{task}]",
    )  # fmt: skip
    logger.info("compress: task '%s' scored on %d samples", task, samples)
    return structure_scores({k: taylor(theta[k], g) for k, g in gradients.items()}, spec, widths)
