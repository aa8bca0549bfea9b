"""Select: the widths that meet a target, the structures kept per layer; combine: the physically smaller model.

Widths are uniform (one ``intermediate_size``, one ``num_attention_heads``, one ``num_key_value_heads`` for every
layer), so each layer keeps its own top-``k`` structures with the same ``k``. ``target`` (fraction of non-embedding
parameters, see ``ParameterBudget``) is met as follows: whole layers first when ``num_hidden_layers`` is given;
then, on decoders, the number of key/value groups ``G'`` and neurons ``F'`` that keep the two ratios ``G'/G`` and
``F'/F`` closest (for each ``G'`` the largest ``F'`` within budget; ties keep more heads); on BERT-family models
neurons only. ``F'`` is rounded down to a multiple of ``multiple_of``. The result never exceeds the target.

Ratios (``head_ratio``, ``neuron_ratio``: the fraction kept, in (0, 1]) are turned into counts first:
``G' = max(1, round(head_ratio * G))`` whole key/value groups (``num_attention_heads = G' * n_rep``) and
``F' = max(m, floor(round(neuron_ratio * F) / m) * m)`` neurons with ``m = multiple_of``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .architecture import ArchitectureSpec, ParameterBudget, Widths
from .scoring import StructureScores

__all__ = ["LayerPlan", "PrunePlan", "build_pruned_model", "plan_structures", "solve_widths"]


@dataclass
class LayerPlan:
    """What one original layer keeps: key/value groups, the query heads they own, FFN neurons (sorted indices)."""

    groups: list[int]
    heads: list[int]
    neurons: list[int]


@dataclass
class PrunePlan:
    widths: Widths
    layers: dict[int, LayerPlan]  # original layer index -> plan; removed layers are absent

    def record(self) -> dict[str, dict[str, list[int]]]:
        return {str(i): {"heads": p.heads, "neurons": p.neurons} for i, p in self.layers.items()}


def _check_count(value: int | None, name: str, low: int, high: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
        raise ConfigError(f"compress: {name} must be an integer in [{low}, {high}], got {value!r}.")


def _ratio_count(
    ratio: float | None, name: str, total: int, step: int, counterpart: int | None, other: str
) -> int | None:
    """``max(step, round(ratio * total) // step * step)``: the count a kept ``ratio`` stands for (``None``: none)."""
    if ratio is None:
        return None
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
        raise ConfigError(f"compress: {name} is the fraction kept, in (0, 1]; got {ratio!r}.")
    if counterpart is not None:
        raise ConfigError(f"compress: give {name}= or {other}=, not both.")
    return max(step, round(ratio * total) // step * step)


def solve_widths(
    widths: Widths,
    budget: ParameterBudget,
    spec: ArchitectureSpec,
    *,
    target: float | None = None,
    num_attention_heads: int | None = None,
    intermediate_size: int | None = None,
    num_hidden_layers: int | None = None,
    head_ratio: float | None = None,
    neuron_ratio: float | None = None,
    multiple_of: int = 1,
) -> Widths:
    """The compressed widths (see the module docstring); every error names the argument at fault."""
    _check_count(num_hidden_layers, "num_hidden_layers", 1, widths.num_hidden_layers)
    _check_count(num_attention_heads, "num_attention_heads", 1, widths.num_attention_heads)
    _check_count(intermediate_size, "intermediate_size", 1, widths.intermediate_size)
    _check_count(multiple_of, "multiple_of", 1, widths.intermediate_size)
    groups = _ratio_count(head_ratio, "head_ratio", widths.num_key_value_heads, 1, num_attention_heads,
                          "num_attention_heads")  # fmt: skip
    if groups is not None:
        num_attention_heads = groups * widths.heads_per_group
    neurons = _ratio_count(neuron_ratio, "neuron_ratio", widths.intermediate_size, multiple_of, intermediate_size,
                           "intermediate_size")  # fmt: skip
    if neurons is not None:
        if target is not None:
            raise ConfigError("compress: give target= or neuron_ratio=, not both (target sets the FFN width).")
        intermediate_size = neurons
    if target is not None and (isinstance(target, bool) or not isinstance(target, int | float) or not 0 < target < 1):
        raise ConfigError(
            f"compress: target is the fraction of non-embedding parameters kept, in (0, 1) exclusive; got {target!r}."
        )
    new = widths.with_(num_hidden_layers=num_hidden_layers or widths.num_hidden_layers)
    if num_attention_heads is not None and num_attention_heads != widths.num_attention_heads:
        if not spec.heads_prunable:
            raise ConfigError(
                "compress: attention heads of BERT-family models cannot be removed (head_dim = hidden_size / "
                "num_attention_heads in their config); prune intermediate_size or num_hidden_layers instead."
            )
        if num_attention_heads % widths.heads_per_group:
            raise ConfigError(
                f"compress: num_attention_heads={num_attention_heads} must be a multiple of the "
                f"{widths.heads_per_group} query heads per key/value group (whole groups are removed)."
            )
        groups = num_attention_heads // widths.heads_per_group
        new = new.with_(num_attention_heads=num_attention_heads, num_key_value_heads=groups)
    if target is None:
        if intermediate_size is not None:
            new = new.with_(intermediate_size=intermediate_size)
        if new == widths:
            raise ConfigError("compress: give target= or a smaller num_attention_heads / intermediate_size / "
                              "num_hidden_layers / head_ratio / neuron_ratio; nothing would be removed.")  # fmt: skip
        return new
    if intermediate_size is not None:
        raise ConfigError("compress: give target= or intermediate_size=, not both (target sets the FFN width).")
    return _widths_for_target(new, widths, budget, spec, target, heads_fixed=num_attention_heads is not None,
                              multiple_of=multiple_of)  # fmt: skip


def _widths_for_target(
    new: Widths,
    widths: Widths,
    budget: ParameterBudget,
    spec: ArchitectureSpec,
    target: float,
    *,
    heads_fixed: bool,
    multiple_of: int,
) -> Widths:
    """The widths under ``target * budget.count(widths)`` parameters: per number of key/value groups (all of them
    unless the heads are ``heads_fixed``), the widest FFN that fits; the pair whose kept fractions of groups and of
    neurons are closest wins (ties: more groups)."""
    limit = target * budget.count(widths)
    candidates = [new.num_key_value_heads]
    if spec.heads_prunable and not heads_fixed:
        candidates = list(range(1, widths.num_key_value_heads + 1))
    best = None
    for groups in candidates:
        trial = new.with_(num_key_value_heads=groups, num_attention_heads=groups * widths.heads_per_group)
        neurons = _largest_neurons(trial, budget, limit, multiple_of)
        if neurons < 1:
            continue
        gap = abs(groups / widths.num_key_value_heads - neurons / widths.intermediate_size)
        if best is None or gap <= best[0]:
            best = (gap, trial.with_(intermediate_size=neurons))
    if best is None:
        raise ConfigError(
            f"compress: target={target} cannot be met: even one FFN neuron per layer with these heads and layers "
            f"exceeds {int(limit)} non-embedding parameters (of {budget.count(widths)}); raise target or remove "
            "layers (num_hidden_layers=)."
        )
    return best[1]


def _largest_neurons(widths: Widths, budget: ParameterBudget, limit: float, multiple_of: int) -> int:
    """The largest ``F' <= F``, a multiple of ``multiple_of``, with ``P(widths with F') <= limit``."""
    without = budget.count(widths.with_(intermediate_size=0))
    if budget.per_neuron == 0:
        return widths.intermediate_size if without <= limit else 0
    neurons = int((limit - without) // (widths.num_hidden_layers * budget.per_neuron))
    return max(0, min(neurons, widths.intermediate_size)) // multiple_of * multiple_of


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest scores, in ascending index order (ties: the lower index)."""
    order = torch.argsort(-scores, stable=True)[:k]
    return sorted(int(i) for i in order)


def plan_structures(scores: StructureScores, original: Widths, new: Widths) -> PrunePlan:
    """Keep the ``num_hidden_layers`` best layers, and in each the best key/value groups and neurons."""
    kept_layers = _top(scores.layers, new.num_hidden_layers)
    rep, layers = original.heads_per_group, {}
    for i in kept_layers:
        groups = _top(scores.groups[i], new.num_key_value_heads)
        heads = [g * rep + r for g in groups for r in range(rep)]
        layers[i] = LayerPlan(groups, heads, _top(scores.neurons[i], new.intermediate_size))
    return PrunePlan(new, layers)


def _rows(indices: list[int], size: int) -> torch.Tensor:
    """Row indices of the blocks ``indices`` of ``size`` rows each: ``[b*size, (b+1)*size)`` for each ``b``."""
    return (torch.tensor(indices)[:, None] * size + torch.arange(size)[None, :]).reshape(-1)


def _slice_layer(tensors: dict[str, torch.Tensor], spec: ArchitectureSpec, plan: LayerPlan, widths: Widths) -> dict:
    """One layer's tensors (names relative to the layer) with the removed rows / columns gone."""
    heads = _rows(plan.heads, widths.head_dim)
    kv = _rows(plan.groups, widths.head_dim)
    neurons = torch.tensor(plan.neurons)
    rules = {f"{spec.query}.weight": (0, heads), f"{spec.query}.bias": (0, heads), f"{spec.out}.weight": (1, heads),
             f"{spec.ffn_out}.weight": (1, neurons)}  # fmt: skip
    for module in (spec.key, spec.value):
        rules.update({f"{module}.weight": (0, kv), f"{module}.bias": (0, kv)})
    for module in spec.ffn_in:
        rules.update({f"{module}.weight": (0, neurons), f"{module}.bias": (0, neurons)})
    out = {}
    for name, tensor in tensors.items():
        axis, index = rules.get(name, (None, None))
        out[name] = tensor if axis is None else tensor.index_select(axis, index).contiguous()
    return out


def compressed_config(config, plan: PrunePlan):
    """A copy of ``config`` with the new widths (``head_dim`` written explicitly; ``layer_types`` kept per layer)."""
    data = config.to_dict()
    widths = plan.widths
    data.update(num_hidden_layers=widths.num_hidden_layers, intermediate_size=widths.intermediate_size,
                num_attention_heads=widths.num_attention_heads)  # fmt: skip
    if "num_key_value_heads" in data or widths.num_key_value_heads != widths.num_attention_heads:
        data["num_key_value_heads"] = widths.num_key_value_heads
    if data.get("head_dim") is not None or widths.num_attention_heads != Widths.of(config).num_attention_heads:
        data["head_dim"] = widths.head_dim
    if isinstance(data.get("layer_types"), list) and len(data["layer_types"]) == config.num_hidden_layers:
        data["layer_types"] = [data["layer_types"][i] for i in plan.layers]
    return type(config).from_dict(data)


def build_pruned_model(model: nn.Module, spec: ArchitectureSpec, plan: PrunePlan, original: Widths) -> nn.Module:
    """A new instance of ``model``'s class at the compressed widths holding ``model``'s kept weights (exact)."""
    prefix = next(
        name for name, module in model.named_modules() if module is model.base_model.get_submodule(spec.layers)
    )
    state = model.state_dict()
    new_index = {old: new for new, old in enumerate(plan.layers)}
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    new_state = {}
    for key, tensor in state.items():
        if key.startswith(prefix + "."):
            layer, _, rest = key[len(prefix) + 1 :].partition(".")
            if int(layer) in new_index:
                per_layer.setdefault(int(layer), {})[rest] = tensor
        else:
            new_state[key] = tensor
    for old, tensors in per_layer.items():
        for rest, tensor in _slice_layer(tensors, spec, plan.layers[old], original).items():
            new_state[f"{prefix}.{new_index[old]}.{rest}"] = tensor
    config = compressed_config(model.config, plan)
    dtype = next(model.parameters()).dtype
    pruned = type(model)(config).to(dtype)
    pruned.load_state_dict(new_state, strict=True)
    return pruned.eval()
