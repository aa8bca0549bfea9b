"""Fusion benchmark (issue #17): heterogeneous single-task models fused by AKF, against the alternatives.

Protocol:

* Tasks and sources (two architectures): MiniLM (BERT, 6 layers, 384 wide) fully fine-tuned per task
  (``benchmarks.finetune``, seed 0, cached under ``~/.cache/hf_sta/finetuned``) for ``--minilm-tasks`` (default
  ``movie_sentiment``, ``product_sentiment``, ``news``), and SmolLM2-135M-Instruct (Llama, 30 layers, 576 wide) with
  one PEFT LoRA adapter per task for ``--smollm-tasks`` (default ``tweet_sentiment``, ``subjectivity``), trained and
  cached exactly as ``benchmarks.bench_lora`` does (``~/.cache/hf_sta/lora``), read through the logits of the answer
  words at the end of its prompt. Each task has one source.
* Data: ``benchmarks.tasks.load_task`` splits (seed 0): the 600 training examples the sources were trained on (the
  first ``--train-size`` of them), the first ``--validation-size`` validation and ``--test-size`` test examples.
  Every hyper-parameter is chosen on validation; every number reported is test accuracy.
* Rows: each source alone (``individual``); AKF (``fusion="akf"``: 3 components per source, D=128, 1 intra + 1
  inter layer, 4 heads) and simple fusion (``fusion="concat"``: every task's head reads the concatenated head
  features of all sources), both trained the same way: batches of 16, AdamW, temperature sampling (T=2); the
  learning rate (``LEARNING_RATES``), the number of steps (``--steps``: 1,000 or 3,000) and the checkpoint (every
  ``steps/10``, step 0 = the sources themselves included) with the best mean validation accuracy; the best weight merge of each same-architecture
  subset (the MiniLM fine-tunes; the SmolLM2 LoRA adapters), over the methods and settings of ``MERGE_GRID``,
  chosen on validation; one multi-task fine-tune of MiniLM on every task's 600 training examples (shared body, one
  head per task, the recipe of ``benchmarks.finetune``: 2 epochs of batch 16 at lr 1e-4; the checkpoint with the
  best validation mean of 4 kept).
* Cost: trainable parameters against the sources' total; training time (AKF: the sources' one pass over the
  training texts + the fusion steps; the multi-task fine-tune: its steps) as a ratio to the multi-task fine-tune
  (measured in one run with ``--stage all``; stage by stage, each part in its own run, at that run's machine load);
  latency of predicting every task for ``--latency-texts`` texts (the fused model in one call against each source's
  own forward pass one after another, medians of interleaved repeats) and parameter memory.
* Precision: every source forward pass (encoding, scoring, merges, the multi-task model, latency) runs under CPU
  bf16 autocast (``--no-bf16`` for fp32), about 2x faster on this machine, as ``benchmarks.harness`` scores; the
  fusion module trains in fp32 on the cached features.

Sources' outputs are frozen, so they are encoded once and cached (``~/.cache/hf_sta/fusion/features-*.safetensors``,
one file per task and split, so an interrupted encoding resumes); the stages can be run one at a time
(``--stage``), each writing ``benchmarks/results/fusion_parts/<stage>.json``:

    python -m benchmarks.bench_fusion --stage encode      # sources' features (the expensive part)
    python -m benchmarks.bench_fusion --stage fusion      # individual, AKF, simple fusion (learning rate on validation)
    python -m benchmarks.bench_fusion --stage merge       # weight merges of the MiniLM and SmolLM2 subsets
    python -m benchmarks.bench_fusion --stage multitask   # one multi-task MiniLM fine-tune
    python -m benchmarks.bench_fusion --stage latency     # fused model vs the sources one after another
    python -m benchmarks.bench_fusion --stage report      # benchmarks/results/fusion.json + fusion.md
    python -m benchmarks.bench_fusion --tiny              # tiny BERTs + tiny Llama from configs: seconds, writes nothing
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.tasks import cache_root, label_names, load_task
from hf_sta.fusion import (
    FusedMultiTaskModel,
    FusionConfig,
    FusionTrainingArguments,
    SourceOutput,
    encode_dataset,
    evaluate_fusion,
    load_transformers_sources,
    train_fusion,
)

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = RESULTS / "fusion_parts"
STAGES = ("encode", "fusion", "merge", "multitask", "latency", "report")
LEARNING_RATES = (3e-4, 1e-3, 3e-3)
MERGE_GRID = {
    "task_arithmetic": [{"scaling": s} for s in (0.3, 0.5, 0.7, 1.0)],
    "ties": [{"density": d, "scaling": s} for d, s in ((0.2, 1.0), (0.5, 1.0), (0.5, 0.7))],
}
LORA_HYPER = dict(steps=40, batch_size=8, rank=8, lr=1e-3, seed=0, max_chars=200, train_size=600)
"""``benchmarks.bench_lora``'s adapter settings (its cache key): the same adapters are reused, not retrained."""
SOURCE_TRAIN_SIZE = 600
logger = logging.getLogger("bench_fusion")


