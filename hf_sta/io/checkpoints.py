"""Checkpoint I/O: resolve a folder or Hub repo id, read tensors lazily, stream merged tensors to disk.

No math lives here. Readers hand out one tensor at a time and keep at most one shard open per model; safetensors
tensors are copied from the file with plain reads at the header's offsets (into a fresh tensor or the caller's
buffer), never memory-mapped, so that input pages are not counted in the process' resident memory; the writer
knows every output tensor's name, shape and dtype in advance, writes each safetensors header first and then the tensor
bytes as they are produced, so a merge never holds more than the tensor it is working on.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Protocol

import torch

from ..errors import CheckpointError

logger = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PT_WEIGHTS_NAME = "pytorch_model.bin"
PT_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
CONFIG_NAME = "config.json"

# Files copied verbatim from the base model's folder next to merged weights.
AUX_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "*.model",
    "chat_template.jinja",
    "chat_template.json",
)
# What snapshot_download fetches for a model (weights + the auxiliary files above).
HUB_ALLOW_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.bin.index.json",
    "*.json",
    "*.txt",
    "*.model",
    "*.jinja",
    "*.py",  # custom code named by a config's auto_map (run only with trust_remote_code)
]

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_TORCH_TO_SAFETENSORS = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
# Every open CheckpointReader (inputs, importance files, forget targets): outputs may not replace their folders.
_LIVE_READERS: weakref.WeakSet = weakref.WeakSet()
MERGEABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def parse_size(size: int | str) -> int:
    """Parse a byte budget like transformers' ``max_shard_size``: ``5000000``, ``"5GB"``, ``"500MiB"``."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size must be an int or a string like '5GB', got {size!r}")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    factors = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    factors.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(number * factors[unit])


# --------------------------------------------------------------------------------------------------------------------
# Resolving
# --------------------------------------------------------------------------------------------------------------------


def _looks_like_repo_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name)) and ".." not in name


def resolve_checkpoint(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """Return a local folder (or single weights file) for ``path_or_repo_id``.

    A local path wins; otherwise the string is taken as a Hub repo id and fetched with
    ``huggingface_hub.snapshot_download`` (honouring ``revision``, ``token`` and ``HF_HUB_OFFLINE``).
    """
    path = Path(path_or_repo_id).expanduser()
    if path.exists():
        return path
    name = str(path_or_repo_id)
    if not _looks_like_repo_id(name):
        raise FileNotFoundError(f"Checkpoint '{name}' does not exist (not a local folder or file, nor a Hub repo id).")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            name,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            allow_patterns=allow_patterns or HUB_ALLOW_PATTERNS,
        )
    except Exception as err:  # the hub client raises many kinds; re-raise with the name in it
        raise FileNotFoundError(
            f"Checkpoint '{name}' is not a local folder and could not be fetched from the Hub: {err}"
        ) from err
    return Path(local)


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------


