"""How STA's constant defaults are chosen: leave-one-suite-out over task suites from different domains.

Suites (``benchmarks.suites``): ``text6`` (the six-task benchmark), ``fortunes`` (topic, language and genre of Debian's
fortune cookies) and ``wordnet`` (part of speech and semantic class of WordNet glosses); MiniLM fully fine-tuned per
task (seed 0), heads kept per task, ``taylor`` importance on 128 training examples per task.

Protocol (``python -m benchmarks.sta_defaults``; ``--tiny`` runs the same code on tiny BERT fine-tunes):

1. **Validation grid, every suite**: STA over :data:`STA_CELLS` (overlap x density) x :data:`SCALINGS`, task
   arithmetic over :data:`TA_SCALINGS`, TIES density 0.2 over :data:`SCALINGS`; score = normalised validation
   accuracy (mean over tasks of merged / the task's own fine-tune).
2. **Leave one suite out**: for each suite ``S`` the STA cell (overlap, density, scaling) is the one that maximises
   the *worst* normalised validation score over the other suites (ties: first in grid order); ``S`` is then scored on
   test with that cell, which never saw ``S``. The library default is the same rule over all suites.
3. **Against**: task arithmetic and TIES tuned on ``S``'s own validation split, and ``scaling="auto"`` (and STA's
   ``density="auto"``) chosen on the 128 labelled training examples per task (``hf_sta.auto``: cross entropy, each
   task read out by its own head), STA's ``auto`` at the fold's constant overlap and density.
4. **Why**: per task, the share of the task vector STA's masks keep (and that survives the sign election), the
   overlap of the tasks' masks and the norm of each merged delta (``benchmarks.suite_merging.selection_stats``).

Writes ``results/sta_defaults.json`` (``--output``) and ``results/sta_defaults.png``; every score is cached per suite
under ``<cache>/sta_defaults/`` so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.suite_merging import SuiteScores, Workload, real_workload, selection_stats, tiny_workload
from benchmarks.suites import SUITES

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("sta_defaults")

STA_CELLS: list[tuple[str, float]] = [("elect", d) for d in (0.2, 0.4, 0.7)] + [("sum", d) for d in (0.1, 0.2)]
SCALINGS: tuple[float, ...] = (0.7, 1.0, 1.3, 1.6, 2.0)
TA_SCALINGS: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0)
TIES_DENSITY = 0.2
CURRENT_DEFAULT = ("elect", 0.7, 1.0)
CALIBRATION_SAMPLES = 128

TINY_SUITES = {"s1": ("tweet_sentiment", "product_sentiment"), "s2": ("subjectivity", "product_sentiment")}
TINY_GRID = {"sta_cells": [("elect", 0.7), ("sum", 0.2)], "scalings": (1.0,), "ta_scalings": (0.5, 1.0)}

Cell = tuple[str, float, float]  # (overlap, density, scaling)


def sta_cells(grid: Mapping[str, Any]) -> list[Cell]:
    return [(o, d, s) for o, d in grid["sta_cells"] for s in grid["scalings"]]


def validation_grid(scores: SuiteScores, grid: Mapping[str, Any], reverse: bool = False) -> dict[str, Any]:
    """Normalised validation scores of every STA cell and of the baselines' grids (scaling innermost; ``reverse``
    scores them last to first, for a second run filling the same cache)."""
    jobs = [("sta", {"overlap": o, "density": d}, s) for o, d, s in sta_cells(grid)]
    jobs += [("task_arithmetic", {}, s) for s in grid["ta_scalings"]]
    jobs += [("ties", {"density": TIES_DENSITY}, s) for s in grid["scalings"]]
    for method, params, scaling in reversed(jobs) if reverse else jobs:
        scores.score(method, params, scaling, "validation")
    result: dict[str, dict] = {"sta": {}, "task_arithmetic": {}, "ties": {}}
    for method, params, scaling in jobs:  # all cached now
        key = (params["overlap"], params["density"], scaling) if method == "sta" else scaling
        result[method][key] = scores.score(method, params, scaling, "validation")["normalized"]
    return result


def worst_case_choice(validation: Mapping[str, Mapping[Cell, float]], suites: Sequence[str]) -> tuple[Cell, float]:
    """The STA cell maximising ``min over suites`` of the normalised validation score (first in grid order on ties)."""
    cells = list(validation[suites[0]])
    worst = {cell: min(validation[s][cell] for s in suites) for cell in cells}
    best = max(cells, key=lambda cell: (worst[cell], -cells.index(cell)))
    return best, worst[best]


def leave_one_out(validation: Mapping[str, Mapping[Cell, float]]) -> dict[str, dict[str, Any]]:
    """For each suite: the cell chosen on the others (:func:`worst_case_choice`) and its worst validation score."""
    folds = {}
    for held_out in validation:
        others = [s for s in validation if s != held_out]
        cell, worst = worst_case_choice(validation, others)
        folds[held_out] = {"chosen_on": others, "cell": cell, "worst_validation": worst}
    return folds


def _cell_dict(cell: Cell) -> dict[str, Any]:
    return {"overlap": cell[0], "density": cell[1], "scaling": cell[2]}


def held_out_row(scores: SuiteScores, method: str, params: Mapping[str, Any], scaling: float) -> dict[str, Any]:
    row = scores.score(method, params, scaling, "test")
    validation = scores.score(method, params, scaling, "validation")
    return {
        "params": {**params, "scaling": scaling},
        "validation": validation["normalized"],
        "test": row["normalized"],
        "test_scores": row["scores"],
        "delta_norm": row["delta_norm"],
    }


def _auto_row(scores: SuiteScores, method: str, params: Mapping[str, Any], searched: Sequence[str]) -> dict[str, Any]:
    row = scores.auto(method, params, searched)
    record = row["record"]
    return {
        "params": {**params, **row["chosen"]},
        "searched": list(searched),
        "validation": row["validation"]["normalized"],
        "test": row["test"]["normalized"],
        "test_scores": row["test"]["scores"],
        "calibration_passes": record["calibration_passes"],
        "examples_per_task": record["examples"],
        "evaluations": record["evaluations"],
        "seconds": row["seconds"],
        "cost_in_passes": row.get("cost_in_passes"),
        "pass_seconds": row.get("pass_seconds"),
    }


def report_suite(scores: SuiteScores, grid: Mapping[str, Any], fold: Mapping[str, Any], final: Cell) -> dict:
    """Test rows of one suite: STA's fold cell (chosen without it), the current and the final defaults, the tuned
    baselines (on this suite's validation) and the ``auto`` variants; plus the selection statistics."""
    validation = validation_grid(scores, grid)
    ta_scaling = max(validation["task_arithmetic"], key=validation["task_arithmetic"].get)
    ties_scaling = max(validation["ties"], key=validation["ties"].get)
    overlap, density, scaling = fold["cell"]
    sta_params = {"overlap": overlap, "density": density}
    rows = {
        "sta_loso": held_out_row(scores, "sta", sta_params, scaling),
        "sta_current_default": held_out_row(scores, "sta", dict(zip(("overlap", "density"), CURRENT_DEFAULT)), 1.0),
        "sta_final_default": held_out_row(scores, "sta", {"overlap": final[0], "density": final[1]}, final[2]),
        "task_arithmetic_tuned": held_out_row(scores, "task_arithmetic", {}, ta_scaling),
        "ties_tuned": held_out_row(scores, "ties", {"density": TIES_DENSITY}, ties_scaling),
        "task_arithmetic_auto": _auto_row(scores, "task_arithmetic", {}, ["scaling"]),
        "ties_auto": _auto_row(scores, "ties", {"density": TIES_DENSITY}, ["scaling"]),
        "sta_auto": _auto_row(scores, "sta", sta_params, ["scaling"]),
        "sta_auto_density": _auto_row(scores, "sta", {"overlap": overlap}, ["scaling", "density"]),
    }
    merger, tasks = scores.workload.merger, scores.workload.tasks
    selection = {str(d): selection_stats(merger, tasks, d) for d in sorted({0.2, density, CURRENT_DEFAULT[1]})}
    individual = {split: scores.reference(split) for split in ("validation", "test")}
    return {"tasks": tasks, "rows": rows, "selection": selection, "individual": individual}


def targets(suites: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The issue's two targets on every held-out suite, as measured (test, normalised)."""
    out = {}
    for name, suite in suites.items():
        rows = suite["rows"]
        best_tuned = max(rows["task_arithmetic_tuned"]["test"], rows["ties_tuned"]["test"])
        best_auto = max(rows["task_arithmetic_auto"]["test"], rows["ties_auto"]["test"])
        out[name] = {
            "sta_loso_minus_best_tuned": rows["sta_loso"]["test"] - best_tuned,
            "constant_target_met": rows["sta_loso"]["test"] >= best_tuned - 0.005,
            "sta_auto_minus_best_baseline_auto": rows["sta_auto"]["test"] - best_auto,
            "auto_target_met": rows["sta_auto"]["test"] >= best_auto + 0.01,
            "auto_passes": {k: rows[k]["calibration_passes"] for k in rows if k.endswith(("_auto", "_auto_density"))},
        }
    return out


def run(
    workloads: Mapping[str, Workload], grid: Mapping[str, Any], time_auto: bool = True, reverse: bool = False
) -> dict[str, Any]:
    scores = {name: SuiteScores(workload, time_auto) for name, workload in workloads.items()}
    order = list(reversed(scores)) if reverse else list(scores)
    for name in order:
        validation_grid(scores[name], grid, reverse)
    validation = {name: validation_grid(s, grid)["sta"] for name, s in scores.items()}
    folds = leave_one_out(validation)
    final, final_worst = worst_case_choice(validation, list(validation))
    reports = {name: report_suite(scores[name], grid, folds[name], final) for name in order}
    suites = {name: reports[name] for name in scores}
    points = {name: validation_points(s, grid) for name, s in scores.items()}
    return {
        "grid": {
            "sta": [_cell_dict(c) for c in sta_cells(grid)],
            "task_arithmetic_scalings": list(grid["ta_scalings"]),
            "ties": {"density": TIES_DENSITY, "scalings": list(grid["scalings"])},
        },
        "validation": {
            n: [{**_cell_dict(c), "normalized": v} for c, v in cells.items()] for n, cells in validation.items()
        },
        "folds": {n: {**f, "cell": _cell_dict(f["cell"])} for n, f in folds.items()},
        "final": {**_cell_dict(final), "worst_validation": final_worst},
        "current_default": _cell_dict(CURRENT_DEFAULT),
        "suites": suites,
        "points": points,
        "selection": {name: suite["selection"] for name, suite in suites.items()},
        "targets": targets(suites),
        "protocol": {n: w.protocol for n, w in workloads.items()},
    }


def print_tables(result: Mapping[str, Any]) -> None:
    print("\n| held-out suite | STA cell chosen on the others | worst validation there |")
    print("|---|---|---|")
    for name, fold in result["folds"].items():
        cell = fold["cell"]
        print(f"| {name} | {cell['overlap']}, density {cell['density']:g}, scaling {cell['scaling']:g} | "
              f"{fold['worst_validation']:.3f} |")  # fmt: skip
    names = list(result["suites"])
    print("\n| method (test, normalised) | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    labels = next(iter(result["suites"].values()))["rows"]
    for key in labels:
        cells = []
        for name in names:
            row = result["suites"][name]["rows"][key]
            params = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{v}" for k, v in row["params"].items())
            cells.append(f"{row['test']:.3f} ({params})")
        print(f"| {key} | " + " | ".join(cells) + " |")
    print("\n| suite | task | kept share of ||tau||^2 | ... after election | STA density |")
    print("|---|---|---|---|---|")
    for name, suite in result["suites"].items():
        for density, stats in suite["selection"].items():
            for task in suite["tasks"]:
                print(f"| {name} | {task} | {stats['kept_energy'][task]:.3f} | {stats['elected_energy'][task]:.3f} | "
                      f"{density} |")  # fmt: skip
    print("\n| suite | mask Jaccard (mean over pairs) | independent masks | ||delta|| STA default / TA tuned |")
    print("|---|---|---|---|")
    for name, suite in result["suites"].items():
        rows = suite["rows"]
        for density, stats in suite["selection"].items():
            ratio = rows["sta_current_default"]["delta_norm"] / rows["task_arithmetic_tuned"]["delta_norm"]
            print(f"| {name} (density {density}) | {stats['jaccard_mean']:.3f} | {stats['jaccard_independent']:.3f} | "
                  f"{ratio:.2f} |")  # fmt: skip


def validation_points(scores: SuiteScores, grid: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every scored validation cell of one suite with its merged delta's norm ``||scaling * delta||``."""
    jobs = [("sta", {"overlap": o, "density": d}, s) for o, d, s in sta_cells(grid)]
    jobs += [("task_arithmetic", {}, s) for s in grid["ta_scalings"]]
    jobs += [("ties", {"density": TIES_DENSITY}, s) for s in grid["scalings"]]
    points = []
    for method, params, scaling in jobs:
        row = scores.score(method, params, scaling, "validation")
        points.append({"method": method, **params, "scaling": scaling, "normalized": row["normalized"],
                       "delta_norm": row["delta_norm"]})  # fmt: skip
    return points


def plot(result: Mapping[str, Any], path: Path) -> None:
    """Left: per task, the share of its task vector STA keeps (mask) and that survives the sign election, at
    densities 0.2 and 0.7. Then, per suite: normalised validation accuracy against the merged delta's norm for every
    STA cell (one line per overlap/density, scaling growing along it), task arithmetic and TIES."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["points"])
    figure, axes = plt.subplots(1, 1 + len(names), figsize=(5 + 4 * len(names), 4.8))
    left = axes[0]
    labels, bars = [], {}
    for name, suite in result["selection"].items():
        tasks = list(next(iter(suite.values()))["kept_energy"])
        labels += [f"{name}: {task}" for task in tasks]
        for density, stats in suite.items():
            bars.setdefault((density, "kept"), []).extend(stats["kept_energy"][t] for t in tasks)
            bars.setdefault((density, "elected"), []).extend(stats["elected_energy"][t] for t in tasks)
    height = 0.8 / max(len(bars), 1)
    for index, ((density, kind), values) in enumerate(sorted(bars.items())):
        positions = [p - 0.4 + height * (index + 0.5) for p in range(len(labels))]
        label = f"density {density}: " + (
            "kept by the mask" if kind == "kept" else "... and agrees with the elected sign"
        )
        left.barh(positions, values, height=height, label=label)
    left.set_yticks(range(len(labels)), labels, fontsize=7)
    left.set_xlabel("share of each task vector's ||tau_t||^2")
    left.legend(fontsize=6, loc="lower right")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    keys = {"task arithmetic", f"TIES {TIES_DENSITY:g}"}
    keys |= {
        f"STA {p['overlap']} {p['density']:g}" for ps in result["points"].values() for p in ps if p["method"] == "sta"
    }
    for axis, name in zip(axes[1:], names):
        lines: dict[str, list] = {}
        for point in result["points"][name]:
            if point["method"] == "sta":
                key = f"STA {point['overlap']} {point['density']:g}"
            else:
                key = "task arithmetic" if point["method"] == "task_arithmetic" else f"TIES {TIES_DENSITY:g}"
            lines.setdefault(key, []).append((point["delta_norm"], point["normalized"]))
        for key, values in lines.items():
            values.sort()
            style = "--" if key.startswith(("task", "TIES")) else "-"
            colour = colours[sorted(keys).index(key) % len(colours)]
            axis.plot([v[0] for v in values], [v[1] for v in values], style, marker="o", markersize=3, label=key,
                      color=colour)  # fmt: skip
        axis.set_title(name)
        axis.set_xlabel("||theta - theta_0|| (merged delta, all body tensors)")
        axis.set_ylabel("normalised validation accuracy")
        axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suites", nargs="+", default=list(SUITES), choices=list(SUITES))
    parser.add_argument("--tiny", action="store_true", help="tiny BERT fine-tunes of two 2-task suites (a test)")
    parser.add_argument("--work-dir", type=Path, default=None, help="--tiny: where the tiny models go")
    parser.add_argument("--output", type=Path, default=RESULTS / "sta_defaults.json")
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--validation-only", action="store_true", help="only score the validation grids (cached)")
    parser.add_argument("--reverse", action="store_true", help="work last to first (a second run on the same cache)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.num_threads)
    started = time.perf_counter()
    if args.tiny:
        work = args.work_dir or Path(tempfile.mkdtemp(prefix="sta-defaults-tiny-"))
        workloads = {name: tiny_workload(name, tasks, work) for name, tasks in TINY_SUITES.items()}
        grid = TINY_GRID
    else:
        from benchmarks.tasks import cache_root

        cache = cache_root() / "sta_defaults"
        workloads = {s: real_workload(s, SUITES[s], CALIBRATION_SAMPLES, cache) for s in args.suites}
        grid = {"sta_cells": STA_CELLS, "scalings": SCALINGS, "ta_scalings": TA_SCALINGS}
    if args.validation_only:  # fill the per-suite caches (e.g. while another suite's fine-tunes are still running)
        return {name: validation_grid(SuiteScores(w), grid, args.reverse) for name, w in workloads.items()}
    result = run(workloads, grid, time_auto=not args.tiny, reverse=args.reverse)
    result["environment"] = {"threads": args.num_threads, "load_avg": os.getloadavg(), "torch": torch.__version__,
                             "seconds": time.perf_counter() - started}  # fmt: skip
    print_tables(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot(result, args.output.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
