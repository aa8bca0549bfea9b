"""`make demo`: the main job end to end on a real model and real data that ship offline.

1. Fine-tune all-MiniLM-L6-v2 on three text tasks (cached under ``~/.cache/hf_sta/finetuned``).
2. Compute STA importance (first-order Taylor) on 64 training examples of each task.
3. Merge the three models with STA (defaults, no tuning), task arithmetic and TIES (their scaling tuned on the
   validation split), each body scored on every task's test split with that task's own head (the first 100
   validation and 200 test examples of each task, to keep the cached run under two minutes on 2 cores).
4. Forget one task from the STA merge (scaling chosen on validation: largest drop while the other tasks keep
   >= 95% of their accuracy), and print one table.

Every step prints a line with the time since the start. The STA merge and the forgetting are written to
``--output-dir`` (default ``$HF_STA_CACHE/demo``), their model cards carrying the measured test accuracy (model-index).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from benchmarks.harness import TaskSuite, mean, normalized
from benchmarks.tasks import cache_root

DEMO_TASKS = ("news", "movie_sentiment", "tweet_sentiment")
TA_SCALINGS = (0.3, 0.5)
TIES_SCALINGS = (0.7, 1.0)
FORGET_SCALINGS = (1.0, 2.0, 3.0)
SPLIT_LIMITS = {"validation": 100, "test": 200}  # examples scored per task (the benchmarks score 200 / 400)


def _row(name: str, scores: dict[str, float], individual: dict[str, float], tasks) -> str:
    cells = " | ".join(f"{scores[t]:.3f}" for t in tasks)
    return f"| {name} | {cells} | {mean(scores.values()):.3f} | {normalized(scores, individual):.3f} |"


class Progress:
    """One line per step and sub-step, with the time since the start (the demo has long quiet stretches otherwise)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f} s] {message}", flush=True)


def _tuned(suite: TaskSuite, merger, method: str, scalings, log: Progress, **params) -> tuple[float, dict[str, float]]:
    """Scaling with the best mean validation accuracy, and that model's test scores."""
    best_scaling, best_value = None, -1.0
    for scaling in scalings:
        value = mean(suite.evaluate(merger.merge(method=method, scaling=scaling, **params), "validation").values())
        log(f"      {method} scaling {scaling:g}: validation accuracy {value:.3f}")
        if value > best_value:
            best_scaling, best_value = scaling, value
    return best_scaling, suite.evaluate(merger.merge(method=method, scaling=best_scaling, **params), "test")


def _accuracy(scores: dict[str, float]) -> dict[str, dict[str, float]]:
    """``eval_results`` of a model card: test accuracy per task."""
    return {task: {"accuracy": round(value, 4)} for task, value in scores.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(DEMO_TASKS))
    parser.add_argument("--forget", default=None, help="task to forget (default: the first)")
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="where the STA merge and the forgetting are written, with model "
        "cards carrying their measured test accuracy (default: $HF_STA_CACHE/demo)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import datasets
    import transformers

    # the demo prints its own progress: not the libraries' load reports and per-call bars
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    tasks, forget = tuple(args.tasks), args.forget or args.tasks[0]
    output = args.output_dir or cache_root() / "demo"
    log = Progress()

    log(f"[1/4] fine-tuning (or loading cached) MiniLM models for {', '.join(tasks)}")
    suite = TaskSuite(tasks, show_progress=True, split_limits=SPLIT_LIMITS).prepare()
    individual = suite.individual("test")
    log("      individual fine-tunes: test accuracy " + ", ".join(f"{t} {v:.3f}" for t, v in individual.items()))
    merger = suite.merger()

    log(f"[2/4] STA importance (taylor, {args.calibration_samples} samples per task)")
    for task in tasks:
        suite.importance(merger, task, args.calibration_samples)
        log(f"      importance of {task}")

    log("[3/4] merging: STA (defaults), task arithmetic and TIES (scaling tuned on validation)")
    rows = {"individual fine-tunes": individual}
    ta_scaling, rows["task arithmetic (tuned)"] = _tuned(suite, merger, "task_arithmetic", TA_SCALINGS, log)
    ties_scaling, rows["TIES density 0.2 (tuned)"] = _tuned(suite, merger, "ties", TIES_SCALINGS, log, density=0.2)
    rows["STA defaults (no tuning)"] = suite.evaluate(merger.merge(method="sta"))
    log(f"      STA defaults: test accuracy {mean(rows['STA defaults (no tuning)'].values()):.3f}")
    merger.eval_results = _accuracy(rows["STA defaults (no tuning)"])
    merged = merger.merge(method="sta", output_dir=output / "sta-merge", overwrite=True)

    log(f"[4/4] forgetting '{forget}' from the STA merge")
    others = [t for t in tasks if t != forget]
    curve = merger.tune_forgetting(
        forget,
        eval_fn=lambda body: suite.accuracy(body, forget, "validation"),
        control_fn=lambda body: mean(suite.evaluate(body, "validation", others).values()),
        scalings=FORGET_SCALINGS,
        target=merged,
    )
    for point in curve.points:
        log(f"      scaling {point['scaling']:g}: {forget} {point['target']:.3f}, others {point['control']:.3f}")
    scaling = curve.best_scaling or 0.0
    name = f"STA merge, '{forget}' forgotten (x{scaling:g})"
    rows[name] = suite.evaluate(merger.forget(forget, scaling=scaling, target=merged))
    merger.eval_results = _accuracy(rows[name])
    forgotten = merger.forget(forget, scaling=scaling, target=merged, output_dir=output / f"sta-merge-without-{forget}", overwrite=True)  # fmt: skip

    print(
        f"\nTest accuracy (MiniLM, {len(tasks)} tasks; task arithmetic lambda={ta_scaling}, TIES lambda="
        f"{ties_scaling}; chance: " + ", ".join(f"{t} {suite.chance(t):.2f}" for t in tasks) + ")\n"
    )
    print("| model | " + " | ".join(tasks) + " | average | normalised |")
    print("|---" * (len(tasks) + 3) + "|")
    for row, scores in rows.items():
        print(_row(row, scores, individual, tasks))
    print(f"\nWrote {merged} and {forgotten} (model cards with these test accuracies as model-index)")
    log("done")


if __name__ == "__main__":
    main()
