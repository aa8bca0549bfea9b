"""How much each parameter matters to a task: metrics, the calibration loop, and the saved score files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..io.checkpoints import CheckpointReader, StateDictSource, TensorSource, save_tensors
from .activations import ActivationStatistics, accumulate_input_grams
from .calibration import accumulate_gradient_statistics
from .data import build_calibration_dataloader, dataset_fingerprint
from .metrics import GRADIENT_STATISTIC, METRICS, check_metric, finish_importance

__all__ = [
    "ActivationStatistics",
    "ImportanceScores",
    "accumulate_input_grams",
    "accumulate_gradient_statistics",
    "build_calibration_dataloader",
    "dataset_fingerprint",
    "finish_importance",
    "check_metric",
    "GRADIENT_STATISTIC",
    "METRICS",
]


@dataclass
class ImportanceScores:
    """Per-parameter importance of one task: tensors named like the task vector, plus how they were computed.

    Saved as one safetensors file (``importance.safetensors``) whose metadata records ``metric``, ``num_samples``,
    ``micro_batches``, ``dataset_fingerprint`` and ``model_hash``, so scores can be computed where the data lives and
    shipped without it.
    """

    scores: TensorSource
    metric: str
    num_samples: int
    micro_batches: int
    model_hash: str | None = None
    dataset_fingerprint: str | None = None
    task: str | None = None

    def keys(self) -> list[str]:
        return self.scores.keys()

    def __contains__(self, key: object) -> bool:
        return key in self.scores

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.scores.get_tensor(key).float()

    @property
    def metadata(self) -> dict[str, str]:
        meta = {
            "hf_sta_kind": "importance",
            "metric": self.metric,
            "num_samples": str(self.num_samples),
            "micro_batches": str(self.micro_batches),
        }
        for key in ("model_hash", "dataset_fingerprint", "task"):
            if getattr(self, key) is not None:
                meta[key] = str(getattr(self, key))
        return meta

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the scores and their metadata to ``path`` atomically (a temporary sibling, then ``os.replace``);
        an existing ``path`` is refused unless ``overwrite``."""
        path = Path(path)
        save_tensors(path, {key: self[key] for key in self.keys()}, self.metadata, overwrite=overwrite)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ImportanceScores:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Importance file '{path}' does not exist.")
        with safe_open(path, framework="pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("hf_sta_kind") != "importance" or "metric" not in meta:
            raise CheckpointError(f"'{path}' is not an hf_sta importance file (no importance metadata).")
        return cls(
            scores=CheckpointReader(path),
            metric=check_metric(meta["metric"]),
            num_samples=int(meta.get("num_samples", 0)),
            micro_batches=int(meta.get("micro_batches", 0)),
            model_hash=meta.get("model_hash"),
            dataset_fingerprint=meta.get("dataset_fingerprint"),
            task=meta.get("task"),
        )

    @classmethod
    def from_dict(cls, scores: dict[str, torch.Tensor], **info) -> ImportanceScores:
        return cls(scores=StateDictSource(scores, name="importance"), **info)
