"""Forget / retain data -> the three kinds of batches unlearning reads, with the checks on them.

Each side is one data source (a ``datasets.Dataset`` with text and labels, tokenized rows, or a ``DataLoader``) or a
mapping ``{name: source}`` (e.g. one per task of a multi-task model, each scored through its own ``loss_fn[name]``).
Per source: *sensitivity* micro-batches (the first ``sensitivity_samples`` examples, in order), *training* batches
(shuffled, cycled), and for the forget side *metric* batches (the first ``eval_samples`` examples).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..errors import ConfigError
from ..importance import build_calibration_dataloader

__all__ = ["Source", "check_disjoint", "cycle", "named", "per_source", "prepare_sources"]

_SENSITIVITY_MICRO_BATCH = 8
_METRIC_BATCH = 32


@dataclasses.dataclass
class Source:
    """One data source of one side, ready to read."""

    name: str
    loader: DataLoader
    """Every example, in order (the user's own loader for ``DataLoader`` input)."""
    sensitivity: Any
    train: DataLoader
    metric: Any
    loss_fn: Callable
    predict_fn: Callable | None


def named(value: Any, side: str, default_name: str) -> dict[str, Any]:
    """``{name: source}``: a mapping as it is, else ``{default_name: value}``."""
    if isinstance(value, Mapping):
        if not value:
            raise ConfigError(f"unlearn: {side} is an empty mapping.")
        return dict(value)
    return {default_name: value}


def per_source(value: Any, what: str, names: list[str]) -> dict[str, Any]:
    """``loss_fn`` / ``predict_fn`` for each source: one callable for all, or a mapping with every name."""
    if not isinstance(value, Mapping):
        return dict.fromkeys(names, value)
    missing = [name for name in names if name not in value]
    if missing:
        raise ConfigError(f"unlearn: {what} has no entry for data source(s) {', '.join(missing)}.")
    return {name: value[name] for name in names}


def _subset(loader: DataLoader, count: int, batch_size: int) -> Any:
    dataset = loader.dataset
    if not hasattr(dataset, "select"):  # a user's DataLoader: its own first batches, kept to be read again
        return list(itertools.islice(loader, max(1, -(-count // (loader.batch_size or 1)))))
    subset = dataset.select(range(min(count, len(dataset))))
    return DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=loader.collate_fn)


def _build(data: Any, side: str, name: str, *, tokenizer: Any, config: Any, causal_lm: bool) -> tuple[DataLoader, Any]:
    if data is None or (hasattr(data, "__len__") and len(data) == 0):
        raise ConfigError(f"unlearn: {side} '{name}' is empty.")
    try:
        loader = build_calibration_dataloader(
            data, num_samples=None, micro_batch_size=config.batch_size, tokenizer=tokenizer, causal_lm=causal_lm,
            max_length=config.max_length,
        )  # fmt: skip
    except (TypeError, ValueError) as error:
        raise ConfigError(f"unlearn: {side} '{name}': {error}") from error
    if not hasattr(loader.dataset, "select"):
        return loader, loader
    generator = torch.Generator().manual_seed(config.seed)
    train = DataLoader(loader.dataset, batch_size=config.batch_size, shuffle=True, generator=generator,
                       collate_fn=loader.collate_fn)  # fmt: skip
    return loader, train


def prepare_sources(
    data: Any, side: str, loss_fn: Any, predict_fn: Any, *, tokenizer: Any, config: Any, causal_lm: bool = False
) -> list[Source]:
    """The :class:`Source` list of one side (``side``: ``"forget_data"`` or ``"retain_data"``)."""
    sources = named(data, side, side.removesuffix("_data"))
    names = list(sources)
    losses = per_source(loss_fn, "loss_fn", names)
    predicts = per_source(predict_fn, "predict_fn", names)
    result = []
    for name, value in sources.items():
        loader, train = _build(value, side, name, tokenizer=tokenizer, config=config, causal_lm=causal_lm)
        result.append(Source(
            name=name, loader=loader, train=train, loss_fn=losses[name], predict_fn=predicts[name],
            sensitivity=_subset(loader, config.sensitivity_samples, _SENSITIVITY_MICRO_BATCH),
            metric=_subset(loader, config.eval_samples, _METRIC_BATCH),
        ))  # fmt: skip
    return result


def _example_digests(loader: Any) -> Iterator[str]:
    """One digest per example: its tokens (padding removed) or, without ``input_ids``, every input tensor's row."""
    for batch in loader:
        if not isinstance(batch, Mapping):
            raise ConfigError("unlearn: batches must be dicts of tensors (as a transformers collator makes them).")
        if "input_ids" in batch:
            ids, mask = batch["input_ids"], batch.get("attention_mask")
            rows = [ids[i][mask[i].bool()] if mask is not None else ids[i] for i in range(ids.shape[0])]
        else:
            tensors = [v for k, v in sorted(batch.items()) if k != "labels" and isinstance(v, torch.Tensor)]
            rows = [torch.cat([t[i].flatten().float() for t in tensors]) for i in range(tensors[0].shape[0])]
        for row in rows:
            yield hashlib.sha1(row.cpu().numpy().tobytes()).hexdigest()


def check_disjoint(forget: list[Source], retain: list[Source]) -> int:
    """Raise :class:`ConfigError` if an example (same tokens) is in both the forget and the retain data, or a side
    holds no example; returns the number of forget examples."""
    seen: dict[str, str] = {}
    for source in forget:
        count = 0
        for digest in _example_digests(source.loader):
            seen.setdefault(digest, source.name)
            count += 1
        if count == 0:
            raise ConfigError(f"unlearn: forget data '{source.name}' holds no example.")
    for source in retain:
        count = 0
        for index, digest in enumerate(_example_digests(source.loader)):
            count += 1
            if digest in seen:
                raise ConfigError(
                    f"unlearn: retain data '{source.name}' example {index} is also in the forget data "
                    f"('{seen[digest]}'): the retain set must not overlap the forget set."
                )
        if count == 0:
            raise ConfigError(f"unlearn: retain data '{source.name}' holds no example.")
    return len(seen)


def cycle(loader: DataLoader) -> Iterator[Any]:
    """Batches of ``loader`` epoch after epoch (a new shuffle each epoch)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ConfigError("unlearn: a training data source yields no batch.")
