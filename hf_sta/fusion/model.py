"""``FusedMultiTaskModel``: heterogeneous trained single-task models fused into one multi-task model.

Data flow: load each source (its own architecture, width and tokenizer) -> decompose it into components
(``sources.py``) -> fuse the components with AKF or simple fusion (``modules.py``) -> one head per task. The sources
are registered, frozen submodules (their weights are in ``state_dict()``); only the fusion module and the heads (and,
optionally, LoRA layers injected into the sources) train. The sources always run in eval mode (no dropout).

Saved layout (``save_pretrained``)::

    <folder>/
      fusion_config.json        FusionConfig: tasks, labels, fusion settings, one spec per source
      model.safetensors         the fusion module and heads (+ LoRA of the sources, + weights of nn.Module sources)
      sources/<task>/           only for shipped sources (save_pretrained of the model and its tokenizer)
      README.md                 model card; every source that is a Hub repo is listed in ``base_model``
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from ..errors import CheckpointError, ConfigError
from ..layout import CARD_NAME
from .config import FUSION_CONFIG_NAME, FUSION_WEIGHTS_NAME, SOURCES_FOLDER, FusionConfig, check_task_names
from .modules import FUSIONS
from .sources import FusionSource, SourceOutput, TransformersSource, load_transformers_source

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
        """
        if isinstance(sources, str | os.PathLike):
            return cls._load(sources, sources=module_sources, load_kwargs=load_kwargs)
        if not isinstance(sources, Mapping):
            raise ConfigError(f"sources must be a mapping {{task: model}} or a saved folder, got {type(sources)}.")
        tasks = list(sources)
        check_task_names(tasks, "FusedMultiTaskModel.from_pretrained")
        options = dict(
            zip(_PER_TASK_OPTIONS, (num_labels, label_words, prompts, components, pooling, source_options or {}))
        )
        _check_option_tasks(tasks, {**options, "tokenizers": tokenizers})
        built = {
            task: cls._build_source(task, value, options, tokenizers or {}, max_length, load_kwargs)
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
    def _build_source(
        task: str, value: Any, options: Mapping[str, Any], tokenizers: Mapping[str, Any], max_length: int, load_kwargs
    ) -> FusionSource:
        if isinstance(value, FusionSource):
            return value
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
        reading.update(extra)
        if isinstance(value, str | os.PathLike):
            return load_transformers_source(value, task=task, load_kwargs=load_kwargs, **reading)
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

    # -- saving and loading -------------------------------------------------------------------------------------------
    def _ship_set(self, ship_sources: bool | Sequence[str] | None, for_hub: bool) -> set[str]:
        from ..card import hub_model_id

        if ship_sources is True:
            return set(self.tasks)
        if ship_sources not in (None, False):
            unknown = sorted(set(ship_sources) - set(self.tasks))
            if unknown:
                raise ConfigError(f"ship_sources names {unknown}, which are not tasks of this model ({self.tasks}).")
            chosen = set(ship_sources)
        else:
            chosen = set()
        for task, spec in self.config.sources.items():
            reference = spec.get("reference")
            if spec["kind"] == "transformers" and (reference is None or (for_hub and hub_model_id(reference) is None)):
                if ship_sources is False:
                    raise ConfigError(f"Source {task!r} has no Hub reference ({reference!r}); it must be shipped.")
                chosen.add(task)
        return chosen

    def _weights_to_save(self) -> dict[str, torch.Tensor]:
        """The fusion module, trainable source tensors (LoRA) and every tensor of ``nn.Module`` sources."""
        trainable = {n for n, p in self.sources.named_parameters() if p.requires_grad}
        state = {}
        for key, value in self.state_dict().items():
            task = key.split(".")[1] if key.startswith("sources.") else None
            module_source = task is not None and self.config.sources[task]["kind"] == "module"
            if key.startswith("fusion.") or module_source or key[len("sources.") :] in trainable:
                state[key] = value.detach().cpu().contiguous()
        return state

    def save_pretrained(
        self, save_directory: str | os.PathLike, *, ship_sources: bool | Sequence[str] | None = None, _for_hub=False
    ) -> Path:
        """Write config, fusion weights (safetensors), shipped sources and the model card; returns the folder.

        ``ship_sources``: ``True`` copies every source into ``sources/<task>/``; a list copies those; ``None`` (default)
        copies only sources with no reference (models given in memory). Written to a temporary sibling first: an
        error leaves the folder as it was.
        """
        from safetensors.torch import save_file

        from .card import write_fused_card

        ship = self._ship_set(ship_sources, _for_hub)
        if ship and self.config.source_lora:
            raise ConfigError("Shipping sources that carry injected LoRA layers is not supported; reference them.")
        folder = Path(save_directory)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            config = copy.deepcopy(self.config)
            for task in sorted(ship):
                source = self.sources[task]
                if isinstance(source, TransformersSource):
                    target = tmp / SOURCES_FOLDER / task
                    source.model.save_pretrained(target)
                    source.tokenizer.save_pretrained(target)
                    config.sources[task].update(reference=f"{SOURCES_FOLDER}/{task}", shipped=True)
            save_file(self._weights_to_save(), str(tmp / FUSION_WEIGHTS_NAME), metadata={"format": "pt"})
            config.save(tmp)
            if (folder / CARD_NAME).is_file():  # update an existing card instead of overwriting it
                shutil.copy2(folder / CARD_NAME, tmp / CARD_NAME)
            write_fused_card(tmp, config, self)
            folder.mkdir(exist_ok=True)
            shutil.rmtree(folder / SOURCES_FOLDER, ignore_errors=True)
            for item in tmp.iterdir():
                os.replace(item, folder / item.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

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
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "fused", ship_sources=ship_sources, _for_hub=True)
            api.create_repo(repo_id, private=private, exist_ok=True)
            return api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision
            )

    @classmethod
    def _load(
        cls, location: str | os.PathLike, *, sources: Mapping[str, Any] | None, load_kwargs: Mapping[str, Any] | None
    ) -> FusedMultiTaskModel:
        from safetensors.torch import load_file

        folder = _resolve_folder(location)
        config = FusionConfig.load(folder)
        given = dict(sources or {})
        unknown = sorted(set(given) - set(config.tasks))
        if unknown:
            raise ConfigError(f"module_sources names {unknown}, which are not tasks of '{folder}' ({config.tasks}).")
        built = {
            task: cls._reload_source(folder, task, config.sources[task], given, load_kwargs) for task in config.tasks
        }
        model = cls(built, config)
        try:
            state = load_file(str(folder / FUSION_WEIGHTS_NAME))
        except (OSError, Exception) as err:  # safetensors raises its own error type for corrupt files
            raise CheckpointError(f"Cannot read fusion weights '{folder / FUSION_WEIGHTS_NAME}': {err}") from err
        expected = set(model._weights_to_save())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise CheckpointError(
                f"'{folder / FUSION_WEIGHTS_NAME}' does not match the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}."
            )
        model.load_state_dict(state, strict=False)
        return model.eval()

    @staticmethod
    def _reload_source(folder: Path, task: str, spec: Mapping[str, Any], given: Mapping[str, Any], load_kwargs):
        if task in given:
            source = given[task]
            if not isinstance(source, FusionSource):
                raise ConfigError(f"module_sources[{task!r}] must be a FusionSource, got {type(source).__name__}.")
        elif spec["kind"] != "transformers":
            raise ConfigError(
                f"Source {task!r} is a {spec.get('class')} module: pass it as module_sources={{{task!r}: ...}}."
            )
        else:
            reference = folder / spec["reference"] if spec.get("shipped") else spec["reference"]
            options = {k: spec.get(k) for k in ("components", "pooling", "label_words", "prompt", "max_chars")}
            options["max_length"] = spec["max_length"]
            source = load_transformers_source(
                reference, task=task, load_kwargs=load_kwargs, add_special_tokens=spec["add_special_tokens"], **options
            )
        widths = (list(source.component_widths), source.feature_width)
        if widths != (list(spec["component_widths"]), spec["feature_width"]):
            raise CheckpointError(
                f"Source {task!r} has component widths {widths[0]} / feature width {widths[1]}, but the fused model "
                f"was built on {spec['component_widths']} / {spec['feature_width']}."
            )
        return source


def _resolve_folder(location: str | os.PathLike) -> Path:
    path = Path(location).expanduser()
    if path.is_dir():
        if not (path / FUSION_CONFIG_NAME).is_file():
            raise CheckpointError(f"'{path}' is not a fused model: it has no {FUSION_CONFIG_NAME}.")
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(os.fspath(location)))
    except Exception as err:  # offline, missing repo, bad id: all mean "cannot load"
        raise CheckpointError(f"Cannot load a fused model from {os.fspath(location)!r}: {err}") from err


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, set | tuple | list):
        return [_jsonable(v) for v in (sorted(value) if isinstance(value, set) else value)]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
