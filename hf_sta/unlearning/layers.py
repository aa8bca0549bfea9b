"""Critical-layer identification: which layers hold the knowledge to forget (the first step of FUSED).

A *layer* is one block of the model's repeated stacks (the module path up to its first numeric component:
``bert.encoder.layer.3``, ``model.layers.7``) or, outside any stack, one module that can carry a LoRA adapter
(``bert.pooler.dense``, ``classifier``). Only layers that hold LoRA-able modules (``nn.Linear``, ``nn.Conv1d/2d/3d``,
transformers' ``Conv1D``) are candidates; embeddings are not.

Sensitivity score of layer ``l`` (first-order Taylor importance, as STA's, measured at the target on each side)::

    M_l(D)  = sum_{p in l} |theta_p| * mean_j |dL_D(x_j) / dtheta_p|     (micro-batches j of data D, its own loss)
    f_l     = M_l(forget) / sum_k M_k(forget)                           (share of the forget data's importance)
    r_l     = M_l(retain) / sum_k M_k(retain)
    s_l     = f_l / max(r_l, 1e-12)

With several retain (or forget) sources the shares are averaged over sources, each source counting once.
``s_l > 1``: the layer matters more to the forget data than to the retained data, relative to the other layers.
FUSED's own identification (the authors' paper and code) ranks layers by how far each moved when clients trained on
their data (an L1 distance per layer between uploaded and distributed models); here the data to forget is given
instead of a client's update, so the same question -- where does this knowledge live -- is asked of the gradients.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..importance import accumulate_gradient_statistics

logger = logging.getLogger(__name__)

__all__ = [
    "LayerSensitivity",
    "as_record",
    "candidate_layers",
    "choose_layers",
    "layer_of",
    "layer_sensitivity",
    "lora_targets",
]

_EPS = 1e-12


def _lora_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D)


def layer_of(module_name: str) -> str:
    """``"bert.encoder.layer.3.attention.self.query"`` -> ``"bert.encoder.layer.3"``; a path without a numeric
    component is its own layer."""
    parts = module_name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return module_name


def candidate_layers(model: nn.Module) -> dict[str, list[str]]:
    """``{layer name: [names of its LoRA-able modules]}`` in the model's module order."""
    types = _lora_types()
    layers: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if name and isinstance(module, types):
            layers.setdefault(layer_of(name), []).append(name)
    if not layers:
        raise ConfigError(f"unlearn: {type(model).__name__} has no Linear/Conv module a LoRA adapter can attach to.")
    return layers


@dataclasses.dataclass
class LayerSensitivity:
    """Per-layer scores (``s_l``) and the two shares they come from (``f_l``, ``r_l``), in model order."""

    scores: dict[str, float]
    forget_share: dict[str, float]
    retain_share: dict[str, float]

    def ranked(self) -> list[str]:
        """Layer names by decreasing score (ties: model order)."""
        order = list(self.scores)
        return sorted(order, key=lambda name: (-self.scores[name], order.index(name)))


def _layer_params(model: nn.Module, layers: Sequence[str]) -> dict[str, list[str]]:
    """``{layer: [parameter names under it]}`` (``layer.*``, or the module's own parameters)."""
    names = [name for name, param in model.named_parameters()]
    return {layer: [n for n in names if n.startswith(layer + ".")] for layer in layers}


def _shares(model, layer_params, sources, accelerator, show_progress: bool, what: str) -> dict[str, float]:
    """Mean over ``sources`` (``[(batches, loss_fn)]``) of each layer's share of the Taylor importance mass."""
    wanted = {p: p for params in layer_params.values() for p in params}
    parameters = dict(model.named_parameters())
    total = dict.fromkeys(layer_params, 0.0)
    for batches, loss_fn in sources:
        gradients, _, _ = accumulate_gradient_statistics(
            model, batches, statistic="abs", parameter_names=wanted, loss_fn=loss_fn, accelerator=accelerator,
            show_progress=show_progress, description=f"layer sensitivity ({what})",
        )  # fmt: skip
        mass = {
            layer: sum(float((parameters[p].detach().float().abs().cpu() * gradients[p]).sum()) for p in params)
            for layer, params in layer_params.items()
        }
        norm = sum(mass.values())
        if norm <= 0:
            raise ConfigError(f"unlearn: the {what} data gives zero gradient at every candidate layer.")
        for layer in total:
            total[layer] += mass[layer] / norm / len(sources)
    return total


