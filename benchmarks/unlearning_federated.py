"""Federated unlearning with data vectors (``python -m benchmarks.bench_unlearning --part federated``).

``K`` sites hold private shards of three binary sentiment sources (movie reviews, tweets, product reviews): every site
fine-tunes the same common start (MiniLM + one shared classifier initialisation) on its own shard and ships only its
data vector ``tau_s`` (and its STA importance); the coordinator averages them. Then site ``j`` asks to be forgotten.
Compared, on the coordinator's merged model:

- ``retrain``: the remaining sites fine-tune again and the coordinator averages them (the gold standard of this
  federation; site training is deterministic, so its weights are those of ``remerge`` -- checked once -- and its cost
  is the remaining sites' measured training time);
- ``pooled retrain``: one model trained from the common start on the remaining shards pooled (the centralised gold
  standard, which the sites' privacy forbids);
- ``remerge``: average the kept vectors of the remaining sites (exact, as the merge is one-shot);
- ``subtract``: ``theta - w_j tau_j`` (negation at ``w_j = 1/K``: exact only for a sum merge -- the sum merge minus
  ``tau_j`` is compared with the sum merge of the others, entry by entry);
- ``sta``: ``theta - w_j m_j tau_j`` with site ``j``'s shipped importance;
- ``fused``: ``merger.unlearn`` on the merged model, retain = the other sites' first ``calibration`` examples,
  ``forget_loss="none"`` (the paper's retain fit); site ``j``'s shard is read only for the layer scores (in a real
  federation site ``j`` computes them on its own data and ships the layer list, as it ships its importance).

Metrics: accuracy on site ``j``'s shard (forget set) and on its source's test rows, mean test accuracy of the other
sources (retain), the loss-threshold membership attack (``j``'s shard against as many unseen test rows of its source),
wall time, trainable parameters, examples read, reversibility.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.unlearning_scoring import Scorer, model_forward
from hf_sta import STAMerger, TaskVector

logger = logging.getLogger(__name__)

SITES = ("movie_sentiment", "tweet_sentiment", "product_sentiment")


@dataclass
class Federation:
    """The common start, every site's shipped files and training time, and the scored row sets."""

    start: Path
    settings: Any
    shards: dict[str, Any]
    folders: dict[str, Path] = field(default_factory=dict)
    vectors: dict[str, Path] = field(default_factory=dict)
    importance: dict[str, Path] = field(default_factory=dict)
    train_seconds: dict[str, float] = field(default_factory=dict)
    scorer: Scorer | None = None

    @property
    def sites(self) -> list[str]:
        return list(self.shards)

    def accuracy(self, model, rows: str) -> float:
        return self.scorer.accuracy(model, rows, model_forward)


def _train_site(federation: Federation, site: str, rows, seed: int, tokenizer) -> tuple[Any, float]:
    from transformers import AutoModelForSequenceClassification

    from examples._common import train_classifier

    torch.manual_seed(seed)  # dropout
    model = AutoModelForSequenceClassification.from_pretrained(federation.start)
    started = time.perf_counter()
    train_classifier(model, rows, tokenizer, federation.settings, seed)
    return model, time.perf_counter() - started


def build_federation(root: Path, settings, shard_size: int, test_size: int, calibration: int) -> Federation:
    """Train (or reuse under ``root``) the common start and the sites; ship their vectors and importance."""
    from examples._common import base_model_dir, load_splits, load_tokenizer, new_classifier

    splits = {site: load_splits(site, settings) for site in SITES}
    shards = {site: splits[site]["train"].select(range(shard_size)) for site in SITES}
    federation = Federation(root / "start", settings, shards)
    tokenizer = load_tokenizer(base_model_dir(settings, root))
    if not (federation.start / "config.json").is_file():
        model = new_classifier(base_model_dir(settings, root), SITES[0], settings.seed)  # same labels at every site
        model.save_pretrained(federation.start)
        tokenizer.save_pretrained(federation.start)
    for index, site in enumerate(SITES):
        folder, info = root / "sites" / site, root / "sites" / f"{site}.json"
        if not info.is_file():
            model, seconds = _train_site(federation, site, shards[site], settings.seed + index, tokenizer)
            model.save_pretrained(folder)
            TaskVector.from_pretrained(federation.start, folder, name=site, task_specific=None).save(
                root / "shipped" / f"{site}.safetensors", metadata={"num_samples": str(shard_size)})  # fmt: skip
            scorer = STAMerger.from_pretrained(federation.start, {site: folder}, task_specific=None)
            scorer.compute_importance(site, shards[site], num_samples=calibration, max_length=settings.max_length,
                                      show_progress=False)  # fmt: skip
            scorer.save_importance(site, root / "shipped" / f"{site}.importance.safetensors", overwrite=True)
            info.write_text(json.dumps({"train_seconds": seconds, "threads": torch.get_num_threads()}) + "\n")
        federation.folders[site] = folder
        federation.vectors[site] = root / "shipped" / f"{site}.safetensors"
        federation.importance[site] = root / "shipped" / f"{site}.importance.safetensors"
        federation.train_seconds[site] = json.loads(info.read_text())["train_seconds"]
    federation.scorer = Scorer(tokenizer, settings.max_length, bf16=not settings.tiny)
    for site in SITES:
        federation.scorer.add(f"{site}/shard", shards[site])
        federation.scorer.add(
            f"{site}/test", splits[site]["test"].select(range(min(test_size, len(splits[site]["test"]))))
        )
    return federation


