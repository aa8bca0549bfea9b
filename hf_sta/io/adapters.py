"""PEFT LoRA adapters <-> dense task vectors.

Reading: a LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, or ``adapter_model.bin``
through ``torch.load(weights_only=True)``) is a task vector on the base model's tensor names::

    tau[W] = scaling * (B @ A)          scaling = lora_alpha / r   (lora_alpha / sqrt(r) with use_rslora)

with ``r`` and ``lora_alpha`` resolved per module through ``rank_pattern`` / ``alpha_pattern`` as PEFT does. The layout
of ``B @ A`` follows the adapted module (:data:`LoraLayout`): ``nn.Linear`` ``(out, in)``; transformers' ``Conv1D``
(``fan_in_fan_out``) stores ``(in, out)``, so ``tau = (B @ A)^T``; ``nn.Embedding`` ``(num_embeddings, dim)`` from
``lora_embedding_A (r, num_embeddings)`` and ``lora_embedding_B (dim, r)``, so ``tau = (B @ A)^T``; ``nn.ConvNd``
``(out, in, *k)`` from ``A (r, in, *k)`` (the module's kernel) and ``B (out, r, 1, ...)`` (a 1x1 conv), so
``tau[o, i, ...] = scaling * sum_r B[o, r] A[r, i, ...]``. Tensors an adapter saves in full (``modules_to_save``, biases
trained with ``bias="all"``/``"lora_only"``, embedding layers saved beside their LoRA) give ``tau = saved - base``;
``lora_bias=True`` gives ``tau[bias] = scaling * lora_B.bias``. The A and B factors are never combined separately:
only dense deltas are added, one module at a time.

Writing: :func:`write_lora_adapter` factors dense deltas back into a PEFT adapter by truncated SVD, the best rank-r
approximation in Frobenius norm (Eckart-Young)::

    delta = U S V^T,   B = U_r sqrt(S_r),   A = sqrt(S_r) V_r^T,   lora_alpha = r  (scaling 1)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import CheckpointError
from .checkpoints import resolve_checkpoint, save_tensors

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_SAFE_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_WEIGHTS_NAME = "adapter_model.bin"
# PeftModel wraps the model as `base_model` (the LoraModel) whose `model` is the transformers model.
PEFT_KEY_PREFIX = "base_model.model."

LoraLayout = Literal["linear", "linear_transposed", "embedding", "conv"]
"""How ``B @ A`` maps onto the adapted weight.

