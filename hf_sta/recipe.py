"""YAML recipes: everything one merge or forgetting run needs, as dataclasses (what ``hf-sta merge`` executes).

```yaml
base_model: meta-llama/Llama-3.2-1B
models:                       # full fine-tunes: task name -> folder or Hub repo id
  code: org/llama-code
  math: ./llama-math
adapters:                     # PEFT LoRA adapters of the same base
  chat: org/llama-chat-lora
task_vectors:                 # shipped task vectors (TaskVector.save)
  site1: site1/task_vector.safetensors
importance:                   # per task, for method: sta (or forget method: sta)
  code: {data: code.jsonl, text_column: text, metric: taylor, num_samples: 256, micro_batch_size: 8}
  math: {data: gsm8k, subset: main, split: "train[:512]", text_column: question}
  chat: {path: chat_importance.safetensors}
  site1: {metric: magnitude}
merge:                        # hf_sta.config.MergeConfig; method parameters may also sit directly here
  method: sta
  params: {density: 0.3}
output_dir: merged
overwrite: false
push_to_hub: {repo_id: me/llama-merged, private: true}
hub_ids: {math: org/llama-math}  # the Hub repo a local input came from (the card's base_model lineage)
```

A ``forget:`` section (:class:`ForgetConfig`) replaces ``merge:`` to forget a task. ``merge.output_format: adapter``
(with ``max_rank`` / ``energy``) or ``forget.as_adapter: true`` writes a PEFT LoRA adapter instead of a checkpoint;
the top-level ``output_format: adapter`` and ``adapter: {max_rank, energy}`` the merger records say the same. The
``hf_sta_config.yaml`` saved next to every output is such a recipe: ``hf-sta merge hf_sta_config.yaml`` runs it
again. Every bad field raises
:class:`~hf_sta.errors.ConfigError` naming it (``merge.density must be in (0, 1], got 1.5``,
``merge.dens1ty: unknown field ...``). A relative path in a recipe file is looked up next to the file first, then in
the current directory, then replaced by the input's ``hub_ids:`` entry (the recipe saved with an output names local
inputs relative to the output folder, and their Hub repo ids under ``hub_ids:``, which the model card lists as
``base_model``). :func:`run_recipe` executes a recipe (or only checks it with ``dry_run=True``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import MergeConfig, parse_dtype, validate_task_name
from .errors import CalibrationDataError, ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "ForgetConfig",
    "ImportanceConfig",
    "PushConfig",
    "Recipe",
    "RecipeResult",
    "build_merger",
    "load_calibration_data",
    "parse_merge_config",
    "run_recipe",
]

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
FORGET_METHODS = ("sta", "negation")
OUTPUT_FORMATS = ("full", "adapter")
_SOURCE_GROUPS = ("models", "adapters", "task_vectors")


# -- field checks -----------------------------------------------------------------------------------------------------
def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _mapping(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path} must be a mapping of fields, got {type(value).__name__} {value!r}")
    return {str(k): v for k, v in value.items()}


def _reject_unknown(data: Mapping[str, Any], valid: list[str], path: str, hint: str = "") -> None:
    for key in data:
        if key not in valid:
            raise ConfigError(f"{_join(path, key)}: unknown field; valid fields: {', '.join(valid)}{hint}")


def _string(value: Any, path: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{path} must be a non-empty string, got {value!r}")
    return value


def _bool(value: Any, path: str, *, optional: bool = False) -> bool | None:
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        raise ConfigError(f"{path} must be true or false, got {value!r}")
    return value


def _int(value: Any, path: str, *, low: int, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{path} must be an integer >= {low}, got {value!r}")
    return value


def _number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{path} must be a finite number, got {value!r}")
    return float(value)


def _dtype(value: Any, path: str) -> str | None:
    try:
        parse_dtype(value)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return None if value is None else str(value).removeprefix("torch.")


def _shard_size(value: Any, path: str) -> str | int:
    from .io.checkpoints import parse_size

    try:
        parse_size(value)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path}: {err}") from None
    return value


def _method_params(
    spec: Any, data: dict[str, Any], path: str, *, exclude: tuple[str, ...] = ()
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``data`` (a merge/forget section) into its own fields and the method's parameters given directly in
    it; check ``params`` and the direct ones against the registry. Returns ``(data without them, params)``."""
    allowed = {p.name: p for p in spec.parameters if p.name not in exclude} if spec is not None else {}
    params = _mapping(data.pop("params", None), _join(path, "params"))
    direct = {key: data.pop(key) for key in list(data) if key in allowed}
    for key in params:
        if key not in allowed:
            valid = ", ".join(allowed) or "(none)"
            raise ConfigError(
                f"{_join(path, 'params')}.{key}: unknown parameter of method '{spec.name if spec else 'negation'}'; "
                f"valid parameters: {valid}"
            )
    for key in direct:
        if key in params:
            raise ConfigError(f"{_join(path, key)}: given twice, here and as {_join(path, 'params')}.{key}")
    checked: dict[str, Any] = {}
    for where, values in ((_join(path, "params"), params), (path, direct)):
        for key, value in values.items():
            if value is None:  # "the method's default"
                checked[key] = None
                continue
            try:
                checked[key] = allowed[key].validate(value)
            except ValueError as err:
                raise ConfigError(f"{where}.{err}") from None
    return data, checked


