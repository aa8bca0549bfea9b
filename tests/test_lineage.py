"""Lineage the Hub understands: base_model by repo id (given, from the Hugging Face cache, from hub_ids or the folder
itself), base_model_relation, title, tags, library_name / pipeline_tag, model-index from eval_results; recipes and
cards without absolute paths, which run again from anywhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard, snapshot_download

from hf_sta import STAMerger
from hf_sta.cli import main
from hf_sta.errors import ConfigError
from hf_sta.lineage import hub_id, locate, portable_recipe
from tests.conftest import load_state_dict

SHA = "0123456789abcdef0123456789abcdef01234567"


def _cache(root: Path, repo_id: str, folder: Path) -> Path:
    """``folder`` as the Hub cache holds a downloaded snapshot of ``repo_id`` (what offline mode resolves)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / SHA)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    return repo / "snapshots" / SHA


def _no_local_paths(folder: Path, *roots: Path) -> None:
    for name in ("README.md", "hf_sta_config.yaml"):
        text = (folder / name).read_text()
        for root in roots:
            assert str(root) not in text, f"{name} names {root}"
        assert "/tmp/" not in text and "pytest-of" not in text, name


def test_repo_ids_from_the_cache_and_hub_ids_make_the_lineage(tmp_path, llama_checkpoints, monkeypatch):
    cache = tmp_path / "hub-cache"
    _cache(cache, "org/tiny-base", llama_checkpoints.base)
    _cache(cache, "org/tiny-code", llama_checkpoints.finetuned["code"])
    merger = STAMerger.from_pretrained(
        "org/tiny-base",
        {"code": "org/tiny-code", "math": llama_checkpoints.finetuned["math"], "chat": llama_checkpoints.finetuned["chat"]},
        cache_dir=cache,
        hub_ids={"math": "org/tiny-math"},
    )  # fmt: skip
    monkeypatch.chdir(tmp_path)
    out = merger.merge(method="ties", density=0.5, output_dir=tmp_path / "merged")
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ["org/tiny-base", "org/tiny-code", "org/tiny-math"]  # chat: local, body only
    assert card.data.base_model_relation == "merge"
    assert (card.data.library_name, card.data.pipeline_tag) == ("transformers", "text-generation")
    assert card.data.tags == ["hf_sta", "merge", "ties"]
    assert card.text.lstrip().splitlines()[1] == "# code \\+ math \\+ chat \\(TIES\\-Merging merge\\)"
    chat = "../../" + "/".join(llama_checkpoints.finetuned["chat"].parts[-2:])
    assert f"| fine\\-tuned model | chat | {chat.replace('-', chr(92) + '-')} |" in card.text.replace("\\.", ".")
    recipe = yaml.safe_load((out / "hf_sta_config.yaml").read_text())
    assert (recipe["base_model"], recipe["models"]["code"]) == ("org/tiny-base", "org/tiny-code")
    assert recipe["models"]["chat"] == chat and recipe["hub_ids"] == {"math": "org/tiny-math"}
    _no_local_paths(out, llama_checkpoints.base.parent, cache)
    assert "pypi.org" not in card.text and "transformers " in card.text  # versions recorded, no broken link


def test_folder_that_names_its_repo(tmp_path, llama_checkpoints):
    folder = tmp_path / "ft"
    shutil.copytree(llama_checkpoints.finetuned["code"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": "org/from-config"}))
    assert hub_id(str(folder), folder) is None  # _name_or_path names the model it was loaded from (its parent)
    card_folder = tmp_path / "carded"
    shutil.copytree(llama_checkpoints.finetuned["math"], card_folder)
    (card_folder / "README.md").write_text("---\nmodel-index:\n- name: org/from-card\n  results: []\n---\n# x\n")
    assert hub_id(str(card_folder), card_folder) == "org/from-card"
    assert hub_id(str(llama_checkpoints.base), llama_checkpoints.base) is None  # names nothing: body only
    assert hub_id("org/name") == "org/name" and hub_id("<in-memory>") is None


def test_bad_hub_ids_are_refused(llama_checkpoints):
    with pytest.raises(ConfigError, match="hub_ids names nope"):
        STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned, hub_ids={"nope": "a/b"})
    with pytest.raises(ConfigError, match="hub_ids.code: Repo id must be"):
        STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned, hub_ids={"code": "a/b/c"})


def test_written_recipe_runs_from_another_directory_and_falls_back_to_hub_ids(
    tmp_path, llama_checkpoints, monkeypatch
):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned, hub_ids={"base_model": "org/base"})  # fmt: skip
    for task in merger.tasks:
        merger.compute_importance(task, metric="magnitude")
    out = merger.merge(method="sta", output_dir=tmp_path / "merged")
    recipe = yaml.safe_load((out / "hf_sta_config.yaml").read_text())
    assert recipe["importance"]["code"] == {"path": "importance/code.safetensors"}
    monkeypatch.chdir(llama_checkpoints.base.parent)  # elsewhere: the paths are found next to the recipe
    assert main(["merge", str(out / "hf_sta_config.yaml"), "--output-dir", str(tmp_path / "again")]) == 0
    expected, again = load_state_dict(out), load_state_dict(tmp_path / "again")
    assert all((expected[k] == again[k]).all() for k in expected)
    # A copy of the folder elsewhere (e.g. downloaded from the Hub): the base's relative path does not exist there,
    # the recipe falls back to its hub id.
    moved = tmp_path / "a" / "b" / "c" / "merged"
    shutil.copytree(out, moved)
    from hf_sta.recipe import Recipe

    assert Recipe.from_yaml(moved / "hf_sta_config.yaml").base_model == "org/base"
    assert locate("../nowhere", tmp_path) == "../nowhere"