``"linear"``: ``nn.Linear`` weight ``(out, in) = B @ A``. ``"linear_transposed"``: transformers ``Conv1D`` (GPT-2) weight
``(in, out) = (B @ A)^T`` (PEFT's ``fan_in_fan_out``). ``"embedding"``: ``nn.Embedding`` weight ``(num, dim) = (B @ A)^T``
with PEFT's ``lora_embedding_A`` / ``lora_embedding_B`` keys. ``"conv"``: ``nn.Conv{1,2,3}d`` weight ``(out, in, *k)``
with ``A (r, in, *k)`` and ``B (out, r, 1, ...)``.
"""

# LoRA variants whose merged delta is still `scaling * B @ A` (they change training or the forward pass only).
_DELTA_PRESERVING_VARIANTS = {
    "velora_config": "VeLoRA",  # custom backward pass; merge uses get_delta_weight
    "monteclora_config": "MonteCLoRA",  # Monte Carlo sampling in training; merge uses get_delta_weight
    "mica": "MiCA",  # init_lora_weights="mica": frozen B, delta = scaling * B @ A
}
# Config fields that make an adapter something hf_sta cannot read as `scaling * B @ A` on the base's tensors.
_UNSUPPORTED_FIELDS = {
    "use_dora": ("DoRA", "its merged weight is magnitude-rescaled column-wise, not W + scaling * B @ A"),
    "alora_invocation_tokens": ("aLoRA", "activated LoRA applies to some tokens only and cannot be merged"),
    "use_bdlora": ("BD-LoRA", "block-diagonal factors"),
    "arrow_config": ("Arrow routing", "a mixture of adapters chosen per token"),
    "kasa_config": ("KaSA", "a learned diagonal between A and B, and a truncated base weight"),
    "use_qalora": ("QALoRA", "A acts on pooled inputs"),
    "layer_replication": ("layer replication", "the adapter targets replicated layers the base does not have"),
    "target_parameters": ("LoRA on parameters (target_parameters)", "e.g. MoE expert tensors"),
    "trainable_token_indices": ("trainable tokens (trainable_token_indices)", "sparse embedding rows"),
}
# init_lora_weights values that move the base weights (W_res = W - B A at init): the saved adapter only makes sense on
# the modified base, unless it was converted with save_pretrained(path_initial_model_for_weight_conversion=...).
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
# Tensors that allowed variants save beside A and B and that do not enter the merged weight.
_IGNORED_VARIANT_TENSORS = ("lora_velora_", "lora_monteclora_sampler")

_FACTOR_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?P<param>weight|bias))?$"
)


# --------------------------------------------------------------------------------------------------------------------
# Pure functions: LoRA factors <-> dense deltas
# --------------------------------------------------------------------------------------------------------------------


def get_pattern_key(pattern_keys: Iterable[str], key_to_match: str) -> str:
    """The first of ``pattern_keys`` (regexes) that matches ``key_to_match`` as ``(.*\\.)?(pattern)$``, else the key.

    PEFT's own rule for ``rank_pattern`` / ``alpha_pattern`` (``peft.utils.other.get_pattern_key``); the installed
    PEFT's function is used when it has one, so an adapter reads here as the installed PEFT loads it.
    """
    try:
        from peft.utils.other import get_pattern_key as peft_get_pattern_key

        return peft_get_pattern_key(list(pattern_keys), key_to_match)
    except ImportError:  # PEFT releases before the helper existed (peft>=0.13 is allowed); the same rule
        for key in pattern_keys:
            if re.match(rf"(.*\.)?({key})$", key_to_match):
                return key
        return key_to_match


def lora_rank_and_scaling(adapter_config: Mapping[str, Any], module_name: str) -> tuple[int, float]:
    """``(r, scaling)`` of ``module_name`` (its name in the PEFT-wrapped model, without ``base_model.model.``).

    ``r`` and ``lora_alpha`` come from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches, else from ``r`` /
    ``lora_alpha``; ``scaling = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``.
    """
    rank_pattern = adapter_config.get("rank_pattern") or {}
    alpha_pattern = adapter_config.get("alpha_pattern") or {}
    rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module_name), adapter_config.get("r", 8))
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module_name), adapter_config.get("lora_alpha", 8))
    if adapter_config.get("use_rslora", False):
        return int(rank), alpha / math.sqrt(rank)
    return int(rank), alpha / rank


def lora_delta_weight(
    lora_A: torch.Tensor, lora_B: torch.Tensor, *, scaling: float, layout: LoraLayout = "linear"
) -> torch.Tensor:
    """The dense fp32 delta ``scaling * (B @ A)`` in the adapted weight's own layout.

    Shapes: ``"linear"``: ``A (r, in)``, ``B (out, r)`` -> ``(out, in)``; ``"linear_transposed"``: same factors ->
    ``(in, out)``; ``"embedding"``: ``A (r, num)``, ``B (dim, r)`` -> ``(num, dim)``; ``"conv"``: ``A (r, in, *k)``,
    ``B (out, r, 1, ...)`` -> ``(out, in, *k)`` (PEFT's ``conv(A^T, B)^T`` composition, written as a matrix product).
    """
    a, b = lora_A.float(), lora_B.float()
    if layout == "conv":
        matrix = b.reshape(b.shape[0], b.shape[1]) @ a.reshape(a.shape[0], -1)
        return matrix.reshape(b.shape[0], *a.shape[1:]) * scaling
    product = b @ a
    if layout in ("linear_transposed", "embedding"):
        product = product.T
    elif layout != "linear":
        raise ValueError(f"Unknown LoRA layout {layout!r}.")
    return product * scaling


def _lora_matrix(delta: torch.Tensor, layout: LoraLayout) -> torch.Tensor:
    """The matrix ``M = B @ A`` (``(out, in_total)``) whose factors PEFT stores for a delta of this layout."""
    if layout == "linear":
        return delta
    if layout in ("linear_transposed", "embedding"):
        return delta.T
    if layout == "conv":
        return delta.reshape(delta.shape[0], -1)
    raise ValueError(f"Unknown LoRA layout {layout!r}.")


def select_rank(singular_values: torch.Tensor, *, max_rank: int | None = None, energy: float | None = None) -> int:
    """The LoRA rank for singular values ``s_1 >= s_2 >= ...``.

    With ``energy``: the smallest ``r`` with ``sum_{i<=r} s_i^2 >= energy * sum_i s_i^2``; capped by ``max_rank`` when
    both are given; ``max_rank`` alone gives ``max_rank``. Always ``1 <= r <= len(s)``.
    """
    if max_rank is None and energy is None:
        raise ValueError("Give max_rank, energy, or both to choose the LoRA rank.")
    if max_rank is not None and max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}.")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}.")
    count = int(singular_values.numel())
    rank = count
    if energy is not None:
        cumulative = torch.cumsum(singular_values.double() ** 2, dim=0)
        total = float(cumulative[-1]) if count else 0.0
        rank = int((cumulative < energy * total).sum()) + 1 if total > 0 else 1
    if max_rank is not None:
        rank = min(rank, max_rank)
    return max(1, min(rank, count))


def factorize_delta(
    delta: torch.Tensor,
    *,
    layout: LoraLayout = "linear",
    max_rank: int | None = None,
    energy: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factor ``delta`` into PEFT LoRA factors ``(lora_A, lora_B, singular_values)`` with ``scaling = 1``.

    With ``M = _lora_matrix(delta) = U S V^T`` (``(out, in_total)``) and ``r = select_rank(S, max_rank, energy)``:
    ``B = U_r sqrt(S_r)`` and ``A = sqrt(S_r) V_r^T``, reshaped to the layout's factor shapes (see
    :func:`lora_delta_weight`), so ``lora_delta_weight(A, B, scaling=1, layout) = U_r U_r^T M`` is the best rank-r
    approximation of ``delta`` in Frobenius norm (Eckart-Young). ``singular_values`` are all of ``S``, descending.

    Computed in fp64 on ``delta``'s device from the eigendecomposition of the smaller Gram matrix (``M M^T`` or
    ``M^T M``), then the projection ``U_r^T M``: 2-6x faster than ``torch.linalg.svd`` on CPU and exact to fp64
    rounding for every singular value above ``~1e-8 * s_1`` (those below cannot change a kept rank-r subspace).
    """
    matrix = _lora_matrix(delta, layout).double()
    transposed = matrix.shape[0] > matrix.shape[1]
    work = matrix.T if transposed else matrix  # (p, q) with p <= q
    eigenvalues, eigenvectors = torch.linalg.eigh(work @ work.T)  # ascending
    singular_values = eigenvalues.flip(0).clamp_min(0.0).sqrt()
    rank = select_rank(singular_values, max_rank=max_rank, energy=energy)
    vectors = eigenvectors.flip(1)[:, :rank]  # top-r left singular vectors of `work`, (p, r)
    projection = vectors.T @ work  # s_i v_i^T, (r, q)
    norms = projection.norm(dim=1)  # s_i, recomputed from the projection itself
    root = norms.sqrt()
    inverse_root = torch.where(norms > 0, 1.0 / root.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    if transposed:  # M = work^T ~ projection^T vectors^T
        lora_B = projection.T * inverse_root  # (out, r): s_i u_i / sqrt(s_i)
        lora_A = (vectors * root).T  # (r, in): sqrt(s_i) v_i^T
    else:
        lora_B = vectors * root
        lora_A = projection * inverse_root[:, None]
    lora_A, lora_B = lora_A.float(), lora_B.float()
    if layout == "conv":
        lora_A = lora_A.reshape(rank, *delta.shape[1:])
        lora_B = lora_B.reshape(delta.shape[0], rank, *([1] * (delta.ndim - 2)))
    return lora_A.contiguous(), lora_B.contiguous(), singular_values.float()


def lora_layouts(
    model: torch.nn.Module | str | os.PathLike, *, trust_remote_code: bool = False
) -> dict[str, LoraLayout]:
    """Map each LoRA-able weight name (``<module>.weight``) of ``model`` to its :data:`LoraLayout`.

    ``model`` is a module, or a transformers checkpoint folder whose ``config.json`` is instantiated on the ``meta``
    device (no weights are read; a config with ``auto_map`` needs ``trust_remote_code=True``, passed to transformers
    explicitly so that it never asks on stdin). ``nn.Linear`` -> ``"linear"``, transformers ``Conv1D`` -> ``"linear_transposed"``,
    ``nn.Embedding`` -> ``"embedding"``, ungrouped ``nn.Conv1d/2d/3d`` -> ``"conv"``. Other tensors (norms, biases,
    grouped convs, raw parameters) are absent: they cannot be written as LoRA.
    """
    from transformers.pytorch_utils import Conv1D

    if not isinstance(model, torch.nn.Module):
        model = _meta_model(Path(model), trust_remote_code=trust_remote_code)
    layouts: dict[str, LoraLayout] = {}
    for name, module in model.named_modules():
        key = f"{name}.weight" if name else "weight"
        if isinstance(module, torch.nn.Linear):
            layouts[key] = "linear"
        elif isinstance(module, Conv1D):
            layouts[key] = "linear_transposed"
        elif isinstance(module, torch.nn.Embedding):
            layouts[key] = "embedding"
        elif isinstance(module, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Conv3d) and module.groups == 1:
            layouts[key] = "conv"
    return layouts


def _meta_model(folder: Path, *, trust_remote_code: bool) -> torch.nn.Module:
    """The model of ``folder/config.json`` on the meta device: its ``architectures[0]`` class from transformers, or
    from the config's ``auto_map`` (custom code, with ``trust_remote_code``), else ``AutoModel``."""
    import transformers

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"'{folder}' has no config.json to build the model's module layouts from.")
    auto_map = json.loads((folder / "config.json").read_text()).get("auto_map") or {}
    if auto_map and not trust_remote_code:
        raise CheckpointError(
            f"'{folder / 'config.json'}' names custom model code (auto_map: {', '.join(sorted(auto_map))}); reading "
            "its module layouts runs that code: pass trust_remote_code=True (--trust-remote-code) if you trust it."
        )
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    auto_class = next(
        (name for name, ref in auto_map.items() if architectures and str(ref).endswith("." + architectures[0])),
        "AutoModel",
    )
    with torch.device("meta"):
        if model_class is None:
            return getattr(transformers, auto_class).from_config(config, trust_remote_code=trust_remote_code)
        return model_class(config)


def _check_finite(tensor: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(f"{what} holds {bad} NaN/inf value(s).")
    return tensor


# --------------------------------------------------------------------------------------------------------------------
# Reading: adapter configs (the task vector itself is hf_sta.lora_task_vector.LoraTaskVector)
# --------------------------------------------------------------------------------------------------------------------


def check_supported_adapter(adapter_config: Mapping[str, Any], where: str) -> None:
    """Raise :class:`CheckpointError` naming the adapter kind when it is not a plain (mergeable) LoRA."""
    peft_type = str(adapter_config.get("peft_type") or "").upper()
    if peft_type != "LORA":
        raise CheckpointError(
            f"'{where}' is a {peft_type or 'unknown'} adapter (peft_type={adapter_config.get('peft_type')!r}), which "
            "hf_sta does not support yet: only LoRA adapters (peft_type='LORA') can be read as task vectors."
        )
    for name, (kind, why) in _UNSUPPORTED_FIELDS.items():
        if adapter_config.get(name):
            raise CheckpointError(
                f"'{where}' uses {kind}, which hf_sta does not support yet ({name}={adapter_config[name]!r}: {why}); "
                "only plain LoRA deltas scaling * B @ A can be merged."
            )
    # Variants the installed PEFT knows (tagged in LoraConfig) but this module has not verified.
    from peft import LoraConfig

    config_fields = {f.name: f for f in dataclasses.fields(LoraConfig)}
    for name, config_field in config_fields.items():
        if config_field.metadata.get("is_lora_variant") and adapter_config.get(name):
            if name not in _DELTA_PRESERVING_VARIANTS:
                raise CheckpointError(
                    f"'{where}' uses the LoRA variant '{name}', which hf_sta does not support yet; only plain LoRA "
                    "deltas scaling * B @ A can be merged."
                )
    init = str(adapter_config.get("init_lora_weights", True)).lower()
    init_variants = config_fields["init_lora_weights"].metadata.get("lora_variants", [])
    if init in init_variants and init not in _DELTA_PRESERVING_VARIANTS:
        raise CheckpointError(
            f"'{where}' uses the LoRA variant init_lora_weights={init!r}, which hf_sta does not support yet; only "
            "plain LoRA deltas scaling * B @ A can be merged."
        )
    if init.startswith(_BASE_MODIFYING_INITS):
        raise CheckpointError(
            f"'{where}' was initialised with init_lora_weights={adapter_config['init_lora_weights']!r}, which "
            "modifies the base weights, so its A and B are not a delta on the original base; hf_sta does not support "
            "it yet. Convert it to a plain LoRA with PeftModel.save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...) first."
        )
    known_fields = set(config_fields)
    unknown = sorted(k for k, v in adapter_config.items() if k not in known_fields and v and k != "auto_mapping")
    if unknown:
        logger.warning(
            "Adapter '%s' sets config fields the installed PEFT does not know (%s); they are ignored. If they define a "
            "LoRA variant, the task vector may be wrong.",
            where,
            ", ".join(unknown),
        )


def resolve_adapter(
    adapter_path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    subfolder: str | None = None,
) -> Path:
    """The local folder holding ``adapter_config.json`` (a folder, a file in it, or a Hub repo id)."""
    allow = [ADAPTER_CONFIG_NAME, ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME]
    if subfolder:
        allow = [f"{subfolder}/{name}" for name in allow]
    path = resolve_checkpoint(adapter_path_or_repo_id, revision=revision, token=token, allow_patterns=allow)
    if path.is_file():
        path = path.parent
    if subfolder:
        path = path / subfolder
    return path


# --------------------------------------------------------------------------------------------------------------------
# Writing: dense deltas -> PEFT LoRA adapter
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ModuleWriteReport:
    """One written LoRA module: ``relative_error = ||delta - B A||_F / ||delta||_F`` (factors in the saved dtype)."""

    key: str
    module: str
    layout: LoraLayout
    rank: int
    relative_error: float
    energy_kept: float  # sum_{i<=r} s_i^2 / sum_i s_i^2


@dataclass
class AdapterWriteReport:
    """What :func:`write_lora_adapter` wrote: per-module ranks and errors, skipped deltas, the config."""

    output_dir: Path
    modules: dict[str, ModuleWriteReport] = field(default_factory=dict)  # by base key
    skipped: dict[str, str] = field(default_factory=dict)  # base key -> why it is not in the adapter
    adapter_config: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_relative_error(self) -> float:
        errors = [m.relative_error for m in self.modules.values()]
        return sum(errors) / len(errors) if errors else 0.0

    @property
    def max_relative_error(self) -> float:
        return max((m.relative_error for m in self.modules.values()), default=0.0)

    @property
    def ranks(self) -> dict[str, int]:
        return {m.module: m.rank for m in self.modules.values()}

    def summary(self) -> dict[str, Any]:
        ranks = [m.rank for m in self.modules.values()]
        return {
            "modules": len(self.modules),
            "rank_min": min(ranks, default=0),
            "rank_max": max(ranks, default=0),
            "relative_error_mean": self.mean_relative_error,
            "relative_error_max": self.max_relative_error,
            "skipped": len(self.skipped),
        }


# Above this mean relative reconstruction error ||delta - B A||_F / ||delta||_F over the adapter's modules, writing
# an adapter warns: the adapter then differs visibly from the dense result it stands for (raise max_rank / energy).
ADAPTER_ERROR_WARNING = 0.1


def _warn(report: AdapterWriteReport) -> None:
    """One warning line for the deltas left out, one for a poor factorisation (above ``ADAPTER_ERROR_WARNING``)."""
    left_out = [key for key, why in report.skipped.items() if why.startswith("not LoRA-able")]
    if left_out:
        shown = ", ".join(left_out[:3]) + (f" and {len(left_out) - 3} more" if len(left_out) > 3 else "")
        logger.warning(
            "%d delta(s) that are not weights of LoRA-able modules (biases, norms, ...) are not in the adapter: %s "
            "(their norms: AdapterWriteReport.skipped; keep them with a full checkpoint).", len(left_out), shown,
        )  # fmt: skip
    if report.mean_relative_error > ADAPTER_ERROR_WARNING:
        logger.warning(
            "The LoRA adapter reproduces its deltas with a mean relative error of %.1f%% (max %.1f%%, above %.0f%%): "
            "raise max_rank or energy for a closer adapter.", 100 * report.mean_relative_error,
            100 * report.max_relative_error, 100 * ADAPTER_ERROR_WARNING,
        )  # fmt: skip


def _factor_keys(module: str, layout: LoraLayout) -> tuple[str, str]:
    if layout == "embedding":
        return f"{PEFT_KEY_PREFIX}{module}.lora_embedding_A", f"{PEFT_KEY_PREFIX}{module}.lora_embedding_B"
    return f"{PEFT_KEY_PREFIX}{module}.lora_A.weight", f"{PEFT_KEY_PREFIX}{module}.lora_B.weight"


def write_lora_adapter(
    output_dir: str | os.PathLike,
    deltas: Iterable[tuple[str, torch.Tensor]],
    *,
    base_model_name_or_path: str | None,
    max_rank: int | None = None,
    energy: float | None = None,
    torch_dtype: torch.dtype = torch.float32,
    layouts: Mapping[str, LoraLayout] | None = None,
    task_type: str | None = None,
    non_lora: Literal["raise", "skip"] = "raise",
) -> AdapterWriteReport:
    """Factor dense deltas by truncated SVD and write them as a PEFT LoRA adapter folder.

    ``deltas`` streams ``(base tensor name, dense fp32 delta)`` pairs, e.g. ``("model.layers.0.self_attn.q_proj.weight",
    tau)``; each is factored as soon as it arrives (:func:`factorize_delta`: ``B = U_r sqrt(S_r)``,
    ``A = sqrt(S_r) V_r^T``; ``r = max_rank``, or the smallest ``r`` keeping ``energy`` of ``sum s_i^2``, capped by
    ``max_rank`` when both are given) and only its factors are kept, so memory is one dense delta plus all factors.
    Every module gets ``lora_alpha = r`` (``scaling = 1``); the most common rank is ``r``/``lora_alpha`` of the config
    and the others go to ``rank_pattern``/``alpha_pattern`` (keyed by the escaped full module name). The module name is
    the tensor name without ``.weight``; ``target_modules`` lists these names. ``output_dir`` receives
    ``adapter_config.json`` (from ``peft.LoraConfig``, so it is valid for the installed PEFT) and
    ``adapter_model.safetensors`` with PEFT's key names (``base_model.model.<module>.lora_A.weight``).

    ``layouts`` (base key -> :data:`LoraLayout`, see :func:`lora_layouts` and :attr:`LoraTaskVector.layouts`) tells
    embeddings (``lora_embedding_A/B``) and transformers ``Conv1D`` weights (stored ``(in, out)``) apart from
    ``nn.Linear``; a key absent from a given ``layouts`` cannot be LoRA. Without ``layouts``, 2-D deltas are taken as
    ``nn.Linear`` weights and 3-D to 5-D ones as convolutions. Deltas that cannot be LoRA (biases, norms, 1-D tensors,
    ``*.in_proj_weight``) raise ``ValueError`` at once (``non_lora="raise"``, default: filter them out first, or keep
    them in a dense checkpoint) or are left out and listed in ``report.skipped`` (``non_lora="skip"``). All-zero deltas
    are left out (listed in ``report.skipped``).
    """
    if max_rank is None and energy is None:
        raise ValueError("write_lora_adapter needs max_rank, energy, or both to choose each module's rank.")
    select_rank(torch.ones(1), max_rank=max_rank, energy=energy)  # validates the arguments before any SVD
    if non_lora not in ("raise", "skip"):
        raise ValueError(f"non_lora must be 'raise' or 'skip', got {non_lora!r}.")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    report = AdapterWriteReport(output_dir=output)
    tensors: dict[str, torch.Tensor] = {}

    for key, delta in deltas:
        if key in report.modules or key in report.skipped:
            raise ValueError(f"Delta '{key}' given twice.")
        layout = _delta_layout(key, delta, layouts)
        if layout is None:
            reason = f"shape {list(delta.shape)} is not the weight of a LoRA-able module"
            if non_lora == "raise":
                raise ValueError(
                    f"Delta '{key}' ({reason}) cannot be written as LoRA. Leave biases, norms and other non-module "
                    "weights out of the deltas (keep them in a dense checkpoint), or pass non_lora='skip' to drop them."
                )
            report.skipped[key] = f"not LoRA-able: {reason}; ||delta||_F = {float(delta.float().norm()):.4g}"
            logger.debug("Not written to the LoRA adapter: '%s' (%s).", key, report.skipped[key])
            continue
        delta = delta.detach().float()
        if float(delta.norm()) == 0.0:
            report.skipped[key] = "zero delta"
            continue
        factors, report.modules[key] = _factor_module(key, delta, layout, max_rank, energy, torch_dtype)
        tensors.update(factors)

    if not report.modules:
        raise ValueError("No non-zero LoRA-able delta to write: a LoRA adapter needs at least one module.")
    layouts_used = {m.layout for m in report.modules.values()}
    config = _lora_config(
        {m.module: m.rank for m in report.modules.values()},
        fan_in_fan_out="linear_transposed" in layouts_used,
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
    )
    config.save_pretrained(str(output))
    save_tensors(output / ADAPTER_SAFE_WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    report.adapter_config = json.loads((output / ADAPTER_CONFIG_NAME).read_text())
    _warn(report)
    summary = report.summary()
    logger.debug(
        "Wrote a LoRA adapter with %d modules (rank %d-%d) to '%s'; relative error mean %.3g, max %.3g; %d skipped.",
        summary["modules"],
        summary["rank_min"],
        summary["rank_max"],
        output,
        summary["relative_error_mean"],
        summary["relative_error_max"],
        summary["skipped"],
    )
    return report


def _delta_layout(key: str, delta: torch.Tensor, layouts: Mapping[str, LoraLayout] | None) -> LoraLayout | None:
    """The LoRA layout of the module weight ``key`` (``layouts``' entry, else ``linear`` for 2-D and ``conv`` for 3-D
    to 5-D deltas); ``None`` when it cannot be LoRA (not a ``.weight``, or a shape that does not fit the layout)."""
    if layouts is not None:
        layout = layouts.get(key)
    else:
        layout = "linear" if delta.ndim == 2 else "conv" if 3 <= delta.ndim <= 5 else None
    if layout is None or not key.endswith(".weight") or (layout == "conv") != (delta.ndim > 2):
        return None
    return layout


def _factor_module(
    key: str, delta: torch.Tensor, layout: LoraLayout, max_rank: int | None, energy: float | None, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], ModuleWriteReport]:
    """PEFT's ``lora_A`` / ``lora_B`` tensors of one non-zero fp32 ``delta`` (:func:`factorize_delta`) and the
    module's report: rank, relative reconstruction error ``||delta - B A||_F / ||delta||_F``, energy kept."""
    module = key[: -len(".weight")]
    lora_A, lora_B, singular_values = factorize_delta(delta, layout=layout, max_rank=max_rank, energy=energy)
    lora_A, lora_B = lora_A.to(dtype).cpu(), lora_B.to(dtype).cpu()
    rank = lora_A.shape[0]
    reconstruction = lora_delta_weight(lora_A, lora_B, scaling=1.0, layout=layout)
    error = float((delta.cpu() - reconstruction).norm()) / float(delta.norm())
    squared = singular_values.double() ** 2
    kept = float(squared[:rank].sum() / squared.sum())
    logger.debug("LoRA for '%s': rank %d, relative error %.3g, energy kept %.4f", module, rank, error, kept)
    a_key, b_key = _factor_keys(module, layout)
    return {a_key: lora_A, b_key: lora_B}, ModuleWriteReport(key, module, layout, rank, error, kept)


def _lora_config(ranks: Mapping[str, int], **options: Any) -> Any:
    """``peft.LoraConfig`` of modules with ``ranks`` (``lora_alpha = r``: scaling 1): the most common rank is the
    config's ``r``, the others go to ``rank_pattern`` / ``alpha_pattern`` under their escaped full names."""
    from peft import LoraConfig

    default_rank = Counter(ranks.values()).most_common(1)[0][0]
    # Longest names first: PEFT takes the first pattern matching `(.*\.)?(pattern)$`.
    patterns = {
        re.escape(module): rank
        for module, rank in sorted(ranks.items(), key=lambda item: (-len(item[0]), item[0]))
        if rank != default_rank
    }
    config = LoraConfig(
        r=default_rank,
        lora_alpha=default_rank,
        target_modules=sorted(ranks),
        rank_pattern=dict(patterns),
        alpha_pattern=dict(patterns),
        lora_dropout=0.0,
        bias="none",
        inference_mode=True,
        **options,
    )
    for module, rank in ranks.items():  # guards against a PEFT whose pattern rule differs from the one assumed here
        resolved, _ = lora_rank_and_scaling(config.to_dict(), module)
        if resolved != rank:
            raise RuntimeError(f"rank_pattern resolves module '{module}' to rank {resolved}, not {rank}.")
    return config


__all__ = [
    "ADAPTER_ERROR_WARNING",
    "LoraLayout",
    "AdapterWriteReport",
    "ModuleWriteReport",
    "write_lora_adapter",
    "lora_layouts",
    "lora_delta_weight",
    "lora_rank_and_scaling",
    "factorize_delta",
    "select_rank",
    "check_supported_adapter",
    "resolve_adapter",
    "get_pattern_key",
]
