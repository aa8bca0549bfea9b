"""``FusionConfig``: everything needed to rebuild a fused model around its sources (saved as ``fusion_config.json``)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError

FUSION_CONFIG_NAME = "fusion_config.json"
FUSION_WEIGHTS_NAME = "model.safetensors"
SOURCES_FOLDER = "sources"
FORMAT_VERSION = 1
_TASK_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")

__all__ = ["FUSION_CONFIG_NAME", "FUSION_WEIGHTS_NAME", "SOURCES_FOLDER", "FusionConfig", "check_task_names"]


def check_task_names(names: list[str], what: str) -> None:
    """Task names become module keys and folder names: letters, digits, ``_`` and ``-`` only, unique, non-empty."""
    if not names:
        raise ConfigError(f"{what}: at least one task is needed.")
    for name in names:
        if not isinstance(name, str) or not _TASK_NAME.match(name):
            raise ConfigError(f"{what}: task name {name!r} must use only letters, digits, '_' and '-'.")


@dataclass
class FusionConfig:
    """How the fusion module is built and which source each task reads.

    Attributes:
        tasks: task names, in order; task ``t``'s source is ``sources[t]``.
        num_labels: ``{task: n_t}``.
        fusion: ``"akf"`` (Adaptive Knowledge Fusion) or ``"concat"`` (simple fusion baseline).
        fusion_dim: common token width ``D`` of AKF.
        intra_layers / inter_layers: AKF Transformer layers with source-local / full attention.
        num_heads: attention heads of AKF.
        dropout: dropout of the fusion module.
        ffn_multiplier: AKF feed-forward width over ``D``.
        seed: seed of the fusion module's initialisation.
        sources: ``{task: spec}``; a spec records ``kind`` (``transformers`` / ``module``), ``reference`` (repo id,
            folder, or ``sources/<task>`` inside the saved folder when shipped), the decomposition (component layers,
            pooling) and reading options (label words, prompt, ...), and the widths checked on reload.
        source_lora: a PEFT ``LoraConfig`` as a dict when the sources were LoRA-tuned during fusion, else ``None``.
    """

    tasks: list[str]
    num_labels: dict[str, int]
    fusion: str = "akf"
    fusion_dim: int = 128
    intra_layers: int = 1
    inter_layers: int = 1
    num_heads: int = 4
    dropout: float = 0.1
    ffn_multiplier: int = 2
    seed: int = 0
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    source_lora: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        from .modules import FUSIONS

        check_task_names(list(self.tasks), "FusionConfig.tasks")
        if self.fusion not in FUSIONS:
            raise ConfigError(f"fusion={self.fusion!r}; expected one of {', '.join(FUSIONS)}.")
        missing = [t for t in self.tasks if t not in self.num_labels]
        if missing:
            raise ConfigError(f"num_labels is missing for task(s) {missing}.")
        if self.fusion == "akf" and self.fusion_dim % self.num_heads:
            raise ConfigError(f"fusion_dim={self.fusion_dim} must be divisible by num_heads={self.num_heads}.")
        if self.intra_layers < 0 or self.inter_layers < 0 or not 0.0 <= self.dropout < 1.0:
            raise ConfigError("intra_layers/inter_layers must be >= 0 and dropout in [0, 1).")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / FUSION_CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> FusionConfig:
        path = Path(folder) / FUSION_CONFIG_NAME
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"Cannot read the fused model's config '{path}': {err}") from err
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"'{path}' has format_version {data['format_version']}; this hf_sta reads <= 1.")
        try:
            return cls(**data)
        except TypeError as err:
            raise CheckpointError(f"'{path}' has unexpected fields: {err}") from err
