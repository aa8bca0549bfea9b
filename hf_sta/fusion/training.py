"""Training a fused model on its tasks' data: multi-task sampling, a plain PyTorch loop, per-task evaluation.

Each step draws one task ``t`` with probability

    p_t = n_t^(1/T) / sum_u n_u^(1/T)

(``proportional``: ``T = 1``; ``uniform``: ``T -> inf``; ``temperature``: the given ``T``), then a batch of that task's
examples (each task's examples are visited in shuffled epochs), and minimises the cross-entropy of the task's logits.
Only parameters with ``requires_grad`` train (the fusion module and heads, plus injected LoRA layers).

The sources are frozen and run in eval mode, so their outputs for a text never change: with ``cache_features=True``
(default, and only when no source parameter trains) every text runs through the sources once and the steps reuse the
cached :class:`~hf_sta.fusion.sources.SourceOutput`, which makes a step cost the fusion module only. The loop runs
through ``accelerate`` (CPU, one GPU, or several processes with ``accelerate launch``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from .model import FusedMultiTaskModel
from .sources import SourceOutput

logger = logging.getLogger(__name__)

Sampling = Literal["proportional", "uniform", "temperature"]

__all__ = [
    "FusionTrainingArguments",
    "FusionTrainingResult",
    "MultiTaskSampler",
    "encode_dataset",
    "evaluate_fusion",
    "train_fusion",
]


@dataclass
class FusionTrainingArguments:
    """Settings of :func:`train_fusion` (names follow ``transformers.TrainingArguments``)."""

    max_steps: int = 300
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    sampling: Sampling = "temperature"
    temperature: float = 2.0
    eval_steps: int | None = None
    """Evaluate on ``eval_data`` every ``eval_steps`` (and before the first step); ``None``: only at the end."""
    load_best_model_at_end: bool = True
    """Keep the trainable weights with the best mean ``eval_data`` accuracy (step 0 included)."""
    cache_features: bool = True
    seed: int = 0
    text_column: str = "text"
    label_column: str = "label"
    disable_tqdm: bool = False

    def __post_init__(self) -> None:
        if self.sampling not in ("proportional", "uniform", "temperature"):
            raise ConfigError(f"sampling={self.sampling!r}; expected proportional, uniform or temperature.")
        if self.max_steps < 1 or self.per_device_train_batch_size < 1 or self.temperature <= 0:
            raise ConfigError("max_steps and per_device_train_batch_size must be >= 1 and temperature > 0.")


@dataclass
class FusionTrainingResult:
    steps: int
    train_seconds: float
    encode_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None


class MultiTaskSampler:
    """An endless stream of ``(task, example indices)`` batches, tasks drawn with ``p_t ∝ n_t^(1/T)``."""

    def __init__(
        self,
        sizes: Mapping[str, int],
        *,
        batch_size: int,
        sampling: Sampling = "temperature",
        temperature: float = 2.0,
        seed: int = 0,
    ) -> None:
        if not sizes or any(n < 1 for n in sizes.values()):
            raise ConfigError(f"Every task needs at least one training example; got sizes {dict(sizes)}.")
        self.sizes, self.batch_size = dict(sizes), batch_size
        power = {"proportional": 1.0, "uniform": 0.0, "temperature": 1.0 / temperature}[sampling]
        weights = torch.tensor([n**power for n in self.sizes.values()], dtype=torch.float64)
        self.probabilities = dict(zip(self.sizes, (weights / weights.sum()).tolist()))
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[str, list[int]]]:
        tasks = list(self.sizes)
        weights = torch.tensor([self.probabilities[t] for t in tasks])
        orders = {t: [] for t in tasks}
        while True:
            task = tasks[int(torch.multinomial(weights, 1, generator=self.generator))]
            batch: list[int] = []
            while len(batch) < min(self.batch_size, self.sizes[task]):
                if not orders[task]:
                    orders[task] = torch.randperm(self.sizes[task], generator=self.generator).tolist()
                batch.append(orders[task].pop())
            yield task, batch


def _columns(data: Any, args: FusionTrainingArguments, task: str) -> tuple[list[str], torch.Tensor]:
    try:
        texts, labels = list(data[args.text_column]), torch.as_tensor(list(data[args.label_column]))
    except (KeyError, TypeError, IndexError) as err:
        raise ConfigError(
            f"Data of task {task!r} needs columns {args.text_column!r} and {args.label_column!r}: {err}"
        ) from err
    if len(texts) != len(labels):
        raise ConfigError(f"Task {task!r}: {len(texts)} texts but {len(labels)} labels.")
    return texts, labels


@torch.inference_mode()
def encode_dataset(
    model: FusedMultiTaskModel, texts: Sequence[str], batch_size: int = 64, disable_tqdm: bool = True
) -> dict[str, SourceOutput]:
    """Every source's outputs for ``texts`` (sorted by length into batches, returned in the original order)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks = []
    for start in tqdm(range(0, len(order), batch_size), desc="encoding", disable=disable_tqdm, leave=False):
        outputs = model.encode([texts[i] for i in order[start : start + batch_size]])
        chunks.append({name: _detach(out) for name, out in outputs.items()})
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return {name: SourceOutput.cat([c[name] for c in chunks]).select(inverse) for name in model.sources}


