"""Fine-tuning for mergeability (issue 14): the six-task MiniLM merge benchmark with AdamW, SAM and ASAM fine-tunes.

Protocol (quoted in the README):

* Fine-tunes: ``benchmarks.finetune`` (all-MiniLM-L6-v2, <= 600 training examples, 2 epochs of batch 16, lr 1e-4,
  warmup 10% then linear decay, clipping 1.0), through :func:`hf_sta.training.finetune`. SAM / ASAM wrap the same
  AdamW: the update uses the gradient at ``theta + e`` (``e = rho g / ||g||``; ASAM ``e = rho T^2 g / ||T g||``,
  ``T = |theta|``). Same data, same seeds (head initialisation, dropout, batch order) for the three optimizers.
* ``rho`` (``--part rho``, seed 0): the grid :data:`RHO_GRID` around the authors' defaults (SAM 0.05, ASAM 0.5); the
  chosen ``rho`` maximises the mean *validation* accuracy of the six-task task-arithmetic merge at its best
  validation scaling (the mergeability SAM is used for here); the individual validation accuracies are recorded too.
* Merges (``--part merge``): for each optimizer and seed, each method's grid (as in ``bench_merging``) is searched on
  validation and the chosen configuration is scored on test with each task's own head. Normalised accuracy = mean
  over tasks of merged accuracy / that fine-tune's own accuracy (so each optimizer is normalised by its own
  fine-tunes); the absolute average is reported beside it.
* Interference: for each ordered pair of tasks ``(i, j)``, ``L_i(theta_0 + tau_i + tau_j) - L_i(theta_0 + tau_i)``,
  the mean cross-entropy of task ``i`` (its head, validation split) when task ``j``'s vector is added to its
  fine-tune; averaged over ``j`` per task, then over tasks.
* Cost (``--part cost``): seconds per training step of AdamW, SAM and ASAM measured side by side in one process
  (the three models step in rotated order, ``--cost-rounds`` rounds of ``--cost-steps`` real batches each; wall time
  and this process's CPU time), medians of the per-round ratios.

``python -m benchmarks.bench_sam --part rho`` then ``--part merge`` (3 seeds) and ``--part cost``. Results:
``benchmarks/results/sam.json`` (summary) and ``benchmarks/results/sam/`` (``rho.json``: the choice;
``<optimizer>[<rho>]-s<seed>.json``: each set of fine-tunes; ``cost.json``); a reduced run (``--tasks``,
``--split-limit``) takes a ``--tag`` and writes ``sam-<tag>.json`` and ``sam-<tag>/`` instead. ``--tiny`` runs
every part on a tiny BERT built from a config (seconds), under ``--work-dir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import bench_merging, method_runs
from benchmarks.harness import SavedRows, TaskSuite, mean, normalized
from benchmarks.tasks import TASKS

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("bench_sam")

OPTIMIZERS = ("adamw", "sam", "asam")
RHO_GRID = {"sam": (0.02, 0.05, 0.1), "asam": (0.2, 0.5, 1.0)}
"""Around the authors' defaults (SAM 0.05: Foret et al. 2021; ASAM 0.5: Kwon et al. 2021), a factor 2-2.5 each way."""
DEFAULT_RHO = {"sam": 0.05, "asam": 0.5}
MERGE_GRIDS: dict[str, list[dict]] = {
    "average": [{}],
    "task_arithmetic": bench_merging.GRIDS["task_arithmetic"],
    "ties": bench_merging.GRIDS["ties"],
    "sta": bench_merging.GRIDS["sta"],
    **method_runs.DATA_FREE_GRIDS,
    "dare_ties": bench_merging.GRIDS["dare_ties"],
}
"""Data-free methods and their validation grids (the ones of ``bench_merging``)."""
DEFAULT_METHODS = ("average", "task_arithmetic", "ties", "sta", "tsv", "iso_c")
"""The cheap data-free methods run by default; ``--methods`` adds the others, the data-aware ones (``fisher``,
``regmean``) and the learned ones (``adamerging``, ``dv_basi``, ``sta_adamerging``)."""
TINY = {
    "tasks": ["subjectivity", "debate_party", "movie_sentiment"],
    "train_size": 24,
    "epochs": 1,
    "split_limits": {"validation": 16, "test": 16},
    "rho_grid": {"sam": (0.05, 0.1), "asam": (0.5,)},
    "methods": ("average", "task_arithmetic", "ties", "sta"),
    "calibration": 8,
}