def _row(federation: Federation, site: str, model, seconds: float, **extra) -> dict[str, Any]:
    others = [s for s in federation.sites if s != site]
    row = {
        "forget_accuracy": federation.accuracy(model, f"{site}/shard"),
        "forget_source_test_accuracy": federation.accuracy(model, f"{site}/test"),
        "retain_accuracy": sum(federation.accuracy(model, f"{s}/test") for s in others) / len(others),
        "seconds": seconds,
        **extra,
    }
    row.update(federation.scorer.membership(model, f"{site}/shard", f"{site}/test", model_forward))
    return row


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())


def sum_merge_exactness(merger: STAMerger, site: str, work: Path) -> dict[str, float]:
    """``sum merge - tau_j`` against the sum merge of the other sites (fp32): the largest entry difference."""
    others = [s for s in merger.tasks if s != site]
    summed = merger.merge(method="task_arithmetic", output_dir=work / "sum", overwrite=True)
    subtracted = merger.forget(site, method="negation", scaling=1.0, target=summed).state_dict()
    without = merger.merge(method="task_arithmetic", tasks=others).state_dict()
    scale = max(float(v.abs().max()) for v in without.values() if v.is_floating_point())
    return {"max_abs_difference": _max_difference(subtracted, without), "largest_weight": scale}


def determinism_check(federation: Federation, site: str, tokenizer) -> dict[str, Any]:
    """Retrain one site as it was trained and compare its weights with the shipped ones (retrain == remerge)."""
    from transformers import AutoModelForSequenceClassification

    index = federation.sites.index(site)
    model, seconds = _train_site(
        federation, site, federation.shards[site], federation.settings.seed + index, tokenizer
    )
    shipped = AutoModelForSequenceClassification.from_pretrained(federation.folders[site]).state_dict()
    retrained = model.state_dict()
    equal = all(torch.equal(retrained[k], shipped[k]) for k in shipped)
    return {"site": site, "bitwise_equal": equal, "max_abs_difference": _max_difference(retrained, shipped),
            "seconds": seconds}  # fmt: skip


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _full_parameters(federation: Federation) -> int:
    from transformers import AutoModelForSequenceClassification

    return sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(federation.start).parameters())


def _edit_rows(federation: Federation, merger: STAMerger, site: str, merged: Path) -> dict[str, dict]:
    """Re-merge, subtraction and STA forgetting of ``site`` from the average merge on disk."""
    others = [s for s in federation.sites if s != site]
    weight = 1.0 / len(federation.sites)
    rows = {}
    started = time.perf_counter()
    model = merger.merge(method="average", tasks=others)
    rows["remerge without site"] = _row(federation, site, model, time.perf_counter() - started, trainable=0,
                                        examples=0, reversible="keep the old merge")  # fmt: skip
    for name, method in (("subtract w_j tau_j", "negation"), ("sta forget (w_j)", "sta")):
        started = time.perf_counter()
        model = merger.forget(site, method=method, scaling=weight, target=merged)
        rows[name] = _row(federation, site, model, time.perf_counter() - started, trainable=0, examples=0,
                          reversible="add the edit back (fp32 rounding)")  # fmt: skip
    return rows


