"""Load: the task pool, i.e. the base model and the named task vectors a merger works on, with their provenance.

``open_pool`` opens checkpoints and adapters (headers and configs only), ``pool_from_task_vectors`` takes task
vectors shipped as files. Every shape check between two tensor sources goes through :func:`check_compatible`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import validate_task_name
from .errors import CheckpointError, ConfigError
from .io.checkpoints import CheckpointReader, TensorSource, fingerprint, open_checkpoint
from .lora_task_vector import LoraTaskVector
from .task_vector import CheckpointTaskVector, StoredTaskVector, TaskVector

logger = logging.getLogger(__name__)

PathOrRepo = str | os.PathLike
CheckpointInput = PathOrRepo | Mapping[str, torch.Tensor] | torch.nn.Module

__all__ = ["CheckpointInput", "PathOrRepo", "TaskPool", "check_compatible", "open_pool", "pool_from_task_vectors"]


def check_compatible(
    source: Any, reference: TensorSource, what: str, *, keys: Any = None, every: bool = False
) -> None:
    """Every tensor of ``source`` (or ``keys``) exists in ``reference`` with the same shape; with ``every``, also
    every tensor of ``reference`` exists in ``source``.

    Raises:
        CheckpointError: naming ``what``, the tensor and both shapes.
    """
    names = list(reference.keys()) if every else list(keys if keys is not None else source.keys())
    for key in names:
        if every and key not in source:
            raise CheckpointError(f"{what} has no tensor '{key}' (base tensor names expected).")
        if not every and key not in reference:
            raise CheckpointError(f"{what} has tensor '{key}', which the base does not have.")
        if tuple(source.shape(key)) != tuple(reference.shape(key)):
            raise CheckpointError(
                f"{what}: '{key}' has shape {list(source.shape(key))}, the base {list(reference.shape(key))}."
            )


def name_tasks(finetuned: Mapping[str, Any] | Sequence[Any] | None) -> dict[str, Any]:
    """``{"news": path}`` stays; a list gets names from folder / repo names (``org/news-model`` -> ``news-model``)."""
    if finetuned is None:
        return {}
    if isinstance(finetuned, Mapping):
        named = dict(finetuned)
    else:
        named = {}
        for item in finetuned:
            if not isinstance(item, str | os.PathLike):
                raise ConfigError("A list of fine-tuned models must hold paths or repo ids; pass a dict to name them.")
            name = Path(str(item).rstrip("/")).name
            if name in named:
                raise ConfigError(f"Two fine-tuned models would both be named '{name}'; pass a dict to name them.")
            named[name] = item
    for name in named:
        validate_task_name(name)
    return named


def source_name(source: Any) -> str:
    """How an input is recorded in recipes and cards: an absolute path for local folders/files (the recipe must work
    from any directory), the repo id for Hub models, ``<in-memory>`` for state dicts and modules."""
    if not isinstance(source, str | os.PathLike):
        return "<in-memory>"
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def _content_key(source: Any) -> str | None:
    """A cheap identity of a checkpoint on disk (``io.checkpoints.fingerprint``: headers, sizes, sampled bytes), or
    ``None`` for in-memory sources (hashing them would read every tensor)."""
    return fingerprint(source) if isinstance(source, CheckpointReader) else None


def _input_key(vector: TaskVector) -> str | None:
    if isinstance(vector, CheckpointTaskVector):
        return _content_key(vector.finetuned)
    if isinstance(vector, LoraTaskVector | StoredTaskVector):
        return vector.model_hash
    return None


def warn_suspicious_inputs(pool: TaskPool) -> None:
    """Log a warning for inputs that are almost always a wrong path: one checkpoint under two task names (merged
    twice), a fine-tune that is the base itself, an adapter that was never trained (its task vector is zero)."""
    base_key = _content_key(pool.base)
    seen: dict[str, str] = {}
    for task, vector in pool.task_vectors.items():
        key = _input_key(vector)
        if key is not None and key in seen:
            logger.warning(
                "Tasks '%s' and '%s' are the same checkpoint (%s): it is merged twice. A wrong path?",
                seen[key], task, pool.sources.get(task, task),
            )  # fmt: skip
        elif key is not None:
            seen[key] = task
        if isinstance(vector, CheckpointTaskVector) and key is not None and key == base_key:
            logger.warning(
                "The task vector of '%s' is zero: its checkpoint (%s) is the base model itself. A wrong path?",
                task, pool.sources.get(task, task),
            )  # fmt: skip
        elif isinstance(vector, LoraTaskVector) and vector.is_untrained():
            logger.warning(
                "The task vector of '%s' is zero: every lora_B of adapter %s is zero (an untrained adapter?).",
                task, pool.sources.get(task, task),
            )  # fmt: skip


@dataclass
class TaskPool:
    """The base ``TensorSource``, the task vectors by name, and where each came from (``sources``)."""

    base: TensorSource
    task_vectors: dict[str, TaskVector]
    sources: dict[str, str] = field(default_factory=dict)
    hub_ids: dict[str, str] = field(default_factory=dict)  # {"base" or task: Hub repo id}, where one is known

    def __post_init__(self) -> None:
        if not self.task_vectors:
            raise ConfigError("STAMerger needs at least one fine-tuned model, adapter or task vector.")
        self.task_vectors = {validate_task_name(k): v for k, v in self.task_vectors.items()}

    @property
    def tasks(self) -> list[str]:
        return list(self.task_vectors)

    @property
    def base_folder(self) -> Path | None:
        """The base's local folder when it is a transformers checkpoint (config.json), else ``None``."""
        return getattr(self.base, "folder", None) if getattr(self.base, "config", None) else None

    def vector(self, task: str) -> TaskVector:
        if task not in self.task_vectors:
            raise ConfigError(f"Unknown task '{task}'; loaded tasks: {', '.join(self.tasks)}.")
        return self.task_vectors[task]

    def task_list(self, tasks: Sequence[str] | None) -> list[str]:
        """``tasks`` checked against the loaded ones (default: all)."""
        chosen = list(tasks) if tasks is not None else self.tasks
        unknown = [t for t in chosen if t not in self.task_vectors]
        if unknown:
            raise ConfigError(
                f"Unknown task(s) {', '.join(map(repr, unknown))}; loaded tasks: {', '.join(self.tasks)}."
            )
        if not chosen:
            raise ConfigError("No task selected to merge.")
        return chosen

    def weights(self, tasks: list[str], weights: Mapping[str, float] | Sequence[float] | str | None) -> torch.Tensor:
        """Per-task weights ``[T]`` from a mapping, a list in task order, ``None`` (ones) or ``"num_samples"``."""
        if weights is None:
            return torch.ones(len(tasks))
        if weights == "num_samples":
            counts = []
            for task in tasks:
                count = getattr(self.task_vectors[task], "metadata", {}).get("num_samples")
                if count is None:
                    raise ConfigError(f"weights='num_samples': task vector '{task}' records no num_samples.")
                counts.append(float(count))
            return torch.tensor(counts) / sum(counts) * len(tasks)
        if isinstance(weights, str):
            raise ConfigError(f"weights must be a mapping, a list or 'num_samples', got {weights!r}.")
        if isinstance(weights, Mapping):
            unknown = sorted(set(weights) - set(tasks))
            if unknown:
                raise ConfigError(f"weights name task(s) not merged: {', '.join(unknown)}.")
            values = [float(weights.get(t, 1.0)) for t in tasks]
        else:
            values = [float(w) for w in weights]
            if len(values) != len(tasks):
                raise ConfigError(f"weights has {len(values)} value(s) for {len(tasks)} task(s).")
        return torch.tensor(values, dtype=torch.float32)

    def recipe_inputs(self, tasks: list[str]) -> dict[str, Any]:
        """``base_model`` and the inputs by role (``models`` / ``adapters`` / ``task_vectors``) for recipe and card."""
        inputs: dict[str, Any] = {"base_model": self.sources.get("base")}
        for task in tasks:
            vector = self.task_vectors[task]
            role = (
                "adapters"
                if isinstance(vector, LoraTaskVector)
                else "task_vectors"
                if isinstance(vector, StoredTaskVector)
                else "models"
            )
            inputs.setdefault(role, {})[task] = self.sources.get(task)
        return inputs


