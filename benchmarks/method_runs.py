"""The merge methods of issue 13 run side by side on one suite: data-free spectral ones, data-aware ones (Fisher,
RegMean) and learned coefficients (AdaMerging, DV-BASI, STA + AdaMerging), with what each costs.

Every hyper-parameter is chosen on the validation split (grids below); learned coefficients are learned on
validation inputs without labels (AdaMerging: entropy, test-time adaptation on held-out inputs, never test) or on
a few labelled training examples (DV-BASI: cross entropy; its round plateau is judged on validation). For each
method the row records the examples it used per task, its learnable parameters, its wall time relative to one
task-arithmetic merge measured in the same run, and the peak resident memory above the process's level before it
(sampled every 20 ms). Absolute CPU times are not reported (the README quotes ratios only).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

import psutil
import torch

from benchmarks.harness import TaskSuite, mean

DATA_FREE_GRIDS = {
    "tsv": [{"scaling": s} for s in (0.7, 1.0, 1.3)],
    "iso_c": [{"scaling": s} for s in (1.0, 1.3, 1.6, 2.0)],
    "iso_cts": [{"scaling": s} for s in (1.0, 1.3, 1.6, 2.0)],
    "cart": [{"scaling": 1.0, "low_rank_coefficient": c} for c in (1.0, 2.0)],
    "wudi": [{"scaling": 1.0}],
}
DATA_AWARE_GRIDS = {
    "fisher": [{"scaling": s} for s in (1.0, 2.0)],
    "regmean": [{"alpha": a, "scaling": s} for a in (0.5, 0.9) for s in (1.0, 1.3)],
}
LEARNED = {
    "adamerging": {"granularity": "layer", "steps": 60, "lr": 1e-2, "batch_size": 16},
    "sta_adamerging": {"granularity": "layer", "steps": 60, "lr": 1e-2, "batch_size": 16, "selection": "sta"},
    "dv_basi": {"granularity": "tensor", "steps": 30, "rounds": 3, "lr": 1e-2, "batch_size": 16, "num_samples": 64},
}


TINY_DATA_FREE = {"tsv": [{"scaling": 1.0}], "iso_cts": [{"scaling": 1.0}]}
"""The grids of the other benchmarks' ``--tiny`` runs (one point each: they test the pipeline, not the method)."""
TINY_DATA_AWARE = {"fisher": [{"scaling": 1.0}], "regmean": [{"alpha": 0.9, "scaling": 1.0}]}
METHOD_LABELS = {
    "tsv": "TSV-M (tuned)",
    "iso_c": "Iso-C (tuned)",
    "iso_cts": "Iso-CTS (tuned)",
    "cart": "CART (tuned)",
    "wudi": "WUDI",
    "fisher": "Fisher (tuned)",
    "regmean": "RegMean (tuned)",
}
"""Table labels of the issue-13 methods with a grid (the learned ones are labelled per benchmark: their data differ)."""


@contextmanager
def measured(row: dict):
    """Record ``seconds`` and ``peak_rss_mb`` (peak resident memory above the level at entry) into ``row``."""
    process = psutil.Process()
    start_rss = process.memory_info().rss
    peak = [start_rss]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], process.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.perf_counter()
    try:
        yield
    finally:
        row["seconds"] = time.perf_counter() - started
        done.set()
        thread.join()
        row["peak_rss_mb"] = (max(peak[0], process.memory_info().rss) - start_rss) / 2**20


def tokenized(suite: TaskSuite, task: str, split: str, limit: int | None = None, labels: bool = True):
    """``split`` of ``task`` tokenized as the fine-tune was (max length 128), optionally without labels."""
    from transformers import AutoTokenizer

    from benchmarks.finetune import read_finetune_info

    rows = suite.data[task][split]
    rows = rows.select(range(min(limit, len(rows)))) if limit else rows
    tokenizer = AutoTokenizer.from_pretrained(suite.model_dirs[task])
    max_length = read_finetune_info(suite.model_dirs[task])["max_length"]
    encoded = rows.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length), batched=True)
    keep = ["input_ids", "attention_mask", "token_type_ids"] + (["label"] if labels else [])
    return encoded.remove_columns([c for c in encoded.column_names if c not in keep])


