"""Compression benchmark (issue 15): keep some tasks of a multi-task merge, prune what they need least
(``STAMerger.compress``), against magnitude and random structured pruning at the same size, with and without recovery.

Protocol (quoted in the README):

* ``minilm``: the STA merge (elect, density 0.7, scaling 1: :data:`benchmarks.harness.STA_MERGE`) of the six MiniLM fine-tunes of seed 0 (``benchmarks.harness.TaskSuite``; STA
  importance: taylor on each task's first 128 training examples, as ``bench_merging``), cached under
  ``<cache>/compression/``. Kept tasks: the 2 and the 3 tasks the merge serves best on validation (accuracy minus
  the majority-class rate, ``served_margins``; a task the merge has lost leaves nothing to compress for).
  Sizes: ``target`` 0.75 and 0.5 of the non-embedding parameters. MiniLM is a BERT (``head_dim = hidden_size /
  num_attention_heads``), so no head can go in a stock config: only FFN neurons; plus taylor rows at 0.5 that also
  drop 2 of the 6 layers (``L4``; the FFN left is then wider).
* ``smollm2``: the STA merge (:data:`benchmarks.harness.STA_MERGE`) of the three SmolLM2-135M-Instruct LoRA adapters of ``benchmarks.bench_lora``
  (same adapters, same importance), keeping ``tweet_sentiment + subjectivity``; size: ``neuron_ratio`` 0.75 (25% of
  the FFN neurons removed, every head kept).
* Rankings: ``taylor`` (group Taylor importance of each kept task with its own head -- SmolLM2: the answer-token loss
  -- on its first ``--calibration-samples`` training examples, normalised per task, fused), ``magnitude`` (L1 of each
  structure's rows and columns, data-free), ``random`` (seed 0).
* Hyper-parameters are chosen on the validation split (mean accuracy over the kept tasks), never on test: the fusion
  rule (``mean`` / ``max``) of each taylor row; for each recovery row, the learning rate (``--recovery-lrs``) and the
  number of steps (``--recovery-checkpoints``; with a constant learning rate the student after step k of one run is
  the k-step student, so one run per learning rate gives every checkpoint). Recovery: distillation from the
  uncompressed merge on the same calibration examples (KL on logits at T=2 + MSE on the last hidden state, AdamW,
  micro-batches of 8; SmolLM2: 4, as its calibration).
* Accuracy: each kept task's test split with its own head (MiniLM: 400 examples, bf16 autocast as every benchmark;
  SmolLM2: the first 100, fp32, as ``bench_lora``); validation: 200 (MiniLM) / 40 (SmolLM2) examples. ``relative`` =
  mean over the kept tasks of accuracy / the uncompressed merge's accuracy.
* Latency: the body (``model.base_model``: no task head, no LM head) on CPU, fp32, ``--num-threads`` threads,
  sequence 128, batch 1 and 32, median of ``--repeats`` runs, the uncompressed and the compressed model alternating
  run by run in one process (a shared machine's load hits both). It depends on the widths only: once per size.

Every row is cached in ``<cache>/compression/rows-<model>.json`` (reused under the same protocol), so a run can be
split (``--models``, ``--part``) and resumed; each run rewrites ``benchmarks/results/compression.{json,md}`` from
everything cached. ``--tiny``: a tiny BERT and a tiny Llama with LoRA adapters, seconds; writes nothing under
``benchmarks/results``.

    python -m benchmarks.bench_compression --num-threads 1
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.finetune import torch_threads
from benchmarks.harness import STA_MERGE
from benchmarks.tasks import cache_root
from hf_sta import STAMerger

RESULTS = Path(__file__).resolve().parent / "results"
logger = logging.getLogger("bench_compression")

METHODS = ("taylor", "magnitude", "random")
MODELS = ("minilm", "smollm2")


@dataclass(frozen=True)
class Size:
    """A compressed size: ``compress`` keyword arguments and who is run at it."""

    label: str
    options: dict[str, Any] = field(hash=False)
    methods: tuple[str, ...] = METHODS


@dataclass
class Workload:
    """A merged model, its merger (task heads, configs), and how to calibrate and score it."""

    name: str
    merger: STAMerger
    merged_dir: Path
    keep: list[list[str]]
    sizes: list[Size]
    calibration: Callable[[str], Any]
    evaluate: Callable[[torch.nn.Module, Sequence[str], str], dict[str, float]]
    micro_batch_size: int
    pilot_size: str
    checkpoints: list[int]
    lrs: list[float]
    protocol: dict[str, Any]
    cache: Path


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def minilm_workload(args: argparse.Namespace) -> Workload:
    """The six-task MiniLM suite of seed 0 and its STA merge (cached)."""
    from benchmarks.harness import TaskSuite
    from benchmarks.tasks import TASKS

    suite = TaskSuite(list(TASKS), seed=0).prepare()
    merger = suite.merger()
    models = {task: path.name for task, path in suite.model_dirs.items()}
    merged_dir = cache_root() / "compression" / f"minilm-sta-seed0-{_digest(models)}"
    if not (merged_dir / "config.json").is_file():
        for task in TASKS:
            suite.importance(merger, task, 128)
        merger.merge(method="sta", output_dir=merged_dir, overwrite=True, **STA_MERGE)
    sizes = [Size("target=0.75", {"target": 0.75}), Size("target=0.5", {"target": 0.5}),
             Size("target=0.5,L4", {"target": 0.5, "num_hidden_layers": 4}, ("taylor",))]  # fmt: skip
    calibration = args.calibration_samples or 256
    margins = served_margins(suite, merged_dir)
    served = sorted(margins, key=margins.get, reverse=True)
    return Workload(
        name="minilm", merger=merger, merged_dir=merged_dir, keep=[served[:2], served[:3]], sizes=sizes,
        calibration=lambda task: suite.calibration(task, calibration),
        evaluate=lambda body, tasks, split: suite.evaluate(body, split, tasks), micro_batch_size=8,
        pilot_size="target=0.5", checkpoints=[50, 100, 200], lrs=[1e-4, 3e-4],
        protocol={"models": models, "scoring": "bf16 autocast" if suite.bf16 else "fp32",
                  "calibration_samples": calibration, "validation": 200, "test": 400, "seed": args.seed,
                  "validation_margin_of_merge": margins},
        cache=cache_root() / "compression" / "rows-minilm.json",
    )  # fmt: skip


def served_margins(suite, merged_dir: Path) -> dict[str, float]:
    """Per task, the uncompressed merge's validation accuracy minus the validation split's majority-class rate: the
    kept sets are the tasks the merge serves best (compressing for a task the merge has already lost -- at or below
    chance -- would measure nothing). Validation only."""
    from hf_sta.measure import load_transformers_model

    accuracy = suite.evaluate(load_transformers_model(merged_dir), "validation")
    margins = {}
    for task, value in accuracy.items():
        labels = list(suite.data[task]["validation"]["label"])
        margins[task] = round(value - max(labels.count(label) for label in set(labels)) / len(labels), 4)
    return margins


def _lora_setup(tiny: bool, work: Path, seed: int):
    """SmolLM2 (or a tiny Llama), the tasks' prompts and splits, and the LoRA adapters of ``benchmarks.bench_lora``
    (the cached ones; trained here only when missing)."""
    from benchmarks import bench_lora
    from benchmarks.tasks import load_task
    from examples._common import Settings, load_tokenizer
    from examples.merge_lora_adapters import Prompts, base_model

    tasks = bench_lora.TINY_TASKS if tiny else bench_lora.DEFAULT_TASKS
    steps, rank, lr, train_size, max_chars = (4, 4, 3e-3, 32, 120) if tiny else (40, 8, 1e-3, 600, 200)
    val, test = (16, 16) if tiny else (40, 100)
    settings = Settings(tiny=tiny, train_size=0, epochs=1, lr=lr, eval_size=None, seed=seed, batch_size=8,
                        max_length=0)  # fmt: skip
    base = base_model(settings, work)
    tokenizer = load_tokenizer(base)
    hyper = dict(steps=steps, batch_size=8, rank=rank, lr=lr, seed=seed, max_chars=max_chars, train_size=train_size)
    data, prompts, adapters = {}, {}, {}
    for task in tasks:
        splits = load_task(task, train_size=train_size)
        data[task] = {"train": splits["train"], "validation": splits["validation"].select(range(val)),
                      "test": splits["test"].select(range(test))}  # fmt: skip
        prompts[task] = Prompts(task, tokenizer, max_chars)
        root = work / "lora" if tiny else cache_root() / "lora"
        adapters[task] = bench_lora.cached_adapter(task, base, prompts[task], data[task]["train"], hyper, root)
    return base, list(tasks), data, prompts, adapters


def lora_workload(args: argparse.Namespace, work: Path) -> Workload:
    """The STA merge (:data:`benchmarks.harness.STA_MERGE`) of the LoRA adapters of ``benchmarks.bench_lora``, scored as there."""
    from benchmarks.bench_lora import calibration_loader

    base, tasks, data, prompts, adapters = _lora_setup(args.tiny, work, args.seed)
    merger = STAMerger.from_pretrained(base, adapters=adapters)
    key = {t: p.name for t, p in adapters.items()}
    merged_dir = (work if args.tiny else cache_root() / "compression") / f"smollm2-sta-{_digest(key)}"
    if not (merged_dir / "config.json").is_file():
        importance_samples = 8 if args.tiny else 32  # bench_lora's STA importance
        for task in tasks:
            loader = calibration_loader(prompts[task], data[task]["train"], importance_samples, 4)
            merger.compute_importance(task, loader, num_samples=importance_samples, show_progress=False)
        merger.merge(method="sta", output_dir=merged_dir, overwrite=True, **STA_MERGE)
    calibration = args.calibration_samples or (8 if args.tiny else 64)
    loaders = {t: calibration_loader(prompts[t], data[t]["train"], calibration, 4) for t in tasks}

    def evaluate(model, kept, split):
        return {t: prompts[t].score(model, data[t][split]).accuracy for t in kept}

    return Workload(
        name="smollm2", merger=merger, merged_dir=merged_dir, keep=[tasks[:2]],
        sizes=[Size("neuron_ratio=0.75", {"neuron_ratio": 0.75})], calibration=loaders.__getitem__,
        evaluate=evaluate, micro_batch_size=4, pilot_size="neuron_ratio=0.75",
        checkpoints=[1, 2] if args.tiny else [10, 25, 50], lrs=[3e-3, 1e-2] if args.tiny else [3e-5, 1e-4],
        protocol={"adapters": key, "model": "tiny Llama" if args.tiny else "SmolLM2-135M-Instruct (fp32)",
                  "calibration_samples": calibration, "validation": len(data[tasks[0]]["validation"]),
                  "test": len(data[tasks[0]]["test"]), "seed": args.seed},
        cache=(work if args.tiny else cache_root() / "compression") / "rows-smollm2.json",
    )  # fmt: skip


def tiny_minilm_workload(args: argparse.Namespace, work: Path) -> Workload:
    """Tiny BERT fine-tunes of three tasks (``examples._common``), their STA merge, 32 examples per split."""
    from examples._common import Settings, finetuned_models, load_splits, load_tokenizer, read_head, score_body

    tasks = ("tweet_sentiment", "product_sentiment", "subjectivity")
    settings = Settings(tiny=True, train_size=32, epochs=2, lr=3e-3, eval_size=32, seed=0, batch_size=8, max_length=32)
    base, models = finetuned_models(tasks, settings, work)
    data = {task: load_splits(task, settings) for task in tasks}
    tokenizer = load_tokenizer(base)
    heads = {task: read_head(folder) for task, folder in models.items()}
    merger = STAMerger.from_pretrained(base, models)
    for task in tasks:
        merger.compute_importance(task, data[task]["train"], num_samples=16, max_length=32, show_progress=False)
    merged_dir = merger.merge(method="sta", output_dir=work / "merged", overwrite=True)
    # Tokenized once (datasets' map fingerprints the tokenizer on every call: seconds per compress call here).
    calibration = {task: data[task]["train"].select(range(16)).map(
        lambda rows: tokenizer(rows["text"], padding="max_length", truncation=True, max_length=32), batched=True,
    ) for task in tasks}  # fmt: skip

    def evaluate(body, kept, split):
        return {t: score_body(body, heads[t], data[t][split], tokenizer, 32).accuracy for t in kept}

    # The tiny BERT's FFN holds a third of its non-embedding parameters: 0.5 is out of its reach.
    sizes = [Size("target=0.75", {"target": 0.75}), Size("target=0.75,L1", {"target": 0.75, "num_hidden_layers": 1},
                                                         ("taylor",))]  # fmt: skip
    return Workload("minilm", merger, merged_dir, [list(tasks[:2])], sizes, calibration.__getitem__, evaluate, 8,
                    "target=0.75", [1, 2], [3e-3, 1e-2], {"models": "tiny", "calibration_samples": 16, "seed": args.seed},
                    work / "rows-minilm.json")  # fmt: skip


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


def _mean(values) -> float:
    return statistics.mean(list(values))


def _compress(workload: Workload, keep: list[str], size: Size, method: str, **options) -> torch.nn.Module:
    return workload.merger.compress(
        workload.merged_dir, keep_tasks=keep, data={t: workload.calibration(t) for t in keep}, importance=method,
        num_samples=workload.protocol["calibration_samples"], micro_batch_size=workload.micro_batch_size,
        seed=workload.protocol["seed"], show_progress=False, **size.options, **options,
    )  # fmt: skip


def _size_record(model: torch.nn.Module, record: dict) -> dict[str, Any]:
    """Parameters and widths from the record; safetensors bytes of ``save_pretrained``, reloaded by ``AutoModel``
    and checked equal (the checkpoint is a stock one)."""
    from transformers import AutoModel

    with tempfile.TemporaryDirectory(prefix="bench-compression-") as tmp:
        model.save_pretrained(tmp)
        size = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        reloaded = AutoModel.from_pretrained(tmp)
        for key, value in model.base_model.state_dict().items():
            if not torch.equal(reloaded.state_dict()[key], value):
                raise AssertionError(f"AutoModel reload differs at {key}")
    return {**{k: record["compressed"][k] for k in ("non_embedding_parameters", "parameters", "intermediate_size",
                                                    "num_attention_heads", "num_hidden_layers")},
            "kept_fraction": record["kept_fraction"], "file_size_bytes": size}  # fmt: skip


def pruned_row(workload: Workload, keep: list[str], size: Size, method: str) -> dict[str, Any]:
    """No recovery; a taylor row keeps the fusion rule with the best validation accuracy."""
    fusions = ("mean", "max") if method == "taylor" and len(keep) > 1 else ("mean",)
    trials, best = [], None
    for fusion in fusions:
        model = _compress(workload, keep, size, method, fusion=fusion)
        validation = workload.evaluate(model, keep, "validation")
        trials.append({"fusion": fusion, "validation": validation, "validation_mean": _mean(validation.values())})
        if best is None or trials[-1]["validation_mean"] > best[0]:
            best = (trials[-1]["validation_mean"], fusion, model, workload.merger.last_compression)
        logger.info(
            "%s %s %s fusion=%s: validation %.4f", keep, size.label, method, fusion, trials[-1]["validation_mean"]
        )
    _, fusion, model, record = best
    return {"keep": keep, "size": size.label, "method": method, "recovery": None, "fusion": fusion, "trials": trials,
            "test": workload.evaluate(model, keep, "test"), **_size_record(model, record)}  # fmt: skip


def recovered_row(
    workload: Workload, keep: list[str], size: Size, method: str, fusion: str, lrs: list[float], steps: list[int]
) -> dict:
    """Recovery from the row's pruned model: learning rate (among ``lrs``) and steps (among ``steps``) chosen on
    validation, from checkpoints of one run per learning rate (the best student so far is kept on disk, not in
    memory: SmolLM2's teacher, student and optimiser already take gigabytes)."""
    checkpoints = set(steps)
    trials, best, losses = [], {"validation_mean": -1.0}, {}
    with tempfile.TemporaryDirectory(prefix="bench-compression-best-") as tmp:
        snapshot = Path(tmp) / "student.pt"
        for lr in lrs:

            def look(step: int, student: torch.nn.Module, lr: float = lr) -> None:
                if step not in checkpoints:
                    return
                validation = workload.evaluate(student, keep, "validation")
                trials.append({"lr": lr, "steps": step, "validation": validation,
                               "validation_mean": _mean(validation.values())})  # fmt: skip
                logger.info("%s %s %s recovery lr=%g step %d: validation %.4f", keep, size.label, method, lr, step,
                            trials[-1]["validation_mean"])  # fmt: skip
                if trials[-1]["validation_mean"] > best["validation_mean"]:
                    best.update(trials[-1])
                    torch.save(student.state_dict(), snapshot)

            model = None  # the previous run's student goes before the next one is built
            model = _compress(workload, keep, size, method, fusion=fusion, recovery_steps=max(checkpoints),
                              recovery_lr=lr, recovery_callback=look)  # fmt: skip
            record = workload.merger.last_compression
            losses[lr] = record["recovery"]
        model.load_state_dict(torch.load(snapshot))
    return {"keep": keep, "size": size.label, "method": method, "fusion": fusion, "trials": trials,
            "recovery": {"lr": best["lr"], "steps": best["steps"], "run": losses[best["lr"]]},
            "test": workload.evaluate(model, keep, "test"), **_size_record(model, record)}  # fmt: skip


def _uncompressed_row(workload: Workload, keep: list[str]) -> dict[str, Any]:
    from hf_sta.measure import load_transformers_model

    merged = load_transformers_model(workload.merged_dir)
    return {"keep": keep, "method": "uncompressed", "test": workload.evaluate(merged, keep, "test"),
            "validation": workload.evaluate(merged, keep, "validation"),
            "file_size_bytes": sum(f.stat().st_size for f in workload.merged_dir.glob("*.safetensors"))}  # fmt: skip


def run_rows(workload: Workload, rows: CachedRows, args) -> None:
    """Every row without recovery first; then the pilot recovery row (the first kept-task set at the pilot size,
    taylor), whose validation choice among ``--recovery-lrs`` sets the learning rate of every other recovery row of
    the model (their steps are each chosen on validation)."""
    combos = [(keep, size, method) for keep in workload.keep for size in workload.sizes
              for method in size.methods if method in args.methods]  # fmt: skip
    for keep in workload.keep:
        if f"{','.join(keep)}|uncompressed" not in rows:
            rows[f"{','.join(keep)}|uncompressed"] = _uncompressed_row(workload, keep)
    for keep, size, method in combos:
        key = f"{','.join(keep)}|{size.label}|{method}|r0"
        if key not in rows:
            rows[key] = pruned_row(workload, keep, size, method)
    lrs = workload.lrs if args.recovery_lrs is None else args.recovery_lrs
    if not lrs:
        return
    # The pilot first, then the smallest sizes (where recovery matters most) before the larger ones.
    sizes = [size.label for size in workload.sizes]
    combos.sort(key=lambda c: (c[1].label != workload.pilot_size, -sizes.index(c[1].label)))
    pilot = (workload.keep[0], next(s for s in workload.sizes if s.label == workload.pilot_size), "taylor")
    combos = [pilot, *(combo for combo in combos if combo != pilot)]
    for index, (keep, size, method) in enumerate(combos):
        key = f"{','.join(keep)}|{size.label}|{method}"
        if f"{key}|recovery" not in rows:
            tried = lrs if index == 0 else [rows[f"{_pilot_key(workload)}|recovery"]["recovery"]["lr"]]
            rows[f"{key}|recovery"] = recovered_row(workload, keep, size, method, rows[f"{key}|r0"]["fusion"], tried,
                                                    args.recovery_checkpoints or workload.checkpoints)  # fmt: skip


def _pilot_key(workload: Workload) -> str:
    return f"{','.join(workload.keep[0])}|{workload.pilot_size}|taylor"


@torch.inference_mode()
def _median_ms(model: torch.nn.Module, inputs: dict, reference: torch.nn.Module, repeats: int) -> tuple[float, float]:
    """Median wall time (ms) of ``reference`` and ``model`` on ``inputs``, alternating run by run, the order swapped
    every round (A B B A ...) so that neither always runs first; one warm-up round."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for index in range(repeats + 1):
        for which in (0, 1) if index % 2 == 0 else (1, 0):
            started = time.perf_counter()
            (reference, model)[which](**inputs)
            if index >= 1:
                times[which].append(1000 * (time.perf_counter() - started))
    return statistics.median(times[0]), statistics.median(times[1])


def run_latency(workload: Workload, rows: CachedRows, args) -> None:
    """Body latency of each size (magnitude ranking: the widths are those of every ranking at that size)."""
    from hf_sta.measure import load_transformers_model

    reference = None
    for size in workload.sizes:
        key = f"latency|{size.label}|threads{args.num_threads}"
        if key in rows:
            continue
        reference = reference or load_transformers_model(workload.merged_dir).base_model.eval()
        model = _compress(workload, workload.keep[0][:1], size, "magnitude").base_model.eval()
        result = {"size": size.label, "threads": torch.get_num_threads(), "seq_len": args.seq_len, "batches": {},
                  "num_hidden_layers": model.config.num_hidden_layers,
                  "intermediate_size": model.config.intermediate_size}  # fmt: skip
        vocab = int(model.config.vocab_size)
        for batch in (1, 32):
            ids = torch.randint(min(1000, vocab // 2), vocab, (batch, args.seq_len),
                                generator=torch.Generator().manual_seed(batch))  # fmt: skip
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            repeats = args.repeats if batch == 1 else max(3, args.repeats // 2)
            original, compressed = _median_ms(model, inputs, reference, repeats)
            result["batches"][str(batch)] = {"original_ms": original, "compressed_ms": compressed,
                                             "speedup": original / compressed, "repeats": repeats}  # fmt: skip
            logger.info("latency %s batch %d: %.1f -> %.1f ms", size.label, batch, original, compressed)
        rows[key] = result


def _relative(rows: dict, row: dict) -> float:
    merged = rows[f"{','.join(row['keep'])}|uncompressed"]["test"]
    return _mean(row["test"][t] / merged[t] for t in row["keep"])


def summarize(results: dict[str, dict[str, dict]]) -> dict[str, Any]:
    """Per row: mean test accuracy, ``relative`` to the merge; the issue's targets as measured."""
    checks: list[dict[str, Any]] = []
    for model, rows in results.items():
        for row in rows.values():
            if "test" in row:
                row["mean_test"] = _mean(row["test"].values())
            if row.get("method") in METHODS:
                row["relative"] = _relative(rows, row)
        for key, row in rows.items():
            if row.get("method") != "taylor":
                continue
            others = [rows.get(key.replace("|taylor|", f"|{m}|")) for m in ("magnitude", "random")]
            margin = min((row["mean_test"] - o["mean_test"]) * 100 for o in others if o) if any(others) else None
            latency = next(
                (r["batches"]["32"] for k, r in rows.items() if k.startswith(f"latency|{row['size']}|")), {}
            )
            checks.append({"model": model, "row": key, "relative": row["relative"], "points_over_baselines": margin,
                           "speedup_batch32": latency.get("speedup")})  # fmt: skip
    return {"taylor": checks}


def _row_line(model: str, key: str, row: dict) -> str:
    mib = f"{row['file_size_bytes'] / 2**20:.1f}"
    tasks = "+".join(row["keep"])
    if row["method"] == "uncompressed":
        return f"| {model} | {tasks} | uncompressed | - | - | {row['mean_test']:.3f} | 1.000 | - | - | {mib} |"
    recovery = row.get("recovery")
    chosen = f"fusion {row['fusion']}" + (f"; lr {recovery['lr']:g}, {recovery['steps']} steps" if recovery else "")
    return (f"| {model} | {tasks} | {row['size']} | {row['method']} | {chosen} | {row['mean_test']:.3f} | "
            f"{row['relative']:.3f} | {row['non_embedding_parameters']:,} ({row['kept_fraction']:.3f}) | "
            f"{row['intermediate_size']} x {row['num_hidden_layers']} | {mib} |")  # fmt: skip


def markdown(results: dict[str, dict[str, dict]]) -> str:
    lines = ["| model | kept tasks | size | ranking | chosen on validation (recovery) | mean test acc. | relative to "
             "merge | non-emb. params (kept) | FFN x layers | MiB |", "|---" * 10 + "|"]  # fmt: skip
    for model, rows in results.items():
        for key, row in sorted(rows.items(), key=lambda item: item[0].replace("uncompressed", "")):
            if not key.startswith("latency"):
                lines.append(_row_line(model, key, row))
    lines += ["", "| model | size | FFN x layers | threads | batch | uncompressed ms | compressed ms | speedup |",
              "|---" * 8 + "|"]  # fmt: skip
    for model, rows in results.items():
        for key, row in sorted(rows.items()):
            if key.startswith("latency"):
                for batch, t in row["batches"].items():
                    lines.append(f"| {model} | {row['size']} | {row['intermediate_size']} x {row['num_hidden_layers']}"
                                 f" | {row['threads']} | {batch} | {t['original_ms']:.1f} | {t['compressed_ms']:.1f} | "
                                 f"{t['speedup']:.2f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--part", choices=("rows", "latency", "all", "report"), default="all")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--calibration-samples", type=int, default=None,
                        help="per kept task (default: minilm 256, smollm2 64; tiny 16 / 8)")  # fmt: skip
    parser.add_argument("--recovery-lrs", nargs="*", type=float, default=None,
                        help="learning rates tried on the pilot row (default: minilm 1e-4 3e-4, smollm2 3e-5 1e-4; "
                        "tiny 3e-3 1e-2); none: no recovery rows")  # fmt: skip
    parser.add_argument("--recovery-checkpoints", nargs="+", type=int, default=None,
                        help="recovery steps tried (default: minilm 50 100 200, smollm2 10 25 50; tiny 1 2)")  # fmt: skip
    parser.add_argument("--seq-len", type=int, default=None, help="latency sequence length (default 128; 16 tiny)")
    parser.add_argument("--repeats", type=int, default=None, help="latency runs at batch 1 (default 10; 2 tiny)")
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny BERT / Llama, seconds; writes nothing to results/")
    parser.add_argument("--work-dir", type=Path, default=None, help="--tiny: where the tiny models go (default tmp)")
    args = parser.parse_args(argv)
    tiny = args.tiny
    for name, real, small in (("seq_len", 128, 16), ("repeats", 10, 2)):
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else real)
    return args


