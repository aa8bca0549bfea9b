"""Input Gram matrices of a model's linear layers on calibration data (the statistics RegMean merges with).

For every ``nn.Linear`` (weight ``[out, in]``, ``y = x W^T``) and transformers ``Conv1D`` (GPT-2; weight ``[in, out]``,
``y = x W``) the loop sums ``X^T X`` over the rows ``X`` (``[tokens, in]``) the layer receives: one row per token that is
not padding. Forward passes only, under ``torch.no_grad``; runs unchanged on CPU, one GPU, or several processes under
``accelerate launch`` (each process sums its own share of the data; the sums are reduced once, at the end).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..io.checkpoints import CheckpointReader, save_tensors
from .calibration import is_sharded
from .data import batch_size, calibration_failure, check_calibration_batch, check_num_samples

logger = logging.getLogger(__name__)

__all__ = ["ActivationStatistics", "GRAM_LAYOUTS", "accumulate_input_grams", "linear_layers"]

GRAM_LAYOUTS = ("out_in", "in_out")
"""``"out_in"``: ``nn.Linear`` weights ``[out, in]``; ``"in_out"``: transformers ``Conv1D`` weights ``[in, out]``."""

ForwardFn = Callable[[nn.Module, Any], Any]

_KIND = "activation_statistics"
_FORMAT_VERSION = "1"


def linear_layers(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``{module name: (module, layout)}`` of every ``nn.Linear`` and pointwise ``nn.Conv2d`` (1x1 kernel, one group:
    a linear map of the channels at every position, weight ``[out, in, 1, 1]``) (``"out_in"``) and ``Conv1D``
    (``"in_out"``)."""
    from transformers.pytorch_utils import Conv1D

    layers: dict[str, tuple[nn.Module, str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or _is_pointwise_conv(module):
            layers[name] = (module, "out_in")
        elif isinstance(module, Conv1D):
            layers[name] = (module, "in_out")
    return layers


def _is_pointwise_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and module.groups == 1


def _weight_key(module_name: str) -> str:
    return f"{module_name}.weight" if module_name else "weight"


def _select_layers(
    model: nn.Module, modules: Iterable[str] | Mapping[str, str] | None
) -> list[tuple[str, nn.Module, str]]:
    """``[(output key, module, layout)]`` for the requested layers, in the model's module order."""
    layers = linear_layers(model)
    if modules is None:
        selected = [(_weight_key(name), module, layout) for name, (module, layout) in layers.items()]
    else:
        renames = dict(modules) if isinstance(modules, Mapping) else None
        names = list(renames) if renames is not None else list(modules)
        all_modules = dict(model.named_modules())
        selected = []
        for requested in names:
            module_name = requested
            if module_name not in layers and requested.endswith(".weight"):
                module_name = requested[: -len(".weight")]
            if module_name not in layers:
                if module_name in all_modules:
                    raise ValueError(
                        f"Module '{module_name}' is a {type(all_modules[module_name]).__name__}; input Gram matrices "
                        "are collected for nn.Linear and transformers Conv1D layers only."
                    )
                raise KeyError(f"No module '{requested}' in the model (modules: give module or weight names).")
            module, layout = layers[module_name]
            key = renames[requested] if renames is not None else _weight_key(module_name)
            selected.append((key, module, layout))
    if not selected:
        raise ValueError("The model has no nn.Linear or Conv1D layer to collect input Gram matrices for.")
    keys = [key for key, _, _ in selected]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"Several layers map to the same output key(s): {', '.join(duplicates)}")
    return selected


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for dict batches, ``model(batch)`` for a tensor."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    raise ValueError(
        f"Batches of type {type(batch).__name__} need a `forward_fn(model, batch)` (dicts and tensors are run as "
        "model(**batch) and model(batch))."
    )


