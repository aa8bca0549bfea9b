"""Fusion benchmark (issue #17): heterogeneous single-task models fused by AKF, against the alternatives.

Protocol:

* Tasks and sources (two architectures): MiniLM (BERT, 6 layers, 384 wide) fully fine-tuned per task
  (``benchmarks.finetune``, cached under ``~/.cache/hf_sta/finetuned``) for ``--minilm-tasks`` (default ``news``,
  ``movie_sentiment``, ``subjectivity``), and SmolLM2-135M-Instruct (Llama, 30 layers, 576 wide) with one PEFT LoRA
  adapter per task for ``--smollm-tasks`` (default ``tweet_sentiment``), trained and cached exactly as
  ``benchmarks.bench_lora`` does (``~/.cache/hf_sta/lora``), read through the logits of the answer words.
* Data: ``benchmarks.tasks.load_task`` splits (seed 0), ``--train-size`` 600 training examples per task, the first
  ``--validation-size`` validation and ``--test-size`` test examples. Every number reported is test accuracy.
* Rows: each source alone (``individual``); AKF (``fusion="akf"``, D=128, 1 intra + 1 inter layer, 4 heads);
  simple fusion (``fusion="concat"``); the best weight merge of the MiniLM subset (task arithmetic and STA, scaling
  chosen on validation; SmolLM tasks are not covered by it and are reported as missing); one multi-task fine-tune
  of MiniLM on all tasks (shared body, one head per task, ``--multitask-steps``). Fusion training: ``--steps`` steps of
  batch 16, AdamW lr 1e-3, temperature sampling (T=2), the best validation checkpoint (step 0 included) kept.
* Cost: trainable parameters vs the sources' total; training time (feature encoding apart); latency of predicting
  every task for ``--latency-texts`` texts (fused model: one call; separately: each source in turn); parameter memory
  and peak RSS.

Sources' outputs are frozen, so they are encoded once and cached (``~/.cache/hf_sta/fusion/features-*.safetensors``);
the stages can be run one at a time (``--stage``), each writing ``benchmarks/results/fusion_parts/<stage>.json``:

    python -m benchmarks.bench_fusion --stage encode      # sources' features (the expensive part)
    python -m benchmarks.bench_fusion --stage fusion      # individual, AKF, simple fusion, latency
    python -m benchmarks.bench_fusion --stage merge       # weight merges of the MiniLM subset
    python -m benchmarks.bench_fusion --stage multitask   # one multi-task MiniLM fine-tune
    python -m benchmarks.bench_fusion --stage report      # benchmarks/results/fusion.json + fusion.md
    python -m benchmarks.bench_fusion --tiny              # tiny BERTs + tiny Llama from configs: seconds, writes nothing
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.tasks import cache_root, label_names, load_task
from hf_sta.fusion import (
    FusedMultiTaskModel,
    FusionTrainingArguments,
    SourceOutput,
    encode_dataset,
    evaluate_fusion,
    train_fusion,
)
from hf_sta.fusion.sources import load_transformers_source

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = RESULTS / "fusion_parts"
STAGES = ("encode", "fusion", "merge", "multitask", "report")
logger = logging.getLogger("bench_fusion")


# -- sources ----------------------------------------------------------------------------------------------------------
def _tiny_sources(work: Path, tasks: list[str]) -> dict[str, Any]:
    """Tiny BERT classifiers of two widths and a tiny Llama (MiniLM's tokenizer), untrained: for the --tiny run."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from benchmarks.finetune import minilm_path
    from examples.merge_lora_adapters import TINY_LLAMA

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    folders: dict[str, Any] = {}
    for index, task in enumerate(tasks[:-1]):
        torch.manual_seed(index)
        config = BertConfig(
            vocab_size=len(tokenizer), hidden_size=32 + 16 * index, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, num_labels=len(label_names(task)),
        )  # fmt: skip
        BertForSequenceClassification(config).save_pretrained(work / task)
        tokenizer.save_pretrained(work / task)
        folders[task] = work / task
    torch.manual_seed(9)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TINY_LLAMA))
    llama.save_pretrained(work / tasks[-1])
    tokenizer.save_pretrained(work / tasks[-1])
    folders[tasks[-1]] = work / tasks[-1]
    return folders