# -- suites -----------------------------------------------------------------------------------------------------------
def make_suite(tasks: Sequence[str], seed: int, optimizer: str, rho: float | None, settings: Mapping) -> TaskSuite:
    """The fine-tunes of ``tasks`` with ``optimizer`` (cached by ``benchmarks.finetune``)."""
    return TaskSuite(
        list(tasks),
        seed=seed,
        optimizer=optimizer,
        rho=None if optimizer == "adamw" else rho,
        train_size=settings.get("train_size", 600),
        epochs=settings.get("epochs", 2),
        split_limits=settings.get("split_limits", {}),
        base_model=settings.get("base_model"),
        cache_dir=settings.get("cache_dir"),
    ).prepare()


def tiny_bert_base(folder: Path) -> Path:
    """A tiny randomly initialised BERT with MiniLM's tokenizer (no dropout), saved once under ``folder``."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from benchmarks.finetune import minilm_path

    if not (folder / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        config = BertConfig(
            vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=512, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        torch.manual_seed(0)
        BertModel(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def fine_tune_record(suite: TaskSuite) -> dict[str, dict]:
    """Per task: the fine-tune's folder, time per step and validation / test accuracy (``hf_sta_finetune.json``)."""
    from benchmarks.finetune import read_finetune_info

    record = {}
    for task, folder in suite.model_dirs.items():
        info = read_finetune_info(folder)
        steps = info.get("steps") or info["epochs"] * math.ceil(info["train_examples"] / info["batch_size"])
        record[task] = {
            "folder": folder.name,
            "steps": steps,
            "seconds_per_step": info["train_seconds"] / steps,  # wall time: other jobs share the CPU (not a ratio)
            "validation_accuracy": info["validation_accuracy"],
            "test_accuracy": info["test_accuracy"],
        }
    return record


# -- interference -----------------------------------------------------------------------------------------------------
def body_state_dicts(suite: TaskSuite) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """``(theta_0, {task: theta_t})`` as ``BertModel`` state dicts (the heads are not part of the body)."""
    from transformers import BertModel

    base = suite.base_body().state_dict()
    bodies = {task: BertModel.from_pretrained(suite.model_dirs[task]).state_dict() for task in suite.tasks}
    return base, bodies


