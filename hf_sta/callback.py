"""``STAMergeCallback``: when a ``transformers.Trainer`` finishes, merge the model it trained with other fine-tunes.

```python
from hf_sta import MergeConfig
from hf_sta.callback import STAMergeCallback

callback = STAMergeCallback(
    "meta-llama/Llama-3.2-1B",                       # the base the trained model was fine-tuned from
    task_name="support",
    models={"code": "org/llama-code", "math": "./llama-math"},
    merge_config=MergeConfig(method="ties", params={"density": 0.3}),
    output_dir="merged",
    push_to_hub="me/llama-merged",                  # optional
)
trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[callback])
trainer.train()
callback.output_path                                # Path("merged")
```

At ``on_train_end`` the main process takes the trained model (a full model, or a ``peft.PeftModel`` whose LoRA is
folded into a copy with ``merge_and_unload()``), saves it as a checkpoint (to a temporary folder unless
``trained_model_dir`` is given), builds an :class:`~hf_sta.STAMerger` with it as task ``task_name`` and the other
inputs, computes the trained task's importance on a slice of the train (or eval) data when asked, merges, writes
``output_dir`` (model card and recipe included) and pushes it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .config import MergeConfig, validate_task_name
from .errors import ConfigError
from .layout import IMPORTANCE_FOLDER, RECIPE_NAME

logger = logging.getLogger(__name__)

__all__ = ["STAMergeCallback"]


class _SingleProcess:
    """The part of ``accelerate.Accelerator`` the calibration loop uses, for this process alone.

    ``on_train_end`` work runs on the main process only: a real ``Accelerator`` under ``torchrun`` would shard the
    calibration data and wait for the other processes in ``reduce``.
    """

    num_processes = 1
    is_main_process = True

    def __init__(self, device: torch.device) -> None:
        self.device = device


class STAMergeCallback(TrainerCallback):
    """Merge the trained model with other models of the same base when training ends (main process only).

    Args:
        base_model: the base model the trained model was fine-tuned from (folder or Hub repo id).
        task_name: the trained model's task name in the merge (and its head file ``heads/<task_name>.safetensors``).
        models: other full fine-tunes to merge with, task -> folder / repo id.
        adapters: other PEFT LoRA adapters of the base, task -> folder / repo id.
        task_vectors: shipped task vectors, task -> file.
        merged_model: an existing hf_sta output folder: its recipe's inputs are merged with the trained model (and its
            merge settings are used unless ``merge_config`` is given), so the result equals a merge of all tasks from
            scratch. To add the trained task to a merged model as it is instead, pass it in ``models``.
        merge_config: the merge (:class:`~hf_sta.config.MergeConfig` or a mapping as in a recipe's ``merge:``);
            default ``task_arithmetic``.
        importance_files: saved importance of the other tasks (needed by ``method="sta"``), task -> file.
        importance_samples: compute the trained task's importance on this many samples of ``importance_data``.
        importance_metric: ``taylor``, ``taylor_delta``, ``fisher`` or ``magnitude`` (no data).
        importance_data: ``"train"`` or ``"eval"`` (the Trainer's dataloaders: same collator, in order, no shuffle),
            or a ``datasets.Dataset`` / ``DataLoader`` of your own.
        importance_micro_batch_size: samples per gradient during calibration.
        output_dir: where the merged model is written.
        overwrite: replace a non-empty ``output_dir``.
        push_to_hub: a repo id, or a :class:`~hf_sta.recipe.PushConfig` / mapping of its fields.
        trained_model_dir: keep the trained checkpoint there (recorded in the recipe); default: a temporary folder.

    After training, :attr:`output_path` holds the output folder and :attr:`merger` the merger (with its importance).
    The trained task's importance, when computed, is also saved as ``output_dir/importance/<task_name>.safetensors``.

    The main process saves the model the Trainer holds; with parameters sharded across processes (DeepSpeed ZeRO-3,
    FSDP) save a consolidated checkpoint first and merge it with :class:`~hf_sta.STAMerger` or ``hf-sta merge``. The
    other processes do not wait for the merge: keep collective calls after ``trainer.train()`` in mind.
    """

    def __init__(
        self,
        base_model: str | os.PathLike,
        *,
        output_dir: str | os.PathLike,
        task_name: str = "trained",
        models: Mapping[str, str | os.PathLike] | None = None,
        adapters: Mapping[str, str | os.PathLike] | None = None,
        task_vectors: Mapping[str, str | os.PathLike] | None = None,
        merged_model: str | os.PathLike | None = None,
        merge_config: MergeConfig | Mapping[str, Any] | None = None,
        importance_files: Mapping[str, str | os.PathLike] | None = None,
        importance_samples: int | None = None,
        importance_metric: str = "taylor",
        importance_data: str | Any = "train",
        importance_micro_batch_size: int = 8,
        overwrite: bool = False,
        push_to_hub: str | Mapping[str, Any] | Any | None = None,
        trained_model_dir: str | os.PathLike | None = None,
    ) -> None:
        from .recipe import PushConfig, parse_merge_config

        self.base_model = str(base_model)
        self.task_name = validate_task_name(task_name)
        self.models = {k: str(v) for k, v in (models or {}).items()}
        self.adapters = {k: str(v) for k, v in (adapters or {}).items()}
        self.task_vectors = {k: str(v) for k, v in (task_vectors or {}).items()}
        self.importance_files = {k: str(v) for k, v in (importance_files or {}).items()}
        recipe_merge = None
        if merged_model is not None:
            recipe_merge = self._read_merged_model(Path(merged_model))
        if merge_config is None:
            merge_config = recipe_merge or MergeConfig()
        if isinstance(merge_config, MergeConfig):
            merge_config = dataclasses.asdict(merge_config)
        self.merge_config = parse_merge_config(merge_config, "merge_config")

        others = [*self.models, *self.adapters, *self.task_vectors]
        self._check_tasks(others)
        self._set_importance_options(
            importance_metric, importance_samples, importance_data, importance_micro_batch_size
        )
        self._check_importance_available(others)
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite
        if push_to_hub is None or isinstance(push_to_hub, PushConfig):
            self.push_to_hub = push_to_hub
        else:
            self.push_to_hub = PushConfig.from_dict(push_to_hub, "push_to_hub")
        self.trained_model_dir = Path(trained_model_dir) if trained_model_dir is not None else None
        self.output_path: Path | None = None
        self.merger: Any = None
        self.commit: Any = None

    def _check_tasks(self, others: list[str]) -> None:
        """The other inputs exist, the trained task's name is its own, and every task named elsewhere is an input."""
        if not others:
            raise ConfigError("models: give the models, adapters or task vectors to merge the trained model with")
        if self.task_name in others:
            raise ConfigError(f"task_name: '{self.task_name}' is also the name of another input")
        for task in self.importance_files:
            if task not in others:
                raise ConfigError(f"importance_files.{task}: not one of the other inputs ({', '.join(others)})")
        for index, task in enumerate(self.merge_config.tasks or []):
            if task not in [*others, self.task_name]:
                raise ConfigError(f"merge_config.tasks[{index}]: unknown task '{task}'")

    def _set_importance_options(
        self, metric: str, samples: int | None, data: str | Any, micro_batch_size: int
    ) -> None:
        """Validate and keep how the trained task's importance is measured."""
        from .importance import GRADIENT_STATISTIC, check_metric

        try:
            self.importance_metric = check_metric(metric)
        except ValueError as err:
            raise ConfigError(f"importance_metric: {err}") from None
        if samples is not None and (isinstance(samples, bool) or samples < 1):
            raise ConfigError(f"importance_samples must be a positive integer, got {samples!r}")
        if micro_batch_size < 1:
            raise ConfigError(f"importance_micro_batch_size must be >= 1, got {micro_batch_size!r}")
        if isinstance(data, str) and data not in ("train", "eval"):
            raise ConfigError(f"importance_data must be 'train', 'eval', a Dataset or a DataLoader, got {data!r}")
        self.importance_samples, self.importance_data = samples, data
        self.importance_micro_batch_size = micro_batch_size
        # magnitude (|tau|) needs no data; the gradient metrics need importance_samples of data
        self._importance_needs_data = GRADIENT_STATISTIC[metric] is not None
        self.compute_trained_importance = samples is not None or not self._importance_needs_data

    def _check_importance_available(self, others: list[str]) -> None:
        """A method that needs importance has it for every merged task: files for the others, a measurement for the
        trained one."""
        from .methods import get_merge_method

        method = self.merge_config.method
        if not get_merge_method(method).requires_importance:
            return
        merged = self.merge_config.tasks or [*others, self.task_name]
        missing = [t for t in merged if t != self.task_name and t not in self.importance_files]
        if missing:
            raise ConfigError(
                f"importance_files: method '{method}' needs the importance of {', '.join(missing)} (saved with "
                "`hf-sta importance` or STAMerger.save_importance)"
            )
        if self.task_name in merged and not self.compute_trained_importance:
            raise ConfigError(
                f"importance_samples: method '{method}' needs the trained task's importance; set importance_samples "
                "(or importance_metric='magnitude')"
            )

    def _read_merged_model(self, folder: Path) -> dict[str, Any] | None:
        """Take the inputs (and merge settings) of an existing hf_sta output folder's recipe."""
        import yaml

        from .lineage import BASE_KEY, locate

        path = folder / RECIPE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"merged_model: '{folder}' has no {RECIPE_NAME} (not an hf_sta output folder).")
        recipe = yaml.safe_load(path.read_text()) or {}
        if "merge" not in recipe:
            raise ConfigError(f"merged_model: '{path}' does not describe a merge.")
        ids = recipe.get("hub_ids") or {}
        base = locate(str(recipe["base_model"]), folder, ids.get(BASE_KEY)) if recipe.get("base_model") else None
        if base and _resolved(base) != _resolved(self.base_model):
            logger.warning("merged_model '%s' was merged on base '%s', not '%s'.", folder, base, self.base_model)
        for group in ("models", "adapters", "task_vectors"):  # paths in a written recipe are relative to its folder
            for task, source in (recipe.get(group) or {}).items():
                getattr(self, group).setdefault(task, locate(str(source), folder, ids.get(task)))
        for task, config in (recipe.get("importance") or {}).items():
            if isinstance(config, Mapping) and config.get("path"):
                self.importance_files.setdefault(task, locate(str(config["path"]), folder))
        return recipe["merge"]

    # -- Trainer hook ----------------------------------------------------------------------------------------------
    def on_train_end(self, args, state, control, **kwargs):
        """Merge on the main process; other processes return at once."""
        if not state.is_world_process_zero:
            return
        model = kwargs.get("model")
        if model is None:
            raise ValueError("STAMergeCallback.on_train_end got no model from the Trainer.")
        calibration = None
        if self.compute_trained_importance and self._importance_needs_data:
            calibration = self._calibration_data(kwargs)
        self.output_path = self.merge_trained_model(
            model, calibration=calibration, tokenizer=kwargs.get("processing_class")
        )

    # -- work ------------------------------------------------------------------------------------------------------
    def _calibration_data(self, kwargs: Mapping[str, Any]) -> Any:
        """``importance_samples`` samples of the chosen data, in order, with the Trainer's collator."""
        from torch.utils.data import DataLoader, Subset

        source = self.importance_data
        if isinstance(source, str):
            loader = kwargs.get(f"{source}_dataloader")
            if loader is None:
                raise ConfigError(
                    f"importance_data='{source}': the Trainer has no {source} dataloader at the end of training; pass "
                    "importance_data=<a Dataset or DataLoader>"
                )
        elif isinstance(source, DataLoader):
            loader = source
        else:
            return source  # a datasets.Dataset: compute_importance cuts, tokenizes and collates it
        dataset = loader.dataset
        if not hasattr(dataset, "__len__"):
            raise ConfigError(
                "importance_data: the dataloader iterates an IterableDataset; pass importance_data=<a Dataset>"
            )
        count = min(self.importance_samples or len(dataset), len(dataset))
        subset = dataset.select(range(count)) if hasattr(dataset, "select") else Subset(dataset, range(count))
        return DataLoader(
            subset, batch_size=self.importance_micro_batch_size, shuffle=False, collate_fn=loader.collate_fn
        )

    def _save_trained(self, model: torch.nn.Module, folder: Path) -> torch.nn.Module:
        """Save the trained model as a full checkpoint; return the module whose parameters match its tensor names."""
        from peft import PeftModel

        model = getattr(model, "module", model)  # DataParallel / DDP
        if isinstance(model, PeftModel):
            # The dense delta of the LoRA: fold it into a copy (the Trainer's model is left as it is).
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(folder)
        return model

    def merge_trained_model(self, model: torch.nn.Module, *, calibration: Any = None, tokenizer: Any = None) -> Path:
        """Merge ``model`` (the trained task) with the other inputs into :attr:`output_dir`; returns its path.

        ``calibration`` (a ``Dataset`` or ``DataLoader``) feeds the trained task's importance when it is computed.
        Usable without a Trainer.
        """
        from .recipe import Recipe, build_merger

        with tempfile.TemporaryDirectory(prefix="hf_sta-trained-") as tmp:
            folder = self.trained_model_dir or Path(tmp) / self.task_name
            trained = self._save_trained(model, folder)
            recipe = Recipe(
                base_model=self.base_model,
                models={**self.models, self.task_name: str(folder)},
                adapters=dict(self.adapters),
                task_vectors=dict(self.task_vectors),
            )
            merger = build_merger(recipe)
            merger.sources[self.task_name] = (
                str(self.trained_model_dir) if self.trained_model_dir else "<trained model, not saved>"
            )
            for task, path in self.importance_files.items():
                merger.load_importance(task, path)
            if self.compute_trained_importance:
                device = next(trained.parameters()).device
                merger.compute_importance(
                    self.task_name,
                    calibration,
                    metric=self.importance_metric,
                    num_samples=self.importance_samples,
                    micro_batch_size=self.importance_micro_batch_size,
                    model=trained,
                    tokenizer=tokenizer,
                    accelerator=_SingleProcess(device),
                )
            output = merger.run(self.merge_config, output_dir=self.output_dir, overwrite=self.overwrite)
        if self.task_name in merger.importance:
            path = Path(output) / IMPORTANCE_FOLDER / f"{self.task_name}.safetensors"
            merger.save_importance(self.task_name, path, overwrite=True)
        self.merger = merger
        if self.push_to_hub is not None:
            self.commit = self.push_to_hub.push(output)
        logger.info("Merged the trained task '%s' into %s", self.task_name, output)
        return Path(output)


def _resolved(source: str | os.PathLike) -> str:
    """A local path made absolute (to compare two spellings of one folder); a repo id as it is."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)