RECORDED_RESULTS = ("learned", "auto")


def parse_merge_config(data: Any, path: str = "merge") -> MergeConfig:
    """A validated :class:`~hf_sta.config.MergeConfig` from a ``merge:`` mapping.

    The method's parameters go under ``params:`` or directly in the section (``merge.density: 0.3``); either way they
    are checked against the method's registered parameters, and errors name the field as it was written.
    """
    from .methods import get_merge_method

    data = _mapping(data, path)
    # what a merge measured (learned coefficients, the auto search) is recorded in the written recipe's merge
    # section; re-running that recipe starts from its inputs again, so those records are not settings
    data = {key: value for key, value in data.items() if key not in RECORDED_RESULTS}
    fields = [f.name for f in dataclasses.fields(MergeConfig)]
    method = data.get("method", MergeConfig.method)
    try:
        spec = get_merge_method(method)
    except ValueError as err:
        raise ConfigError(f"{_join(path, 'method')}: {err}") from None
    data, params = _method_params(spec, data, path)
    hint = f"; and the parameters of method '{spec.name}': {', '.join(spec.parameter_names) or '(none)'}"
    _reject_unknown(data, fields, path, hint)
    config = MergeConfig(
        method=spec.name,
        scaling=_number(data.get("scaling", spec.default_scaling), _join(path, "scaling")),
        weights=_weights(data.get("weights"), _join(path, "weights")),
        tasks=_task_list(data.get("tasks"), _join(path, "tasks")),
        params=params,
        seed=_int(data.get("seed", 0), _join(path, "seed"), low=0),
        torch_dtype=_dtype(data.get("torch_dtype"), _join(path, "torch_dtype")),
        max_shard_size=_shard_size(data.get("max_shard_size", "5GB"), _join(path, "max_shard_size")),
        output_format=_choice(data.get("output_format", "full"), _join(path, "output_format"), OUTPUT_FORMATS),
        max_rank=_int(data.get("max_rank"), _join(path, "max_rank"), low=1, optional=True),
        energy=_energy(data.get("energy"), _join(path, "energy")),
    )
    if config.output_format == "adapter" and config.max_rank is None and config.energy is None:
        raise ConfigError(f"{_join(path, 'max_rank')}: an adapter output needs max_rank or energy (LoRA ranks)")
    try:
        config.validated()
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from None
    return config


