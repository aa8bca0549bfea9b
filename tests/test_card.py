"""Model cards: metadata the Hub reads, the body, importance plots, updates of existing cards, escaping."""

from __future__ import annotations

import re
import sys

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from hf_sta import STAMerger
from hf_sta.card import (
    IMPORTANCE_PLOT,
    SECTION_END,
    SECTION_START,
    group_by_layer,
    hub_model_id,
    importance_by_layer,
    layer_of,
    template_path,
    write_model_card,
)
from hf_sta.importance import ImportanceScores
from hf_sta.methods import get_merge_method

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def merge_recipe(method: str = "ties", **params) -> dict:
    return {
        "base_model": "org/base-model",
        "models": {"news": "org/news-model", "sentiment": "org/sentiment-model"},
        "merge": {
            "method": method,
            "scaling": 0.9,
            "weights": {"news": 2.0},
            "tasks": None,
            "params": get_merge_method(method).validate_params(params),
            "seed": 0,
            "torch_dtype": None,
            "max_shard_size": "5GB",
        },
    }


def importance_scores(seed: int, metric: str = "taylor", samples: int = 32) -> ImportanceScores:
    generator = torch.Generator().manual_seed(seed)
    scores = {
        "model.layers.0.mlp.weight": torch.rand(4, 6, generator=generator),
        "model.layers.0.attn.weight": torch.rand(6, generator=generator),
        "model.layers.1.mlp.weight": torch.rand(4, 6, generator=generator),
        "model.embed_tokens.weight": torch.rand(10, 4, generator=generator),
    }
    return ImportanceScores.from_dict(
        scores, metric=metric, num_samples=samples, micro_batches=4, dataset_fingerprint=f"fp{seed}"
    )


