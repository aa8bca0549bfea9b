"""Fine-tune a sequence classifier from a base checkpoint on a text dataset and save it (what ``hf-sta finetune`` runs).

```python
from hf_sta.training import FinetuneConfig, finetune_classifier

folder, result = finetune_classifier(
    "sentence-transformers/all-MiniLM-L6-v2", dataset, "out/news-sam", FinetuneConfig(optimizer="sam")
)
```

The labels of ``label_column`` become the classes: a ``datasets.ClassLabel`` keeps its names; integer labels
``0..K-1`` are named ``"0"..."K-1"``; string labels are sorted and numbered. The folder holds the model
(``AutoModelForSequenceClassification`` with a new head and ``id2label``), its tokenizer and
:data:`TRAINING_RECORD` (the :class:`~hf_sta.training.FinetuneConfig`, the data columns, training time per step and
the loss per epoch). It is built in a temporary sibling and moved into place only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..io.checkpoints import AtomicOutputDir
from .loop import FinetuneConfig, FinetuneResult, finetune, text_classification_collator

__all__ = ["TRAINING_RECORD", "class_labels", "finetune_classifier"]

TRAINING_RECORD = "hf_sta_training.json"


def class_labels(dataset: Any, label_column: str = "label") -> tuple[list[str], list[int]]:
    """``(class names, label id of every row)`` of ``dataset[label_column]`` (module docstring: the three cases)."""
    if label_column not in dataset.column_names:
        raise ConfigError(f"label column '{label_column}' not in the data (columns: {sorted(dataset.column_names)})")
    feature = dataset.features.get(label_column)
    values = list(dataset[label_column])
    if hasattr(feature, "names") and hasattr(feature, "str2int"):  # datasets.ClassLabel
        return list(feature.names), [int(v) for v in values]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if min(values) < 0:
            raise ConfigError(f"label column '{label_column}': integer labels must be >= 0, got {min(values)}")
        return [str(i) for i in range(max(values) + 1)], values
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        index = {name: i for i, name in enumerate(names)}
        return names, [index[v] for v in values]
    kinds = sorted({type(v).__name__ for v in values})
    raise ConfigError(f"label column '{label_column}': labels must be all integers or all strings, got {kinds}")


def finetune_classifier(
    base: str | os.PathLike,
    dataset: Any,
    output_dir: str | os.PathLike,
    config: FinetuneConfig | None = None,
    *,
    text_column: str = "text",
    label_column: str = "label",
    max_length: int = 128,
    num_samples: int | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    show_progress: bool = True,
) -> tuple[Path, FinetuneResult]:
    """Fine-tune ``AutoModelForSequenceClassification`` from ``base`` on ``dataset`` with :func:`finetune` (AdamW,
    SAM or ASAM as ``config`` says) and save it to ``output_dir``; returns the folder and the run's measurements.

    ``num_samples``: use only the first rows. The output folder is checked (exists and not ``overwrite``, or is an
    input or the working directory) before any training; ``torch.manual_seed(config.seed)`` fixes the new head.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config = config or FinetuneConfig()
    if text_column not in dataset.column_names:
        raise ConfigError(f"text column '{text_column}' not in the data (columns: {sorted(dataset.column_names)})")
    if num_samples is not None:
        dataset = dataset.select(range(min(num_samples, len(dataset))))
    names, labels = class_labels(dataset, label_column)
    rows = [{"text": text, "label": label} for text, label in zip(dataset[text_column], labels)]
    inputs = {"base": base} if Path(base).exists() else None
    with AtomicOutputDir(output_dir, overwrite=overwrite, inputs=inputs) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code)
        torch.manual_seed(config.seed)  # the new head (and dropout)
        model = AutoModelForSequenceClassification.from_pretrained(
            base,
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)},
            trust_remote_code=trust_remote_code,
        )
        collate = text_classification_collator(tokenizer, max_length=max_length)
        result = finetune(model, rows, collate, config, show_progress=show_progress)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {
            "base_model": str(base),
            "config": {**dataclasses.asdict(config), "rho": config.resolved_rho},
            "data": {
                "rows": len(rows),
                "text_column": text_column,
                "label_column": label_column,
                "max_length": max_length,
                "labels": names,
            },  # fmt: skip
            "train_seconds": result.train_seconds,
            "steps": result.steps,
            "seconds_per_step": result.seconds_per_step,
            "epoch_losses": result.epoch_losses,
            "torch_threads": torch.get_num_threads(),
        }
        (tmp / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return Path(output_dir), result
