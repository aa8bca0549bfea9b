"""``hf-sta finetune`` / ``finetune_classifier``: the CLI trains what the Python API trains, and refuses bad input."""

from __future__ import annotations

import dataclasses
import json

import datasets
import pytest
import torch

from hf_sta.cli import build_parser, main
from hf_sta.training import TRAINING_RECORD, FinetuneConfig, class_labels, finetune, text_classification_collator
from tests.conftest import load_state_dict

WORDS = ["good", "bad", "fine", "awful", "great", "poor", "nice", "dull"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny BERT (no dropout) with MiniLM's tokenizer."""
    from benchmarks.bench_sam import tiny_bert_base

    return tiny_bert_base(tmp_path_factory.mktemp("finetune-cli") / "base")


@pytest.fixture
def data_file(tmp_path):
    rows = [{"text": " ".join(WORDS[(i + j) % 8] for j in range(1 + i % 3)), "label": ["neg", "pos"][i % 2]}
            for i in range(12)]  # fmt: skip
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, rows


def test_cli_trains_what_the_python_loop_trains(tmp_path, base, data_file, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path, rows = data_file
    out = tmp_path / "sam"
    argv = ["finetune", "--base", str(base), "--data", str(path), "--output-dir", str(out), "--optimizer", "asam",
            "--rho", "0.3", "--epochs", "1", "--batch-size", "4", "--learning-rate", "1e-3", "--seed", "3"]  # fmt: skip
    assert main(argv) == 0
    assert f"Wrote {out}" in capsys.readouterr().out

    # Oracle: the loop called by hand with the same configuration on the same rows (string labels sorted: neg=0).
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    collate = text_classification_collator(AutoTokenizer.from_pretrained(base), max_length=128)
    labelled = [{"text": r["text"], "label": int(r["label"] == "pos")} for r in rows]
    config = FinetuneConfig(optimizer="asam", rho=0.3, epochs=1, batch_size=4, learning_rate=1e-3, seed=3)
    finetune(model, labelled, collate, config, show_progress=False)
    written = load_state_dict(out)
    for key, value in model.state_dict().items():
        if key in written:
            assert torch.equal(written[key], value), key
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert reloaded.config.id2label == {0: "neg", 1: "pos"}
    record = json.loads((out / TRAINING_RECORD).read_text())
    assert record["config"]["optimizer"] == "asam" and record["config"]["rho"] == 0.3 and record["steps"] == 3
    assert record["data"]["labels"] == ["neg", "pos"] and record["seconds_per_step"] > 0


def test_every_config_field_is_an_option():
    parser = build_parser()
    args = parser.parse_args(["finetune", "--base", "b", "--data", "d", "--output-dir", "o"])
    for field in dataclasses.fields(FinetuneConfig):
        assert getattr(args, field.name) == field.default, field.name


def test_bad_input_is_one_line_naming_the_option_and_writes_nothing(tmp_path, base, data_file, capsys):
    path, _ = data_file
    common = ["finetune", "--base", str(base), "--data", str(path)]
    assert main([*common, "--output-dir", str(tmp_path / "a"), "--rho", "0.1"]) == 2
    assert "--rho is for optimizer='sam' or 'asam'" in capsys.readouterr().err
    assert main([*common, "--output-dir", str(tmp_path / "b"), "--label-column", "y"]) == 2
    assert "label column 'y' not in the data" in capsys.readouterr().err
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert main([*common, "--output-dir", str(existing)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (existing / "keep.txt").read_text() == "mine"
    assert main([*common, "--output-dir", str(tmp_path / "c"), "--data", str(tmp_path / "missing.csv")]) == 2
    assert not any((tmp_path / name).exists() for name in "abc")


def test_class_labels_of_the_three_kinds():
    names = datasets.ClassLabel(names=["x", "y", "z"])
    with_feature = datasets.Dataset.from_dict({"label": [2, 0]}, features=datasets.Features({"label": names}))
    assert class_labels(with_feature) == (["x", "y", "z"], [2, 0])
    assert class_labels(datasets.Dataset.from_dict({"label": [1, 3]})) == (["0", "1", "2", "3"], [1, 3])
    assert class_labels(datasets.Dataset.from_dict({"label": ["b", "a", "b"]})) == (["a", "b"], [1, 0, 1])
    with pytest.raises(ValueError, match=">= 0"):
        class_labels(datasets.Dataset.from_dict({"label": [-1, 1]}))
    with pytest.raises(ValueError, match="all integers or all strings"):
        class_labels(datasets.Dataset.from_dict({"label": [0.5, 1.0]}))