def _input_folder(item: Any) -> Any:
    """The file or folder a base reader / task vector reads, for :func:`hf_sta.lineage.hub_id`."""
    if isinstance(item, CheckpointTaskVector):
        item = item.finetuned
    elif isinstance(item, StoredTaskVector):
        item = item.source
    elif isinstance(item, LoraTaskVector):
        return item.path
    return getattr(item, "path", None)


def resolve_hub_ids(
    given: Mapping[str, Any], readers: Mapping[str, Any], user: Mapping[str, str] | None
) -> dict[str, str]:
    """``{"base" or task: repo id}`` of the inputs: the user's ``hub_ids`` (``base_model`` or ``base`` for the base,
    task names), else what :func:`hf_sta.lineage.hub_id` finds from the source and the folder it was read from; for a
    local base without one, the ``base_model_name_or_path`` an adapter records when it is a repo id."""
    from .hub import check_repo_id
    from .lineage import BASE_KEY, hub_id, valid_repo_id

    user = {("base" if key == BASE_KEY else key): value for key, value in (user or {}).items()}
    unknown = sorted(set(user) - set(given))
    if unknown:
        raise ConfigError(
            f"hub_ids names {', '.join(unknown)}, which are not inputs ({BASE_KEY}, {', '.join(t for t in given if t != 'base')})."
        )
    found = {key: check_repo_id(repo, f"hub_ids.{key}") for key, repo in user.items()}
    for key, source in given.items():
        if key not in found:
            repo = hub_id(source, _input_folder(readers.get(key)))
            if repo:
                found[key] = repo
    if "base" not in found:
        for vector in readers.values():
            recorded = valid_repo_id(getattr(vector, "base_model_name_or_path", None))
            if isinstance(vector, LoraTaskVector) and recorded and "/" in recorded:
                found["base"] = recorded
                break
    return found


