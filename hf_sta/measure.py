"""Measure: what a merge method needs from data, computed at each task's own fine-tuned model.

- importance scores (first-order Taylor, Fisher, magnitude; ``hf_sta.importance``), kept per task as
  :class:`ImportanceScores` and saved as safetensors;
- activation statistics (the Gram matrices of every linear layer's inputs, for RegMean;
  ``hf_sta.importance.activations``), saved the same way, so a site ships statistics, never data.

Both share one data path (``build_calibration_dataloader``: a ``datasets.Dataset``, raw text, or a ``DataLoader``) and
one accelerate loop (CPU, one GPU, or many processes whose sums are reduced once).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .config import parse_dtype
from .errors import CheckpointError, ConfigError
from .importance import (
    GRADIENT_STATISTIC,
    ActivationStatistics,
    ImportanceScores,
    accumulate_gradient_statistics,
    accumulate_input_grams,
    build_calibration_dataloader,
    check_metric,
    dataset_fingerprint,
    finish_importance,
)
from .importance.activations import linear_layers
from .importance.calibration import is_sharded
from .pool import TaskPool

logger = logging.getLogger(__name__)

__all__ = [
    "calibration_loader",
    "compute_activation_statistics",
    "compute_importance",
    "load_finetuned_model",
    "load_activation_statistics",
    "load_importance",
    "load_tokenizer",
    "load_transformers_model",
    "parameter_names",
]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars and info/warning logs off for the body (restored after): loading a folder hf_sta
    has just written itself (an in-memory result) is an implementation detail, not something to report."""
    from transformers.utils import logging as transformers_logging

    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


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


def load_finetuned_model(pool: TaskPool, task: str, *, trust_remote_code: bool = False) -> torch.nn.Module:
    """The task's model for calibration: its fine-tuned checkpoint, or (adapters, shipped task vectors) the base
    model with ``tau`` added to its weights, i.e. the adapted weights ``W_0 + delta_W`` with the update applied."""
    vector = pool.vector(task)
    folder = getattr(getattr(vector, "finetuned", None), "folder", None)
    if folder is not None:
        return load_transformers_model(folder, trust_remote_code=trust_remote_code)
    base_folder = getattr(pool.base, "folder", None)
    if base_folder is None or not getattr(pool.base, "config", None):
        raise ConfigError(
            f"Task '{task}' has no fine-tuned checkpoint and the base is not a transformers checkpoint: pass "
            "`model=` (and `loss_fn=` for models without a loss)."
        )
    model = load_transformers_model(base_folder, trust_remote_code=trust_remote_code)
    state = model.state_dict()
    with torch.no_grad():
        for key in vector.keys():
            if key not in state:
                raise CheckpointError(f"Tensor '{key}' of task '{task}' is not in the base model's state dict.")
            state[key].add_(vector.get(key).to(state[key].dtype))
    return model


