"""``STAMerger.compress``: keep the tasks a device needs and prune the structures they do not (load -> measure ->
select -> combine -> write; the math lives in ``scoring`` / ``prune`` / ``recovery``).

```python
merged = merger.merge(method="sta", output_dir="merged")
path = merger.compress("merged", keep_tasks=["sst2", "news"], data={"sst2": ds1, "news": ds2}, target=0.5,
                       output_dir="edge")          # weights, config, tokenizer, heads/, hf_sta_compression.json, card
```
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..io.checkpoints import AtomicOutputDir, check_output_dir, copy_aux_files, save_tensors
from ..layout import HEADS_FOLDER
from .architecture import ParameterBudget, Widths, architecture_spec, non_embedding_parameters
from .prune import PrunePlan, build_pruned_model, plan_structures, solve_widths
from .recovery import distill
from .scoring import FUSIONS, IMPORTANCES, TaskHead, fuse, task_scores

logger = logging.getLogger(__name__)

__all__ = ["COMPRESSION_RECORD", "CompressMixin", "CompressionConfig", "CompressionResult", "compress_model",
           "save_compressed"]  # fmt: skip

COMPRESSION_RECORD = "hf_sta_compression.json"


@dataclass
class CompressionConfig:
    """How to compress (see :meth:`CompressMixin.compress` for each field's meaning and default)."""

    keep_tasks: list[str]
    target: float | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    head_ratio: float | None = None
    neuron_ratio: float | None = None
    importance: str = "taylor"
    fusion: str = "mean"
    num_samples: int | None = 128
    micro_batch_size: int = 8
    max_length: int = 128
    multiple_of: int = 1
    recovery_steps: int = 0
    recovery_lr: float = 5e-5
    recovery_temperature: float = 2.0
    recovery_hidden_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.keep_tasks, str) or not self.keep_tasks:
            raise ConfigError(f"compress: keep_tasks must be a non-empty list of task names, got {self.keep_tasks!r}.")
        self.keep_tasks = list(dict.fromkeys(self.keep_tasks))
        if self.importance not in IMPORTANCES:
            raise ConfigError(
                f"compress: importance must be one of {', '.join(IMPORTANCES)}, got {self.importance!r}."
            )
        if self.fusion not in FUSIONS:
            raise ConfigError(f"compress: fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}.")
        if self.recovery_steps < 0 or self.micro_batch_size < 1:
            raise ConfigError("compress: recovery_steps must be >= 0 and micro_batch_size >= 1.")

    @property
    def needs_data(self) -> bool:
        return self.importance == "taylor" or self.recovery_steps > 0


@dataclass
class CompressionResult:
    """The compressed model (same class as the input), the kept tasks' heads and the record written as
    ``hf_sta_compression.json``."""

    model: nn.Module
    heads: dict[str, TaskHead]
    record: dict[str, Any]
    plan: PrunePlan = field(repr=False)


def _loader(data: Any, *, tokenizer: Any, causal_lm: bool, config: CompressionConfig, needs_labels: bool):
    from ..importance import build_calibration_dataloader

    columns = getattr(data, "column_names", None) or []
    if causal_lm and tokenizer is None and "input_ids" in columns and "labels" not in columns:
        # Tokenized rows collated as they are: next-token labels are the inputs, padding (mask 0) ignored.
        def add_labels(row: dict) -> dict:
            mask = row.get("attention_mask") or [1] * len(row["input_ids"])
            return {"labels": [t if m else -100 for t, m in zip(row["input_ids"], mask, strict=True)]}

        data = data.map(add_labels, desc="causal LM labels")
    return build_calibration_dataloader(
        data, num_samples=config.num_samples, micro_batch_size=config.micro_batch_size, tokenizer=tokenizer,
        causal_lm=causal_lm, max_length=config.max_length, needs_labels=needs_labels,
    )  # fmt: skip


