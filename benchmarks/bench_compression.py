"""Compression benchmark: keep 2 or 3 tasks of the six-task MiniLM STA merge and prune it to 75% / 50% of its
non-embedding parameters (``STAMerger.compress``), against magnitude and random structured pruning at the same size.

Protocol (quoted in the README):

* Model: the STA merge (defaults) of the six MiniLM fine-tunes of seed 0 (``benchmarks.harness.TaskSuite``, STA
  importance: taylor on each task's first 128 training examples, as ``bench_merging``). Written once to
  ``<cache>/compression/``.
* Kept tasks: ``news + movie_sentiment`` and ``news + movie_sentiment + subjectivity`` (``--keep``).
* Compression: ``target`` 0.75 and 0.5 of the non-embedding parameters; MiniLM is a BERT, so only FFN neurons
  go (uniform ``intermediate_size``; heads cannot be removed). Rankings: ``taylor`` (group Taylor importance of
  each kept task with its own head on its first ``--calibration-samples`` training examples, normalised per task,
  mean-fused), ``magnitude`` (L1 of each neuron's rows/columns), ``random`` (seed 0). Recovery: none, or
  ``--recovery-steps`` distillation steps from the uncompressed merge on the same calibration examples (KL on
  logits at T=2 + MSE on the last hidden state, AdamW lr 5e-5, micro-batches of 8). ``--layers 4``: taylor rows that
  also drop whole layers (the 4 most important of 6 kept; the target then leaves wider FFNs), for latency.
* Accuracy: test split of each kept task with its own head, scored as every other benchmark (bf16 autocast);
  ``relative`` = mean over kept tasks of accuracy / the uncompressed merge's accuracy.
* Latency: the body's forward pass on CPU (fp32, ``--num-threads`` threads, default 1), sequence length 128, batch
  1 and 32, median of ``--repeats`` runs, the uncompressed and compressed models alternating run by run so that
  both see the same machine load. Size: non-embedding / all parameters, safetensors bytes.

Every row is cached in ``<cache>/compression/rows-seed0.json`` (reused under the same protocol), so the runs can be
split into pieces (``--keep``, ``--targets``, ``--methods``, ``--part``); each run rewrites
``benchmarks/results/compression.{json,md}`` from everything cached. ``--tiny``: a tiny BERT trained on a few dozen
examples (``examples._common``), seconds; writes nothing under ``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.finetune import torch_threads
from benchmarks.tasks import cache_root
from hf_sta import STAMerger
from hf_sta.compression import COMPRESSION_RECORD

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("bench_compression")

KEEP = ("news,movie_sentiment", "news,movie_sentiment,subjectivity")
TARGETS = (0.75, 0.5)
METHODS = ("taylor", "magnitude", "random")
TINY_TASKS = ("tweet_sentiment", "product_sentiment", "subjectivity")
TINY_TARGETS = (0.9, 0.75)  # the tiny BERT's FFN holds a third of its non-embedding parameters: 0.5 is unreachable


@dataclass
class Workload:
    """The merged model, its merger (task heads and configs), and how to calibrate and score a body."""

    merger: STAMerger
    merged_dir: Path
    calibration: Callable[[str], Any]
    evaluate: Callable[[torch.nn.Module, list[str]], dict[str, float]]
    protocol: dict[str, Any]
    cache: Path


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def real_workload(args: argparse.Namespace) -> Workload:
    """The six-task MiniLM suite of seed 0 and its STA merge (cached)."""
    from benchmarks.harness import TaskSuite
    from benchmarks.tasks import TASKS

    suite = TaskSuite(list(TASKS), seed=0).prepare()
    merger = suite.merger()
    for task in TASKS:
        suite.importance(merger, task, 128)
    models = {task: path.name for task, path in suite.model_dirs.items()}
    merged_dir = cache_root() / "compression" / f"sta-seed0-{_digest(models)}"
    if not (merged_dir / "config.json").is_file():
        merger.merge(method="sta", output_dir=merged_dir, overwrite=True)
    return Workload(
        merger=merger,
        merged_dir=merged_dir,
        calibration=lambda task: suite.calibration(task, args.calibration_samples),
        evaluate=lambda body, tasks: suite.evaluate(body, "test", tasks),
        protocol={"models": models, "scoring": "bf16 autocast" if suite.bf16 else "fp32"},
        cache=cache_root() / "compression" / "rows-seed0.json",
    )


def tiny_workload(args: argparse.Namespace, work: Path) -> Workload:
    """Tiny BERT fine-tunes of three tasks (``examples._common``), their STA merge, 32 test examples per task."""
    from examples._common import Settings, finetuned_models, load_splits, load_tokenizer, read_head, score_body

    settings = Settings(tiny=True, train_size=32, epochs=2, lr=3e-3, eval_size=32, seed=0, batch_size=8, max_length=32)
    base, models = finetuned_models(TINY_TASKS, settings, work)
    data = {task: load_splits(task, settings) for task in TINY_TASKS}
    tokenizer = load_tokenizer(base)
    heads = {task: read_head(folder) for task, folder in models.items()}
    merger = STAMerger.from_pretrained(base, models)
    for task in TINY_TASKS:
        merger.compute_importance(task, data[task]["train"], num_samples=16, max_length=32, show_progress=False)
    merged_dir = merger.merge(method="sta", output_dir=work / "merged", overwrite=True)

    def evaluate(body, tasks):
        return {t: score_body(body, heads[t], data[t]["test"], tokenizer, 32).accuracy for t in tasks}

    return Workload(merger, merged_dir, lambda task: data[task]["train"], evaluate, {"models": "tiny"},
                    work / "rows.json")  # fmt: skip


class CachedRows(dict):
    """Rows saved to ``path`` with the protocol each time one is added; reused only under the same protocol."""

    def __init__(self, path: Path, protocol: dict) -> None:
        saved = json.loads(path.read_text()) if path.is_file() else {}
        same = saved.get("protocol") == json.loads(json.dumps(protocol, default=str))
        super().__init__(saved.get("rows", {}) if same else {})
        self.path, self.protocol = path, protocol

    def __setitem__(self, key: str, value: dict) -> None:
        super().__setitem__(key, value)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"protocol": self.protocol, "rows": dict(self)}, default=str) + "\n")


def _safetensors_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def compress_row(
    workload: Workload, keep: list[str], target: float, method: str, steps: int, args, layers: int | None = None
) -> dict:
    """Compress, write, reload with ``AutoModel`` and score one configuration (``layers``: whole layers kept)."""
    from transformers import AutoModel

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-compression-") as tmp:
        folder = workload.merger.compress(
            workload.merged_dir, keep_tasks=keep, data={t: workload.calibration(t) for t in keep}, target=target,
            importance=method, recovery_steps=steps, num_samples=args.calibration_samples, max_length=args.max_length,
            seed=args.seed, recovery_lr=args.recovery_lr, num_hidden_layers=layers, output_dir=Path(tmp) / "out",
            show_progress=False,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        record = json.loads((folder / COMPRESSION_RECORD).read_text())
        body = AutoModel.from_pretrained(folder)
        accuracy = workload.evaluate(body, keep)
    return {
        "keep": keep,
        "target": target,
        "method": method,
        "recovery_steps": steps,
        "num_hidden_layers": record["compressed"]["num_hidden_layers"],
        "accuracy": accuracy,
        "seconds": seconds,
        "recovery": record["recovery"],
        "size": {k: record["compressed"][k] for k in ("non_embedding_parameters", "parameters", "intermediate_size")},
        "kept_fraction": record["kept_fraction"],
        "file_size_bytes": record["file_size_bytes"],
    }


def run_rows(workload: Workload, rows: CachedRows, args) -> None:
    from transformers import AutoModel

    merged = None
    for keep_text in args.keep:
        keep = keep_text.split(",")
        key = f"{keep_text}|uncompressed"
        if key not in rows:
            merged = merged or AutoModel.from_pretrained(workload.merged_dir)
            rows[key] = {"keep": keep, "method": "uncompressed", "accuracy": workload.evaluate(merged, keep),
                         "file_size_bytes": _safetensors_bytes(workload.merged_dir)}  # fmt: skip
        for target in args.targets:
            for method in args.methods:
                for steps in sorted({0, args.recovery_steps}):
                    key = f"{keep_text}|{target}|{method}|r{steps}"
                    if key not in rows:
                        logger.info("row %s", key)
                        rows[key] = compress_row(workload, keep, target, method, steps, args)
                for layers in args.layers:  # taylor with whole layers removed too: the widths left are wider
                    for steps in sorted({0, args.recovery_steps}):
                        key = f"{keep_text}|{target}|taylor|r{steps}|L{layers}"
                        if key not in rows:
                            logger.info("row %s", key)
                            rows[key] = compress_row(workload, keep, target, "taylor", steps, args, layers)


@torch.inference_mode()
def _median_ms(model: torch.nn.Module, inputs: dict, reference: torch.nn.Module, repeats: int) -> tuple[float, float]:
    """Median wall time (ms) of ``model`` and ``reference`` on ``inputs``, alternating run by run (2 warm-ups)."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for index in range(repeats + 2):
        for which, net in enumerate((reference, model)):
            started = time.perf_counter()
            net(**inputs)
            if index >= 2:
                times[which].append(1000 * (time.perf_counter() - started))
    return statistics.median(times[0]), statistics.median(times[1])