def _detach(output: SourceOutput) -> SourceOutput:
    logits = None if output.logits is None else output.logits.detach().float().cpu()
    return SourceOutput(
        [c.detach().float().cpu() for c in output.components], output.features.detach().float().cpu(), logits
    )


@torch.no_grad()
def evaluate_fusion(
    model: FusedMultiTaskModel,
    data: Mapping[str, Any],
    args: FusionTrainingArguments | None = None,
    features: Mapping[str, Mapping[str, SourceOutput]] | None = None,
) -> dict[str, float]:
    """Accuracy per task on ``data`` (``{task: rows with text/label columns}``); ``features`` reuses cached
    :func:`encode_dataset` outputs per task."""
    args = args or FusionTrainingArguments()
    was_training = model.training
    model.eval()
    scores = {}
    for task, rows in data.items():
        texts, labels = _columns(rows, args, task)
        cached = features.get(task) if features else None
        cached = cached if cached is not None else encode_dataset(model, texts, args.per_device_eval_batch_size)
        correct = 0
        for start in range(0, len(texts), args.per_device_eval_batch_size):
            index = slice(start, start + args.per_device_eval_batch_size)
            logits = model(task=task, features={n: o.select(index) for n, o in cached.items()}).logits
            correct += int((logits.argmax(-1).cpu() == labels[index]).sum())
        scores[task] = correct / max(len(texts), 1)
    model.train(was_training)
    return scores


def _optimizer(model: FusedMultiTaskModel, args: FusionTrainingArguments):
    from transformers import get_linear_schedule_with_warmup

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.dim() < 2 or "norm" in name.lower() else decay).append(param)
    if not decay and not no_decay:
        raise ConfigError("The model has no trainable parameters.")
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate)
    schedule = get_linear_schedule_with_warmup(
        optimizer, math.ceil(args.warmup_ratio * args.max_steps), args.max_steps
    )
    return optimizer, schedule