def _rule(config: CompressionConfig) -> dict[str, str]:
    groups = {
        "taylor": "sum over the structure's rows/columns of mean_j |theta * g_j| (group Taylor importance)",
        "magnitude": "sum over the structure's rows/columns of |theta| (data-free)",
        "random": f"uniform random scores (seed {config.seed})",
    }
    return {
        "importance": config.importance,
        "group_score": groups[config.importance],
        "normalisation": "per task and structure kind (groups, neurons, layers): scores divided by their sum",
        "fusion": config.fusion,
        "selection": "per layer, the top-k key/value groups and FFN neurons (k uniform); the top layers",
    }


def _score_key(task: str, index: int, config: CompressionConfig, data: Any, custom_loss: bool) -> tuple | None:
    """What one task's scores depend on besides the model; ``None`` when that cannot be told (no fingerprint)."""
    from ..importance import dataset_fingerprint

    if config.importance == "magnitude":
        return ("magnitude",)
    if config.importance == "random":
        return ("random", config.seed + index)
    if custom_loss or data is None:
        return None
    if isinstance(data, torch.utils.data.DataLoader):
        # Its batches come from its own collate function and batch size: only the same loader object gives the same
        # scores (the key holds it, so its id is not reused).
        return (task, "taylor", data, config.num_samples)
    fingerprint = dataset_fingerprint(data)
    if fingerprint is None:
        return None
    return (task, "taylor", fingerprint, config.num_samples, config.micro_batch_size, config.max_length)


def _calibration_loaders(model, heads, data, config, tokenizer, loss_fn) -> dict[str, Any]:
    """One loader per kept task when the ranking or recovery reads data (checked: every kept task has data)."""
    unknown = sorted(set(data) - set(config.keep_tasks))
    if unknown:
        raise ConfigError(f"compress: data= has tasks that are not kept: {', '.join(unknown)} (keep_tasks).")
    if not config.needs_data:  # magnitude / random rankings without recovery read no data
        return {}
    loaders = {}
    for task in config.keep_tasks:
        if task not in data:
            raise ConfigError(f"compress: no calibration data for kept task '{task}' (data={{'{task}': ...}}).")
        causal_lm = not heads[task].tensors and type(model).__name__.endswith("ForCausalLM")
        loaders[task] = _loader(data[task], tokenizer=tokenizer, causal_lm=causal_lm, config=config,
                                needs_labels=task not in loss_fn)  # fmt: skip
    return loaders


def _all_task_scores(model, spec, widths, heads, data, loaders, config, loss_fn, cache, show_progress) -> dict:
    """``{task: StructureScores}`` of every kept task, taken from ``cache`` when the same inputs were scored."""
    per_task = {}
    for index, task in enumerate(config.keep_tasks):
        key = _score_key(task, index, config, data.get(task), task in loss_fn)
        if cache is not None and key is not None and key in cache:
            per_task[task] = cache[key]
            continue
        per_task[task] = task_scores(
            model, spec, widths, importance=config.importance, head=heads[task], loader=loaders.get(task),
            loss_fn=loss_fn.get(task), num_samples=config.num_samples, seed=config.seed + index,
            show_progress=show_progress, task=task,
        )  # fmt: skip
        if cache is not None and key is not None:
            cache[key] = per_task[task]
    return per_task


def _record(config, plan, original, widths, model, pruned, spec, budget, loaders, recovery) -> dict[str, Any]:
    """What ``hf_sta_compression.json`` holds (kept_tasks, rule, layers, then sizes and settings)."""
    before, after = budget.count(original), non_embedding_parameters(pruned, spec)
    return {
        "kept_tasks": list(config.keep_tasks),
        "rule": _rule(config),
        "layers": plan.record(),
        "target": config.target,
        "original": {**original.as_dict(), "non_embedding_parameters": before,
                     "parameters": sum(p.numel() for p in model.parameters())},
        "compressed": {**widths.as_dict(), "non_embedding_parameters": after,
                       "parameters": sum(p.numel() for p in pruned.parameters())},
        "kept_fraction": after / before,
        "calibration": {"num_samples": config.num_samples, "micro_batch_size": config.micro_batch_size,
                        "tasks": sorted(loaders)} if loaders else None,
        "recovery": recovery,
        "config": asdict(config),
    }  # fmt: skip


