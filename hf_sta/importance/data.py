"""Calibration data: a ``datasets.Dataset`` (raw text or tokenized) or a ready ``DataLoader`` -> micro-batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader


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
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
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