def _fused_row(
    federation: Federation, merger: STAMerger, site: str, merged: Path, fused: dict, calibration: int | None
):
    """``merger.unlearn`` on the merged model; retain = the first ``calibration`` rows per other site (None: all)."""
    from transformers import AutoModelForSequenceClassification

    others = [s for s in federation.sites if s != site]
    retain = {s: federation.shards[s] for s in others}
    if calibration is not None:
        retain = {s: rows.select(range(min(calibration, len(rows)))) for s, rows in retain.items()}
    started = time.perf_counter()
    model = merger.unlearn(merged, federation.shards[site], retain, tokenizer=federation.scorer.tokenizer,
                           max_length=federation.settings.max_length, show_progress=False, **fused)  # fmt: skip
    seconds = time.perf_counter() - started
    record = merger.last_unlearning
    probe = federation.scorer.first_batch(f"{site}/test")
    reference = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    with torch.inference_mode(), model.disable_adapter():
        reversible = bool(torch.equal(model(**probe).logits, reference(**probe).logits))
    examples = sum(record["examples_touched"].values())
    return _row(federation, site, model, seconds, trainable=record["trainable_parameters"], examples=examples,
                reversible=reversible, layers=record["layers"], steps=record["steps"],
                sensitivity=record["sensitivity"], history=record["history"])  # fmt: skip


def _retrain_rows(federation: Federation, merger: STAMerger, site: str, pooled: bool, tokenizer) -> dict[str, dict]:
    others = [s for s in federation.sites if s != site]
    settings, full = federation.settings, _full_parameters(federation)
    examples = sum(len(federation.shards[s]) for s in others)  # distinct rows, each read `settings.epochs` times
    model = merger.merge(method="average", tasks=others)  # what the retrained sites ship (training is deterministic)
    seconds = sum(federation.train_seconds[s] for s in others)
    rows = {"retrain (remaining sites)": _row(federation, site, model, seconds, trainable=full, examples=examples,
                                              reversible="no")}  # fmt: skip
    if pooled:
        import datasets

        rows_pooled = datasets.concatenate_datasets([federation.shards[s] for s in others])
        model, seconds = _train_site(federation, "pooled", rows_pooled, settings.seed, tokenizer)
        rows["pooled retrain"] = _row(federation, site, model, seconds, trainable=full, examples=examples,
                                      epochs=settings.epochs, reversible="no")  # fmt: skip
    return rows


def forget_site(federation: Federation, site: str, work: Path, *, fused: dict, calibration: int, pooled: bool,
                cache: Path | None, protocol: dict, variants: dict[str, tuple[dict, int | None]] | None = None,
                ) -> dict[str, Any]:  # fmt: skip
    """Every method forgetting ``site`` from the average merge; reused from ``cache/<site>.json`` when unchanged.

    ``variants``: ``{row name: (unlearn settings, retain rows per site or None for all)}``, extra FUSED rows (an
    ablation) computed and added to a cached result without recomputing the rest."""
    protocol = {**protocol, "site": site, "fused": fused, "calibration": calibration, "pooled": pooled}
    path = cache / f"{site}.json" if cache else None
    result = None
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        if saved["protocol"] == json.loads(json.dumps(protocol, default=str)):
            logger.info("reusing %s", path)
            result = saved
    merger = STAMerger.from_task_vectors(federation.start, federation.vectors, importance=federation.importance)
    merged = work / "average"
    if result is None or _missing(result, variants):
        merged = merger.merge(method="average", output_dir=merged, overwrite=True)
    if result is None:
        result = {"protocol": protocol, "site": site, "rows": _main_rows(federation, merger, site, merged, fused,
                                                                         calibration, pooled),
                  "sum_merge": sum_merge_exactness(merger, site, work)}  # fmt: skip
    for name, (settings, retain) in (variants or {}).items():
        if name in _missing(result, variants):
            result["rows"][name] = _fused_row(federation, merger, site, merged, dict(settings), retain)
            result.setdefault("variants", {})[name] = {"settings": settings, "retain_per_site": retain}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def _missing(result: dict, variants: dict | None) -> list[str]:
    """Variant rows absent from ``result`` or computed with other settings."""
    saved = result.get("variants", {})
    return [
        name
        for name, (settings, retain) in (variants or {}).items()
        if name not in result["rows"]
        or saved.get(name) != json.loads(json.dumps({"settings": settings, "retain_per_site": retain}))
    ]


def _main_rows(federation, merger, site: str, merged: Path, fused: dict, calibration: int, pooled: bool) -> dict:
    from transformers import AutoModelForSequenceClassification

    rows = {"merged (before)": _row(federation, site, AutoModelForSequenceClassification.from_pretrained(merged), 0.0)}
    rows.update(_retrain_rows(federation, merger, site, pooled, federation.scorer.tokenizer))
    rows.update(_edit_rows(federation, merger, site, merged))
    rows["fused"] = _fused_row(federation, merger, site, merged, dict(fused), calibration)
    return rows