def tune(suite: TaskSuite, merge: Callable[..., torch.nn.Module], grid: list[dict]) -> tuple[dict, list[dict]]:
    trials = []
    for config in grid:
        trials.append({"config": config, "validation": mean(suite.evaluate(merge(**config), "validation").values())})
    best = max(trials, key=lambda trial: trial["validation"])
    return best["config"], trials


def plain_step_seconds(suite: TaskSuite, merger, batch_size: int = 16, repeats: int = 3) -> float:
    """One forward + backward of the fine-tuned model on a batch of every task (the unit of a learned step)."""
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

    model = AutoModelForSequenceClassification.from_pretrained(suite.model_dirs[suite.tasks[0]])
    collate = DataCollatorWithPadding(suite_tokenizer(suite))
    batches = [collate(list(tokenized(suite, t, "validation", batch_size))) for t in suite.tasks]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for batch in batches:
            batch = {k: v for k, v in batch.items() if k != "labels"}
            model(**batch).logits.logsumexp(-1).mean().backward()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def suite_tokenizer(suite: TaskSuite):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(suite.model_dirs[suite.tasks[0]])


def tuned_row(suite: TaskSuite, merger, method: str, grid: list[dict], **row) -> dict:
    """Tune on validation, then time one merge at the chosen config (the method's cost) and score it on test."""
    config, trials = tune(suite, lambda **c: merger.merge(method=method, **c), grid)
    timing: dict = {}
    with measured(timing):
        body = merger.merge(method=method, **config)
    return {**row, **timing, "config": config, "trials": trials, "test": suite.evaluate(body, "test")}


def run_data_free(suite: TaskSuite, merger, rows: dict, grids: dict = DATA_FREE_GRIDS) -> None:
    for method, grid in grids.items():
        if f"{method}_tuned" in rows:
            continue
        rows[f"{method}_tuned"] = tuned_row(suite, merger, method, grid, examples_per_task=0, learnable=0)


def run_data_aware(suite: TaskSuite, merger, rows: dict, calibration: int, grids: dict = DATA_AWARE_GRIDS) -> None:
    """Fisher (per-sample squared gradients on ``calibration`` training examples) and RegMean (activation Grams)."""
    for method, grid in grids.items():
        if f"{method}_tuned" in rows:
            continue
        measure: dict = {}
        with measured(measure):
            for task in suite.tasks:
                data = suite.calibration(task, calibration)
                if method == "fisher":
                    merger.compute_importance(task, data, metric="fisher", micro_batch_size=1,
                                              num_samples=calibration, show_progress=False)  # fmt: skip
                else:
                    merger.compute_activation_statistics(task, data, num_samples=calibration, show_progress=False)
        row = tuned_row(suite, merger, method, grid, examples_per_task=calibration, learnable=0)
        row.update(measure_seconds=measure["seconds"], measure_peak_rss_mb=measure["peak_rss_mb"])
        rows[f"{method}_tuned"] = row


def run_learned(suite: TaskSuite, merger, rows: dict, seed: int, settings: dict = LEARNED) -> None:
    """AdaMerging (entropy on unlabelled validation inputs), STA + AdaMerging, DV-BASI (few labelled train examples,
    plateau on validation). The merger must hold STA (taylor) importance for the composition."""
    unlabelled = {t: tokenized(suite, t, "validation", labels=False) for t in suite.tasks}
    validation = {t: tokenized(suite, t, "validation") for t in suite.tasks}
    train = {t: tokenized(suite, t, "train") for t in suite.tasks}
    unit = plain_step_seconds(suite, merger)
    for name, params in settings.items():
        if name in rows:
            continue
        method = "adamerging" if name.endswith("adamerging") else name
        params = dict(params)
        row: dict = {"config": params}
        with measured(row):
            if method == "adamerging":
                body = merger.merge(method=method, data=unlabelled, seed=seed, **params)
            else:
                body = merger.merge(method=method, data=train, validation_data=validation, seed=seed, **params)
        record = merger.last_record
        steps = params["steps"] * (record.get("rounds_run", 1))
        row.update(
            test=suite.evaluate(body, "test"),
            learnable=record["num_learnable"],
            examples_per_task=mean(record["examples_used"].values()),
            seconds_per_step_over_plain=row["seconds"] / max(steps, 1) / unit,
            record={k: v for k, v in record.items() if k != "coefficients"},
        )
        rows[name] = row
