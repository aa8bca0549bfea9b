"""Checkpoint I/O: lazy reading, streaming sharded writing, atomic output folders."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_sta.errors import CheckpointError
from hf_sta.io.checkpoints import (
    AtomicOutputDir,
    CheckpointReader,
    StreamingSafetensorsWriter,
    TensorPlan,
    open_checkpoint,
    parse_size,
    resolve_checkpoint,
)


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32),
        "b.bias": torch.randn(7).to(torch.bfloat16),
        "c.half": torch.randn(3, 5).half(),
        "ids": torch.arange(11),
        "flag": torch.tensor([True, False]),
    }


@pytest.mark.parametrize("budget", ["1GB", 1000, 1])
def test_streaming_writer_roundtrip_and_sharding(tmp_path, budget):
    tensors = _tensors()
    plan = [TensorPlan(k, v.shape, v.dtype) for k, v in tensors.items()]
    writer = StreamingSafetensorsWriter(tmp_path, plan, max_shard_size=budget, metadata={"k": "v"})
    for key, value in tensors.items():
        writer.write(key, value)
    writer.finish()

    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if budget == "1GB":
        assert files == ["model.safetensors"]
        assert not (tmp_path / "model.safetensors.index.json").exists()
    else:
        assert len(files) > 1
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
        assert all(f.startswith("model-0000") and f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    # oracle: the safetensors library itself reads what we wrote
    loaded = {}
    for file in files:
        loaded.update(load_file(tmp_path / file))
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype
        assert torch.equal(loaded[key], value)
    # and so does our reader, through the index when sharded
    reader = CheckpointReader(tmp_path)
    assert reader.keys() == list(tensors) or set(reader.keys()) == set(tensors)
    for key, value in tensors.items():
        assert reader.shape(key) == tuple(value.shape)
        assert reader.dtype(key) == value.dtype
        assert torch.equal(reader.get_tensor(key), value)


def test_writer_rejects_out_of_plan_writes(tmp_path):
    plan = [TensorPlan("x", (2,), torch.float32), TensorPlan("y", (2,), torch.float32)]
    writer = StreamingSafetensorsWriter(tmp_path, plan)
    with pytest.raises(RuntimeError, match="expected x"):
        writer.write("y", torch.zeros(2))
    writer.write("x", torch.zeros(2))
    with pytest.raises(RuntimeError, match="1 of 2"):
        writer.finish()
    writer.abort()


def test_reader_refuses_pickles_that_are_not_state_dicts(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": torch.ones(2), "evil": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        CheckpointReader(folder)


def test_reader_reads_bin_with_weights_only(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"w": torch.arange(6.0).reshape(2, 3)}, folder / "pytorch_model.bin")
    reader = CheckpointReader(folder)
    assert reader.shape("w") == (2, 3)
    assert torch.equal(reader.get_tensor("w"), torch.arange(6.0).reshape(2, 3))


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointReader(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="No model weights found in .*empty"):
        CheckpointReader(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{not")
    with pytest.raises(CheckpointError, match="broken.*model.safetensors"):
        CheckpointReader(broken)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing.*model-1.safetensors"):
        CheckpointReader(sharded)


def test_reader_keeps_one_shard_open(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(2)}, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    reader = CheckpointReader(tmp_path)
    reader.get_tensor("a")
    assert reader._open_file.name == weight_map["a"]
    reader.get_tensor("b")
    assert reader._open_file.name == weight_map["b"]


def test_resolve_checkpoint_local_and_bad_names(tmp_path):
    assert resolve_checkpoint(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing" / "deeper" / "x")
    with pytest.raises(FileNotFoundError, match="could not be fetched"):
        resolve_checkpoint("no-such-org/no-such-model")  # HF_HUB_OFFLINE=1 in tests: fails fast


def test_open_checkpoint_from_state_dict_and_module():
    source = open_checkpoint({"w": torch.ones(3)})
    assert source.keys() == ["w"] and source.shape("w") == (3,)
    module = torch.nn.Linear(2, 3)
    source = open_checkpoint(module)
    assert set(source.keys()) == {"weight", "bias"}


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2MiB") == 2 * 2**20
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with AtomicOutputDir(target) as tmp:
            (tmp / "half.safetensors").write_bytes(b"partial")
            raise KeyboardInterrupt
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []

    with AtomicOutputDir(target) as tmp:
        (tmp / "done").write_text("1")
    assert (target / "done").read_text() == "1"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        AtomicOutputDir(target)
    with AtomicOutputDir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
