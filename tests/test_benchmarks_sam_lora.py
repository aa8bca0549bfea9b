"""The LoRA part of the SAM benchmark (``benchmarks.bench_sam_lora``) and SAM in the LoRA example's training loop,
on a tiny Llama built from a config."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from benchmarks import bench_sam_lora
from benchmarks.tasks import load_task
from examples._common import Settings, load_tokenizer
from examples.merge_lora_adapters import Prompts, base_model, train_adapter

TASKS = ["tweet_sentiment", "subjectivity"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench_sam_lora")
    argv = ["--tiny", "--work-dir", str(work), "--tasks", *TASKS, "--optimizers", "adamw", "sam", "--methods",
            "task_arithmetic", "ties"]  # fmt: skip
    return work, bench_sam_lora.main(argv)


def _adapter_weights(folder):
    return load_file(folder / "adapter_model.safetensors")


def test_sam_at_rho_zero_trains_the_adamw_adapter_bit_for_bit(tmp_path):
    """Oracle: at rho 0 a SAM step takes the same gradient twice and the same AdamW update."""
    settings = Settings(tiny=True, train_size=0, epochs=1, lr=3e-3, eval_size=None, seed=0, batch_size=4, max_length=0)
    base = base_model(settings, tmp_path)
    prompts = Prompts("tweet_sentiment", load_tokenizer(base), 120)
    train = load_task("tweet_sentiment", train_size=16)["train"]
    args = argparse.Namespace(steps=3, batch_size=4, rank=4)
    folders = {}
    for optimizer, rho in (("adamw", None), ("sam", 0.0), ("sam", 0.05)):
        out = tmp_path / f"{optimizer}-{rho}"
        folders[optimizer, rho] = train_adapter(base, prompts, train, args, settings, out, optimizer, rho)
    adamw, sam0, sam = (_adapter_weights(f) for f in folders.values())
    assert adamw.keys() == sam0.keys() and all(torch.equal(adamw[k], sam0[k]) for k in adamw)
    assert any(not torch.equal(adamw[k], sam[k]) for k in adamw)  # a real perturbation changes the update


def test_tiny_run_rows_are_normalised_by_each_optimizers_own_adapters(tiny_run):
    _, result = tiny_run
    for optimizer, (run,) in result["sets"].items():
        assert run["protocol"]["optimizer"] == optimizer
        assert (run["protocol"]["rho"] is None) == (optimizer == "adamw")
        individual = run["individual"]["test"]
        for method, row in run["rows"].items():
            assert row["config"] in bench_sam_lora.METHODS[method]
            expected = sum(row["test"][t] / individual[t] for t in individual) / len(individual)
            assert row["normalized"] == pytest.approx(expected)
    adamw, sam = (result["sets"][o][0]["protocol"]["adapters"] for o in ("adamw", "sam"))
    assert all(adamw[t] != sam[t] for t in TASKS)
    gap = result["summary"]["sam"]["vs_adamw"]["normalized_gap"]["ties"]["mean"]
    rows = {o: result["sets"][o][0]["rows"]["ties"]["normalized"] for o in ("adamw", "sam")}
    assert gap == pytest.approx(rows["sam"] - rows["adamw"])
    assert result["cost"]["ratios"]["sam_over_adamw"]["cpu"] > 1.2  # two forward/backward passes per step


def test_interference_pair_equals_the_two_adapters_merged_by_peft(tiny_run):
    """Oracle: theta_0 + tau_i + tau_j built by PEFT (one adapter merged into the base, then the other)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    work, result = tiny_run
    run = result["sets"]["sam"][0]
    first, second = TASKS
    folders = {t: work / "lora" / name for t, name in run["protocol"]["adapters"].items()}
    model = AutoModelForCausalLM.from_pretrained(work / "tiny-llama", dtype=torch.float32)
    for task in (first, second):
        model = PeftModel.from_pretrained(model, folders[task]).merge_and_unload()
    prompts = Prompts(first, load_tokenizer(work / "tiny-llama"), 120)
    validation = load_task(first, train_size=32)["validation"].select(range(16))
    pairs = run["interference"]["pairs"]
    assert prompts.score(model, validation).loss == pytest.approx(pairs[f"{first}+{second}"], abs=1e-4)
    own = run["interference"]["own"]
    assert run["interference"]["per_task"][first] == pytest.approx(pairs[f"{first}+{second}"] - own[first])


def test_a_second_run_reuses_every_saved_row(tiny_run):
    work, _ = tiny_run
    saved = {path: path.stat().st_mtime_ns for path in (work / "results").glob("*-s0.json")}
    assert len(saved) == 2
    summary = work / "other.json"
    result = bench_sam_lora.main(["--tiny", "--work-dir", str(work), "--tasks", *TASKS, "--optimizers", "adamw",
                                  "sam", "--methods", "ties", "--summary", str(summary)])  # fmt: skip
    assert {path: path.stat().st_mtime_ns for path in saved} == saved
    assert json.loads(summary.read_text())["summary"] == json.loads(json.dumps(result["summary"]))


def test_rho_choice_is_the_grid_point_whose_task_arithmetic_merge_is_best_on_validation(tiny_run):
    """Each grid point's criterion is the best validation trial of its saved set; the choice is their argmax (ties go
    to the authors' default, 0.05); the sets already run are reused, not retrained."""
    work, _ = tiny_run
    reused = (work / "results" / "sam0.05-s0.json").stat().st_mtime_ns
    argv = ["--tiny", "--work-dir", str(work), "--tasks", *TASKS, "--part", "rho", "--optimizers", "adamw", "sam"]
    result = bench_sam_lora.main(argv)
    assert set(result["entries"]) == {"adamw", "sam-0.05", "sam-0.1"}
    criteria = {}
    for key, entry in result["entries"].items():
        saved = json.loads((work / "results" / f"{key.replace('-', '')}-s0.json").read_text())
        trials = saved["rows"]["task_arithmetic"]["trials"]
        assert [trial["config"] for trial in trials] == bench_sam_lora.METHODS["task_arithmetic"]
        criteria[key] = max(trial["validation"] for trial in trials)
        assert entry["criterion"] == criteria[key]
        assert entry["adapters"] == saved["protocol"]["adapters"]
    expected = 0.1 if criteria["sam-0.1"] > criteria["sam-0.05"] else 0.05
    assert result["chosen"] == {"sam": expected}
    assert json.loads((work / "results" / "rho.json").read_text())["chosen"] == {"sam": expected}
    assert (work / "results" / "sam0.05-s0.json").stat().st_mtime_ns == reused
