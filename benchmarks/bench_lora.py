"""LoRA benchmark: SmolLM2-135M-Instruct with one LoRA adapter per offline task, merged with STA, task arithmetic and
TIES, each merge scored on every task; then one task forgotten with a switchable LoRA adapter (issues #4 and #6).

Protocol (quoted in the README):

* Base: SmolLM2-135M-Instruct, fp32, dequantized once from the offline GGUF package (``benchmarks.smollm``).
* Tasks (default ``tweet_sentiment``, ``subjectivity``, ``news``; ``benchmarks.tasks`` fixed splits, seed 0) posed
  as instructions answered by one word (``examples.merge_lora_adapters.PROMPTS``, texts cut to ``--max-chars``
  200 characters), e.g. ``"Tweet: ...\\nSentiment (positive or negative):"``. A prediction is the answer word whose
  first token has the largest logit at the end of the prompt (the model's free text is never parsed).
* Adapters: PEFT LoRA, r=8, alpha 16, no dropout, on q/k/v/o of every layer; ``--steps`` 40 steps of batch 8 of the
  training split (<= 600 examples), AdamW lr 1e-3, loss on the answer token only, seed 0
  (``examples.merge_lora_adapters.train_adapter``). Cached under ``~/.cache/hf_sta/lora/<task>-<hash>/``, the hash
  covering every setting above, so re-runs only score.
* Task vectors: each adapter's dense update ``2 * B @ A`` of the four projections (``STAMerger(adapters=...)``);
  merges are evaluated in memory as full models (no SVD: the scores are the merge's own, not an approximation).
* STA importance: ``taylor`` (``|theta * g|``) at the task's adapted weights, on the first ``--calibration-samples``
  32 training prompts, micro-batches of 4, the same answer-token loss as training.
* Scoring: the first ``--validation-size`` 40 validation and ``--test-size`` 100 test examples of each task. Tuning
  picks the configuration with the best mean validation accuracy over the tasks (grids: ``GRIDS``); every number
  reported is test accuracy. Normalised accuracy = mean over tasks of merged accuracy / the task's own adapter's.
* Forgetting: ``--forget`` (default ``news``) is removed from the STA merge (defaults) with ``forget(method="sta",
  as_adapter=True)`` over the merged checkpoint (``STAMerger.from_task_vectors(merged, {task: adapter vector})``):
  scaling chosen on validation among ``FORGET_SCALINGS`` as in task negation (largest target drop with the other
  tasks >= 95% of their accuracy), the edit written as a PEFT adapter by truncated SVD keeping 99.9% of each
  module's squared singular values; reported: target test accuracy before / enabled / disabled, chance (majority
  class of the test examples), control retention; disabled must give exactly the merged model's scores.

    python -m benchmarks.bench_lora              # SmolLM2-135M: about an hour on a busy 2-core CPU
    python -m benchmarks.bench_lora --tiny       # tiny Llama from a config: seconds, writes nothing

Results: ``benchmarks/results/lora.json`` (not with ``--tiny``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import mean, normalized
from benchmarks.lora_methods import LABELS as NEW_LABELS
from benchmarks.lora_methods import run_new_methods
from benchmarks.tasks import cache_root, load_task
from examples._common import Settings, load_tokenizer, quiet
from examples.merge_lora_adapters import PROMPTS, TARGET_MODULES, Prompts, base_model, train_adapter
from hf_sta import STAMerger

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("bench_lora")

DEFAULT_TASKS = ("tweet_sentiment", "subjectivity", "news")
TINY_TASKS = ("tweet_sentiment", "subjectivity")
GRIDS = {
    "task_arithmetic": [{"scaling": s} for s in (0.5, 0.75, 1.0)],
    "ties": [{"density": d, "scaling": s} for d, s in ((0.2, 1.0), (0.2, 1.5), (0.5, 1.0))],
    "sta": [{"density": d, "scaling": s} for d, s in ((0.4, 1.0), (0.7, 1.0), (0.7, 1.5))],
}
FORGET_SCALINGS = (1.0, 2.0, 3.0)
FORGET_ENERGY = 0.999
LABELS = {
    "task_arithmetic": "task arithmetic (tuned)",
    "ties": "TIES (tuned)",
    "sta_default": "**STA, defaults (no tuning)**",
    "sta": "STA (tuned)",
}


def _environment(threads: int) -> dict[str, Any]:
    import peft
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "threads": threads,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "gpu": torch.cuda.is_available(),
    }


def adapter_key(task: str, base: Path, hyper: dict[str, Any]) -> str:
    """Cache key of one trained adapter: every setting that changes its weights."""
    payload = {"task": task, "prompt": PROMPTS[task], "base": base.name, "target_modules": TARGET_MODULES, **hyper}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def cached_adapter(task: str, base: Path, prompts: Prompts, train: Any, hyper: dict[str, Any], root: Path) -> Path:
    """Train ``task``'s adapter once (written to a temporary sibling, then renamed into place)."""
    folder = root / f"{task}-{adapter_key(task, base, hyper)}"
    if (folder / "adapter_config.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=root))
    try:
        args = argparse.Namespace(steps=hyper["steps"], batch_size=hyper["batch_size"], rank=hyper["rank"])
        settings = Settings(
            tiny=False,
            train_size=len(train),
            epochs=1,
            lr=hyper["lr"],
            eval_size=None,
            seed=hyper["seed"],
            batch_size=hyper["batch_size"],
            max_length=0,
        )
        optimizer = hyper.get("optimizer", "adamw")  # absent for AdamW: the keys of the adapters on record stay
        train_adapter(base, prompts, train, args, settings, tmp / "adapter", optimizer, hyper.get("rho"))
        (tmp / "adapter" / "hf_sta_lora_settings.json").write_text(json.dumps({"task": task, **hyper}, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp / "adapter", folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def calibration_loader(prompts: Prompts, train: Any, num_samples: int, micro_batch_size: int):
    """The first ``num_samples`` training prompts with their answers, loss on the answer token only (as trained)."""
    rows = train.select(range(min(num_samples, len(train))))

    def collate(items: list[dict]) -> dict[str, torch.Tensor]:
        return prompts.training_batch([i["text"] for i in items], [i["label"] for i in items])

    return torch.utils.data.DataLoader(list(rows), batch_size=micro_batch_size, shuffle=False, collate_fn=collate)


@dataclasses.dataclass
class LoraBench:
    """The benchmark's data as loaded by :func:`prepare`: the base folder, each task's splits (validation and test cut
    to their sizes) and prompts, and the majority-class accuracy of the test examples scored (``chance``)."""

    args: argparse.Namespace
    base: Path
    data: dict[str, dict[str, Any]]
    prompts: dict[str, Prompts]
    chance: dict[str, float]

    def scores(self, model: torch.nn.Module, split: str, tasks: list[str] | None = None) -> dict[str, Any]:
        """``{task: Scores}`` (accuracy and cross-entropy of the answer words) of ``model`` on ``split``."""
        return {t: self.prompts[t].score(model, self.data[t][split]) for t in tasks or self.args.tasks}

    def evaluate(self, model: torch.nn.Module, split: str, tasks: list[str] | None = None) -> dict[str, float]:
        return {t: scores.accuracy for t, scores in self.scores(model, split, tasks).items()}

    def load_base(self, folder: Path | None = None) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder or self.base, dtype=torch.float32)

    def hyper(self, seed: int | None = None, **extra: Any) -> dict[str, Any]:
        """The adapters' training settings (their cache key), with ``extra`` ones (``optimizer``, ``rho``)."""
        args = self.args
        return dict(steps=args.steps, batch_size=8, rank=args.rank, lr=args.lr,
                    seed=args.seed if seed is None else seed, max_chars=args.max_chars, train_size=args.train_size,
                    **extra)  # fmt: skip

    def adapters(self, hyper: dict[str, Any], work: Path) -> dict[str, Path]:
        """Each task's adapter trained with ``hyper`` (cached: under ``work`` with ``--tiny``, else the Hub cache's)."""
        cache = work / "lora" if self.args.tiny else cache_root() / "lora"
        return {t: cached_adapter(t, self.base, self.prompts[t], self.data[t]["train"], hyper, cache)
                for t in self.args.tasks}  # fmt: skip


def prepare(args: argparse.Namespace, work: Path) -> LoraBench:
    """Base model, splits and prompts of ``args.tasks`` (the protocol above)."""
    settings = Settings(
        tiny=args.tiny, train_size=0, epochs=1, lr=args.lr, eval_size=None, seed=args.seed, batch_size=8, max_length=0
    )
    base = base_model(settings, work)
    tokenizer = load_tokenizer(base)
    data, prompts, chance = {}, {}, {}
    for task in args.tasks:
        splits = load_task(task, train_size=args.train_size)
        data[task] = {
            "train": splits["train"],
            "validation": splits["validation"].select(range(args.validation_size)),
            "test": splits["test"].select(range(args.test_size)),
        }
        prompts[task] = Prompts(task, tokenizer, args.max_chars)
        labels = data[task]["test"]["label"]
        chance[task] = max(labels.count(label) for label in set(labels)) / len(labels)
    return LoraBench(args, base, data, prompts, chance)


def tune(score_merge: Callable[..., dict[str, float]], method: str, grid: list[dict]) -> dict[str, Any]:
    """The configuration of ``grid`` with the best mean validation accuracy, scored on test:
    ``{"config", "test": {task: accuracy}, "trials": [{"config", "validation"}]}``."""
    trials = []
    for config in grid:
        trials.append({"config": config, "validation": mean(score_merge("validation", method, **config).values())})
        logger.info("%s %s -> %.4f", method, config, trials[-1]["validation"])
    best = max(trials, key=lambda trial: trial["validation"])
    return {"config": best["config"], "test": score_merge("test", method, **best["config"]), "trials": trials}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - clock
        clock = now
        logger.info("%s done (%.0f s)", name, timings[name])

    loaded = prepare(args, work)
    base, data, prompts, chance = loaded.base, loaded.data, loaded.prompts, loaded.chance
    evaluate, load_base, hyper = loaded.evaluate, loaded.load_base, loaded.hyper()
    adapters = loaded.adapters(hyper, work)
    lap("adapters")

    merger = STAMerger.from_pretrained(base, adapters=adapters)
    if args.new_methods_only:
        rows, forgetting = previous_rows(args, hyper)
    else:
        rows, forgetting = tuned_rows(args, work, merger, adapters, prompts, data, evaluate, load_base, chance, lap)
    own = rows["individual"]["test"]
    bench = {
        "merger": merger,
        "tasks": args.tasks,
        "data": data,
        "prompts": prompts,
        "evaluate": evaluate,
        "load_base": load_base,
        "calibration": lambda t, size: calibration_loader(
            prompts[t], data[t]["train"], args.calibration_samples, size
        ),
        "calibration_samples": args.calibration_samples,
    }
    new_rows = run_new_methods(bench, args.tiny)  # after forgetting: Fisher replaces the tasks' taylor importance
    for row in new_rows.values():
        row["average"] = mean(row["test"].values())
        row["normalized"] = normalized(row["test"], own)
    lap("issue-13 methods")
    return {
        "tasks": args.tasks,
        "protocol": {
            "model": "tiny Llama" if args.tiny else "SmolLM2-135M-Instruct (fp32)",
            "adapter": {**hyper, "alpha": 2 * args.rank, "target_modules": TARGET_MODULES},
            "validation_size": args.validation_size,
            "test_size": args.test_size,
            "calibration_samples": args.calibration_samples,
            "importance": "taylor, answer-token loss",
            "grids": GRIDS,
            "forget_scalings": FORGET_SCALINGS,
            "forget_energy": FORGET_ENERGY,
        },
        "adapters": {t: str(p) for t, p in adapters.items()},
        "chance": chance,
        "rows": rows,
        "new_methods": new_rows,
        "forget": forgetting,
        "timings_s": timings,
        "environment": _environment(torch.get_num_threads()),
        "merger": merger,
    }


def tuned_rows(args, work: Path, merger: STAMerger, adapters, prompts, data, evaluate, load_base, chance, lap):
    """Base, individual adapters, the tuned task arithmetic / TIES / STA rows and the forgetting run."""
    from peft import PeftModel

    rows: dict[str, dict[str, Any]] = {}
    rows["base"] = {"config": {}, "test": evaluate(load_base(), "test")}
    logger.info("base: %s", rows["base"]["test"])
    own = {}
    for task, folder in adapters.items():
        own.update(evaluate(PeftModel.from_pretrained(load_base(), folder), "test", [task]))
    rows["individual"] = {"config": {}, "test": own}
    logger.info("individual: %s", own)
    lap("score base and adapters")

    for task in args.tasks:
        loader = calibration_loader(prompts[task], data[task]["train"], args.calibration_samples, 4)
        merger.compute_importance(task, loader, num_samples=args.calibration_samples, show_progress=False)
    lap("importance")

    def score_merge(split: str, method: str, **config: Any) -> dict[str, float]:
        return evaluate(merger.merge(method=method, **config), split)

    for method, grid in GRIDS.items():
        if method == "sta":
            rows["sta_default"] = {"config": {}, "test": score_merge("test", "sta")}
            logger.info("sta_default: %s", rows["sta_default"]["test"])
        rows[method] = tune(score_merge, method, grid)
        logger.info("%s tuned: %s", method, rows[method]["test"])
        lap(f"tune {method}")
    for row in rows.values():
        row["average"] = mean(row["test"].values())
        row["normalized"] = normalized(row["test"], own)

    forgetting = forget(args, work, merger, rows["sta_default"]["test"], evaluate, load_base, chance)
    lap("forget")
    return rows, forgetting


def previous_rows(args: argparse.Namespace, hyper: dict[str, Any]) -> tuple[dict, dict]:
    """The rows and forgetting run of the ``lora.json`` on record (``--new-methods-only``), refused when its adapters
    or splits were made with other settings than these."""
    saved = json.loads((RESULTS / "lora.json").read_text())
    protocol = saved["protocol"]
    expected = {**hyper, "alpha": 2 * args.rank, "target_modules": TARGET_MODULES}
    sizes = {k: getattr(args, k) for k in ("validation_size", "test_size", "calibration_samples")}
    if (
        saved["tasks"] != args.tasks
        or protocol["adapter"] != expected
        or any(protocol[k] != v for k, v in sizes.items())
    ):
        raise SystemExit(f"{RESULTS / 'lora.json'} was measured with other settings; run without --new-methods-only")
    return saved["rows"], saved["forget"]


def forget(args, work: Path, merger: STAMerger, merged_scores: dict[str, float], evaluate, load_base, chance) -> dict:
    """Forget ``args.forget`` from the STA merge (defaults) with a switchable LoRA adapter over the merged model."""
    from peft import PeftModel

    task = args.forget
    others = [t for t in args.tasks if t != task]
    merged_dir = merger.merge(method="sta", output_dir=work / "merged-sta", overwrite=True)
    over_merged = STAMerger.from_task_vectors(merged_dir, {task: merger.task_vectors[task]})
    over_merged.importance[task] = merger.importance[task]
    curve = over_merged.tune_forgetting(
        task,
        eval_fn=lambda model: evaluate(model, "validation", [task])[task],
        control_fn=lambda model: mean(evaluate(model, "validation", others).values()),
        scalings=FORGET_SCALINGS,
    )
    logger.info("forgetting curve: %s %s", curve.baseline, curve.points)
    scaling = curve.best_scaling if curve.best_scaling is not None else min(FORGET_SCALINGS)
    adapter_dir = over_merged.forget(
        task,
        scaling=scaling,
        as_adapter=True,
        energy=FORGET_ENERGY,
        output_dir=work / f"forget-{task}-adapter",
        overwrite=True,
    )
    report = over_merged.last_adapter_report.summary()
    switchable = PeftModel.from_pretrained(load_base(merged_dir), adapter_dir)
    enabled = evaluate(switchable, "test")
    with switchable.disable_adapter():
        disabled = evaluate(switchable, "test")
    return {
        "task": task,
        "from": "STA merge (defaults)",
        "method": "sta",
        "scaling": scaling,
        "chosen_on_validation": curve.best_scaling is not None,
        "curve": {"baseline": curve.baseline, "points": curve.points},
        "before": merged_scores,
        "enabled": enabled,
        "disabled": disabled,
        "disabled_equals_before": disabled == merged_scores,
        "chance": chance[task],
        "control_retention": mean(enabled[t] for t in others) / mean(merged_scores[t] for t in others),
        "adapter": {k: report[k] for k in ("modules", "rank_min", "rank_max", "relative_error_mean", "skipped")},
    }


def markdown(result: dict[str, Any]) -> str:
    tasks, rows = result["tasks"], result["rows"]
    lines = [
        "| model | chosen on validation | " + " | ".join(tasks) + " | average | normalised |",
        "|---" * (len(tasks) + 4) + "|",
    ]
    names = {"individual": "each task's own adapter", "base": "base model (zero-shot)", **LABELS}
    for key in ("individual", "base", "task_arithmetic", "ties", "sta_default", "sta"):
        row = rows[key]
        chosen = ", ".join(f"{k}={v:g}" for k, v in row["config"].items()) or "—"
        cells = " | ".join(f"{row['test'][t]:.3f}" for t in tasks)
        lines.append(f"| {names[key]} | {chosen} | {cells} | {row['average']:.3f} | {row['normalized']:.3f} |")
    for key, row in result["new_methods"].items():
        chosen = ", ".join(f"{k}={v:g}" for k, v in row["config"].items() if isinstance(v, int | float)) or "—"
        if key in ("adamerging", "dv_basi"):
            chosen = f"learned ({row['learnable']} coefficients)"
        cells = " | ".join(f"{row['test'][t]:.3f}" for t in tasks)
        lines.append(f"| {NEW_LABELS[key]} | {chosen} | {cells} | {row['average']:.3f} | {row['normalized']:.3f} |")
    lines += [
        "",
        "| method | examples / task | learnable | time / TA merge | learned step / plain fwd+bwd | peak RSS (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for key, row in result["new_methods"].items():
        step = row.get("seconds_per_step_over_plain")
        lines.append(
            f"| {key} | {row['examples_per_task']:g} | {row['learnable']} | {row['seconds_over_task_arithmetic']:.1f} "
            f"| {'' if step is None else f'{step:.2f}'} | {row['peak_rss_mb']:.0f} |"
        )
    f = result["forget"]
    lines += [
        "",
        f"Forgetting '{f['task']}' from the {f['from']} with a LoRA adapter (method {f['method']}, scaling "
        f"{f['scaling']:g}{' chosen on validation' if f['chosen_on_validation'] else ', none kept control >= 95%'}); "
        f"adapter: {f['adapter']['modules']} modules, rank {f['adapter']['rank_min']}-{f['adapter']['rank_max']}, "
        f"mean relative SVD error {f['adapter']['relative_error_mean']:.1e}",
        "",
        "| model | " + " | ".join(tasks) + " | chance (target) | control retention |",
        "|---" * (len(tasks) + 3) + "|",
    ]
    for name, key in (("merged (before)", "before"), ("forget adapter enabled", "enabled"), ("disabled", "disabled")):
        cells = " | ".join(f"{f[key][t]:.3f}" for t in tasks)
        retention = f"{f['control_retention']:.3f}" if key == "enabled" else "1.000" if key == "before" else "—"
        lines.append(f"| {name} | {cells} | {f['chance']:.3f} | {retention} |")
    lines.append(f"\ndisabled == before (exact): {f['disabled_equals_before']}")
    return "\n".join(lines)


PROTOCOL_DEFAULTS = {
    "steps": (40, 4, "training steps per adapter"),
    "rank": (8, 4, "LoRA rank"),
    "lr": (1e-3, 3e-3, "learning rate"),
    "train_size": (600, 32, "training pool per task"),
    "validation_size": (40, 16, "validation examples scored per task"),
    "test_size": (100, 16, "test examples scored per task"),
    "calibration_samples": (32, 8, "STA importance prompts per task"),
    "max_chars": (200, 120, "text kept per prompt"),
}
"""``argument: (default, --tiny default, help)`` of the settings the LoRA benchmarks share."""


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tasks``, the :data:`PROTOCOL_DEFAULTS` settings and ``--num-threads`` (shared with ``bench_sam_lora``)."""
    parser.add_argument("--tasks", nargs="+", default=None, choices=sorted(PROMPTS))
    for name, (real, small, text) in PROTOCOL_DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(real), default=None,
                            help=f"{text} (default {real:g}; {small:g} with --tiny)")  # fmt: skip
    parser.add_argument("--num-threads", type=int, default=1)


def fill_protocol_defaults(args: argparse.Namespace) -> None:
    """Fill the settings left unset (real or ``--tiny`` defaults); set up logging and torch's threads."""
    args.tasks = list(args.tasks or (TINY_TASKS if args.tiny else DEFAULT_TASKS))
    for name, (real, small, _) in PROTOCOL_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, small if args.tiny else real)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.WARNING if args.tiny else logging.INFO)
    for noisy in ("httpx", "transformers", "datasets", "hf_sta"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.num_threads)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny Llama from a config, few examples; writes nothing")
    parser.add_argument("--forget", default=None, help="task to forget (default: news, or the last task)")
    add_protocol_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep merged/adapter outputs here (default: temp)")
    parser.add_argument(
        "--new-methods-only",
        action="store_true",
        help="measure only the issue-13 methods; keep the other rows and the forgetting run of lora.json on record",
    )
    args = parser.parse_args(argv)
    tiny = args.tiny
    fill_protocol_defaults(args)
    args.forget = args.forget or ("news" if "news" in args.tasks else args.tasks[-1])
    if args.forget not in args.tasks:
        parser.error(f"--forget {args.forget} is not one of --tasks")
    started = time.perf_counter()
    with quiet(), tempfile.TemporaryDirectory(prefix="bench_lora-") as tmp:
        result = run(args, args.work_dir or Path(tmp))
    result["timings_s"]["total"] = time.perf_counter() - started
    print(markdown(result))
    print(f"\ntimings (s): {', '.join(f'{k} {v:.0f}' for k, v in result['timings_s'].items())}")
    if not tiny:
        RESULTS.mkdir(exist_ok=True)
        saved = {k: v for k, v in result.items() if k != "merger"}
        (RESULTS / "lora.json").write_text(json.dumps(saved, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