class TensorSource(Protocol):
    """What the math needs from a model: names, shapes, dtypes, and one tensor at a time."""

    name: str

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def dtype(self, key: str) -> torch.dtype: ...

    def get_tensor(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor: ...

    def __contains__(self, key: object) -> bool: ...


def _check_out(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, key: str, where: str) -> None:
    if tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(
            f"out= for tensor '{key}' of '{where}' must be a contiguous CPU tensor of shape {list(shape)} and dtype "
            f"{dtype}, got {list(out.shape)} {out.dtype} on {out.device}"
            + ("" if out.is_contiguous() else " (not contiguous)")
        )


def _copy_into(out: torch.Tensor, tensor: torch.Tensor, key: str, where: str) -> torch.Tensor:
    _check_out(out, tuple(tensor.shape), tensor.dtype, key, where)
    return out.copy_(tensor)


# safetensors stores little-endian bytes; a big-endian host swaps each element after reading.
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"


def _check_range(
    out: torch.Tensor, start: int, stop: int, numel: int, dtype: torch.dtype, key: str, where: str
) -> None:
    if not 0 <= start <= stop <= numel:
        raise ValueError(
            f"Entries [{start}, {stop}) are out of range for tensor '{key}' of {numel} entries ({where})."
        )
    if out.dtype != dtype or out.numel() != stop - start or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(
            f"out= for entries [{start}, {stop}) of '{key}' ({where}) must be a contiguous CPU tensor of "
            f"{stop - start} {dtype} entries, got {out.numel()} {out.dtype} on {out.device}"
        )


def _read_into(handle, start: int, end: int, out: torch.Tensor, key: str) -> None:
    """Copy bytes ``[start, end)`` of the open file ``handle`` into the contiguous tensor ``out`` (native order)."""
    if start == end:
        return
    flat_bytes = out.reshape(-1).view(torch.uint8)
    view = memoryview(flat_bytes.numpy())
    handle.seek(start)
    done = 0
    while done < end - start:  # readinto may return less than asked (signals, reads beyond 2 GiB)
        count = handle.readinto(view[done:])
        if not count:
            raise CheckpointError(
                f"'{handle.name}' is truncated: tensor '{key}' needs bytes {start}..{end} but the file ends at "
                f"{start + done}."
            )
        done += count
    if not _LITTLE_ENDIAN_HOST and out.element_size() > 1:
        elements = flat_bytes.view(-1, out.element_size())
        elements.copy_(elements.flip(-1))


# The safetensors format caps the JSON header at 100 MB; a larger length is a corrupt or hostile file.
MAX_HEADER_BYTES = 100 * 2**20


def _read_safetensors_header(file: Path) -> tuple[int, dict]:
    """``(header length, header)`` of a safetensors file, the length checked against the format's cap and the file's
    size before anything is allocated for it."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"'{file}' is not a safetensors file: it has {size} bytes, fewer than 8.")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"'{file}' is not a valid safetensors file: its header length field says {header_len} bytes, "
                    f"but the file has {size} bytes (and headers are at most {MAX_HEADER_BYTES})."
                )
            header = json.loads(handle.read(header_len))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"'{file}' is not a readable safetensors file: {err}") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"'{file}' is not a valid safetensors file: its header is not a JSON object.")
    return header_len, header


def _tensor_entry(file: Path, key: str, info: object) -> tuple[tuple[int, ...], torch.dtype, int, int]:
    """``(shape, dtype, begin, end)`` of one header entry, checked for consistency."""
    try:
        dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]  # type: ignore[index]
        valid = all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end)) and begin <= end
    except (TypeError, KeyError, ValueError):
        valid = False
    if not valid:
        raise CheckpointError(f"Tensor '{key}' in '{file}' has a malformed header entry: {info!r:.200}.")
    if dtype_name not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"Tensor '{key}' in '{file}' has unsupported dtype {dtype_name}.")
    dtype = _SAFETENSORS_DTYPES[dtype_name]
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(
            f"Tensor '{key}' in '{file}' spans {end - begin} bytes, but shape {list(shape)} of {dtype_name} needs "
            f"{math.prod(shape) * dtype.itemsize}."
        )
    return shape, dtype, begin, end


class StateDictSource:
    """A :class:`TensorSource` over an in-memory state dict (tests, ``nn.Module`` users)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], name: str = "<state dict>") -> None:
        self._tensors = {k: v.detach() for k, v in state_dict.items()}
        self.name = name
        self.path: Path | None = None
        self.config: dict | None = None

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def get_tensor(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        tensor = self._tensors[key]
        return tensor if out is None else _copy_into(out, tensor, key, self.name)

    def read_range(self, key: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Entries ``[start, stop)`` of tensor ``key`` (flat order) copied into ``out``; see ``CheckpointReader``."""
        tensor = self._tensors[key]
        _check_range(out, start, stop, tensor.numel(), tensor.dtype, key, self.name)
        return out.copy_(tensor.reshape(-1)[start:stop].view(out.shape))

    def close(self) -> None:
        pass


def _inside(folder: Path, name: object, index_path: Path) -> Path:
    """The shard ``name`` of an index, which must be a file name inside ``folder`` (an index is data from the
    checkpoint's author: ``../elsewhere/model.safetensors`` or an absolute path would read files outside it)."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"The shard index '{index_path}' names a shard {name!r}, which is not a file name.")
    path = folder / name
    if Path(name).is_absolute() or not _contains(_resolved(folder), _resolved(path)):
        raise CheckpointError(
            f"The shard index '{index_path}' names shard '{name}', which is outside the checkpoint folder '{folder}'."
        )
    return path


class CheckpointReader:
    """Lazy reader of a transformers-style checkpoint folder (or a single ``.safetensors`` file).

    Supports ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``, a folder holding a single
    other ``*.safetensors`` file, and pickled ``pytorch_model.bin`` checkpoints through ``torch.load(weights_only=True)``
    only. Tensor names, shapes and dtypes come from the headers without reading data; at most one shard is open.
    Safetensors tensors are read with buffered reads at the header's offsets, not memory-mapped: each call returns
    a tensor of its own (or fills ``out=``), and the file's pages never count in this process' resident memory.
    Thread-safe: concurrent :meth:`get_tensor` calls on one reader are serialised (different readers read at once).
    """

    def __init__(self, path: str | os.PathLike, name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or self.path.name
        if not self.path.exists():
            raise CheckpointError(f"Checkpoint path '{self.path}' does not exist.")
        self.folder = self.path if self.path.is_dir() else self.path.parent
        _LIVE_READERS.add(self)  # an output may not replace what a live reader reads (check_output_dir)
        self.config = self._read_config()
        self._key_to_file: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._spans: dict[str, tuple[int, int]] = {}  # a safetensors tensor's byte range in its file
        self._open_file: Path | None = None
        self._open_handle = None
        self._lock = threading.Lock()  # the open shard and its file position are shared by concurrent get_tensor
        self._pickled: bool = False
        self.metadata: dict[str, str] = {}
        self._index_files()

    # -- discovery -------------------------------------------------------------------------------------------------
    def _read_config(self) -> dict | None:
        config_path = self.folder / CONFIG_NAME
        if not config_path.is_file():
            return None
        try:
            return json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"Cannot read '{config_path}': {err}") from err

    def _weight_files(self) -> tuple[list[Path], bool]:
        if self.path.is_file():
            if self.path.suffix == ".safetensors":
                return [self.path], False
            if self.path.suffix in (".bin", ".pt", ".pth"):
                return [self.path], True
            raise CheckpointError(f"'{self.path}' is not a .safetensors or .bin checkpoint file.")
        folder = self.path
        for index_name, pickled in ((SAFE_WEIGHTS_INDEX_NAME, False), (PT_WEIGHTS_INDEX_NAME, True)):
            index_path = folder / index_name
            if index_path.is_file():
                try:
                    weight_map = json.loads(index_path.read_text())["weight_map"]
                except (OSError, json.JSONDecodeError, KeyError) as err:
                    raise CheckpointError(f"Cannot read the shard index '{index_path}': {err}") from err
                if not isinstance(weight_map, dict):
                    raise CheckpointError(f"The shard index '{index_path}' has no weight_map mapping.")
                files = sorted({_inside(folder, f, index_path) for f in weight_map.values()})
                missing = [str(f) for f in files if not f.is_file()]
                if missing:
                    raise CheckpointError(f"Shard(s) listed in '{index_path}' are missing: {', '.join(missing)}")
                return files, pickled
        if (folder / SAFE_WEIGHTS_NAME).is_file():
            return [folder / SAFE_WEIGHTS_NAME], False
        if (folder / PT_WEIGHTS_NAME).is_file():
            return [folder / PT_WEIGHTS_NAME], True
        others = sorted(folder.glob("*.safetensors"))
        if len(others) == 1:
            return others, False
        raise CheckpointError(
            f"No model weights found in '{folder}' (looked for {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME}, "
            f"{PT_WEIGHTS_NAME}, {PT_WEIGHTS_INDEX_NAME})."
        )

    def _index_files(self) -> None:
        files, self._pickled = self._weight_files()
        for file in files:
            if self._pickled:
                state = self._load_pickled(file)
                for key, tensor in state.items():
                    self._key_to_file[key] = file
                    self._meta[key] = (tuple(tensor.shape), tensor.dtype)
                continue
            header_len, header = _read_safetensors_header(file)
            size = file.stat().st_size
            for key, info in header.items():
                if key == "__metadata__":
                    self.metadata.update(info or {})
                    continue
                shape, dtype, begin, end = _tensor_entry(file, key, info)
                if 8 + header_len + end > size:
                    raise CheckpointError(
                        f"'{file}' is truncated: tensor '{key}' needs bytes up to {8 + header_len + end}, but the "
                        f"file has {size} bytes."
                    )
                self._key_to_file[key] = file
                self._meta[key] = (shape, dtype)
                self._spans[key] = (8 + header_len + begin, 8 + header_len + end)

    def _load_pickled(self, file: Path) -> dict[str, torch.Tensor]:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # pickle errors come in many types
            found = re.search(r"(?:unsupported|Unsupported) (?:GLOBAL|global):? [^\s.]+(?:\.[^\s.]+)*", str(err))
            detail = found.group(0) if found else " ".join(str(err).split())[:300]
            raise CheckpointError(
                f"Cannot load '{file}' with torch.load(weights_only=True): it is not a plain state dict of tensors "
                f"({detail}); arbitrary pickles are refused (convert it to safetensors where you trust it)."
            ) from err
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"'{file}' does not hold a flat state dict of tensors.")
        return dict(state)

    # -- TensorSource API ---------------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._key_to_file)

    def __contains__(self, key: object) -> bool:
        return key in self._key_to_file

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key][1]

    def files(self) -> list[Path]:
        return sorted(set(self._key_to_file.values()))

    def get_tensor(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``key``, read now. With ``out`` (a contiguous CPU tensor of its shape and dtype) the bytes are
        read into ``out``, which is returned; otherwise into a new tensor. Opening another shard closes the open one.
        """
        if key not in self._key_to_file:
            raise CheckpointError(f"Tensor '{key}' is not in checkpoint '{self.path}'.")
        file = self._key_to_file[key]
        with self._lock:
            self._open(file)
            if self._pickled:
                tensor = self._open_handle[key]
                return tensor if out is None else _copy_into(out, tensor, key, str(file))
            shape, dtype = self._meta[key]
            if out is None:
                out = torch.empty(shape, dtype=dtype)
            else:
                _check_out(out, shape, dtype, key, str(file))
            start, end = self._spans[key]
            _read_into(self._open_handle, start, end, out, key)
            return out

    def read_range(self, key: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Entries ``[start, stop)`` of tensor ``key`` in flat (row-major) order, read into ``out`` (contiguous,
        ``stop - start`` entries of the tensor's dtype), which is returned: one block of a tensor without the rest,
        so that a caller can work on it while it is still in the CPU cache."""
        if key not in self._key_to_file:
            raise CheckpointError(f"Tensor '{key}' is not in checkpoint '{self.path}'.")
        shape, dtype = self._meta[key]
        _check_range(out, start, stop, math.prod(shape), dtype, key, self.name)
        file = self._key_to_file[key]
        with self._lock:
            self._open(file)
            if self._pickled:
                return out.copy_(self._open_handle[key].reshape(-1)[start:stop].view(out.shape))
            first, _ = self._spans[key]
            size = out.element_size()
            _read_into(self._open_handle, first + start * size, first + stop * size, out, key)
            return out

    def _open(self, file: Path) -> None:
        """Make ``file`` the open shard (closing the previous one); the caller holds the lock."""
        if file != self._open_file:
            self._close()
            if self._pickled:
                self._open_handle = self._load_pickled(file)
            else:  # unbuffered: reads go straight into the tensors; closed by close() (or when collected)
                self._open_handle = open(file, "rb", buffering=0)  # noqa: SIM115
            self._open_file = file

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._open_handle is not None and not self._pickled:
            self._open_handle.close()
        self._open_handle = None
        self._open_file = None

    def __repr__(self) -> str:
        return f"CheckpointReader('{self.path}', tensors={len(self._key_to_file)})"


def open_checkpoint(
    source: str | os.PathLike | Mapping[str, torch.Tensor] | CheckpointReader | StateDictSource,
    *,
    name: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> CheckpointReader | StateDictSource:
    """Turn a folder, a repo id, a state dict or an existing reader into a :class:`TensorSource`."""
    if isinstance(source, CheckpointReader | StateDictSource):
        return source
    if isinstance(source, Mapping):
        return StateDictSource(source, name=name or "<state dict>")
    if isinstance(source, torch.nn.Module):
        return StateDictSource(source.state_dict(), name=name or type(source).__name__)
    path = resolve_checkpoint(source, revision=revision, token=token, cache_dir=cache_dir)
    return CheckpointReader(path, name=name)


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------


class TensorPlan(tuple):
    """``(name, shape, dtype)`` of one output tensor, known before any data is produced."""

    def __new__(cls, name: str, shape: Iterable[int], dtype: torch.dtype) -> TensorPlan:
        return super().__new__(cls, (name, tuple(shape), dtype))

    @property
    def name(self) -> str:
        return self[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return self[1]

    @property
    def dtype(self) -> torch.dtype:
        return self[2]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()


class StreamingSafetensorsWriter:
    """Write a planned set of tensors into safetensors shards without holding them in memory.

    The plan (every tensor's name, shape, dtype, in file order) is split into shards of at most ``max_shard_size``
    bytes; the layout, hence each shard's header and each tensor's byte range, is fixed by the plan, and
    :meth:`write` puts a tensor's bytes at its range as it receives it. One shard gives ``model.safetensors``;
    several give ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``, as
    ``save_pretrained`` does.

    Tensors must arrive in plan order, unless ``any_order=True`` (a streamed merge hands over each tensor as soon as
    a worker thread has merged it): the files are the same bytes either way. With ``background=True`` the file
    writes happen in a thread, behind the caller (a write is a memory copy into the page cache, which then overlaps
    the caller's next computation): :meth:`write` checks the tensor against the plan at once and queues it; it
    waits only while tensors of ``max_queued_bytes`` or more wait behind the one being written (so that writing a
    large tensor does not hold up the caller, while the memory held by the queue stays bounded). The caller must not
    modify a tensor after passing it. A write error is raised by the next :meth:`write` or by :meth:`finish`.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        plan: list[TensorPlan],
        *,
        max_shard_size: int | str = "5GB",
        metadata: dict[str, str] | None = None,
        weights_name: str = SAFE_WEIGHTS_NAME,
        background: bool = False,
        any_order: bool = False,
        max_queued_bytes: int = 64 * 2**20,
    ) -> None:
        self.folder = Path(folder)
        self.plan = plan
        self.metadata = {"format": "pt", **(metadata or {})}
        budget = parse_size(max_shard_size)
        self.shards: list[list[TensorPlan]] = [[]]
        size = 0
        for item in plan:
            if item.dtype not in _TORCH_TO_SAFETENSORS:
                raise CheckpointError(f"Cannot write tensor '{item.name}' of dtype {item.dtype} to safetensors.")
            if self.shards[-1] and size + item.nbytes > budget:
                self.shards.append([])
                size = 0
            self.shards[-1].append(item)
            size += item.nbytes
        stem, ext = weights_name.rsplit(".", 1)
        count = len(self.shards)
        self.shard_names = (
            [weights_name] if count == 1 else [f"{stem}-{i + 1:05d}-of-{count:05d}.{ext}" for i in range(count)]
        )
        self.index_name = f"{weights_name}.index.json"
        self.total_size = sum(item.nbytes for item in plan)
        # Each shard's header (its 8-byte length, then the JSON) and each tensor's (shard, file offset).
        self._headers: list[bytes] = []
        self._places: dict[str, tuple[int, int, TensorPlan]] = {}
        for shard, items in enumerate(self.shards):
            header: dict[str, object] = {"__metadata__": self.metadata}
            offset = 0
            for item in items:
                header[item.name] = {
                    "dtype": _TORCH_TO_SAFETENSORS[item.dtype],
                    "shape": list(item.shape),
                    "data_offsets": [offset, offset + item.nbytes],
                }
                offset += item.nbytes
            header_bytes = json.dumps(header, separators=(",", ":")).encode()
            header_bytes += b" " * (-len(header_bytes) % 8)
            self._headers.append(struct.pack("<Q", len(header_bytes)) + header_bytes)
            data_start = len(self._headers[-1])
            for item in items:
                self._places[item.name] = (shard, data_start, item)
                data_start += item.nbytes
        self.any_order = any_order
        self._written: set[str] = set()
        self._position = 0  # next index into plan (in-order mode)
        self._handles: dict[int, object] = {}  # open shard files, by shard index
        self._background = background
        self._max_queued_bytes = max_queued_bytes
        self._queue: collections.deque = collections.deque()  # (operation, args, nbytes); None ends the thread
        self._queued_bytes = 0  # of the tensors in the queue, not counting the one being written
        self._queue_changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._finished = threading.Event()  # set by the background thread as it ends
        self._error: BaseException | None = None

    def _handle(self, shard: int):
        """The shard's file, created (with its header) on first use."""
        handle = self._handles.get(shard)
        if handle is None:
            handle = open(self.folder / self.shard_names[shard], "wb")  # noqa: SIM115 - closed in finish/abort
            self._handles[shard] = handle
            handle.write(self._headers[shard])
        return handle

    def _write_bytes(self, shard: int, offset: int, data, on_written: Callable[[], None] | None = None) -> None:
        handle = self._handle(shard)
        handle.seek(offset)
        handle.write(memoryview(data))
        if on_written is not None:
            on_written()

    def _submit(self, operation, *args, nbytes: int = 0) -> None:
        """Run a file operation now, or queue it for the background thread (started on first use)."""
        if not self._background:
            operation(*args)
            return
        if self._error is not None:
            raise self._error
        if self._thread is None:
            self._finished.clear()
            self._thread = threading.Thread(target=self._work, name="hf_sta-write", daemon=True)
            self._thread.start()
        with self._queue_changed:
            self._queue_changed.wait_for(lambda: self._queued_bytes < self._max_queued_bytes)
            self._queue.append((operation, args, nbytes))
            self._queued_bytes += nbytes
            self._queue_changed.notify_all()

    def _work(self) -> None:
        try:
            self._drain()
        finally:
            self._finished.set()

    def _drain(self) -> None:
        while True:
            with self._queue_changed:
                self._queue_changed.wait_for(lambda: self._queue)
                task = self._queue.popleft()
                if task is None:
                    return
                operation, args, nbytes = task
                self._queued_bytes -= nbytes
                self._queue_changed.notify_all()
            if self._error is None:  # after a failure, drain without writing
                try:
                    operation(*args)
                except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
                    self._error = error

    def _join(self) -> None:
        """Wait until the background thread has run what is queued and ended. Interrupted (Ctrl-C, SIGTERM), it
        has the thread skip the rest and still waits for it before re-raising: a writer thread left running at
        interpreter exit aborts the process inside torch. It waits on an event, not ``Thread.join``: an interrupted
        ``join`` marks a still-running thread as stopped (CPython 3.11, bpo-45274)."""
        if self._thread is None:
            return
        with self._queue_changed:
            self._queue.append(None)
            self._queue_changed.notify_all()
        try:
            self._finished.wait()
        except BaseException as interrupt:
            self._error = self._error or interrupt  # the thread drains the queue without writing
            self._finished.wait()
            raise
        finally:
            if self._finished.is_set():
                self._thread = None

    def _close_files(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def write(self, name: str, tensor: torch.Tensor, *, on_written: Callable[[], None] | None = None) -> None:
        """Write tensor ``name`` of the plan (the next one, unless ``any_order``); shape and dtype must match it.

        ``on_written`` is called (in the writing thread) once the tensor's bytes are in the file, e.g. to reuse its
        memory; not after a failed write.
        """
        if self.any_order:
            if name not in self._places or name in self._written:
                state = "already written" if name in self._written else "not in the plan"
                raise RuntimeError(f"Tensor '{name}' is {state}.")
        elif self._position >= len(self.plan):
            raise RuntimeError(f"Tensor '{name}' written past the end of the plan.")
        elif name != self.plan[self._position].name:
            expected = self.plan[self._position]
            raise RuntimeError(
                f"Write order broken: expected {expected.name} {expected.shape} {expected.dtype}, got {name}."
            )
        shard, offset, item = self._places[name]
        if tuple(tensor.shape) != item.shape or tensor.dtype != item.dtype:
            raise RuntimeError(
                f"Tensor '{name}' does not match the plan: expected {item.shape} {item.dtype}, "
                f"got {tuple(tensor.shape)} {tensor.dtype}."
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._submit(self._write_bytes, shard, offset, data, on_written, nbytes=data.nbytes)
        self._written.add(name)
        self._position += 1

    def finish(self) -> None:
        """Make sure every planned tensor was written, close the shards and write the index when there are several."""
        if len(self._written) != len(self.plan):
            missing = next(item.name for item in self.plan if item.name not in self._written)
            raise RuntimeError(
                f"Only {len(self._written)} of {len(self.plan)} planned tensors written (next: {missing})."
            )
        for shard in range(len(self.shards)):  # shards without tensors (an empty plan) still get their header
            self._submit(self._handle, shard)
        self._join()
        if self._error is not None:
            raise self._error
        self._close_files()
        if len(self.shards) > 1:
            weight_map = {item.name: self.shard_names[i] for i, items in enumerate(self.shards) for item in items}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.folder / self.index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def abort(self) -> None:
        """Stop writing (after an error, or at the end): waits for the background thread and closes the files."""
        self._join()
        self._close_files()


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def _contains(folder: Path, path: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both resolved)."""
    return path == folder or folder in path.parents


def check_not_an_input(output: str | os.PathLike, inputs: Mapping[str, str | os.PathLike] | None = None) -> None:
    """Refuse an output location whose replacement would delete an input or the current directory.

    Refused: ``output`` is the current directory or one of its ancestors, or is (or holds) an input: a path of
    ``inputs`` (``{label: path}``, e.g. the recipe's base / models / importance files) or the file / folder of any
    open :class:`CheckpointReader` (the base, fine-tunes, adapters, task vectors, importance files and forget targets
    the current merge reads). Raises ``FileExistsError`` naming both paths.
    """
    target = _resolved(output)
    cwd = _resolved(os.getcwd())
    if _contains(target, cwd):
        where = "the current directory" if target == cwd else f"an ancestor of the current directory '{cwd}'"
        raise FileExistsError(
            f"Output folder '{output}' ('{target}') is {where}: it cannot be replaced; write to a new folder instead."
        )
    protected: list[tuple[str, Path]] = [(str(label), Path(path)) for label, path in (inputs or {}).items()]
    protected += [(f"'{reader.name}'", reader.path) for reader in list(_LIVE_READERS)]
    for label, path in protected:
        if not path.exists():
            continue  # a Hub repo id, or a file not written yet
        resolved = _resolved(path)
        if _contains(target, resolved):
            what = "is" if resolved == target else "holds"
            raise FileExistsError(
                f"Output folder '{output}' {what} the input {label} ('{resolved}'): writing there would delete it; "
                "choose another output folder."
            )


def check_output_dir(
    output_dir: str | os.PathLike, overwrite: bool, *, inputs: Mapping[str, str | os.PathLike] | None = None
) -> Path:
    """Refuse an existing non-empty ``output_dir`` unless ``overwrite``, and always one that is, or holds, an input
    or the current directory (:func:`check_not_an_input`); return it as a Path."""
    output = Path(output_dir).expanduser()
    check_not_an_input(output, inputs)
    if output.exists():
        if not output.is_dir():
            raise FileExistsError(f"Output path '{output}' exists and is not a folder.")
        if any(output.iterdir()) and not overwrite:
            raise FileExistsError(
                f"Output folder '{output}' exists and is not empty; pass overwrite=True to replace it."
            )
    return output


def check_output_file(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing ``path`` unless ``overwrite`` (and a folder always); return it as a Path."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise FileExistsError(f"Output file '{path}' is a folder.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"Output file '{path}' exists; pass overwrite=True to replace it.")
    return path


def _umask() -> int:
    """The process' umask (read from /proc on Linux, which does not change it; else set and restored)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return True
    return True


_HOST = re.sub(r"[^A-Za-z0-9]+", "", socket.gethostname())[:24] or "host"
# .<output>.tmp-<host>-<pid>-<random> / .<output>.old-<host>-<pid>-<random>: who built it, to spot stale ones.
_BUILD_NAME = re.compile(r"\.(?P<output>.+)\.(?P<kind>tmp|old)-(?:(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-)?[^/]*")


def clean_stale_build_folders(output: str | os.PathLike) -> list[Path]:
    """Remove the hidden build folders / files (``.<output>.tmp-*``, ``.<output>.old-*``) that an earlier writer of
    ``output`` left behind when it was killed (SIGKILL, power loss), and report the ones it cannot vouch for.

    One is removed when its name gives this host and a process id that is no longer running (and, for an ``.old-``
    folder, the output that replaced it exists); a live writer's is left alone; others (another host's, an older
    hf_sta's, or an ``.old-`` folder whose replacement never landed: it holds the previous output) are kept and
    logged as warnings. Returns the removed paths.
    """
    output = Path(output).expanduser()
    parent = output.parent
    if not parent.is_dir():
        return []
    removed = []
    for candidate in sorted(parent.glob(f".{glob_escape(output.name)}.*-*")):
        match = _BUILD_NAME.fullmatch(candidate.name)
        if match is None or match["output"] != output.name:
            continue
        ours = match["host"] == _HOST and match["pid"] is not None
        if ours and (int(match["pid"]) == os.getpid() or _pid_alive(int(match["pid"]))):
            continue  # a write in progress
        if ours and (match["kind"] == "tmp" or output.exists()):
            if candidate.is_dir():
                shutil.rmtree(candidate, ignore_errors=True)
            else:
                candidate.unlink(missing_ok=True)
            removed.append(candidate)
            logger.warning("Removed '%s', left by an interrupted write of '%s'.", candidate, output)
        elif match["kind"] == "old" and not output.exists():
            logger.warning(
                "'%s' holds the previous contents of '%s' from an interrupted overwrite; move it back or delete it.",
                candidate, output,
            )  # fmt: skip
        else:
            logger.warning(
                "'%s' looks like an unfinished write of '%s' (by another host, or an older hf_sta); delete it if no "
                "write is in progress there.", candidate, output,
            )  # fmt: skip
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


class _TerminateAsInterrupt:
    """While active (main thread only, SIGTERM at its default), SIGTERM raises ``KeyboardInterrupt``, so a killed
    write cleans up as Ctrl-C does."""

    def __init__(self) -> None:
        self.previous = None

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGTERM"):
            if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                self.previous = signal.signal(signal.SIGTERM, _raise_interrupt)

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"terminated by signal {signum}")


class AtomicOutputDir:
    """Context manager: build an output folder in a temporary sibling and move it into place only on success.

    A failure, Ctrl-C or SIGTERM inside the block removes the temporary folder and leaves ``output_dir`` untouched;
    after SIGKILL the hidden ``.<output>.tmp-<host>-<pid>-*`` folder is removed by the next write of the same output
    (:func:`clean_stale_build_folders`). The output folder gets the mode ``mkdir`` would give it (``0o777 & ~umask``),
    not the private temporary folder's 0700. ``inputs``: more ``{label: path}`` the output must not replace.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        overwrite: bool = False,
        inputs: Mapping[str, str | os.PathLike] | None = None,
    ) -> None:
        self.output_dir = check_output_dir(output_dir, overwrite, inputs=inputs)
        self.overwrite = overwrite
        self.inputs = inputs
        self.tmp: Path | None = None
        self._signals = _TerminateAsInterrupt()

    def _sibling(self, kind: str) -> Path:
        prefix = f".{self.output_dir.name}.{kind}-{_HOST}-{os.getpid()}-"
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.output_dir.parent))

    def __enter__(self) -> Path:
        self.output_dir.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_build_folders(self.output_dir)
        self._signals.__enter__()
        try:
            self.tmp = self._sibling("tmp")
        except BaseException:
            self._signals.__exit__()
            raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        try:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return
            try:
                check_output_dir(self.output_dir, self.overwrite, inputs=self.inputs)  # may have appeared meanwhile
                os.chmod(self.tmp, 0o777 & ~_umask())
                if self.output_dir.exists():
                    trash = self._sibling("old")
                    os.replace(self.output_dir, trash / "old")
                    os.replace(self.tmp, self.output_dir)
                    shutil.rmtree(trash, ignore_errors=True)
                else:
                    os.replace(self.tmp, self.output_dir)
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
        finally:
            self._signals.__exit__()


class atomic_file_path:  # noqa: N801 - used like a function: ``with atomic_file_path(path) as tmp: write(tmp)``
    """Context manager yielding a temporary path next to ``path``; on success it replaces ``path`` in one
    ``os.replace`` (refused when ``path`` exists, unless ``overwrite``), on failure it is removed. The file gets
    the mode ``open`` would give it."""

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.path = check_output_file(path, overwrite)
        self.overwrite = overwrite
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_build_folders(self.path)
        handle, name = tempfile.mkstemp(prefix=f".{self.path.name}.tmp-{_HOST}-{os.getpid()}-", dir=self.path.parent)
        os.close(handle)
        self.tmp = Path(name)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        try:
            if exc_type is None:
                check_output_file(self.path, self.overwrite)
                os.chmod(self.tmp, 0o666 & ~_umask())
                os.replace(self.tmp, self.path)
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


def custom_code_files(folder: Path) -> list[Path]:
    """The Python files of a checkpoint with custom code: when its ``config.json`` or ``tokenizer_config.json`` has an
    ``auto_map``, every top-level ``*.py`` file of ``folder`` (the modules it names and the local modules they import,
    as ``save_pretrained`` of a custom model writes them); else none."""
    for name in (CONFIG_NAME, "tokenizer_config.json"):
        path = folder / name
        try:
            has_auto_map = path.is_file() and bool(json.loads(path.read_text()).get("auto_map"))
        except (OSError, json.JSONDecodeError, AttributeError):
            has_auto_map = False
        if has_auto_map:
            return sorted(p for p in folder.glob("*.py") if p.is_file())
    return []


def copy_aux_files(source_folder: Path | None, destination: Path, *, skip: Iterable[str] = ()) -> list[str]:
    """Copy config, generation config and tokenizer files from ``source_folder`` to ``destination``, and the Python
    files of custom code (:func:`custom_code_files`) so that a config's ``auto_map`` still resolves."""
    if source_folder is None or not source_folder.is_dir():
        return []
    copied = []
    skipped = set(skip)
    for file in custom_code_files(source_folder):
        if file.name not in skipped and not (destination / file.name).exists():
            shutil.copy2(file, destination / file.name)
            copied.append(file.name)
    for pattern in AUX_FILE_PATTERNS:
        for file in sorted(source_folder.glob(pattern)):
            if file.is_file() and file.name not in skipped and not (destination / file.name).exists():
                shutil.copy2(file, destination / file.name)
                copied.append(file.name)
    return copied


def save_tensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None, *, overwrite: bool = True
) -> None:
    """Save a small dict of tensors (heads, importance) as one safetensors file, atomically (a temporary sibling
    then ``os.replace``); an existing ``path`` is refused unless ``overwrite``."""
    from safetensors.torch import save_file

    with atomic_file_path(path, overwrite=overwrite) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def fingerprint(source: TensorSource) -> str:
    """A short content hash of a model, cheap even for large checkpoints.

    For files: each weights file's header, size and eight 64 KiB samples of its data (another fine-tune of the same
    architecture differs in those bytes); for in-memory state dicts: every tensor's bytes.
    """
    import hashlib

    digest = hashlib.sha256()
    if isinstance(source, CheckpointReader):
        for file in source.files():
            size = file.stat().st_size
            digest.update(f"{file.name}:{size}".encode())
            with open(file, "rb") as handle:
                for offset in sorted({0, *(size * i // 8 for i in range(1, 8)), max(size - 65536, 0)}):
                    handle.seek(offset)
                    digest.update(handle.read(65536))
    else:
        for key in sorted(source.keys()):
            tensor = source.get_tensor(key).detach().cpu().contiguous()
            digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