def pair_body(
    base: Mapping[str, torch.Tensor], first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``theta_0 + tau_i + tau_j = theta_i + theta_j - theta_0`` on floating tensors; buffers from the base."""
    return {k: first[k] + second[k] - v if v.is_floating_point() else v for k, v in base.items()}


def interference(suite: TaskSuite, split: str = "validation") -> dict[str, Any]:
    """Per task ``i``: mean over ``j != i`` of ``L_i(theta_0 + tau_i + tau_j) - L_i(theta_0 + tau_i)`` on ``split``.

    Returns ``{"own": {i: L_i(theta_i)}, "pairs": {"i+j": L_i(theta_i + tau_j)}, "per_task": {i: mean increase},
    "mean": mean over tasks}``.
    """
    base, bodies = body_state_dicts(suite)
    body = suite.base_body()
    own, pairs = {}, {}
    for task in suite.tasks:
        body.load_state_dict(bodies[task])
        own[task] = suite.loss(body, task, split)
        for other in suite.tasks:
            if other != task:
                body.load_state_dict(pair_body(base, bodies[task], bodies[other]))
                pairs[f"{task}+{other}"] = suite.loss(body, task, split)
    per_task = {t: mean(pairs[f"{t}+{o}"] - own[t] for o in suite.tasks if o != t) for t in suite.tasks}
    return {"split": split, "own": own, "pairs": pairs, "per_task": per_task, "mean": mean(per_task.values())}


# -- merges -----------------------------------------------------------------------------------------------------------
def merge_rows(suite: TaskSuite, rows: SavedRows, methods: Sequence[str], calibration: int, seed: int) -> None:
    """Each method of ``methods`` tuned on validation and scored on test (skipping rows already saved)."""
    merger = suite.merger()
    if any(m in methods and m not in rows for m in ("sta", "sta_adamerging")):
        for task in suite.tasks:
            suite.importance(merger, task, calibration)
    for method in methods:
        if method in MERGE_GRIDS:
            grid = MERGE_GRIDS[method]
            if method in rows and rows[method].get("grid") == json.loads(json.dumps(grid)):
                continue
            examples = calibration if method == "sta" else 0
            row = method_runs.tuned_row(suite, merger, method, grid, examples_per_task=examples, learnable=0)
            rows[method] = {**row, "grid": grid}
        elif method in method_runs.DATA_AWARE_GRIDS and method not in rows:
            found: dict = {}
            method_runs.run_data_aware(
                suite, merger, found, calibration, {method: method_runs.DATA_AWARE_GRIDS[method]}
            )
            rows[method] = found[f"{method}_tuned"]
        elif method in method_runs.LEARNED and method not in rows:
            found = {}
            method_runs.run_learned(suite, merger, found, seed, {method: method_runs.LEARNED[method]})
            rows[method] = found[method]
        logger.info("%s s%d %s: %s", suite.optimizer, seed, method, rows[method]["test"])


def run_set(
    optimizer: str, rho: float | None, seed: int, tasks: Sequence[str], methods: Sequence[str], settings: Mapping
) -> dict:
    """Individual accuracy, interference and every merge of one optimizer's fine-tunes of one seed."""
    suite = make_suite(tasks, seed, optimizer, rho, settings)
    protocol = {
        "tasks": list(tasks),
        "optimizer": optimizer,
        "rho": suite.rho,
        "seed": seed,
        "models": {task: path.name for task, path in suite.model_dirs.items()},
        "calibration_samples": settings["calibration"],
        "scoring": "bf16 autocast" if suite.bf16 else "fp32",
        "split_limits": dict(suite.split_limits),
    }
    name = optimizer if suite.rho is None else f"{optimizer}{suite.rho:g}"
    rows = SavedRows(settings["results"] / f"{name}-s{seed}.json", protocol)
    rows.extra["fine_tunes"] = fine_tune_record(suite)  # read again each run (records only)
    if "individual" not in rows.extra:
        rows.extra["individual"] = {"test": suite.individual("test"), "validation": suite.individual("validation")}
        rows.save()
    if "interference" not in rows.extra:
        rows.extra["interference"] = interference(suite)
        rows.save()
        logger.info("%s s%d interference %.4f", optimizer, seed, rows.extra["interference"]["mean"])
    merge_rows(suite, rows, methods, settings["calibration"], seed)
    return scored_run(protocol, rows.extra, {m: rows[m] for m in methods})


def scored_run(protocol: dict, extra: Mapping, rows: Mapping[str, dict]) -> dict:
    """One set's record with each row's test ``average`` and ``normalized`` accuracy (by the set's own fine-tunes)."""
    individual = extra["individual"]["test"]
    for row in rows.values():
        row["average"] = mean(row["test"].values())
        row["normalized"] = normalized(row["test"], individual)
    return {"protocol": protocol, **extra, "rows": dict(rows)}


def saved_sets(results: Path, rhos: Mapping[str, float], seeds: Sequence[int]) -> dict[str, list[dict]]:
    """The sets saved under ``results`` (``--part table``): per optimizer, the runs of ``seeds`` that exist."""
    sets: dict[str, list[dict]] = {}
    for optimizer in OPTIMIZERS:
        name = optimizer if optimizer == "adamw" else f"{optimizer}{rhos[optimizer]:g}"
        for seed in seeds:
            path = results / f"{name}-s{seed}.json"
            if path.is_file():
                saved = json.loads(path.read_text())
                sets.setdefault(optimizer, []).append(scored_run(saved["protocol"], saved["extra"], saved["rows"]))
    return sets


# -- rho --------------------------------------------------------------------------------------------------------------
def rho_criterion(suite: TaskSuite) -> dict[str, Any]:
    """Validation: each fine-tune's own accuracy and the task-arithmetic merge at its best scaling (the criterion)."""
    merger = suite.merger()
    config, trials = method_runs.tune(
        suite, lambda **c: merger.merge(method="task_arithmetic", **c), MERGE_GRIDS["task_arithmetic"]
    )
    individual = suite.individual("validation")
    best = max(trial["validation"] for trial in trials)
    return {
        "individual_validation": individual,
        "individual_validation_mean": mean(individual.values()),
        "task_arithmetic": {"config": config, "trials": trials},
        "criterion": best,
    }


def choose_rho(entries: Mapping[str, Mapping], optimizer: str) -> float:
    """The ``rho`` of ``optimizer`` with the best criterion; ties go to the one nearest (in log scale) the default."""
    candidates = [(float(key.split("-")[1]), entry["criterion"]) for key, entry in entries.items()
                  if key.startswith(f"{optimizer}-")]  # fmt: skip
    if not candidates:
        raise ValueError(f"no rho of {optimizer} was evaluated")
    return max(candidates, key=lambda c: (round(c[1], 9), -abs(math.log(c[0] / DEFAULT_RHO[optimizer]))))[0]


def run_rho(tasks: Sequence[str], grid: Mapping[str, Sequence[float]], settings: Mapping, seed: int = 0) -> dict:
    """Seed ``seed``: every ``rho`` of the grid (and AdamW for reference) by :func:`rho_criterion`; saved per entry."""
    path = settings["results"] / "rho.json"
    protocol = {"tasks": list(tasks), "seed": seed, "criterion": "task_arithmetic validation mean, best scaling",
                "grid": MERGE_GRIDS["task_arithmetic"], "split_limits": dict(settings.get("split_limits", {}))}  # fmt: skip
    rows = SavedRows(path, protocol)
    for optimizer, rho in [("adamw", None)] + [(o, r) for o in grid for r in grid[o]]:
        key = f"{optimizer}-{rho:g}" if rho is not None else "adamw"
        suite = make_suite(tasks, seed, optimizer, rho, settings)
        models = {task: p.name for task, p in suite.model_dirs.items()}
        if key in rows and rows[key]["models"] == models:
            continue
        rows[key] = {"optimizer": optimizer, "rho": rho, "models": models, **rho_criterion(suite)}
        logger.info("rho %s: criterion %.4f", key, rows[key]["criterion"])
    chosen = {optimizer: choose_rho(rows, optimizer) for optimizer in grid}
    rows.extra["chosen"] = chosen
    rows.save()
    return {"protocol": protocol, "entries": dict(rows), "chosen": chosen}


# -- cost -------------------------------------------------------------------------------------------------------------
def step_cost(
    base: Path, task: str, rhos: Mapping[str, float], steps: int, rounds: int, settings: Mapping
) -> dict[str, Any]:
    """Seconds per training step (clipping at 1.0) of AdamW, SAM and ASAM on the same ``steps`` real batches of
    ``task`` (:func:`side_by_side_step_times`)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from benchmarks.tasks import label_names, load_task
    from hf_sta.training import FinetuneConfig, make_optimizer, text_classification_collator

    train = load_task(task, train_size=settings.get("train_size", 600))["train"]
    collate = text_classification_collator(AutoTokenizer.from_pretrained(base), max_length=128)
    batches = [collate([train[i] for i in range(k * 16, (k + 1) * 16)]) for k in range(steps)]
    runs = {}
    for optimizer in OPTIMIZERS:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(label_names(task))).train()
        runs[optimizer] = (model, make_optimizer(model, FinetuneConfig(optimizer=optimizer, rho=rhos.get(optimizer))))
    return {"task": task, "rho": dict(rhos), **side_by_side_step_times(runs, batches, rounds, max_grad_norm=1.0)}


def side_by_side_step_times(
    runs: Mapping[str, tuple[torch.nn.Module, torch.optim.Optimizer]],
    batches: Sequence[Mapping[str, Any]],
    rounds: int,
    max_grad_norm: float | None,
) -> dict[str, Any]:
    """Seconds per :func:`hf_sta.training.training_step` of each ``runs[optimizer] = (model, optimizer)`` (AdamW,
    SAM, ASAM) on the same ``batches``, the models stepping in turn, order rotated every round; round 0 warms up
    (allocations, caches) and is not counted. Ratios: median over rounds of SAM's (ASAM's) time over AdamW's."""
    from hf_sta.training import training_step

    names = list(runs)
    times: dict[str, dict[str, list[float]]] = {o: {"wall": [], "cpu": []} for o in names}
    for round_index in range(rounds + 1):
        shift = round_index % len(names)
        for optimizer in names[shift:] + names[:shift]:
            model, opt = runs[optimizer]
            wall, cpu = time.perf_counter(), time.process_time()
            for batch in batches:
                training_step(model, opt, batch, max_grad_norm=max_grad_norm)
                opt.zero_grad(set_to_none=True)
            if round_index:
                times[optimizer]["wall"].append((time.perf_counter() - wall) / len(batches))
                times[optimizer]["cpu"].append((time.process_time() - cpu) / len(batches))
    ratios = {
        f"{o}_over_adamw": {
            kind: statistics.median(a / b for a, b in zip(times[o][kind], times["adamw"][kind]))
            for kind in ("wall", "cpu")
        }
        for o in names
        if o != "adamw"
    }
    return {"steps_per_round": len(batches), "rounds": rounds, "ratios": ratios, "seconds_per_step": times,
            "threads": torch.get_num_threads()}  # fmt: skip