def layer_sensitivity(
    model: nn.Module,
    forget: Sequence[tuple[Any, Any]],
    retain: Sequence[tuple[Any, Any]],
    *,
    accelerator: Any = None,
    show_progress: bool = False,
) -> LayerSensitivity:
    """The scores ``s_l = f_l / r_l`` of the module docstring.

    Args:
        model: the target, unwrapped (no adapter yet). Its weights are not changed; gradients are freed.
        forget, retain: ``[(micro-batches, loss_fn(model, batch) -> scalar)]``, one pair per data source.
    """
    layers = list(candidate_layers(model))
    layer_params = _layer_params(model, layers)
    forget_share = _shares(model, layer_params, forget, accelerator, show_progress, "forget")
    retain_share = _shares(model, layer_params, retain, accelerator, show_progress, "retain")
    scores = {layer: forget_share[layer] / max(retain_share[layer], _EPS) for layer in layers}
    return LayerSensitivity(scores, forget_share, retain_share)


def _named(requested: Sequence[str | int], layers: Sequence[str]) -> list[str]:
    chosen = []
    for entry in requested:
        if isinstance(entry, str):
            if entry not in layers:
                raise ConfigError(
                    f"unlearn: layer '{entry}' is not a candidate layer; candidates: {', '.join(layers)}."
                )
            chosen.append(entry)
            continue
        matches = [layer for layer in layers if layer.rsplit(".", 1)[-1] == str(entry) and layer != str(entry)]
        if len(matches) != 1:
            found = f"several layers ({', '.join(matches)}): name one" if matches else "no layer"
            raise ConfigError(f"unlearn: block index {entry} matches {found}; candidates: {', '.join(layers)}.")
        chosen.append(matches[0])
    return list(dict.fromkeys(chosen))


def choose_layers(
    layers: str | int | Sequence[str | int], candidates: Sequence[str], sensitivity: LayerSensitivity | None
) -> list[str]:
    """The layers to adapt, in model order: ``"auto"`` (scores > 1, at least the best), ``k`` (top ``k``), or the
    named layers / block indices (``sensitivity`` may then be ``None``)."""
    if not isinstance(layers, str | int):
        chosen = set(_named(layers, candidates))
    else:
        if sensitivity is None:
            raise ConfigError("unlearn: layers='auto' or an int needs the layer sensitivity scores.")
        ranked = sensitivity.ranked()
        if layers == "auto":
            chosen = {name for name in ranked if sensitivity.scores[name] > 1.0} or {ranked[0]}
        else:
            if layers > len(ranked):
                raise ConfigError(f"unlearn: layers={layers} but the model has {len(ranked)} candidate layers.")
            chosen = set(ranked[:layers])
    return [name for name in candidates if name in chosen]


def _float_dict(values: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()}


def lora_targets(candidates: Mapping[str, list[str]], chosen: Sequence[str]) -> list[str]:
    """Full names of the LoRA-able modules of the chosen layers (PEFT ``target_modules``)."""
    return [module for layer in chosen for module in candidates[layer]]


def as_record(sensitivity: LayerSensitivity | None) -> dict[str, Any] | None:
    if sensitivity is None:
        return None
    return {
        "scores": _float_dict(sensitivity.scores),
        "forget_share": _float_dict(sensitivity.forget_share),
        "retain_share": _float_dict(sensitivity.retain_share),
    }
