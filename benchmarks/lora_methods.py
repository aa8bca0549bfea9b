"""The issue-13 methods on the LoRA benchmark (SmolLM2-135M, one adapter per task), side by side with the others.

Task vectors are the adapters' dense updates of q/k/v/o (``2 * B @ A``), so every method works on 2-D matrices:

* data-free (``tsv``, ``iso_c``, ``iso_cts``, ``cart``, ``wudi``): validation picks between the six-task MiniLM
  suite's choice and the neutral setting (:data:`DATA_FREE`; a full grid does not fit this CPU's budget);
* ``fisher``: per-sample squared gradients (micro-batches of 1) of the answer-token loss at each task's adapted
  weights, on the calibration prompts; ``regmean``: the input Grams of every linear layer of the adapted model on
  the same prompts (padding excluded); both at the six-task suite's choice (:data:`DATA_AWARE`);
* ``adamerging`` (layer-wise): entropy of the answer words' distribution at the end of each task's *unlabelled*
  validation prompts (test-time adaptation, labels never read); ``dv_basi`` (tensor-wise): cross entropy of the
  answer words on the labelled calibration (training) prompts, its round plateau judged on validation.

Both learned objectives read only the answer words' logits at the last prompt position (``logits_to_keep`` keeps
those positions, so the vocabulary projection is not run at every token). Each row records the examples it used per
task, its learnable coefficients, its wall time relative to one task-arithmetic merge in the same process, and for
learned methods one optimisation step relative to one plain forward+backward over a batch of every task.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.harness import mean
from benchmarks.method_runs import (
    METHOD_LABELS,
    TINY_DATA_AWARE,
    TINY_DATA_FREE,
    measured,
)

LEARNED = {
    "adamerging": {"granularity": "layer", "steps": 30, "lr": 1e-2, "batch_size": 8},
    "dv_basi": {"granularity": "tensor", "steps": 15, "rounds": 3, "lr": 1e-2, "batch_size": 8},
}
TINY_LEARNED = {
    "adamerging": {"granularity": "layer", "steps": 2, "lr": 1e-2, "batch_size": 4},
    "dv_basi": {"granularity": "tensor", "steps": 2, "rounds": 2, "lr": 1e-2, "batch_size": 4},
}
DATA_FREE = {
    "tsv": [{"scaling": 0.7}, {"scaling": 1.0}],
    "iso_c": [{"scaling": 2.0}, {"scaling": 1.0}],
    "iso_cts": [{"scaling": 2.0}, {"scaling": 1.0}],
    "cart": [{"scaling": 1.0, "low_rank_coefficient": 2.0}, {"scaling": 1.0, "low_rank_coefficient": 1.0}],
    "wudi": [{"scaling": 1.0}],
}
"""Two points per method: the six-task suite's choice (every seed chose it; ``benchmarks/results/merging.json``) and
the neutral one; validation picks between them (ties go to the first). A full grid costs ~3 CPU-minutes per point."""
DATA_AWARE = {"fisher": [{"scaling": 1.0}], "regmean": [{"alpha": 0.9, "scaling": 1.0}]}
"""The six-task suite's choice, taken as is (no validation point spent)."""
LABELS = {
    **METHOD_LABELS,
    "adamerging": "AdaMerging, layer-wise (entropy, unlabelled validation prompts)",
    "dv_basi": "DV-BASI, tensor-wise (labelled calibration prompts)",
}


def answer_loader(prompts, rows, batch_size: int, labels: bool) -> torch.utils.data.DataLoader:
    """Prompts without their answer (``input_ids``, ``attention_mask``, ``last``) and, with ``labels``, the class
    index as ``label``."""

    def collate(items: list[dict]) -> dict[str, torch.Tensor]:
        batch = prompts.batch([item["text"] for item in items])
        if labels:
            batch["label"] = torch.tensor([item["label"] for item in items])
        return batch

    return torch.utils.data.DataLoader(list(rows), batch_size=batch_size, shuffle=False, collate_fn=collate)


