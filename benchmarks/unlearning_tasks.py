"""Forget each task of the six-task MiniLM STA merge in turn (``python -m benchmarks.bench_unlearning --part tasks``).

Per forgotten task ``f`` (the other tasks are the controls), every method edits the same merged body:

- ``sta`` / ``negation`` forgetting (``merger.forget``: subtract the top-20% / all of ``tau_f``), the scaling chosen on
  validation by each rule of ``hf_sta.unlearning.rules``: ``largest_drop`` over the grid 1 / 2 / 3 with controls
  >= 95% (the previous protocol), and ``closest_to_chance`` by bisection on [0, 4] with controls >= 98%;
- ``fused``: ``merger.unlearn`` on the merged body (LoRA r=16 / alpha 32 on the ``auto`` layers; retain = the other
  tasks' training rows through their own heads, less any row that is also a forget row; ``forget_loss="prior"``;
  early stop once ``f``'s validation accuracy is within ``goal_margin`` of its validation chance, from above or below:
  ``eval_fn = |accuracy - chance|``);
- ``remerge``: the STA merge of the other tasks only (what the model would be had it never learned ``f``).

Reported on test: ``f``'s accuracy against chance (majority class), control retention (mean test accuracy of the
others over the unedited merge's), the loss-threshold membership attack (``f``'s first training rows against its
first test rows, through ``f``'s head), wall time, and for ``fused`` trainable parameters and reversibility (logits of
the disabled adapter equal to the merged body's, bit for bit).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import STA_MERGE, SavedRows
from benchmarks.unlearning_scoring import Scorer, body_forward, head_loss, head_predict, majority_rate
from hf_sta import STAMerger
from hf_sta.forgetting import pick_scaling
from hf_sta.unlearning import Bisection

logger = logging.getLogger(__name__)

RULES = {
    "largest_drop": (1.0, 2.0, 3.0),
    "closest_to_chance": Bisection(low=0.0, high=4.0, steps=6, tolerance=0.01),
}
MIN_CONTROL = {"largest_drop": 0.95, "closest_to_chance": 0.98}


@dataclass
class TaskWorkload:
    """The merged model, its merger and data, and how to score a body."""

    tasks: list[str]
    merger: STAMerger
    merged_dir: Path
    data: dict[str, Any]
    heads: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scorer: Scorer
    protocol: dict[str, Any]
    cache: Path | None
    mia_examples: int

    def __post_init__(self) -> None:
        for task in self.tasks:
            splits = self.data[task]
            self.scorer.add(f"{task}/validation", splits["validation"])
            self.scorer.add(f"{task}/test", splits["test"])
            members = splits["train"].select(range(min(self.mia_examples, len(splits["train"]))))
            self.scorer.add(f"{task}/members", members)
            self.scorer.add(f"{task}/nonmembers", splits["test"].select(range(len(members))))

    def evaluate(self, body, split: str, tasks: list[str] | None = None) -> dict[str, float]:
        return {
            t: self.scorer.accuracy(body, f"{t}/{split}", body_forward(self.heads[t])) for t in tasks or self.tasks
        }

    def chance(self, task: str, split: str) -> float:
        return majority_rate(self.data[task][split]["label"])

    def body(self):
        from transformers import BertModel

        return BertModel.from_pretrained(self.merged_dir)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def real_workload(calibration: int = 128, mia_examples: int = 200) -> TaskWorkload:
    """The six tasks of seed 0 (``benchmarks.harness.TaskSuite``) and their STA merge (defaults), cached."""
    from transformers import AutoTokenizer

    from benchmarks.harness import TaskSuite
    from benchmarks.tasks import TASKS, cache_root

    suite = TaskSuite(list(TASKS), seed=0).prepare()
    merger = suite.merger()
    for task in TASKS:
        suite.importance(merger, task, calibration)
    models = {task: path.name for task, path in suite.model_dirs.items()}
    merged_dir = cache_root() / "unlearning" / f"sta-seed0-{_digest(models)}"
    if not (merged_dir / "config.json").is_file():
        merger.merge(method="sta", output_dir=merged_dir, overwrite=True, **STA_MERGE)
    tokenizer = AutoTokenizer.from_pretrained(suite.model_dirs[TASKS[0]])
    protocol = {"models": models, "calibration_samples": calibration, "scoring": "bf16 autocast"}
    cache = Path(__file__).parent / "results" / "unlearning" / "tasks"
    scorer = Scorer(tokenizer, 128)
    return TaskWorkload(
        list(TASKS), merger, merged_dir, suite.data, suite.heads, scorer, protocol, cache, mia_examples
    )


def tiny_workload(work: Path, tasks: list[str]) -> TaskWorkload:
    """Tiny BERT fine-tunes (``examples._common``) of ``tasks`` and their STA merge; nothing cached."""
    from examples._common import Settings, finetuned_models, load_splits, load_tokenizer, read_head

    settings = Settings(tiny=True, train_size=32, epochs=2, lr=3e-3, eval_size=32, seed=0, batch_size=8, max_length=32)
    base, models = finetuned_models(tasks, settings, work)
    data = {task: load_splits(task, settings) for task in tasks}
    merger = STAMerger.from_pretrained(base, models)
    for task in tasks:
        merger.compute_importance(task, data[task]["train"], num_samples=16, max_length=32, show_progress=False)
    merged_dir = merger.merge(method="sta", output_dir=work / "merged", overwrite=True)
    heads = {task: tuple(read_head(folder).values()) for task, folder in models.items()}
    return TaskWorkload(tasks, merger, merged_dir, data, heads, Scorer(load_tokenizer(base), 32, bf16=False),
                        {"models": "tiny"}, None, 16)  # fmt: skip


def _row(work: TaskWorkload, task: str, body, before: dict[str, float], seconds: float, **extra) -> dict[str, Any]:
    others = [t for t in work.tasks if t != task]
    test = work.evaluate(body, "test")
    chance = work.chance(task, "test")
    retention = sum(test[t] for t in others) / sum(before[t] for t in others)
    row = {"target": test[task], "chance": chance, "gap": test[task] - chance, "control_retention": retention,
           "test": test, "seconds": seconds, **extra}  # fmt: skip
    row.update(work.scorer.membership(body, f"{task}/members", f"{task}/nonmembers", body_forward(work.heads[task])))
    row["meets_target"] = abs(row["gap"]) <= 0.05 and retention >= 0.98
    return row


def edit_rows(work: TaskWorkload, task: str, before: dict[str, float], rows: dict[str, dict]) -> None:
    """STA and negation forgetting, the scaling chosen on validation by each rule (one evaluation per scaling); adds
    the rows a method lacks to ``rows``."""
    others = [t for t in work.tasks if t != task]
    chance = work.chance(task, "validation")
    seen: dict[tuple, dict] = {}
    for method in ("sta", "negation"):
        if all(f"{method} / {rule}" in rows for rule in RULES):
            continue

        def scores(scaling: float, method: str = method) -> dict[str, float]:
            key = ("unedited", 0.0) if scaling == 0 else (method, scaling)
            if key not in seen:
                body = work.merger.forget(task, scaling=scaling, method=method, target=work.merged_dir)
                seen[key] = work.evaluate(body, "validation")
            return seen[key]

        def control(s: float) -> float:
            return sum(scores(s)[t] for t in others) / len(others)

        for rule, scalings in RULES.items():
            started, evaluated = time.perf_counter(), len(seen)
            curve = pick_scaling(task, method, lambda s: s, lambda s: scores(s)[task], control, scalings,
                                 MIN_CONTROL[rule], rule=rule, chance=chance)  # fmt: skip
            scaling = curve.best_scaling
            body = work.merger.forget(task, scaling=scaling or 0.0, method=method, target=work.merged_dir)
            curve_record = {"baseline": curve.baseline, "points": curve.points, "validation_chance": chance}
            rows[f"{method} / {rule}"] = _row(
                work, task, body, before, time.perf_counter() - started, scaling=scaling,
                new_evaluations=len(seen) - evaluated, curve=curve_record,
            )  # fmt: skip
            logger.info("%s: %s / %s -> x%s, %s", task, method, rule, scaling, rows[f"{method} / {rule}"]["target"])


def _disjoint(rows, forget_rows, scorer: Scorer):
    """``rows`` without the examples whose tokens are also a forget example's (movie_sentiment and subjectivity share
    19 training reviews): a row cannot be both forgotten and retained."""

    def keys(texts):
        ids = scorer.tokenizer(list(texts), truncation=True, max_length=scorer.max_length)["input_ids"]
        return [tuple(x) for x in ids]

    forget = set(keys(forget_rows["text"]))
    keep = [i for i, key in enumerate(keys(rows["text"])) if key not in forget]
    return rows if len(keep) == len(rows) else rows.select(keep)


def fused_row(work: TaskWorkload, task: str, before: dict[str, float], settings: dict[str, Any]) -> dict:
    """``merger.unlearn`` on the merged body, retain = the other tasks' training rows through their heads."""
    others = [t for t in work.tasks if t != task]
    chance = work.chance(task, "validation")
    merged = work.body()
    probe = work.scorer.first_batch(f"{task}/test")
    with torch.inference_mode():
        reference = merged(**probe).pooler_output
    forget_rows = work.data[task]["train"]
    started = time.perf_counter()
    model = work.merger.unlearn(
        merged, {task: forget_rows}, {t: _disjoint(work.data[t]["train"], forget_rows, work.scorer) for t in others},
        loss_fn={t: head_loss(work.heads[t]) for t in work.tasks},
        predict_fn={t: head_predict(work.heads[t]) for t in work.tasks},
        eval_fn=lambda body: abs(work.evaluate(body, "validation", [task])[task] - chance),
        goal=settings.pop("goal_margin"), tokenizer=work.scorer.tokenizer,
        max_length=work.scorer.max_length, show_progress=False, **settings,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    record = work.merger.last_unlearning
    with torch.inference_mode(), model.disable_adapter():
        reversible = bool(torch.equal(model(**probe).pooler_output, reference))
    keep = ("layers", "sensitivity", "trainable_parameters", "target_parameters", "examples_touched", "steps",
            "goal_reached", "history")  # fmt: skip
    return _row(work, task, model, before, seconds, reversible=reversible, **{k: record[k] for k in keep})


def remerge_row(work: TaskWorkload, task: str, before: dict[str, float]) -> dict:
    started = time.perf_counter()
    body = work.merger.merge(method="sta", tasks=[t for t in work.tasks if t != task], **STA_MERGE)
    return _row(work, task, body, before, time.perf_counter() - started)


def forget_task(work: TaskWorkload, task: str, fused: dict[str, Any]) -> dict[str, Any]:
    """Every method on ``task``; reused from ``work.cache/<task>.json`` when the protocol is unchanged (and resumed
    from ``<task>.partial.json`` after an interruption)."""
    protocol = {**work.protocol, "rules": {k: str(v) for k, v in RULES.items()}, "fused": fused, "task": task}
    path = work.cache / f"{task}.json" if work.cache else None
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        if saved["protocol"] == json.loads(json.dumps(protocol, default=str)):
            logger.info("reusing %s", path)
            return saved
    rows = SavedRows(path.with_suffix(".partial.json") if path else None, protocol)
    body = work.body()
    before = work.evaluate(body, "test")
    if "unedited merge" not in rows:
        rows["unedited merge"] = _row(work, task, body, before, 0.0)
    edit_rows(work, task, before, rows)
    if "fused" not in rows:
        rows["fused"] = fused_row(work, task, before, dict(fused))
    if "remerge without task" not in rows:
        rows["remerge without task"] = remerge_row(work, task, before)
    order = ["unedited merge", *(f"{m} / {r}" for m in ("sta", "negation") for r in RULES), "fused",
             "remerge without task"]  # fmt: skip
    result = {"protocol": protocol, "task": task, "rows": {name: rows[name] for name in order}}
    if path is not None:
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        rows.path.unlink()
    return result


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method: how many tasks meet the target; per task: the best method (meets the target, nearest chance)."""
    methods = [m for m in results[0]["rows"] if m != "unedited merge"]
    per_method = {m: sum(r["rows"][m]["meets_target"] for r in results) for m in methods}
    best = {}
    for result in results:
        rows = {m: result["rows"][m] for m in methods}
        meeting = [m for m in methods if rows[m]["meets_target"]]
        pool = meeting or methods
        best[result["task"]] = min(pool, key=lambda m: (abs(rows[m]["gap"]), -rows[m]["control_retention"]))
    return {"meets_target": per_method, "best": best,
            "tasks_met": sum(any(r["rows"][m]["meets_target"] for m in methods) for r in results),
            "tasks_met_without_fused": sum(any(r["rows"][m]["meets_target"] for m in methods if m != "fused")
                                           for r in results)}  # fmt: skip