def load_tokenizer(pool: TaskPool, task: str, data: Any, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer next to the task's fine-tuned checkpoint or the base: it tokenizes raw text and pads tokenized
    rows of unequal length. ``None`` for tokenized data when there is none (rows are then collated as they are)."""
    from transformers import AutoTokenizer

    for folder in (
        getattr(getattr(pool.vector(task), "finetuned", None), "folder", None),
        getattr(pool.base, "folder", None),
    ):
        if folder is not None and any(
            (folder / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
        ):
            return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if "input_ids" in getattr(data, "column_names", []):
        return None
    raise ValueError(f"No tokenizer found for task '{task}': pass `tokenizer=` or tokenized data.")


def parameter_names(pool: TaskPool, task: str, model: torch.nn.Module) -> dict[str, str]:
    """``{model state-dict key: task-vector key}`` for every tensor of the task vector."""
    vector = pool.vector(task)
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


def default_accelerator(accelerator: Any = None) -> Any:
    """``accelerator``, or a fresh ``Accelerator`` that lets processes hold uneven batch counts."""
    if accelerator is not None:
        return accelerator
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    return Accelerator(dataloader_config=DataLoaderConfiguration(even_batches=False))


def calibration_loader(
    pool: TaskPool,
    task: str,
    model: torch.nn.Module,
    data: Any,
    accelerator: Any,
    *,
    tokenizer: Any = None,
    needs_labels: bool = True,
    trust_remote_code: bool = False,
    **options: Any,
) -> Any:
    """The micro-batches of ``data`` for ``task`` (``options``: num_samples, micro_batch_size, collate_fn,
    text_column, label_column, max_length), split across processes under ``accelerate launch``. Raw text is cut at
    ``max_length`` tokens, itself capped at the model's ``max_position_embeddings`` (a longer row would index past
    the position table)."""
    config = getattr(model, "config", None)
    causal_lm = any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0 and options.get("max_length", 512) > positions:
        logger.info("max_length %s capped at the model's max_position_embeddings %d.", options.get("max_length", 512),
                    positions)  # fmt: skip
        options["max_length"] = positions
    if tokenizer is None and not isinstance(data, torch.utils.data.DataLoader):
        tokenizer = load_tokenizer(pool, task, data, trust_remote_code=trust_remote_code)
    loader = build_calibration_dataloader(
        data, tokenizer=tokenizer, causal_lm=causal_lm, needs_labels=needs_labels, **options
    )
    # Data parallel: each process its share of the batches. A sharded model (FSDP2) runs collectives in every forward
    # and backward pass: every process takes every batch.
    split = accelerator.num_processes > 1 and not is_sharded(model)
    return accelerator.prepare_data_loader(loader) if split else loader


def compute_importance(
    pool: TaskPool,
    task: str,
    data: Any = None,
    *,
    metric: str = "taylor",
    model: torch.nn.Module | None = None,
    loss_fn: Callable | None = None,
    accelerator: Any = None,
    torch_dtype: str | torch.dtype | None = None,
    gradient_checkpointing: bool = False,
    show_progress: bool = True,
    trust_remote_code: bool = False,
    **loader_options: Any,
) -> ImportanceScores:
    """Importance of every tensor of ``task`` for ``metric`` (see :meth:`STAMerger.compute_importance`)."""
    vector = pool.vector(task)
    statistic = GRADIENT_STATISTIC[check_metric(metric)]
    samples = micro_batches = 0
    if statistic is None:
        scores = {
            key: finish_importance(metric, gradient_statistic=None, task_vector=vector.get(key))
            for key in vector.keys()
        }
    else:
        if data is None:
            raise ValueError(f"Importance metric '{metric}' needs calibration data for task '{task}'.")
        model = model if model is not None else load_finetuned_model(pool, task, trust_remote_code=trust_remote_code)
        dtype = parse_dtype(torch_dtype)
        model = model.to(dtype) if dtype is not None else model
        names = parameter_names(pool, task, model)
        accelerator = default_accelerator(accelerator)
        loader = calibration_loader(
            pool, task, model, data, accelerator, needs_labels=loss_fn is None, trust_remote_code=trust_remote_code,
            **loader_options,
        )  # fmt: skip
        gradients, micro_batches, samples = accumulate_gradient_statistics(
            model,
            loader,
            statistic=statistic,
            parameter_names=names,
            loss_fn=loss_fn,
            num_samples=loader_options.get("num_samples"),
            accelerator=accelerator,
            gradient_checkpointing=gradient_checkpointing,
            show_progress=show_progress,
            description=f"importance[{task}]",
        )
        scores = _finish_scores(vector, model, names, metric, gradients)
    return ImportanceScores.from_dict(
        scores,
        metric=metric,
        num_samples=samples,
        micro_batches=micro_batches,
        model_hash=vector.model_hash,
        dataset_fingerprint=dataset_fingerprint(data) if data is not None else None,
        task=task,
    )


def _finish_scores(vector, model, names: dict[str, str], metric: str, gradients: dict[str, torch.Tensor]) -> dict:
    state = model.state_dict()
    inverse = {base_key: model_key for model_key, base_key in names.items()}
    scores = {}
    for key in vector.keys():
        theta = _whole(state[inverse[key]]).detach().cpu() if metric == "taylor" else None
        tau = vector.get(key) if metric == "taylor_delta" else None
        scores[key] = finish_importance(metric, gradient_statistic=gradients[key], theta=theta, task_vector=tau)
    return scores


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value: gathered from the processes when it is a shard of an FSDP2 model."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _check_same_model(what: str, saved_hash: str | None, task: str, model_hash: str) -> None:
    """A measurement saved with a model hash belongs to that model only."""
    if saved_hash and saved_hash != model_hash:
        raise CheckpointError(
            f"{what} computed on another model (hash {saved_hash}) than task '{task}' (hash {model_hash})."
        )


def load_importance(pool: TaskPool, task: str, path: str | os.PathLike) -> ImportanceScores:
    """Importance saved by ``ImportanceScores.save``; refuses scores of another model or of other tensors."""
    vector = pool.vector(task)
    scores = ImportanceScores.load(path)
    _check_same_model(f"Importance file '{path}' was", scores.model_hash, task, vector.model_hash)
    for key in vector.keys():
        if key not in scores:
            raise CheckpointError(f"Importance file '{path}' has no scores for tensor '{key}' of task '{task}'.")
        if tuple(scores.scores.shape(key)) != tuple(vector.shape(key)):
            raise CheckpointError(
                f"Importance for '{key}' in '{path}' has shape {list(scores.scores.shape(key))}, the task vector "
                f"{list(vector.shape(key))}."
            )
    return scores


def compute_activation_statistics(
    pool: TaskPool,
    task: str,
    data: Any,
    *,
    model: torch.nn.Module | None = None,
    forward_fn: Callable | None = None,
    accelerator: Any = None,
    torch_dtype: str | torch.dtype | None = None,
    show_progress: bool = True,
    trust_remote_code: bool = False,
    **loader_options: Any,
) -> ActivationStatistics:
    """Gram matrices of the inputs of every linear layer of ``task``'s fine-tuned model on ``data``, keyed by the
    base's tensor names (see :meth:`STAMerger.compute_activation_statistics`)."""
    vector = pool.vector(task)
    if data is None:
        raise ValueError(
            f"compute_activation_statistics needs calibration data for task '{task}' (a datasets.Dataset, raw text "
            "or a DataLoader)."
        )
    model = model if model is not None else load_finetuned_model(pool, task, trust_remote_code=trust_remote_code)
    dtype = parse_dtype(torch_dtype)
    model = model.to(dtype) if dtype is not None else model
    names = parameter_names(pool, task, model)
    accelerator = default_accelerator(accelerator)
    loader = calibration_loader(
        pool, task, model, data, accelerator, needs_labels=False, trust_remote_code=trust_remote_code, **loader_options
    )
    grams, layouts, num_tokens, samples = accumulate_input_grams(
        model,
        loader,
        modules={name: names[name] for name in _weight_names(model) if name in names},
        accelerator=accelerator,
        forward_fn=forward_fn,
        num_samples=loader_options.get("num_samples"),
        progress=show_progress,
        description=f"activations[{task}]",
    )
    return ActivationStatistics(
        grams=grams,
        layouts=layouts,
        num_tokens=num_tokens,
        num_samples=samples,
        model_hash=vector.model_hash,
        dataset_fingerprint=dataset_fingerprint(data),
        task=task,
    )


def load_activation_statistics(pool: TaskPool, task: str, path: str | os.PathLike) -> ActivationStatistics:
    """Statistics saved by ``ActivationStatistics.save``; refuses Grams of another model or of other shapes."""
    vector = pool.vector(task)
    stats = ActivationStatistics.load(path)
    _check_same_model(f"Activation statistics '{path}' were", stats.model_hash, task, vector.model_hash)
    for key in stats.keys():
        if key not in pool.base:
            raise CheckpointError(f"Activation statistics '{path}' have a Gram for '{key}', not a tensor of the base.")
        shape = tuple(pool.base.shape(key))
        size = shape[1] if stats.layouts[key] == "out_in" else shape[0]
        if len(shape) != 2 or tuple(stats.grams[key].shape) != (size, size):
            raise CheckpointError(
                f"Activation statistics '{path}': the Gram of '{key}' has shape {list(stats.grams[key].shape)}, the "
                f"weight {list(shape)} needs [{size}, {size}]."
            )
    return stats


def _weight_names(model: torch.nn.Module) -> list[str]:
    return [f"{module}.weight" if module else "weight" for module in linear_layers(model)]
