"""Configuration dataclasses shared by the Python API, the YAML recipes and the CLI."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError

_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def validate_task_name(name: object) -> str:
    """Task names become file names (``heads/<task>.safetensors``): letters, digits, ``_``, ``-``, ``.``; no paths."""
    if not isinstance(name, str) or not _TASK_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"Task name {name!r} is not a safe file name: use 1-128 letters, digits, '_', '-' or '.', starting with a "
            "letter or digit, without '..' or path separators."
        )
    return name


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``torch.bfloat16`` / ``None`` -> ``torch.dtype | None``; other values raise ``ConfigError``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and dtype not in _DTYPES.values():
            raise ConfigError(f"torch_dtype must be one of {sorted(_DTYPES)}, got {dtype}.")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ConfigError(f"torch_dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
    return _DTYPES[name]


@dataclass
class MergeConfig:
    """How to combine task vectors: ``theta = theta_0 + scaling * method({tau_t}, weights, **params)``.

    Args:
        method: a registered merge method (``hf_sta.methods.list_merge_methods()``).
        scaling: the global coefficient lambda applied to the combined delta; ``None`` (the default): the method's
            ``default_scaling`` (1 for every method but ``sta``), filled in when the config is built.
        weights: per-task weights (a mapping task -> weight, or a list in task order, or ``"num_samples"`` for
            shipped task vectors); default 1 each.
        tasks: the tasks to merge (default: all loaded tasks).
        params: the method's own parameters (``density``, ``majority_sign_method``, ...).
        seed: seeds random methods (DARE); each tensor draws from ``seed`` and its name, so results do not depend
            on the order tensors are processed in.
        torch_dtype: output dtype of floating tensors (default: the base's).
        max_shard_size: output shard budget, as in ``save_pretrained``.
        output_format: ``"full"`` checkpoint or ``"adapter"`` (PEFT LoRA of the merged delta, by truncated SVD).
        max_rank, energy: LoRA rank of each module of an adapter output: ``max_rank``, or the smallest rank keeping
            ``energy`` of the squared singular values (capped by ``max_rank`` when both are given).
    """

    method: str = "task_arithmetic"
    scaling: float | None = None
    weights: dict[str, float] | list[float] | str | None = None
    tasks: list[str] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    torch_dtype: str | None = None
    max_shard_size: str | int = "5GB"
    output_format: str = "full"
    max_rank: int | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        if self.scaling is None:
            from .methods import get_merge_method

            try:
                self.scaling = get_merge_method(self.method).default_scaling
            except ValueError:  # an unknown method: validated() names it
                pass

    def validated(self) -> MergeConfig:
        """A copy with the method's parameters checked and defaults filled; raises ``ValueError`` when invalid."""
        from .methods import get_merge_method

        spec = get_merge_method(self.method)
        # None means "the method's default" (e.g. STA's density when a threshold is used instead).
        params = spec.validate_params({k: v for k, v in self.params.items() if v is not None})
        if not isinstance(self.scaling, int | float) or not torch.isfinite(torch.tensor(float(self.scaling))):
            raise ConfigError(f"scaling must be a finite number, got {self.scaling!r}.")
        parse_dtype(self.torch_dtype)
        if self.output_format not in ("full", "adapter"):
            raise ConfigError(f"output_format must be 'full' or 'adapter', got {self.output_format!r}.")
        if self.output_format == "adapter" and self.max_rank is None and self.energy is None:
            raise ConfigError("output_format='adapter' needs max_rank or energy to choose the LoRA ranks.")
        if self.max_rank is not None and (not isinstance(self.max_rank, int) or self.max_rank < 1):
            raise ConfigError(f"max_rank must be an int >= 1, got {self.max_rank!r}.")
        if self.energy is not None and not 0.0 < float(self.energy) <= 1.0:
            raise ConfigError(f"energy must be in (0, 1], got {self.energy!r}.")
        return dataclasses.replace(self, params=params, scaling=float(self.scaling))