# -- summary ----------------------------------------------------------------------------------------------------------
def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}  # fmt: skip


def summarize(sets: Mapping[str, Sequence[dict]], methods: Sequence[str]) -> dict[str, Any]:
    """Mean ± std over seeds per optimizer and method, and the paired gap of SAM / ASAM to AdamW (same seeds). A
    method is summarised over the seeds whose set has its row (``n``)."""
    summary: dict[str, Any] = {}
    for optimizer, runs in sets.items():
        summary[optimizer] = {
            "seeds": [run["protocol"]["seed"] for run in runs],
            "rho": runs[0]["protocol"]["rho"],
            "individual": _stats([mean(run["individual"]["test"].values()) for run in runs]),
            "interference": _stats([run["interference"]["mean"] for run in runs]),
            "methods": {m: _method_stats([run for run in runs if m in run["rows"]], m) for m in methods},
        }
    for optimizer in (o for o in ("sam", "asam") if o in sets and "adamw" in sets):
        paired = _paired(sets["adamw"], sets[optimizer])
        gaps = {m: _gap(paired, m, "normalized") for m in methods}
        individual_gap = _stats([mean(b["individual"]["test"].values()) - mean(a["individual"]["test"].values())
                                 for a, b in paired])  # fmt: skip
        summary[optimizer]["vs_adamw"] = {
            "seeds": [a["protocol"]["seed"] for a, _ in paired],
            "normalized_gap": gaps,
            "average_gap": {m: _gap(paired, m, "average") for m in methods},
            "individual_gap": individual_gap,
            "merge_target_met": {m: gap["mean"] >= 0.03 for m, gap in gaps.items() if gap},
            "individual_target_met": abs(individual_gap["mean"]) <= 0.01,
        }
    return summary