def compress_model(
    model: nn.Module,
    heads: Mapping[str, TaskHead],
    data: Mapping[str, Any] | None,
    config: CompressionConfig,
    *,
    tokenizer: Any = None,
    loss_fn: Mapping[str, Callable] | None = None,
    show_progress: bool = False,
    cache: dict | None = None,
    recovery_callback: Callable[[int, nn.Module], None] | None = None,
    eval_fn: Callable[[nn.Module, str], float] | None = None,
) -> CompressionResult:
    """Score, select and build the compressed model in memory (``model`` is left unchanged). ``cache``: a dict kept
    by the caller for this one model, in which per-task scores are reused across calls (same data fingerprint,
    ranking and calibration settings). ``recovery_callback(step, model)``: called after each recovery step.
    ``eval_fn(model, task) -> accuracy``: measured on the compressed and the uncompressed model for every kept task
    (``record["accuracy"]``, ``record["uncompressed_accuracy"]``; the card shows both)."""
    spec = architecture_spec(model)
    original = Widths.of(model.config)
    budget = ParameterBudget.of(model, spec, original)
    widths = solve_widths(
        original, budget, spec, target=config.target, num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        head_ratio=config.head_ratio, neuron_ratio=config.neuron_ratio, multiple_of=config.multiple_of,
    )  # fmt: skip
    data, loss_fn = dict(data or {}), dict(loss_fn or {})
    loaders = _calibration_loaders(model, heads, data, config, tokenizer, loss_fn)
    per_task = _all_task_scores(model, spec, original, heads, data, loaders, config, loss_fn, cache, show_progress)
    plan = plan_structures(fuse(per_task, config.fusion), original, widths)
    pruned = build_pruned_model(model, spec, plan, original)
    recovery = None
    if config.recovery_steps:
        recovery = distill(
            pruned, model, heads, loaders, steps=config.recovery_steps, lr=config.recovery_lr,
            temperature=config.recovery_temperature, hidden_weight=config.recovery_hidden_weight, seed=config.seed,
            show_progress=show_progress, callback=recovery_callback,
        )  # fmt: skip
        recovery.update(lr=config.recovery_lr, temperature=config.recovery_temperature,
                        hidden_weight=config.recovery_hidden_weight)  # fmt: skip
    record = _record(config, plan, original, widths, model, pruned, spec, budget, loaders, recovery)
    if eval_fn is not None:
        record["accuracy"] = {task: float(eval_fn(pruned, task)) for task in config.keep_tasks}
        record["uncompressed_accuracy"] = {task: float(eval_fn(model, task)) for task in config.keep_tasks}
    logger.info("compress: %d -> %d non-embedding parameters (%.1f%%)", record["original"]["non_embedding_parameters"],
                record["compressed"]["non_embedding_parameters"], 100 * record["kept_fraction"])  # fmt: skip
    return CompressionResult(pruned, {task: heads[task] for task in config.keep_tasks}, record, plan)


def save_compressed(
    result: CompressionResult,
    output_dir: str | os.PathLike,
    *,
    source_folder: Path | None = None,
    overwrite: bool = False,
    accuracy: Mapping[str, float] | None = None,
    model_name: str | None = None,
    base_model: str | None = None,
) -> Path:
    """Write the compressed checkpoint atomically: safetensors + config (``save_pretrained``), tokenizer files from
    ``source_folder``, ``heads/<task>.safetensors`` for kept tasks with a head, ``hf_sta_compression.json``, card."""
    from .card import write_compressed_card

    output = Path(output_dir)
    with AtomicOutputDir(output, overwrite=overwrite) as tmp:
        result.model.save_pretrained(tmp)
        copy_aux_files(source_folder, tmp)  # the tokenizer; config.json is already the compressed one
        for task, head in result.heads.items():
            if head.tensors:
                save_tensors(tmp / HEADS_FOLDER / f"{task}.safetensors", head.tensors, {"task": task})
        record = {**result.record}
        if accuracy or "accuracy" not in record:
            record["accuracy"] = {task: float(value) for task, value in accuracy.items()} if accuracy else None
        record["file_size_bytes"] = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        (tmp / COMPRESSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        write_compressed_card(tmp, record, model_name=model_name or output.name, base_model=base_model)
    return output


def _load_model(model_or_folder: Any, trust_remote_code: bool) -> tuple[nn.Module, Path | None]:
    from ..measure import load_transformers_model

    if isinstance(model_or_folder, nn.Module):
        return model_or_folder, None
    if isinstance(model_or_folder, str | os.PathLike):
        folder = Path(model_or_folder)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"compress: '{folder}' is not a transformers checkpoint folder (no config.json).")
        return load_transformers_model(folder, trust_remote_code=trust_remote_code), folder
    raise ConfigError(
        f"compress: model_or_folder must be a transformers model or a folder, got {type(model_or_folder).__name__}."
    )