def answer_logits(prompts) -> Callable[[Any, dict], torch.Tensor]:
    """``fn(model_fn, batch) -> [B, C]``: the answer words' logits at each prompt's last position."""
    answers = torch.tensor(prompts.answers)

    def predict(model_fn, batch: dict) -> torch.Tensor:
        last = batch["last"]
        keep = torch.unique(last)  # sorted positions; each row reads its own
        out = model_fn(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
        rows = torch.arange(len(last))
        return out.logits[rows, torch.searchsorted(keep, last)][:, answers].float()

    return predict


def answer_loss(prompts) -> Callable[[Any, dict], torch.Tensor]:
    """``fn(model_fn, batch) -> scalar``: cross entropy of the answer words' logits against ``batch["label"]``."""
    predict = answer_logits(prompts)
    return lambda model_fn, batch: torch.nn.functional.cross_entropy(predict(model_fn, batch), batch["label"])


def _tuned(merger, method: str, grid: list[dict], validation_score: Callable, score_test: Callable, **row) -> dict:
    trials = []
    for config in grid:
        trials.append({"config": config, "validation": validation_score(merger.merge(method=method, **config))})
    best = max(trials, key=lambda trial: trial["validation"])
    timing: dict = {}
    with measured(timing):
        body = merger.merge(method=method, **best["config"])
    return {**row, **timing, "config": best["config"], "trials": trials, "test": score_test(body)}


def plain_step_seconds(load_base: Callable, loaders: dict, repeats: int = 3) -> float:
    """One forward + backward of the base model on one batch of every task (the unit of a learned step)."""
    model = load_base()
    batches = [next(iter(loader)) for loader in loaders.values()]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.logsumexp(
                -1
            ).mean().backward()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def run_new_methods(bench: dict, tiny: bool) -> dict[str, dict]:
    """Every issue-13 method on the LoRA suite. ``bench``: ``merger``, ``tasks``, ``data``, ``prompts``,
    ``evaluate(model, split)``, ``load_base()``, ``calibration(task)`` (the answer-token loader of the importance),
    ``calibration_samples``."""
    merger, tasks = bench["merger"], bench["tasks"]
    validation_score = lambda model: mean(bench["evaluate"](model, "validation").values())  # noqa: E731
    score_test = lambda model: bench["evaluate"](model, "test")  # noqa: E731
    rows: dict[str, dict] = {}
    timing: dict = {}
    with measured(timing):
        merger.merge(method="task_arithmetic", scaling=0.5)
    unit_merge = timing["seconds"]
    for method, grid in (TINY_DATA_FREE if tiny else DATA_FREE).items():
        rows[method] = _tuned(merger, method, grid, validation_score, score_test, examples_per_task=0, learnable=0)
    samples = bench["calibration_samples"]
    for method, grid in (TINY_DATA_AWARE if tiny else DATA_AWARE).items():
        measure: dict = {}
        with measured(measure):
            for task in tasks:
                if method == "fisher":
                    merger.compute_importance(task, bench["calibration"](task, 1), metric="fisher",
                                              micro_batch_size=1, num_samples=samples, show_progress=False)  # fmt: skip
                else:
                    merger.compute_activation_statistics(
                        task, bench["calibration"](task, 4), num_samples=samples, show_progress=False
                    )
        row = _tuned(merger, method, grid, validation_score, score_test, examples_per_task=samples, learnable=0)
        rows[method] = {**row, "measure_seconds": measure["seconds"], "measure_peak_rss_mb": measure["peak_rss_mb"]}
    rows.update(_learned(bench, tiny, score_test))
    for row in rows.values():
        row["seconds_over_task_arithmetic"] = row["seconds"] / unit_merge
    return rows


def _learned(bench: dict, tiny: bool, score_test: Callable) -> dict[str, dict]:
    merger, tasks, data, prompts = bench["merger"], bench["tasks"], bench["data"], bench["prompts"]
    samples = bench["calibration_samples"]
    rows: dict[str, dict] = {}
    for method, params in (TINY_LEARNED if tiny else LEARNED).items():
        size = params["batch_size"]
        if method == "adamerging":
            loaders = {t: answer_loader(prompts[t], data[t]["validation"], size, labels=False) for t in tasks}
            objective: dict = {"predict_fn": {t: answer_logits(prompts[t]) for t in tasks}}
        else:
            train = {t: data[t]["train"].select(range(samples)) for t in tasks}
            loaders = {t: answer_loader(prompts[t], train[t], size, labels=True) for t in tasks}
            validation = {t: answer_loader(prompts[t], data[t]["validation"], size, labels=True) for t in tasks}
            objective = {"loss_fn": {t: answer_loss(prompts[t]) for t in tasks}, "validation_data": validation}
        unit = plain_step_seconds(bench["load_base"], loaders)
        row: dict = {"config": params}
        with measured(row):
            body = merger.merge(method=method, data=loaders, model=bench["load_base"](), seed=0, **objective, **params)
        record = merger.last_record
        steps = params["steps"] * record.get("rounds_run", 1)
        row.update(
            test=score_test(body),
            learnable=record["num_learnable"],
            examples_per_task=mean(record["examples_used"].values()),
            seconds_per_step_over_plain=row["seconds"] / max(steps, 1) / unit,
            record={k: v for k, v in record.items() if k != "coefficients"},
        )
        rows[method] = row
    return rows