def autocast(args: argparse.Namespace):
    return torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()


# -- sources ----------------------------------------------------------------------------------------------------------
def _tiny_sources(work: Path, minilm_tasks: list[str], smollm_tasks: list[str]) -> dict[str, Path]:
    """Untrained tiny BERT classifiers of two widths and tiny Llama bases with a LoRA adapter each (MiniLM's
    tokenizer), saved in ``work``: the --tiny run's sources."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from benchmarks.finetune import minilm_path
    from examples.merge_lora_adapters import TINY_LLAMA

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    folders: dict[str, Path] = {}
    for index, task in enumerate(minilm_tasks):
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
    llama.save_pretrained(work / "llama")
    tokenizer.save_pretrained(work / "llama")
    for index, task in enumerate(smollm_tasks):
        base = LlamaForCausalLM.from_pretrained(work / "llama")
        torch.manual_seed(20 + index)
        adapter = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        adapter.save_pretrained(work / task)
        folders[task] = work / task
    return folders


def _real_sources(args: argparse.Namespace) -> dict[str, Path]:
    """The cached MiniLM fine-tunes and SmolLM2 LoRA adapters (trained here only when missing from the cache; with
    ``--cached-sources-only`` the missing ones are left out instead)."""
    from benchmarks.bench_lora import adapter_key, cached_adapter
    from benchmarks.finetune import finetune, finetuned_dir

    folders = {}
    for task in args.minilm_tasks:
        if (
            getattr(args, "cached_sources_only", False)
            and not finetuned_dir(task, train_size=SOURCE_TRAIN_SIZE).is_dir()
        ):
            logger.warning("MiniLM fine-tune of %s not cached yet: left out", task)
            continue
        folders[task] = finetune(task, seed=0, train_size=SOURCE_TRAIN_SIZE)
    if args.smollm_tasks:
        from transformers import AutoTokenizer

        from examples.merge_lora_adapters import Prompts

        base = smollm_base(args)
        tokenizer = AutoTokenizer.from_pretrained(base)
        for task in args.smollm_tasks:
            cached = cache_root() / "lora" / f"{task}-{adapter_key(task, base, LORA_HYPER)}"
            if getattr(args, "cached_sources_only", False) and not (cached / "adapter_config.json").is_file():
                logger.warning("SmolLM2 LoRA adapter of %s not cached yet: left out", task)
                continue
            train = load_task(task, train_size=SOURCE_TRAIN_SIZE)["train"]
            prompts = Prompts(task, tokenizer, LORA_HYPER["max_chars"])
            folders[task] = cached_adapter(task, base, prompts, train, LORA_HYPER, cache_root() / "lora")
    return folders


def smollm_base(args: argparse.Namespace) -> Path:
    from benchmarks.smollm import smollm2_path

    return smollm2_path()


def build_sources(folders: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """``{task: TransformersSource}``: encoders read through their heads (their fine-tuning max length, 128 tokens),
    decoders through answer-word logits at the end of bench_lora's prompt (text cut to 200 characters); the LoRA
    adapters share one SmolLM2."""
    from examples.merge_lora_adapters import PROMPTS

    options = {}
    for task in folders:
        options[task] = dict(components=args.components, max_length=128)
        if task in args.smollm_tasks:
            options[task].update(
                label_words=label_names(task), prompt=PROMPTS[task], max_length=256, add_special_tokens=False,
                max_chars=LORA_HYPER["max_chars"],
            )  # fmt: skip
    return load_transformers_sources(folders, options)


def fusion_config(kind: str, sources: dict[str, Any], args: argparse.Namespace, **overrides: Any) -> FusionConfig:
    specs = {t: {**s.spec(), "component_widths": s.component_widths, "feature_width": s.feature_width} for t, s in sources.items()}  # fmt: skip
    return FusionConfig(
        tasks=list(sources),
        num_labels={t: s.num_labels for t, s in sources.items()},
        fusion=kind,
        fusion_dim=args.fusion_dim,
        sources=specs,
        **overrides,
    )


# -- data and cached features -----------------------------------------------------------------------------------------
def load_data(args: argparse.Namespace) -> dict[str, dict[str, dict[str, list]]]:
    """``{task: {split: {"text": [...], "label": [...]}}}``. ``train``: the first ``--train-size`` of the sources' own
    600 training examples, or with ``--fusion-data fresh`` as many examples of the training pool the sources never
    saw (the next ones: ``load_task`` slices each class's pool consecutively, so 1,200 extend the 600)."""
    data = {}
    for task in args.tasks:
        splits = load_task(task, train_size=args.source_train_size)
        train = splits["train"][: args.train_size]
        if args.fusion_data == "fresh":
            seen = set(splits["train"]["text"])
            larger = load_task(task, train_size=args.source_train_size + args.train_size)["train"]
            rows = [(t, y) for t, y in zip(larger["text"], larger["label"]) if t not in seen][: args.train_size]
            train = {"text": [t for t, _ in rows], "label": [y for _, y in rows]}
        data[task] = {
            "train": train,
            "validation": splits["validation"][: args.validation_size],
            "test": splits["test"][: args.test_size],
        }
    return data


def _features_path(name: str, spec: dict[str, Any], task: str, split: str, count: int, bf16: bool) -> Path:
    payload = {"source": spec, "task": task, "split": split, "n": count, "bf16": bf16}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_root() / "fusion" / f"features-{name}-on-{task}-{split}-{digest}.safetensors"


def _encode_source(name: str, source, texts: list[str], args) -> dict[str, torch.Tensor]:
    """One source's outputs for ``texts`` (``{"component<k>", "features", "logits"}``), through a fused model that
    holds it alone (the same ``encode_dataset`` path as training)."""
    alone = FusedMultiTaskModel({name: source}, fusion_config("concat", {name: source}, args))
    with autocast(args):
        out = encode_dataset(alone, texts, batch_size=32, disable_tqdm=args.tiny)[name]
    flat = {f"component{k}": c.contiguous() for k, c in enumerate(out.components)}
    flat["features"] = out.features.contiguous()
    if out.logits is not None:
        flat["logits"] = out.logits.contiguous()
    return flat


def cached_features(sources, data, args) -> tuple[dict[str, dict[str, dict[str, SourceOutput]]], dict[str, float]]:
    """``{split: {task: {source: SourceOutput}}}``: every source's outputs on every task's texts, read from / written
    to the feature cache (one file per source, task and split; not with --tiny), and the seconds each split took to
    encode (recorded in the cache files, so a resumed run still reports the full encoding time)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    result: dict[str, dict[str, Any]] = {
        split: {task: {} for task in data} for split in ("train", "validation", "test")
    }
    seconds = dict.fromkeys(result, 0.0)
    for name, source in sources.items():
        spec = source.spec()
        for task, splits in data.items():
            for split in result:
                texts = splits[split]["text"]
                key = "train-fresh" if split == "train" and args.fusion_data == "fresh" else split
                path = _features_path(name, spec, task, key, len(texts), args.bf16)
                if not args.tiny and path.is_file():
                    flat = load_file(path)
                    with safe_open(str(path), "pt") as handle:
                        elapsed = float(handle.metadata()["seconds"])
                else:
                    started = time.perf_counter()
                    flat = _encode_source(name, source, texts, args)
                    elapsed = time.perf_counter() - started
                    logger.info("encoded %s on %s/%s (%d texts) in %.0f s", name, task, split, len(texts), elapsed)
                    if not args.tiny:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        save_file(flat, str(path.with_suffix(".tmp")), metadata={"seconds": f"{elapsed:.3f}"})
                        os.replace(path.with_suffix(".tmp"), path)
                seconds[split] += elapsed
                components = [flat[f"component{k}"] for k in range(len(source.component_widths))]
                result[split][task][name] = SourceOutput(components, flat["features"], flat.get("logits"))
    return result, seconds


# -- fusion: individual sources, AKF, simple fusion -------------------------------------------------------------------
def _individual(sources, features, data, args) -> dict[str, float]:
    """Each source's own prediction: the untrained AKF model, whose every task is its source's head on its source's
    features (``logits_t = head_t(f_t + 0)``), on the cached features."""
    model = FusedMultiTaskModel(sources, fusion_config("akf", sources, args)).eval()
    return evaluate_fusion(model, data, features=features)


def _train_one(kind: str, learning_rate: float, steps: int, sources, features, data, args):
    """One fusion model trained ``steps`` steps at ``learning_rate``; returns it and its trial record."""
    model = FusedMultiTaskModel(sources, fusion_config(kind, sources, args))
    training = FusionTrainingArguments(
        max_steps=steps, per_device_train_batch_size=16, learning_rate=learning_rate,
        eval_steps=max(steps // 10, 1), disable_tqdm=True,
    )  # fmt: skip
    result = train_fusion(
        model,
        {t: d["train"] for t, d in data.items()},
        training,
        {t: d["validation"] for t, d in data.items()},
        train_features=features["train"],
        eval_features=features["validation"],
    )
    validation = next(h["eval"] for h in result.history if h["step"] == result.best_step)
    trial = {
        "learning_rate": learning_rate,
        "steps": steps,
        "best_step": result.best_step,
        "validation": validation,
        "validation_mean": sum(validation.values()) / len(validation),
        "train_seconds": result.train_seconds,
    }
    logger.info("%s lr=%g steps=%d: best step %s, validation %.4f", kind, learning_rate, steps, result.best_step, trial["validation_mean"])  # fmt: skip
    return model, trial


def _fusion_row(kind: str, sources, features, data, args, encode_seconds: float) -> dict[str, Any]:
    """Train ``kind`` at every (learning rate, steps) of the grid; keep the best on validation; score it on test."""
    best, trials = None, []
    for steps in args.steps:
        for learning_rate in LEARNING_RATES:
            model, trial = _train_one(kind, learning_rate, steps, sources, features, data, args)
            trials.append(trial)
            if best is None or trial["validation_mean"] > best[1]["validation_mean"]:
                best = (model, trial)
    model, chosen = best
    test = evaluate_fusion(model, {t: d["test"] for t, d in data.items()}, features=features["test"])
    return {
        "test": test,
        "validation": chosen["validation"],
        "config": {k: chosen[k] for k in ("learning_rate", "steps", "best_step")},
        "trainable_parameters": model.num_parameters(only_trainable=True),
        "train_seconds": encode_seconds + chosen["train_seconds"],
        "train_seconds_parts": {"encode_sources": encode_seconds, "fusion_steps": chosen["train_seconds"]},
        "trials": trials,
    }


def stage_fusion(sources, features, seconds, data, args) -> dict[str, Any]:
    # each source counted whole (as separate models), and the distinct parameters (the LoRA sources share SmolLM2)
    per_source = sum(p.numel() for s in sources.values() for p in s.parameters())
    source_total = sum(p.numel() for p in {id(p): p for s in sources.values() for p in s.parameters()}.values())
    rows: dict[str, Any] = {}
    if args.fusion_data == "source_train":
        rows["individual"] = {
            split: _individual(sources, features[split], {t: d[split] for t, d in data.items()}, args)
            for split in ("test", "validation")
        }
    suffix = "" if args.fusion_data == "source_train" else "_fresh"
    for kind in ("akf", "concat"):
        row = rows[kind + suffix] = _fusion_row(kind, sources, features, data, args, seconds["train"])
        row["trainable_fraction"] = row["trainable_parameters"] / source_total
        logger.info("%s%s: %s", kind, suffix, row["test"])
    return {
        "rows": rows,
        "source_parameters": {"distinct": source_total, "each_source_whole": per_source},
        "encode_seconds": seconds,
    }


# -- weight merges of the same-architecture subsets -------------------------------------------------------------------
def _pick_on_validation(score, label: str) -> dict[str, Any]:
    """Every ``MERGE_GRID`` entry scored on validation by ``score(split, method, config)``; the best one on test."""
    trials = []
    for method, grid in MERGE_GRID.items():
        for config in grid:
            validation = score("validation", method, config)
            trials.append({"method": method, "config": config, "validation": validation})
            logger.info("%s %s %s -> %s", label, method, config, validation)
    best = max(trials, key=lambda trial: sum(trial["validation"].values()) / len(trial["validation"]))
    test = score("test", best["method"], best["config"])
    return {"test": test, "method": best["method"], "config": best["config"], "trials": trials}


def merge_minilm(args) -> dict[str, Any]:
    from benchmarks.harness import TaskSuite

    limits = {"validation": args.validation_size, "test": args.test_size}
    suite = TaskSuite(args.minilm_tasks, split_limits=limits, bf16=args.bf16).prepare()
    merger = suite.merger()

    def score(split, method, config):
        return suite.evaluate(merger.merge(method=method, **config), split)

    return _pick_on_validation(score, "minilm")


def merge_smollm(args) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from examples.merge_lora_adapters import Prompts
    from hf_sta import STAMerger

    base = smollm_base(args)
    folders = _real_sources(argparse.Namespace(**{**vars(args), "minilm_tasks": []}))
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = {t: Prompts(t, tokenizer, LORA_HYPER["max_chars"]) for t in args.smollm_tasks}
    splits = {}
    for task in args.smollm_tasks:
        loaded = load_task(task, train_size=SOURCE_TRAIN_SIZE)
        limits = {"validation": args.validation_size, "test": args.test_size}
        splits[task] = {split: loaded[split].select(range(n)) for split, n in limits.items()}
    merger = STAMerger.from_pretrained(base, adapters=folders)

    def score(split, method, config):
        model = merger.merge(method=method, **config)
        with autocast(args):
            return {t: prompts[t].score(model, splits[t][split]).accuracy for t in args.smollm_tasks}

    return _pick_on_validation(score, "smollm")


def stage_merge(args) -> dict[str, Any]:
    parts = {"minilm": merge_minilm(args) if len(args.minilm_tasks) > 1 else None}
    parts["smollm"] = merge_smollm(args) if len(args.smollm_tasks) > 1 else None
    test = {t: s for part in parts.values() if part for t, s in part["test"].items()}
    return {"rows": {"weight_merge": {"test": test, "subsets": parts}}}


# -- one multi-task fine-tune of MiniLM -------------------------------------------------------------------------------
def _multitask_accuracy(body, heads, tokenizer, data, split: str, args) -> dict[str, float]:
    body.eval()
    scores = {}
    with torch.inference_mode(), autocast(args):
        for task, splits in data.items():
            texts, labels = splits[split]["text"], torch.tensor(splits[split]["label"])
            correct = 0
            for start in range(0, len(texts), 64):
                batch = tokenizer(texts[start : start + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")  # fmt: skip
                predicted = heads[task](body(**batch).pooler_output.float()).argmax(-1)
                correct += int((predicted == labels[start : start + 64]).sum())
            scores[task] = correct / len(texts)
    body.train()
    return scores


def stage_multitask(data, args) -> dict[str, Any]:
    """MiniLM's body (pooler included) shared by every task, one linear head per task, trained as
    ``benchmarks.finetune`` trains one task (AdamW lr 1e-4, warmup 10%, clipping 1.0, 2 epochs of batch 16) on the
    union of the tasks' training sets (proportional sampling); the best of 4 evaluated checkpoints on validation."""
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, get_linear_schedule_with_warmup

    from benchmarks.finetune import minilm_path
    from hf_sta.fusion import MultiTaskSampler

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    if args.tiny:
        body = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))  # fmt: skip
    else:
        body = AutoModel.from_pretrained(minilm_path())
    heads = torch.nn.ModuleDict({t: torch.nn.Linear(body.config.hidden_size, len(label_names(t))) for t in data})
    dropout = torch.nn.Dropout(body.config.hidden_dropout_prob)
    params = [*body.parameters(), *heads.parameters()]
    sizes = {t: len(d["source_train"]["text"]) for t, d in data.items()}
    steps = args.multitask_steps or 2 * sum(sizes.values()) // 16
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, steps // 10, steps)
    sampler = iter(MultiTaskSampler(sizes, batch_size=16, sampling="proportional", seed=0))
    best, history, seconds = None, [], 0.0
    body.train()
    for step in range(1, steps + 1):
        started = time.perf_counter()
        task, rows = next(sampler)
        train = data[task]["source_train"]
        batch = tokenizer([train["text"][i] for i in rows], padding=True, truncation=True, max_length=128, return_tensors="pt")  # fmt: skip
        logits = heads[task](dropout(body(**batch).pooler_output))
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([train["label"][i] for i in rows]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - started
        if step % max(steps // 4, 1) == 0 or step == steps:
            validation = _multitask_accuracy(body, heads, tokenizer, data, "validation", args)
            history.append({"step": step, "validation": validation})
            mean = sum(validation.values()) / len(validation)
            if best is None or mean > best[0]:
                best = (mean, step, _multitask_accuracy(body, heads, tokenizer, data, "test", args), validation)
    _, step, test, validation = best
    row = {"test": test, "validation": validation, "config": {"lr": 1e-4, "steps": steps, "best_step": step}}
    row.update(train_seconds=seconds, trainable_parameters=sum(p.numel() for p in params), history=history)
    return {"rows": {"multitask_finetune": row}}


# -- latency and memory -----------------------------------------------------------------------------------------------
@torch.inference_mode()
def own_prediction(source, texts: list[str]) -> torch.Tensor:
    """A source run on its own as it would be without fusion: a classifier's ``model(**batch).logits``; a causal LM's
    decoder and the answer words' rows of its output layer at the last prompt token (no hidden states kept)."""
    batch = source.tokenize(texts)
    source._activate()  # its adapter, when several sources share one PeftModel
    if source.mode != "answer":
        return source.model(**batch).logits
    base = source.model.get_base_model() if hasattr(source.model, "get_base_model") else source.model
    hidden = base.get_decoder()(**batch).last_hidden_state
    last = batch["attention_mask"].sum(-1) - 1  # right padding (SmolLM2's tokenizer pads right)
    answers = base.get_output_embeddings().weight[source._answer_ids]
    return hidden[torch.arange(len(texts)), last] @ answers.T


def stage_latency(sources, data, args) -> dict[str, Any]:
    """Every task predicted for the same texts: the fused model (untrained AKF: the same cost as a trained one) in
    one call against each source's own forward pass one after another; medians of interleaved repeats."""
    model = FusedMultiTaskModel(sources, fusion_config("akf", sources, args)).eval()
    per_task = max(args.latency_texts // len(data), 1)
    texts = [text for d in data.values() for text in d["test"]["text"][:per_task]]
    runs = {"fused": lambda: model(texts=texts), "separate": lambda: [own_prediction(s, texts) for s in sources.values()]}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode(), autocast(args):
        for run in runs.values():
            run()  # warm-up
        for _ in range(args.latency_repeats):
            for name, run in runs.items():
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
    fused, separate = statistics.median(times["fused"]), statistics.median(times["separate"])
    bytes_of = lambda module: sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])  # noqa: E731
    source_bytes = {t: bytes_of(s) for t, s in sources.items()}
    return {
        "latency": {
            "texts": len(texts),
            "fused_seconds": fused,
            "separate_seconds": separate,
            "ratio": fused / separate,
            "repeats": times,
            "fusion_parameter_bytes": bytes_of(model.fusion),
            "source_parameter_bytes": source_bytes,
            "fused_model_bytes": bytes_of(model),
            "sources_all_loaded_bytes": sum(source_bytes.values()),
            "largest_source_bytes": max(source_bytes.values()),
        }
    }


# -- report -----------------------------------------------------------------------------------------------------------
def _summary(row: dict[str, Any], individual: dict[str, float], tasks: list[str]) -> dict[str, float]:
    covered = [t for t in tasks if t in row["test"]]
    return {
        "mean": sum(row["test"][t] for t in covered) / len(covered),
        "normalised": sum(row["test"][t] / individual[t] for t in covered) / len(covered),
    }


def markdown(result: dict[str, Any]) -> str:
    tasks, rows = result["tasks"], result["rows"]
    individual = rows["individual"]["test"]
    lines = [
        "| Model | " + " | ".join(tasks) + " | mean | normalised | trainable params | training time |",
        "|---|" + "---|" * (len(tasks) + 4),
    ]
    reference = rows.get("multitask_finetune", {}).get("train_seconds")
    for name, row in rows.items():
        summary = _summary(row, individual, tasks)
        cells = [f"{row['test'][t]:.3f}" if t in row["test"] else "n/a" for t in tasks]
        params = f"{row['trainable_parameters']:,}" if "trainable_parameters" in row else "-"
        if "trainable_fraction" in row:
            params += f" ({row['trainable_fraction']:.2%})"
        seconds = "-"
        if "train_seconds" in row:
            seconds = f"{row['train_seconds']:.0f} s" + (
                f" ({row['train_seconds'] / reference:.2f}x)" if reference else ""
            )
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {summary['mean']:.3f} | {summary['normalised']:.3f} | {params} | {seconds} |"
        )  # fmt: skip
    latency = result.get("latency")
    if latency:
        lines.append(
            f"\nLatency, every task for {latency['texts']} texts: fused {latency['fused_seconds']:.2f} s vs the sources "
            f"one after another {latency['separate_seconds']:.2f} s (ratio {latency['ratio']:.3f}). Parameter memory: "
            f"fused model {latency['fused_model_bytes'] / 2**20:.0f} MiB (fusion module "
            f"{latency['fusion_parameter_bytes'] / 2**20:.1f} MiB) vs {latency['sources_all_loaded_bytes'] / 2**20:.0f} MiB "
            f"for all sources loaded, {latency['largest_source_bytes'] / 2**20:.0f} MiB for the largest one alone."
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--stage", choices=("all", *STAGES), default="all")
    parser.add_argument("--minilm-tasks", nargs="*", default=["movie_sentiment", "product_sentiment", "news"])
    parser.add_argument("--smollm-tasks", nargs="*", default=["tweet_sentiment", "subjectivity"])
    parser.add_argument("--train-size", type=int, default=600, help="fusion training examples per task (of the 600)")
    parser.add_argument(
        "--fusion-data", choices=("source_train", "fresh"), default="source_train",
        help="fusion training data: the sources' own training examples, or as many of the pool they never saw",
    )  # fmt: skip
    parser.add_argument("--validation-size", type=int, default=100)
    parser.add_argument("--test-size", type=int, default=300)
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 3000], help="fusion training steps (grid)")
    parser.add_argument("--multitask-steps", type=int, default=None, help="default: 2 epochs of batch 16")
    parser.add_argument("--components", type=int, default=3)
    parser.add_argument("--fusion-dim", type=int, default=128)
    parser.add_argument("--latency-texts", type=int, default=40)
    parser.add_argument("--latency-repeats", type=int, default=5)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument(
        "--cached-sources-only", action="store_true", help="--stage encode: skip sources not trained yet (no training)"
    )
    args = parser.parse_args(argv)
    args.source_train_size = SOURCE_TRAIN_SIZE
    if args.tiny:
        args.minilm_tasks, args.smollm_tasks = ["movie_sentiment", "subjectivity"], ["tweet_sentiment", "news"]
        args.source_train_size, args.train_size, args.validation_size, args.test_size = 24, 24, 8, 8
        args.steps, args.multitask_steps, args.fusion_dim, args.latency_texts = [10], 4, 32, 8
        args.components, args.latency_repeats = 2, 1
    args.tasks = [*args.minilm_tasks, *args.smollm_tasks]
    return args


