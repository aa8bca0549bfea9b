"""A PEFT LoRA adapter as a lazy task vector on the base model's tensor names (the format is in ``io.adapters``)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .io.adapters import (
    _FACTOR_KEY,
    _IGNORED_VARIANT_TENSORS,
    ADAPTER_CONFIG_NAME,
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    PEFT_KEY_PREFIX,
    LoraLayout,
    _check_finite,
    check_supported_adapter,
    lora_delta_weight,
    lora_rank_and_scaling,
    resolve_adapter,
)
from .io.checkpoints import CheckpointReader, TensorSource, fingerprint, open_checkpoint
from .task_vector import TaskVector, base_model_prefix

__all__ = ["LoraTaskVector"]


@dataclass
class _LoraPart:
    module: str  # name in the PEFT-wrapped model, e.g. "model.layers.0.self_attn.q_proj"
    a_key: str
    b_key: str
    layout: LoraLayout
    rank: int
    scaling: float


@dataclass
class _Entry:
    """What makes up ``tau[base_key]``: a fully saved tensor (``saved - base``), a LoRA product, a LoRA bias."""

    full_key: str | None = None
    lora: _LoraPart | None = None
    bias: tuple[str, float] | None = None  # (lora_B.bias key, scaling)


class LoraTaskVector(TaskVector):
    """A PEFT LoRA adapter as a lazy task vector on the base model's tensor names.

    ``tau[key]`` (fp32, the base tensor's shape) sums: ``scaling * (B @ A)`` in the module's :data:`LoraLayout`;
    ``scaling * lora_B.bias`` for ``<module>.bias`` with ``lora_bias=True``; ``saved - base`` for tensors the adapter
    saves in full (``modules_to_save``, trained biases, embedding layers saved beside their LoRA). Full tensors the
    base lacks (a ``modules_to_save`` classification head) are not merged: see :attr:`head_keys` / :meth:`heads`.
    Each call materialises one module's dense delta.

    Attributes: ``adapter_config`` (the parsed ``adapter_config.json``), ``path`` (adapter folder), ``weights_file``,
    ``layouts`` (base key -> layout of its LoRA), ``ranks`` (base key -> r), ``base``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        base: TensorSource,
        *,
        name: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.base = base
        config_path = self.path / ADAPTER_CONFIG_NAME
        if not config_path.is_file():
            raise CheckpointError(f"'{self.path}' is not a PEFT adapter folder: it has no {ADAPTER_CONFIG_NAME}.")
        try:
            self.adapter_config: dict[str, Any] = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"Cannot read '{config_path}': {err}") from err
        check_supported_adapter(self.adapter_config, str(self.path))
        if (self.path / ADAPTER_SAFE_WEIGHTS_NAME).is_file():
            self.weights_file = self.path / ADAPTER_SAFE_WEIGHTS_NAME
        elif (self.path / ADAPTER_WEIGHTS_NAME).is_file():
            self.weights_file = self.path / ADAPTER_WEIGHTS_NAME
        else:
            raise CheckpointError(
                f"Adapter '{self.path}' has no weights ({ADAPTER_SAFE_WEIGHTS_NAME} or {ADAPTER_WEIGHTS_NAME})."
            )
        self.name = name or self.path.name
        self.reader = CheckpointReader(self.weights_file, name=self.name)
        self._prefix = base_model_prefix(getattr(base, "config", None))
        self._entries: dict[str, _Entry] = {}
        self._heads: list[str] = []
        self._index()
        self._keys = [key for key in base.keys() if key in self._entries]
        self._key_set = set(self._keys)

    @classmethod
    def from_pretrained(
        cls,
        adapter_path_or_repo_id: str | os.PathLike,
        base: TensorSource | str | os.PathLike | Mapping[str, torch.Tensor],
        *,
        name: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        subfolder: str | None = None,
    ) -> LoraTaskVector:
        """Read an adapter folder or Hub repo (``revision``/``token``/``subfolder`` as in PEFT) against ``base``."""
        folder = resolve_adapter(adapter_path_or_repo_id, revision=revision, token=token, subfolder=subfolder)
        if not hasattr(base, "get_tensor"):
            base = open_checkpoint(base, name="base")  # type: ignore[arg-type]
        return cls(folder, base, name=name)  # type: ignore[arg-type]

    # -- indexing ------------------------------------------------------------------------------------------------------
    def _where(self, key: str) -> str:
        return f"tensor '{key}' of adapter file '{self.weights_file}'"

    def _base_key(self, name: str) -> str | None:
        """The base tensor for a PEFT-model tensor name, reconciling ``base_model_prefix`` as transformers does."""
        if name in self.base:
            return name
        prefix = self._prefix
        if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1 :] in self.base:
            return name[len(prefix) + 1 :]
        if prefix and f"{prefix}.{name}" in self.base:
            return f"{prefix}.{name}"
        return None

    def _entry(self, base_key: str) -> _Entry:
        return self._entries.setdefault(base_key, _Entry())

    def _index(self) -> None:
        factors: dict[str, dict[str, str]] = {}
        for key in self.reader.keys():
            name = key[len(PEFT_KEY_PREFIX) :] if key.startswith(PEFT_KEY_PREFIX) else key
            match = _FACTOR_KEY.match(name)
            if match:
                slot = match["factor"] + ("_bias" if match["param"] == "bias" else "")
                if slot == "lora_A_bias" or (match["factor"].startswith("lora_embedding") and match["param"]):
                    raise CheckpointError(f"Unexpected LoRA {self._where(key)}.")
                factors.setdefault(match["module"], {})[slot] = key
                continue
            parts = name.split(".")
            if any(p.startswith(_IGNORED_VARIANT_TENSORS) for p in parts):
                continue
            if any(p.startswith("lora_") for p in parts) or "token_adapter" in parts:
                raise CheckpointError(
                    f"The adapter holds {self._where(key)}, a tensor of a LoRA variant hf_sta does not support yet "
                    "(only lora_A / lora_B / lora_embedding_A / lora_embedding_B factors and fully saved modules)."
                )
            self._index_full(key, self._normalise_full_name(parts))
        for module, slots in factors.items():
            self._index_lora(module, slots)

    @staticmethod
    def _normalise_full_name(parts: list[str]) -> str:
        """``x.base_layer.bias`` -> ``x.bias``; ``x.modules_to_save.default.weight`` -> ``x.weight``."""
        out: list[str] = []
        skip_next = False
        for part in parts:
            if skip_next:
                skip_next = False
                continue
            if part == "base_layer":
                continue
            if part == "modules_to_save":
                skip_next = True  # the adapter name, in state dicts saved without PEFT's key clean-up
                continue
            out.append(part)
        return ".".join(out)

    def _index_full(self, key: str, name: str) -> None:
        base_key = self._base_key(name)
        if base_key is None:
            self._heads.append(key)  # e.g. a modules_to_save classifier the base model does not have
            return
        if self.base.shape(base_key) != self.reader.shape(key):
            raise CheckpointError(
                f"The adapter saves {self._where(key)} in full with shape {list(self.reader.shape(key))}, but the "
                f"base '{self.base.name}' has {list(self.base.shape(base_key))} for '{base_key}' (resized "
                "vocabulary? another base model?)."
            )
        if not self.reader.dtype(key).is_floating_point:
            return
        entry = self._entry(base_key)
        if entry.full_key is not None:
            raise CheckpointError(f"The adapter saves '{base_key}' twice ({entry.full_key} and {key}).")
        entry.full_key = key

    def _index_lora(self, module: str, slots: dict[str, str]) -> None:
        embedding = "lora_embedding_A" in slots or "lora_embedding_B" in slots
        a_slot, b_slot = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        if a_slot not in slots or b_slot not in slots:
            present = ", ".join(sorted(slots.values()))
            raise CheckpointError(
                f"Adapter file '{self.weights_file}' has an incomplete LoRA for module '{module}': needs {a_slot} and "
                f"{b_slot}, found {present}."
            )
        a_key, b_key = slots[a_slot], slots[b_slot]
        a_shape, b_shape = self.reader.shape(a_key), self.reader.shape(b_key)
        weight_name = f"{module}.weight"
        base_key = self._base_key(weight_name)
        if base_key is None:
            hint = ""
            if f"{module}.in_proj_weight" in self.base:
                hint = " (LoRA on nn.MultiheadAttention, which hf_sta does not support yet)"
            raise CheckpointError(
                f"The adapter's {self._where(a_key)} adapts module '{module}', but the base '{self.base.name}' has no "
                f"tensor '{weight_name}'{hint}. Is this adapter for another base model?"
            )
        base_shape = tuple(self.base.shape(base_key))
        rank, scaling = lora_rank_and_scaling(self.adapter_config, module)
        if len(a_shape) < 2 or len(b_shape) < 2 or a_shape[0] != rank:
            raise CheckpointError(
                f"The adapter's {self._where(a_key)} has shape {list(a_shape)} but the config gives rank r={rank} for "
                f"module '{module}' (rank_pattern/r)."
            )
        if b_shape[1] != rank:
            raise CheckpointError(
                f"The adapter's {self._where(b_key)} has shape {list(b_shape)}: its inner dimension {b_shape[1]} should "
                f"be the rank r={rank} of module '{module}' ({a_key} has shape {list(a_shape)})."
            )
        layout = self._layout(module, a_key, a_shape, b_shape, base_shape)
        product_shape = self._product_shape(layout, a_shape, b_shape)
        if product_shape != base_shape:
            raise CheckpointError(
                f"The adapter's LoRA for module '{module}' ({self._where(a_key)} {list(a_shape)}, B {list(b_shape)}) "
                f"gives a delta of shape {list(product_shape)}, but the base '{self.base.name}' has "
                f"{list(base_shape)} for '{base_key}'. Is this adapter for another base model?"
            )
        self._entry(base_key).lora = _LoraPart(module, a_key, b_key, layout, rank, scaling)
        if "lora_B_bias" in slots:
            bias_key = self._base_key(f"{module}.bias")
            bias_shape = self.reader.shape(slots["lora_B_bias"])
            if bias_key is None or tuple(self.base.shape(bias_key)) != tuple(bias_shape):
                raise CheckpointError(
                    f"The adapter's {self._where(slots['lora_B_bias'])} (lora_bias=True) needs a bias '{module}.bias' "
                    f"of shape {list(bias_shape)} in the base '{self.base.name}', which it lacks."
                )
            self._entry(bias_key).bias = (slots["lora_B_bias"], scaling)

    def _layout(
        self,
        module: str,
        a_key: str,
        a_shape: tuple[int, ...],
        b_shape: tuple[int, ...],
        base_shape: tuple[int, ...],
    ) -> LoraLayout:
        if "lora_embedding" in a_key:
            return "embedding"
        if len(a_shape) > 2:
            if b_shape[1] != a_shape[0] or any(d != 1 for d in b_shape[2:]):
                raise CheckpointError(
                    f"The adapter's LoRA for conv module '{module}' has B of shape {list(b_shape)} for rank "
                    f"{a_shape[0]}: a grouped convolution, which hf_sta does not support yet."
                )
            return "conv"
        product = (b_shape[0], a_shape[1])
        if product == product[::-1]:  # square: only the config can tell nn.Linear from Conv1D
            return "linear_transposed" if self.adapter_config.get("fan_in_fan_out") else "linear"
        # PEFT sets fan_in_fan_out per module type (nn.Linear: False, Conv1D: True) whatever the config says.
        return "linear_transposed" if base_shape == product[::-1] else "linear"

    @staticmethod
    def _product_shape(layout: LoraLayout, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple[int, ...]:
        if layout == "conv":
            return (b_shape[0], *a_shape[1:])
        if layout == "linear":
            return (b_shape[0], a_shape[1])
        return (a_shape[1], b_shape[0])

    # -- TaskVector API ------------------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return self._keys

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.base.shape(key))

    def _delta(self, key: str, base_tensor: torch.Tensor | None) -> torch.Tensor:
        entry = self._entries[key]
        delta: torch.Tensor | None = None
        if entry.full_key is not None:
            theta = self.reader.get_tensor(entry.full_key)
            _check_finite(theta, f"Tensor '{entry.full_key}' of '{self.weights_file}'")
            theta_0 = self.base.get_tensor(key) if base_tensor is None else base_tensor
            delta = theta.float() - theta_0.float()
        if entry.lora is not None:
            part = entry.lora
            product = lora_delta_weight(
                self.reader.get_tensor(part.a_key),
                self.reader.get_tensor(part.b_key),
                scaling=part.scaling,
                layout=part.layout,
            )
            delta = product if delta is None else delta.add_(product)
        if entry.bias is not None:
            bias_key, scaling = entry.bias
            product = self.reader.get_tensor(bias_key).float() * scaling
            delta = product if delta is None else delta.add_(product)
        assert delta is not None
        return _check_finite(delta, f"Task vector '{self.name}' at '{key}'")

    # -- extras --------------------------------------------------------------------------------------------------------
    @property
    def layouts(self) -> dict[str, LoraLayout]:
        """Base key -> :data:`LoraLayout` of each LoRA-adapted weight (pass to :func:`write_lora_adapter`)."""
        return {k: e.lora.layout for k, e in self._entries.items() if e.lora is not None}

    @property
    def ranks(self) -> dict[str, int]:
        return {k: e.lora.rank for k, e in self._entries.items() if e.lora is not None}

    @property
    def head_keys(self) -> list[str]:
        """Adapter tensors saved in full for modules the base lacks (``modules_to_save`` heads): kept per task."""
        return list(self._heads)

    def heads(self) -> dict[str, torch.Tensor]:
        """The head tensors, by their name in the PEFT-wrapped model (``base_model.model.`` removed)."""
        return {k.removeprefix(PEFT_KEY_PREFIX): self.reader.get_tensor(k) for k in self._heads}

    def is_untrained(self) -> bool:
        """Every ``lora_B`` factor is zero and nothing is saved in full: PEFT's initialisation, a zero task vector
        (reads the ``lora_B`` factors, which are small)."""
        entries = list(self._entries.values())
        if not entries or any(entry.full_key is not None or entry.bias is not None for entry in entries):
            return False
        return all(not self.reader.get_tensor(e.lora.b_key).any() for e in entries if e.lora is not None)

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.adapter_config.get("base_model_name_or_path")

    @property
    def model_hash(self) -> str:
        """Content hash of the adapter's weights file."""
        if not hasattr(self, "_model_hash"):
            self._model_hash = fingerprint(self.reader)
        return self._model_hash

    def __repr__(self) -> str:
        return (
            f"LoraTaskVector(name='{self.name}', path='{self.path}', tensors={len(self._keys)}, "
            f"lora_modules={len(self.layouts)}, heads={len(self._heads)})"
        )
