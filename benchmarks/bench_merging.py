"""Merging and forgetting benchmark: STA against the baselines on six real text tasks (MiniLM, all offline).

Protocol (quoted in the README):

* Models: all-MiniLM-L6-v2 fully fine-tuned on each task (``benchmarks.finetune``: 2 epochs, <= 600 training
  examples, lr 5e-5, batch 16, max length 128); seeds 0, 1, 2 change head init, dropout and batch order. Task heads
  are never merged: each task is scored with its own head on the merged body.
* Data: ``benchmarks.tasks`` fixed splits (train <= 600 / validation 200 / test 400 per task).
* Tuning uses the validation split (mean accuracy over tasks); every number reported is test accuracy of the chosen
  configuration. Normalised accuracy = mean over tasks of merged accuracy / the task's own fine-tune accuracy.
* STA importance: ``taylor`` metric on the first ``--calibration-samples`` (default 128) training examples of each
  task, micro-batches of 8.
* Forgetting: forget each task from the six-task STA merge (defaults) and from its own fine-tune; scaling chosen on validation as
  in task negation (largest target drop while the other tasks keep >= 95% of their accuracy on the unedited model);
  reported: target test accuracy, chance level, and control retention on test.

``python -m benchmarks.bench_merging --part merge`` (3 seeds), ``--part ablation`` (seed 0),
``--part forget`` (seed 0). Results: ``benchmarks/results/{merging,ablation,forgetting}.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import method_runs
from benchmarks.harness import TaskSuite, mean, normalized
from benchmarks.tasks import TASKS

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("bench_merging")

GRIDS = {
    "task_arithmetic": [{"scaling": s} for s in (0.3, 0.5, 0.7, 1.0)],
    "ties": [{"density": 0.2, "scaling": s} for s in (0.7, 1.0, 1.3)],
    "dare_ties": [{"density": 0.5, "scaling": s} for s in (0.7, 1.0)],
    "sta": [{"overlap": "elect", "density": d, "scaling": s} for d, s in itertools.product((0.4, 0.7), (1.0, 1.3))]
    + [{"overlap": "sum", "density": 0.1, "scaling": 1.0}, {"overlap": "sum", "threshold": 0.05, "scaling": 1.0}],
}
FORGET_SCALINGS = (1.0, 2.0, 3.0)


def _environment(suite: TaskSuite) -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "scoring": "bf16 autocast" if suite.bf16 else "fp32",
        "machine": platform.machine(),
        "load_avg": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d"),
    }


def _score(suite: TaskSuite, merger, split: str, method: str, **config) -> dict[str, float]:
    return suite.evaluate(merger.merge(method=method, **config), split)


def _sta_defaults() -> dict:
    from hf_sta.methods import get_merge_method

    return {parameter.name: parameter.default for parameter in get_merge_method("sta").parameters}


def _saved(path: Path, protocol: dict) -> dict | None:
    """The result saved at ``path`` if it was produced under the same ``protocol`` (compared as JSON), else None."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["protocol"] == json.loads(json.dumps(protocol)):
            logger.info("reusing %s", path)
            return saved
    return None


class _CheckpointedRows(dict):
    """The rows of one seed, written to ``path`` (with the protocol) each time one is added, so a seed interrupted
    after hours restarts at the first method it had not finished (the rows are reused only under the same protocol)."""

    def __init__(self, path: Path, protocol: dict) -> None:
        saved = _saved(path, protocol)
        super().__init__(saved["rows"] if saved else {})
        self.path, self.protocol = path, protocol

    def __setitem__(self, key: str, value: dict) -> None:
        super().__setitem__(key, value)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"protocol": self.protocol, "rows": dict(self)}, default=str) + "\n")


