"""Saving, uploading and loading a :class:`~hf_sta.fusion.model.FusedMultiTaskModel` (I/O only, no math).

Layout of a saved fused model::

    <folder>/
      fusion_config.json        FusionConfig: tasks, labels, fusion settings, one spec per source
      model.safetensors         the fusion module and heads (+ LoRA of the sources, + weights of nn.Module sources)
      sources/<task>/           only for shipped sources (save_pretrained of the model and its tokenizer)
      README.md                 model card; every source that is a Hub repo is listed in ``base_model``

A source is either *referenced* (its spec keeps the repo id or folder it was loaded from) or *shipped* (copied into
``sources/<task>/``; its spec keeps that relative path and, as ``origin``, where it first came from).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckpointError, ConfigError
from ..layout import CARD_NAME
from .config import FUSION_CONFIG_NAME, FUSION_WEIGHTS_NAME, SOURCES_FOLDER, FusionConfig
from .loading import load_transformers_sources
from .sources import FusionSource, TransformersSource

if TYPE_CHECKING:
    from .model import FusedMultiTaskModel

logger = logging.getLogger(__name__)

__all__ = ["load_fused", "push_fused", "save_fused", "ship_set", "weights_to_save"]


def ship_set(model: FusedMultiTaskModel, ship_sources: bool | Sequence[str] | None, for_hub: bool) -> set[str]:
    """Tasks whose source is copied into the folder: those asked for, those with no reference (models given in
    memory; on the Hub also local folders), and those already shipped (their only copy may not be kept)."""
    from ..card import hub_model_id

    tasks = model.tasks
    if ship_sources is True:
        return set(tasks)
    chosen: set[str] = set()
    if ship_sources not in (None, False):
        unknown = sorted(set(ship_sources) - set(tasks))
        if unknown:
            raise ConfigError(f"ship_sources names {unknown}, which are not tasks of this model ({tasks}).")
        chosen = set(ship_sources)
    for task, spec in model.config.sources.items():
        if spec["kind"] != "transformers":
            continue
        reference = spec.get("reference")
        unreachable = reference is None or (for_hub and hub_model_id(reference) is None)
        if unreachable or spec.get("shipped"):
            if ship_sources is False:
                raise ConfigError(f"Source {task!r} has no Hub reference ({reference!r}); it must be shipped.")
            chosen.add(task)
    return chosen


def weights_to_save(model: FusedMultiTaskModel) -> dict[str, torch.Tensor]:
    """The fusion module, trainable source tensors (LoRA) and every tensor of ``nn.Module`` sources."""
    trainable = {n for n, p in model.sources.named_parameters() if p.requires_grad}
    state = {}
    for key, value in model.state_dict().items():
        task = key.split(".")[1] if key.startswith("sources.") else None
        module_source = task is not None and model.config.sources[task]["kind"] == "module"
        if key.startswith("fusion.") or module_source or key[len("sources.") :] in trainable:
            state[key] = value.detach().cpu().contiguous()
    return state


def _save_source(source: TransformersSource, target: Path) -> None:
    """The source's model (its adapter alone, for one adapter of a shared ``PeftModel``) and tokenizer."""
    from ..card import hub_model_id

    if source.adapter_name is None:
        source.model.save_pretrained(target)
    else:  # PEFT writes an adapter not named "default" into a sub-folder of that name
        staging = target.parent / f".{target.name}.adapters"
        source.model.save_pretrained(staging, selected_adapters=[source.adapter_name])
        os.replace(staging / source.adapter_name, target)
        shutil.rmtree(staging)
    source.tokenizer.save_pretrained(target)
    if not hasattr(source.model, "peft_config"):
        return
    base = source.model.peft_config[source.model.active_adapter].base_model_name_or_path
    if hub_model_id(base) is None:
        logger.warning("Shipped adapter %s refers to its base by the local path %r: ship or publish the base too.", target.name, base)  # fmt: skip


