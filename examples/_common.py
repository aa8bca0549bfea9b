"""Plumbing shared by the examples (not part of the hf_sta API): models, data, a small training loop, scoring.

By default every example runs on the real offline assets: all-MiniLM-L6-v2 (or SmolLM2-135M for LoRA) and the
text tasks of ``benchmarks.tasks``. With ``--tiny`` the model is a tiny, randomly initialised BERT (or Llama) built
from a config, with MiniLM's tokenizer, trained on a few dozen real examples: what ``tests/test_examples.py`` runs
in seconds. Run the examples from the repository root as modules: ``python -m examples.merge_minilm``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from benchmarks.finetune import (
    DEFAULT_LEARNING_RATE,
    MAX_GRAD_NORM,
    WARMUP_RATIO,
    WEIGHT_DECAY,
    finetune,
    minilm_path,
)
from benchmarks.tasks import label_names, load_task

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
"""Layer sizes of the ``--tiny`` BERT (its vocabulary is MiniLM's, so the real tokenizer and data are used)."""
TINY_MAX_LENGTH = 32
HEAD_KEYS = ("classifier.weight", "classifier.bias")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep the output to the result tables (no load reports, progress bars, deprecation warnings, or one line per
    tensor an adapter leaves out: the examples count those); restores every setting afterwards."""
    import datasets
    import transformers

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    adapters_logger = logging.getLogger("hf_sta.io.adapters")
    level, verbosity = adapters_logger.level, transformers.logging.get_verbosity()
    bars, datasets_bars = transformers.utils.logging.is_progress_bar_enabled(), datasets.are_progress_bars_disabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        adapters_logger.setLevel(logging.ERROR)
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        try:
            yield
        finally:
            adapters_logger.setLevel(level)
            transformers.logging.set_verbosity(verbosity)
            if bars:
                transformers.utils.logging.enable_progress_bar()
            if not datasets_bars:
                datasets.enable_progress_bars()


def add_common_arguments(parser: argparse.ArgumentParser, *, name: str, train_size: int = 600) -> None:
    """The options every example takes: ``--tiny`` and the small-settings knobs the tests turn down."""
    parser.add_argument("--tiny", action="store_true", help="tiny model built from a config, few examples (seconds)")
    parser.add_argument(
        "--train-size",
        type=int,
        default=None,
        help=f"training examples per task (default {train_size}; 32 with --tiny)",
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-4; 3e-3 with --tiny)")
    parser.add_argument(
        "--eval-size", type=int, default=None, help="cap on validation/test examples (default all: 200/400; 64 tiny)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--output-dir", type=Path, default=Path("out/examples") / name, help="replaced if it exists")
    parser.set_defaults(default_train_size=train_size)


@dataclass(frozen=True)
class Settings:
    """Training and evaluation settings, resolved from the command line (``--tiny`` changes the defaults)."""

    tiny: bool
    train_size: int
    epochs: int
    lr: float
    eval_size: int | None
    seed: int
    batch_size: int
    max_length: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        tiny = bool(args.tiny)
        return cls(
            tiny=tiny,
            train_size=args.train_size or (32 if tiny else args.default_train_size),
            epochs=args.epochs,
            lr=args.lr or (3e-3 if tiny else DEFAULT_LEARNING_RATE),
            eval_size=args.eval_size or (64 if tiny else None),
            seed=args.seed,
            batch_size=8 if tiny else 16,
            max_length=TINY_MAX_LENGTH if tiny else 128,
        )


def load_splits(task: str, settings: Settings) -> datasets.DatasetDict:
    """``benchmarks.tasks.load_task`` (canonical split), validation and test cut to ``settings.eval_size``."""
    splits = load_task(task, train_size=settings.train_size)
    if settings.eval_size is not None:
        for split in ("validation", "test"):
            splits[split] = splits[split].select(range(min(settings.eval_size, len(splits[split]))))
    return splits


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def base_model_dir(settings: Settings, root: Path) -> Path:
    """The base every task model is fine-tuned from: MiniLM, or (``--tiny``) a tiny BERT saved under ``root``."""
    if not settings.tiny:
        return minilm_path()
    from transformers import BertConfig, BertModel

    folder = root / "tiny-base"
    if not (folder / "config.json").is_file():
        tokenizer = load_tokenizer(minilm_path())
        config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=2 * TINY_MAX_LENGTH, **TINY_BERT)
        torch.manual_seed(settings.seed)
        BertModel(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def new_classifier(base: str | Path, task: str, seed: int) -> PreTrainedModel:
    """``BertForSequenceClassification`` from ``base`` with a new head for ``task`` (initialised from ``seed``)."""
    from transformers import AutoModelForSequenceClassification

    names = label_names(task)
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
    )


def train_classifier(
    model: PreTrainedModel,
    data: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    settings: Settings,
    seed: int,
    optimizer: str = "adamw",
    rho: float | None = None,
) -> PreTrainedModel:
    """Fine-tune all weights on ``data`` (text/label) with the recipe of ``benchmarks.finetune``, through the shared
    loop :func:`hf_sta.training.finetune`: AdamW (weight decay 0.01, none on biases/LayerNorm), 10% linear warmup then
    linear decay, clipping at 1.0, shuffled batches; ``optimizer="sam"`` / ``"asam"`` makes each step sharpness-aware
    (``rho``: default 0.05 / 0.5)."""
    from hf_sta.training import FinetuneConfig, finetune, text_classification_collator

    config = FinetuneConfig(
        optimizer=optimizer,
        rho=rho,
        learning_rate=settings.lr,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        weight_decay=WEIGHT_DECAY,
        warmup_ratio=WARMUP_RATIO,
        max_grad_norm=MAX_GRAD_NORM,
        seed=seed,
    )
    rows = [{"text": text, "label": label} for text, label in zip(data["text"], data["label"])]
    collate = text_classification_collator(tokenizer, max_length=settings.max_length)
    finetune(model, rows, collate, config, show_progress=False)
    return model.eval()


def finetuned_models(
    tasks: Sequence[str], settings: Settings, root: Path, optimizer: str = "adamw", rho: float | None = None
) -> tuple[Path, dict[str, Path]]:
    """``(base, {task: fine-tuned folder})``: MiniLM fine-tunes cached by ``benchmarks.finetune`` (trained once,
    a minute or two each with AdamW, twice that with SAM / ASAM), or tiny BERT fine-tunes written under ``root``."""
    base = base_model_dir(settings, root)
    folders = {}
    for task in tasks:
        if not settings.tiny:
            folders[task] = finetune(
                task,
                seed=settings.seed,
                epochs=settings.epochs,
                lr=settings.lr,
                train_size=settings.train_size,
                optimizer=optimizer,
                rho=rho,
            )
            continue
        folder = root / "finetuned" / (task if optimizer == "adamw" else f"{task}-{optimizer}")
        tokenizer = load_tokenizer(base)
        model = new_classifier(base, task, settings.seed)
        data = load_splits(task, settings)["train"]
        train_classifier(model, data, tokenizer, settings, settings.seed, optimizer, rho)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[task] = folder
    return base, folders


def read_head(path: str | Path) -> dict[str, torch.Tensor]:
    """A task's classification head (``classifier.weight``/``bias``) from a fine-tuned folder or a head file."""
    from safetensors.torch import load_file

    path = Path(path)
    state = load_file(path / "model.safetensors" if path.is_dir() else path)
    return {key: state[key] for key in HEAD_KEYS}


@dataclass(frozen=True)
class Scores:
    """Accuracy and mean cross-entropy of a classifier on one split."""

    accuracy: float
    loss: float


@torch.inference_mode()
def score(
    logits_fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
    split: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    batch_size: int = 64,
) -> Scores:
    """Score ``logits_fn(tokenized batch)`` against the split's labels."""
    texts, labels = list(split["text"]), torch.tensor(split["label"])
    correct, loss = 0, 0.0
    for start in range(0, len(texts), batch_size):
        inputs = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        logits, target = logits_fn(inputs).float(), labels[start : start + batch_size]
        correct += int((logits.argmax(-1) == target).sum())
        loss += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
    return Scores(correct / len(texts), loss / len(texts))


def score_model(model: torch.nn.Module, split: datasets.Dataset, tokenizer: Any, max_length: int) -> Scores:
    """A full sequence classifier (``model(**inputs).logits``)."""
    model.eval()
    return score(lambda inputs: model(**inputs).logits, split, tokenizer, max_length)


def score_body(
    body: torch.nn.Module, head: Mapping[str, torch.Tensor], split: datasets.Dataset, tokenizer: Any, max_length: int
) -> Scores:
    """A shared ``BertModel`` body with one task's head: ``classifier(pooler_output)``, as
    ``BertForSequenceClassification`` computes it in eval mode."""
    body.eval()
    weight, bias = head["classifier.weight"], head["classifier.bias"]
    return score(lambda inputs: body(**inputs).pooler_output @ weight.T + bias, split, tokenizer, max_length)


@dataclass
class TaskModels:
    """The fine-tuned models of ``tasks`` with what scoring them needs: the base folder, ``{task: fine-tuned
    folder}``, each task's splits and head, and the tokenizer (:func:`finetuned_models` under ``root``)."""

    base: Path
    models: dict[str, Path]
    data: dict[str, datasets.DatasetDict]
    heads: dict[str, dict[str, torch.Tensor]]
    tokenizer: Any
    max_length: int

    @classmethod
    def build(cls, tasks: Sequence[str], settings: Settings, root: Path) -> TaskModels:
        base, models = finetuned_models(tasks, settings, root)
        return cls(
            base=base,
            models=models,
            data={task: load_splits(task, settings) for task in tasks},
            heads={task: read_head(folder) for task, folder in models.items()},
            tokenizer=load_tokenizer(base),
            max_length=settings.max_length,
        )

    def scores(self, body: torch.nn.Module, split: str = "test", tasks: Sequence[str] | None = None) -> dict:
        """``{task: Scores}`` of a shared ``BertModel`` body with each task's own head on ``split``."""
        return {
            task: score_body(body, self.heads[task], self.data[task][split], self.tokenizer, self.max_length)
            for task in (tasks or self.models)
        }


def print_table(title: str, rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
    """A markdown table: one row per model, one column per key (floats with 3 decimals)."""
    columns = list(columns or next(iter(rows.values())).keys())

    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    print(f"\n{title}\n")
    print("| model | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(cell(row.get(c, "")) for c in columns) + " |")
    print(flush=True)
