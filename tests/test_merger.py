"""STAMerger: merges streamed to disk or built in memory, checked against PEFT's merge_utils on plain tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft.utils import merge_utils
from safetensors.torch import load_file, save_file

from hf_sta import STAMerger
from hf_sta.errors import CheckpointError, ConfigError
from tests.conftest import load_state_dict


def _oracle(checkpoints, combine, scaling: float) -> dict[str, torch.Tensor]:
    """Merged state dict computed from plain tensors: theta_0 + scaling * combine([tau_t], weights)."""
    base = load_state_dict(checkpoints.base)
    finetuned = [load_state_dict(p) for p in checkpoints.finetuned.values()]
    prefix = "bert." if any(k.startswith("bert.") for k in finetuned[0]) else ""
    merged = {}
    for key, theta_0 in base.items():
        if not theta_0.is_floating_point():
            merged[key] = theta_0
            continue
        deltas = [ft[prefix + key].float() - theta_0.float() for ft in finetuned]
        merged[key] = theta_0.float() + scaling * combine(deltas, torch.ones(len(deltas)))
    return merged


@pytest.mark.parametrize(
    ("method", "params", "combine"),
    [
        ("task_arithmetic", {}, merge_utils.task_arithmetic),
        ("ties", {"density": 0.3}, lambda d, w: merge_utils.ties(d, w, density=0.3)),
        (
            "ties",
            {"density": 0.5, "majority_sign_method": "frequency"},
            lambda d, w: merge_utils.ties(d, w, density=0.5, majority_sign_method="frequency"),
        ),
        ("magnitude_prune", {"density": 0.4}, lambda d, w: merge_utils.magnitude_prune(d, w, density=0.4)),
    ],
)
def test_merge_to_disk_matches_peft(tmp_path, llama_checkpoints, method, params, combine):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    out = merger.merge(method=method, scaling=0.7, output_dir=tmp_path / "out", **params)
    assert out == tmp_path / "out"
    merged = load_state_dict(out)
    expected = _oracle(llama_checkpoints, combine, 0.7)
    assert set(merged) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-6, atol=1e-7, msg=key)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    recipe = yaml.safe_load((out / "hf_sta_config.yaml").read_text())
    assert recipe["merge"]["method"] == method
    assert set(recipe["models"]) == {"code", "math", "chat"}
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_in_memory_merge_returns_transformers_model(llama_checkpoints):
    from transformers import LlamaForCausalLM

    merger = STAMerger.from_pretrained(llama_checkpoints.base, list(llama_checkpoints.finetuned.values()))
    assert merger.tasks == ["code", "math", "chat"]
    model = merger.merge(method="task_arithmetic", scaling=0.5)
    assert isinstance(model, LlamaForCausalLM)
    expected = _oracle(llama_checkpoints, merge_utils.task_arithmetic, 0.5)
    state = model.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_bert_heads_saved_per_task_and_body_merged(tmp_path, bert_checkpoints):
    merger = STAMerger.from_pretrained(bert_checkpoints.base, bert_checkpoints.finetuned)
    out = merger.merge(method="average", output_dir=tmp_path / "avg")
    merged = load_state_dict(out)
    assert not any(k.startswith(("bert.", "classifier")) for k in merged)  # base (BertModel) naming
    heads = {p.stem: load_file(p) for p in (out / "heads").glob("*.safetensors")}
    assert set(heads) == {"news", "sentiment", "topic"}
    assert heads["topic"]["classifier.weight"].shape == (4, 32)
    finetuned = [load_state_dict(p) for p in bert_checkpoints.finetuned.values()]
    key = "encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(merged[key], torch.stack([ft["bert." + key] for ft in finetuned]).mean(0))


def test_dare_is_reproducible_and_independent_of_order(tmp_path, llama_checkpoints):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    first = merger.merge(method="dare_ties", density=0.5, seed=3)
    second = merger.merge(method="dare_ties", density=0.5, seed=3)
    third = merger.merge(method="dare_ties", density=0.5, seed=4)
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(first.state_dict()[key], second.state_dict()[key])
    assert not torch.equal(first.state_dict()[key], third.state_dict()[key])


def test_weights_and_task_subset(tmp_path, llama_checkpoints):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    out = merger.merge(tasks=["code", "chat"], weights={"code": 2.0, "chat": -1.0}, output_dir=tmp_path / "o")
    base = load_state_dict(llama_checkpoints.base)
    code = load_state_dict(llama_checkpoints.finetuned["code"])
    chat = load_state_dict(llama_checkpoints.finetuned["chat"])
    key = "model.layers.1.self_attn.o_proj.weight"
    expected = base[key] + 2.0 * (code[key] - base[key]) - (chat[key] - base[key])
    torch.testing.assert_close(load_state_dict(out)[key], expected)


def test_output_dtype_and_sharding(tmp_path, llama_checkpoints):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    out = merger.merge(output_dir=tmp_path / "bf16", torch_dtype="bfloat16", max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    merged = load_state_dict(out)
    assert all(v.dtype == torch.bfloat16 for v in merged.values() if v.is_floating_point())
    assert (
        json.loads((out / "config.json").read_text()).get("dtype", None) in ("bfloat16", None)
        or json.loads((out / "config.json").read_text()).get("torch_dtype") == "bfloat16"
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


def test_state_dict_models_without_config():
    torch.manual_seed(0)
    base = {"w": torch.randn(5, 5), "steps": torch.tensor(3)}
    fts = {f"t{i}": {"w": base["w"] + torch.randn(5, 5), "steps": torch.tensor(7)} for i in range(2)}
    merged = STAMerger.from_pretrained(base, fts).merge(scaling=0.5)
    assert isinstance(merged, dict)
    torch.testing.assert_close(merged["w"], base["w"] + 0.5 * sum(ft["w"] - base["w"] for ft in fts.values()))
    assert merged["steps"].item() == 3


# -- bad input: clear errors, nothing written ---------------------------------------------------------------------


def test_existing_output_is_refused_then_overwritten(tmp_path, llama_checkpoints):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        merger.merge(output_dir=out)
    assert (out / "keep.txt").exists()
    merger.merge(output_dir=out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_failure_midway_leaves_no_output(tmp_path, llama_checkpoints, monkeypatch):
    from hf_sta.io import checkpoints

    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    original = checkpoints.StreamingSafetensorsWriter.write
    calls = {"n": 0}

    def failing_write(self, name, tensor, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return original(self, name, tensor, **kwargs)

    monkeypatch.setattr(checkpoints.StreamingSafetensorsWriter, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        merger.merge(output_dir=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def _pipeline_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith(("hf_sta-worker", "hf_sta-write"))]


def test_read_failure_in_a_worker_leaves_no_output(tmp_path, llama_checkpoints, monkeypatch):
    from hf_sta.io import checkpoints

    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    original = checkpoints.CheckpointReader.get_tensor
    calls = {"n": 0}

    def failing_read(self, key, out=None):
        calls["n"] += 1
        if calls["n"] == 9:
            raise OSError("input/output error")
        return original(self, key, out)

    monkeypatch.setattr(checkpoints.CheckpointReader, "get_tensor", failing_read)
    with pytest.raises(OSError, match="input/output error"):
        merger.merge(method="ties", output_dir=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    assert not _pipeline_threads()


def test_background_write_failure_leaves_no_output(tmp_path, llama_checkpoints, monkeypatch):
    from hf_sta.io import checkpoints

    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    original = checkpoints.StreamingSafetensorsWriter._write_bytes
    calls = {"n": 0}

    def failing_write(self, shard, offset, data, on_written=None):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("disk full")
        return original(self, shard, offset, data, on_written)

    monkeypatch.setattr(checkpoints.StreamingSafetensorsWriter, "_write_bytes", failing_write)
    threads = torch.get_num_threads()
    with pytest.raises(OSError, match="disk full"):
        merger.merge(method="task_arithmetic", output_dir=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    assert not _pipeline_threads()
    assert torch.get_num_threads() == threads  # lowered for the merge's worker threads, restored


@pytest.mark.parametrize("bad", ["../x", "", "a/b", "a\\b", ".hidden", "x" * 200])
def test_unsafe_task_names_are_refused(tmp_path, llama_checkpoints, bad):
    with pytest.raises(ConfigError, match="not a safe file name"):
        STAMerger.from_pretrained(llama_checkpoints.base, {bad: llama_checkpoints.finetuned["code"]})
    assert list(tmp_path.iterdir()) == []


def test_unknown_method_and_bad_parameters(tmp_path, llama_checkpoints):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    with pytest.raises(ValueError, match="Unknown merge method 'tie'.*ties"):
        merger.merge(method="tie", output_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="density"):
        merger.merge(method="ties", density=1.5, output_dir=tmp_path / "b")
    with pytest.raises(ValueError, match="densty"):
        merger.merge(method="ties", densty=0.5, output_dir=tmp_path / "c")
    with pytest.raises(ConfigError, match="Unknown task"):
        merger.merge(tasks=["nope"], output_dir=tmp_path / "d")
    with pytest.raises(ConfigError, match="torch_dtype"):
        merger.merge(torch_dtype="int8", output_dir=tmp_path / "e")
    assert list(tmp_path.iterdir()) == []


def test_missing_base_is_a_clear_error(tmp_path, llama_checkpoints):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        STAMerger.from_pretrained(tmp_path / "no" / "base", llama_checkpoints.finetuned)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="No model weights"):
        STAMerger.from_pretrained(tmp_path / "empty", llama_checkpoints.finetuned)


def test_nan_in_a_finetuned_model_fails_the_merge_and_writes_nothing(tmp_path, llama_checkpoints):
    import shutil

    bad = tmp_path / "inputs" / "bad"
    shutil.copytree(llama_checkpoints.finetuned["code"], bad)
    state = load_file(bad / "model.safetensors")
    state["model.layers.1.mlp.down_proj.weight"][0, 0] = float("inf")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    merger = STAMerger.from_pretrained(
        llama_checkpoints.base, {"bad": bad, "math": llama_checkpoints.finetuned["math"]}
    )
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.down_proj.weight.*'bad'.*NaN/inf"):
        merger.merge(output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


def test_list_names_must_be_unique(tmp_path, llama_checkpoints):
    a = tmp_path / "a" / "same"
    b = tmp_path / "b" / "same"
    for folder in (a, b):
        folder.parent.mkdir()
        Path(folder).symlink_to(llama_checkpoints.finetuned["code"])
    with pytest.raises(ConfigError, match="both be named 'same'"):
        STAMerger.from_pretrained(llama_checkpoints.base, [a, b])
