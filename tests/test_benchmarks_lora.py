"""The LoRA benchmark end to end with ``--tiny`` (a tiny Llama built from a config, real offline data, seconds)."""

from __future__ import annotations

import math

import torch

from benchmarks import bench_lora
from benchmarks.bench_lora import GRIDS

TASKS = ["tweet_sentiment", "subjectivity"]


def test_bench_lora_tiny(tmp_path, capsys, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(bench_lora, "RESULTS", tmp_path / "results")
    result = bench_lora.main(["--tiny", "--tasks", *TASKS, "--work-dir", str(tmp_path)])
    rows = result["rows"]
    assert list(rows) == ["base", "individual", "task_arithmetic", "ties", "sta_default", "sta"]
    for name, row in rows.items():
        assert list(row["test"]) == TASKS, name
        assert all(0.0 <= v <= 1.0 for v in row["test"].values())
        assert math.isclose(row["average"], sum(row["test"].values()) / len(TASKS))
        expected = sum(row["test"][t] / rows["individual"]["test"][t] for t in TASKS) / len(TASKS)
        assert math.isclose(row["normalized"], expected)
    assert rows["individual"]["normalized"] == 1.0
    for method, grid in GRIDS.items():  # tuned on validation: the chosen config is the best trial
        trials = rows[method]["trials"]
        assert [t["config"] for t in trials] == grid
        assert rows[method]["config"] == max(trials, key=lambda t: t["validation"])["config"]

    table = capsys.readouterr().out
    assert "| model | chosen on validation | tweet_sentiment | subjectivity | average | normalised |" in table
    assert "| **STA, defaults (no tuning)** | — |" in table
    assert not (tmp_path / "results").exists()  # --tiny writes no results

    # Task arithmetic at scaling 1 is the dense sum of the adapters' updates (PEFT's own merge_and_unload as oracle).
    base_dir = tmp_path / "tiny-llama"
    base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    own = [
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folder)
        .merge_and_unload()
        .state_dict()
        for folder in result["adapters"].values()
    ]
    merged = result["merger"].merge(method="task_arithmetic", scaling=1.0).state_dict()
    changed = 0
    for key, theta_0 in base.items():
        expected = theta_0 + sum(o[key] - theta_0 for o in own)
        torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6, msg=key)
        changed += int(not torch.equal(merged[key], theta_0))
    assert changed == 2 * 4  # q/k/v/o of the tiny Llama's two layers

    # Forgetting with an adapter: disabled, the merged model's scores come back exactly.
    forget = result["forget"]
    assert forget["task"] == TASKS[-1] and forget["disabled_equals_before"]
    assert forget["disabled"] == forget["before"] == rows["sta_default"]["test"]
    assert forget["scaling"] in bench_lora.FORGET_SCALINGS
    assert forget["adapter"]["modules"] == 2 * 4 and forget["adapter"]["relative_error_mean"] <= math.sqrt(1e-3)
