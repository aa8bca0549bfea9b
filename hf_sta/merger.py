"""STAMerger: load -> measure -> select -> combine -> write. It orchestrates; the math lives in ``methods/``."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from .config import MergeConfig, parse_dtype, validate_task_name
from .errors import CheckpointError, ConfigError
from .importance import (
    GRADIENT_STATISTIC,
    ImportanceScores,
    accumulate_gradient_statistics,
    build_calibration_dataloader,
    check_metric,
    dataset_fingerprint,
    finish_importance,
)
from .io.checkpoints import (
    AtomicOutputDir,
    StreamingSafetensorsWriter,
    TensorPlan,
    TensorSource,
    check_output_dir,
    copy_aux_files,
    open_checkpoint,
    save_tensors,
)
from .io.pipeline import BufferPool, intra_op_threads, parallel_map
from .methods import MergeMethod, get_merge_method
from .methods.sta import DEFAULT_FORGET_DENSITY, forget_delta, global_thresholds
from .task_vector import CheckpointTaskVector, TaskVector

logger = logging.getLogger(__name__)

RECIPE_NAME = "hf_sta_config.yaml"
HEADS_FOLDER = "heads"
IMPORTANCE_FOLDER = "importance"

PathOrRepo = str | os.PathLike
CheckpointInput = PathOrRepo | Mapping[str, torch.Tensor] | torch.nn.Module


def _name_tasks(finetuned: Mapping[str, Any] | Sequence[Any] | None) -> dict[str, Any]:
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


def _source_name(source: Any) -> str:
    """How an input is recorded in recipes and cards: an absolute path for local folders/files (the recipe must work
    from any directory), the repo id for Hub models, ``<in-memory>`` for state dicts and modules."""
    if not isinstance(source, str | os.PathLike):
        return "<in-memory>"
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def _tensor_seed(seed: int, key: str) -> int:
    """Seed of one tensor's generator: independent of the order tensors are processed in."""
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


