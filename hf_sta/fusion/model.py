"""``FusedMultiTaskModel``: heterogeneous trained single-task models fused into one multi-task model.

Data flow: load each source (its own architecture, width and tokenizer) -> decompose it into components
(``sources.py``) -> fuse the components with AKF or simple fusion (``modules.py``) -> one head per task. The sources
are registered, frozen submodules (their weights are in ``state_dict()``); only the fusion module and the heads (and,
optionally, LoRA layers injected into the sources) train. The sources always run in eval mode (no dropout).

Saving and loading (``save_pretrained`` / ``from_pretrained(folder)`` / ``push_to_hub``): ``serialization.py``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from ..errors import ConfigError
from .config import FusionConfig, check_task_names
from .loading import load_transformers_sources
from .modules import FUSIONS
from .sources import FusionSource, SourceOutput, TransformersSource

logger = logging.getLogger(__name__)

__all__ = ["FusedMultiTaskModel", "FusedOutput"]

SOURCE_LORA_ADAPTER = "hf_sta_fusion"
"""Adapter name of the LoRA layers ``source_lora`` adds to the sources (beside a PEFT source's own adapters)."""
_PER_TASK_OPTIONS = ("num_labels", "label_words", "prompts", "components", "pooling", "source_options")
_READING_OPTIONS = ("add_special_tokens", "max_chars", "max_length")


@dataclass
class FusedOutput(ModelOutput):
    """``logits``: ``(batch, n_task)`` of the requested task; ``task_logits``: ``{task: logits}`` of every task
    computed (all of them when ``task=None``); ``loss``: cross-entropy of ``logits`` against ``labels``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    task_logits: dict[str, torch.Tensor] | None = None


def _per_task(value: Any, task: str) -> Any:
    return value.get(task) if isinstance(value, Mapping) else value


def _check_option_tasks(tasks: Sequence[str], options: Mapping[str, Any]) -> None:
    for name, value in options.items():
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(tasks))
            if unknown:
                raise ConfigError(f"{name} names task(s) {unknown} that have no source; the tasks are {list(tasks)}.")


class FusedMultiTaskModel(nn.Module):
    """A multi-task classifier over frozen heterogeneous sources, one per task, and a trainable fusion module.

    Build one with :meth:`from_pretrained`; call it as ``model(texts=[...], task="name", labels=None)``.
    """

    def __init__(self, sources: Mapping[str, FusionSource], config: FusionConfig) -> None:
        super().__init__()
        if list(sources) != list(config.tasks):
            raise ConfigError(f"Sources {list(sources)} do not match the config's tasks {list(config.tasks)}.")
        self.config = config
        self.sources = nn.ModuleDict(dict(sources))
        self.sources.requires_grad_(False)
        if config.source_lora:
            self._inject_lora(config.source_lora)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            heads = {t: h for t in config.tasks if (h := self.sources[t].head()) is not None}
            fusion_class = FUSIONS[config.fusion]
            self.fusion = fusion_class(
                config.tasks,
                {t: self.sources[t].component_widths for t in config.tasks},
                {t: self.sources[t].feature_width for t in config.tasks},
                config.num_labels,
                heads,
                fusion_dim=config.fusion_dim,
                intra_layers=config.intra_layers,
                inter_layers=config.inter_layers,
                num_heads=config.num_heads,
                dropout=config.dropout,
                ffn_multiplier=config.ffn_multiplier,
            )
        self.sources.eval()

    # -- construction -------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        sources: Mapping[str, Any] | str | os.PathLike,
        *,
        num_labels: Mapping[str, int] | None = None,
        label_words: Mapping[str, Sequence[str]] | None = None,
        prompts: Mapping[str, str] | None = None,
        tokenizers: Mapping[str, Any] | None = None,
        components: int | Sequence[int] | Mapping[str, int | Sequence[int]] = 3,
        pooling: str | Mapping[str, str] | None = None,
        source_options: Mapping[str, Mapping[str, Any]] | None = None,
        fusion: str = "akf",
        fusion_dim: int = 128,
        intra_layers: int = 1,
        inter_layers: int = 1,
        num_heads: int = 4,
        dropout: float = 0.1,
        max_length: int = 128,
        source_lora: Any = None,
        seed: int = 0,
        load_kwargs: Mapping[str, Any] | None = None,
        module_sources: Mapping[str, FusionSource] | None = None,
        share_bases: bool = True,
    ) -> FusedMultiTaskModel:
        """Fuse ``{task: source}`` (a repo id, a folder, a PEFT adapter folder, a loaded transformers model, or a
        :class:`FusionSource`), or load a saved fused model (a folder or repo id holding ``fusion_config.json``; then
        ``module_sources={task: FusionSource}`` re-supplies ``nn.Module`` sources (their saved weights are loaded
        into them) and the other arguments are ignored).

        Args:
            num_labels: ``{task: n}`` for sources without a head (checked against the head of those that have one).
            label_words: ``{task: [word per label]}`` for causal LMs read through answer-word logits.
            prompts: ``{task: template with {text}}`` applied to that source's input text.
            tokenizers: ``{task: tokenizer}`` for loaded models given in memory.
            components: groups of layers per source (int ``K``, or ``hidden_states`` indices), or ``{task: ...}``.
            pooling: ``mean`` / ``last`` / ``first`` (default: mean for encoders, last token for decoders).
            source_options: ``{task: {option: value}}`` for how a source reads its text, as it was trained:
                ``add_special_tokens`` (bool), ``max_chars`` (cut each text before the prompt), ``max_length``.
            fusion: ``"akf"`` or ``"concat"`` (simple fusion baseline).
            fusion_dim, intra_layers, inter_layers, num_heads, dropout: AKF size (defaults: D=128, 1+1 layers, 4 heads;
                about 0.3M parameters plus projections, small next to any transformer source).
            max_length: truncation length of every source's tokenizer.
            source_lora: a ``peft.LoraConfig`` (or its dict) injected into every transformers source and trained.
            seed: initialisation seed of the fusion module.
            load_kwargs: passed to transformers' ``from_pretrained`` (default ``dtype=torch.float32``).
            share_bases: PEFT adapters (folders or repo ids) of the same base model share one copy of it (one
                ``PeftModel``, one adapter per task; not with ``source_lora``).
        """
        if isinstance(sources, str | os.PathLike):
            from .serialization import load_fused

            return load_fused(cls, sources, module_sources=module_sources, load_kwargs=load_kwargs)
        if not isinstance(sources, Mapping):
            raise ConfigError(f"sources must be a mapping {{task: model}} or a saved folder, got {type(sources)}.")
        tasks = list(sources)
        check_task_names(tasks, "FusedMultiTaskModel.from_pretrained")
        options = dict(
            zip(_PER_TASK_OPTIONS, (num_labels, label_words, prompts, components, pooling, source_options or {}))
        )
        _check_option_tasks(tasks, {**options, "tokenizers": tokenizers})
        reading = {task: cls._reading(task, options, max_length) for task in tasks}
        paths = {task: value for task, value in sources.items() if isinstance(value, str | os.PathLike)}
        share = share_bases and source_lora is None  # LoRA added to a shared base would be shared by its tasks
        loaded = load_transformers_sources(
            paths, {t: reading[t] for t in paths}, load_kwargs=load_kwargs, share_bases=share
        )
        built = {
            task: loaded[task] if task in loaded else cls._build_source(task, value, reading[task], tokenizers or {})
            for task, value in sources.items()
        }
        labels = cls._resolve_num_labels(built, num_labels or {})
        if source_lora is not None and not isinstance(source_lora, Mapping):
            source_lora = source_lora.to_dict()
        config = FusionConfig(
            tasks=tasks,
            num_labels=labels,
            fusion=fusion,
            fusion_dim=fusion_dim,
            intra_layers=intra_layers,
            inter_layers=inter_layers,
            num_heads=num_heads,
            dropout=dropout,
            seed=seed,
            sources={t: cls._spec(s) for t, s in built.items()},
            source_lora=_jsonable(source_lora),
        )
        return cls(built, config)

    @staticmethod
    def _reading(task: str, options: Mapping[str, Any], max_length: int) -> dict[str, Any]:
        """How ``task``'s source reads its input (the keyword arguments of :class:`TransformersSource`)."""
        reading = {
            "components": _per_task(options["components"], task) or 3,
            "pooling": _per_task(options["pooling"], task),
            "label_words": _per_task(options["label_words"], task),
            "prompt": _per_task(options["prompts"], task),
            "max_length": max_length,
        }
        extra = dict(options["source_options"].get(task) or {})
        unknown = sorted(set(extra) - set(_READING_OPTIONS))
        if unknown:
            raise ConfigError(f"source_options[{task!r}] has unknown option(s) {unknown}; known: {_READING_OPTIONS}.")
        return {**reading, **extra}

    @staticmethod
    def _build_source(
        task: str, value: Any, reading: Mapping[str, Any], tokenizers: Mapping[str, Any]
    ) -> FusionSource:
        """A source given in memory: a :class:`FusionSource` as is, a transformers/PEFT model with its tokenizer."""
        if isinstance(value, FusionSource):
            return value
        if isinstance(value, nn.Module) and hasattr(value, "config"):
            tokenizer = tokenizers.get(task)
            if tokenizer is None:
                raise ConfigError(f"Task {task!r}: a model given in memory needs its tokenizer in tokenizers={{...}}.")
            value.eval()
            return TransformersSource(value, tokenizer, **reading)
        raise ConfigError(
            f"Task {task!r}: a source must be a repo id, a folder, a transformers/PEFT model or a FusionSource; "
            f"got {type(value).__name__}."
        )

    @staticmethod
    def _resolve_num_labels(built: Mapping[str, FusionSource], given: Mapping[str, int]) -> dict[str, int]:
        labels = {}
        for task, source in built.items():
            own, asked = source.num_labels, given.get(task)
            if own is not None and asked is not None and own != asked:
                raise ConfigError(f"num_labels[{task!r}]={asked} but its source's head has {own} labels.")
            if own is None and asked is None:
                raise ConfigError(f"Task {task!r}: its source has no head; give num_labels={{{task!r}: n}}.")
            labels[task] = int(own if own is not None else asked)
        return labels

    @staticmethod
    def _spec(source: FusionSource) -> dict[str, Any]:
        return {
            **source.spec(),
            "component_widths": list(source.component_widths),
            "feature_width": source.feature_width,
            "shipped": False,
        }

    def _inject_lora(self, lora: Mapping[str, Any]) -> None:
        """Add a trainable LoRA adapter named :data:`SOURCE_LORA_ADAPTER` to every transformers source.

        A source that is itself a ``PeftModel`` keeps its own adapter(s) active and frozen: the new adapter is added
        beside them and every LoRA layer runs both (``W x + own(x) + fusion(x)``). Only the new adapter trains; its
        ``B`` starts at zero, so the sources predict as before until training moves it.
        """
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        config = LoraConfig(**{k: v for k, v in lora.items() if k in LoraConfig.__dataclass_fields__})
        for task, source in self.sources.items():
            if not isinstance(source, TransformersSource):
                raise ConfigError(f"source_lora applies to transformers sources only; {task!r} is not one.")
            if not hasattr(source.model, "peft_config"):
                inject_adapter_in_model(config, source.model, adapter_name=SOURCE_LORA_ADAPTER)
                continue
            own = list(source.model.active_adapters)
            source.model.add_adapter(SOURCE_LORA_ADAPTER, config)
            for module in source.model.modules():
                if isinstance(module, LoraLayer):
                    module.set_adapter([*own, SOURCE_LORA_ADAPTER])
        for name, param in self.sources.named_parameters():
            param.requires_grad_(f".{SOURCE_LORA_ADAPTER}." in name)

    # -- running ------------------------------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self.config.tasks)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def train(self, mode: bool = True) -> FusedMultiTaskModel:
        super().train(mode)
        self.sources.eval()  # frozen feature extractors: no dropout, whatever the fusion module does
        return self

    def num_parameters(self, only_trainable: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    def encode(
        self, texts: Sequence[str] | None = None, inputs: Mapping[str, Mapping[str, torch.Tensor]] | None = None
    ) -> dict[str, SourceOutput]:
        """Run every source: ``inputs[name]`` (tensors) where given, else its own tokenization of ``texts``."""
        from accelerate.utils import send_to_device

        inputs = dict(inputs or {})
        unknown = sorted(set(inputs) - set(self.sources))
        if unknown:
            raise ConfigError(f"inputs given for {unknown}, which are not sources of this model ({self.tasks}).")
        missing = [name for name in self.sources if name not in inputs]
        if texts is None and missing:
            raise ConfigError(f"No texts and no inputs for source(s) {missing}: every source must run.")
        if isinstance(texts, str):
            texts = [texts]
        device = self.device
        outputs = {}
        for name, source in self.sources.items():
            batch = inputs[name] if name in inputs else source.tokenize(texts)
            outputs[name] = source(**send_to_device(dict(batch), device))
        return outputs

    def forward(
        self,
        texts: Sequence[str] | None = None,
        task: str | None = None,
        labels: torch.Tensor | None = None,
        inputs: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        features: Mapping[str, SourceOutput] | None = None,
    ) -> FusedOutput:
        """Logits of ``task`` (every task when ``None``) for ``texts``, per-source tensor ``inputs``, or precomputed
        ``features`` (:meth:`encode`'s output; the sources are frozen, so these can be cached)."""
        if task is not None and task not in self.config.tasks:
            raise ConfigError(f"Unknown task {task!r}; this model's tasks are {self.tasks}.")
        if labels is not None and task is None:
            raise ConfigError("labels need a task: model(texts, task='name', labels=...).")
        if features is not None:
            from accelerate.utils import send_to_device

            outputs = send_to_device(dict(features), self.device)
        else:
            outputs = self.encode(texts, inputs)
        task_logits = self.fusion(outputs, [task] if task is not None else self.tasks)
        logits = task_logits[task] if task is not None else None
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, torch.as_tensor(labels, device=logits.device))
        return FusedOutput(loss=loss, logits=logits, task_logits=task_logits)

    # -- saving and loading (hf_sta/fusion/serialization.py) ---------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | os.PathLike, *, ship_sources: bool | Sequence[str] | None = None
    ) -> Path:
        """Write config, fusion weights (safetensors), shipped sources and the model card; returns the folder.

        ``ship_sources``: ``True`` copies every source into ``sources/<task>/``; a list copies those; ``None`` (default)
        copies only sources with no reference (models given in memory); ``False`` ships none (an error if one has no
        reference). Written to a temporary sibling first: an error leaves the folder as it was.
        """
        from .serialization import save_fused

        return save_fused(self, save_directory, ship_sources=ship_sources)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload fused multi-task model (hf_sta)",
        ship_sources: bool | Sequence[str] | None = None,
        revision: str | None = None,
    ):
        """Save to a temporary folder and upload it. Sources that are not Hub repos (local folders, in-memory
        models) are shipped by default so the repo is usable elsewhere. Returns the ``CommitInfo``."""
        from .serialization import push_fused

        return push_fused(
            self,
            repo_id,
            private=private,
            token=token,
            commit_message=commit_message,
            ship_sources=ship_sources,
            revision=revision,
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, set | tuple | list):
        return [_jsonable(v) for v in (sorted(value) if isinstance(value, set) else value)]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