def _choice(value: Any, path: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{path} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _energy(value: Any, path: str) -> float | None:
    if value is None:
        return None
    energy = _number(value, path)
    if not 0.0 < energy <= 1.0:
        raise ConfigError(f"{path} must be in (0, 1], got {value!r}")
    return energy


def _weights(value: Any, path: str) -> dict[str, float] | list[float] | str | None:
    if value is None:
        return None
    if value == "num_samples":
        return value
    if isinstance(value, Mapping):
        return {str(task): _number(weight, f"{path}.{task}") for task, weight in value.items()}
    if isinstance(value, list):
        return [_number(weight, f"{path}[{index}]") for index, weight in enumerate(value)]
    raise ConfigError(f"{path} must be a mapping task -> weight, a list, or 'num_samples', got {value!r}")


def _hub_ids(value: Any, tasks: list[str]) -> dict[str, str]:
    from .hub import check_repo_id
    from .lineage import BASE_KEY, TARGET_KEY

    ids = {}
    for key, repo in _mapping(value, "hub_ids").items():
        if key not in (BASE_KEY, TARGET_KEY, *tasks):
            raise ConfigError(
                f"hub_ids.{key}: not an input; keys: {BASE_KEY}, {TARGET_KEY} or a task ({', '.join(tasks)})"
            )
        ids[key] = check_repo_id(repo, f"hub_ids.{key}")
    return ids


def _task_list(value: Any, path: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{path} must be a non-empty list of task names, got {value!r}")
    return [_string(task, f"{path}[{index}]") for index, task in enumerate(value)]


# -- sections ---------------------------------------------------------------------------------------------------------
@dataclass
class ForgetConfig:
    """Forget ``task``: ``theta' = theta - scaling * m_f * tau_f`` (see :meth:`hf_sta.STAMerger.forget`).

    Args:
        task: the task to forget (a name from ``models`` / ``adapters`` / ``task_vectors``).
        method: ``"sta"`` (subtract the task's important entries; needs its importance) or ``"negation"``.
        scaling: how much of the (selected) task vector to subtract.
        target: the model to edit: ``None`` (the base), a task's name (its fine-tuned model) or a checkpoint folder /
            repo id with the base's tensor names (e.g. a merged model).
        params: STA's selection parameters (``threshold``, ``density``, ``density_scope``, ``normalize``); they may
            also sit directly in the section.
        torch_dtype: output dtype of floating tensors (default: the base's).
        max_shard_size: output shard budget.
        as_adapter: write the edit ``-scaling * m_f * tau_f`` as a PEFT LoRA adapter over the base (reversible:
            disable the adapter to restore the model); ``target`` must then be empty.
        max_rank, energy: LoRA rank of each module of the adapter (``max_rank``, or the smallest rank keeping
            ``energy`` of the squared singular values).
    """

    task: str
    method: str = "sta"
    scaling: float = 1.0
    target: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    torch_dtype: str | None = None
    max_shard_size: str | int = "5GB"
    as_adapter: bool = False
    max_rank: int | None = None
    energy: float | None = 0.999

    @classmethod
    def from_dict(cls, data: Any, path: str = "forget") -> ForgetConfig:
        from .methods import get_merge_method

        data = _mapping(data, path)
        method = data.get("method", "sta")
        if method not in FORGET_METHODS:
            raise ConfigError(f"{_join(path, 'method')} must be one of {', '.join(FORGET_METHODS)}, got {method!r}")
        spec = get_merge_method("sta") if method == "sta" else None
        data, params = _method_params(spec, data, path, exclude=("overlap",))
        if method == "negation" and any(v is not None for v in params.values()):
            raise ConfigError(f"{_join(path, 'params')}: method 'negation' takes no selection parameters")
        fields = [f.name for f in dataclasses.fields(cls)]
        hint = "; and STA's selection parameters: threshold, density, density_scope, normalize" if spec else ""
        _reject_unknown(data, fields, path, hint)
        if "task" not in data:
            raise ConfigError(f"{_join(path, 'task')}: required (the task to forget)")
        if data.get("as_adapter") and data.get("target") is not None:
            raise ConfigError(
                f"{_join(path, 'target')}: an adapter (as_adapter) edits the base model; leave target empty"
            )
        return cls(
            task=validate_task_name(_string(data["task"], _join(path, "task"))),
            method=method,
            scaling=_number(data.get("scaling", 1.0), _join(path, "scaling")),
            target=_string(data.get("target"), _join(path, "target"), optional=True),
            params=params,
            torch_dtype=_dtype(data.get("torch_dtype"), _join(path, "torch_dtype")),
            max_shard_size=_shard_size(data.get("max_shard_size", "5GB"), _join(path, "max_shard_size")),
            as_adapter=_bool(data.get("as_adapter", False), _join(path, "as_adapter")),
            max_rank=_int(data.get("max_rank"), _join(path, "max_rank"), low=1, optional=True),
            energy=_energy(data.get("energy", 0.999), _join(path, "energy")),
        )


@dataclass
class ImportanceConfig:
    """Where one task's importance comes from: calibration ``data``, or a saved file (``path``).

    Args:
        data: a local ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file, or a ``datasets.load_dataset`` name.
        split: the split (or slice, ``"train[:512]"``) to load.
        subset: the dataset configuration name (``load_dataset(data, subset)``).
        text_column: column of raw text (ignored when the data has ``input_ids``).
        label_column: column of class labels (classifiers; causal LMs use next-token loss).
        metric: ``taylor`` (``|theta * g|``, the paper's), ``taylor_delta``, ``fisher`` or ``magnitude`` (no data).
        num_samples: calibration samples used (the first ones, in order).
        micro_batch_size: samples per gradient (``1`` gives per-sample scores).
        max_length: truncation length when tokenizing.
        torch_dtype: dtype of the model during the backward pass (default: the checkpoint's).
        path: an importance file saved by ``STAMerger.save_importance`` / ``hf-sta importance``; excludes ``data``.
    """

    data: str | None = None
    split: str = "train"
    subset: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    metric: str = "taylor"
    num_samples: int | None = 256
    micro_batch_size: int = 8
    max_length: int = 512
    torch_dtype: str | None = None
    path: str | None = None

    @classmethod
    def from_dict(cls, data: Any, path: str = "importance") -> ImportanceConfig:
        from .importance import GRADIENT_STATISTIC, check_metric

        data = _mapping(data, path)
        _reject_unknown(data, [f.name for f in dataclasses.fields(cls)], path)
        metric = data.get("metric", "taylor")
        try:
            check_metric(metric)
        except ValueError as err:
            raise ConfigError(f"{_join(path, 'metric')}: {err}") from None
        config = cls(
            data=_string(data.get("data"), _join(path, "data"), optional=True),
            split=_string(data.get("split", "train"), _join(path, "split")),
            subset=_string(data.get("subset"), _join(path, "subset"), optional=True),
            text_column=_string(data.get("text_column", "text"), _join(path, "text_column")),
            label_column=_string(data.get("label_column", "label"), _join(path, "label_column")),
            metric=metric,
            num_samples=_int(data.get("num_samples", 256), _join(path, "num_samples"), low=1, optional=True),
            micro_batch_size=_int(data.get("micro_batch_size", 8), _join(path, "micro_batch_size"), low=1),
            max_length=_int(data.get("max_length", 512), _join(path, "max_length"), low=1),
            torch_dtype=_dtype(data.get("torch_dtype"), _join(path, "torch_dtype")),
            path=_string(data.get("path"), _join(path, "path"), optional=True),
        )
        if config.path is not None and config.data is not None:
            raise ConfigError(f"{_join(path, 'path')}: give either path (a saved importance file) or data, not both")
        if config.path is None and config.data is None and GRADIENT_STATISTIC[metric] is not None:
            raise ConfigError(
                f"{_join(path, 'data')}: required for metric '{metric}' (a data file or dataset name); or give path: "
                "of a saved importance file, or metric: magnitude"
            )
        return config

    def to_dict(self) -> dict[str, Any]:
        """Only the fields that differ from the defaults (short recipes)."""
        defaults = ImportanceConfig()
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(defaults, f.name)
        }


@dataclass
class PushConfig:
    """Upload the result to the Hub as one commit (``create_repo(exist_ok=True)`` + ``upload_folder``).

    Args:
        repo_id: ``user/name`` or ``org/name``.
        private: create the repo private (an existing repo keeps its visibility).
        create_pr: open a pull request instead of committing to the branch.
        revision: the branch to commit to (created when missing; default ``main``).
        commit_message: the commit title.
    """

    repo_id: str
    private: bool | None = None
    create_pr: bool = False
    revision: str | None = None
    commit_message: str | None = None

    @classmethod
    def from_dict(cls, data: Any, path: str = "push_to_hub") -> PushConfig:
        if isinstance(data, str):
            data = {"repo_id": data}
        data = _mapping(data, path)
        _reject_unknown(data, [f.name for f in dataclasses.fields(cls)], path)
        if "repo_id" not in data:
            raise ConfigError(f"{_join(path, 'repo_id')}: required")
        from .hub import check_repo_id

        repo_id = check_repo_id(_string(data["repo_id"], _join(path, "repo_id")), _join(path, "repo_id"))
        return cls(
            repo_id=repo_id,
            private=_bool(data.get("private"), _join(path, "private"), optional=True),
            create_pr=_bool(data.get("create_pr", False), _join(path, "create_pr")),
            revision=_string(data.get("revision"), _join(path, "revision"), optional=True),
            commit_message=_string(data.get("commit_message"), _join(path, "commit_message"), optional=True),
        )

    def push(self, folder: str | os.PathLike, *, token: str | bool | None = None):
        """Upload ``folder`` (an hf_sta output or any model folder) with :func:`hf_sta.hub.push_folder`; returns the
        ``CommitInfo``."""
        from .hub import push_folder

        return push_folder(folder, self.repo_id, token=token, **self.options())

    def options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`hf_sta.hub.push_folder` other than the folder, repo id and token."""
        return {
            "private": self.private,
            "create_pr": self.create_pr,
            "revision": self.revision,
            "commit_message": self.commit_message,
        }


# -- the recipe -------------------------------------------------------------------------------------------------------
@dataclass
class Recipe:
    """One merge (``merge``) or forgetting (``forget``) run, as written in a YAML recipe.

    Args:
        base_model: the common base model (folder or Hub repo id).
        models: full fine-tunes, task name -> folder or repo id.
        adapters: PEFT LoRA adapters of the base, task name -> folder or repo id.
        task_vectors: shipped task vectors (``TaskVector.save`` files), task name -> file.
        importance: per task, how to get its importance (:class:`ImportanceConfig`).
        merge: how to merge (:class:`~hf_sta.config.MergeConfig`); exclusive with ``forget``.
        forget: what to forget (:class:`ForgetConfig`); exclusive with ``merge``.
        output_dir: where to write the result.
        overwrite: replace a non-empty ``output_dir``.
        push_to_hub: upload the result (:class:`PushConfig`, or just a repo id).
        trust_remote_code: allow custom model code (``auto_map``) when loading models; a YAML file cannot set it
            by itself (see :meth:`from_yaml`).
        output_format: ``"adapter"`` writes a PEFT LoRA adapter instead of a full checkpoint (as the merger records
            it; ``merge.output_format`` / ``forget.as_adapter`` say the same).
        adapter: the adapter's ``max_rank`` / ``energy`` (defaults for the section's own), and what the merger
            recorded about the factorisation (kept as information).
        hub_ids: the Hub repo ids of inputs given as local paths (keys ``base_model``, task names, ``target`` for
            ``forget.target``): the model card lists them as ``base_model`` lineage, and a recipe read from a folder
            where a relative path does not exist falls back to them (see :meth:`from_yaml`).
    """

    base_model: str
    models: dict[str, str] = field(default_factory=dict)
    adapters: dict[str, str] = field(default_factory=dict)
    task_vectors: dict[str, str] = field(default_factory=dict)
    importance: dict[str, ImportanceConfig] = field(default_factory=dict)
    merge: MergeConfig | None = None
    forget: ForgetConfig | None = None
    output_dir: str | None = None
    overwrite: bool = False
    push_to_hub: PushConfig | None = None
    trust_remote_code: bool = False
    output_format: str = "full"
    adapter: dict[str, Any] = field(default_factory=dict)
    hub_ids: dict[str, str] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        """Every input task, in the order models, adapters, task vectors."""
        return [*self.models, *self.adapters, *self.task_vectors]

    @property
    def operation(self) -> str:
        return "forget" if self.forget is not None else "merge"

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        """Build and validate a recipe; every error names its field."""
        data = _mapping(data, "recipe")
        _reject_unknown(data, [f.name for f in dataclasses.fields(cls)], "")
        if "base_model" not in data:
            raise ConfigError("base_model: required (the common base model: a folder or Hub repo id)")
        base_model = _string(data["base_model"], "base_model")
        groups = _source_groups(data)
        tasks = [task for group in groups.values() for task in group]
        if not tasks:
            raise ConfigError("models: the recipe has no input (models, adapters or task_vectors)")
        if ("merge" in data) == ("forget" in data):
            raise ConfigError("merge: a recipe needs exactly one of a merge: or a forget: section")
        output_format = _choice(data.get("output_format", "full"), "output_format", OUTPUT_FORMATS)
        adapter = _mapping(data.get("adapter"), "adapter")
        adapter_options = {
            "max_rank": _int(adapter.get("max_rank"), "adapter.max_rank", low=1, optional=True),
            "energy": _energy(adapter.get("energy"), "adapter.energy"),
        }
        merge = forget = None
        if "merge" in data:
            merge, needs_importance = _merge_section(data["merge"], output_format, adapter_options, tasks)
            output_format = merge.output_format
        else:
            forget, needs_importance = _forget_section(data["forget"], output_format, adapter_options, tasks)
            output_format = "adapter" if forget.as_adapter else "full"
        importance = _importance_section(data.get("importance"), tasks, needs_importance, merge)
        push = data.get("push_to_hub")
        return cls(
            base_model=base_model,
            models=groups["models"],
            adapters=groups["adapters"],
            task_vectors=groups["task_vectors"],
            importance=importance,
            merge=merge,
            forget=forget,
            output_dir=_string(data.get("output_dir"), "output_dir", optional=True),
            overwrite=_bool(data.get("overwrite", False), "overwrite"),
            push_to_hub=PushConfig.from_dict(push) if push is not None else None,
            trust_remote_code=_bool(data.get("trust_remote_code", False), "trust_remote_code"),
            output_format=output_format,
            adapter=adapter if output_format == "adapter" else {},
            hub_ids=_hub_ids(data.get("hub_ids"), tasks),
        )

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, *, trust_remote_code: bool = False) -> Recipe:
        """Read and validate a YAML recipe. A relative path in it is looked up next to the recipe file first (the
        recipe saved with an output names its inputs relative to the output folder), then in the current directory,
        then replaced by the input's ``hub_ids`` entry (:meth:`located`). Recipes are shared next to pushed models,
        so a file cannot enable remote code by itself: ``trust_remote_code: true`` in it is refused unless the
        caller passes ``trust_remote_code=True`` (``hf-sta merge --trust-remote-code``), and the caller's value is
        what the recipe runs with."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Recipe '{path}' does not exist.")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"'{path}' is not valid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"'{path}' must hold a mapping of fields, got {type(data).__name__}")
        recipe = cls.from_dict(data).located(path.parent)
        if recipe.trust_remote_code and not trust_remote_code:
            raise ConfigError(
                f"trust_remote_code: '{path}' sets trust_remote_code: true, which would run the checkpoints' own Python "
                "code; a recipe cannot enable that by itself: pass --trust-remote-code (Recipe.from_yaml(path, "
                "trust_remote_code=True)) if you trust every model it names"
            )
        return dataclasses.replace(recipe, trust_remote_code=bool(trust_remote_code))

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data; :meth:`from_dict` of it gives an equal recipe. Empty sections are left out."""
        data: dict[str, Any] = {"base_model": self.base_model}
        for group in _SOURCE_GROUPS:
            if getattr(self, group):
                data[group] = dict(getattr(self, group))
        if self.importance:
            data["importance"] = {task: config.to_dict() for task, config in self.importance.items()}
        if self.merge is not None:
            data["merge"] = dataclasses.asdict(self.merge)
        if self.forget is not None:
            data["forget"] = dataclasses.asdict(self.forget)
        if self.output_dir is not None:
            data["output_dir"] = self.output_dir
        if self.overwrite:
            data["overwrite"] = True
        if self.push_to_hub is not None:
            data["push_to_hub"] = {
                k: v for k, v in dataclasses.asdict(self.push_to_hub).items() if v not in (None, False)
            }
        if self.trust_remote_code:
            data["trust_remote_code"] = True
        if self.output_format == "adapter":
            data["output_format"] = "adapter"
            if self.adapter:
                data["adapter"] = dict(self.adapter)
        if self.hub_ids:
            data["hub_ids"] = dict(self.hub_ids)
        return data

    def located(self, folder: str | os.PathLike) -> Recipe:
        """This recipe with its relative paths resolved for a recipe file in ``folder`` (:func:`hf_sta.lineage.locate`:
        next to the recipe first, then the current directory, then the input's ``hub_ids`` entry)."""
        from .lineage import BASE_KEY, TARGET_KEY, locate

        folder = Path(folder)
        ids = self.hub_ids
        changes: dict[str, Any] = {"base_model": locate(self.base_model, folder, ids.get(BASE_KEY))}
        for group in _SOURCE_GROUPS:
            changes[group] = {task: locate(src, folder, ids.get(task)) for task, src in getattr(self, group).items()}
        changes["importance"] = {
            task: dataclasses.replace(
                config,
                path=locate(config.path, folder) if config.path else None,
                data=locate(config.data, folder) if config.data and Path(config.data).suffix else config.data,
            )
            for task, config in self.importance.items()
        }
        if self.forget is not None and self.forget.target and self.forget.target not in self.tasks:
            target = locate(self.forget.target, folder, ids.get(TARGET_KEY))
            changes["forget"] = dataclasses.replace(self.forget, target=target)
        return dataclasses.replace(self, **changes)

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def validated(self) -> Recipe:
        """A checked copy (recipes built in Python are checked like YAML ones)."""
        return Recipe.from_dict(self.to_dict())


# -- running ----------------------------------------------------------------------------------------------------------
@dataclass
class RecipeResult:
    """What :func:`run_recipe` did: the merger (with its importance), the output folder, the Hub commit."""

    merger: Any
    output_dir: Path | None
    commit: Any = None
    dry_run: bool = False
    summary: dict[str, Any] = field(default_factory=dict)


def _source_groups(data: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """``{group: {task: source}}`` of a recipe's ``models`` / ``adapters`` / ``task_vectors``; a task once only."""
    groups: dict[str, dict[str, str]] = {}
    seen: dict[str, str] = {}
    for group in _SOURCE_GROUPS:
        groups[group] = {}
        for task, source in _mapping(data.get(group), group).items():
            where = f"{group}.{task}"
            try:
                validate_task_name(task)
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
            if task in seen:
                raise ConfigError(f"{where}: task '{task}' is also defined in {seen[task]}")
            if source is None:
                raise ConfigError(f"{where}: no source given (a folder, file or Hub repo id)")
            groups[group][task] = _string(source, where)
            seen[task] = group
    return groups


def _with_adapter_defaults(section: dict[str, Any], flag: str, value: Any, adapter_options: Mapping) -> dict:
    """The top-level ``output_format: adapter`` and ``adapter:`` options fill a section's own (``flag``)."""
    section.setdefault(flag, value)
    for key, option in adapter_options.items():
        if option is not None:
            section.setdefault(key, option)
    return section


def _merge_section(
    data: Any, output_format: str, adapter_options: Mapping, tasks: list[str]
) -> tuple[MergeConfig, list[str]]:
    """The ``merge:`` section, checked against the recipe's tasks; returns it and the tasks needing importance."""
    from .methods import get_merge_method

    section = _mapping(data, "merge")
    if output_format == "adapter":
        _with_adapter_defaults(section, "output_format", "adapter", adapter_options)
    merge = parse_merge_config(section, "merge")
    for index, task in enumerate(merge.tasks or []):
        if task not in tasks:
            raise ConfigError(f"merge.tasks[{index}]: unknown task '{task}'; inputs: {', '.join(tasks)}")
    merged = merge.tasks or tasks
    if isinstance(merge.weights, dict):
        for task in merge.weights:
            if task not in merged:
                raise ConfigError(f"merge.weights.{task}: not a merged task ({', '.join(merged)})")
    elif isinstance(merge.weights, list) and len(merge.weights) != len(merged):
        raise ConfigError(
            f"merge.weights has {len(merge.weights)} value(s) for {len(merged)} merged task(s) ({', '.join(merged)})"
        )
    return merge, list(merged) if get_merge_method(merge.method).requires_importance else []


def _forget_section(
    data: Any, output_format: str, adapter_options: Mapping, tasks: list[str]
) -> tuple[ForgetConfig, list[str]]:
    """The ``forget:`` section, checked against the recipe's tasks; returns it and the tasks needing importance."""
    section = _mapping(data, "forget")
    if output_format == "adapter":
        _with_adapter_defaults(section, "as_adapter", True, adapter_options)
    forget = ForgetConfig.from_dict(section, "forget")
    if forget.task not in tasks:
        raise ConfigError(f"forget.task: unknown task '{forget.task}'; inputs: {', '.join(tasks)}")
    return forget, [forget.task] if forget.method == "sta" else []


def _importance_section(
    data: Any, tasks: list[str], needs_importance: list[str], merge: MergeConfig | None
) -> dict[str, ImportanceConfig]:
    """The ``importance:`` section; every task the method needs must have an entry."""
    importance = {}
    for task, config in _mapping(data, "importance").items():
        if task not in tasks:
            raise ConfigError(f"importance.{task}: unknown task; inputs: {', '.join(tasks)}")
        importance[task] = ImportanceConfig.from_dict(config, f"importance.{task}")
    for task in needs_importance:
        if task not in importance:
            method = merge.method if merge is not None else "sta"
            raise ConfigError(
                f"importance.{task}: method '{method}' needs the importance of task '{task}' (give data:, path: "
                "of a saved importance file, or metric: magnitude)"
            )
    return importance


def load_calibration_data(config: ImportanceConfig):
    """The calibration ``datasets.Dataset`` of an :class:`ImportanceConfig` (:func:`load_data`)."""
    return load_data(config.data, config.split, config.subset, field="importance.data", what="Calibration data")


def load_data(data: str | None, split: str, subset: str | None = None, *, field: str, what: str = "Data"):
    """A ``datasets.Dataset``: a local file by its suffix (:data:`DATA_FILE_BUILDERS`), else a Hub dataset by name
    (``load_dataset(data, subset, split=split)``). ``field`` / ``what`` name the argument in errors."""
    import datasets

    if data is None:
        raise ConfigError(f"{field}: no {what.lower()} given")
    path = Path(data).expanduser()
    builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
    if builder is not None or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"{what} file '{path}' does not exist.")
        if builder is None:
            raise ConfigError(
                f"{field}: '{path}' has an unsupported format; use one of {', '.join(DATA_FILE_BUILDERS)}"
            )
        if path.stat().st_size == 0:
            raise CalibrationDataError(f"{what} file '{path}' is empty.")
        try:
            return datasets.load_dataset(builder, data_files=str(path), split=split)
        except (datasets.exceptions.DatasetGenerationError, StopIteration, ValueError) as err:
            cause = err.__cause__ or err.__context__ or err
            detail = " ".join(str(cause).split()) or type(cause).__name__
            raise CalibrationDataError(f"{what} file '{path}' cannot be read as {builder}: {detail}") from err
    return datasets.load_dataset(data, subset, split=split)


def build_merger(recipe: Recipe):
    """Open the base and every input lazily (headers and configs only), as ``STAMerger.from_pretrained`` does."""
    from .io.checkpoints import open_checkpoint
    from .merger import STAMerger
    from .task_vector import CheckpointTaskVector

    if not recipe.task_vectors:
        extra = {"adapters": dict(recipe.adapters)} if recipe.adapters else {}
        return STAMerger.from_pretrained(
            recipe.base_model, dict(recipe.models) or None, trust_remote_code=recipe.trust_remote_code,
            hub_ids=_pool_hub_ids(recipe), **extra,
        )  # fmt: skip
    # Shipped task vectors go through from_task_vectors, with the fine-tunes and adapters as task vector objects on
    # one shared base reader.
    base = open_checkpoint(recipe.base_model, name="base")
    vectors: dict[str, Any] = {}
    for task, source in recipe.models.items():
        vectors[task] = CheckpointTaskVector(base, open_checkpoint(source, name=task), name=task)
    if recipe.adapters:
        from .lora_task_vector import LoraTaskVector

        for task, source in recipe.adapters.items():
            vectors[task] = LoraTaskVector.from_pretrained(source, base, name=task)
    vectors.update(recipe.task_vectors)
    merger = STAMerger.from_task_vectors(
        base, vectors, trust_remote_code=recipe.trust_remote_code, hub_ids=_pool_hub_ids(recipe)
    )
    merger.sources.update({"base": recipe.base_model, **recipe.models, **recipe.adapters, **recipe.task_vectors})
    return merger


def _pool_hub_ids(recipe: Recipe) -> dict[str, str]:
    """The recipe's ``hub_ids`` of the base and the tasks (the forget target's is read by the writer)."""
    from .lineage import TARGET_KEY

    return {key: repo for key, repo in recipe.hub_ids.items() if key != TARGET_KEY}


def _check_importance(merger: Any, task: str, config: ImportanceConfig) -> None:
    """Dry run: a saved file is opened and checked against the task (headers only); a data file must exist."""
    if config.path is not None:
        merger.load_importance(task, config.path)
        return
    if config.data is None:
        return
    path = Path(config.data).expanduser()
    if path.suffix.lower() in DATA_FILE_BUILDERS or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"importance.{task}.data: calibration data file '{path}' does not exist.")
    else:
        logger.info("importance.%s.data: '%s' is taken as a Hub dataset name (not fetched in a dry run).", task, path)