def save_fused(
    model: FusedMultiTaskModel,
    save_directory: str | os.PathLike,
    *,
    ship_sources: bool | Sequence[str] | None = None,
    for_hub: bool = False,
) -> Path:
    """Write ``model`` to ``save_directory`` (see the module docstring) through a temporary sibling: an error leaves
    the folder as it was. Returns the folder."""
    from safetensors.torch import save_file

    from .card import write_fused_card

    ship = ship_set(model, ship_sources, for_hub)
    if ship and model.config.source_lora:
        raise ConfigError("Shipping sources that carry injected LoRA layers is not supported; reference them.")
    folder = Path(save_directory)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        config = copy.deepcopy(model.config)
        for task in sorted(ship):
            source = model.sources[task]
            if isinstance(source, TransformersSource):
                target = tmp / SOURCES_FOLDER / task
                _save_source(source, target)
                spec = config.sources[task]
                origin = spec.get("origin") if spec.get("shipped") else spec.get("reference")
                spec.update(reference=f"{SOURCES_FOLDER}/{task}", shipped=True, origin=origin)
        save_file(weights_to_save(model), str(tmp / FUSION_WEIGHTS_NAME), metadata={"format": "pt"})
        config.save(tmp)
        if (folder / CARD_NAME).is_file():  # update an existing card instead of overwriting it
            shutil.copy2(folder / CARD_NAME, tmp / CARD_NAME)
        write_fused_card(tmp, config, model)
        folder.mkdir(exist_ok=True)
        shutil.rmtree(folder / SOURCES_FOLDER, ignore_errors=True)
        for item in tmp.iterdir():
            os.replace(item, folder / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def push_fused(
    model: FusedMultiTaskModel,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload fused multi-task model (hf_sta)",
    ship_sources: bool | Sequence[str] | None = None,
    revision: str | None = None,
):
    """Save to a temporary folder (sources that are not Hub repos shipped) and upload it through
    :func:`hf_sta.hub.save_and_push` (the repo id checked first, the folder kept when the upload fails); returns the
    ``CommitInfo``."""
    from ..hub import save_and_push

    def save(folder: Path) -> Path:
        return save_fused(model, folder, ship_sources=ship_sources, for_hub=True)

    return save_and_push(save, repo_id, private=private, token=token, commit_message=commit_message, revision=revision)


def load_fused(
    cls: type[FusedMultiTaskModel],
    location: str | os.PathLike,
    *,
    module_sources: Mapping[str, Any] | None,
    load_kwargs: Mapping[str, Any] | None,
) -> FusedMultiTaskModel:
    """Rebuild a saved fused model (a folder or Hub repo id): its sources (referenced, shipped, or given again as
    ``module_sources``), then the fusion weights, checked key by key."""
    from safetensors.torch import load_file

    folder = _resolve_folder(location)
    config = FusionConfig.load(folder)
    given = dict(module_sources or {})
    unknown = sorted(set(given) - set(config.tasks))
    if unknown:
        raise ConfigError(f"module_sources names {unknown}, which are not tasks of '{folder}' ({config.tasks}).")
    built = _reload_sources(folder, config, given, load_kwargs)
    model = cls(built, config)
    try:
        state = load_file(str(folder / FUSION_WEIGHTS_NAME))
    except Exception as err:  # OSError, or safetensors' own error type for a corrupt file
        raise CheckpointError(f"Cannot read fusion weights '{folder / FUSION_WEIGHTS_NAME}': {err}") from err
    expected = set(weights_to_save(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"'{folder / FUSION_WEIGHTS_NAME}' does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}."
        )
    model.load_state_dict(state, strict=False)
    return model.eval()


def _reload_sources(folder: Path, config: FusionConfig, given: Mapping[str, Any], load_kwargs) -> dict[str, Any]:
    """The sources of a saved model: ``module_sources`` as given, the others from their references (shipped ones
    from ``folder``); each checked against the widths the fusion module was built on."""
    references, options = {}, {}
    for task in config.tasks:
        spec = config.sources[task]
        if task in given:
            if not isinstance(given[task], FusionSource):
                raise ConfigError(
                    f"module_sources[{task!r}] must be a FusionSource, got {type(given[task]).__name__}."
                )
        elif spec["kind"] != "transformers":
            raise ConfigError(f"Source {task!r} is a {spec.get('class')} module: pass it as module_sources={{{task!r}: ...}}.")  # fmt: skip
        else:
            references[task] = folder / spec["reference"] if spec.get("shipped") else spec["reference"]
            keys = ("components", "pooling", "label_words", "prompt", "max_chars", "max_length", "add_special_tokens")
            options[task] = {k: spec.get(k) for k in keys}
    loaded = load_transformers_sources(
        references, options, load_kwargs=load_kwargs, share_bases=config.source_lora is None
    )
    sources = {task: given[task] if task in given else loaded[task] for task in config.tasks}
    for task, source in sources.items():
        spec = config.sources[task]
        widths = (list(source.component_widths), source.feature_width)
        if widths != (list(spec["component_widths"]), spec["feature_width"]):
            raise CheckpointError(
                f"Source {task!r} has component widths {widths[0]} / feature width {widths[1]}, but the fused model "
                f"was built on {spec['component_widths']} / {spec['feature_width']}."
            )
    return sources


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
