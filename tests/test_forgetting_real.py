"""Forgetting on real data: MiniLM fine-tuned on three offline tasks, one forgotten from their STA merge."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from benchmarks.harness import TaskSuite, mean

TARGET, CONTROLS = "news", ("movie_sentiment", "tweet_sentiment")


@pytest.mark.slow
def test_sta_forgetting_drops_the_target_and_keeps_the_controls():
    # The demo's models (cached under ~/.cache/hf_sta after the first run; fine-tuned here otherwise).
    suite = TaskSuite((TARGET, *CONTROLS)).prepare()
    merger = suite.merger()
    for task in suite.tasks:
        suite.importance(merger, task, 64)
    with tempfile.TemporaryDirectory() as tmp:
        folder = merger.merge(method="sta", output_dir=Path(tmp) / "merged")
        curve = merger.tune_forgetting(
            TARGET,
            eval_fn=lambda body: suite.accuracy(body, TARGET, "validation"),
            control_fn=lambda body: mean(suite.evaluate(body, "validation", CONTROLS).values()),
            scalings=(1.0, 2.0, 3.0),
            target=folder,
        )
        assert curve.best_scaling is not None
        before = suite.evaluate(merger.forget(TARGET, scaling=0.0, target=folder), "test")
        after = suite.evaluate(merger.forget(TARGET, scaling=curve.best_scaling, target=folder), "test")
    chance = suite.chance(TARGET)
    assert before[TARGET] > chance + 0.3, before  # the merge does the task...
    assert after[TARGET] <= chance + 0.1, (after, chance)  # ...and forgets it down to (or below) chance
    retention = mean(after[t] for t in CONTROLS) / mean(before[t] for t in CONTROLS)
    assert retention >= 0.95, (before, after)  # on test, not the split the scaling was chosen on
