"""Learned coefficients through the merger (AdaMerging, DV-BASI): fixed coefficients are task arithmetic, the
objective decreases, seeds reproduce, the streamed merge is the point the optimiser reached, errors are clear."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from hf_sta import STAMerger
from hf_sta.errors import ConfigError


def _dataset(num_rows: int = 8, seq_len: int = 6, seed: int = 0):
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (num_rows, seq_len), generator=generator)
    labels = torch.randint(0, 2, (num_rows,), generator=generator)
    mask = torch.ones_like(ids)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "label": labels.tolist()})


@pytest.fixture
def merger(bert_checkpoints):
    return STAMerger.from_pretrained(bert_checkpoints.base, bert_checkpoints.finetuned)


def _data(merger):
    return {task: _dataset(seed=index) for index, task in enumerate(merger.tasks)}


def _close(first: dict, second: dict, atol: float = 1e-6) -> None:
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=atol, rtol=0)


def test_adamerging_at_its_initial_coefficients_is_task_arithmetic(merger):
    learned = merger.merge(method="adamerging", data=_data(merger), steps=0, granularity="task", init=0.3)
    assert merger.last_record["num_learnable"] == 3
    expected = merger.merge(method="task_arithmetic", scaling=0.3)
    assert merger.last_record == {}
    _close(learned.state_dict(), expected.state_dict())


def test_adamerging_lowers_the_entropy_and_reproduces_with_its_seed(merger, tmp_path):
    folder = merger.merge(
        method="adamerging", data=_data(merger), steps=15, lr=0.5, clamp=False, output_dir=tmp_path / "a"
    )
    record = merger.last_record
    first, last = record["objective"]
    assert last < first - 1e-4, (first, last)
    assert record["examples_used"] == dict.fromkeys(merger.tasks, 8)
    groups = {"embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "other"}
    assert set(record["coefficients"]) == groups and all(len(v) == 3 for v in record["coefficients"].values())
    recipe = yaml.safe_load((folder / "hf_sta_config.yaml").read_text())
    assert recipe["merge"]["learned"]["coefficients"] == record["coefficients"]
    card = (folder / "README.md").read_text()
    assert "## Learned coefficients" in card and "learned 12 coefficients over 4 group(s)" in card
    for index, task in enumerate(merger.tasks):  # per task: mean / min / max of its coefficient over the groups
        values = [v[index] for v in record["coefficients"].values()]
        row = f"| {task} | {sum(values) / 4:.3f} | {min(values):.3f} | {max(values):.3f} |"
        assert row in card, row
    again = STAMerger.from_pretrained(merger.base.folder, {t: merger.sources[t] for t in merger.tasks})
    again.merge(method="adamerging", data=_data(merger), steps=15, lr=0.5, clamp=False, output_dir=tmp_path / "b")
    assert again.last_record["coefficients"] == record["coefficients"]
    # the streamed merge is theta_0 + sum_t lambda_t^layer tau_t with the recorded coefficients
    weights = load_file(folder / "model.safetensors")
    key = "encoder.layer.1.output.dense.weight"
    coefficients = record["coefficients"]["bert.encoder.layer.1"]
    expected = merger.base.get_tensor(key) + sum(
        c * merger.task_vectors[t].get(key) for c, t in zip(coefficients, merger.tasks)
    )
    torch.testing.assert_close(weights[key], expected, atol=1e-5, rtol=0)


def _cross_entropy(merger, state: dict, data: dict) -> float:
    total = 0.0
    for task in merger.tasks:
        model = AutoModelForSequenceClassification.from_pretrained(merger.sources[task]).eval()
        model.bert.load_state_dict(state)
        rows = data[task][:]
        with torch.no_grad():
            output = model(
                input_ids=torch.tensor(rows["input_ids"]),
                attention_mask=torch.tensor(rows["attention_mask"]),
                labels=torch.tensor(rows["label"]),
            )
        total += float(output.loss)
    return total


def test_dv_basi_supervised_beats_task_arithmetic_on_its_objective(merger):
    data = _data(merger)
    merged = merger.merge(method="dv_basi", data=data, rounds=2, steps=10, batch_size=8, lr=0.1).state_dict()
    record = merger.last_record
    assert record["basis"] == ["initial", *merger.tasks]
    assert record["num_learnable"] == sum(record["num_learnable_per_round"][: record["rounds_run"]])
    baseline = merger.merge(method="task_arithmetic", scaling=0.3).state_dict()
    assert _cross_entropy(merger, merged, data) < _cross_entropy(merger, baseline, data) - 0.05
    key = "encoder.layer.0.attention.self.value.weight"
    b, *c = record["coefficients"][f"bert.{key}"]
    expected = merger.base.get_tensor(key) + sum(
        (ci + 0.3 * b) * merger.task_vectors[t].get(key) for ci, t in zip(c, merger.tasks)
    )
    torch.testing.assert_close(merged[key], expected, atol=1e-5, rtol=0)


def test_learned_methods_say_what_is_missing(merger):
    with pytest.raises(ConfigError, match=r"adamerging.*news, sentiment, topic.*data=\{task: dataset\}"):
        merger.merge(method="adamerging")
    with pytest.raises(ConfigError, match=r"predict_fn= has no entry for task\(s\) topic"):
        merger.merge(method="adamerging", data=_data(merger), predict_fn={"news": None, "sentiment": None}, steps=1)
    with pytest.raises(ConfigError, match=r"selection='sta' needs importance.*compute_importance"):
        merger.merge(method="dv_basi", data=_data(merger), selection="sta")