def _workload(name: str, args, work: Path) -> Workload:
    if name == "smollm2":
        return lora_workload(args, work)
    return tiny_minilm_workload(args, work) if args.tiny else minilm_workload(args)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.tiny else logging.INFO, format="%(asctime)s %(message)s")
    results, protocols = {}, {}
    with torch_threads(args.num_threads), tempfile.TemporaryDirectory(prefix="bench-compression-tiny-") as tmp:
        for name in args.models:
            workload = _workload(name, args, args.work_dir or Path(tmp))
            protocols[name] = {**workload.protocol, "merged": workload.merged_dir.name, "seed": args.seed,
                               "recovery_lrs": workload.lrs if args.recovery_lrs is None else args.recovery_lrs,
                               "recovery_checkpoints": args.recovery_checkpoints or workload.checkpoints,
                               "repeats": args.repeats, "seq_len": args.seq_len}  # fmt: skip
            rows = CachedRows(workload.cache, protocols[name])
            if args.part in ("rows", "all"):
                run_rows(workload, rows, args)
            if args.part in ("latency", "all"):
                run_latency(workload, rows, args)
            results[name] = dict(rows)
            del workload
    result = {"protocol": protocols, "rows": results, "summary": summarize(results),
              "environment": {"torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
                              "load_avg": os.getloadavg(), "date": time.strftime("%Y-%m-%d"), "gpu": False}}  # fmt: skip
    table = markdown(results)
    print(table)
    if not args.tiny:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "compression.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        (RESULTS / "compression.md").write_text(table)
    return result


if __name__ == "__main__":
    main()
