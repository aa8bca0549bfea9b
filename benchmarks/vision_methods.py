"""The issue-13 methods on the vision (BatchNorm) benchmark: data-free spectral merges, Fisher and RegMean, and
learned coefficients (AdaMerging, DV-BASI), scored like every other row (base and re-estimated BN statistics).

* Data-free (``tsv``, ``iso_c``, ``iso_cts``, ``cart``, ``wudi``): tuned on validation over ``DATA_FREE_GRIDS``.
* ``fisher``: per-sample squared gradients (micro-batches of 1) on the calibration examples of each task;
  ``regmean``: input Grams of every ``nn.Linear`` and pointwise (1x1) ``nn.Conv2d`` of each task's own fine-tune on
  the same examples (EfficientNet's expand / project convolutions; 3x3 depthwise convolutions and BatchNorm average).
* ``adamerging`` (layer-wise, entropy of each task's predictions on its validation images, labels never read) and
  ``dv_basi`` (tensor-wise, cross entropy on the calibration examples, plateau judged on validation): the
  calibration model is the base network in eval mode, so the objective sees the base's BatchNorm statistics (the
  merged model is then scored with base and with re-estimated statistics like every row).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.method_runs import METHOD_LABELS
from benchmarks.vision import classification_loss

DATA_FREE_GRIDS = {
    "tsv": [{"scaling": s} for s in (0.7, 1.0, 1.3)],
    "iso_c": [{"scaling": s} for s in (1.0, 1.5)],
    "iso_cts": [{"scaling": s} for s in (1.0, 1.5)],
    "cart": [{"scaling": 1.0, "low_rank_coefficient": c} for c in (1.0, 2.0)],
    "wudi": [{"scaling": 1.0}],
}
DATA_AWARE_GRIDS = {
    "fisher": [{"scaling": s} for s in (1.0, 2.0)],
    "regmean": [{"alpha": a, "scaling": 1.0} for a in (0.5, 0.9)],
}
LEARNED = {
    "adamerging": {"granularity": "layer", "steps": 60, "lr": 1e-2, "batch_size": 16},
    "dv_basi": {"granularity": "tensor", "steps": 30, "rounds": 3, "lr": 1e-2, "batch_size": 16},
}
TINY_LEARNED = {
    "adamerging": {"granularity": "layer", "steps": 3, "lr": 1e-2, "batch_size": 8},
    "dv_basi": {"granularity": "tensor", "steps": 3, "rounds": 2, "lr": 1e-2, "batch_size": 8},
}
LABELS = {
    **METHOD_LABELS,
    "adamerging": "AdaMerging, layer-wise (entropy on validation inputs)",
    "dv_basi": "DV-BASI (few labelled train examples)",
}


def _forward_images(model, batch):
    return model(batch[0] if isinstance(batch, (list, tuple)) else batch)


def _validation_loader(suite, task: str, labels: bool, batch_size: int = 16) -> torch.utils.data.DataLoader:
    split = suite.data[task]["validation"]
    tensors = (split.rgb().contiguous(), split.labels) if labels else (split.rgb().contiguous(),)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*tensors), batch_size=batch_size)


def measure_data_aware(bench, method: str, calibration: int) -> float:
    """Fisher (per-sample squared gradients) or RegMean Grams for every task; returns the seconds it took."""
    started = time.perf_counter()
    suite = bench.suite
    for task in suite.tasks:
        loader = suite.calibration_loader(task, calibration, batch_size=1 if method == "fisher" else 8)
        model = suite.model(suite.finetuned[task])
        if method == "fisher":
            bench.merger.compute_importance(
                task, loader, model=model, loss_fn=classification_loss, metric="fisher", micro_batch_size=1,
                num_samples=calibration, show_progress=False,
            )  # fmt: skip
        else:
            bench.merger.compute_activation_statistics(
                task, loader, model=model, forward_fn=_forward_images, num_samples=calibration, show_progress=False
            )
    return time.perf_counter() - started


def learned_scores(bench, method: str, params: dict[str, Any], calibration: int) -> tuple[dict, dict]:
    """``({reestimated: {task: test accuracy}}, record)`` of one learned merge (see the module docstring)."""
    suite = bench.suite
    model = suite.model(suite.base_state)
    if method == "adamerging":
        data = {t: _validation_loader(suite, t, labels=False) for t in suite.tasks}
        objective = dict(predict_fn=dict.fromkeys(suite.tasks, _forward_images))
    else:
        data = {t: suite.calibration_loader(t, calibration, batch_size=params["batch_size"]) for t in suite.tasks}
        validation = {t: _validation_loader(suite, t, labels=True) for t in suite.tasks}
        objective = dict(loss_fn=dict.fromkeys(suite.tasks, classification_loss), validation_data=validation)
    started = time.perf_counter()
    merged = bench.merger.merge(method=method, data=data, model=model, seed=0, **objective, **params)
    seconds = time.perf_counter() - started
    record = {k: v for k, v in bench.merger.last_record.items() if k != "coefficients"}
    scores = bench.score_state("test", merged)
    return scores, {**record, "seconds": seconds}
