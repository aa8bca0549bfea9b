"""Regression tests for fast start and for bad inputs that must fail cleanly and leave nothing half-written."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_sta import STAMerger
from hf_sta.errors import CheckpointError, ConfigError
from hf_sta.forgetting import check_scaling
from hf_sta.importance import ImportanceScores
from hf_sta.io.adapters import lora_layouts
from hf_sta.io.checkpoints import (
    AtomicOutputDir,
    atomic_file_path,
    check_output_dir,
    clean_stale_build_folders,
    open_checkpoint,
)
from hf_sta.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]


def test_import_and_help_do_not_import_torch():
    code = (
        "import sys, hf_sta\n"
        "from hf_sta.cli import build_parser\n"
        "build_parser().format_help()\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n"
        "from hf_sta import STAMergeCallback, STAMerger\n"
        "print(STAMergeCallback.__module__, STAMerger.__module__, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    first, second = out.strip().splitlines()
    assert first == "[]"
    assert second == "hf_sta.callback hf_sta.merger True"


def test_unknown_attribute_is_an_attribute_error():
    import hf_sta

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        hf_sta.Nope  # noqa: B018


def test_yaml_recipe_cannot_enable_remote_code_by_itself(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "base_model: some/base\nmodels: {a: some/a}\nmerge: {method: task_arithmetic}\ntrust_remote_code: true\n"
    )
    with pytest.raises(ConfigError, match="trust_remote_code"):
        Recipe.from_yaml(path)
    assert Recipe.from_yaml(path, trust_remote_code=True).trust_remote_code is True
    path.write_text("base_model: some/base\nmodels: {a: some/a}\nmerge: {method: task_arithmetic}\n")
    assert Recipe.from_yaml(path, trust_remote_code=True).trust_remote_code is True  # the caller's value runs


def test_meta_model_with_auto_map_needs_trust_remote_code(tmp_path):
    from tests.conftest import tiny_bert_config

    config = tiny_bert_config()
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert "bert.embeddings.word_embeddings.weight" not in lora_layouts(tmp_path)  # bare BertModel keys
    assert lora_layouts(tmp_path)["embeddings.word_embeddings.weight"] == "embedding"
    data["auto_map"] = {"AutoModel": "modeling_custom.CustomModel"}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="auto_map"):
        lora_layouts(tmp_path)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, True, "1"])
def test_forget_scaling_must_be_finite(bad):
    with pytest.raises(ConfigError, match="finite number"):
        check_scaling(bad)
    assert check_scaling(2) == 2.0


def test_output_dir_may_not_be_cwd_or_hold_an_input(tmp_path, monkeypatch):
    inputs = tmp_path / "models"
    (inputs / "base").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="holds the input"):
        check_output_dir(inputs, True, inputs={"base_model": inputs / "base"})
    with pytest.raises(FileExistsError, match="is the input"):
        check_output_dir(inputs / "base", True, inputs={"base_model": inputs / "base"})
    monkeypatch.chdir(inputs / "base")
    with pytest.raises(FileExistsError, match="current directory"):
        check_output_dir(".", True)
    with pytest.raises(FileExistsError, match="ancestor of the current directory"):
        check_output_dir(tmp_path, True)
    assert check_output_dir(tmp_path / "new", False) == tmp_path / "new"


def test_merge_refuses_to_overwrite_its_own_base(bert_checkpoints, tmp_path):
    merger = STAMerger.from_pretrained(bert_checkpoints.base, dict(bert_checkpoints.finetuned))
    before = sorted(p.name for p in bert_checkpoints.base.iterdir())
    with pytest.raises(FileExistsError, match="input"):
        merger.merge("task_arithmetic", output_dir=bert_checkpoints.base, overwrite=True)
    assert sorted(p.name for p in bert_checkpoints.base.iterdir()) == before


def test_atomic_file_refuses_existing_and_cleans_up_on_failure(tmp_path):
    path = tmp_path / "scores.safetensors"
    scores = ImportanceScores(
        open_checkpoint({"w": torch.ones(2, 3)}), metric="magnitude", num_samples=0, micro_batches=0
    )
    scores.save(path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        scores.save(path)
    ImportanceScores(
        open_checkpoint({"w": torch.full((2, 3), 2.0)}), metric="magnitude", num_samples=0, micro_batches=0
    ).save(path, overwrite=True)
    assert torch.equal(ImportanceScores.load(path)["w"], torch.full((2, 3), 2.0))
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_file_path(tmp_path / "other.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.safetensors"]


def test_output_modes_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        with AtomicOutputDir(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("x")
        with atomic_file_path(tmp_path / "file.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "file.txt").stat().st_mode & 0o777 == 0o640


def test_stale_build_folders_of_dead_writers_are_removed(tmp_path):
    from hf_sta.io.checkpoints import _HOST

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".out.tmp-{_HOST}-{pid}-abc"
    live = tmp_path / f".out.tmp-{_HOST}-{os.getpid()}-abc"
    foreign = tmp_path / ".out.tmp-otherhost-1-abc"
    for folder in (stale, live, foreign):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    assert clean_stale_build_folders(tmp_path / "out") == [stale]
    assert not stale.exists() and live.exists() and foreign.exists()


def test_killed_write_leaves_no_loadable_output(tmp_path):
    """SIGKILL in the middle of a write: the output folder does not exist; the next write removes the leftovers."""
    script = (
        "import os, signal, sys\n"
        "from hf_sta.io.checkpoints import AtomicOutputDir\n"
        "with AtomicOutputDir(sys.argv[1]) as tmp:\n"
        "    (tmp / 'config.json').write_text('{}')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    out = tmp_path / "merged"
    result = subprocess.run([sys.executable, "-c", script, str(out)], cwd=ROOT, capture_output=True)
    assert result.returncode == -9
    assert not out.exists()
    assert [p.name.startswith(".merged.tmp-") for p in tmp_path.iterdir()] == [True]
    with AtomicOutputDir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