def open_pool(
    base_model: CheckpointInput,
    finetuned: Mapping[str, CheckpointInput] | Sequence[PathOrRepo] | None,
    adapters: Mapping[str, PathOrRepo] | Sequence[PathOrRepo] | None,
    *,
    task_specific: str | Sequence[str] | None = "auto",
    hub_ids: Mapping[str, str] | None = None,
    **hub: Any,
) -> TaskPool:
    """Open the base and every fine-tuned checkpoint / PEFT LoRA adapter; ``hub``: revision, token, cache_dir;
    ``hub_ids``: the Hub repo ids of local inputs (see :func:`resolve_hub_ids`)."""
    named, named_adapters = name_tasks(finetuned), name_tasks(adapters)
    if not named and not named_adapters:
        raise ConfigError(
            "from_pretrained needs `finetuned` models and/or `adapters` (a dict name -> path/repo id, or a list)."
        )
    clash = sorted(set(named) & set(named_adapters))
    if clash:
        raise ConfigError(f"Task name(s) {', '.join(clash)} given both as fine-tuned model and as adapter.")
    base = open_checkpoint(base_model, name="base", **hub)
    task_vectors: dict[str, TaskVector] = {}
    for name, source in named.items():
        ft = open_checkpoint(source, name=name, **hub)
        task_vectors[name] = CheckpointTaskVector(base, ft, name=name, task_specific=task_specific)
        if task_vectors[name].head_keys:
            heads = task_vectors[name].head_keys
            logger.info("Task '%s': %d task-specific tensor(s) kept per task, not merged: %s", name, len(heads),
                        ", ".join(heads[:6]))  # fmt: skip
    if named_adapters:
        for name, source in named_adapters.items():
            task_vectors[name] = LoraTaskVector.from_pretrained(
                source, base, name=name, revision=hub.get("revision"), token=hub.get("token")
            )
    sources = {name: source_name(src) for name, src in {**named, **named_adapters}.items()}
    sources["base"] = source_name(base_model)
    given = {"base": base_model, **named, **named_adapters}
    ids = resolve_hub_ids(given, {"base": base, **task_vectors}, hub_ids)
    pool = TaskPool(base, task_vectors, sources, ids)
    warn_suspicious_inputs(pool)
    return pool


def pool_from_task_vectors(
    base_model: CheckpointInput,
    task_vectors: Mapping[str, PathOrRepo | TaskVector],
    hub_ids: Mapping[str, str] | None = None,
    **hub: Any,
) -> TaskPool:
    """Task vectors shipped as files (``TaskVector.save``) or objects, each checked against the base."""
    base = open_checkpoint(base_model, name="base", **hub)
    vectors: dict[str, TaskVector] = {}
    sources: dict[str, str] = {}
    for name, item in task_vectors.items():
        validate_task_name(name)
        vector = item if isinstance(item, TaskVector) else TaskVector.load(item, name=name)
        check_compatible(vector, base, f"Task vector '{name}'")
        vectors[name] = vector
        sources[name] = source_name(item) if not isinstance(item, TaskVector) else vector.name
    sources["base"] = source_name(base_model)
    given = {key: (value if isinstance(value, str | os.PathLike) else None) for key, value in task_vectors.items()}
    given["base"] = base_model if isinstance(base_model, str | os.PathLike) else None
    pool = TaskPool(base, vectors, sources, resolve_hub_ids(given, {"base": base, **vectors}, hub_ids))
    warn_suspicious_inputs(pool)
    return pool
