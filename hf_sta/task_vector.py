"""Task vectors: ``tau_t = theta_t - theta_0`` per named tensor, computed lazily from checkpoints on disk.

A :class:`TaskVector` is a read-only mapping from the *base* model's tensor names to fp32 deltas. Nothing is read until a
tensor is asked for, so a task vector of a multi-GB model costs nothing to build. Arithmetic (``+``, ``-``, unary
``-``, scalar ``*``, ``sum([...])``) builds lazy linear combinations; :meth:`TaskVector.apply_to` and
:meth:`TaskVector.save` stream them.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError
from .io.checkpoints import (
    MERGEABLE_DTYPES,
    CheckpointReader,
    StateDictSource,
    StreamingSafetensorsWriter,
    TensorPlan,
    TensorSource,
    atomic_file_path,
    fingerprint,
    open_checkpoint,
)
from .methods.selection import blocks

logger = logging.getLogger(__name__)

# transformers head classes whose label-dependent heads are never merged (kept per task instead).
HEAD_ARCHITECTURE_SUFFIXES = (
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForImageClassification",
    "ForAudioClassification",
    "ForMultipleChoice",
)
# Float tensors that are statistics, not trained parameters: copied from the base, never merged.
STATISTIC_SUFFIXES = ("running_mean", "running_var")


def base_model_prefix(config: Mapping | None) -> str | None:
    """The ``base_model_prefix`` of the transformers class for ``config['model_type']`` (``"bert"``, ``"model"``)."""
    if not config or "model_type" not in config:
        return None
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

        class_name = MODEL_MAPPING_NAMES.get(config["model_type"])
        model_class = getattr(transformers, class_name) if class_name else None
    except Exception:  # an unknown or broken transformers install: no prefix reconciliation
        return None
    return getattr(model_class, "base_model_prefix", None) or None


def is_head_architecture(config: Mapping | None) -> bool:
    architectures = (config or {}).get("architectures") or []
    return any(arch.endswith(HEAD_ARCHITECTURE_SUFFIXES) for arch in architectures)


@dataclass
class KeyAlignment:
    """How a fine-tuned checkpoint's tensor names map onto the base's.

    ``pairs`` maps base name -> fine-tuned name for mergeable floating tensors; ``heads`` lists fine-tuned names kept
    per task (absent from the base, or matched by the task-specific patterns); ``copied`` lists base names taken from
    the base unchanged (integer/bool buffers, normalisation statistics, the base's own copy of a task-specific
    tensor).
    """

    pairs: dict[str, str] = field(default_factory=dict)
    heads: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)


def align_keys(
    base: TensorSource,
    finetuned: TensorSource,
    *,
    task_specific: str | Iterable[str] | None = "auto",
) -> KeyAlignment:
    """Match tensor names of ``finetuned`` to ``base``, reconciling ``base_model_prefix`` as transformers does.

    ``task_specific="auto"`` treats as heads the tensors outside the base model of a classification architecture
    (``classifier.*`` of ``BertForSequenceClassification``, ``score.*`` of ``LlamaForSequenceClassification``), never a
    causal LM's ``lm_head``. A list of ``fnmatch`` patterns (matched on fine-tuned names) replaces that rule; ``None``
    disables it. Tensors the base lacks are always heads. Raises :class:`CheckpointError` for another architecture,
    a shape mismatch outside heads, or a base tensor the fine-tuned model lacks.
    """
    base_config = getattr(base, "config", None)
    ft_config = getattr(finetuned, "config", None)
    _check_same_model_type(base, finetuned)
    prefix = base_model_prefix(ft_config) or base_model_prefix(base_config)
    auto_heads = task_specific == "auto" and is_head_architecture(ft_config)
    patterns = [] if task_specific in ("auto", None) else list(task_specific)  # type: ignore[arg-type]

    alignment = KeyAlignment()
    base_keys = set(base.keys())
    for ft_key in finetuned.keys():
        if ft_key in base_keys:
            base_key = ft_key
        elif prefix and ft_key.startswith(prefix + ".") and ft_key[len(prefix) + 1 :] in base_keys:
            base_key = ft_key[len(prefix) + 1 :]
        elif prefix and f"{prefix}.{ft_key}" in base_keys:
            base_key = f"{prefix}.{ft_key}"
        else:
            base_key = None
        is_pattern_head = any(fnmatch.fnmatchcase(ft_key, p) for p in patterns)
        is_auto_head = auto_heads and prefix is not None and not ft_key.startswith(prefix + ".")
        if base_key is None or is_pattern_head or is_auto_head:
            alignment.heads.append(ft_key)
            if base_key is not None:  # the merged model keeps the base's value of a task-specific tensor
                alignment.copied.append(base_key)
            continue
        base_shape, ft_shape = base.shape(base_key), finetuned.shape(ft_key)
        if base_shape != ft_shape:
            raise CheckpointError(
                f"Tensor '{ft_key}' of '{finetuned.name}' has shape {list(ft_shape)} but the base '{base.name}' has "
                f"{list(base_shape)} for '{base_key}'. Another architecture? (Task heads are matched by "
                "task_specific= patterns.)"
            )
        alignment.pairs[base_key] = ft_key

    _check_base_tensors(base, finetuned, alignment)
    return alignment


def _check_same_model_type(base: TensorSource, finetuned: TensorSource) -> None:
    """Refuse two checkpoints whose configs name different ``model_type``s."""
    base_config, ft_config = getattr(base, "config", None), getattr(finetuned, "config", None)
    if base_config and ft_config:
        base_type, ft_type = base_config.get("model_type"), ft_config.get("model_type")
        if base_type and ft_type and base_type != ft_type:
            raise CheckpointError(
                f"'{finetuned.name}' is a '{ft_type}' model but the base '{base.name}' is '{base_type}': "
                "task vectors need the same architecture."
            )


def _check_base_tensors(base: TensorSource, finetuned: TensorSource, alignment: KeyAlignment) -> None:
    """Every base tensor is paired or copied: non-float tensors and statistics (BatchNorm's) are copied from the base,
    float ones must have a mergeable dtype on both sides and a fine-tuned counterpart (an error names a training
    wrapper's prefix when every fine-tuned name carries one)."""
    ft_mapped = set(alignment.pairs) | set(alignment.copied)
    for base_key in base.keys():
        dtype = base.dtype(base_key)
        if base_key in alignment.copied:
            continue
        if not dtype.is_floating_point or base_key.endswith(STATISTIC_SUFFIXES):
            alignment.pairs.pop(base_key, None)
            alignment.copied.append(base_key)
        elif dtype not in MERGEABLE_DTYPES:
            raise CheckpointError(f"Tensor '{base_key}' of '{base.name}' has unsupported dtype {dtype}.")
        elif base_key not in ft_mapped:
            prefix = _wrapper_prefix(base, finetuned)
            if prefix is not None:
                raise CheckpointError(
                    f"Every tensor of '{finetuned.name}' is saved under the prefix '{prefix}' (a model saved from its "
                    f"training wrapper: DataParallel / DDP 'module.', torch.compile '_orig_mod.'): save the unwrapped "
                    f"model, or strip '{prefix}' from its tensor names."
                )
            raise CheckpointError(
                f"Tensor '{base_key}' of the base '{base.name}' is missing from '{finetuned.name}'. Another "
                "architecture, or an incomplete checkpoint?"
            )
    for ft_key in alignment.pairs.values():
        if finetuned.dtype(ft_key) not in MERGEABLE_DTYPES:
            raise CheckpointError(
                f"Tensor '{ft_key}' of '{finetuned.name}' has unsupported dtype {finetuned.dtype(ft_key)}."
            )


def _wrapper_prefix(base: TensorSource, finetuned: TensorSource) -> str | None:
    """The prefix (``module.``, ``_orig_mod.``, ...) that every tensor name of ``finetuned`` carries and whose removal
    gives base names, or ``None``."""
    keys = list(finetuned.keys())
    first = keys[0].split(".", 1)[0] + "." if keys and "." in keys[0] else None
    if first is None or not all(key.startswith(first) for key in keys):
        return None
    base_keys = set(base.keys())
    return first if any(key[len(first) :] in base_keys for key in keys) else None


def _check_finite(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Raise if ``tensor`` holds NaN/inf. One fast reduction first (any NaN/inf makes the sum non-finite); the
    elementwise mask is only built when the sum is not finite, which also rules out a false alarm from overflow."""
    if not torch.isfinite(tensor.sum()):
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise CheckpointError(f"{what} holds {bad} NaN/inf value(s).")
    return tensor


def _read_float32(source: TensorSource, key: str, out: torch.Tensor) -> torch.Tensor:
    """``source[key]`` converted to fp32 into ``out``: read in place when stored as fp32, else read and cast."""
    if source.dtype(key) == torch.float32:
        return source.get_tensor(key, out=out)
    return out.copy_(source.get_tensor(key))


class TaskVector:
    """A lazy mapping ``name -> tau[name]`` (fp32), in the base model's tensor names.

    Build one with :meth:`from_pretrained` (base + fine-tuned checkpoints), :meth:`load` (a saved delta file, as a
    site ships it) or arithmetic on others.
    """

    name: str = "task"

    # -- mapping API (subclasses implement keys/shape/_delta, and _delta_into when they can fill a buffer) -----------
    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def _delta(self, key: str, base_tensor: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _delta_into(self, key: str, base_tensor: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self._delta(key, base_tensor))

    def __contains__(self, key: object) -> bool:
        return key in set(self.keys())

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.get(key)

    def get(
        self, key: str, base_tensor: torch.Tensor | None = None, *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``tau[key]`` in fp32. ``base_tensor`` (``theta_0[key]``), when the caller has read it already, is reused.

        ``out``: a contiguous fp32 CPU tensor of ``shape(key)`` that receives the delta and is returned (a merge
        stacks the task vectors into one buffer it reuses); fine-tuned fp32 weights are read straight into it.
        """
        if key not in self:
            raise KeyError(f"Task vector '{self.name}' has no tensor '{key}'.")
        if out is None:
            return self._delta(key, base_tensor)
        shape = tuple(self.shape(key))
        if tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous() or out.is_cuda:
            raise ValueError(
                f"out= for '{key}' of task vector '{self.name}' must be a contiguous fp32 CPU tensor of shape "
                f"{list(shape)}, got {list(out.shape)} {out.dtype} on {out.device}"
            )
        return self._delta_into(key, base_tensor, out)

    # -- arithmetic ----------------------------------------------------------------------------------------------------
    def __add__(self, other: TaskVector | int) -> TaskVector:
        if isinstance(other, int) and other == 0:  # lets sum([...]) start from 0
            return self
        if not isinstance(other, TaskVector):
            return NotImplemented
        return LinearTaskVector([(1.0, self), (1.0, other)])

    __radd__ = __add__

    def __sub__(self, other: TaskVector) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        return LinearTaskVector([(1.0, self), (-1.0, other)])

    def __neg__(self) -> TaskVector:
        return LinearTaskVector([(-1.0, self)])

    def __mul__(self, scalar: float) -> TaskVector:
        if not isinstance(scalar, int | float):
            return NotImplemented
        return LinearTaskVector([(float(scalar), self)])

    __rmul__ = __mul__

    # -- use -----------------------------------------------------------------------------------------------------------
    def apply_to(
        self,
        base: str | os.PathLike | Mapping[str, torch.Tensor] | TensorSource,
        scaling: float = 1.0,
        *,
        dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """Return the state dict ``theta_0 + scaling * tau`` (tensors the vector lacks are copied from ``base``).

        Floating tensors come back in ``dtype`` (default: the base's own); other tensors unchanged.
        """
        source = open_checkpoint(base)
        result = {}
        keys = set(self.keys())
        for key in source.keys():
            tensor = source.get_tensor(key)
            if key in keys:
                merged = tensor.float() + scaling * self.get(key, tensor)
                tensor = merged.to(dtype or tensor.dtype)
            elif dtype is not None and tensor.dtype.is_floating_point:
                tensor = tensor.to(dtype)
            result[key] = tensor
        return result

    def save(
        self, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None, overwrite: bool = False
    ) -> Path:
        """Write the deltas (fp32) as one safetensors file: what a site ships instead of its data. Streamed into a
        temporary sibling that replaces ``path`` only once complete; an existing ``path`` is refused unless
        ``overwrite``."""
        path = Path(path)
        keys = self.keys()
        plan = [TensorPlan(key, self.shape(key), torch.float32) for key in keys]
        meta = {"hf_sta_kind": "task_vector", "task": self.name, **(metadata or {})}
        if isinstance(self, CheckpointTaskVector | StoredTaskVector):
            meta.setdefault("model_hash", self.model_hash)
        with atomic_file_path(path, overwrite=overwrite) as tmp:
            writer = StreamingSafetensorsWriter(
                tmp.parent, plan, max_shard_size=2**62, metadata=meta, weights_name=tmp.name
            )
            try:
                for key in keys:
                    writer.write(key, self.get(key))
                writer.finish()
            finally:
                writer.abort()
        return path

    # -- constructors --------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike | Mapping[str, torch.Tensor] | TensorSource,
        finetuned: str | os.PathLike | Mapping[str, torch.Tensor] | TensorSource,
        *,
        name: str | None = None,
        task_specific: str | Iterable[str] | None = "auto",
        revision: str | None = None,
        token: str | bool | None = None,
    ) -> CheckpointTaskVector:
        """``tau = theta_finetuned - theta_base`` from two folders, repo ids or state dicts."""
        base_source = open_checkpoint(base, name="base", revision=revision, token=token)
        ft_source = open_checkpoint(finetuned, name=name, revision=revision, token=token)
        return CheckpointTaskVector(base_source, ft_source, name=name, task_specific=task_specific)

    @classmethod
    def load(cls, path: str | os.PathLike, *, name: str | None = None) -> StoredTaskVector:
        """A task vector saved by :meth:`save` (or any safetensors file of deltas)."""
        return StoredTaskVector(CheckpointReader(path), name=name)


class CheckpointTaskVector(TaskVector):
    """``theta_t - theta_0`` read tensor by tensor from a fine-tuned and a base checkpoint."""

    def __init__(
        self,
        base: TensorSource,
        finetuned: TensorSource,
        *,
        name: str | None = None,
        task_specific: str | Iterable[str] | None = "auto",
    ) -> None:
        self.base = base
        self.finetuned = finetuned
        self.name = name or finetuned.name
        self.alignment = align_keys(base, finetuned, task_specific=task_specific)
        self._keys = list(self.alignment.pairs)
        self._key_set = set(self._keys)

    def keys(self) -> list[str]:
        return self._keys

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.shape(key)

    @property
    def head_keys(self) -> list[str]:
        return self.alignment.heads

    def heads(self) -> dict[str, torch.Tensor]:
        """The task-specific tensors (fine-tuned names), which are kept per task instead of merged."""
        return {key: self.finetuned.get_tensor(key) for key in self.alignment.heads}

    def _delta(self, key: str, base_tensor: torch.Tensor | None) -> torch.Tensor:
        return self._delta_into(key, base_tensor, torch.empty(self.shape(key), dtype=torch.float32))

    def _delta_into(self, key: str, base_tensor: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        ft_key = self.alignment.pairs[key]
        what = f"Tensor '{ft_key}' of '{self.finetuned.name}' (task vector '{self.name}')"
        theta_0 = self.base.get_tensor(key) if base_tensor is None else base_tensor
        if self.finetuned.dtype(ft_key) == torch.float32 and hasattr(self.finetuned, "read_range"):
            # Block by block: each block is read, has theta_0 subtracted and is summed while it is in the cache.
            flat, flat_base = out.view(-1), theta_0.reshape(-1)
            total = torch.zeros((), dtype=torch.float32)
            for start, stop in blocks(flat.numel()):
                block = self.finetuned.read_range(ft_key, start, stop, flat[start:stop])
                total += block.sub_(flat_base[start:stop]).sum()
            return out if bool(torch.isfinite(total)) else _check_finite(out, what)
        _read_float32(self.finetuned, ft_key, out)
        out.sub_(theta_0)  # computed in fp32 whatever theta_0's dtype: theta.float() - theta_0.float()
        # A NaN/inf in either model shows in the delta: one check covers both.
        return _check_finite(out, what)

    @property
    def model_hash(self) -> str:
        """Content hash of the fine-tuned model (recorded with its importance scores)."""
        if not hasattr(self, "_model_hash"):
            self._model_hash = fingerprint(self.finetuned)
        return self._model_hash

    def __repr__(self) -> str:
        return f"TaskVector(name='{self.name}', tensors={len(self._keys)}, heads={len(self.alignment.heads)})"


class StoredTaskVector(TaskVector):
    """Deltas read from a safetensors file (a data vector shipped by a site)."""

    def __init__(self, source: TensorSource, *, name: str | None = None) -> None:
        self.source = source
        self.name = name or self.metadata.get("task") or Path(str(getattr(source, "path", "task"))).stem
        self._keys = [k for k in source.keys() if source.dtype(k).is_floating_point]
        self._key_set = set(self._keys)

    def keys(self) -> list[str]:
        return self._keys

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def shape(self, key: str) -> tuple[int, ...]:
        return self.source.shape(key)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(getattr(self.source, "metadata", {}) or {})

    @property
    def model_hash(self) -> str:
        """The fine-tuned model's hash recorded when the vector was saved (else a hash of the delta file)."""
        return self.metadata.get("model_hash") or fingerprint(self.source)

    def _delta(self, key: str, base_tensor: torch.Tensor | None) -> torch.Tensor:
        return self._delta_into(key, base_tensor, torch.empty(self.shape(key), dtype=torch.float32))

    def _delta_into(self, key: str, base_tensor: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        return _check_finite(_read_float32(self.source, key, out), f"Task vector '{self.name}' at '{key}'")


class LinearTaskVector(TaskVector):
    """``sum_i c_i * tau_i`` over the union of the terms' tensors (a term lacking a tensor contributes zero)."""

    def __init__(self, terms: list[tuple[float, TaskVector]]) -> None:
        flat: list[tuple[float, TaskVector]] = []
        for coefficient, vector in terms:
            if isinstance(vector, LinearTaskVector):
                flat.extend((coefficient * c, v) for c, v in vector.terms)
            else:
                flat.append((coefficient, vector))
        self.terms = flat
        self.name = " + ".join(f"{c:g}*{v.name}" for c, v in flat)
        self._keys: list[str] = []
        shapes: dict[str, tuple[int, ...]] = {}
        for _, vector in flat:
            for key in vector.keys():
                shape = vector.shape(key)
                if key not in shapes:
                    shapes[key] = shape
                    self._keys.append(key)
                elif shapes[key] != shape:
                    raise ValueError(
                        f"Cannot combine task vectors: '{key}' has shape {list(shapes[key])} in one and {list(shape)} "
                        f"in '{vector.name}'."
                    )
        self._shapes = shapes

    def keys(self) -> list[str]:
        return self._keys

    def __contains__(self, key: object) -> bool:
        return key in self._shapes

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def _delta(self, key: str, base_tensor: torch.Tensor | None) -> torch.Tensor:
        return self._delta_into(key, base_tensor, torch.empty(self._shapes[key], dtype=torch.float32))

    def _delta_into(self, key: str, base_tensor: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        out.zero_()
        for coefficient, vector in self.terms:
            if key in vector:
                out.add_(vector.get(key, base_tensor), alpha=coefficient)
        return out


__all__ = [
    "TaskVector",
    "CheckpointTaskVector",
    "StoredTaskVector",
    "LinearTaskVector",
    "KeyAlignment",
    "align_keys",
    "StateDictSource",
]