def _samples_in(batch: Any) -> int:
    if isinstance(batch, torch.Tensor) and batch.dim() > 0:  # a bare input tensor, [batch, ...]
        return int(batch.shape[0])
    return batch_size(batch)


def _token_mask(batch: Any) -> torch.Tensor | None:
    """The batch's ``attention_mask`` as a ``[batch, seq]`` bool tensor, if it has one of that form."""
    if not isinstance(batch, Mapping):
        return None
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    return mask != 0


class _GramHooks:
    """Forward pre-hooks folding each layer's input rows into its Gram accumulator.

    ``mask`` is the current batch's token mask, set before each forward pass. A layer whose input has the mask's
    leading shape (``[batch, seq, in]``, or ``[batch * seq, in]`` flattened) gets its padding rows zeroed, which drops
    them from ``X^T X`` without a device synchronisation; inputs of other shapes (a pooler's ``[batch, in]``) are used
    whole. Layers fed the very same tensor one after another (query, key and value projections) reuse one product.
    """

    def __init__(self, layers: list[tuple[str, nn.Module, str]], device: torch.device, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.mask: torch.Tensor | None = None
        self.mask_rows: torch.Tensor | None = None
        self.accumulators: dict[str, torch.Tensor] = {}
        self.rows = torch.zeros(len(layers), dtype=torch.float64, device=device)
        self._last: tuple[torch.Tensor, int, torch.Tensor, Any] | None = None  # (input, version, X^T X, rows)
        self.handles = []
        for index, (key, module, layout) in enumerate(layers):
            in_features = module.weight.shape[1] if layout == "out_in" else module.weight.shape[0]
            self.accumulators[key] = torch.zeros(in_features, in_features, dtype=dtype, device=device)
            hook = self._hook(key, index, channels_first=_is_pointwise_conv(module))
            self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def set_batch(self, batch: Any) -> None:
        mask = _token_mask(batch)
        self.mask = mask
        self.mask_rows = mask.sum(dtype=torch.float64) if mask is not None else None
        self._last = None

    def _hook(self, key: str, index: int, channels_first: bool = False):
        """``channels_first``: a pointwise convolution, whose ``[batch, in, H, W]`` input holds one row per position."""
        accumulator = self.accumulators[key]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs = args[0] if args else next(iter(kwargs.values()), None)
            if channels_first and isinstance(inputs, torch.Tensor) and inputs.dim() == 4:
                inputs = inputs.movedim(1, -1)
            if not isinstance(inputs, torch.Tensor) or inputs.shape[-1] != accumulator.shape[0]:
                raise ValueError(
                    f"Layer '{key}' received an input of shape "
                    f"{list(getattr(inputs, 'shape', []))}, expected [..., {accumulator.shape[0]}]."
                )
            last = self._last
            if last is not None and last[0] is inputs and last[1] == inputs._version:
                product, rows = last[2], last[3]
            else:
                product, rows = self._product(inputs.detach())
                self._last = (inputs, inputs._version, product, rows)
            accumulator.add_(product)
            self.rows[index] += rows

        return hook

    def _product(self, inputs: torch.Tensor) -> tuple[torch.Tensor, Any]:
        flat = inputs.reshape(-1, inputs.shape[-1]).to(self.dtype)
        mask = self.mask
        if mask is not None and (
            tuple(inputs.shape[:-1]) == tuple(mask.shape) or (inputs.dim() == 2 and flat.shape[0] == mask.numel())
        ):
            flat = flat * mask.reshape(-1, 1).to(self.dtype)
            rows = self.mask_rows
        else:
            rows = flat.shape[0]
        return flat.T @ flat, rows

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self._last = None


def accumulate_input_grams(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    modules: Iterable[str] | Mapping[str, str] | None = None,
    accelerator=None,
    forward_fn: ForwardFn | None = None,
    num_samples: int | None = None,
    progress: bool = True,
    description: str = "activations",
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], dict[str, str], int, int]:
    """Sum over the calibration tokens of ``x x^T`` for the input ``x`` (``[in]``) of every linear layer.

    ``G = X^T X`` with ``X`` the ``[tokens, in]`` inputs a layer received, padding excluded: when a batch holds a 2-D
    ``attention_mask``, rows where it is 0 are left out of every layer whose input is laid out per token (``[batch, seq,
    in]``). The sums are the raw Gram matrices of RegMean's regression objective ``sum_t ||X_t W - X_t W_t||^2``;
    divide by ``num_tokens`` for the per-token mean the authors' code uses (equal weight to tasks of unequal
    calibration size). A layer applied several times in one forward pass sums all its inputs. The mask is matched to
    layer inputs by shape: in an encoder-decoder model, decoder layers whose sequence happens to have the encoder's
    length would be masked with the encoder's mask; collect such models with batches without padding.

    Args:
        model: the fine-tuned model, in the dtype and on the device the forward pass should run in (it is moved to
            ``accelerator.device`` and put in eval mode for the loop; its mode is restored after).
        batches: an iterable of batches. Under several processes, pass a dataloader prepared by ``accelerator`` so each
            process sees its own share (as for ``accumulate_gradient_statistics``).
        modules: which layers: ``None`` for every ``nn.Linear`` and ``Conv1D``; an iterable of module names
            (``"encoder.layer.0.attention.self.query"``) or weight names (``"...query.weight"``); or a mapping from
            those names to the output keys (e.g. the base model's names of a task model's weights).
        accelerator: an ``accelerate.Accelerator``; default one built here.
        forward_fn: ``forward_fn(model, batch)``, run for its side effects (the output is ignored); default
            ``model(**batch)`` for dicts, ``model(batch)`` for tensors.
        num_samples: stop after this many samples on this process (``None``: all batches).
        progress: show a progress bar (main process only).
        description: name shown on the progress bar and in error messages (e.g. ``"activations[news]"``).
        dtype: accumulation dtype (``torch.float32``, or ``torch.float64`` for very long calibration runs); the
            results are fp32.

    Returns:
        ``(grams, layouts, num_tokens, num_samples)``: ``{weight key: fp32 CPU [in, in]}``, ``{weight key: "out_in" |
        "in_out"}``, the number of rows the most used layer received (the unpadded tokens of a language model), and the
        number of samples, both summed over all processes. Layers no batch reached are left out.

    Raises:
        ValueError: when ``batches`` is empty, no layer was called, or ``modules`` names a layer of another type.
        KeyError: when ``modules`` names a module the model does not have.
        FloatingPointError: when a Gram matrix is not finite (inf/nan activations).
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    check_num_samples(num_samples)
    from accelerate.utils import send_to_device

    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator()
    device = accelerator.device
    forward_fn = forward_fn or default_forward
    layers = _select_layers(model, modules)

    was_training = model.training
    model.to(device)
    model.eval()
    hooks = _GramHooks(layers, device, dtype)

    from tqdm.auto import tqdm

    bar = tqdm(
        total=num_samples,
        desc=description,
        unit="sample",
        disable=None if progress and accelerator.is_main_process else True,
    )
    micro_batches = samples = 0
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                if num_samples is not None and samples >= num_samples:
                    break
                batch = send_to_device(batch, device)
                check_calibration_batch(model, batch, index)
                hooks.set_batch(batch)
                try:
                    forward_fn(model, batch)
                except (IndexError, RuntimeError, TypeError, ValueError) as err:
                    raise calibration_failure(index, batch, err) from err
                micro_batches += 1
                size = _samples_in(batch)
                samples += size
                bar.update(size)
    finally:
        bar.close()
        hooks.remove()
        model.train(was_training)

    totals = torch.tensor([micro_batches, samples], dtype=torch.float64, device=device)
    rows = hooks.rows
    data_parallel = accelerator.num_processes > 1 and not is_sharded(model)  # sharded: every process saw every batch
    if data_parallel:
        totals = accelerator.reduce(totals, reduction="sum")
        rows = accelerator.reduce(rows, reduction="sum")
    if int(totals[0].item()) == 0:
        raise ValueError(f"{description}: the calibration data (`batches`) is empty: no batch was processed.")
    reduce = (lambda t: accelerator.reduce(t, reduction="sum")) if data_parallel else (lambda t: t)
    grams, layouts = _gathered_grams(layers, hooks, rows.tolist(), reduce, description)
    return grams, layouts, int(rows.max().item()), int(totals[1].item())


def _gathered_grams(
    layers: list,
    hooks: _GramHooks,
    rows: list[float],
    reduce: Callable[[torch.Tensor], torch.Tensor],
    description: str,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``({key: fp32 CPU Gram}, {key: layout})`` of the layers that received rows (summed over processes by
    ``reduce``, which every process calls for every layer in the same order); refuses a non-finite Gram."""
    grams: dict[str, torch.Tensor] = {}
    layouts: dict[str, str] = {}
    for (key, _, layout), count in zip(layers, rows):
        accumulator = reduce(hooks.accumulators.pop(key))
        if count == 0:
            continue  # never called (e.g. a projection only used through its weight, like MultiheadAttention's)
        if not torch.isfinite(accumulator).all():
            raise FloatingPointError(
                f"{description}: the input Gram matrix of '{key}' is not finite (inf/nan inputs)."
            )
        grams[key] = accumulator.to(device="cpu", dtype=torch.float32)
        layouts[key] = layout
    if not grams:
        raise ValueError(f"{description}: no nn.Linear or Conv1D layer was called by the forward pass.")
    return grams, layouts


