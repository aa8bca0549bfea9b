"""Fine-tuning for mergeability on LoRA (issue 14): SmolLM2-135M adapters trained with AdamW, SAM and ASAM, merged.

Protocol (quoted in the README):

* ``benchmarks.bench_lora``'s protocol: SmolLM2-135M-Instruct (fp32), ``tweet_sentiment``, ``subjectivity`` and
  ``news`` posed as one-word instructions, PEFT LoRA r=8 / alpha 16 on q/k/v/o, 40 steps of batch 8, AdamW lr 1e-3,
  loss on the answer token, the first 40 validation and 100 test examples per task, 32 calibration prompts. The
  AdamW adapters are ``bench_lora``'s own (same cache key), seed 0 as on record.
* SAM / ASAM wrap the same AdamW (:class:`hf_sta.training.SAM`; only the adapter's parameters require gradients, so
  only they are perturbed), ``rho`` at the authors' defaults (SAM 0.05, ASAM 0.5) unless ``--rho-sam`` /
  ``--rho-asam``; the same seeds (adapter initialisation, batch order) for the three optimizers.
* Merges: each method of :data:`METHODS` (``bench_lora``'s task arithmetic / TIES / STA grids, the two-point
  TSV-M / Iso-C grids of ``benchmarks.lora_methods``, and Iso-C with ``rank_tolerance=1e-3`` at scaling 1 / 2) tuned
  on validation, scored on test; normalised accuracy is divided by that optimizer's own adapters' accuracy.
* Interference: for each ordered pair of tasks ``(i, j)``, the cross-entropy of task ``i``'s answer words on its
  validation examples at ``theta_0 + tau_i + tau_j`` minus at ``theta_0 + tau_i`` (``tau`` = the adapter's dense
  update), averaged over ``j`` per task, then over tasks (as ``bench_sam``).
* ``rho`` (``--part rho``, seed 0): AdamW and every ``rho`` of ``bench_sam.RHO_GRID`` (SAM 0.02 / 0.05 / 0.1, ASAM
  0.2 / 0.5 / 1.0), each set's task-arithmetic merge tuned on validation; the chosen ``rho`` maximises its best mean
  *validation* accuracy (MiniLM's criterion, :func:`bench_sam.choose_rho`; ties go to the default). It is written to
  ``sam_lora/rho.json`` and passed to ``--part merge`` as ``--rho-sam`` / ``--rho-asam``.
* Cost: seconds per training step of the three optimizers side by side (``bench_sam.side_by_side_step_times``) on
  ``--cost-steps`` batches of the first task, ``--cost-rounds`` rounds.

    python -m benchmarks.bench_sam_lora --part rho          # SmolLM2-135M, seed 0: the choice of rho
    python -m benchmarks.bench_sam_lora --seeds 0 1 2 --rho-sam R --rho-asam R
    python -m benchmarks.bench_sam_lora --tiny --work-dir DIR   # tiny Llama from a config: seconds

Results: ``benchmarks/results/sam_lora.json`` (``--summary``: another path) and one resumable file per optimizer and seed in
``benchmarks/results/sam_lora/`` (``--tiny``: under ``--work-dir``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import bench_sam
from benchmarks.bench_lora import (
    GRIDS,
    LoraBench,
    add_protocol_arguments,
    calibration_loader,
    fill_protocol_defaults,
    logger,
    prepare,
    tune,
)
from benchmarks.harness import SavedRows, mean
from benchmarks.lora_methods import DATA_FREE
from examples._common import quiet
from hf_sta import STAMerger

RESULTS = Path(__file__).resolve().parent / "results"
METHODS: dict[str, list[dict]] = {
    **GRIDS,
    "tsv": DATA_FREE["tsv"],
    "iso_c": DATA_FREE["iso_c"],
    "iso_c_lowrank": [{"scaling": s, "rank_tolerance": 1e-3} for s in (1.0, 2.0)],
}
"""Validation grids of the merge methods run on each set of adapters (``iso_c_lowrank``: Iso-C flattening only the
summed update's numerical rank, ``rank_tolerance=1e-3``)."""
VARIANTS = {"iso_c_lowrank": "iso_c"}
"""Rows that are a registered method with other parameters."""


def set_hyper(loaded: LoraBench, optimizer: str, rho: float | None, seed: int) -> dict[str, Any]:
    """The adapters' settings: ``bench_lora``'s for AdamW (the same cache key), plus ``optimizer`` and ``rho``."""
    extra = {} if optimizer == "adamw" else {"optimizer": optimizer, "rho": rho}
    return loaded.hyper(seed, **extra)


def individual(loaded: LoraBench, adapters: dict[str, Path], split: str) -> dict[str, float]:
    """Each task's accuracy with its own adapter (PEFT's forward, not a merge)."""
    from peft import PeftModel

    return {t: loaded.evaluate(PeftModel.from_pretrained(loaded.load_base(), adapters[t]), split, [t])[t]
            for t in adapters}  # fmt: skip


def interference(loaded: LoraBench, merger: STAMerger, split: str = "validation") -> dict[str, Any]:
    """Per task ``i``: mean over ``j != i`` of ``L_i(theta_0 + tau_i + tau_j) - L_i(theta_0 + tau_i)`` on ``split``.

    Returns ``{"own": {i: loss}, "pairs": {"i+j": loss}, "per_task": {i: mean increase}, "mean"}``.
    """
    tasks = loaded.args.tasks

    def loss(task: str, members: list[str]) -> float:
        model = merger.merge(method="task_arithmetic", scaling=1.0, tasks=members)
        return loaded.scores(model, split, [task])[task].loss

    own = {t: loss(t, [t]) for t in tasks}
    pairs = {f"{t}+{o}": loss(t, [t, o]) for t in tasks for o in tasks if o != t}
    per_task = {t: mean(pairs[f"{t}+{o}"] - own[t] for o in tasks if o != t) for t in tasks}
    return {"split": split, "own": own, "pairs": pairs, "per_task": per_task, "mean": mean(per_task.values())}


def run_set(
    loaded: LoraBench, optimizer: str, rho: float | None, seed: int, methods: Sequence[str], work: Path, results: Path
) -> dict[str, Any]:
    """Individual accuracy, interference and every merge of ``methods`` of one optimizer's adapters of one seed
    (saved after each step: an interrupted run resumes)."""
    args = loaded.args
    adapters = loaded.adapters(set_hyper(loaded, optimizer, rho, seed), work)
    protocol = {
        "tasks": list(args.tasks),
        "optimizer": optimizer,
        "rho": rho,
        "seed": seed,
        "adapters": {t: p.name for t, p in adapters.items()},
        "sizes": {k: getattr(args, k) for k in ("validation_size", "test_size", "calibration_samples")},
    }
    name = optimizer if rho is None else f"{optimizer}{rho:g}"
    rows = SavedRows(results / f"{name}-s{seed}.json", protocol)
    merger = STAMerger.from_pretrained(loaded.base, adapters=adapters)
    if "individual" not in rows.extra:
        rows.extra["individual"] = {s: individual(loaded, adapters, s) for s in ("test", "validation")}
        rows.save()
    if "interference" not in rows.extra:
        rows.extra["interference"] = interference(loaded, merger)
        rows.save()
        logger.info("%s s%d interference %.4f", optimizer, seed, rows.extra["interference"]["mean"])
    if "sta" in methods and "sta" not in rows:
        for task in args.tasks:
            data = calibration_loader(loaded.prompts[task], loaded.data[task]["train"], args.calibration_samples, 4)
            merger.compute_importance(task, data, num_samples=args.calibration_samples, show_progress=False)

    def score(split: str, method: str, **config: Any) -> dict[str, float]:
        return loaded.evaluate(merger.merge(method=VARIANTS.get(method, method), **config), split)

    for method in methods:
        if method not in rows:
            rows[method] = tune(score, method, METHODS[method])
            logger.info("%s s%d %s: %s", optimizer, seed, method, rows[method]["test"])
    return bench_sam.scored_run(protocol, rows.extra, {m: rows[m] for m in methods})


def run_rho(
    loaded: LoraBench, grid: dict[str, Sequence[float]], work: Path, results: Path, seed: int = 0
) -> dict[str, Any]:
    """Seed ``seed``: AdamW (reference) and each ``rho`` of ``grid`` scored by the best mean validation accuracy of
    its adapters' task-arithmetic merge (each set's file is the one ``--part merge`` extends); the choice per
    optimizer by :func:`bench_sam.choose_rho`. Returns (and writes to ``results/rho.json``)
    ``{"protocol", "entries": {"adamw" | "<optimizer>-<rho>": {...}}, "chosen": {optimizer: rho}}``."""
    entries: dict[str, dict[str, Any]] = {}
    for optimizer, rho in [("adamw", None)] + [(o, r) for o in grid for r in grid[o]]:
        run = run_set(loaded, optimizer, rho, seed, ["task_arithmetic"], work, results)
        individual, key = run["individual"]["validation"], "adamw" if rho is None else f"{optimizer}-{rho:g}"
        entries[key] = {
            "optimizer": optimizer,
            "rho": rho,
            "adapters": run["protocol"]["adapters"],
            "individual_validation_mean": mean(individual.values()),
            "task_arithmetic": run["rows"]["task_arithmetic"]["trials"],
            "criterion": max(trial["validation"] for trial in run["rows"]["task_arithmetic"]["trials"]),
        }
        logger.info("rho %s: criterion %.4f", key, entries[key]["criterion"])
    protocol = {"tasks": list(loaded.args.tasks), "seed": seed, "grid": {o: list(r) for o, r in grid.items()},
                "criterion": "task_arithmetic validation mean, best scaling", "scalings": METHODS["task_arithmetic"]}  # fmt: skip
    result = {"protocol": protocol, "entries": entries,
              "chosen": {o: bench_sam.choose_rho(entries, o) for o in grid}}  # fmt: skip
    (results / "rho.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def step_cost(loaded: LoraBench, rhos: dict[str, float | None], steps: int, rounds: int) -> dict[str, Any]:
    """Seconds per training step of AdamW, SAM and ASAM adapters on the same ``steps`` batches of the first task."""
    from examples.merge_lora_adapters import adapter_optimizer, lora_model

    args, task = loaded.args, loaded.args.tasks[0]
    train, prompts = loaded.data[task]["train"], loaded.prompts[task]
    batches = [prompts.training_batch(train[k * 8 : (k + 1) * 8]["text"], train[k * 8 : (k + 1) * 8]["label"])
               for k in range(steps)]  # fmt: skip
    runs = {}
    for optimizer in bench_sam.OPTIMIZERS:
        model = lora_model(loaded.base, args.rank, seed=0).train()
        runs[optimizer] = (model, adapter_optimizer(model, args.lr, optimizer, rhos.get(optimizer)))
    result = bench_sam.side_by_side_step_times(runs, batches, rounds, max_grad_norm=None)
    return {"task": task, "rho": rhos, **result}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny Llama from a config, few examples")
    parser.add_argument("--part", choices=("rho", "merge"), default="merge",
                        help="rho: seed 0 of every rho of the grid, the choice; merge: --seeds x --optimizers sets")  # fmt: skip
    add_protocol_arguments(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--optimizers", nargs="+", default=list(bench_sam.OPTIMIZERS), choices=bench_sam.OPTIMIZERS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--rho-sam", type=float, default=bench_sam.DEFAULT_RHO["sam"])
    parser.add_argument("--rho-asam", type=float, default=bench_sam.DEFAULT_RHO["asam"])
    parser.add_argument("--cost-steps", type=int, default=3)
    parser.add_argument("--cost-rounds", type=int, default=5)
    parser.add_argument("--work-dir", type=Path, default=None, help="merged outputs, --tiny caches and results")
    parser.add_argument("--summary", type=Path, default=None,
                        help="the summary JSON (default results/sam_lora.json), e.g. a table at other rho values")  # fmt: skip
    args = parser.parse_args(argv)
    fill_protocol_defaults(args)
    args.seed = 0  # bench_lora's: the tiny Llama's initialisation (each set's adapters take their own seed)
    if args.tiny and args.work_dir is None:
        parser.error("--tiny needs --work-dir (its adapters and results are written there)")
    rhos = {"adamw": None, "sam": args.rho_sam, "asam": args.rho_asam}
    with quiet(), tempfile.TemporaryDirectory(prefix="bench_sam_lora-") as tmp:
        work = args.work_dir or Path(tmp)
        results = work / "results" if args.tiny else RESULTS / "sam_lora"
        results.mkdir(parents=True, exist_ok=True)
        loaded = prepare(args, work)
        if args.part == "rho":
            grid = bench_sam.TINY["rho_grid"] if args.tiny else bench_sam.RHO_GRID
            rho = run_rho(loaded, {o: grid[o] for o in args.optimizers if o in grid}, work, results)
            print(json.dumps({key: round(e["criterion"], 4) for key, e in rho["entries"].items()}), rho["chosen"])
            return rho
        sets = {o: [run_set(loaded, o, rhos[o], s, args.methods, work, results) for s in args.seeds]
                for o in args.optimizers}  # fmt: skip
        result: dict[str, Any] = {"methods": args.methods, "sets": sets}
        result["summary"] = bench_sam.summarize(sets, args.methods)
        steps, rounds = (1, 1) if args.tiny else (args.cost_steps, args.cost_rounds)
        result["cost"] = step_cost(loaded, rhos, steps, rounds)
    (args.summary or results.parent / "sam_lora.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    bench_sam.print_tables(result)
    return result


if __name__ == "__main__":
    main()
