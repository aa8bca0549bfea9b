"""Where an output came from, in terms the Hub understands, and recipes that travel with the output.

- :func:`hub_id` finds the Hub repo id of an input: a repo id given as such (also when it was resolved offline from
  the Hugging Face cache), a path inside the cache (``.../models--org--name/snapshots/<sha>``), or a local folder whose
  own model card's ``model-index`` name is a valid ``org/name``. The user's ``hub_ids={task: "org/name"}`` wins over
  all of these.
- :func:`portable_recipe` rewrites the recipe saved next to an output: local paths relative to the output folder, paths
  inside the Hub cache as repo ids, the known repo ids under ``hub_ids`` (a recipe read from elsewhere, e.g. after a
  download, falls back to them when a relative path does not exist). No absolute local path is written.
- :func:`hub_metadata` gives a card's ``library_name`` (``transformers``) and ``pipeline_tag`` (the base's card's,
  else its ``config.json`` architecture's).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["BASE_KEY", "TARGET_KEY", "hub_id", "hub_metadata", "locate", "pipeline_tag", "portable_recipe"]

BASE_KEY = "base_model"  # key of the base model in hub_ids (the others are task names, and TARGET_KEY)
TARGET_KEY = "target"  # key of a forgetting's edited model (forget.target) in hub_ids
_HUB_CACHE = re.compile(r"(?:^|/)models--([\w.-]+?)--([\w.-]+)/snapshots/[0-9a-f]+(?:/|$)")
_SOURCE_GROUPS = ("models", "adapters", "task_vectors")
# config.json architecture suffix -> the Hub's pipeline tag (the first match wins; bare bodies are feature extractors)
_PIPELINE_TAGS = (
    ("ForCausalLM", "text-generation"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
    ("ForImageClassification", "image-classification"),
    ("ForAudioClassification", "audio-classification"),
    ("ForMultipleChoice", "multiple-choice"),
    ("Model", "feature-extraction"),
)


def valid_repo_id(text: Any) -> str | None:
    """``text`` when it is a Hub repo id of the form ``org/name`` (or ``name``), else ``None``."""
    if not isinstance(text, str) or not text.strip() or text.startswith(("/", ".", "~", "<")):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


def from_cache_path(text: str) -> str | None:
    """``org/name`` of a path inside the Hugging Face cache (``.../models--org--name/snapshots/<sha>[/...]``)."""
    match = _HUB_CACHE.search(text.replace(os.sep, "/"))
    return f"{match.group(1)}/{match.group(2)}" if match else None


def _named_by_folder(folder: Path) -> str | None:
    """The repo id a local folder names itself by: its model card's model-index name, when that is of the form
    ``org/name`` and not a local path. (``config.json``'s ``_name_or_path`` is not used: transformers writes there the
    model a checkpoint was loaded from, for a fine-tune its parent, not the checkpoint's own repo.)"""
    card = folder / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        name = getattr(ModelCard.load(card, ignore_metadata_errors=True).data, "model_name", None)
    except (OSError, ValueError):
        return None
    if isinstance(name, str) and "/" in name and not Path(name).expanduser().exists():
        return valid_repo_id(name)
    return None


def hub_id(source: Any, folder: str | os.PathLike | None = None) -> str | None:
    """The Hub repo id of an input ``source`` (a repo id, a path, or an in-memory object), or ``None``.

    ``folder``: where the input was read from (for a repo id, its snapshot in the cache), looked at when ``source`` is
    a local path: a path inside the Hub cache gives its repo, a folder may name its repo (see the module docstring).
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str) and source.strip():
        cached = from_cache_path(source)
        if cached:
            return cached
        if not Path(source).expanduser().exists():
            return valid_repo_id(source)
    if folder is not None:
        folder = Path(folder)
        cached = from_cache_path(str(folder.resolve()))
        if cached:
            return cached
        if folder.is_file():
            folder = folder.parent
        return _named_by_folder(folder) if folder.is_dir() else None
    return None


def pipeline_tag(config: Mapping[str, Any] | None) -> str | None:
    """The Hub pipeline tag of a transformers ``config.json`` (by its first architecture), or ``None``."""
    architectures = (config or {}).get("architectures") or []
    for architecture in architectures[:1]:
        for suffix, tag in _PIPELINE_TAGS:
            if str(architecture).endswith(suffix):
                return tag
    return None


def hub_metadata(folder: str | os.PathLike | None, config: Mapping[str, Any] | None) -> dict[str, str]:
    """``library_name`` and ``pipeline_tag`` of an output over this base: ``transformers`` when the base has a config
    (outputs are transformers checkpoints: a base card's other library, e.g. ``sentence-transformers``, would promise
    files the output does not have), and the pipeline tag of the base's own card, else of its config's architecture."""
    metadata: dict[str, str] = {"library_name": "transformers"} if config else {}
    card = Path(folder) / "README.md" if folder is not None else None
    if card is not None and card.is_file():
        from huggingface_hub import ModelCard

        try:
            tag = getattr(ModelCard.load(card, ignore_metadata_errors=True).data, "pipeline_tag", None)
        except (OSError, ValueError):
            tag = None
        if isinstance(tag, str) and tag:
            metadata["pipeline_tag"] = tag
    if config and "pipeline_tag" not in metadata and pipeline_tag(config):
        metadata["pipeline_tag"] = pipeline_tag(config)
    return metadata


def _portable(value: Any, output: Path, names_only: bool = False) -> Any:
    """A local path as a path relative to ``output`` (``names_only``: its name); a path in the Hub cache as its repo
    id; other values unchanged."""
    if not isinstance(value, str | os.PathLike) or not str(value).strip():
        return value
    text = os.fspath(value)
    cached = from_cache_path(text)
    if cached:
        return cached
    path = Path(text).expanduser()
    if not path.is_absolute() and not path.exists():
        return text  # a repo id, a task name, or a relative path that does not exist here
    if names_only:
        return path.resolve().name
    return Path(os.path.relpath(path.resolve(), output.resolve())).as_posix()


def portable_recipe(
    recipe: Mapping[str, Any], output: str | os.PathLike, hub_ids: Mapping[str, str], *, names_only: bool = False
) -> dict:
    """``recipe`` (what the merger ran, with absolute paths) as saved next to ``output``: see the module docstring.
    ``hub_ids``: the repo ids known for the inputs, by :data:`BASE_KEY`, task name and :data:`TARGET_KEY`.
    ``names_only``: local inputs by their folder / file name instead of a path (a folder built in a temporary place
    only to be pushed: a path from there means nothing on the Hub)."""
    output = Path(output)
    portable = dict(recipe)
    portable[BASE_KEY] = _portable(recipe.get(BASE_KEY), output, names_only)
    for group in _SOURCE_GROUPS:
        if recipe.get(group):
            portable[group] = {task: _portable(source, output, names_only) for task, source in recipe[group].items()}
    tasks = {task for group in _SOURCE_GROUPS for task in recipe.get(group) or {}}
    forget = recipe.get("forget")
    if forget and forget.get("target") and forget["target"] not in tasks:
        portable["forget"] = {**forget, "target": _portable(forget["target"], output, names_only)}
    for key in ("importance", "statistics"):  # shipped inside the output: relative paths in any case
        if recipe.get(key):
            portable[key] = {
                task: {**entry, **{field: _portable(entry[field], output) for field in ("path", "data") if field in entry}}
                for task, entry in recipe[key].items()
            }  # fmt: skip
    known = {key: repo for key, repo in hub_ids.items() if repo}
    written = {
        BASE_KEY: portable.get(BASE_KEY),
        **{t: s for g in _SOURCE_GROUPS for t, s in (portable.get(g) or {}).items()},
    }
    if forget and TARGET_KEY in known:
        written[TARGET_KEY] = (portable.get("forget") or {}).get("target")
    extra = {key: repo for key, repo in known.items() if key in written and written[key] != repo}  # fmt: skip
    if extra:
        portable["hub_ids"] = extra
    else:
        portable.pop("hub_ids", None)
    return portable


def locate(value: str, folder: Path, fallback: str | None = None) -> str:
    """Where a recipe read from ``folder`` finds the input ``value``: an absolute path or a repo id as it is; a
    relative path next to the recipe when it exists there, else relative to the current directory when it exists
    there, else ``fallback`` (the input's repo id from ``hub_ids``) when given, else ``value`` (a repo id)."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return value
    beside = folder / path
    if beside.exists():
        return os.path.normpath(beside)
    if path.exists() or fallback is None:
        return value
    return fallback