def _run_stages(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"tasks": args.tasks, "rows": {}}
    data = load_data(args)
    if args.stage in ("all", "encode", "fusion", "latency"):
        folders = _tiny_sources(work, args.minilm_tasks, args.smollm_tasks) if args.tiny else _real_sources(args)
        sources = build_sources(folders, args)
        if args.stage in ("all", "encode", "fusion"):
            features, seconds = cached_features(sources, data, args)
            if args.stage != "encode":  # (--fusion-data fresh writes the part file fusion-fresh.json)
                part = stage_fusion(sources, features, seconds, data, args)
                result["rows"].update(part.pop("rows"))
                result.update(part)
        if args.stage in ("all", "latency"):
            result.update(stage_latency(sources, data, args))
    if args.stage in ("all", "merge") and not args.tiny:
        result["rows"].update(stage_merge(args)["rows"])
    if args.stage in ("all", "multitask"):
        for task, splits in data.items():
            splits["source_train"] = load_task(task, train_size=args.source_train_size)["train"][:]
        result["rows"].update(stage_multitask(data, args)["rows"])
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("bench_fusion", "hf_sta"):
        logging.getLogger(name).setLevel(logging.WARNING if args.tiny else logging.INFO)
    if args.stage == "report":
        return report(args)
    with tempfile.TemporaryDirectory() as tmp:
        result = _run_stages(args, Path(tmp))
    if args.tiny or args.stage == "encode":
        return result
    PARTS.mkdir(parents=True, exist_ok=True)
    name = f"{args.stage}-fresh" if args.stage == "fusion" and args.fusion_data == "fresh" else args.stage
    (PARTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return report(args) if args.stage == "all" else result


def _environment(args: argparse.Namespace) -> dict[str, Any]:
    import platform

    return {
        "torch": torch.__version__,
        "threads": args.num_threads,
        "bf16_autocast": args.bf16,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "gpu": torch.cuda.is_available(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def report(args: argparse.Namespace) -> dict[str, Any]:
    """Merge the stage files into ``results/fusion.json`` and ``results/fusion.md``."""
    result: dict[str, Any] = {"tasks": args.tasks, "rows": {}}
    order = ("individual", "akf", "concat", "weight_merge", "multitask_finetune", "akf_fresh", "concat_fresh")
    for stage in ("all", "fusion", "fusion-fresh", "merge", "multitask", "latency"):
        path = PARTS / f"{stage}.json"
        if path.is_file():
            part = json.loads(path.read_text())
            result["rows"].update(part.pop("rows"))
            if stage == "fusion-fresh":  # its own encoding (other texts), not the source-train run's
                part["encode_seconds_fresh"] = part.pop("encode_seconds")
            result.update({k: v for k, v in part.items() if k != "tasks"})
    if "individual" not in result["rows"]:
        raise SystemExit("Run --stage fusion first: the report needs the individual models' scores.")
    result["rows"] = {name: result["rows"][name] for name in order if name in result["rows"]}
    individual = result["rows"]["individual"]["test"]
    for row in result["rows"].values():
        row.update(_summary(row, individual, args.tasks))
    result["protocol"] = {
        "minilm_tasks": args.minilm_tasks, "smollm_tasks": args.smollm_tasks, "train_size": args.train_size,
        "validation_size": args.validation_size, "test_size": args.test_size, "fusion_steps": args.steps,
        "learning_rates": LEARNING_RATES, "merge_grid": MERGE_GRID, "lora_adapters": LORA_HYPER,
        "components": args.components, "fusion_dim": args.fusion_dim,
    }  # fmt: skip
    result["environment"] = _environment(args)
    (RESULTS / "fusion.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "fusion.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
