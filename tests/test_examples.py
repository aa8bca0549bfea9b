"""Every example in ``examples/`` runs end to end with ``--tiny`` (a tiny model built from a config, real offline data,
a few dozen examples) and its results have the properties the example is about."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.conftest import load_state_dict

TASKS = ["tweet_sentiment", "product_sentiment", "subjectivity"]  # the fastest offline tasks to read


def tiny(tmp_path: Path, *extra: str) -> list[str]:
    """Small settings: one torch thread (far faster than two on a shared, loaded box), outputs under ``tmp_path``."""
    return ["--tiny", "--num-threads", "1", "--eval-size", "32", "--output-dir", str(tmp_path), *extra]


def assert_valid(scores) -> None:
    for row in scores.values():
        for result in row.values():
            assert 0.0 <= result.accuracy <= 1.0
            assert math.isfinite(result.loss) and result.loss > 0


def test_merge_minilm(tmp_path):
    from transformers import BertModel

    from examples import merge_minilm

    result = merge_minilm.main(tiny(tmp_path, "--tasks", *TASKS, "--calibration-samples", "16"))
    out = result["output_dir"]
    for name in ("model.safetensors", "config.json", "tokenizer_config.json", "hf_sta_config.yaml", "README.md"):
        assert (out / name).is_file(), name
    merged = BertModel.from_pretrained(out).state_dict()  # the written merge reloads with transformers
    base = load_state_dict(result["base"])
    assert set(base) <= set(merged)
    changed = [k for k in base if not torch.equal(merged[k], base[k])]
    assert changed and all(torch.isfinite(merged[k]).all() for k in changed)
    for task, folder in result["models"].items():  # heads ship beside the merged body, unmerged
        own = load_state_dict(folder)
        with safe_open(out / "heads" / f"{task}.safetensors", "pt") as handle:
            for key in ("classifier.weight", "classifier.bias"):
                assert torch.equal(handle.get_tensor(key), own[key])
    assert list(result["scores"]) == [
        "individual fine-tunes",
        "base body",
        "task arithmetic (lambda=0.5)",
        "TIES (density 0.2)",
        "STA (defaults), reloaded from sta/",
    ]
    assert all(list(row) == TASKS for row in result["scores"].values())
    assert_valid(result["scores"])


def test_merge_lora_adapters(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from examples import merge_lora_adapters

    result = merge_lora_adapters.main(tiny(tmp_path, "--tasks", *TASKS[::2], "--steps", "4", "--rank", "4"))

    def dense(adapter: Path | None) -> dict[str, torch.Tensor]:
        model = AutoModelForCausalLM.from_pretrained(result["base"])
        if adapter is None:
            return model.state_dict()
        return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()

    base = dense(None)
    # Task arithmetic at rank 4 + 4 is exact: the merged adapter is the sum of the adapters' dense updates.
    merged = dense(result["merged"]["task_arithmetic"])
    own = [dense(folder) for folder in result["adapters"].values()]
    trained = 0
    for key, theta_0 in base.items():
        expected = theta_0 + sum(o[key] - theta_0 for o in own)
        torch.testing.assert_close(merged[key], expected, rtol=1e-4, atol=1e-6, msg=key)
        trained += int(not torch.equal(merged[key], theta_0))
    assert trained == 2 * 4  # q/k/v/o of two layers
    assert result["reports"]["task_arithmetic"]["relative_error_max"] < 1e-5
    sta = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(result["base"]), result["merged"]["sta"])
    assert sta.peft_config["default"].r <= 8
    assert list(result["scores"]) == [
        "base model (zero-shot)",
        "each task's own adapter",
        "merged adapter: task arithmetic, rank <= 8",
        "merged adapter: STA (defaults), rank <= 8",
    ]
    assert_valid(result["scores"])


def test_forget_task(tmp_path):
    from peft import PeftModel
    from transformers import BertModel

    from examples import forget_task

    result = forget_task.main(tiny(tmp_path, "--tasks", *TASKS, "--calibration-samples", "16"))
    forget, scaling, curve, scores = result["forget"], result["scaling"], result["curve"], result["scores"]
    # The scaling was chosen on validation: the other tasks keep >= 95% of their accuracy there.
    assert forget == TASKS[0] and [p["scaling"] for p in curve.points] == list(forget_task.SCALINGS)
    chosen = next(p for p in curve.points if p["scaling"] == scaling == curve.best_scaling)
    assert chosen["control"] >= 0.95 * curve.baseline["control"]
    # On test, the forgotten task's loss rises, and more than any other task's.
    merged_scores, forgotten_scores = scores["STA merge"], scores[f"forgotten '{forget}' (x{scaling:g})"]
    rise = {task: forgotten_scores[task].loss - merged_scores[task].loss for task in TASKS}
    assert rise[forget] > 0 and all(rise[forget] > rise[task] for task in TASKS[1:]), rise
    # Reversible: with the adapter disabled the merged model is back exactly.
    assert scores[f"forgotten as a LoRA adapter (x{scaling:g}), disabled"] == merged_scores

    merged = load_state_dict(result["merged_dir"])
    forgotten = load_state_dict(result["forgotten_dir"])
    model = PeftModel.from_pretrained(BertModel.from_pretrained(result["merged_dir"]), result["adapter_dir"])
    enabled = model.merge_and_unload().state_dict()
    in_adapter = 0
    for key, theta in merged.items():
        edit = forgotten[key] - theta
        if key.endswith(".weight") and not key.endswith("LayerNorm.weight"):  # LoRA-able: linear and embedding
            error = (enabled[key] - forgotten[key]).norm()
            # truncated SVD keeping 99.9% of the squared singular values: relative error <= sqrt(0.001)
            assert error <= (math.sqrt(1 - 0.999) + 1e-3) * edit.norm() + 1e-6, key
            in_adapter += int(edit.norm() > 0)
        else:  # biases and LayerNorm are not LoRA-able: untouched by the adapter
            assert torch.equal(enabled[key], theta), key
    assert in_adapter > 0
    assert_valid(scores)


@pytest.mark.parametrize("sharpness", [[], ["--sam-rho", "0.5", "--sam-adaptive"]], ids=["trainer", "sam_trainer"])
def test_trainer_callback(tmp_path, sharpness):
    from examples import trainer_callback
    from hf_sta import STAMerger
    from hf_sta.training import SAMTrainer

    result = trainer_callback.main(
        tiny(tmp_path, "--task", TASKS[2], "--others", *TASKS[:2], "--calibration-samples", "16", *sharpness)
    )
    trainer = result["trainer"]
    assert isinstance(trainer, SAMTrainer) == bool(sharpness)
    if sharpness:  # ASAM steps ran: two passes per step
        assert trainer.sam_adaptive and trainer.sam_rho == 0.5 and trainer.sam_seconds > 0
    callback, task = result["callback"], TASKS[2]
    assert callback.output_path == tmp_path / "merged" and (callback.output_path / "model.safetensors").is_file()
    importance = callback.output_path / "importance" / f"{task}.safetensors"
    assert importance.is_file()

    # Oracle: the same merge done by hand from the saved trained model and the shipped importance files.
    oracle = STAMerger.from_pretrained(result["base"], {**result["models"], task: result["trained_dir"]})
    for other, path in {**result["importance_files"], task: importance}.items():
        oracle.load_importance(other, path)
    expected = oracle.merge(method="sta").state_dict()
    merged = load_state_dict(callback.output_path)
    base = load_state_dict(result["base"])
    assert set(merged) == set(base)
    for key, value in merged.items():
        assert torch.equal(value, expected[key]), key
    assert any(not torch.equal(merged[k], base[k]) for k in base)
    trained = load_state_dict(result["trained_dir"])
    with safe_open(callback.output_path / "heads" / f"{task}.safetensors", "pt") as handle:
        assert torch.equal(handle.get_tensor("classifier.weight"), trained["classifier.weight"])
    assert sorted(p.stem for p in (callback.output_path / "heads").iterdir()) == sorted(TASKS)
    assert_valid(result["scores"])


def test_data_vectors(tmp_path):
    from examples import data_vectors

    result = data_vectors.main(tiny(tmp_path, "--task", TASKS[0], "--shares", "3,2,1", "--calibration-samples", "8"))
    sites = result["sites"]
    counts = [info["num_samples"] for info in sites.values()]
    assert counts == [16, 11, 5]
    theta_0 = load_state_dict(result["start"])
    deltas = {}
    for site, info in sites.items():
        with safe_open(info["vector"], "pt") as handle:  # what a site ships: deltas and its sample count
            assert handle.metadata()["num_samples"] == str(info["num_samples"])
            assert {"classifier.weight", "classifier.bias"} <= set(handle.keys())  # the shared head is merged too
        theta_s = load_state_dict(info["model"])
        deltas[site] = {k: theta_s[k] - v for k, v in theta_0.items() if v.is_floating_point()}

    merged = {name: model.state_dict() for name, model in result["merged"].items()}
    total = sum(counts)
    for key in deltas["site_0"]:
        mean = sum(d[key] for d in deltas.values()) / len(deltas)
        weighted = sum(n * d[key] for n, d in zip(counts, deltas.values())) / total
        summed = sum(d[key] for d in deltas.values())
        close = dict(rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(merged["merged: average"][key], theta_0[key] + mean, **close)
        torch.testing.assert_close(
            merged["merged: average weighted by samples"][key], theta_0[key] + weighted, **close
        )
        torch.testing.assert_close(merged["merged: task arithmetic (sum)"][key], theta_0[key] + summed, **close)
    assert not torch.equal(
        merged["merged: average"]["classifier.weight"],
        merged["merged: average weighted by samples"]["classifier.weight"],
    )
    rows = result["rows"]
    assert {"site_0 alone", "site_1 alone", "site_2 alone", "pooled data (not allowed)"} <= set(rows)
    assert {name for name in rows if name.startswith("merged: ")} == set(merged) and len(merged) == 4
    assert rows["pooled data (not allowed)"]["train examples"] == total
    for row in rows.values():
        assert 0.0 <= row["test accuracy"] <= 1.0 and math.isfinite(row["test loss"])


@pytest.mark.parametrize(
    "name", ["merge_minilm", "merge_lora_adapters", "forget_task", "trainer_callback", "data_vectors"]
)
def test_readme_lists_every_example(name):
    readme = (Path(__file__).resolve().parents[1] / "examples" / "README.md").read_text()
    assert f"python -m examples.{name}" in readme


def test_unlearn_task(tmp_path):
    import json

    from examples import unlearn_task

    result = unlearn_task.main(tiny(tmp_path, "--tasks", *TASKS, "--calibration-samples", "8", "--max-steps", "4"))
    folder = result["adapter_dir"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "hf_sta_unlearning.json"):
        assert (folder / name).is_file(), name
    record = json.loads((folder / "hf_sta_unlearning.json").read_text())
    assert record["layers"] == result["record"]["layers"] and record["layers"]
    with safe_open(folder / "adapter_model.safetensors", "pt") as handle:  # adapters on the chosen layers only
        assert all(any(f".{layer}." in key for layer in record["layers"]) for key in handle.keys())
    scores = result["scores"]
    assert scores["unlearning adapter, disabled"] == scores["STA merge"]  # switched off: the merge, exactly
    assert result["curve"].rule == "closest_to_chance" and result["curve"].chance == result["chance"]
    assert_valid(scores)


def test_finetune_sam(tmp_path):
    from examples import finetune_sam

    result = finetune_sam.main(tiny(tmp_path, "--tasks", *TASKS[:2], "--sam-rho", "0.1"))
    models = result["models"]
    assert list(models) == ["adamw", "sam", "asam"] and all(list(m) == TASKS[:2] for m in models.values())
    base = load_state_dict(result["base"])
    for task in TASKS[:2]:
        trained = {optimizer: load_state_dict(folders[task]) for optimizer, folders in models.items()}
        body = [k for k in base if k in trained["adamw"]] or [f"bert.{k}" for k in base]
        for first, second in [("adamw", "sam"), ("adamw", "asam"), ("sam", "asam")]:  # same start, other steps
            assert any(not torch.equal(trained[first][k], trained[second][k]) for k in body), (task, first, second)
    assert all(s in finetune_sam.SCALINGS for s in result["scalings"].values())
    assert list(result["scores"]) == [
        f"{o}: {row}" for o in models for row in ("individual", f"task arithmetic (scaling {result['scalings'][o]:g})")
    ]
    assert_valid(result["scores"])