def _real_sources(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.bench_lora import cached_adapter
    from benchmarks.finetune import finetune
    from benchmarks.smollm import smollm2_path
    from examples.merge_lora_adapters import Prompts

    folders: dict[str, Any] = {t: finetune(t, seed=0, train_size=args.train_size) for t in args.minilm_tasks}
    if args.smollm_tasks:
        from transformers import AutoTokenizer

        base = smollm2_path()
        tokenizer = AutoTokenizer.from_pretrained(base)
        hyper = dict(steps=40, batch_size=8, rank=8, lr=1e-3, seed=0, max_chars=200, train_size=args.train_size)
        for task in args.smollm_tasks:
            train = load_task(task, train_size=args.train_size)["train"]
            folders[task] = cached_adapter(
                task, base, Prompts(task, tokenizer, 200), train, hyper, cache_root() / "lora"
            )
    return folders


def build_sources(folders: dict[str, Any], decoder_tasks: list[str], components: int = 3) -> dict[str, Any]:
    """``{task: TransformersSource}``: encoders read through their heads, decoders through answer-word logits."""
    from examples.merge_lora_adapters import PROMPTS

    sources = {}
    for task, folder in folders.items():
        extra = {}
        if task in decoder_tasks:
            extra = dict(label_words=label_names(task), prompt=PROMPTS[task], max_chars=200, add_special_tokens=False)
        sources[task] = load_transformers_source(folder, task=task, components=components, max_length=256, **extra)
    return sources


# -- data and cached features -----------------------------------------------------------------------------------------
def load_data(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    data = {}
    for task in args.tasks:
        splits = load_task(task, train_size=args.train_size)
        data[task] = {
            "train": splits["train"][:],
            "validation": splits["validation"][: args.validation_size],
            "test": splits["test"][: args.test_size],
        }
    return data


def _features_path(model: FusedMultiTaskModel, task: str, split: str, count: int) -> Path:
    key = json.dumps({"sources": model.config.sources, "task": task, "split": split, "n": count}, sort_keys=True)
    return (
        cache_root()
        / "fusion"
        / f"features-{task}-{split}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    )


def cached_features(model, data, args, *, write: bool) -> dict[str, dict[str, dict[str, SourceOutput]]]:
    """``{split: {task: {source: SourceOutput}}}``, read from / written to the feature cache (not with --tiny)."""
    from safetensors.torch import load_file, save_file

    result: dict[str, dict[str, Any]] = {"train": {}, "validation": {}, "test": {}}
    for task, splits in data.items():
        for split, rows in splits.items():
            path = _features_path(model, task, split, len(rows["text"]))
            if not args.tiny and path.is_file():
                result[split][task] = _unflatten(load_file(path), model)
                continue
            started = time.perf_counter()
            features = encode_dataset(model, rows["text"], batch_size=32, disable_tqdm=False)
            logger.info(
                "encoded %s/%s (%d texts) in %.0f s", task, split, len(rows["text"]), time.perf_counter() - started
            )
            if write and not args.tiny:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                save_file(_flatten(features), str(tmp))
                os.replace(tmp, path)
            result[split][task] = features
    return result


def _flatten(features: dict[str, SourceOutput]) -> dict[str, torch.Tensor]:
    flat = {}
    for name, out in features.items():
        flat.update({f"{name}.component{k}": c.contiguous() for k, c in enumerate(out.components)})
        flat[f"{name}.features"] = out.features.contiguous()
        if out.logits is not None:
            flat[f"{name}.logits"] = out.logits.contiguous()
    return flat


def _unflatten(flat: dict[str, torch.Tensor], model) -> dict[str, SourceOutput]:
    out = {}
    for name, source in model.sources.items():
        components = [flat[f"{name}.component{k}"] for k in range(len(source.component_widths))]
        out[name] = SourceOutput(components, flat[f"{name}.features"], flat.get(f"{name}.logits"))
    return out


# -- stages -----------------------------------------------------------------------------------------------------------
def _accuracy_of_sources(features, data) -> dict[str, float]:
    return {
        task: float(
            (features[task][task].logits.argmax(-1) == torch.tensor(data[task]["test"]["label"])).float().mean()
        )
        for task in data
    }


def _fusion_row(kind: str, sources, features, data, args) -> dict[str, Any]:
    model = FusedMultiTaskModel(sources, _config(kind, sources, args))
    train = {t: d["train"] for t, d in data.items()}
    validation = {t: d["validation"] for t, d in data.items()}
    training = FusionTrainingArguments(
        max_steps=args.steps, per_device_train_batch_size=16, learning_rate=1e-3, eval_steps=max(args.steps // 6, 1),
        disable_tqdm=args.tiny,
    )  # fmt: skip
    result = train_fusion(
        model, train, training, validation, train_features=features["train"], eval_features=features["validation"]
    )
    test = evaluate_fusion(model, {t: d["test"] for t, d in data.items()}, training, features["test"])
    return {
        "test": test,
        "trainable_parameters": model.num_parameters(only_trainable=True),
        "train_seconds": result.train_seconds,
        "best_step": result.best_step,
        "model": model,
    }


def _config(kind: str, sources, args):
    from hf_sta.fusion import FusionConfig

    return FusionConfig(
        tasks=list(sources),
        num_labels={t: s.num_labels for t, s in sources.items()},
        fusion=kind,
        fusion_dim=args.fusion_dim,
        sources={t: {**s.spec(), "component_widths": s.component_widths, "feature_width": s.feature_width} for t, s in sources.items()},
    )  # fmt: skip


@torch.inference_mode()
def latency(model: FusedMultiTaskModel, texts: list[str], repeats: int = 3) -> dict[str, float]:
    """Seconds to predict every task for ``texts``: the fused model in one call vs each source on its own."""
    model.eval()

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)

    fused = best(lambda: model(texts=texts))
    separate = best(lambda: [source(**source.tokenize(texts)) for source in model.sources.values()])
    source_params = sum(p.numel() * p.element_size() for p in model.sources.parameters())
    fusion_params = sum(p.numel() * p.element_size() for p in model.fusion.parameters())
    return {
        "fused_seconds": fused,
        "separate_seconds": separate,
        "ratio": fused / separate,
        "source_parameter_bytes": source_params,
        "fusion_parameter_bytes": fusion_params,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def stage_fusion(sources, features, data, args) -> dict[str, Any]:
    rows: dict[str, Any] = {"individual": {"test": _accuracy_of_sources(features["test"], data)}}
    source_total = sum(p.numel() for s in sources.values() for p in s.parameters())
    for kind in ("akf", "concat"):
        row = _fusion_row(kind, sources, features, data, args)
        model = row.pop("model")
        row["trainable_fraction"] = row["trainable_parameters"] / source_total
        rows[kind] = row
        logger.info("%s: %s", kind, row["test"])
    rows["akf"]["latency"] = latency(model, data[args.tasks[0]]["test"]["text"][: args.latency_texts])
    return {"rows": rows, "source_parameters": source_total}


def stage_merge(args) -> dict[str, Any]:
    """Task arithmetic and STA over the MiniLM subset, scaling picked on validation."""
    from benchmarks.harness import TaskSuite

    suite = TaskSuite(args.minilm_tasks, split_limits={"validation": args.validation_size, "test": args.test_size})
    suite.prepare()
    merger = suite.merger()
    best = None
    for method, grid in {"task_arithmetic": (0.3, 0.5, 1.0), "sta": (0.5, 1.0)}.items():
        for scaling in grid:
            validation = suite.evaluate(merger.merge(method=method, scaling=scaling), "validation")
            score = sum(validation.values()) / len(validation)
            if best is None or score > best[0]:
                best = (score, method, scaling)
    _, method, scaling = best
    test = suite.evaluate(merger.merge(method=method, scaling=scaling), "test")
    return {"rows": {"weight_merge": {"test": test, "method": method, "scaling": scaling}}}


def stage_multitask(data, args) -> dict[str, Any]:
    """One MiniLM body fine-tuned on every task at once (one linear head per task, temperature sampling)."""
    from transformers import AutoModel, AutoTokenizer

    from benchmarks.finetune import minilm_path
    from hf_sta.fusion import MultiTaskSampler

    torch.manual_seed(0)
    body, tokenizer = AutoModel.from_pretrained(minilm_path()), AutoTokenizer.from_pretrained(minilm_path())
    heads = torch.nn.ModuleDict({t: torch.nn.Linear(body.config.hidden_size, len(label_names(t))) for t in data})
    params = [*body.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    sampler = iter(MultiTaskSampler({t: len(d["train"]["text"]) for t, d in data.items()}, batch_size=16, seed=0))
    started = time.perf_counter()
    body.train()
    for _ in range(args.multitask_steps):
        task, rows = next(sampler)
        batch = tokenizer(
            [data[task]["train"]["text"][i] for i in rows],
            padding=True,
            truncation=True,
            max_length=128,
            return_tensors="pt",
        )
        logits = heads[task](body(**batch).pooler_output)
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([data[task]["train"]["label"][i] for i in rows]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    body.eval()
    test = {}
    with torch.inference_mode():
        for task, splits in data.items():
            correct = 0
            for start in range(0, len(splits["test"]["text"]), 64):
                texts = splits["test"]["text"][start : start + 64]
                batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
                predicted = heads[task](body(**batch).pooler_output).argmax(-1)
                correct += int((predicted == torch.tensor(splits["test"]["label"][start : start + 64])).sum())
            test[task] = correct / len(splits["test"]["text"])
    return {"rows": {"multitask_finetune": {"test": test, "train_seconds": seconds, "trainable_parameters": sum(p.numel() for p in params)}}}  # fmt: skip


# -- report -----------------------------------------------------------------------------------------------------------
def markdown(result: dict[str, Any]) -> str:
    tasks = result["tasks"]
    individual = result["rows"]["individual"]["test"]
    lines = [
        "| Model | " + " | ".join(tasks) + " | mean | normalised | trainable params | train s |",
        "|---|" + "---|" * (len(tasks) + 4),
    ]
    for name, row in result["rows"].items():
        test = row["test"]
        cells = [f"{test[t]:.3f}" if t in test else "n/a" for t in tasks]
        covered = [t for t in tasks if t in test]
        mean = sum(test[t] for t in covered) / len(covered)
        normalised = sum(test[t] / individual[t] for t in covered) / len(covered)
        params = f"{row['trainable_parameters']:,}" if "trainable_parameters" in row else "-"
        seconds = f"{row['train_seconds']:.0f}" if "train_seconds" in row else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean:.3f} | {normalised:.3f} | {params} | {seconds} |")
    if "latency" in result["rows"].get("akf", {}):
        lat = result["rows"]["akf"]["latency"]
        lines.append(
            f"\nLatency, all tasks for {result['latency_texts']} texts: fused {lat['fused_seconds']:.2f} s vs sources "
            f"one after another {lat['separate_seconds']:.2f} s (ratio {lat['ratio']:.2f}); fusion parameters "
            f"{lat['fusion_parameter_bytes'] / 2**20:.1f} MiB next to {lat['source_parameter_bytes'] / 2**20:.0f} MiB of "
            f"sources; peak RSS {lat['peak_rss_mb']:.0f} MB."
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--stage", choices=("all", *STAGES), default="all")
    parser.add_argument("--minilm-tasks", nargs="+", default=["news", "movie_sentiment", "subjectivity"])
    parser.add_argument("--smollm-tasks", nargs="*", default=["tweet_sentiment"])
    parser.add_argument("--train-size", type=int, default=600)
    parser.add_argument("--validation-size", type=int, default=100)
    parser.add_argument("--test-size", type=int, default=300)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--multitask-steps", type=int, default=300)
    parser.add_argument("--fusion-dim", type=int, default=128)
    parser.add_argument("--latency-texts", type=int, default=32)
    parser.add_argument("--num-threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.tiny:
        args.minilm_tasks, args.smollm_tasks = ["movie_sentiment", "subjectivity"], ["tweet_sentiment"]
        args.train_size, args.validation_size, args.test_size = 32, 16, 16
        args.steps, args.multitask_steps, args.fusion_dim, args.latency_texts = 12, 4, 32, 8
    args.tasks = [*args.minilm_tasks, *args.smollm_tasks]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        if args.stage == "report":
            return report(args)
        data = load_data(args)
        folders = _tiny_sources(Path(tmp), args.tasks) if args.tiny else _real_sources(args)
        result: dict[str, Any] = {"tasks": args.tasks, "latency_texts": args.latency_texts, "rows": {}}
        if args.stage in ("all", "encode", "fusion"):
            sources = build_sources(folders, args.smollm_tasks, 2 if args.tiny else 3)
            probe = FusedMultiTaskModel(sources, _config("concat", sources, args))
            features = cached_features(probe, data, args, write=True)
            if args.stage != "encode":
                part = stage_fusion(sources, features, data, args)
                result["rows"].update(part["rows"])
                result["source_parameters"] = part["source_parameters"]
        if args.stage in ("all", "merge") and not args.tiny:
            result["rows"].update(stage_merge(args)["rows"])
        if args.stage in ("all", "multitask"):
            result["rows"].update(stage_multitask(data, args)["rows"])
    if not args.tiny and args.stage != "encode":
        PARTS.mkdir(parents=True, exist_ok=True)
        (PARTS / f"{args.stage}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        if args.stage == "all":
            return report(args)
    return result


def report(args: argparse.Namespace) -> dict[str, Any]:
    """Merge the stage files into ``results/fusion.json`` and ``results/fusion.md``."""
    result: dict[str, Any] = {"tasks": args.tasks, "latency_texts": args.latency_texts, "rows": {}}
    for stage in ("all", "fusion", "merge", "multitask"):
        path = PARTS / f"{stage}.json"
        if path.is_file():
            part = json.loads(path.read_text())
            result["rows"].update(part["rows"])
            result.setdefault("source_parameters", part.get("source_parameters"))
    if "individual" not in result["rows"]:
        raise SystemExit("Run --stage fusion first: the report needs the individual models' scores.")
    (RESULTS / "fusion.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "fusion.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