def _method_stats(runs: Sequence[dict], method: str) -> dict[str, Any]:
    if not runs:
        return {}
    return {
        "normalized": _stats([run["rows"][method]["normalized"] for run in runs]),
        "average": _stats([run["rows"][method]["average"] for run in runs]),
        "configs": [run["rows"][method]["config"] for run in runs],
    }


def _gap(paired: Sequence[tuple[dict, dict]], method: str, key: str) -> dict[str, Any]:
    """Paired difference (second - first) of ``key`` over the seeds where both sets have ``method``'s row."""
    values = [b["rows"][method][key] - a["rows"][method][key] for a, b in paired
              if method in a["rows"] and method in b["rows"]]  # fmt: skip
    return _stats(values) if values else {}


def _paired(first: Sequence[dict], second: Sequence[dict]) -> list[tuple[dict, dict]]:
    by_seed = {run["protocol"]["seed"]: run for run in first}
    return [(by_seed[run["protocol"]["seed"]], run) for run in second if run["protocol"]["seed"] in by_seed]


def print_tables(result: dict) -> None:
    """Markdown: each optimizer's normalised (absolute) accuracy per method, then the paired gaps to AdamW."""
    summary, methods = result["summary"], result["methods"]
    tasks = next(iter(result["sets"].values()))[0]["protocol"]["tasks"]
    optimizers = list(summary)
    seeds = max(len(summary[o]["seeds"]) for o in optimizers)
    print(f"\nNormalised test accuracy of the {len(tasks)}-task merge, mean ± std over seeds (each optimizer normalised "
          f"by its own fine-tunes), absolute average in brackets; [n] when fewer than {seeds} seeds\n")  # fmt: skip
    label = {o: f"{o} (rho {summary[o]['rho']:g})" if summary[o]["rho"] is not None else o for o in optimizers}
    print("| method | " + " | ".join(label[o] for o in optimizers) + " |")
    print("|---" * (len(optimizers) + 1) + "|")
    print(
        "| individual (avg accuracy) | "
        + " | ".join(_cell(summary[o]["individual"], seeds) for o in optimizers)
        + " |"
    )
    for m in methods:
        cells = [summary[o]["methods"][m] for o in optimizers]
        print(f"| {m} | " + " | ".join(
            f"{_cell(c['normalized'], seeds)} ({c['average']['mean']:.3f})" if c else "—" for c in cells) + " |")  # fmt: skip
    print("| interference (loss increase) | "
          + " | ".join(_cell(summary[o]["interference"], seeds) for o in optimizers) + " |")  # fmt: skip
    against = [o for o in optimizers if "vs_adamw" in summary[o]]
    if against:
        print("\nPaired gap to AdamW (same seeds), points: normalised (absolute average)\n")
        print("| method | " + " | ".join(f"{o} - adamw" for o in against) + " |")
        print("|---" * (len(against) + 1) + "|")
        gap = lambda g: f"{100 * g['mean']:+.1f} ± {100 * g['std']:.1f}" if g else "—"  # noqa: E731
        print("| individual | " + " | ".join(gap(summary[o]["vs_adamw"]["individual_gap"]) for o in against) + " |")
        for m in methods:
            cells = [(summary[o]["vs_adamw"]["normalized_gap"][m], summary[o]["vs_adamw"]["average_gap"][m])
                     for o in against]  # fmt: skip
            print(f"| {m} | " + " | ".join(f"{gap(n)} ({gap(a)})" if n else "—" for n, a in cells) + " |")
    if "cost" in result:
        ratios = result["cost"]["ratios"]
        print("\nTime per training step over AdamW's (median of per-round ratios, side by side): " + ", ".join(
            f"{k}: wall {v['wall']:.2f}, cpu {v['cpu']:.2f}" for k, v in ratios.items()))  # fmt: skip


