"""TaskVector: lazy deltas, key reconciliation, heads, arithmetic, errors."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_sta import TaskVector
from hf_sta.errors import CheckpointError
from tests.conftest import load_state_dict


def test_bert_base_prefix_and_heads(bert_checkpoints):
    base = load_state_dict(bert_checkpoints.base)
    finetuned = load_state_dict(bert_checkpoints.finetuned["news"])
    vector = TaskVector.from_pretrained(bert_checkpoints.base, bert_checkpoints.finetuned["news"], name="news")

    assert sorted(vector.head_keys) == ["classifier.bias", "classifier.weight"]
    float_base_keys = [k for k, v in base.items() if v.is_floating_point()]
    assert sorted(vector.keys()) == sorted(float_base_keys)
    for key in vector.keys():
        expected = finetuned["bert." + key] - base[key]  # oracle: plain tensors, transformers' prefix rule
        torch.testing.assert_close(vector[key], expected, rtol=0, atol=0)
    assert vector["encoder.layer.0.attention.self.query.weight"].abs().max() > 0
    assert vector.heads()["classifier.weight"].shape[0] == 2


def test_nothing_is_read_until_asked(bert_checkpoints, monkeypatch):
    from hf_sta.io.checkpoints import CheckpointReader

    calls = []
    original, original_range = CheckpointReader.get_tensor, CheckpointReader.read_range
    monkeypatch.setattr(
        CheckpointReader, "get_tensor", lambda self, key, out=None: calls.append(key) or original(self, key, out)
    )

    def read_range(self, key, *args):  # fp32 fine-tuned tensors are read block by block: count the tensor once
        if key not in calls:
            calls.append(key)
        return original_range(self, key, *args)

    monkeypatch.setattr(CheckpointReader, "read_range", read_range)
    vector = TaskVector.from_pretrained(bert_checkpoints.base, bert_checkpoints.finetuned["news"])
    assert calls == []
    vector["pooler.dense.weight"]
    assert sorted(calls) == ["bert.pooler.dense.weight", "pooler.dense.weight"]


def test_arithmetic_and_apply_to(bert_checkpoints):
    tv = {
        t: TaskVector.from_pretrained(bert_checkpoints.base, p, name=t) for t, p in bert_checkpoints.finetuned.items()
    }
    key = "encoder.layer.1.output.dense.weight"
    a, b, c = tv["news"][key], tv["sentiment"][key], tv["topic"][key]
    torch.testing.assert_close((tv["news"] + tv["sentiment"])[key], a + b)
    torch.testing.assert_close((tv["news"] - tv["sentiment"])[key], a - b)
    torch.testing.assert_close((-tv["news"])[key], -a)
    torch.testing.assert_close((0.5 * tv["news"])[key], 0.5 * a)
    torch.testing.assert_close((tv["news"] * 2)[key], 2 * a)
    total = sum(tv.values())
    torch.testing.assert_close(total[key], a + b + c)
    assert len((tv["news"] + tv["sentiment"]).terms) == 2
    assert len(total.terms) == 3  # flattened, not nested

    base = load_state_dict(bert_checkpoints.base)
    applied = (tv["news"] + tv["topic"]).apply_to(bert_checkpoints.base, scaling=0.3)
    assert set(applied) == set(base)
    torch.testing.assert_close(applied[key], base[key] + 0.3 * (a + c))
    half = tv["news"].apply_to(bert_checkpoints.base, dtype=torch.bfloat16)
    assert half[key].dtype == torch.bfloat16


def test_integer_buffers_and_statistics_are_copied_not_merged():
    base = {"w": torch.zeros(3), "bn.running_mean": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(5)}
    ft = {"w": torch.ones(3), "bn.running_mean": torch.ones(3), "bn.num_batches_tracked": torch.tensor(9)}
    vector = TaskVector.from_pretrained(base, ft, name="t")
    assert vector.keys() == ["w"]
    assert sorted(vector.alignment.copied) == ["bn.num_batches_tracked", "bn.running_mean"]
    applied = vector.apply_to(base)
    assert torch.equal(applied["bn.running_mean"], torch.zeros(3))
    assert applied["bn.num_batches_tracked"].item() == 5


def test_shape_mismatch_names_tensor_and_shapes():
    with pytest.raises(CheckpointError, match=r"'w'.*\[4\].*\[3\]"):
        TaskVector.from_pretrained({"w": torch.zeros(3)}, {"w": torch.zeros(4)}, name="t")


def test_other_architecture_is_refused(bert_checkpoints, llama_checkpoints):
    with pytest.raises(CheckpointError, match="'llama' model but the base .* is 'bert'"):
        TaskVector.from_pretrained(bert_checkpoints.base, llama_checkpoints.finetuned["code"], name="code")


def test_missing_base_tensor_in_finetuned(tmp_path, bert_checkpoints):
    broken = tmp_path / "broken"
    shutil.copytree(bert_checkpoints.finetuned["news"], broken)
    state = load_file(broken / "model.safetensors")
    del state["bert.encoder.layer.0.output.dense.bias"]
    save_file(state, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match="encoder.layer.0.output.dense.bias.*missing from 'broken'"):
        TaskVector.from_pretrained(bert_checkpoints.base, broken, name="broken")


def test_nan_in_finetuned_is_reported_with_key():
    vector = TaskVector.from_pretrained({"w": torch.zeros(3)}, {"w": torch.tensor([0.0, float("nan"), 1.0])}, name="t")
    with pytest.raises(CheckpointError, match="'w'.*1 NaN/inf"):
        vector["w"]


def test_task_specific_patterns(bert_checkpoints):
    vector = TaskVector.from_pretrained(
        bert_checkpoints.base,
        bert_checkpoints.finetuned["news"],
        task_specific=["bert.pooler.*", "classifier.*"],
    )
    assert sorted(vector.head_keys) == [
        "bert.pooler.dense.bias",
        "bert.pooler.dense.weight",
        "classifier.bias",
        "classifier.weight",
    ]
    # the base's own pooler is kept as it is in the merged model, not merged
    assert sorted(k for k in vector.alignment.copied if "pooler" in k) == ["pooler.dense.bias", "pooler.dense.weight"]
    assert "pooler.dense.weight" not in vector.keys()


def test_causal_lm_head_is_merged_not_kept(llama_checkpoints):
    vector = TaskVector.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned["code"])
    assert vector.head_keys == []
    assert "lm_head.weight" in vector.keys()


def test_save_and_load_roundtrip(tmp_path, bert_checkpoints):
    vector = TaskVector.from_pretrained(bert_checkpoints.base, bert_checkpoints.finetuned["news"], name="news")
    path = vector.save(tmp_path / "news.safetensors", metadata={"samples": "600"})
    assert [p.name for p in tmp_path.iterdir()] == ["news.safetensors"]
    loaded = TaskVector.load(path)
    assert loaded.name == "news"
    assert loaded.keys() == vector.keys()
    for key in vector.keys():
        assert torch.equal(loaded[key], vector[key])
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["hf_sta_kind"] == "task_vector" and metadata["task"] == "news" and metadata["samples"] == "600"


@pytest.mark.parametrize("finetuned_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_get_into_a_reused_buffer(tmp_path, finetuned_dtype):
    generator = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(6, 5, generator=generator), "b": torch.randn(7, generator=generator).to(torch.bfloat16)}
    finetuned = {
        k: (v.float() + torch.randn(v.shape, generator=generator)).to(finetuned_dtype) for k, v in base.items()
    }
    for name, state in (("base", base), ("ft", finetuned)):
        (tmp_path / name).mkdir()
        save_file(state, tmp_path / name / "model.safetensors")
    vector = TaskVector.from_pretrained(tmp_path / "base", tmp_path / "ft", name="ft")
    combined = vector + 0.5 * vector
    stored = TaskVector.load(vector.save(tmp_path / "ft.safetensors"))
    buffer = torch.full((2, 30), float("nan"))
    for key in ("a", "b", "a"):
        expected = finetuned[key].float() - base[key].float()  # oracle: plain tensors
        out = buffer[1, : expected.numel()].view(expected.shape)
        for candidate, factor in ((vector, 1.0), (stored, 1.0), (combined, 1.5)):
            assert candidate.get(key, out=out) is out
            torch.testing.assert_close(out, factor * expected, rtol=0, atol=0)
            torch.testing.assert_close(candidate[key], factor * expected, rtol=0, atol=0)
        assert vector.get(key, base[key], out=out) is out and torch.equal(out, expected)
    assert buffer[0].isnan().all()  # only the given rows are written
    with pytest.raises(ValueError, match="out= for 'a' of task vector 'ft' must be .* shape \\[6, 5\\]"):
        vector.get("a", out=torch.empty(30))
    with pytest.raises(ValueError, match="fp32"):
        vector.get("a", out=torch.empty(6, 5, dtype=torch.float64))


def test_blocked_read_into_a_buffer_matches_and_finds_a_late_nan(tmp_path, monkeypatch):
    from hf_sta.methods import selection

    monkeypatch.setattr(selection, "BLOCK_SIZE", 7)  # the fine-tuned tensor is read, subtracted and checked in blocks
    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(9, 5, generator=generator), "h": torch.randn(9, 5, generator=generator).half()}
    finetuned = {"w": torch.randn(9, 5, generator=generator), "h": torch.randn(9, 5, generator=generator)}
    for name, state in (("base", base), ("ft", finetuned)):
        (tmp_path / name).mkdir()
        save_file(state, tmp_path / name / "model.safetensors")
    vector = TaskVector.from_pretrained(tmp_path / "base", tmp_path / "ft", name="ft")
    for key in ("w", "h"):
        out = torch.empty(9, 5)
        assert vector.get(key, out=out) is out
        assert torch.equal(out, finetuned[key] - base[key].float())  # oracle: plain tensors
    finetuned["w"][8, 4] = float("nan")  # in the last block
    save_file(finetuned, tmp_path / "ft" / "model.safetensors")
    vector = TaskVector.from_pretrained(tmp_path / "base", tmp_path / "ft", name="ft")
    with pytest.raises(CheckpointError, match="'w'.*1 NaN/inf"):
        vector.get("w", out=torch.empty(9, 5))


def test_nan_is_reported_when_read_into_a_buffer():
    vector = TaskVector.from_pretrained({"w": torch.zeros(3)}, {"w": torch.tensor([0.0, float("inf"), 1.0])}, name="t")
    with pytest.raises(CheckpointError, match="'w'.*1 NaN/inf"):
        vector.get("w", out=torch.empty(3))
