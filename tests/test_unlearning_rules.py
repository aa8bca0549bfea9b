"""Forgetting rules (``hf_sta.unlearning.rules`` through ``tune_forgetting``): the chosen scaling against the rule
applied by hand to the evaluated points, on synthetic curves and through a real merger."""

from __future__ import annotations

import math

import pytest
import torch

from hf_sta import ConfigError, STAMerger
from hf_sta.forgetting import pick_scaling
from hf_sta.unlearning import Bisection


def _curve(target, control):
    """``edit(s)`` is ``s`` itself: the metrics are closed-form functions of the scaling."""
    return (lambda s: s), target, control


def _by_hand(curve, rule, chance=None, min_control=0.98):
    allowed = [p for p in curve.points if p["control"] >= min_control * curve.baseline["control"]]
    if rule == "largest_drop":
        return min(allowed, key=lambda p: (p["target"], p["scaling"]))["scaling"]
    candidates = [{"scaling": 0.0, **curve.baseline}, *allowed]
    return min(candidates, key=lambda p: (abs(p["target"] - chance), p["scaling"]))["scaling"]


GRID = (0.5, 1.0, 1.25, 1.4, 1.5, 2.0)


def test_closest_to_chance_on_a_grid_keeps_the_controls():
    edit, target, control = _curve(lambda s: 0.9 - 0.2 * s, lambda s: 1.0 - 0.01 * s * s)  # 1.5 -> 0.9775 < 0.98
    curve = pick_scaling("t", "sta", edit, target, control, GRID, None, rule="closest_to_chance", chance=0.7)
    assert [p["scaling"] for p in curve.points] == list(GRID) and curve.min_control == 0.98
    assert curve.best_scaling == _by_hand(curve, "closest_to_chance", 0.7) == 1.0  # 0.9 - 0.2 = 0.7 exactly
    drop = pick_scaling("t", "sta", edit, target, control, GRID, 0.98)
    assert drop.rule == "largest_drop" and drop.best_scaling == _by_hand(drop, "largest_drop") == 1.4
    # chance beyond the allowed range: the allowed point nearest it, not the disallowed one that hits it (s=2)
    far = pick_scaling("t", "sta", edit, target, control, GRID, None, rule="closest_to_chance", chance=0.5)
    assert far.best_scaling == _by_hand(far, "closest_to_chance", 0.5) == 1.4
    # a task already at chance is left alone
    done = pick_scaling("t", "sta", edit, target, control, GRID, None, rule="closest_to_chance", chance=0.9)
    assert done.best_scaling == 0.0 and done.chance == 0.9


def test_bisection_finds_the_crossing_and_respects_controls():
    edit, target, control = _curve(lambda s: 1.0 - 0.25 * s, lambda s: 1.0)
    curve = pick_scaling("t", "sta", edit, target, control, "bisect", None, rule="closest_to_chance", chance=0.5)
    assert [p["scaling"] for p in curve.points] == [2.0, 4.0] and curve.best_scaling == 2.0  # 4 -> 0, mid 2 -> 0.5
    edit, target, control = _curve(lambda s: 1.0 - 0.25 * s, lambda s: 1.0 - 0.01 * s * s)  # allowed: s <= sqrt(2)
    search = Bisection(low=0.0, high=4.0, steps=10, tolerance=0.0)
    curve = pick_scaling("t", "sta", edit, target, control, search, None, rule="closest_to_chance", chance=0.5)
    assert len(curve.points) == 10 and curve.best_scaling == _by_hand(curve, "closest_to_chance", 0.5)
    assert 0 <= math.sqrt(2) - curve.best_scaling < 4.0 / 2**8
    edit, target, control = _curve(lambda s: 0.9, lambda s: 1.0)
    flat = pick_scaling("t", "sta", edit, target, control, "bisect", None, rule="closest_to_chance", chance=0.5)
    assert [p["scaling"] for p in flat.points] == [4.0] and flat.best_scaling == 0.0  # never reaches chance


def test_rule_arguments_are_checked():
    edit, target, control = _curve(lambda s: 1 - s, lambda s: 1.0)
    with pytest.raises(ConfigError, match="needs chance="):
        pick_scaling("t", "sta", edit, target, control, GRID, None, rule="closest_to_chance")
    with pytest.raises(ConfigError, match="'bisect' is for rule='closest_to_chance'"):
        pick_scaling("t", "sta", edit, target, control, "bisect", None)
    with pytest.raises(ConfigError, match="rule must be one of"):
        pick_scaling("t", "sta", edit, target, control, GRID, None, rule="nearest")
    with pytest.raises(ConfigError, match="low < high"):
        Bisection(low=2.0, high=1.0)


def test_tune_forgetting_closest_to_chance_through_the_merger(bert_checkpoints):
    merger = STAMerger.from_pretrained(bert_checkpoints.base, bert_checkpoints.finetuned)
    key = "encoder.layer.0.intermediate.dense.weight"
    tau = merger.task_vectors["news"][key]

    def removed(model) -> float:  # 1 at the fine-tune, 1 - s after forgetting s * tau
        edit = model.state_dict()[key] - merger.base.get_tensor(key) - tau
        return float(1.0 + (edit * tau).sum() / (tau * tau).sum())

    curve = merger.tune_forgetting("news", removed, lambda model: 1.0, method="negation", target="news",
                                   rule="closest_to_chance", chance=0.3, scalings=(0.25, 0.5, 0.75, 1.0))  # fmt: skip
    assert curve.rule == "closest_to_chance" and math.isclose(curve.baseline["target"], 1.0, abs_tol=1e-5)
    assert [round(p["target"], 4) for p in curve.points] == [0.75, 0.5, 0.25, 0.0]
    assert curve.best_scaling == 0.75  # |0.25 - 0.3| is the smallest
    torch.testing.assert_close(torch.tensor(curve.points[1]["target"]), torch.tensor(0.5), atol=1e-5, rtol=0)