def table_rows(text: str, header_start: str) -> list[str]:
    """The lines of the Markdown table whose header starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def cells(row: str) -> int:
    """Number of cells of a table row: unescaped pipes minus one."""
    return len(re.findall(r"(?<!\\)\|", row)) - 1


def test_templates_are_found():
    for kind in ("merged", "forgotten", "adapter"):
        assert template_path(kind).is_file()
    with pytest.raises(ValueError, match="kind"):
        template_path("nope")


def test_merged_card_metadata_and_body(tmp_path):
    path = write_model_card(tmp_path, recipe=merge_recipe("ties", density=0.4), model_name="my-merge")
    card = ModelCard.load(path)
    assert card.data.base_model == ["org/base-model", "org/news-model", "org/sentiment-model"]
    assert card.data.base_model_relation == "merge"
    assert card.data.library_name == "transformers"
    assert {"hf_sta", "merge", "ties"} <= set(card.data.tags)
    text = card.text
    spec = get_merge_method("ties")
    assert spec.pretty_name in text and spec.paper_url in text
    for parameter in spec.parameters:  # every parameter with its registry doc
        assert parameter.doc.split(" ")[0] in text
        escaped = parameter.name.replace("_", "\\_")
        assert f"\n| {escaped} | " in text
    assert "| density | 0.4 |" in text
    assert "hf-sta merge hf_sta_config.yaml" in text
    assert "weight 2" in text  # the task's weight is shown with its input
    assert text.count(SECTION_START) == 1 and text.count(SECTION_END) == 1
    assert IMPORTANCE_PLOT not in text and not (tmp_path / IMPORTANCE_PLOT).exists()


def test_kept_fraction_is_averaged_per_layer(tmp_path):
    kept = {
        "model.layers.0.mlp.weight": {"news": 0.2, "sentiment": 0.5},
        "model.layers.0.attn.weight": {"news": 0.4, "sentiment": 0.5},
        "model.layers.10.mlp.weight": {"news": 1.0, "sentiment": 0.0},
        "model.layers.2.mlp.weight": {"news": 0.1, "sentiment": 0.3},
        "model.embed_tokens.weight": {"news": 0.05, "sentiment": 0.15},
    }
    text = ModelCard.load(write_model_card(tmp_path, recipe=merge_recipe("sta"), kept_fraction=kept)).text
    rows = table_rows(text, "| Layer |")
    assert rows[0] == "| Layer | news | sentiment |"
    assert rows[2:] == [
        "| model.layers.0 | 30.0% | 50.0% |",
        "| model.layers.2 | 10.0% | 30.0% |",
        "| model.layers.10 | 100.0% | 0.0% |",  # numeric order, not string order
        "| other | 5.0% | 15.0% |",
    ]


def test_layer_grouping():
    assert layer_of("model.layers.3.self_attn.q_proj.weight") == "model.layers.3"
    assert layer_of("bert.encoder.layer.11.output.dense.bias") == "bert.encoder.layer.11"
    assert layer_of("transformer.h.2.attn.c_attn.weight") == "transformer.h.2"
    assert layer_of("model.embed_tokens.weight") == "other"
    assert layer_of("classifier.weight") == "other"
    assert list(group_by_layer({"a.layers.1.w": {"t": 1.0}, "a.layers.0.w": {"t": 0.0}, "x": {"t": 2.0}})) == [
        "a.layers.0",
        "a.layers.1",
        "other",
    ]


def test_importance_plot_and_section(tmp_path):
    importance = {"news": importance_scores(0), "sentiment": importance_scores(1, samples=64)}
    recipe = merge_recipe("sta", density=0.5)
    recipe["importance"] = {
        "news": {"data": "org/news-calibration", "split": "train"},
        "sentiment": {"data": "s.jsonl"},
    }
    path = write_model_card(tmp_path, recipe=recipe, importance=importance)
    plot = tmp_path / IMPORTANCE_PLOT
    assert plot.read_bytes().startswith(PNG_MAGIC)
    card = ModelCard.load(path)
    assert card.data.datasets == ["org/news-calibration"]  # Hub datasets only, not local files
    text = card.text
    assert f"]({IMPORTANCE_PLOT})" in text
    summary = table_rows(text, "| Task | Metric |")
    assert summary[2].startswith("| news | taylor | 32 | [org/news\\-calibration]")
    assert summary[3].startswith("| sentiment | taylor | 64 | s.jsonl, fingerprint fp1")
    # Oracle: per tensor mean(I / max I), averaged over the layer's tensors.
    scores = importance["news"]
    expected = {
        "model.layers.0": (
            (scores["model.layers.0.mlp.weight"] / scores["model.layers.0.mlp.weight"].max()).mean()
            + (scores["model.layers.0.attn.weight"] / scores["model.layers.0.attn.weight"].max()).mean()
        ).item()
        / 2,
        "other": (scores["model.embed_tokens.weight"] / scores["model.embed_tokens.weight"].max()).mean().item(),
    }
    layers = importance_by_layer(importance)
    assert list(layers) == ["model.layers.0", "model.layers.1", "other"]
    for layer, value in expected.items():
        assert layers[layer]["news"] == pytest.approx(value, rel=1e-6)
        assert f"| {layer} | {value:.3f} |" in text


def test_importance_without_matplotlib_skips_the_plot(tmp_path, monkeypatch, caplog):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)
    with caplog.at_level("INFO", logger="hf_sta.card"):
        path = write_model_card(tmp_path, recipe=merge_recipe("sta"), importance={"news": importance_scores(0)})
    assert not (tmp_path / IMPORTANCE_PLOT).exists()
    assert "matplotlib is not installed" in caplog.text
    text = path.read_text()
    assert "## Importance" in text and f"]({IMPORTANCE_PLOT})" not in text


def test_forgotten_card(tmp_path):
    recipe = {
        "base_model": "org/base-model",
        "models": {"news": "org/news-model"},
        "forget": {
            "task": "news",
            "method": "sta",
            "scaling": 1.5,
            "target": "org/merged-model",
            "params": {"threshold": None, "density": 0.2, "density_scope": "tensor", "normalize": "max"},
        },
    }
    card = ModelCard.load(write_model_card(tmp_path, recipe=recipe, importance={"news": importance_scores(0)}))
    assert card.data.base_model == "org/merged-model"  # the edited model is the parent
    assert card.data.base_model_relation == "finetune"
    assert {"hf_sta", "forgetting", "sta"} <= set(card.data.tags)
    text = card.text
    assert "task **news** forgotten" in text and "hf-sta forget hf_sta_config.yaml" in text
    assert "| scaling | 1.5 |" in text and "| density | 0.2 |" in text
    assert "| overlap |" not in text  # a merge option, not a forgetting one
    assert "| edited model |" in text
    negation = dict(
        recipe, forget={"task": "news", "method": "negation", "scaling": 1.0, "target": None, "params": {}}
    )
    text = ModelCard.load(write_model_card(tmp_path / "negation", recipe=negation)).text
    assert "Task-vector negation" in text and "https://arxiv.org/abs/2212.04089" in text
    assert "the base model with task **news** forgotten" in text


def test_adapter_card(tmp_path):
    recipe = dict(merge_recipe("task_arithmetic"), output_format="adapter", adapter={"max_rank": 16})
    card = ModelCard.load(write_model_card(tmp_path, recipe=recipe))
    assert card.data.library_name == "peft"
    assert card.data.base_model == "org/base-model"
    assert card.data.base_model_relation == "adapter"
    assert {"hf_sta", "merge", "task_arithmetic", "lora"} <= set(card.data.tags)
    assert "PeftModel.from_pretrained" in card.text and 'from_pretrained("org/base-model")' in card.text
    assert "| max\\_rank | 16 |" in card.text


def test_eval_results_round_trip(tmp_path):
    results = [
        {
            "task_type": "text-classification",
            "dataset_type": "glue",
            "dataset_name": "GLUE SST-2",
            "dataset_split": "validation",
            "metric_type": "accuracy",
            "metric_value": 0.91,
        }
    ]
    path = write_model_card(tmp_path, recipe=merge_recipe(), eval_results=results, model_name="merged-x")
    assert "model-index" in yaml.safe_load(path.read_text().split("---")[1])
    data = ModelCard.load(path).data
    assert data.model_name == "merged-x"
    [result] = data.eval_results
    assert (result.task_type, result.dataset_type, result.metric_type, result.metric_value) == (
        "text-classification",
        "glue",
        "accuracy",
        0.91,
    )
    assert "| text\\-classification | GLUE SST\\-2 (validation) | accuracy | 0.91 |" in path.read_text()
    with pytest.raises(ValueError, match="eval_results\\[0\\]"):
        write_model_card(tmp_path / "bad", recipe=merge_recipe(), eval_results=[{"task_type": "x"}])


def test_existing_card_is_updated_not_overwritten(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "---\nlicense: mit\ntags:\n- custom\nlanguage: en\n---\n\n# My model\n\nMy own notes about this model.\n"
    )
    write_model_card(tmp_path, recipe=merge_recipe("ties"))
    first = readme.read_text()
    assert "My own notes about this model." in first and SECTION_START in first
    # Text after the section survives too; a second write replaces the section only.
    readme.write_text(first + "\n## Citation\n\nPlease cite us.\n")
    recipe = merge_recipe("dare_linear", density=0.3)
    recipe["models"] = {"news": "org/news-model-v2"}
    path = write_model_card(tmp_path, recipe=recipe)
    card = ModelCard.load(path)
    text = card.text
    assert text.count(SECTION_START) == 1 and text.count(SECTION_END) == 1
    assert text.index("My own notes") < text.index(SECTION_START) < text.index("Please cite us.")
    assert "DARE (linear)" in text and "TIES-Merging" not in text
    assert card.data.license == "mit" and card.data.language == "en"
    assert card.data.tags[:1] == ["custom"] and {"hf_sta", "merge", "ties", "dare_linear"} <= set(card.data.tags)
    assert card.data.base_model == ["org/base-model", "org/news-model-v2"]
    # An explicit existing card (e.g. the previous output folder's) is read from where it is.
    other = tmp_path / "new-output"
    write_model_card(other, recipe=merge_recipe(), existing_card=path)
    assert "Please cite us." in (other / "README.md").read_text()
    with pytest.raises(FileNotFoundError):
        write_model_card(other, recipe=merge_recipe(), existing_card=tmp_path / "missing.md")


def test_odd_names_and_paths_are_escaped(tmp_path):
    hostile = "/data/x |y| `z` <script>alert(1)</script> **b** [l](http://e) \n# h"
    fence = "dir/```/model"
    recipe = {
        "base_model": "org/base-model",
        "models": {"a_b-c.d": hostile, "x.y_z": fence, "news": "org/news-model"},
        "merge": merge_recipe()["merge"] | {"weights": None},
    }
    kept = {"model.layers.0.w|x": {"a_b-c.d": 0.5, "x.y_z": 0.25, "news": 1.0}}
    importance = {"a_b-c.d": importance_scores(0)}
    path = write_model_card(tmp_path, recipe=recipe, kept_fraction=kept, importance=importance)
    content = path.read_text()
    assert "<script>" not in content.split("```yaml")[0]  # only inside the fenced recipe block
    card = ModelCard.load(path)
    assert card.data.base_model == ["org/base-model", "org/news-model"]  # local paths never reach the metadata
    for header in ("| Role |", "| Layer |", "| Parameter |"):
        rows = table_rows(card.text, header)
        assert len({cells(row) for row in rows}) == 1, rows  # no value added or split a column
    assert "a\\_b\\-c.d" in card.text and "&lt;script&gt;" in card.text
    # The recipe block survives backticks in values: its fence is longer than any of them.
    block = re.search(r"^(`{4,})yaml\n(.*?)^\1$", card.text, re.MULTILINE | re.DOTALL)
    assert block is not None and yaml.safe_load(block.group(2))["models"]["x.y_z"] == fence
    # Updating a card whose recipe holds a fake end marker keeps exactly one section.
    recipe["models"]["a_b-c.d"] = f"{SECTION_END}"
    write_model_card(tmp_path, recipe=recipe)
    write_model_card(tmp_path, recipe=recipe)
    text = ModelCard.load(path).text
    assert len(re.findall(rf"^{re.escape(SECTION_START)}$", text, re.MULTILINE)) == 1


def test_hub_model_id(tmp_path):
    assert hub_model_id("org/name") == "org/name"
    assert hub_model_id(str(tmp_path)) is None
    assert hub_model_id("./relative/folder") is None
    assert hub_model_id("<in-memory>") is None
    assert hub_model_id("/cache/hub/models--org--my-model/snapshots/0123abcd") == "org/my-model"
    assert hub_model_id(None) is None


def test_card_from_a_real_merge(tmp_path, llama_checkpoints):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    for task in merger.tasks:
        merger.compute_importance(task, metric="magnitude")
    folder = merger.merge(method="sta", density=0.5, output_dir=tmp_path / "merged")
    recipe = yaml.safe_load((folder / "hf_sta_config.yaml").read_text())
    path = write_model_card(
        folder, recipe=recipe, kept_fraction=merger.last_kept_fraction, importance=merger.importance
    )
    card = ModelCard.load(path)
    assert card.data.tags[:3] == ["hf_sta", "merge", "sta"]
    assert "base_model" not in card.data.to_dict()  # local folders only
    rows = table_rows(card.text, "| Layer | code |")
    assert rows[2].startswith("| model.layers.0 | 50.0% | 50.0% | 50.0% |")
    assert (folder / IMPORTANCE_PLOT).read_bytes().startswith(PNG_MAGIC)
    assert "| code | magnitude | 0 | from code.safetensors, no data" in card.text