def _cell(stats: Mapping[str, Any], seeds: int) -> str:
    fewer = f" [{stats['n']}]" if stats.get("n", seeds) < seeds else ""
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}{fewer}"


# -- command line -----------------------------------------------------------------------------------------------------
def _settings(args: argparse.Namespace) -> dict[str, Any]:
    limits = dict(_split_limit(item) for item in args.split_limit)
    if not args.tiny:
        return {"calibration": args.calibration_samples, "results": RESULTS / _name(args), "split_limits": limits}
    work = args.work_dir
    return {
        "calibration": TINY["calibration"],
        "train_size": TINY["train_size"],
        "epochs": TINY["epochs"],
        "split_limits": {**TINY["split_limits"], **limits},
        "base_model": tiny_bert_base(work / "tiny-base"),
        "cache_dir": work / "cache",
        "results": work / "results",
    }


def _name(args: argparse.Namespace) -> str:
    """``sam``, or ``sam-<tag>`` for a reduced run (its own results folder and summary, next to the full run's)."""
    return f"sam-{args.tag}" if args.tag else "sam"


def _split_limit(item: str) -> tuple[str, int]:
    split, _, count = item.partition("=")
    if split not in ("validation", "test") or not count.isdigit() or int(count) < 1:
        raise SystemExit(f"--split-limit {item!r}: expected validation=N or test=N with N >= 1")
    return split, int(count)


