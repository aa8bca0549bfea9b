"""Unlearning benchmark: FUSED-style adapters, forgetting rules, and a federated setting (all offline, CPU).

``--part tasks`` (``benchmarks.unlearning_tasks``): forget each task of the six-task MiniLM STA merge (seed 0) in turn
with STA / negation forgetting under both scaling rules, a FUSED adapter and re-merging without the task; the target:
the forgotten task within 5 points of chance with the others >= 98% of their accuracy.

``--part federated`` (``benchmarks.unlearning_federated``): three sites fine-tune a common MiniLM start on private
sentiment shards and ship data vectors; each site in turn asks to be forgotten from the average merge: retraining,
pooled retraining, re-merge, subtraction, STA forgetting and FUSED, with forget / retain accuracy, a membership attack,
cost and reversibility.

    python -m benchmarks.bench_unlearning --part all --num-threads 1     # results/unlearning_{tasks,federated}.json
    python -m benchmarks.bench_unlearning --tiny                           # tiny BERTs, seconds, writes nothing

Per-task and per-site results are cached under ``results/unlearning/`` (reused while the protocol is unchanged), so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import unlearning_federated as federated
from benchmarks import unlearning_tasks as tasks_part

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("bench_unlearning")

FUSED_TASKS = dict(forget_loss="prior", goal_margin=0.02, max_steps=80, eval_steps=10, learning_rate=1e-3,
                   sensitivity_samples=64, batch_size=16)  # fmt: skip
FUSED_TASKS_TINY = dict(FUSED_TASKS, max_steps=6, eval_steps=2, sensitivity_samples=8, batch_size=8)
FUSED_FEDERATED = dict(forget_loss="none", max_steps=30, eval_steps=30, learning_rate=1e-3, sensitivity_samples=32,
                       batch_size=16, eval_samples=64)  # fmt: skip
FUSED_FEDERATED_TINY = dict(FUSED_FEDERATED, max_steps=4, eval_steps=4, sensitivity_samples=8, batch_size=8)
TINY_TASKS = ["tweet_sentiment", "product_sentiment", "subjectivity"]


def _environment() -> dict[str, Any]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "load_avg": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip


def run_tasks(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    if args.tiny:
        workload = tasks_part.tiny_workload(work / "tasks", args.tasks or TINY_TASKS)
    else:
        workload = tasks_part.real_workload()
    fused = FUSED_TASKS_TINY if args.tiny else FUSED_TASKS
    chosen = args.forget_tasks or workload.tasks
    results = [tasks_part.forget_task(workload, task, dict(fused)) for task in chosen]
    return {"tasks": workload.tasks, "forgotten": chosen, "fused": fused, "results": results,
            "summary": tasks_part.summarize(results), "environment": _environment()}  # fmt: skip


def _federation_settings(tiny: bool):
    from examples._common import Settings

    if tiny:
        return Settings(tiny=True, train_size=32, epochs=2, lr=3e-3, eval_size=32, seed=0, batch_size=8, max_length=32)
    return Settings(
        tiny=False, train_size=600, epochs=4, lr=1e-4, eval_size=None, seed=0, batch_size=16, max_length=128
    )


def run_federated(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from benchmarks.tasks import cache_root

    settings = _federation_settings(args.tiny)
    sizes = (
        {"shard": 24, "test": 16, "calibration": 8} if args.tiny else {"shard": 200, "test": 200, "calibration": 64}
    )
    protocol = {"settings": vars(settings) if hasattr(settings, "__dict__") else str(settings), "sizes": sizes,
                "sites": federated.SITES}  # fmt: skip
    root = (
        work / "federated" if args.tiny else cache_root() / "unlearning" / f"federated-{federated._digest(protocol)}"
    )
    federation = federated.build_federation(root, settings, sizes["shard"], sizes["test"], sizes["calibration"])
    fused = FUSED_FEDERATED_TINY if args.tiny else FUSED_FEDERATED
    cache = None if args.tiny else RESULTS / "unlearning" / "federated"
    variants = {"fused, whole remaining shards": (fused, None)}  # ablation: retain = every row of the other sites
    results = [
        federated.forget_site(federation, site, work / "merges", fused=dict(fused), calibration=sizes["calibration"],
                              pooled=True, cache=cache, protocol=protocol, variants=variants)
        for site in args.sites or federation.sites
    ]  # fmt: skip
    check = federated.determinism_check(federation, federation.sites[-1], federation.scorer.tokenizer)
    return {"protocol": protocol, "fused": fused, "results": results, "retrain_is_remerge": check,
            "site_train_seconds": federation.train_seconds, "environment": _environment()}  # fmt: skip


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def print_tasks(result: dict[str, Any]) -> None:
    print("\nForgetting each task of the six-task STA merge (test; chance = majority class; retention = others' mean "
          "accuracy / the merge's)\n")  # fmt: skip
    print("| task | method | chosen | target after | chance | gap | control retention | MIA AUC | meets |")
    print("|---|---|---|---|---|---|---|---|---|")
    for item in result["results"]:
        for method, row in item["rows"].items():
            chosen = (
                f"x{row['scaling']:g}"
                if row.get("scaling") is not None
                else (f"{row['steps']} steps" if "steps" in row else ("none allowed" if "scaling" in row else "—"))
            )
            print(f"| {item['task']} | {method} | {chosen} | {row['target']:.3f} | {row['chance']:.3f} | "
                  f"{row['gap']:+.3f} | {row['control_retention']:.3f} | {row['mia_auc']:.3f} | "
                  f"{'yes' if row['meets_target'] else 'no'} |")  # fmt: skip
    summary = result["summary"]
    print(f"\nTasks meeting the target with the best method: {summary['tasks_met']} of {len(result['results'])} "
          f"(without FUSED: {summary['tasks_met_without_fused']}); per method: {summary['meets_target']}; best per "
          f"task: {summary['best']}")  # fmt: skip


def print_federated(result: dict[str, Any]) -> None:
    print("\nFederated unlearning: forget one site from the average of three sites' data vectors\n")
    print("| site forgotten | method | forget acc (shard) | its source test acc | retain acc | MIA AUC | seconds | "
          "trainable params | examples | reversible |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for item in result["results"]:
        for method, row in item["rows"].items():
            cells = [row["forget_accuracy"], row["forget_source_test_accuracy"], row["retain_accuracy"],
                     row["mia_auc"], row["seconds"], row.get("trainable", ""), row.get("examples", ""),
                     row.get("reversible", "")]  # fmt: skip
            print(f"| {item['site']} | {method} | " + " | ".join(_cell(c) for c in cells) + " |")
        exact = item["sum_merge"]
        print(f"| {item['site']} | sum merge - tau_j vs sum merge of the others | max abs difference "
              f"{exact['max_abs_difference']:.2e} (largest weight {exact['largest_weight']:.2f}) |||||||")  # fmt: skip
    check = result["retrain_is_remerge"]
    print(f"\nRetraining site {check['site']} reproduces its shipped weights: bitwise {check['bitwise_equal']} "
          f"(max abs difference {check['max_abs_difference']:.2e}, {check['seconds']:.0f} s)")  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("tasks", "federated", "all"), default="all")
    parser.add_argument("--tiny", action="store_true", help="tiny BERTs built from configs: seconds, writes nothing")
    parser.add_argument("--tasks", nargs="+", default=None, help="--tiny: the tasks merged (default 3 small ones)")
    parser.add_argument("--forget-tasks", nargs="+", default=None, help="tasks to forget (default: all)")
    parser.add_argument("--sites", nargs="+", default=None, help="sites to forget (default: all)")
    parser.add_argument("--num-threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.tiny else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")  # fmt: skip
    for noisy in ("httpx", "transformers", "datasets", "hf_sta"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    output: dict[str, Any] = {}
    from examples._common import quiet

    with quiet() if args.tiny else contextlib.nullcontext(), tempfile.TemporaryDirectory(prefix="bench-unl-") as tmp:
        if args.part in ("tasks", "all"):
            output["tasks"] = run_tasks(args, Path(tmp))
            print_tasks(output["tasks"])
            if not args.tiny:
                (RESULTS / "unlearning_tasks.json").write_text(
                    json.dumps(output["tasks"], indent=2, default=str) + "\n"
                )
        if args.part in ("federated", "all"):
            output["federated"] = run_federated(args, Path(tmp))
            print_federated(output["federated"])
            if not args.tiny:
                path = RESULTS / "unlearning_federated.json"
                path.write_text(json.dumps(output["federated"], indent=2, default=str) + "\n")
    return output


if __name__ == "__main__":
    main()