def run_latency(workload: Workload, rows: CachedRows, args) -> None:
    """Latency depends only on the widths (the same for every ranking and kept-task set at one target)."""
    from transformers import AutoModel

    reference = AutoModel.from_pretrained(workload.merged_dir).eval()
    first_task = args.keep[0].split(",")[0]
    for target, layers in [(t, n) for t in args.targets for n in (None, *args.layers)]:
        key = f"latency|{target}|threads{args.num_threads}" + (f"|L{layers}" if layers else "")
        if key in rows:
            continue
        model = workload.merger.compress(workload.merged_dir, keep_tasks=[first_task], importance="magnitude",
                                         target=target, num_hidden_layers=layers, show_progress=False).eval()  # fmt: skip
        result = {"target": target, "threads": torch.get_num_threads(), "seq_len": args.seq_len, "batches": {},
                  "num_hidden_layers": model.config.num_hidden_layers,
                  "intermediate_size": model.config.intermediate_size}  # fmt: skip
        for batch in (1, 32):
            generator = torch.Generator().manual_seed(batch)
            ids = torch.randint(1000, 2000, (batch, args.seq_len), generator=generator)
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            original, compressed = _median_ms(model, inputs, reference, args.repeats)
            result["batches"][str(batch)] = {"original_ms": original, "compressed_ms": compressed,
                                             "speedup": original / compressed}  # fmt: skip
        rows[key] = result