class _LazyGrams(Mapping):
    """Read-only ``{key: fp32 tensor}`` over a statistics file; each tensor is read when it is asked for."""

    def __init__(self, reader: CheckpointReader) -> None:
        self._reader = reader

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._reader:
            raise KeyError(key)
        return self._reader.get_tensor(key).float()

    def __iter__(self) -> Iterator[str]:
        return iter(self._reader.keys())

    def __len__(self) -> int:
        return len(self._reader.keys())

    def __contains__(self, key: object) -> bool:
        return key in self._reader


@dataclass
class ActivationStatistics:
    """Input Gram matrices of one task's linear layers, plus how they were computed.

    Saved as one safetensors file whose tensors are the Gram matrices (named like the weights) and whose metadata
    records ``hf_sta_kind="activation_statistics"``, the layouts (JSON), ``num_tokens``, ``num_samples`` and, when
    known, ``model_hash``, ``dataset_fingerprint`` and ``task``: statistics can be computed where the data lives and
    shipped without it. :meth:`load` reads the tensors lazily.

    Args:
        grams: ``{weight key: [in, in]}`` sums of ``X^T X``.
        layouts: ``{weight key: "out_in" | "in_out"}``, the same keys.
        num_tokens: rows the most used layer received (unpadded tokens).
        num_samples: calibration samples.
    """

    grams: Mapping[str, torch.Tensor]
    layouts: dict[str, str]
    num_tokens: int
    num_samples: int
    model_hash: str | None = None
    dataset_fingerprint: str | None = None
    task: str | None = None

    def __post_init__(self) -> None:
        if set(self.grams) != set(self.layouts):
            missing = sorted(set(self.grams) ^ set(self.layouts))
            raise ValueError(f"grams and layouts must have the same keys; they differ in: {', '.join(missing[:5])}")
        bad = {key: layout for key, layout in self.layouts.items() if layout not in GRAM_LAYOUTS}
        if bad:
            raise ValueError(f"layouts must be 'out_in' or 'in_out', got {bad}")

    def keys(self) -> list[str]:
        return list(self.grams)

    def __contains__(self, key: object) -> bool:
        return key in self.grams

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.grams[key]

    def mean_grams(self) -> dict[str, torch.Tensor]:
        """``{key: G / num_tokens}``: per-token means (the normalisation of the RegMean authors' code)."""
        return {key: self.grams[key] / max(self.num_tokens, 1) for key in self.keys()}

    @property
    def metadata(self) -> dict[str, str]:
        meta = {
            "hf_sta_kind": _KIND,
            "format_version": _FORMAT_VERSION,
            "layouts": json.dumps(self.layouts, sort_keys=True),
            "num_tokens": str(self.num_tokens),
            "num_samples": str(self.num_samples),
        }
        for key in ("model_hash", "dataset_fingerprint", "task"):
            if getattr(self, key) is not None:
                meta[key] = str(getattr(self, key))
        return meta

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the statistics to ``path`` (one ``.safetensors`` file, atomically) and return it; an existing
        ``path`` is refused unless ``overwrite``."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"Activation statistics are saved as a .safetensors file, got '{path}'.")
        grams = {key: self.grams[key].float() for key in self.keys()}
        save_tensors(path, grams, self.metadata, overwrite=overwrite)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ActivationStatistics:
        """Read statistics written by :meth:`save` (tensors are read on access).

        Raises:
            FileNotFoundError: if ``path`` is not a file.
            CheckpointError: if it is not a safetensors file of hf_sta activation statistics, or is inconsistent.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Activation statistics file '{path}' does not exist.")
        try:
            reader = CheckpointReader(path)
        except CheckpointError as err:
            raise CheckpointError(f"'{path}' is not an hf_sta activation statistics file: {err}") from err
        except Exception as err:  # a corrupt header: say which file
            raise CheckpointError(f"'{path}' is not a readable safetensors file: {err}") from err
        meta = reader.metadata
        if meta.get("hf_sta_kind") != _KIND:
            found = meta.get("hf_sta_kind")
            what = f"an hf_sta '{found}' file" if found else "a safetensors file without hf_sta metadata"
            raise CheckpointError(
                f"'{path}' is {what}, not activation statistics (merger.compute_activation_statistics writes those)."
            )
        try:
            layouts = json.loads(meta["layouts"])
            num_tokens, num_samples = int(meta["num_tokens"]), int(meta["num_samples"])
        except (KeyError, ValueError, TypeError) as err:
            raise CheckpointError(
                f"'{path}': activation statistics metadata is incomplete or malformed ({err})."
            ) from err
        if not isinstance(layouts, dict) or set(layouts) != set(reader.keys()):
            raise CheckpointError(f"'{path}': the layouts in its metadata do not match its tensors.")
        for key in reader.keys():
            shape = reader.shape(key)
            if len(shape) != 2 or shape[0] != shape[1]:
                raise CheckpointError(f"'{path}': tensor '{key}' has shape {list(shape)}, not a square Gram matrix.")
        try:
            return cls(
                grams=_LazyGrams(reader),
                layouts=layouts,
                num_tokens=num_tokens,
                num_samples=num_samples,
                model_hash=meta.get("model_hash"),
                dataset_fingerprint=meta.get("dataset_fingerprint"),
                task=meta.get("task"),
            )
        except ValueError as err:
            raise CheckpointError(f"'{path}': {err}") from err

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        batches: Iterable[Any],
        *,
        model_hash: str | None = None,
        dataset_fingerprint: str | None = None,
        task: str | None = None,
        **kwargs,
    ) -> ActivationStatistics:
        """``accumulate_input_grams(model, batches, **kwargs)`` wrapped with its provenance."""
        grams, layouts, num_tokens, num_samples = accumulate_input_grams(model, batches, **kwargs)
        return cls(
            grams=grams,
            layouts=layouts,
            num_tokens=num_tokens,
            num_samples=num_samples,
            model_hash=model_hash,
            dataset_fingerprint=dataset_fingerprint,
            task=task,
        )