class CompressMixin:
    """``compress``: structured pruning of a multi-task model for the kept tasks (mixed into ``STAMerger``)."""

    last_compression: dict[str, Any] | None = None

    def compress(
        self,
        model_or_folder: nn.Module | str | os.PathLike,
        keep_tasks: Sequence[str],
        data: Mapping[str, Any] | None = None,
        target: float | None = None,
        *,
        num_attention_heads: int | None = None,
        intermediate_size: int | None = None,
        num_hidden_layers: int | None = None,
        head_ratio: float | None = None,
        neuron_ratio: float | None = None,
        importance: str = "taylor",
        fusion: str = "mean",
        num_samples: int | None = 128,
        micro_batch_size: int = 8,
        max_length: int = 128,
        multiple_of: int = 1,
        recovery_steps: int = 0,
        recovery_lr: float = 5e-5,
        recovery_temperature: float = 2.0,
        recovery_hidden_weight: float = 1.0,
        seed: int = 0,
        loss_fn: Mapping[str, Callable] | None = None,
        tokenizer: Any = None,
        eval_fn: Callable[[nn.Module, str], float] | None = None,
        accuracy: Mapping[str, float] | None = None,
        recovery_callback: Callable[[int, nn.Module], None] | None = None,
        output_dir: str | os.PathLike | None = None,
        overwrite: bool = False,
        show_progress: bool = True,
    ):
        """Prune whole key/value groups (with their query heads), FFN neurons and optionally layers of a multi-task
        model (a merge's folder or in-memory model), ranked by the kept tasks' group Taylor importance.

        ``keep_tasks``: the tasks the device needs (their heads are kept, others dropped). ``data``: ``{task:
        calibration data}`` for each kept task (a ``datasets.Dataset``, tokenized or raw ``text``, or a
        ``DataLoader``); gradients are taken on the model with the task's own head (``loss_fn={task: fn(model,
        batch)}`` overrides ``model(**batch).loss``). ``target``: fraction of non-embedding parameters kept, in
        (0, 1); or give the widths directly: ``num_attention_heads`` (a multiple of the query heads per key/value
        group; decoders only), ``intermediate_size``, ``num_hidden_layers`` (also allowed with ``target``, which then
        sets the widths left); or as ratios kept, in (0, 1]: ``head_ratio`` (of the key/value groups, rounded; whole
        groups go) and ``neuron_ratio`` (of ``intermediate_size``). ``importance``: ``taylor`` | ``magnitude`` | ``random`` (baselines). ``fusion``:
        ``mean`` | ``max`` over the per-task normalised scores. ``multiple_of``: round ``intermediate_size`` down
        to a multiple (faster kernels). ``recovery_steps``: distillation steps from the uncompressed model (0: off;
        see ``hf_sta.compression.recovery``; ``recovery_callback(step, model)`` is called after each step).
        ``eval_fn(model, task) -> float``: the kept tasks' accuracy, measured on the compressed and on the uncompressed
        model (``model`` is of the class compressed, e.g. a ``BertModel`` body: apply the task's head yourself),
        recorded and shown in the card; or ``accuracy``: ``{task: accuracy}`` measured elsewhere.
        ``output_dir``: write the folder and return its path; else return the compressed model (its record in
        :attr:`last_compression`, its heads in :attr:`last_compression_heads`).
        """
        config = CompressionConfig(
            keep_tasks=list(keep_tasks), target=target, num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers, head_ratio=head_ratio,
            neuron_ratio=neuron_ratio, importance=importance,
            fusion=fusion, num_samples=num_samples, micro_batch_size=micro_batch_size, max_length=max_length,
            multiple_of=multiple_of, recovery_steps=recovery_steps, recovery_lr=recovery_lr,
            recovery_temperature=recovery_temperature, recovery_hidden_weight=recovery_hidden_weight, seed=seed,
        )  # fmt: skip
        if output_dir is not None:
            check_output_dir(output_dir, overwrite)  # fail before any work
        model, folder = _load_model(model_or_folder, getattr(self, "trust_remote_code", False))
        heads = {task: self._compression_head(task, folder) for task in config.keep_tasks}
        if tokenizer is None and config.needs_data and data:
            tokenizer = self._compression_tokenizer(
                folder, config.keep_tasks[0], (data or {}).get(config.keep_tasks[0])
            )
        # Scores of a folder's model are reused by later calls on the same folder (sizes, rankings, recovery differ).
        cache = self._compression_cache(folder)
        result = compress_model(model, heads, data, config, tokenizer=tokenizer, loss_fn=loss_fn,
                                show_progress=show_progress, cache=cache, recovery_callback=recovery_callback,
                                eval_fn=eval_fn)  # fmt: skip
        self.last_compression, self.last_compression_heads = result.record, result.heads
        if output_dir is None:
            return result.model
        base = getattr(getattr(self, "pool", None), "base", None)
        source = folder or getattr(base, "folder", None)
        return save_compressed(result, output_dir, source_folder=source, overwrite=overwrite, accuracy=accuracy,
                               base_model=(getattr(self, "sources", None) or {}).get("base"))  # fmt: skip

    def _compression_cache(self, folder: Path | None) -> dict | None:
        """Per-task structure scores of ``folder``'s model, keyed by the folder and its weights' size and mtime."""
        if folder is None:
            return None
        files = sorted(folder.glob("*.safetensors"))
        key = (str(folder.resolve()), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
        caches = self.__dict__.setdefault("_compression_scores", {})
        return caches.setdefault(key, {})

    def _compression_head(self, task: str, folder: Path | None) -> TaskHead:
        """The task's head: ``<folder>/heads/<task>.safetensors`` when the merge wrote one, else the head of its
        fine-tuned checkpoint; the architecture comes from that checkpoint's config. Adapters: no head."""
        from safetensors.torch import load_file

        tasks = list(getattr(self, "tasks", []) or [])
        vector = self.pool.vector(task) if task in tasks else None
        finetuned = getattr(vector, "finetuned", None)
        config = getattr(finetuned, "config", None)
        path = folder / HEADS_FOLDER / f"{task}.safetensors" if folder is not None else None
        if path is not None and path.is_file():
            tensors = load_file(path)
        elif vector is not None:
            tensors = vector.heads() if getattr(vector, "head_keys", None) else {}
        else:
            raise ConfigError(f"compress: unknown task '{task}' in keep_tasks; tasks: {', '.join(tasks) or 'none'}.")
        if tensors and not config:
            raise ConfigError(f"compress: task '{task}' has a head but no fine-tuned config to say its architecture.")
        return TaskHead(dict(tensors), dict(config) if config else None)

    def _compression_tokenizer(self, folder: Path | None, task: str, data: Any) -> Any:
        from transformers import AutoTokenizer

        from ..measure import load_tokenizer

        if folder is not None and any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(folder, trust_remote_code=self.trust_remote_code)
        if data is None or isinstance(data, torch.utils.data.DataLoader):
            return None
        return load_tokenizer(self.pool, task, data, trust_remote_code=self.trust_remote_code)
