"""One suite's merges scored side by side: STA's constant cells, the tuned baselines, ``auto``, and why STA differs.

A :class:`Workload` is one suite ready to merge: its merger (importance computed), the base body, each task's own
score (the reference of normalised accuracy), a scorer ``evaluate(body, split) -> {task: accuracy}`` and labelled
calibration data per task for ``auto``. :func:`real_workload` builds it from the cached MiniLM fine-tunes
(``benchmarks.harness.TaskSuite``), :func:`tiny_workload` from tiny BERT fine-tunes (``examples._common``) for the
``--tiny`` test.

Every method's merge is ``theta_0 + lambda * delta`` with ``delta`` the method's merged delta at scaling 1, so
:class:`SuiteScores` computes ``delta`` once per (method, parameters) and scores each scaling by loading
``theta_0 + lambda * delta`` into one body. Scores are cached in a JSON file (resumable runs), keyed by method,
parameters, scaling and split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_sta import STAMerger

logger = logging.getLogger(__name__)
KEPT_DELTAS = 3


@dataclass
class Workload:
    """A suite ready to merge and score (see the module docstring)."""

    name: str
    tasks: list[str]
    merger: STAMerger
    base_body: Callable[[], torch.nn.Module]
    evaluate: Callable[[torch.nn.Module, str], dict[str, float]]
    individual: Callable[[str], dict[str, float]]  # split -> {task: accuracy of the task's own fine-tune}
    calibration: dict[str, Any]  # {task: labelled, tokenized examples} for auto
    protocol: dict[str, Any]
    cache: Path


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def tokenized(rows, tokenizer, max_length: int):
    """``rows`` (text, label) tokenized as the fine-tune was, with labels (``auto``'s cross-entropy objective)."""
    import datasets

    encoded = dict(tokenizer(list(rows["text"]), truncation=True, max_length=max_length))
    return datasets.Dataset.from_dict({**encoded, "label": list(rows["label"])})


def real_workload(name: str, tasks: Sequence[str], calibration_samples: int, cache_dir: Path) -> Workload:
    """MiniLM fine-tunes of seed 0 (``benchmarks.finetune``), ``taylor`` importance on the first
    ``calibration_samples`` training examples (cached), the same examples as ``auto``'s calibration data."""
    from transformers import AutoTokenizer

    from benchmarks.finetune import read_finetune_info
    from benchmarks.harness import TaskSuite

    suite = TaskSuite(list(tasks), seed=0).prepare()
    merger = suite.merger()
    calibration = {}
    for task in tasks:
        suite.importance(merger, task, calibration_samples)
        tokenizer = AutoTokenizer.from_pretrained(suite.model_dirs[task])
        max_length = read_finetune_info(suite.model_dirs[task])["max_length"]
        calibration[task] = tokenized(suite.calibration(task, calibration_samples), tokenizer, max_length)
    models = {task: path.name for task, path in suite.model_dirs.items()}
    protocol = {
        "models": models,
        "importance": f"taylor, {calibration_samples} training examples",
        "scoring": "bf16 autocast" if suite.bf16 else "fp32",
    }
    return Workload(
        name=name,
        tasks=list(tasks),
        merger=merger,
        base_body=suite.base_body,
        evaluate=lambda body, split: suite.evaluate(body, split),
        individual=suite.individual,
        calibration=calibration,
        protocol=protocol,
        cache=cache_dir / f"{name}-{digest(protocol)}.json",
    )


def tiny_workload(name: str, tasks: Sequence[str], work: Path) -> Workload:
    """Tiny BERT fine-tunes (``examples._common``, cached under ``work``), 16 calibration and 32 scored examples."""
    from transformers import BertModel

    from examples._common import Settings, finetuned_models, load_splits, load_tokenizer, read_head, score_body

    settings = Settings(tiny=True, train_size=32, epochs=2, lr=3e-3, eval_size=32, seed=0, batch_size=8, max_length=32)
    base, models = finetuned_models(tasks, settings, work / "models")
    data = {task: load_splits(task, settings) for task in tasks}
    tokenizer = load_tokenizer(base)
    heads = {task: read_head(folder) for task, folder in models.items()}
    merger = STAMerger.from_pretrained(base, {task: models[task] for task in tasks})
    for task in tasks:
        merger.compute_importance(task, data[task]["train"], num_samples=16, max_length=32, show_progress=False)

    def evaluate(body: torch.nn.Module, split: str) -> dict[str, float]:
        return {t: score_body(body, heads[t], data[t][split], tokenizer, 32).accuracy for t in tasks}

    def individual(split: str) -> dict[str, float]:
        return {t: score_body(BertModel.from_pretrained(models[t]), heads[t], data[t][split], tokenizer, 32).accuracy
                for t in tasks}  # fmt: skip

    return Workload(
        name=name,
        tasks=list(tasks),
        merger=merger,
        base_body=lambda: BertModel.from_pretrained(base),
        evaluate=evaluate,
        individual=individual,
        calibration={t: tokenized(data[t]["train"].select(range(16)), tokenizer, 32) for t in tasks},
        protocol={"models": "tiny"},
        cache=work / f"{name}.json",
    )


def normalized(scores: Mapping[str, float], reference: Mapping[str, float]) -> float:
    """Mean over tasks of ``score / the task's own fine-tune's score``."""
    return sum(scores[t] / reference[t] for t in scores) / len(scores)


def cell_key(method: str, params: Mapping[str, Any], scaling: float | str, split: str) -> str:
    return json.dumps([method, dict(sorted(params.items())), scaling, split])


@dataclass
class SuiteScores:
    """Scores of merges of one workload, cached in ``workload.cache`` (a JSON file rewritten after each score)."""

    workload: Workload
    time_auto: bool = True
    """For ``scaling="auto"``, also time the merge at the chosen value and a one-point search (its cost in passes)."""
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    _deltas: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    _body: torch.nn.Module | None = None
    _base: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        self._refresh()

    def _refresh(self) -> None:
        """Add the rows another run saved meanwhile (two runs may fill one cache, e.g. baselines beside STA)."""
        path = self.workload.cache
        saved = json.loads(path.read_text()) if path.is_file() else {}
        if saved.get("protocol") == json.loads(json.dumps(self.workload.protocol, default=str)):
            self.rows = {**saved["rows"], **self.rows}

    def _cached(self, key: str) -> bool:
        if key not in self.rows:
            self._refresh()
        return key in self.rows

    def _save(self) -> None:
        self._refresh()
        path = self.workload.cache
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"protocol": self.workload.protocol, "rows": self.rows}
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(payload, default=str) + "\n")
        temporary.replace(path)

    def reference(self, split: str) -> dict[str, float]:
        """Each task's own fine-tune's accuracy on ``split`` (cached like the merges' scores)."""
        key = cell_key("individual", {}, 0.0, split)
        if not self._cached(key):
            self.rows[key] = {"scores": self.workload.individual(split)}
            self._save()
        return self.rows[key]["scores"]

    def delta(self, method: str, params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The merged delta at scaling 1 (the last :data:`KEPT_DELTAS` are kept: a MiniLM delta is 90 MB)."""
        key = cell_key(method, params, 1.0, "delta")
        if key not in self._deltas:
            if self._body is None:
                self._body = self.workload.base_body()
                self._base = {k: v.detach().clone() for k, v in self._body.state_dict().items()}
            merged = self.workload.merger.merge(method=method, scaling=1.0, **params).state_dict()
            floating = [k for k, v in self._base.items() if v.is_floating_point()]
            self._deltas[key] = {k: merged[k].float() - self._base[k].float() for k in floating}
            while len(self._deltas) > KEPT_DELTAS:
                self._deltas.pop(next(iter(self._deltas)))
        return self._deltas[key]

    def body(self, delta: Mapping[str, torch.Tensor], scaling: float) -> torch.nn.Module:
        """The shared body loaded with ``theta_0 + scaling * delta``."""
        state = {k: (v + scaling * delta[k]).to(v.dtype) if k in delta else v for k, v in self._base.items()}
        self._body.load_state_dict(state)
        return self._body

    def score(self, method: str, params: Mapping[str, Any], scaling: float, split: str) -> dict[str, Any]:
        """``{"scores": {task: accuracy}, "normalized": ..., "delta_norm": ||scaling * delta||}`` (cached)."""
        key = cell_key(method, params, scaling, split)
        if not self._cached(key):
            delta = self.delta(method, params)
            scores = self.workload.evaluate(self.body(delta, scaling), split)
            norm = scaling * float(torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values())))
            self.rows[key] = {
                "scores": scores,
                "normalized": normalized(scores, self.reference(split)),
                "delta_norm": norm,
            }
            logger.info("%s %s %s scaling %g %s: %.4f", self.workload.name, method, params, scaling, split,
                        self.rows[key]["normalized"])  # fmt: skip
            self._save()
        return self.rows[key]

    def _auto_cost(self, method: str, fixed: dict, scaling: float, seconds: float, passes: int) -> dict[str, float]:
        """Time of the plain merge at the chosen values and of a one-point search (same set-up, one pass): one
        pass = (auto - one point) / (passes - 1); auto's cost = (auto - plain merge) / one pass."""
        merger = self.workload.merger
        started = time.perf_counter()
        merger.merge(method=method, scaling=scaling, **fixed)
        plain_seconds = time.perf_counter() - started
        started = time.perf_counter()
        merger.merge(method=method, scaling=[scaling], data=self.workload.calibration, **fixed)
        one_point_seconds = time.perf_counter() - started
        pass_seconds = (seconds - one_point_seconds) / max(passes - 1, 1)
        return {
            "plain_merge_seconds": plain_seconds,
            "one_point_search_seconds": one_point_seconds,
            "pass_seconds": pass_seconds,
            "cost_in_passes": (seconds - plain_seconds) / pass_seconds if pass_seconds > 0 else None,
        }

    def auto(self, method: str, params: Mapping[str, Any], searched: Sequence[str]) -> dict[str, Any]:
        """``method`` with ``searched`` (``scaling``/``density``) set to ``"auto"`` on the calibration data, scored on
        validation and test, with the search record, its wall time and that of the same merge at fixed values."""
        key = cell_key(method, {**params, **dict.fromkeys(searched, "auto")}, "auto", "auto")
        if not self._cached(key):
            merger, extra = self.workload.merger, dict.fromkeys(searched, "auto")
            started = time.perf_counter()
            body = merger.merge(method=method, data=self.workload.calibration, **params, **extra)
            seconds = time.perf_counter() - started
            record = merger.last_record["auto"]
            chosen = dict(record["chosen"])
            fixed = {**params, **{k: v for k, v in chosen.items() if k != "scaling"}}
            row = {"chosen": chosen, "record": record, "seconds": seconds}
            if self.time_auto and list(searched) == ["scaling"]:
                row.update(self._auto_cost(method, fixed, chosen["scaling"], seconds, record["calibration_passes"]))
            for split in ("validation", "test"):
                scores = self.workload.evaluate(body, split)
                row[split] = {"scores": scores, "normalized": normalized(scores, self.reference(split))}
            self.rows[key] = row
            logger.info("%s %s auto %s: chose %s, test %.4f", self.workload.name, method, searched, chosen,
                        row["test"]["normalized"])  # fmt: skip
            self._save()
        return self.rows[key]


def selection_stats(merger: STAMerger, tasks: Sequence[str], density: float) -> dict[str, Any]:
    """What STA (``overlap="elect"``, per-tensor ``density``) keeps of each task vector, over every merged tensor.

    Per task ``t``: ``kept_energy = sum ||m_t tau_t||^2 / sum ||tau_t||^2`` (the share of the task vector's squared
    norm its mask keeps) and ``elected_energy`` (the share that also survives the sign election, i.e. the entries
    where ``tau_t`` agrees with the elected sign). Per pair of tasks: Jaccard ``|m_s & m_t| / |m_s | m_t|`` of the
    masks, and the value two independent masks of that density would have, ``d^2 / (2d - d^2)``.
    """
    from hf_sta.methods.sta import importance_masks

    count = len(tasks)
    vectors = [merger.task_vectors[t] for t in tasks]
    importance = [merger.importance[t] for t in tasks]
    total, kept, elected = (torch.zeros(count, dtype=torch.float64) for _ in range(3))
    intersection = torch.zeros(count, count, dtype=torch.float64)
    union = torch.zeros(count, count, dtype=torch.float64)
    for key in vectors[0].keys():
        if not all(key in scores for scores in importance):
            continue
        taus = torch.stack([vector[key].float() for vector in vectors])
        masks, _ = importance_masks(torch.stack([scores[key] for scores in importance]), threshold=None,
                                    density=density)  # fmt: skip
        flat_tau, flat_mask = taus.reshape(count, -1), masks.reshape(count, -1)
        weighted = flat_tau * flat_mask
        sign = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
        total += (flat_tau.double() ** 2).sum(dim=1)
        kept += (weighted.double() ** 2).sum(dim=1)
        elected += ((weighted * ((weighted * sign) > 0)).double() ** 2).sum(dim=1)
        as_float = flat_mask.float()
        both = as_float @ as_float.T
        per_task = as_float.sum(dim=1)
        intersection += both.double()
        union += (per_task[:, None] + per_task[None, :] - both).double()
    jaccard = {
        f"{tasks[i]}|{tasks[j]}": float(intersection[i, j] / union[i, j])
        for i in range(count)
        for j in range(i + 1, count)
    }
    return {
        "density": density,
        "kept_energy": dict(zip(tasks, (kept / total).tolist())),
        "elected_energy": dict(zip(tasks, (elected / total).tolist())),
        "task_vector_norm": dict(zip(tasks, total.sqrt().tolist())),
        "jaccard": jaccard,
        "jaccard_mean": sum(jaccard.values()) / max(len(jaccard), 1),
        "jaccard_independent": density**2 / (2 * density - density**2),
    }