def _chosen_rho(args: argparse.Namespace, settings: Mapping) -> dict[str, float]:
    path = settings["results"] / "rho.json"
    chosen = json.loads(path.read_text())["extra"]["chosen"] if path.is_file() else {}
    for optimizer, value in (("sam", args.rho_sam), ("asam", args.rho_asam)):
        if value is not None:
            chosen[optimizer] = value
        if optimizer not in chosen:
            raise SystemExit(f"no rho for {optimizer}: run --part rho first or pass --rho-{optimizer}")
    return chosen


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("rho", "merge", "cost", "all", "table"), required=True,
                        help="table: the summary and tables of the sets already saved (nothing is computed)")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=list(OPTIMIZERS),
        choices=OPTIMIZERS,
        help="the fine-tune sets merged (--part merge) and the rho grids run (--part rho)",
    )
    parser.add_argument("--methods", nargs="+", default=None, help=f"merge methods (default {DEFAULT_METHODS})")
    parser.add_argument("--rho-sam", type=float, default=None, help="skip the choice: SAM's rho")
    parser.add_argument("--rho-asam", type=float, default=None, help="skip the choice: ASAM's rho")
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--cost-task", default="movie_sentiment")
    parser.add_argument("--cost-steps", type=int, default=3)
    parser.add_argument("--cost-rounds", type=int, default=5)
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--tasks", nargs="+", default=None, choices=TASKS, help="a subset of the six tasks")
    parser.add_argument("--split-limit", nargs="+", default=[], metavar="SPLIT=N",
                        help="score on the first N examples of a split (validation=N, test=N): a cheaper run")  # fmt: skip
    parser.add_argument("--tag", default=None, help="a reduced run: results in results/sam-<tag>/ and sam-<tag>.json")
    parser.add_argument("--summary", type=Path, default=None,
                        help="the summary JSON (default results/sam[-<tag>].json), e.g. a table at other rho values")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="tiny BERT, 3 tasks, a few examples (what the test runs)")
    parser.add_argument("--work-dir", type=Path, default=Path("out/bench_sam_tiny"), help="--tiny: caches, results")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = _parser()
    args = parser.parse_args(argv)
    known = {*MERGE_GRIDS, *method_runs.DATA_AWARE_GRIDS, *method_runs.LEARNED}
    unknown = sorted(set(args.methods or ()) - known)
    if unknown:
        parser.error(f"--methods: unknown {unknown}; known: {sorted(known)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "transformers", "datasets", "hf_sta"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.num_threads)
    settings = _settings(args)
    settings["results"].mkdir(parents=True, exist_ok=True)
    tasks = list(args.tasks or (TINY["tasks"] if args.tiny else TASKS))
    methods = args.methods or (TINY["methods"] if args.tiny else DEFAULT_METHODS)
    summary_path = args.summary or (settings["results"].parent if args.tiny else RESULTS) / f"{_name(args)}.json"
    result = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if args.part in ("rho", "all"):
        grid = TINY["rho_grid"] if args.tiny else RHO_GRID
        result["rho"] = run_rho(tasks, {o: grid[o] for o in grid if o in args.optimizers}, settings)
    if args.part in ("cost", "all"):
        base = settings.get("base_model") or _minilm()
        steps, rounds = (1, 2) if args.tiny else (args.cost_steps, args.cost_rounds)
        task = tasks[0] if args.tiny else args.cost_task
        result["cost"] = step_cost(base, task, _chosen_rho(args, settings), steps, rounds, settings)
        (settings["results"] / "cost.json").write_text(json.dumps(result["cost"], indent=2) + "\n")
        logger.info("time per step over AdamW's: %s", result["cost"]["ratios"])
    if args.part in ("merge", "all"):
        rhos = _chosen_rho(args, settings)
        sets = {o: [run_set(o, rhos.get(o), s, tasks, methods, settings) for s in args.seeds] for o in args.optimizers}
        result.update(methods=list(methods), sets=sets, summary=summarize(sets, methods))
    if args.part == "table":
        sets = saved_sets(settings["results"], _chosen_rho(args, settings), args.seeds)
        result.update(methods=list(methods), sets=sets, summary=summarize(sets, methods))
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if "summary" in result:
        print_tables(result)
    return result


def _minilm() -> Path:
    from benchmarks.finetune import minilm_path

    return minilm_path()


if __name__ == "__main__":
    main()
