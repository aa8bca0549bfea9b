"""YAML recipes for ``hf-sta compress``: which model to compress, the merger inputs that hold the task heads, the
kept tasks' calibration data and the :class:`~hf_sta.compression.CompressionConfig`.

```yaml
base_model: sentence-transformers/all-MiniLM-L6-v2
models:                        # the fine-tunes the model was merged from (their heads and configs)
  news: ./ft-news
  sentiment: ./ft-sentiment
  topic: ./ft-topic
model: ./merged                # the model compressed: a merge's output folder (default: base_model)
compress:                      # CompressionConfig fields
  keep_tasks: [news, sentiment]
  target: 0.5
  fusion: mean
  recovery_steps: 0
data:                          # calibration data per kept task (the fields of an importance: entry)
  news: {data: news.jsonl, text_column: text, label_column: label}
  sentiment: {data: sst2.csv, split: "train[:256]"}
output_dir: edge
overwrite: false
```

Every bad field raises :class:`~hf_sta.errors.ConfigError` naming it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..recipe import ImportanceConfig, load_calibration_data
from .api import CompressionConfig

__all__ = ["CompressRecipe", "run_compress_recipe"]

_FIELDS = ("base_model", "models", "adapters", "model", "compress", "data", "output_dir", "overwrite")


def _section(data: Any, path: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
    return data


@dataclass
class CompressRecipe:
    """One ``hf-sta compress`` run (see the module docstring)."""

    base_model: str
    compress: CompressionConfig
    models: dict[str, str] = field(default_factory=dict)
    adapters: dict[str, str] = field(default_factory=dict)
    model: str | None = None
    data: dict[str, ImportanceConfig] = field(default_factory=dict)
    output_dir: str | None = None
    overwrite: bool = False

    @classmethod
    def from_yaml(cls, path: str | Path) -> CompressRecipe:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Recipe '{path}' does not exist.")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> CompressRecipe:
        data = _section(data, "recipe")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown field of a compress recipe; valid: {', '.join(_FIELDS)}")
        if not isinstance(data.get("base_model"), str):
            raise ConfigError("base_model: required (the base the models were fine-tuned from)")
        section = _section(data.get("compress"), "compress")
        valid = [f.name for f in dataclasses.fields(CompressionConfig)]
        for key in section:
            if key not in valid:
                raise ConfigError(f"compress.{key}: unknown field; valid: {', '.join(valid)}")
        if "keep_tasks" not in section:
            raise ConfigError("compress.keep_tasks: required (the tasks the compressed model serves)")
        try:
            config = CompressionConfig(**section)
        except TypeError as err:
            raise ConfigError(f"compress: {err}") from None
        models, adapters = _section(data.get("models"), "models"), _section(data.get("adapters"), "adapters")
        tasks = set(models) | set(adapters)
        for task in config.keep_tasks:
            if task not in tasks:
                raise ConfigError(f"compress.keep_tasks: unknown task '{task}'; inputs: {', '.join(sorted(tasks))}")
        calibration = {}
        for task, entry in _section(data.get("data"), "data").items():
            if task not in config.keep_tasks:
                raise ConfigError(f"data.{task}: not a kept task (compress.keep_tasks)")
            calibration[task] = ImportanceConfig.from_dict(entry, f"data.{task}")
        return cls(
            base_model=data["base_model"], compress=config, models=dict(models), adapters=dict(adapters),
            model=data.get("model"), data=calibration, output_dir=data.get("output_dir"),
            overwrite=bool(data.get("overwrite", False)),
        )  # fmt: skip


def _dataset(config: ImportanceConfig):
    """The calibration dataset with its text / label columns renamed to what the calibration loader reads."""
    dataset = load_calibration_data(config)
    for column, wanted in ((config.text_column, "text"), (config.label_column, "label")):
        if column != wanted and column in dataset.column_names:
            dataset = dataset.rename_column(column, wanted)
    return dataset


def run_compress_recipe(recipe: CompressRecipe, *, dry_run: bool = False, trust_remote_code: bool = False):
    """Open the inputs (headers only); unless ``dry_run``, load the data, compress and write ``output_dir``.
    Returns ``(merger, output path or None)``."""
    from ..merger import STAMerger

    merger = STAMerger.from_pretrained(
        recipe.base_model, recipe.models or None, adapters=recipe.adapters or None, trust_remote_code=trust_remote_code
    )
    if dry_run:
        return merger, None
    if recipe.output_dir is None:
        raise ConfigError("output_dir: required to write the compressed model (or pass --output-dir)")
    config = recipe.compress
    data = {task: _dataset(entry) for task, entry in recipe.data.items()}
    path = merger.compress(
        recipe.model or recipe.base_model, **dataclasses.asdict(config),
        data=data or None, output_dir=recipe.output_dir, overwrite=recipe.overwrite, show_progress=False,
    )  # fmt: skip
    return merger, path