def test_adapter_and_forgetting_relations(tmp_path, llama_checkpoints):
    merger = STAMerger.from_pretrained(
        llama_checkpoints.base, llama_checkpoints.finetuned, hub_ids={"base_model": "org/base", "code": "org/code"}
    )
    out = merger.merge(output_dir=tmp_path / "adapter", output_format="adapter", max_rank=2, scaling=0.5)
    data = ModelCard.load(out / "README.md").data
    assert (data.base_model, data.base_model_relation, data.library_name) == ("org/base", "adapter", "peft")
    assert data.pipeline_tag == "text-generation" and {"hf_sta", "merge", "peft", "lora"} <= set(data.tags)
    text = ModelCard.load(out / "README.md").text
    assert "mean relative error" in text and "above 10%" in text  # rank 2 of 32: a poor adapter, said so
    forgot = merger.forget("code", method="negation", target="code", output_dir=tmp_path / "forgot")
    card = ModelCard.load(forgot / "README.md")
    assert (card.data.base_model, card.data.base_model_relation) == ("org/code", "finetune")
    assert card.data.tags == ["hf_sta", "forgetting", "negation"]
    assert "without code \\(forgetting with Task\\-vector negation\\)" in card.text


def test_eval_results_mapping_becomes_model_index(tmp_path, llama_checkpoints):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    merger.merge(method="task_arithmetic", scaling=0.5)
    out = merger.save_pretrained(tmp_path / "m", eval_results={"code": {"accuracy": 0.75, "f1": 0.5}})
    header = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    [entry] = header["model-index"]
    assert entry["name"] == "code + math + chat (Task Arithmetic merge)"
    metrics = {(r["dataset"]["name"], m["type"]): m["value"] for r in entry["results"] for m in r["metrics"]}
    assert metrics == {("code", "accuracy"): 0.75, ("code", "f1"): 0.5}
    assert {r["task"]["type"] for r in entry["results"]} == {"text-generation"}
    with pytest.raises(ConfigError, match="eval_results.code.accuracy: expected a finite number"):
        merger.save_pretrained(tmp_path / "bad", eval_results={"code": {"accuracy": float("nan")}})


def test_pushed_recipe_and_card_name_no_local_path(tmp_path, local_hub, llama_checkpoints):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned, hub_ids={"base_model": "org/base"})  # fmt: skip
    merger.merge(method="task_arithmetic", scaling=0.5)
    merger.push_to_hub("local-user/lineage")
    folder = Path(snapshot_download("local-user/lineage", cache_dir=tmp_path / "download"))
    _no_local_paths(folder, llama_checkpoints.base.parent)
    recipe = yaml.safe_load((folder / "hf_sta_config.yaml").read_text())
    assert recipe["hub_ids"] == {"base_model": "org/base"}
    assert (recipe["base_model"], recipe["models"]["code"]) == ("base", "code")  # names, not paths from a temp folder


def test_portable_recipe_keeps_repo_ids_and_task_targets(tmp_path):
    recipe = {
        "base_model": "org/base",
        "models": {"a": str(tmp_path / "a"), "b": "org/b"},
        "forget": {"task": "a", "target": "b"},
    }
    (tmp_path / "a").mkdir()
    portable = portable_recipe(recipe, tmp_path / "out", {"base_model": "org/base", "a": "org/a"})
    assert portable["models"] == {"a": "../a", "b": "org/b"} and portable["forget"]["target"] == "b"
    assert portable["hub_ids"] == {"a": "org/a"}


def test_pipeline_tag_from_the_base_card_library_from_the_format(tmp_path, llama_checkpoints):
    from hf_sta.lineage import hub_metadata

    base = tmp_path / "base"
    shutil.copytree(llama_checkpoints.base, base)
    config = json.loads((base / "config.json").read_text())
    assert hub_metadata(base, config) == {"library_name": "transformers", "pipeline_tag": "text-generation"}
    (base / "README.md").write_text(
        "---\nlibrary_name: sentence-transformers\npipeline_tag: sentence-similarity\n---\n"
    )
    assert hub_metadata(base, config) == {"library_name": "transformers", "pipeline_tag": "sentence-similarity"}
    assert hub_metadata(None, None) == {}


def test_recipe_hub_ids_reach_the_card(tmp_path, llama_checkpoints):
    recipe = {
        "base_model": str(llama_checkpoints.base),
        "models": {task: str(folder) for task, folder in llama_checkpoints.finetuned.items()},
        "merge": {"method": "task_arithmetic", "scaling": 0.5},
        "hub_ids": {"base_model": "org/base", "chat": "org/chat"},
        "output_dir": str(tmp_path / "out"),
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "r.yaml")]) == 0
    data = ModelCard.load(tmp_path / "out" / "README.md").data
    assert data.base_model == ["org/base", "org/chat"] and data.base_model_relation == "merge"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**recipe, "hub_ids": {"nope": "a/b"}}))
    assert main(["merge", str(tmp_path / "r.yaml"), "--output-dir", str(tmp_path / "x")]) == 2