def _trainable_state(model: FusedMultiTaskModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _default_accelerator():
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # a step trains one task: the other tasks' heads get no gradient, which DDP must be told about
    return Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


class _Evaluator:
    """Evaluates on ``eval_data`` (every process computes the same scores), records the history and keeps the
    trainable weights with the best mean accuracy."""

    def __init__(self, model: FusedMultiTaskModel, eval_data, args: FusionTrainingArguments, features) -> None:
        self.model, self.data, self.args, self.features = model, eval_data, args, features
        self.history: list[dict[str, Any]] = []
        self.best: tuple[float, int | None, dict[str, torch.Tensor] | None] = (-1.0, None, None)

    def __call__(self, step: int, loss: float | None) -> None:
        scores = evaluate_fusion(self.model, self.data, self.args, self.features)
        self.history.append({"step": step, "loss": loss, "eval": scores})
        mean = sum(scores.values()) / len(scores)
        logger.info("step %d: eval %s (mean %.4f)", step, scores, mean)
        if mean > self.best[0]:
            self.best = (mean, step, _trainable_state(self.model))

    def restore_best(self) -> int | None:
        """Copy the best weights back into the model; returns their step."""
        _, step, state = self.best
        if state is not None:
            with torch.no_grad():
                for name, param in self.model.named_parameters():
                    if name in state:
                        param.copy_(state[name])
        return step


def _encode_splits(model, columns, eval_data, args, train_features, eval_features):
    """The frozen sources' outputs for every training and evaluation text (skipped for those given)."""

    def encode(texts):
        return encode_dataset(model, texts, args.per_device_eval_batch_size, args.disable_tqdm)

    if train_features is None:
        train_features = {task: encode(texts) for task, (texts, _) in columns.items()}
    if eval_data and eval_features is None:
        eval_features = {t: encode(_columns(rows, args, t)[0]) for t, rows in eval_data.items()}
    return train_features, eval_features


def _batches(columns, args: FusionTrainingArguments, seed: int, features) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(task, {"labels", "features" or "texts"})`` forever, tasks drawn by :class:`MultiTaskSampler`."""
    sizes = {task: len(texts) for task, (texts, _) in columns.items()}
    sampler = MultiTaskSampler(
        sizes,
        batch_size=args.per_device_train_batch_size,
        sampling=args.sampling,
        temperature=args.temperature,
        seed=seed,
    )
    for task, rows in sampler:
        texts, labels = columns[task]
        index = torch.tensor(rows)
        if features is not None:
            yield task, {"labels": labels[index], "features": {n: o.select(index) for n, o in features[task].items()}}
        else:
            yield task, {"labels": labels[index], "texts": [texts[i] for i in rows]}


def _train_step(prepared, accelerator, optimization, trainable, args: FusionTrainingArguments, **batch) -> float:
    """One optimisation step on one task's batch; returns its loss."""
    optimizer, schedule = optimization
    out = prepared(**batch)
    accelerator.backward(out.loss)
    accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return out.loss.item()


def train_fusion(
    model: FusedMultiTaskModel,
    train_data: Mapping[str, Any],
    args: FusionTrainingArguments | None = None,
    eval_data: Mapping[str, Any] | None = None,
    *,
    train_features: Mapping[str, Mapping[str, SourceOutput]] | None = None,
    eval_features: Mapping[str, Mapping[str, SourceOutput]] | None = None,
    accelerator: Any = None,
) -> FusionTrainingResult:
    """Train ``model``'s trainable parameters on ``{task: rows}`` (``datasets.Dataset`` or dict of columns).

    The loop runs through ``accelerate`` (``accelerator``, default ``Accelerator()`` with
    ``find_unused_parameters=True``): the same code trains on CPU, one GPU or several processes (``accelerate
    launch``; each process draws its own tasks and batches, gradients are averaged). Returns the step count, wall
    times (feature encoding apart from the steps) and the evaluation history (``{"step", "loss", "eval": {task:
    accuracy}}``); with ``load_best_model_at_end`` the best evaluated weights are restored. ``train_features`` /
    ``eval_features`` (``{task: encode_dataset(...)}``, e.g. cached on disk) skip the encoding.
    """
    args = args or FusionTrainingArguments()
    unknown = sorted(set(train_data) - set(model.tasks)) + sorted(set(eval_data or {}) - set(model.tasks))
    if unknown:
        raise ConfigError(f"Data given for task(s) {unknown}, which the model does not have ({model.tasks}).")
    columns = {task: _columns(rows, args, task) for task, rows in train_data.items()}
    accelerator = accelerator or _default_accelerator()
    model.to(accelerator.device)
    cache = args.cache_features and not any(p.requires_grad for p in model.sources.parameters())
    started = time.perf_counter()
    if cache:
        train_features, eval_features = _encode_splits(model, columns, eval_data, args, train_features, eval_features)
    result = FusionTrainingResult(steps=0, train_seconds=0.0, encode_seconds=time.perf_counter() - started)
    evaluate = _Evaluator(model, eval_data, args, eval_features if cache else None)
    optimizer, schedule = _optimizer(model, args)
    # the schedule is stepped here, once per step: prepared, accelerate would step it once per process
    prepared, optimizer = accelerator.prepare(model, optimizer)
    # each process draws its own tasks and batches
    sampler = _batches(columns, args, args.seed + accelerator.process_index, train_features if cache else None)
    started = time.perf_counter()
    if eval_data and args.eval_steps:
        evaluate(0, None)
    prepared.train()
    torch.manual_seed(args.seed)
    disable = args.disable_tqdm or not accelerator.is_local_main_process
    progress = tqdm(range(1, args.max_steps + 1), desc="fusion training", disable=disable)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for step in progress:
        task, batch = next(sampler)
        loss = _train_step(prepared, accelerator, (optimizer, schedule), trainable, args, task=task, **batch)
        progress.set_postfix(task=task, loss=f"{loss:.3f}")
        if eval_data and args.eval_steps and step % args.eval_steps == 0 and step != args.max_steps:
            evaluate(step, loss)
            prepared.train()
    if eval_data:
        evaluate(args.max_steps, loss)
        if args.load_best_model_at_end:
            result.best_step = evaluate.restore_best()
    model.eval()
    result.steps, result.history = args.max_steps, evaluate.history
    result.train_seconds = time.perf_counter() - started
    return result
