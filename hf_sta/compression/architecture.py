"""Which architectures can be compressed, where their prunable structures live, and how many parameters they hold.

A structure is a group of rows and columns that can be removed together while the checkpoint stays a stock
transformers one (uniform widths across layers, expressible in the config):

- an **FFN neuron** ``j`` of a layer: row ``j`` (and bias entry) of every FFN input projection (``gate_proj`` and
  ``up_proj`` for Llama, ``intermediate.dense`` for BERT) and column ``j`` of the output projection (``down_proj``,
  ``output.dense``); ``intermediate_size`` shrinks;
- a **key/value group** ``g`` of a decoder layer (explicit ``head_dim``): the ``n_rep = num_attention_heads /
  num_key_value_heads`` query heads that share it (rows ``[h * d, (h + 1) * d)`` of ``q_proj``, the same columns of
  ``o_proj``) and rows ``[g * d, (g + 1) * d)`` of ``k_proj`` and ``v_proj``; ``num_attention_heads`` and
  ``num_key_value_heads`` shrink together, so GQA stays consistent. BERT-family models compute ``head_dim =
  hidden_size / num_attention_heads``: their heads cannot be removed, only neurons and layers;
- a **layer**: every tensor of ``layers.<i>``; ``num_hidden_layers`` (and ``layer_types``) shrink.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["ArchitectureSpec", "ParameterBudget", "SUPPORTED_MODEL_TYPES", "Widths", "architecture_spec"]


@dataclass(frozen=True)
class ArchitectureSpec:
    """Module names of one architecture family, relative to the base model (``model.base_model``) and a layer."""

    layers: str
    query: str
    key: str
    value: str
    out: str
    ffn_in: tuple[str, ...]
    ffn_out: str
    embeddings: tuple[str, ...]
    heads_prunable: bool


_DECODER = ArchitectureSpec(
    layers="layers",
    query="self_attn.q_proj",
    key="self_attn.k_proj",
    value="self_attn.v_proj",
    out="self_attn.o_proj",
    ffn_in=("mlp.gate_proj", "mlp.up_proj"),
    ffn_out="mlp.down_proj",
    embeddings=("embed_tokens",),
    heads_prunable=True,
)
_ENCODER = ArchitectureSpec(
    layers="encoder.layer",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    out="attention.output.dense",
    ffn_in=("intermediate.dense",),
    ffn_out="output.dense",
    embeddings=("embeddings",),
    heads_prunable=False,
)
_SPECS = {"llama": _DECODER, "mistral": _DECODER, "qwen2": _DECODER, "qwen3": _DECODER,
          "bert": _ENCODER, "roberta": _ENCODER}  # fmt: skip
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_SPECS)


def architecture_spec(model: nn.Module) -> ArchitectureSpec:
    """The spec of ``model``'s ``config.model_type``; a :class:`ConfigError` names the supported ones otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _SPECS:
        raise ConfigError(
            f"compress: model type {model_type!r} ({type(model).__name__}) is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (decoders: heads, neurons and layers; BERT family: neurons and "
            "layers)."
        )
    return _SPECS[model_type]


@dataclass(frozen=True)
class Widths:
    """The prunable widths of a model (uniform across layers)."""

    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def of(cls, config) -> Widths:
        heads = int(config.num_attention_heads)
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return cls(int(config.num_hidden_layers), heads, kv, head_dim, int(config.intermediate_size))

    def with_(self, **changes: int) -> Widths:
        return replace(self, **changes)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class ParameterBudget:
    """Non-embedding parameter count as a function of the widths, read off the model's layer 0::

        P(L, H, G, F) = fixed + L * (layer_fixed + H * per_query_head + G * per_kv_group + F * per_neuron)

    ``fixed``: non-embedding parameters outside the layers (final norm, pooler); ``layer_fixed``: a layer's
    parameters that no structure owns (norms, output biases); ``per_query_head``: ``q_proj`` rows (+ bias) and
    ``o_proj`` columns of one head; ``per_kv_group``: ``k_proj`` and ``v_proj`` rows (+ biases) of one group;
    ``per_neuron``: one row (+ bias) of each FFN input projection and one column of the output projection.
    Non-embedding = every parameter except the input embeddings (``embed_tokens``; BERT's whole ``embeddings``
    module: word, position, token-type embeddings and their LayerNorm) and the output embeddings (``lm_head``).
    """

    fixed: int
    layer_fixed: int
    per_query_head: int
    per_kv_group: int
    per_neuron: int

    def count(self, widths: Widths) -> int:
        per_layer = (
            self.layer_fixed
            + widths.num_attention_heads * self.per_query_head
            + widths.num_key_value_heads * self.per_kv_group
            + widths.intermediate_size * self.per_neuron
        )
        return self.fixed + widths.num_hidden_layers * per_layer

    @classmethod
    def of(cls, model: nn.Module, spec: ArchitectureSpec, widths: Widths) -> ParameterBudget:
        layers = layer_list(model, spec)
        layer = layers[0]
        heads, kv = widths.num_attention_heads, widths.num_key_value_heads
        head_dim, size = widths.head_dim, widths.intermediate_size
        hidden = int(model.config.hidden_size)
        q = _numel(layer.get_submodule(spec.query))
        o = layer.get_submodule(spec.out).weight.numel()  # its bias has hidden_size entries: layer_fixed
        k_v = _numel(layer.get_submodule(spec.key)) + _numel(layer.get_submodule(spec.value))
        ffn = (
            sum(_numel(layer.get_submodule(n)) for n in spec.ffn_in) + layer.get_submodule(spec.ffn_out).weight.numel()
        )
        if q % heads or k_v % kv or ffn % size or o != hidden * heads * head_dim:
            raise ConfigError(f"compress: {type(model).__name__} layer 0 does not have the widths of its config.")
        owned = q + o + k_v + ffn
        return cls(
            fixed=non_embedding_parameters(model, spec) - sum(_numel(m) for m in layers),
            layer_fixed=_numel(layer) - owned,
            per_query_head=(q + o) // heads,
            per_kv_group=k_v // kv,
            per_neuron=ffn // size,
        )


def layer_list(model: nn.Module, spec: ArchitectureSpec) -> nn.ModuleList:
    return model.base_model.get_submodule(spec.layers)


def non_embedding_parameters(model: nn.Module, spec: ArchitectureSpec) -> int:
    """Distinct parameters of ``model`` outside the input and output embeddings (see :class:`ParameterBudget`)."""
    excluded = {id(p) for name in spec.embeddings for p in model.base_model.get_submodule(name).parameters()}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        excluded |= {id(p) for p in output.parameters()}
    seen: dict[int, torch.Tensor] = {id(p): p for p in model.parameters() if id(p) not in excluded}
    return sum(p.numel() for p in seen.values())