class STAMerger:
    """Merge several fine-tuned models (or task vectors) of one base model, or forget one of them.

    ```python
    merger = STAMerger.from_pretrained("base", finetuned={"news": "ft-news", "sentiment": "ft-sentiment"})
    model = merger.merge(method="ties", density=0.2)                       # a transformers model, in memory
    merger.merge(method="task_arithmetic", scaling=0.3, output_dir="out")   # streamed to disk, tensor by tensor
    ```
    """

    def __init__(
        self,
        base: TensorSource,
        task_vectors: Mapping[str, TaskVector],
        *,
        sources: Mapping[str, str] | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        if not task_vectors:
            raise ConfigError("STAMerger needs at least one fine-tuned model, adapter or task vector.")
        self.base = base
        self.task_vectors: dict[str, TaskVector] = {validate_task_name(k): v for k, v in task_vectors.items()}
        self.sources = dict(sources or {})
        self.trust_remote_code = trust_remote_code
        self.last_config: MergeConfig | None = None
        self._last_operation: tuple[str, dict[str, Any]] | None = None
        self.last_adapter_report = None
        self._card_importance: list[str] = []
        # Optional model-card fields: evaluation results (model-index) and the card's title.
        self.eval_results: list[dict[str, Any]] | None = None
        self.model_name: str | None = None
        self.importance: dict[str, ImportanceScores] = {}
        # {tensor name: {task: fraction of entries kept}} of the last STA merge (model card statistics).
        self.last_kept_fraction: dict[str, dict[str, float]] = {}

    # -- load ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        base_model: CheckpointInput,
        finetuned: Mapping[str, CheckpointInput] | Sequence[PathOrRepo] | None = None,
        *,
        adapters: Mapping[str, PathOrRepo] | Sequence[PathOrRepo] | None = None,
        task_specific: str | Sequence[str] | None = "auto",
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        trust_remote_code: bool = False,
    ) -> STAMerger:
        """Open the base and every fine-tuned checkpoint or PEFT LoRA adapter (folders, Hub repo ids, state dicts).

        Adapters' task vectors are the dense updates ``scaling * B @ A`` of the weights they adapt, one module at a
        time (see ``hf_sta.io.adapters``).

        Nothing but headers and configs is read here; shapes, architectures and dtypes are checked now, so a bad
        input fails before any work is done.
        """
        named = _name_tasks(finetuned)
        named_adapters = _name_tasks(adapters)
        if not named and not named_adapters:
            raise ConfigError(
                "from_pretrained needs `finetuned` models and/or `adapters` (a dict name -> path/repo id, or a list)."
            )
        clash = sorted(set(named) & set(named_adapters))
        if clash:
            raise ConfigError(f"Task name(s) {', '.join(clash)} given both as fine-tuned model and as adapter.")
        base = open_checkpoint(base_model, name="base", revision=revision, token=token, cache_dir=cache_dir)
        task_vectors = {}
        for name, source in named.items():
            ft = open_checkpoint(source, name=name, revision=revision, token=token, cache_dir=cache_dir)
            task_vectors[name] = CheckpointTaskVector(base, ft, name=name, task_specific=task_specific)
            if task_vectors[name].head_keys:
                logger.info(
                    "Task '%s': %d task-specific tensor(s) kept per task, not merged: %s",
                    name,
                    len(task_vectors[name].head_keys),
                    ", ".join(task_vectors[name].head_keys[:6]),
                )
        if named_adapters:
            from .io.adapters import LoraTaskVector

            for name, source in named_adapters.items():
                task_vectors[name] = LoraTaskVector.from_pretrained(
                    source, base, name=name, revision=revision, token=token
                )
            named = {**named, **named_adapters}
        sources = {name: _source_name(src) for name, src in named.items()}
        sources["base"] = _source_name(base_model)
        return cls(base, task_vectors, sources=sources, trust_remote_code=trust_remote_code)

    @classmethod
    def from_task_vectors(
        cls,
        base_model: CheckpointInput,
        task_vectors: Mapping[str, PathOrRepo | TaskVector],
        *,
        importance: Mapping[str, PathOrRepo] | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        trust_remote_code: bool = False,
    ) -> STAMerger:
        """Merge task vectors shipped as files (data vectors): each site fine-tunes the common base on its private
        data and ships only ``tau_s`` (``TaskVector.save``) and optionally its importance (``save_importance``).

        Every shipped tensor must exist in the base with the same shape. ``merge(weights="num_samples")`` weights the
        sites by the ``num_samples`` recorded in their files.
        """
        base = open_checkpoint(base_model, name="base", revision=revision, token=token, cache_dir=cache_dir)
        vectors: dict[str, TaskVector] = {}
        sources: dict[str, str] = {}
        for name, item in task_vectors.items():
            validate_task_name(name)
            vector = item if isinstance(item, TaskVector) else TaskVector.load(item, name=name)
            for key in vector.keys():
                if key not in base:
                    raise CheckpointError(f"Task vector '{name}' has tensor '{key}', which the base does not have.")
                if tuple(vector.shape(key)) != tuple(base.shape(key)):
                    raise CheckpointError(
                        f"Task vector '{name}': '{key}' has shape {list(vector.shape(key))}, the base "
                        f"{list(base.shape(key))}."
                    )
            vectors[name] = vector
            sources[name] = _source_name(item) if not isinstance(item, TaskVector) else vector.name
        sources["base"] = _source_name(base_model)
        merger = cls(base, vectors, sources=sources, trust_remote_code=trust_remote_code)
        for name, path in (importance or {}).items():
            merger.load_importance(name, path)
        return merger

    @property
    def tasks(self) -> list[str]:
        return list(self.task_vectors)

    def _task_list(self, tasks: Sequence[str] | None) -> list[str]:
        chosen = list(tasks) if tasks is not None else self.tasks
        unknown = [t for t in chosen if t not in self.task_vectors]
        if unknown:
            raise ConfigError(
                f"Unknown task(s) {', '.join(map(repr, unknown))}; loaded tasks: {', '.join(self.tasks)}."
            )
        if not chosen:
            raise ConfigError("No task selected to merge.")
        return chosen

    def _weights(self, tasks: list[str], weights: Mapping[str, float] | Sequence[float] | str | None) -> torch.Tensor:
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

    # -- measure -----------------------------------------------------------------------------------------------------
    def compute_importance(
        self,
        task: str,
        data: Any = None,
        *,
        metric: str = "taylor",
        num_samples: int | None = 256,
        micro_batch_size: int = 8,
        loss_fn: Callable | None = None,
        tokenizer: Any = None,
        collate_fn: Callable | None = None,
        model: torch.nn.Module | None = None,
        accelerator: Any = None,
        gradient_checkpointing: bool = False,
        torch_dtype: str | torch.dtype | None = None,
        text_column: str = "text",
        label_column: str = "label",
        max_length: int = 512,
        show_progress: bool = True,
    ) -> ImportanceScores:
        """Score every parameter of ``task`` by how much its loss depends on it (see ``hf_sta.importance.metrics``).

        Gradients are taken at the task's fine-tuned model with its own loss on ``data`` (a ``datasets.Dataset``,
        raw text tokenized with ``tokenizer`` or the model's own, or a ``DataLoader``), one micro-batch of
        ``micro_batch_size`` samples at a time (``1`` gives per-sample scores), over the first ``num_samples``
        samples. ``metric="magnitude"`` needs no data. Runs on CPU, one GPU, or under ``accelerate launch`` (the
        processes split the data and their sums are reduced once). The scores are kept for ``merge(method="sta")``
        and ``forget`` and returned; :meth:`save_importance` writes them.
        """
        vector = self._task_vector(task)
        check_metric(metric)
        statistic = GRADIENT_STATISTIC[metric]
        scores: dict[str, torch.Tensor] = {}
        samples = micro_batches = 0
        if statistic is None:
            for key in vector.keys():
                scores[key] = finish_importance(metric, gradient_statistic=None, task_vector=vector.get(key))
        else:
            if data is None:
                raise ValueError(f"Importance metric '{metric}' needs calibration data for task '{task}'.")
            model = model if model is not None else self._load_finetuned_model(task)
            dtype = parse_dtype(torch_dtype)
            if dtype is not None:
                model = model.to(dtype)
            names = self._parameter_names(task, model)
            config = getattr(model, "config", None)
            causal_lm = any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
            if tokenizer is None and not isinstance(data, torch.utils.data.DataLoader):
                tokenizer = self._load_tokenizer(task, data)
            loader = build_calibration_dataloader(
                data,
                num_samples=num_samples,
                micro_batch_size=micro_batch_size,
                tokenizer=tokenizer,
                collate_fn=collate_fn,
                causal_lm=causal_lm,
                text_column=text_column,
                label_column=label_column,
                max_length=max_length,
                needs_labels=loss_fn is None,
            )
            if accelerator is None:
                from accelerate import Accelerator
                from accelerate.utils import DataLoaderConfiguration

                accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(even_batches=False))
            loader = accelerator.prepare_data_loader(loader) if accelerator.num_processes > 1 else loader
            statistics, micro_batches, samples = accumulate_gradient_statistics(
                model,
                loader,
                statistic=statistic,
                parameter_names=names,
                loss_fn=loss_fn,
                num_samples=num_samples,
                accelerator=accelerator,
                gradient_checkpointing=gradient_checkpointing,
                show_progress=show_progress,
                description=f"importance[{task}]",
            )
            state = model.state_dict()
            inverse = {base_key: model_key for model_key, base_key in names.items()}
            for key in vector.keys():
                theta = state[inverse[key]].detach().cpu() if metric == "taylor" else None
                tau = vector.get(key) if metric == "taylor_delta" else None
                scores[key] = finish_importance(
                    metric, gradient_statistic=statistics[key], theta=theta, task_vector=tau
                )
        result = ImportanceScores.from_dict(
            scores,
            metric=metric,
            num_samples=samples,
            micro_batches=micro_batches,
            model_hash=vector.model_hash,
            dataset_fingerprint=dataset_fingerprint(data) if data is not None else None,
            task=task,
        )
        self.importance[task] = result
        return result

    def save_importance(self, task: str, path: str | os.PathLike) -> Path:
        """Write ``task``'s importance (safetensors + metadata: metric, samples, dataset fingerprint, model hash)."""
        if task not in self.importance:
            raise ConfigError(f"No importance for task '{task}': call compute_importance(task, data) first.")
        return self.importance[task].save(path)

    def load_importance(self, task: str, path: str | os.PathLike) -> ImportanceScores:
        """Load importance saved by :meth:`save_importance`; refuses scores of another model or of other tensors."""
        vector = self._task_vector(task)
        scores = ImportanceScores.load(path)
        if scores.model_hash and scores.model_hash != vector.model_hash:
            raise CheckpointError(
                f"Importance file '{path}' was computed on another model (hash {scores.model_hash}) than task "
                f"'{task}' (hash {vector.model_hash})."
            )
        for key in vector.keys():
            if key not in scores:
                raise CheckpointError(f"Importance file '{path}' has no scores for tensor '{key}' of task '{task}'.")
            if tuple(scores.scores.shape(key)) != tuple(vector.shape(key)):
                raise CheckpointError(
                    f"Importance for '{key}' in '{path}' has shape {list(scores.scores.shape(key))}, the task vector "
                    f"{list(vector.shape(key))}."
                )
        self.importance[task] = scores
        return scores

    def _task_vector(self, task: str) -> TaskVector:
        if task not in self.task_vectors:
            raise ConfigError(f"Unknown task '{task}'; loaded tasks: {', '.join(self.tasks)}.")
        return self.task_vectors[task]

    def _finetuned_folder(self, task: str) -> Path:
        vector = self._task_vector(task)
        folder = getattr(getattr(vector, "finetuned", None), "folder", None)
        if folder is None:
            raise ConfigError(
                f"Task '{task}' has no fine-tuned checkpoint folder to load a model from; pass `model=` (and "
                "`loss_fn=` for models without a loss)."
            )
        return folder

    def _load_finetuned_model(self, task: str) -> torch.nn.Module:
        """The task's model for calibration: its fine-tuned checkpoint, or (adapters, shipped task vectors) the base
        model with ``tau`` added to its weights, i.e. the adapted weights ``W_0 + delta_W`` with the update applied."""
        vector = self._task_vector(task)
        if getattr(getattr(vector, "finetuned", None), "folder", None) is not None:
            return load_transformers_model(self._finetuned_folder(task), trust_remote_code=self.trust_remote_code)
        base_folder = getattr(self.base, "folder", None)
        if base_folder is None or not getattr(self.base, "config", None):
            raise ConfigError(
                f"Task '{task}' has no fine-tuned checkpoint and the base is not a transformers checkpoint: pass "
                "`model=` (and `loss_fn=` for models without a loss)."
            )
        model = load_transformers_model(base_folder, trust_remote_code=self.trust_remote_code)
        state = model.state_dict()
        with torch.no_grad():
            for key in vector.keys():
                if key not in state:
                    raise CheckpointError(f"Tensor '{key}' of task '{task}' is not in the base model's state dict.")
                state[key].add_(vector.get(key).to(state[key].dtype))
        return model

    def _load_tokenizer(self, task: str, data: Any) -> Any:
        if "input_ids" in getattr(data, "column_names", []):
            return None
        from transformers import AutoTokenizer

        for folder in (
            getattr(getattr(self.task_vectors[task], "finetuned", None), "folder", None),
            getattr(self.base, "folder", None),
        ):
            if folder is not None and any(
                (folder / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
            ):
                return AutoTokenizer.from_pretrained(folder)
        raise ValueError(f"No tokenizer found for task '{task}': pass `tokenizer=` or tokenized data.")

    def _parameter_names(self, task: str, model: torch.nn.Module) -> dict[str, str]:
        """``{model state-dict key: task-vector key}`` for every tensor of the task vector."""
        vector = self._task_vector(task)
        state_keys = set(model.state_dict().keys())
        pairs = getattr(getattr(vector, "alignment", None), "pairs", None) or {k: k for k in vector.keys()}
        names = {}
        for base_key, model_key in pairs.items():
            if model_key not in state_keys:
                raise CheckpointError(
                    f"Tensor '{model_key}' of task '{task}' is not a parameter of the calibration model "
                    f"{type(model).__name__}."
                )
            names[model_key] = base_key
        return names

    # -- select + combine -----------------------------------------------------------------------------------------
    def _plan(self, dtype: torch.dtype | None) -> list[TensorPlan]:
        plan = []
        for key in self.base.keys():
            base_dtype = self.base.dtype(key)
            out = dtype if (dtype is not None and base_dtype.is_floating_point) else base_dtype
            plan.append(TensorPlan(key, self.base.shape(key), out))
        return plan

    def _tau(
        self, vector: TaskVector, key: str, theta_0: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``tau[key]`` (into ``out`` when given), reusing the merger's base tensor only when it is the vector's own
        base (a task vector built against another model, e.g. passed to ``from_task_vectors(merged, ...)``, must read
        its own)."""
        own_base = getattr(vector, "base", None)
        return vector.get(key, theta_0 if own_base is None or own_base is self.base else None, out=out)

    def _importance_for(self, tasks: list[str], method: str) -> list[ImportanceScores]:
        missing = [t for t in tasks if t not in self.importance]
        if missing:
            raise ConfigError(
                f"method='{method}' needs importance scores for task(s) {', '.join(missing)}: call "
                "merger.compute_importance(task, calibration_data) (or metric='magnitude' without data), or "
                "merger.load_importance(task, path)."
            )
        return [self.importance[t] for t in tasks]

    def _stacked_importance(self, scores: list[ImportanceScores], key: str, shape: tuple[int, ...]) -> torch.Tensor:
        stacked = torch.zeros((len(scores), *shape), dtype=torch.float32)
        for index, task_scores in enumerate(scores):
            if key in task_scores:
                stacked[index] = task_scores[key]
        return stacked

    def _global_thresholds(
        self, vectors: list[TaskVector], scores: list[ImportanceScores], params: dict[str, Any]
    ) -> torch.Tensor | None:
        if params.get("density") is None or params.get("density_scope") != "global":
            return None
        keys = [k for k in self.base.keys() if any(k in v for v in vectors)]

        def rows():
            for key in keys:
                yield self._stacked_importance(scores, key, self.base.shape(key))

        return global_thresholds(rows, len(vectors), params["density"], params.get("normalize", "max"))

    def _deltas(
        self,
        config: MergeConfig,
        spec: MergeMethod,
        tasks: list[str],
        weights: torch.Tensor,
        plan: list[TensorPlan],
        *,
        ordered: bool = True,
        combine: bool = False,
    ) -> Iterator[tuple[TensorPlan, torch.Tensor, torch.Tensor | None, Callable[[], None] | None]]:
        """Yield ``(item, theta_0, scaling * method(stack_t tau_t), None)`` for every base tensor (the delta is
        ``None`` for tensors no task vector touches), in plan order, or with ``ordered=False`` as each is ready.

        With ``combine`` the worker threads also add the two: ``(item, theta_0 + delta in the item's dtype, None,
        release)``. Unordered results go to a writer: an fp32 one is then built in a reused buffer, and ``release``
        (else ``None``) must be called once it has been written, to give the buffer back.
        """
        vectors = [self.task_vectors[t] for t in tasks]
        params = dict(config.params)
        scores = self._importance_for(tasks, config.method) if spec.requires_importance else None
        if scores is not None:
            global_threshold = self._global_thresholds(vectors, scores, params)
            if global_threshold is not None:
                params["global_threshold"] = global_threshold
        # Each tensor is read and merged by one of PIPELINE_WORKERS threads (see ``ordered`` for the order). The
        # task vectors are read straight into the rows of a stacking buffer (no per-task copy) taken from a pool of
        # reused buffers (no fresh pages to fault in for every tensor).
        pool = BufferPool()

        def merge_tensor(item: TensorPlan) -> tuple[TensorPlan, torch.Tensor, torch.Tensor | None, Any, dict]:
            key = item.name
            if not any(key in v for v in vectors):
                return item, self.base.get_tensor(key), None, None, {}
            shape = self.base.shape(key)
            theta_0 = self.base.get_tensor(key, out=pool.acquire(math.prod(shape), self.base.dtype(key)).view(shape))
            stacked = pool.acquire(len(vectors) * math.prod(item.shape)).view(len(vectors), *item.shape)
            for index, vector in enumerate(vectors):
                if key in vector:
                    self._tau(vector, key, theta_0, out=stacked[index])
                else:
                    stacked[index].zero_()
            tensor_params = dict(params)
            if scores is not None:
                tensor_params["importance"] = self._stacked_importance(scores, key, item.shape)
                tensor_params["stats"] = {}
            generator = torch.Generator().manual_seed(_tensor_seed(config.seed, key)) if spec.stochastic else None
            delta = spec.function(stacked, weights, generator=generator, **tensor_params)
            if delta.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr():
                delta = delta.clone()  # a kernel returning (a view of) its input: the buffer is reused
            pool.release(stacked)
            delta.mul_(config.scaling)
            stats = tensor_params.get("stats", {})
            if combine and not ordered and theta_0.dtype == item.dtype == torch.float32:
                # theta_0 + delta in theta_0's buffer (the same bits as delta + theta_0), back to the pool once written
                output = theta_0.add_(delta)
                return item, output, None, functools.partial(pool.release, output), stats
            if combine:  # theta_0 + delta in the output dtype, here in the worker
                output = delta.add_(theta_0.float()).to(item.dtype)
                pool.release(theta_0)
                return item, output, None, None, stats
            theta = theta_0.clone()  # its buffer goes back to the pool
            pool.release(theta_0)
            return item, theta, delta, None, stats

        for item, theta_0, delta, release, stats in parallel_map(merge_tensor, plan, ordered=ordered):
            if "kept_fraction" in stats:
                self.last_kept_fraction[item.name] = dict(zip(tasks, stats["kept_fraction"].tolist()))
            yield item, theta_0, delta, release
        kept = self.last_kept_fraction  # in plan order, whatever order the tensors were merged in
        self.last_kept_fraction = {item.name: kept[item.name] for item in plan if item.name in kept}

    def merge(
        self,
        method: str = "task_arithmetic",
        *,
        scaling: float = 1.0,
        weights: Mapping[str, float] | Sequence[float] | str | None = None,
        tasks: Sequence[str] | None = None,
        output_dir: str | os.PathLike | None = None,
        overwrite: bool = False,
        torch_dtype: str | torch.dtype | None = None,
        seed: int = 0,
        max_shard_size: int | str = "5GB",
        output_format: str = "full",
        max_rank: int | None = None,
        energy: float | None = None,
        **params: Any,
    ):
        """Merge the task vectors: ``theta = theta_0 + scaling * method({tau_t}, weights, **params)``.

        Tensors are read and merged by two worker threads while a third writes finished ones; for the duration
        torch's intra-op threads are set to ``(n - 1) // 2`` (restored after). The result does not depend on it.

        Args:
            method: a registered merge method (``sta``, ``average``, ``task_arithmetic``, ``ties``, ``dare_linear``,
                ``dare_ties``, ``magnitude_prune``, ``breadcrumbs``, ...). ``sta`` needs importance scores
                (:meth:`compute_importance` or :meth:`load_importance`).
            scaling: lambda, applied to the combined delta.
            weights: per-task weights (mapping or list in task order), or ``"num_samples"`` to weight shipped task
                vectors by the sample counts recorded in them (normalised to mean 1).
            tasks: subset of tasks to merge (default all).
            output_dir: when given, stream the result to this folder (safetensors shards + index, config and
                tokenizer from the base, task heads under ``heads/<task>.safetensors``, the recipe) and return its
                path; never the whole model in memory. When ``None``, return the merged model (a transformers
                ``PreTrainedModel`` if the base has a ``config.json``, else a state dict).
            overwrite: replace an existing non-empty ``output_dir``.
            torch_dtype: output dtype of floating tensors (default: the base's). Math is always fp32.
            seed: seed of random methods (DARE).
            max_shard_size: output shard budget (``"5GB"``, ``"500MB"`` or bytes).
            output_format: ``"full"`` (a checkpoint of the base's architecture) or ``"adapter"`` (the merged delta
                as a PEFT LoRA adapter over the base: truncated SVD of each module's delta; rank ``max_rank``, or the
                smallest keeping ``energy`` of the squared singular values; the per-module relative reconstruction
                error is logged and kept in ``last_adapter_report``). In memory, an adapter result is a ``PeftModel``.
            **params: the method's own parameters (``density=0.2``, ``majority_sign_method="total"``, ...).
        """
        dtype = parse_dtype(torch_dtype)
        config = MergeConfig(
            method=method,
            scaling=scaling,
            weights=dict(weights)
            if isinstance(weights, Mapping)
            else (weights if isinstance(weights, str) or weights is None else list(weights)),
            tasks=list(tasks) if tasks is not None else None,
            params=params,
            seed=seed,
            torch_dtype=str(dtype).removeprefix("torch.") if dtype else None,
            max_shard_size=max_shard_size,
            output_format=output_format,
            max_rank=max_rank,
            energy=energy,
        )
        return self.run(config, output_dir=output_dir, overwrite=overwrite)

    def run(self, config: MergeConfig, *, output_dir: str | os.PathLike | None = None, overwrite: bool = False):
        """Execute a :class:`MergeConfig` (what :meth:`merge` and the CLI call)."""
        config = config.validated()
        spec = get_merge_method(config.method)
        tasks = self._task_list(config.tasks)
        weights = self._weights(tasks, config.weights)
        if spec.requires_importance:
            self._importance_for(tasks, config.method)
        plan = self._plan(parse_dtype(config.torch_dtype))
        recipe = {**self._recipe_inputs(tasks), "merge": dataclasses.asdict(config)}
        if config.output_format == "adapter":
            recipe.update(output_format="adapter", adapter={"max_rank": config.max_rank, "energy": config.energy})
        self._card_importance = tasks if spec.requires_importance else []
        self.last_config = config
        self._last_operation = ("merge", {"config": config})
        self.last_kept_fraction = {}
        # Safetensors output (to disk, or through a temporary folder for a transformers model) is written at each
        # tensor's place in the file whatever the order; a state dict or an adapter is built in plan order.
        streamed = output_dir is not None or bool(getattr(self.base, "config", None))
        adapter = config.output_format == "adapter"
        ordered = adapter or not streamed
        deltas = self._deltas(config, spec, tasks, weights, plan, ordered=ordered, combine=not adapter)
        return self._emit(
            deltas,
            plan,
            recipe=recipe,
            head_tasks=tasks,
            output_dir=output_dir,
            overwrite=overwrite,
            max_shard_size=config.max_shard_size,
            adapter={"max_rank": config.max_rank, "energy": config.energy}
            if config.output_format == "adapter"
            else None,
        )

    # -- forget ----------------------------------------------------------------------------------------------------
    def forget(
        self,
        task: str,
        *,
        scaling: float = 1.0,
        method: str = "sta",
        target: str | os.PathLike | None = None,
        output_dir: str | os.PathLike | None = None,
        overwrite: bool = False,
        torch_dtype: str | torch.dtype | None = None,
        max_shard_size: int | str = "5GB",
        as_adapter: bool = False,
        max_rank: int | None = None,
        energy: float | None = 0.999,
        **params: Any,
    ):
        """Remove ``task`` from a model: ``theta' = theta - scaling * m_f * tau_f``.

        Args:
            task: the task to forget (its task vector, and for ``method="sta"`` its importance, must be loaded).
            scaling: how much of the (selected) task vector to subtract; :meth:`tune_forgetting` picks it.
            method: ``"sta"`` (subtract the task's important entries only; ``threshold``/``density``/
                ``density_scope``/``normalize`` as in the STA merge) or ``"negation"`` (the whole task vector).
            target: the model to edit: ``None`` (the base), a loaded task's name (its fine-tuned model), or a
                checkpoint folder / repo id with the base's tensor names (e.g. a merged model).
            output_dir, overwrite, torch_dtype, max_shard_size: as in :meth:`merge`.
            as_adapter: write the edit ``-scaling * m_f * tau_f`` as a PEFT LoRA adapter over the base (truncated
                SVD with ``max_rank`` / ``energy``) instead of a full checkpoint: enabled, the task is forgotten;
                disabled or removed, the model is exactly the original. Only LoRA-able weights (linear, embedding,
                conv) carry the edit; others are reported and left out.
        """
        if method not in ("sta", "negation"):
            raise ConfigError(f"forget method must be 'sta' or 'negation', got {method!r}.")
        self._last_operation = (
            "forget",
            dict(
                task=task,
                scaling=scaling,
                method=method,
                target=target,
                torch_dtype=torch_dtype,
                max_shard_size=max_shard_size,
                as_adapter=as_adapter,
                max_rank=max_rank,
                energy=energy,
                **params,
            ),
        )
        vector = self._task_vector(task)
        spec = get_merge_method("sta")
        if method == "negation" and params:
            raise ConfigError(f"method='negation' takes no selection parameters, got {', '.join(params)}.")
        params = spec.validate_params({k: v for k, v in params.items() if v is not None})
        params.pop("overlap")
        if method == "sta" and params.get("density") is None and params.get("threshold") is None:
            params["density"] = DEFAULT_FORGET_DENSITY
        scores = self._importance_for([task], "sta")[0] if method == "sta" else None
        if not isinstance(scaling, int | float):
            raise ConfigError(f"scaling must be a number, got {scaling!r}.")
        target_source, target_vector = self._forget_target(target)
        dtype = parse_dtype(torch_dtype)
        plan = self._plan(dtype)
        if scores is not None:
            global_threshold = self._global_thresholds([vector], [scores], params)
            params["global_threshold"] = global_threshold

        def edits() -> Iterator[tuple[TensorPlan, torch.Tensor, torch.Tensor | None, None]]:
            for item in plan:
                key = item.name
                theta_0 = self.base.get_tensor(key)
                theta = theta_0 if target_source is None else target_source.get_tensor(key)
                if target_vector is not None and key in target_vector:
                    theta = theta_0.float() + self._tau(target_vector, key, theta_0)
                if key not in vector:
                    yield item, theta, None, None
                    continue
                if scores is None:
                    edit = self._tau(vector, key, theta_0)
                else:
                    importance = scores[key] if key in scores else torch.zeros(item.shape)
                    edit = forget_delta(self._tau(vector, key, theta_0), importance, **params)
                yield item, theta, edit.mul_(-float(scaling)), None

        self._card_importance = [task] if scores is not None else []
        self.last_kept_fraction = {}
        recipe = {
            **self._recipe_inputs([task]),
            "forget": {
                "task": task,
                "method": method,
                "scaling": float(scaling),
                "target": str(target) if target else None,
                "params": {k: v for k, v in params.items() if k != "global_threshold"},
            },
        }
        head_tasks = [target] if isinstance(target, str) and target in self.task_vectors else []
        if as_adapter:
            recipe.update(output_format="adapter", adapter={"max_rank": max_rank, "energy": energy})
            if target_vector is not None or target_source is not None:
                raise ConfigError(
                    "forget(as_adapter=True) writes an adapter over the base model; target= must be None. (Forget "
                    "from a merged model by loading it as the base: STAMerger.from_task_vectors(merged, ...).)"
                )
        return self._emit(
            edits(),
            plan,
            recipe=recipe,
            head_tasks=head_tasks,
            output_dir=output_dir,
            overwrite=overwrite,
            max_shard_size=max_shard_size,
            adapter={"max_rank": max_rank, "energy": energy} if as_adapter else None,
        )

    def _forget_target(self, target: str | os.PathLike | None) -> tuple[TensorSource | None, TaskVector | None]:
        if target is None:
            return None, None
        if isinstance(target, str) and target in self.task_vectors:
            return None, self.task_vectors[target]
        source = open_checkpoint(target, name=str(target))
        for key in self.base.keys():
            if key not in source:
                raise CheckpointError(f"Forget target '{target}' has no tensor '{key}' (base tensor names expected).")
            if tuple(source.shape(key)) != tuple(self.base.shape(key)):
                raise CheckpointError(
                    f"Forget target '{target}': '{key}' has shape {list(source.shape(key))}, the base "
                    f"{list(self.base.shape(key))}."
                )
        return source, None

    def tune_forgetting(
        self,
        task: str,
        eval_fn: Callable[[Any], float],
        control_fn: Callable[[Any], float],
        *,
        scalings: Sequence[float] = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0),
        min_control: float = 0.95,
        method: str = "sta",
        target: str | os.PathLike | None = None,
        **params: Any,
    ) -> ForgettingCurve:
        """Pick the forgetting ``scaling`` as task-vector negation does: the largest drop of ``eval_fn`` (the
        forgotten task's metric) among the scalings whose ``control_fn`` stays ``>= min_control`` times its value on
        the unedited target. Each function receives the edited model (as :meth:`forget` returns it in memory)."""
        unedited = self.forget(task, scaling=0.0, method=method, target=target, **params)
        baseline = {"target": float(eval_fn(unedited)), "control": float(control_fn(unedited))}
        del unedited
        points = []
        for scaling in scalings:
            model = self.forget(task, scaling=scaling, method=method, target=target, **params)
            points.append(
                {"scaling": float(scaling), "target": float(eval_fn(model)), "control": float(control_fn(model))}
            )
            del model
        allowed = [p for p in points if p["control"] >= min_control * baseline["control"]]
        best = min(allowed, key=lambda p: (p["target"], p["scaling"])) if allowed else None
        return ForgettingCurve(
            task=task,
            method=method,
            baseline=baseline,
            points=points,
            min_control=min_control,
            best_scaling=best["scaling"] if best else None,
        )

    # -- save / push -------------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the result of the last :meth:`merge` or :meth:`forget` to ``save_directory`` (streamed: the result is
        recomputed tensor by tensor, never held), with its config, tokenizer, heads, recipe and model card."""
        if self._last_operation is None:
            raise ConfigError("Nothing to save: call merge(...) or forget(...) first.")
        kind, arguments = self._last_operation
        if kind == "merge":
            return self.run(arguments["config"], output_dir=save_directory, overwrite=overwrite)
        return self.forget(**arguments, output_dir=save_directory, overwrite=overwrite)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
        revision: str | None = None,
    ):
        """Save the last merge/forget to a temporary folder and upload it as one commit to ``repo_id``.

        ``create_repo(exist_ok=True)`` then ``upload_folder`` (weights go through LFS); returns the ``CommitInfo``.
        Upload errors propagate as ``huggingface_hub`` errors; nothing local is touched.
        """
        from huggingface_hub import HfApi

        if self._last_operation is None:
            raise ConfigError("Nothing to push: call merge(...) or forget(...) first.")
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        kind = self._last_operation[0]
        message = commit_message or f"hf_sta: {'merge' if kind == 'merge' else 'forget'} with hf_sta"
        with tempfile.TemporaryDirectory(prefix="hf_sta-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "model")
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=message,
                create_pr=create_pr,
                revision=revision,
                repo_type="model",
            )

    # -- write ---------------------------------------------------------------------------------------------------------
    def _emit(
        self,
        deltas: Iterator[tuple[TensorPlan, torch.Tensor, torch.Tensor | None]],
        plan: list[TensorPlan],
        *,
        recipe: dict[str, Any],
        head_tasks: list[str],
        output_dir: str | os.PathLike | None,
        overwrite: bool,
        max_shard_size: int | str,
        adapter: dict[str, Any] | None = None,
    ):
        """Write ``theta + delta`` for each ``(item, theta, delta)`` (or, with ``adapter``, the deltas as a LoRA
        adapter) to ``output_dir`` and return the path; without ``output_dir`` build the result in memory."""
        if output_dir is not None:
            check_output_dir(output_dir, overwrite)
            return self._write(deltas, plan, Path(output_dir), overwrite, recipe, head_tasks, max_shard_size, adapter)
        if not getattr(self.base, "config", None):
            if adapter is not None:
                raise ConfigError("An adapter result needs output_dir= when the base is not a transformers model.")
            return {name: tensor for name, tensor, _ in _full_tensors(deltas)}
        # A transformers model: stream to a private temporary folder and let transformers (and PEFT) load it, so
        # tied weights, buffers and the config are handled exactly as from_pretrained does.
        tmp_root = Path(tempfile.mkdtemp(prefix="hf_sta-"))
        try:
            folder = self._write(
                deltas, plan, tmp_root / "model", False, recipe, head_tasks, max_shard_size, adapter, card=False
            )
            if adapter is None:
                return load_transformers_model(folder, trust_remote_code=self.trust_remote_code)
            from peft import PeftModel

            base_model = load_transformers_model(self.base.folder, trust_remote_code=self.trust_remote_code)
            return PeftModel.from_pretrained(base_model, folder)
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)

    def _write(
        self,
        deltas: Iterator[tuple[TensorPlan, torch.Tensor, torch.Tensor | None]],
        plan: list[TensorPlan],
        output_dir: Path,
        overwrite: bool,
        recipe: dict[str, Any],
        head_tasks: list[str],
        max_shard_size: int | str,
        adapter: dict[str, Any] | None,
        *,
        card: bool = True,
    ) -> Path:
        with AtomicOutputDir(output_dir, overwrite=overwrite) as tmp:
            if adapter is not None:
                self._write_adapter(tmp, deltas, adapter, recipe)
            else:
                writer = StreamingSafetensorsWriter(
                    tmp,
                    plan,
                    max_shard_size=max_shard_size,
                    metadata={"hf_sta": "merge" if "merge" in recipe else "forget"},
                    background=True,
                    any_order=True,
                )
                tensors = _full_tensors(deltas)
                try:
                    with intra_op_threads():
                        for key, tensor, release in tensors:
                            writer.write(key, tensor, on_written=release)
                    writer.finish()
                finally:
                    tensors.close()  # stops the read-ahead thread, if the loop ended early
                    writer.abort()
            existing_card = output_dir / "README.md"
            if card and existing_card.is_file():  # overwriting: the card is updated, not replaced
                shutil.copy2(existing_card, tmp / "README.md")
            self._write_companions(
                tmp, recipe, head_tasks, plan, adapter=adapter is not None, card=card, output_dir=output_dir
            )
        logger.info("Wrote %s", output_dir)
        return output_dir

    def _write_adapter(self, folder: Path, deltas, options: dict[str, Any], recipe: dict[str, Any]) -> None:
        """The deltas as a PEFT LoRA adapter over the base (truncated SVD per module)."""
        from .io.adapters import lora_layouts, write_lora_adapter

        base_folder = getattr(self.base, "folder", None)
        if base_folder is not None and getattr(self.base, "config", None):
            layouts = lora_layouts(base_folder)
        else:
            layouts = {}
            for vector in self.task_vectors.values():
                layouts.update(getattr(vector, "layouts", {}))
        if options.get("max_rank") is None and options.get("energy") is None:
            raise ConfigError("An adapter output needs max_rank= or energy= to choose each module's LoRA rank.")
        report = write_lora_adapter(
            folder,
            ((item.name, delta) for item, _, delta, _ in deltas if delta is not None),
            base_model_name_or_path=self.sources.get("base"),
            max_rank=options.get("max_rank"),
            energy=options.get("energy"),
            layouts=layouts or None,
            non_lora="skip",
        )
        summary = report.summary()
        recipe["adapter"].update(
            {k: v for k, v in summary.items() if isinstance(v, int | float | str) or k == "skipped"}
        )
        self.last_adapter_report = report

    def _write_companions(
        self,
        folder: Path,
        recipe: dict[str, Any],
        head_tasks: list[str],
        plan,
        *,
        adapter: bool = False,
        card: bool = True,
        output_dir: Path | None = None,
    ) -> None:
        """Config/tokenizer from the base (full checkpoints), task heads, and the recipe next to the weights."""
        if not adapter:
            copy_aux_files(getattr(self.base, "folder", None), folder)
        out_dtypes = {item.dtype for item in plan if item.dtype.is_floating_point}
        config_path = folder / "config.json"
        if len(out_dtypes) == 1 and config_path.is_file():
            model_config = json.loads(config_path.read_text())
            dtype_name = str(out_dtypes.pop()).removeprefix("torch.")
            model_config["torch_dtype" if "torch_dtype" in model_config else "dtype"] = dtype_name
            config_path.write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")
        for task in head_tasks:
            vector = self.task_vectors[task]
            if getattr(vector, "head_keys", None):
                save_tensors(folder / HEADS_FOLDER / f"{task}.safetensors", vector.heads(), {"task": task})
        if card and self._card_importance:
            # The importance the result depends on travels with it, so the recipe re-runs anywhere.
            recipe["importance"] = {}
            for task in self._card_importance:
                path = self.importance[task].save(folder / IMPORTANCE_FOLDER / f"{task}.safetensors")
                recipe["importance"][task] = {"path": str((output_dir or folder).resolve() / path.relative_to(folder))}
        (folder / RECIPE_NAME).write_text(yaml.safe_dump(recipe, sort_keys=False))
        if not card:  # a private folder that only transformers reads back
            return
        from .card import write_model_card

        write_model_card(
            folder,
            recipe=recipe,
            kept_fraction=self.last_kept_fraction or None,
            importance={t: self.importance[t] for t in self._card_importance} or None,
            eval_results=self.eval_results,
            model_name=self.model_name,
        )

    def _recipe_inputs(self, tasks: list[str]) -> dict[str, Any]:
        """``base_model`` and the inputs by role (``models`` / ``adapters`` / ``task_vectors``) for recipe and card."""
        from .io.adapters import LoraTaskVector
        from .task_vector import StoredTaskVector

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


def _full_tensors(
    deltas: Iterator[tuple[TensorPlan, torch.Tensor, torch.Tensor | None, Callable[[], None] | None]],
) -> Iterator[tuple[str, torch.Tensor, Callable[[], None] | None]]:
    """``(name, theta + delta, release)`` in each tensor's planned dtype (math in fp32); ``release``, when not
    ``None``, is to be called once the tensor has been written. Closing it closes ``deltas``."""
    try:
        for item, theta, delta, release in deltas:
            if delta is None:
                yield item.name, theta.to(item.dtype), release
            else:
                yield item.name, delta.add_(theta.float()).to(item.dtype), release
    finally:
        close = getattr(deltas, "close", None)
        if close is not None:
            close()


@dataclasses.dataclass
class ForgettingCurve:
    """What :meth:`STAMerger.tune_forgetting` measured: one point per scaling, and the chosen one."""

    task: str
    method: str
    baseline: dict[str, float]
    points: list[dict[str, float]]
    min_control: float
    best_scaling: float | None


def load_transformers_model(folder: Path, *, trust_remote_code: bool = False):
    """Load a saved checkpoint with the class named in its config's ``architectures`` (``AutoModel`` otherwise)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        model_class = transformers.AutoModel
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return model_class.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