def run_seed(seed: int, tasks: list[str], calibration: int) -> dict:
    """One seed of the merge table; saved to ``results/merging/seed<seed>.json`` and reused by later runs whose
    protocol (tasks, fine-tune folders, grids, STA defaults, calibration size, scoring precision) is the same."""
    suite = TaskSuite(tasks, seed=seed).prepare()
    protocol = {
        "tasks": tasks,
        "models": {task: path.name for task, path in suite.model_dirs.items()},
        "grids": GRIDS,
        "sta_defaults": _sta_defaults(),
        "calibration_samples": calibration,
        "scoring": "bf16 autocast" if suite.bf16 else "fp32",
        "new_methods": {
            "data_free": method_runs.DATA_FREE_GRIDS,
            "data_aware": method_runs.DATA_AWARE_GRIDS,
            "learned": method_runs.LEARNED,
        },
    }
    path = RESULTS / "merging" / f"seed{seed}.json"
    cached = _saved(path, protocol)
    if cached is not None:
        return cached
    started = time.perf_counter()
    individual = suite.individual("test")
    merger = suite.merger()
    for task in tasks:
        suite.importance(merger, task, calibration)
    rows = _CheckpointedRows(RESULTS / "merging" / f"seed{seed}.partial.json", protocol)
    rows["individual"] = {"config": {}, "test": individual}
    if "sta_default" not in rows:
        rows["average"] = {"config": {}, "test": _score(suite, merger, "test", "average")}
        rows["sta_default"] = {"config": {}, "test": _score(suite, merger, "test", "sta")}
    for method, grid in GRIDS.items():
        examples = calibration if method == "sta" else 0
        if f"{method}_tuned" not in rows:
            rows[f"{method}_tuned"] = method_runs.tuned_row(
                suite, merger, method, grid, examples_per_task=examples, learnable=0
            )
    unit = {}
    with method_runs.measured(unit):
        merger.merge(method="task_arithmetic")
    method_runs.run_data_free(suite, merger, rows)
    method_runs.run_learned(suite, merger, rows, seed)  # before data-aware: STA + AdaMerging needs taylor importance
    method_runs.run_data_aware(suite, merger, rows, calibration)
    for row in rows.values():
        if "seconds" in row:
            row["time_over_task_arithmetic"] = (row["seconds"] + row.get("measure_seconds", 0.0)) / unit["seconds"]
        row["average"] = mean(row["test"].values())
        row["normalized"] = normalized(row["test"], individual)
    result = {
        "task_arithmetic_merge_seconds": unit["seconds"],
        "seed": seed,
        "protocol": protocol,
        "rows": dict(rows),
        "seconds": time.perf_counter() - started,
        "environment": _environment(suite),
    }
    logger.info("seed %d done in %.0f s", seed, result["seconds"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    rows.path.unlink()
    return result


def run_merge(seeds: list[int], tasks: list[str], calibration: int) -> dict:
    per_seed = [run_seed(seed, tasks, calibration) for seed in seeds]
    summary = {}
    for name in per_seed[0]["rows"]:
        values = [s["rows"][name]["normalized"] for s in per_seed]
        averages = [s["rows"][name]["average"] for s in per_seed]
        summary[name] = {
            "normalized_mean": statistics.mean(values),
            "normalized_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "average_mean": statistics.mean(averages),
            "average_std": statistics.stdev(averages) if len(averages) > 1 else 0.0,
            "per_task_mean": {t: statistics.mean(s["rows"][name]["test"][t] for s in per_seed) for t in tasks},
            "configs": [s["rows"][name]["config"] for s in per_seed],
            "costs": _costs([s["rows"][name] for s in per_seed]),
        }
    return {
        "tasks": tasks,
        "seeds": seeds,
        "calibration_samples": calibration,
        "summary": summary,
        "per_seed": per_seed,
    }


COST_FIELDS = (
    "examples_per_task",
    "learnable",
    "time_over_task_arithmetic",
    "peak_rss_mb",
    "seconds_per_step_over_plain",
)


def _costs(rows: list[dict]) -> dict:
    """Median over seeds of each cost a row records (examples, learnable parameters, time ratio, peak RSS)."""
    return {f: statistics.median(r[f] for r in rows) for f in COST_FIELDS if all(f in r for r in rows)}


def run_ablation(tasks: list[str], seed: int = 0, calibration: int = 128) -> dict:
    """STA at scaling 1 (no tuning) while one choice varies; **validation** split, seed ``seed``.

    This is the run that chose STA's defaults: first the grid ``overlap x density`` (taylor importance on
    ``calibration`` samples), then, around its best cell, the threshold rule, the global density scope, the importance
    metric and the number of calibration samples.
    """
    suite = TaskSuite(tasks, seed=seed).prepare()
    individual = suite.individual("validation")
    merger = suite.merger()
    results: dict[str, list[dict]] = {"overlap x density": [], "selection": [], "metric": [], "samples": []}

    def record(kind: str, value, **config) -> float:
        scores = _score(suite, merger, "validation", "sta", **config)
        results[kind].append(
            {
                "value": value,
                "config": config,
                "average": mean(scores.values()),
                "normalized": normalized(scores, individual),
                "per_task": scores,
            }
        )
        logger.info("ablation %s=%s -> %.4f", kind, value, results[kind][-1]["normalized"])
        return results[kind][-1]["normalized"]

    def importance(metric: str, samples: int) -> None:
        for task in tasks:
            suite.importance(merger, task, samples, metric)

    importance("taylor", calibration)
    grid = {}
    for overlap, density in itertools.product(("sum", "mean", "elect"), (0.1, 0.2, 0.4, 0.7)):
        grid[(overlap, density)] = record(
            "overlap x density", f"{overlap}, {density}", overlap=overlap, density=density
        )
    record("overlap x density", "max_importance, 0.2", overlap="max_importance", density=0.2)
    overlap, density = max(grid, key=grid.get)
    best = {"overlap": overlap, "density": density}
    for threshold in (0.01, 0.05, 0.2):
        record("selection", f"threshold {threshold}", overlap=overlap, threshold=threshold)
    record("selection", f"global density {density}", overlap=overlap, density=density, density_scope="global")
    for metric in ("taylor_delta", "fisher", "magnitude"):
        importance(metric, calibration)
        record("metric", metric, **best)
    for samples in (16, 64, 512):
        importance("taylor", samples)
        record("samples", samples, **best)
    return {
        "tasks": tasks,
        "seed": seed,
        "split": "validation",
        "calibration_samples": calibration,
        "best": best,
        "individual": individual,
        "results": results,
        "environment": _environment(suite),
    }


def run_forget(
    tasks: list[str],
    seed: int = 0,
    calibration: int = 128,
    forget: list[str] | None = None,
    sources: tuple[str, ...] = ("merge", "own"),
    cached_only: bool = False,
) -> dict:
    """Forget each task with STA (its importance mask) and with plain negation; the scaling is the largest of
    ``FORGET_SCALINGS`` (tried in increasing order, stopping at the first that breaks the control rule) whose control
    accuracy on validation stays >= 95% of the unedited model's; test accuracy of that edit is reported.

    Each (task, source) pair is saved to ``results/forgetting/<task>-<source>.json`` and reused while the protocol is
    unchanged, so pairs can run in separate processes (``--forget-tasks``, ``--forget-from``); ``cached_only`` collects
    the saved pairs and computes nothing new."""
    suite = TaskSuite(tasks, seed=seed).prepare()
    protocol = {
        "tasks": tasks,
        "seed": seed,
        "models": {task: path.name for task, path in suite.model_dirs.items()},
        "sta_defaults": _sta_defaults(),
        "scalings": FORGET_SCALINGS,
        "calibration_samples": calibration,
        "scoring": "bf16 autocast" if suite.bf16 else "fp32",
    }
    merger = suite.merger()
    for task in tasks:
        suite.importance(merger, task, calibration)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        merged: dict[str, object] = {}

        def merged_model():
            if not merged:
                merged["path"] = merger.merge(method="sta", output_dir=Path(tmp) / "merged")
                merged["test"] = suite.evaluate(merger.forget(tasks[0], scaling=0.0, target=merged["path"]), "test")
            return merged["path"], merged["test"]

        for task, target_kind in itertools.product(forget or tasks, sources):
            path = RESULTS / "forgetting" / f"{task}-{target_kind}.json"
            cached = _saved(path, protocol)
            if cached is not None:
                rows.extend(cached["rows"])
                continue
            if cached_only:
                continue
            if target_kind == "merge":
                target, before = merged_model()
            else:
                target, before = task, None
            others = [t for t in tasks if t != task]
            unedited = merger.forget(task, scaling=0.0, target=target)
            if before is None:
                before = suite.evaluate(unedited, "test")
            base_control = mean(suite.evaluate(unedited, "validation", others).values())
            pair_rows = []
            for method in ("sta", "negation"):
                curve, chosen = [], 0.0
                for scaling in FORGET_SCALINGS:
                    model = merger.forget(task, scaling=scaling, method=method, target=target)
                    point = {
                        "scaling": scaling,
                        "target": suite.accuracy(model, task, "validation"),
                        "control": mean(suite.evaluate(model, "validation", others).values()),
                    }
                    curve.append(point)
                    if point["control"] < 0.95 * base_control:
                        break
                    chosen = scaling
                after = suite.evaluate(merger.forget(task, scaling=chosen, method=method, target=target), "test")
                pair_rows.append(
                    {
                        "task": task,
                        "from": target_kind,
                        "method": method,
                        "scaling": chosen,
                        "target_before": before[task],
                        "target_after": after[task],
                        "chance": suite.chance(task),
                        "control_retention": mean(after[t] for t in others) / mean(before[t] for t in others),
                        "validation_control_before": base_control,
                        "curve": curve,
                    }
                )
                logger.info("forget %s from %s with %s: %s", task, target_kind, method, pair_rows[-1])
            path.parent.mkdir(parents=True, exist_ok=True)
            pair = {"protocol": protocol, "rows": pair_rows, "environment": _environment(suite)}
            path.write_text(json.dumps(pair, indent=2, default=str) + "\n")
            rows.extend(pair_rows)
    return {"tasks": tasks, "seed": seed, "merge": "STA defaults", "rows": rows, "protocol": protocol}


def print_merge(result: dict) -> None:
    tasks = result["tasks"]
    print(f"\nMerging {len(tasks)} MiniLM fine-tunes, test accuracy, mean over seeds {result['seeds']}\n")
    print("| method | " + " | ".join(tasks) + " | average | normalised (mean ± std) |")
    print("|---" * (len(tasks) + 3) + "|")
    for name, row in result["summary"].items():
        cells = " | ".join(f"{row['per_task_mean'][t]:.3f}" for t in tasks)
        print(
            f"| {name} | {cells} | {row['average_mean']:.3f} | {row['normalized_mean']:.3f} ± "
            f"{row['normalized_std']:.3f} |"
        )


def print_costs(result: dict) -> None:
    print("\nWhat each method costs (median over seeds; time relative to one task-arithmetic merge in the same run)\n")
    print(
        "| method | examples / task | learnable parameters | time / TA merge | learned step / plain fwd+bwd | peak RSS (MB) |"
    )
    print("|---|---|---|---|---|---|")
    for name, row in result["summary"].items():
        costs = row.get("costs", {})
        if not costs:
            continue
        step = costs.get("seconds_per_step_over_plain")
        print(
            f"| {name} | {costs.get('examples_per_task', 0):g} | {costs.get('learnable', 0):g} | "
            f"{costs.get('time_over_task_arithmetic', float('nan')):.1f} | {'' if step is None else f'{step:.2f}'} | "
            f"{costs.get('peak_rss_mb', float('nan')):.0f} |"
        )


def print_ablation(result: dict) -> None:
    print(
        f"\nSTA ablations (seed {result['seed']}, scaling 1, validation): normalised accuracy; best grid cell "
        f"{result['best']}\n"
    )
    print("| varied | value | normalised | average |")
    print("|---|---|---|---|")
    for kind, rows in result["results"].items():
        for row in rows:
            print(f"| {kind} | {row['value']} | {row['normalized']:.3f} | {row['average']:.3f} |")


def print_forget(result: dict) -> None:
    print(f"\nForgetting (seed 0; from = the six-task merge ({result['merge']}) or the task's own fine-tune)\n")
    print("| task | from | method | scaling | target before | target after | chance | control retention |")
    print("|---|---|---|---|---|---|---|---|")
    for row in result["rows"]:
        print(
            f"| {row['task']} | {row['from']} | {row['method']} | {row['scaling']:g} | {row['target_before']:.3f} "
            f"| {row['target_after']:.3f} | {row['chance']:.3f} | {row['control_retention']:.3f} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("merge", "ablation", "forget"), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--forget-tasks", nargs="+", default=None, help="tasks to forget (default: all)")
    parser.add_argument("--forget-from", nargs="+", default=["merge", "own"], choices=["merge", "own"])
    parser.add_argument("--cached-only", action="store_true", help="forget: collect saved pairs, compute nothing new")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "transformers", "datasets", "hf_sta"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    RESULTS.mkdir(exist_ok=True)
    if args.part == "merge":
        result = run_merge(args.seeds, args.tasks, args.calibration_samples)
        print_merge(result)
        print_costs(result)
        name = "merging"
    elif args.part == "ablation":
        result = run_ablation(args.tasks, seed=args.seeds[0], calibration=args.calibration_samples)
        print_ablation(result)
        name = "ablation"
    else:
        result = run_forget(
            args.tasks,
            seed=args.seeds[0],
            calibration=args.calibration_samples,
            forget=args.forget_tasks,
            sources=tuple(args.forget_from),
            cached_only=args.cached_only,
        )
        print_forget(result)
        name = "forgetting"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