def compute_task_importance(merger: Any, task: str, config: ImportanceConfig, *, show_progress: bool = True):
    """``merger.compute_importance`` for one task as its :class:`ImportanceConfig` says (data loaded here)."""
    data = load_calibration_data(config) if config.data is not None else None
    return merger.compute_importance(
        task,
        data,
        metric=config.metric,
        num_samples=config.num_samples,
        micro_batch_size=config.micro_batch_size,
        torch_dtype=config.torch_dtype,
        text_column=config.text_column,
        label_column=config.label_column,
        max_length=config.max_length,
        show_progress=show_progress,
    )


def prepare_importance(merger: Any, recipe: Recipe, *, show_progress: bool = True) -> None:
    """Load or compute the importance of every task the recipe configures."""
    for task, config in recipe.importance.items():
        if config.path is not None:
            merger.load_importance(task, config.path)
        else:
            compute_task_importance(merger, task, config, show_progress=show_progress)


def _summary(recipe: Recipe, merger: Any) -> dict[str, Any]:
    section = recipe.merge if recipe.merge is not None else recipe.forget
    return {
        "operation": recipe.operation,
        "base_model": recipe.base_model,
        "tasks": merger.tasks,
        "tensors": len(merger.base.keys()),
        "method": section.method,
        "params": {k: v for k, v in section.params.items() if v is not None},
        "importance": {task: (c.path or c.data or c.metric) for task, c in recipe.importance.items()},
        "output_format": recipe.output_format,
        "output_dir": recipe.output_dir,
        "push_to_hub": recipe.push_to_hub.repo_id if recipe.push_to_hub else None,
    }