def summarize(rows: dict[str, dict]) -> dict[str, Any]:
    """Relative accuracy (mean over kept tasks of accuracy / uncompressed merge accuracy) and the issue's targets."""
    summary: dict[str, Any] = {}
    for key, row in rows.items():
        if key.startswith("latency") or row.get("method") == "uncompressed":
            continue
        merged = rows[f"{','.join(row['keep'])}|uncompressed"]["accuracy"]
        row["relative"] = statistics.mean(row["accuracy"][t] / merged[t] for t in row["keep"])
        row["mean_accuracy"] = statistics.mean(row["accuracy"].values())
    checks = []
    for key, row in rows.items():
        if row.get("method") != "taylor" or "|L" in key:
            continue
        others = [rows.get(key.replace("|taylor|", f"|{m}|")) for m in ("magnitude", "random")]
        margin = min((row["mean_accuracy"] - o["mean_accuracy"]) * 100 for o in others if o) if any(others) else None
        checks.append({"row": key, "relative": row["relative"], "points_over_baselines": margin})
    summary["taylor"] = checks
    return summary


def markdown(rows: dict[str, dict]) -> str:
    lines = ["| kept tasks | target | ranking | layers | recovery | mean acc. | relative to merge | non-emb. params | "
             "intermediate | MiB |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, row in sorted(rows.items()):
        if key.startswith("latency"):
            continue
        mib = f"{row['file_size_bytes'] / 2**20:.1f}"
        if row["method"] == "uncompressed":
            mean = statistics.mean(row["accuracy"].values())
            lines.append(
                f"| {'+'.join(row['keep'])} | 1.0 | uncompressed | all | - | {mean:.3f} | 1.000 | - | - | {mib} |"
            )
            continue
        lines.append(
            f"| {'+'.join(row['keep'])} | {row['target']} | {row['method']} | {row['num_hidden_layers']} | "
            f"{row['recovery_steps']} | {row['mean_accuracy']:.3f} | {row['relative']:.3f} | "
            f"{row['size']['non_embedding_parameters']:,} | {row['size']['intermediate_size']} | {mib} |"
        )
    lines += ["", "| target | layers | intermediate | threads | batch | uncompressed ms | compressed ms | speedup |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, row in sorted(rows.items()):
        if key.startswith("latency"):
            for batch, t in row["batches"].items():
                lines.append(f"| {row['target']} | {row['num_hidden_layers']} | {row['intermediate_size']} | "
                             f"{row['threads']} | {batch} | {t['original_ms']:.1f} | "
                             f"{t['compressed_ms']:.1f} | {t['speedup']:.2f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("rows", "latency", "all", "report"), default="all")
    parser.add_argument("--keep", nargs="+", default=None, help="comma-separated kept-task sets (default: 2 and 3)")
    parser.add_argument("--targets", nargs="+", type=float, default=None, help="default 0.75 0.5 (tiny: 0.9 0.75)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--calibration-samples", type=int, default=None, help="per kept task (default 256; 16 tiny)")
    parser.add_argument("--recovery-steps", type=int, default=None, help="default 200 (tiny: 4)")
    parser.add_argument("--recovery-lr", type=float, default=5e-5)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=None, help="latency sequence length (default 128; 16 tiny)")
    parser.add_argument("--repeats", type=int, default=None, help="latency runs per model (default 10; 2 tiny)")
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--layers", nargs="*", type=int, default=None,
                        help="also taylor rows keeping this many whole layers (default 4 of 6; tiny: 1 of 2)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny BERT, seconds; writes nothing under results/")
    parser.add_argument("--work-dir", type=Path, default=None, help="--tiny: where the tiny models go (default tmp)")
    args = parser.parse_args(argv)
    tiny = args.tiny
    args.keep = args.keep or ([",".join(TINY_TASKS[:2])] if tiny else list(KEEP))
    args.targets = args.targets or list(TINY_TARGETS if tiny else TARGETS)
    args.layers = args.layers if args.layers is not None else ([1] if tiny else [4])
    for name, real, small in (("calibration_samples", 256, 16), ("recovery_steps", 200, 4), ("seq_len", 128, 16),
                              ("repeats", 10, 2)):  # fmt: skip
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else real)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.tiny else logging.INFO, format="%(asctime)s %(message)s")
    with torch_threads(args.num_threads), tempfile.TemporaryDirectory(prefix="bench-compression-tiny-") as tmp:
        workload = tiny_workload(args, args.work_dir or Path(tmp)) if args.tiny else real_workload(args)
        protocol = {**workload.protocol, "merged": workload.merged_dir.name, "seed": args.seed,
                    "calibration_samples": args.calibration_samples, "max_length": args.max_length,
                    "recovery_lr": args.recovery_lr, "repeats": args.repeats,
                    "seq_len": args.seq_len}  # fmt: skip
        rows = CachedRows(workload.cache, protocol)
        if args.part in ("rows", "all"):
            run_rows(workload, rows, args)
        if args.part in ("latency", "all"):
            run_latency(workload, rows, args)
    result = {
        "protocol": protocol,
        "rows": dict(rows),
        "summary": summarize(rows),
        "environment": {
            "torch": torch.__version__,
            "machine": platform.machine(),
            "load_avg": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d"),
        },  # fmt: skip
    }
    table = markdown(rows)
    print(table)
    if not args.tiny:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "compression.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        (RESULTS / "compression.md").write_text(table)
    return result


if __name__ == "__main__":
    main()
