"""Calibration data: a ``datasets.Dataset`` (raw text or tokenized) or a ready ``DataLoader`` -> micro-batches."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..errors import CalibrationDataError, ConfigError


def dataset_fingerprint(data: Any) -> str | None:
    """The ``datasets`` fingerprint of the calibration data, when there is one (recorded with the importance)."""
    dataset = getattr(data, "dataset", data)
    fingerprint = getattr(dataset, "_fingerprint", None)
    return str(fingerprint) if fingerprint is not None else None


def build_calibration_dataloader(
    data: Any,
    *,
    num_samples: int | None,
    micro_batch_size: int,
    tokenizer: Any = None,
    collate_fn: Callable | None = None,
    causal_lm: bool = False,
    text_column: str = "text",
    label_column: str = "label",
    max_length: int = 512,
    needs_labels: bool = True,
) -> DataLoader:
    """Micro-batches of ``micro_batch_size`` over the first ``num_samples`` rows of ``data``.

    A ``DataLoader`` is returned as it is (its own batch size is the micro-batch). A ``datasets.Dataset`` is cut to
    ``num_samples`` rows (in order: the calibration set is reproducible), tokenized from ``text_column`` with
    ``tokenizer`` unless it already has ``input_ids``, and collated: causal LMs get ``labels = input_ids`` (padding
    ignored), classifiers get their ``label_column`` as ``labels``.
    """
    check_num_samples(num_samples)
    if isinstance(data, DataLoader):
        return data
    if not hasattr(data, "select") or not hasattr(data, "column_names"):
        raise TypeError(
            f"Calibration data must be a datasets.Dataset or a torch DataLoader, got {type(data).__name__}."
        )
    if len(data) == 0:
        raise ValueError("The calibration dataset is empty.")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}.")
    if num_samples is not None:
        data = data.select(range(min(num_samples, len(data))))
    columns = set(data.column_names)
    if "input_ids" not in columns:
        if tokenizer is None:
            raise ValueError("The calibration dataset is not tokenized (no 'input_ids'): pass `tokenizer=`.")
        if text_column not in columns:
            raise ValueError(f"The calibration dataset has no '{text_column}' column (columns: {sorted(columns)}).")
        data = data.map(
            lambda rows: tokenizer(rows[text_column], truncation=True, max_length=max_length),
            batched=True,
            desc="tokenizing calibration data",
        )
    if not causal_lm:
        if label_column in data.column_names and "labels" not in data.column_names:
            data = data.rename_column(label_column, "labels")
        if needs_labels and "labels" not in data.column_names:
            raise ValueError(
                f"The calibration dataset has no '{label_column}' or 'labels' column and the model is not a causal LM; "
                "add labels or pass `loss_fn(model, batch)`."
            )
    keep = {"input_ids", "attention_mask", "token_type_ids", "labels", "pixel_values"}
    data = data.remove_columns([c for c in data.column_names if c not in keep])
    if collate_fn is None:
        if tokenizer is None:
            from transformers import default_data_collator

            collate_fn = default_data_collator
        elif causal_lm:
            from transformers import DataCollatorForLanguageModeling

            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            collate_fn = DataCollatorForLanguageModeling(tokenizer, mlm=False)
        else:
            from transformers import DataCollatorWithPadding

            collate_fn = DataCollatorWithPadding(tokenizer)
    return DataLoader(data, batch_size=micro_batch_size, shuffle=False, collate_fn=collate_fn)


def check_num_samples(num_samples: Any) -> int | None:
    """``num_samples`` is ``None`` (all the data) or an integer ``>= 1``; else :class:`ConfigError` naming it."""
    if num_samples is None:
        return None
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples must be an integer >= 1 (or None: all the data), got {num_samples!r}.")
    return num_samples


def batch_size(batch: Any) -> int:
    """Samples in a micro-batch: ``accelerate.utils.find_batch_size`` (the first tensor's first dimension), 1 when
    the batch holds no tensor with one."""
    from accelerate.utils import find_batch_size

    try:
        return int(find_batch_size(batch))
    except (TypeError, ValueError, IndexError):
        return 1


def describe_batch(batch: Any) -> str:
    """``input_ids [8, 128] int64, labels [8] int64``: the shapes and dtypes of a batch's tensors, for errors."""
    items = (
        batch.items()
        if isinstance(batch, Mapping)
        else enumerate(batch if isinstance(batch, list | tuple) else [batch])
    )
    parts = [f"{name} {list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
             for name, value in items if isinstance(value, torch.Tensor)]  # fmt: skip
    return ", ".join(parts) or type(batch).__name__


def check_calibration_batch(model: torch.nn.Module, batch: Any, index: int) -> None:
    """Refuse a batch the model cannot take, before its forward pass: ``input_ids`` that are not ``[batch, sequence]``
    or hold ids outside the input embedding's vocabulary. Raises :class:`CalibrationDataError` with the batch's
    index and shapes (and the vocabulary size)."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if not isinstance(ids, torch.Tensor):
        return
    if ids.dim() != 2:
        raise CalibrationDataError(
            f"Calibration batch {index} ({describe_batch(batch)}): input_ids must be [batch, sequence], got "
            f"{ids.dim()} dimension(s)."
        )
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is not None and ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise CalibrationDataError(
            f"Calibration batch {index} ({describe_batch(batch)}): token ids range over [{int(ids.min())}, "
            f"{int(ids.max())}], but the model's vocabulary has {vocab} entries (ids 0..{vocab - 1}). Data tokenized "
            "for another model?"
        )


def calibration_failure(index: int, batch: Any, error: Exception) -> CalibrationDataError:
    """The error a failed forward/backward pass on calibration batch ``index`` is re-raised as."""
    message = " ".join(str(error).split()) or type(error).__name__
    return CalibrationDataError(f"Calibration batch {index} ({describe_batch(batch)}) failed in the model: {message}")