def run_recipe(recipe: Recipe, dry_run: bool = False):
    """Execute ``recipe``: open the inputs, get the importance, merge or forget into ``output_dir``, push.

    With ``dry_run=True`` nothing is computed or written: the recipe is validated, every checkpoint is opened (shapes
    and architectures are checked from headers, no weights read), saved importance files are checked against their
    tasks, data files must exist, and ``output_dir`` must be usable. Returns a :class:`RecipeResult`.
    """
    from .io.checkpoints import check_output_dir

    recipe = recipe.validated()
    if recipe.output_dir is None and recipe.push_to_hub is None and not dry_run:
        raise ConfigError("output_dir: required (where to write the result), unless push_to_hub is set")
    if recipe.output_dir is not None:
        check_output_dir(recipe.output_dir, recipe.overwrite)
    merger = build_merger(recipe)
    if recipe.forget is not None and recipe.forget.target and recipe.forget.target not in recipe.tasks:
        from .forgetting import forget_target

        forget_target(merger.pool, recipe.forget.target)
    summary = _summary(recipe, merger)
    if dry_run:
        for task, config in recipe.importance.items():
            _check_importance(merger, task, config)
        logger.info("Dry run: the recipe is valid; nothing was written.")
        return RecipeResult(merger=merger, output_dir=None, dry_run=True, summary=summary)

    prepare_importance(merger, recipe)

    def write(output: Path) -> Path:
        if recipe.merge is not None:
            return merger.run(recipe.merge, output_dir=output, overwrite=recipe.overwrite)
        forget = recipe.forget
        params = {k: v for k, v in forget.params.items() if v is not None}
        return merger.forget(
            forget.task, scaling=forget.scaling, method=forget.method, target=forget.target, output_dir=output,
            overwrite=recipe.overwrite, torch_dtype=forget.torch_dtype, max_shard_size=forget.max_shard_size,
            as_adapter=forget.as_adapter, max_rank=forget.max_rank, energy=forget.energy, **params,
        )  # fmt: skip

    if recipe.push_to_hub is None:
        output = write(Path(recipe.output_dir))
        return RecipeResult(merger=merger, output_dir=output, summary=summary)
    from .hub import save_and_push

    push = recipe.push_to_hub
    with merger.writer.for_hub() if recipe.output_dir is None else contextlib.nullcontext():
        commit = save_and_push(write, push.repo_id, output_dir=recipe.output_dir, **push.options())
    output = Path(recipe.output_dir) if recipe.output_dir is not None else None
    return RecipeResult(merger=merger, output_dir=output, commit=commit, summary=summary)
