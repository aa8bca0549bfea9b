"""`make demo`: the main job end to end on a real model and real data that ship offline.

1. Fine-tune all-MiniLM-L6-v2 on three text tasks (cached under ``~/.cache/hf_sta/finetuned``).
2. Compute STA importance (first-order Taylor) on 64 training examples of each task.
3. Merge the three models with STA (defaults, no tuning), task arithmetic and TIES (their scaling tuned on the
   validation split), each body scored on every task's test split with that task's own head (the first 100
   validation and 200 test examples of each task, to keep the cached run under two minutes on 2 cores).
4. Forget one task from the STA merge (scaling chosen on validation: largest drop while the other tasks keep
   >= 95% of their accuracy), and print one table.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from benchmarks.harness import TaskSuite, mean, normalized

DEMO_TASKS = ("news", "movie_sentiment", "tweet_sentiment")
TA_SCALINGS = (0.3, 0.5)
TIES_SCALINGS = (0.7, 1.0)
FORGET_SCALINGS = (1.0, 2.0, 3.0)
SPLIT_LIMITS = {"validation": 100, "test": 200}  # examples scored per task (the benchmarks score 200 / 400)


def _row(name: str, scores: dict[str, float], individual: dict[str, float], tasks) -> str:
    cells = " | ".join(f"{scores[t]:.3f}" for t in tasks)
    return f"| {name} | {cells} | {mean(scores.values()):.3f} | {normalized(scores, individual):.3f} |"


def _tuned(suite: TaskSuite, merger, method: str, scalings, **params) -> tuple[float, dict[str, float]]:
    """Scaling with the best mean validation accuracy, and that model's test scores."""
    best_scaling, best_value = None, -1.0
    for scaling in scalings:
        value = mean(suite.evaluate(merger.merge(method=method, scaling=scaling, **params), "validation").values())
        if value > best_value:
            best_scaling, best_value = scaling, value
    return best_scaling, suite.evaluate(merger.merge(method=method, scaling=best_scaling, **params), "test")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(DEMO_TASKS))
    parser.add_argument("--forget", default=None, help="task to forget (default: the first)")
    parser.add_argument("--calibration-samples", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    tasks, forget = tuple(args.tasks), args.forget or args.tasks[0]
    started = time.perf_counter()

    print(f"[1/4] fine-tuning (or loading cached) MiniLM models for {', '.join(tasks)}", flush=True)
    suite = TaskSuite(tasks, show_progress=True, split_limits=SPLIT_LIMITS).prepare()
    individual = suite.individual("test")
    merger = suite.merger()

    print(f"[2/4] STA importance (taylor, {args.calibration_samples} samples per task)", flush=True)
    for task in tasks:
        suite.importance(merger, task, args.calibration_samples)

    print("[3/4] merging: STA (defaults), task arithmetic and TIES (scaling tuned on validation)", flush=True)
    rows = {"individual fine-tunes": individual}
    ta_scaling, rows["task arithmetic (tuned)"] = _tuned(suite, merger, "task_arithmetic", TA_SCALINGS)
    ties_scaling, rows["TIES density 0.2 (tuned)"] = _tuned(suite, merger, "ties", TIES_SCALINGS, density=0.2)
    rows["STA defaults (no tuning)"] = suite.evaluate(merger.merge(method="sta"))

    print(f"[4/4] forgetting '{forget}' from the STA merge", flush=True)
    others = [t for t in tasks if t != forget]
    with tempfile.TemporaryDirectory() as tmp:
        merged = merger.merge(method="sta", output_dir=Path(tmp) / "sta")
        curve = merger.tune_forgetting(
            forget,
            eval_fn=lambda body: suite.accuracy(body, forget, "validation"),
            control_fn=lambda body: mean(suite.evaluate(body, "validation", others).values()),
            scalings=FORGET_SCALINGS,
            target=merged,
        )
        scaling = curve.best_scaling or 0.0
        rows[f"STA merge, '{forget}' forgotten (x{scaling:g})"] = suite.evaluate(
            merger.forget(forget, scaling=scaling, target=merged)
        )

    print(
        f"\nTest accuracy (MiniLM, {len(tasks)} tasks; task arithmetic lambda={ta_scaling}, TIES lambda="
        f"{ties_scaling}; chance: " + ", ".join(f"{t} {suite.chance(t):.2f}" for t in tasks) + ")\n"
    )
    print("| model | " + " | ".join(tasks) + " | average | normalised |")
    print("|---" * (len(tasks) + 3) + "|")
    for name, scores in rows.items():
        print(_row(name, scores, individual, tasks))
    print(f"\ndone in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
