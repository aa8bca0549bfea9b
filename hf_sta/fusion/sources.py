"""Source models of a fusion, decomposed into components: the adapter protocol and its two implementations.

A *source* is one trained single-task model. :class:`FusionSource` is the protocol the fusion module sees: given
inputs it returns a :class:`SourceOutput` with

* ``components``: ``K`` pooled hidden states, one per component (a group of consecutive layers), each ``(batch, d_k)``;
* ``features``: ``(batch, d)``, the vector the source's own head consumes (so ``head(features)`` is its prediction);
* ``logits``: the source's own prediction, or ``None`` when it has no head.

Pooling follows the source's convention: the mean over the attention mask for encoders
(``sum_i m_i h_i / sum_i m_i``), the last non-padding token for decoders (``h_j``, ``j = max{i : m_i = 1}``).

:class:`TransformersSource` wraps a transformers model (an encoder or decoder, ``*ForSequenceClassification``, a
causal LM read through the logits of answer words, or a PEFT model on any of them) and its tokenizer: components come
from ``output_hidden_states``, the head features from a forward hook on the head. :class:`ModuleSource` wraps any
``nn.Module`` through forward hooks on named submodules.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..errors import ConfigError

logger = logging.getLogger(__name__)

Pooling = Literal["mean", "last", "first"]
POOLINGS: tuple[str, ...] = ("mean", "last", "first")

__all__ = [
    "FusionSource",
    "ModuleSource",
    "SourceOutput",
    "TransformersSource",
    "component_layers",
    "pool",
]


@dataclass
class SourceOutput:
    """What one source hands to the fusion module (all tensors have the batch as their first dimension)."""

    components: list[torch.Tensor]
    features: torch.Tensor
    logits: torch.Tensor | None = None

    def select(self, index: torch.Tensor | slice) -> SourceOutput:
        """The rows ``index`` of every tensor (for cached features)."""
        logits = None if self.logits is None else self.logits[index]
        return SourceOutput([c[index] for c in self.components], self.features[index], logits)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SourceOutput:
        """Every tensor moved to ``device`` (what ``accelerate.utils.send_to_device`` calls)."""
        move = lambda tensor: tensor.to(device, non_blocking=non_blocking)  # noqa: E731
        logits = None if self.logits is None else move(self.logits)
        return SourceOutput([move(c) for c in self.components], move(self.features), logits)

    @staticmethod
    def cat(outputs: Sequence[SourceOutput]) -> SourceOutput:
        """Concatenate along the batch dimension."""
        components = [torch.cat([o.components[k] for o in outputs]) for k in range(len(outputs[0].components))]
        logits = None if outputs[0].logits is None else torch.cat([o.logits for o in outputs])
        return SourceOutput(components, torch.cat([o.features for o in outputs]), logits)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """``(batch, length, d) -> (batch, d)``; a 2-D ``hidden`` is returned as is.

    ``mean``: ``sum_i m_i h_i / max(sum_i m_i, 1)``; ``last``: ``h_j`` with ``j`` the last position where ``m_j = 1``
    (left or right padding); ``first``: ``h_0`` (BERT's [CLS]).
    """
    if hidden.dim() == 2:
        return hidden
    if how == "first":
        return hidden[:, 0]
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    mask = attention_mask.to(hidden.device)
    if how == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    if how == "last":
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        last = (mask.long() * positions).argmax(-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ConfigError(f"Unknown pooling {how!r}; expected one of {', '.join(POOLINGS)}.")


def component_layers(num_layers: int, components: int | Sequence[int]) -> list[int]:
    """Indices into ``hidden_states`` (0 = embeddings, ``i`` = output of layer ``i``) that end each component.

    An int ``K`` splits the ``L`` layers into ``K`` groups of consecutive layers: boundaries ``round(L * k / K)``,
    ``k = 1..K`` (the last one is always ``L``). A list is taken as the boundaries themselves.
    """
    if isinstance(components, int):
        if not 1 <= components <= num_layers:
            raise ConfigError(f"components={components} must be between 1 and the number of layers ({num_layers}).")
        return sorted({round(num_layers * k / components) for k in range(1, components + 1)})
    layers = [int(i) for i in components]
    if not layers or any(not 0 <= i <= num_layers for i in layers):
        raise ConfigError(f"Component layers {layers} must be non-empty and within 0..{num_layers}.")
    return layers


class FusionSource(nn.Module):
    """The adapter protocol: subclass it (or use :class:`ModuleSource`) to fuse a plain ``nn.Module``.

    A subclass sets ``component_widths`` (``d_k`` of each component), ``feature_width`` (``d``), ``num_labels`` (or
    ``None``) and implements :meth:`forward` (``**inputs -> SourceOutput``); :meth:`tokenize` if it reads text and
    :meth:`head` if it has its own classifier (``head()(features) == logits``). :meth:`spec` is what the fused model's
    config records about it (``kind="module"``: the module itself must be passed again to ``from_pretrained``).
    """

    component_widths: list[int]
    feature_width: int
    num_labels: int | None = None

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        raise ConfigError(f"{type(self).__name__} has no tokenizer: pass tensor inputs for it (inputs={{name: ...}}).")

    def head(self) -> nn.Linear | None:
        return None

    def spec(self) -> dict[str, Any]:
        return {"kind": "module", "class": type(self).__name__}


def _linear_head(module: nn.Module) -> nn.Linear | None:
    """The ``nn.Linear`` that produces ``module``'s logits: itself, PEFT's active ``modules_to_save`` copy, or the
    last ``nn.Linear`` inside a head block (RoBERTa's ``classifier.out_proj``)."""
    saved = getattr(module, "modules_to_save", None)
    if isinstance(saved, nn.ModuleDict) and len(saved):
        active = getattr(module, "active_adapter", None)
        active = active[0] if isinstance(active, list | tuple) else active
        module = saved[active] if active in saved else next(iter(saved.values()))
    if isinstance(module, nn.Linear):
        return module
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _is_masked_lm_family(config: Any) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return getattr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES


class TransformersSource(FusionSource):
    """A transformers model (optionally a ``PeftModel``) and its tokenizer as a fusion source.

    Three ways to read its prediction, picked from the model:

    * ``label_words`` given (a causal LM posed as an instruction): ``features`` = the decoder's final hidden state at
      the last prompt token, ``head`` = the rows of the output embedding for each word's first token (``" " + w``);
    * a ``classifier`` / ``score`` head (``*ForSequenceClassification``): ``features`` = the input of its last linear
      layer, captured by a forward hook (pooled at the last non-padding token when it is per position, as decoders'
      sequence classifiers do);
    * no head: ``features`` = the pooled last hidden state; the fusion gives the task a new head.

    Args:
        model: the model (``PreTrainedModel`` or ``PeftModel``); it is frozen by the fused model.
        tokenizer: its tokenizer (a pad token is set to EOS when missing).
        components: ``K`` groups of layers or explicit ``hidden_states`` indices (see :func:`component_layers`).
        pooling: ``mean`` / ``last`` / ``first``; default ``mean`` for BERT-like encoders, ``last`` for decoders.
        label_words: answer words of a causal LM, in label order.
        prompt: template with ``{text}`` applied before tokenizing (e.g. ``"Tweet: {text}\\nSentiment:"``).
        max_length: truncation length in tokens.
        add_special_tokens: passed to the tokenizer.
        max_chars: cut each text to this many characters before the prompt is applied.
        reference: repo id or folder the model was loaded from (recorded in the fused model's config).
        adapter_name: for a ``PeftModel`` holding several adapters (sources that share one base model), the adapter
            this source is; it is activated (frozen) before every use.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        components: int | Sequence[int] = 3,
        pooling: str | None = None,
        label_words: Sequence[str] | None = None,
        prompt: str | None = None,
        max_length: int = 128,
        add_special_tokens: bool = True,
        max_chars: int | None = None,
        reference: str | None = None,
        adapter_name: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.adapter_name = adapter_name
        self._activate()
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        self.pooling = pooling or ("mean" if _is_masked_lm_family(config) else "last")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling={self.pooling!r}; expected one of {', '.join(POOLINGS)}.")
        self.layers = component_layers(config.num_hidden_layers, components)
        self.component_widths = [config.hidden_size] * len(self.layers)
        self.prompt, self.max_length, self.add_special_tokens = prompt, max_length, add_special_tokens
        self.max_chars = max_chars
        self.label_words = list(label_words) if label_words is not None else None
        self.reference = reference
        self._head_name: str | None = None  # looked up on demand: a second reference would duplicate state_dict keys
        self._answer_ids: list[int] | None = None
        if self.label_words is not None:
            self.mode = "answer"
            self._answer_ids = self._answer_token_ids(tokenizer, self.label_words)
            if base.get_output_embeddings() is None:
                raise ConfigError(
                    f"label_words need a model with an output embedding; {type(base).__name__} has none."
                )
            self.feature_width, self.num_labels = config.hidden_size, len(self.label_words)
        else:
            name = next(
                (name for name in ("classifier", "score") if isinstance(getattr(base, name, None), nn.Module)), None
            )
            linear = _linear_head(getattr(base, name)) if name is not None else None
            if linear is not None:
                self.mode, self._head_name = "head", name
                self.feature_width, self.num_labels = linear.in_features, linear.out_features
            else:
                self.mode, self.feature_width, self.num_labels = "pooled", config.hidden_size, None
        is_lm = base.get_output_embeddings() is not None and not _is_masked_lm_family(config)
        self._read_decoder = self.mode == "answer" or (self.mode == "pooled" and is_lm)

    @staticmethod
    def _answer_token_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
        ids = [tokenizer(" " + word, add_special_tokens=False).input_ids[0] for word in words]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"Two of the label words {list(words)} start with the same token; use other words.")
        return ids

    def _base(self) -> nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _activate(self) -> None:
        """Make this source's adapter the active one of a shared ``PeftModel`` (frozen: ``inference_mode``)."""
        if self.adapter_name is not None and self.model.active_adapter != self.adapter_name:
            self.model.set_adapter(self.adapter_name, inference_mode=True)

    def head(self) -> nn.Linear | None:
        """A new ``nn.Linear`` equal to the source's head (copied: training it leaves the source unchanged)."""
        self._activate()
        if self.mode == "answer":
            embedding = self._base().get_output_embeddings()
            bias = getattr(embedding, "bias", None)
            head = nn.Linear(self.feature_width, len(self._answer_ids), bias=bias is not None)
            with torch.no_grad():
                head.weight.copy_(embedding.weight[self._answer_ids])
                if bias is not None:
                    head.bias.copy_(bias[self._answer_ids])
            return head
        if self.mode == "head":
            linear = _linear_head(getattr(self._base(), self._head_name))
            head = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
            head.load_state_dict(linear.state_dict())
            return head
        return None

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise ConfigError("This source has no tokenizer: pass tensor inputs for it.")
        if self.max_chars is not None:  # cut the text, not the prompt (token truncation would drop its question)
            texts = [text[: self.max_chars].strip() for text in texts]
        if self.prompt is not None:
            texts = [self.prompt.format(text=text) for text in texts]
        encoded = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=self.add_special_tokens,
            return_tensors="pt",
        )
        return {key: encoded[key] for key in ("input_ids", "attention_mask") if key in encoded}

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> SourceOutput:
        """Run the source once; ``components[k] = pool(hidden_states[layers[k]])`` (shapes ``(batch, d)``)."""
        self._activate()
        if self._read_decoder:
            if attention_mask is not None and "position_ids" not in kwargs:
                # positions count real tokens only, so a left-padded text reads as it does unpadded
                kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            out = self._base().get_decoder()(
                input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **kwargs
            )
            components = [pool(out.hidden_states[i], attention_mask, self.pooling) for i in self.layers]
            features = pool(out.last_hidden_state, attention_mask, "last")
            if self.mode == "pooled":
                return SourceOutput(components, features)
            embedding = self._base().get_output_embeddings()
            bias = None if getattr(embedding, "bias", None) is None else embedding.bias[self._answer_ids]
            logits = nn.functional.linear(features, embedding.weight[self._answer_ids], bias)
            return SourceOutput(components, features, logits)
        captured: list[torch.Tensor] = []
        handle = None
        if self.mode == "head":
            linear = _linear_head(getattr(self._base(), self._head_name))
            handle = linear.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
        components = [pool(out.hidden_states[i], attention_mask, self.pooling) for i in self.layers]
        if self.mode == "head":
            return SourceOutput(components, pool(captured[-1], attention_mask, "last"), out.logits)
        return SourceOutput(components, pool(out.hidden_states[-1], attention_mask, self.pooling))

    def spec(self) -> dict[str, Any]:
        return {
            "kind": "transformers",
            "reference": self.reference,
            "class": type(self._base()).__name__,
            "peft": hasattr(self.model, "peft_config"),
            "components": self.layers,
            "pooling": self.pooling,
            "label_words": self.label_words,
            "prompt": self.prompt,
            "max_length": self.max_length,
            "add_special_tokens": self.add_special_tokens,
            "max_chars": self.max_chars,
        }


class ModuleSource(FusionSource):
    """Any ``nn.Module`` as a source, decomposed through forward hooks on named submodules.

    ``components[k]`` = the output of ``module.get_submodule(component_modules[k])`` (the first element of a tuple
    output), pooled with ``pooling`` when it is ``(batch, length, d)``; ``features`` = the input of ``head_module``
    (its ``nn.Linear``), else the last component; ``logits`` = the module's output when it has a head.

    Args:
        module: called as ``module(**inputs)``; returns logits (a tensor, or an object with ``.logits``).
        component_modules: names of the submodules whose outputs end each component.
        head_module: name of the submodule holding the classifier, or ``None``.
        tokenizer: ``texts -> dict of tensors`` (optional; without it pass tensor inputs).
        pooling: how 3-D outputs are pooled (``mean`` uses ``inputs["attention_mask"]`` when present).
        example_inputs: one batch used once to measure the widths ``d_k`` and ``d``.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        component_modules: Sequence[str],
        example_inputs: Mapping[str, torch.Tensor],
        head_module: str | None = None,
        tokenizer: Callable[[Sequence[str]], Mapping[str, torch.Tensor]] | None = None,
        pooling: str = "mean",
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling={pooling!r}; expected one of {', '.join(POOLINGS)}.")
        self.module, self.pooling, self._tokenizer = module, pooling, tokenizer
        self.component_modules, self.head_module = list(component_modules), head_module
        for name in [*self.component_modules, *([head_module] if head_module else [])]:
            try:
                module.get_submodule(name)
            except AttributeError as err:
                raise ConfigError(f"{type(module).__name__} has no submodule {name!r}.") from err
        linear = self._head_linear()
        self.num_labels = linear.out_features if linear is not None else None
        with torch.no_grad():
            probe = self(**example_inputs)
        self.component_widths = [c.shape[-1] for c in probe.components]
        self.feature_width = probe.features.shape[-1]

    def _head_linear(self) -> nn.Linear | None:
        if self.head_module is None:
            return None
        linear = _linear_head(self.module.get_submodule(self.head_module))
        if linear is None:
            raise ConfigError(f"head_module {self.head_module!r} holds no nn.Linear.")
        return linear

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if self._tokenizer is None:
            return super().tokenize(texts)
        return dict(self._tokenizer(texts))

    def head(self) -> nn.Linear | None:
        linear = self._head_linear()
        if linear is None:
            return None
        head = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        head.load_state_dict(linear.state_dict())
        return head

    def forward(self, **inputs: torch.Tensor) -> SourceOutput:
        outputs: dict[str, torch.Tensor] = {}
        captured: list[torch.Tensor] = []

        def keep(name: str):
            def hook(_module, _args, output):
                outputs[name] = output[0] if isinstance(output, tuple | list) else output

            return hook

        handles = [self.module.get_submodule(n).register_forward_hook(keep(n)) for n in self.component_modules]
        linear = self._head_linear()
        if linear is not None:
            handles.append(linear.register_forward_pre_hook(lambda _m, args: captured.append(args[0])))
        try:
            result = self.module(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        mask = inputs.get("attention_mask")
        components = [pool(outputs[n], mask, self.pooling) for n in self.component_modules]
        if linear is None:
            return SourceOutput(components, components[-1])
        logits = result if isinstance(result, torch.Tensor) else getattr(result, "logits", result[0])
        return SourceOutput(components, pool(captured[-1], mask, self.pooling), pool(logits, mask, self.pooling))
