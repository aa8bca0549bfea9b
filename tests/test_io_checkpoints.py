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


def _many_dtypes() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "f32": torch.randn(33, 17, generator=generator),
        "f64": torch.randn(5, 3, generator=generator, dtype=torch.float64),
        "f16": torch.randn(9, generator=generator).half(),
        "bf16": torch.randn(4, 6, generator=generator).to(torch.bfloat16),
        "f8": torch.randn(10, generator=generator).to(torch.float8_e4m3fn),
        "i64": torch.arange(-5, 7),
        "i32": torch.arange(12, dtype=torch.int32).reshape(3, 4),
        "i16": torch.tensor([-3, 300], dtype=torch.int16),
        "i8": torch.tensor([-1, 2, 3], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([[True, False], [False, True]]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
    }


def _assert_same(loaded: torch.Tensor, expected: torch.Tensor) -> None:
    assert loaded.dtype == expected.dtype and loaded.shape == expected.shape
    # bytes, not values: float8 has no equality kernel and NaN != NaN
    assert torch.equal(loaded.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("sharded", [False, True])
def test_reader_equals_safetensors_load_file(tmp_path, sharded):
    tensors = _many_dtypes()
    if sharded:
        names = list(tensors)
        weight_map = {}
        for index, part in enumerate((names[:5], names[5:9], names[9:])):
            file = f"model-{index + 1:05d}-of-00003.safetensors"
            save_file({k: tensors[k] for k in part}, tmp_path / file)
            weight_map.update(dict.fromkeys(part, file))
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        save_file(tensors, tmp_path / "model.safetensors")
    oracle = {}
    for file in tmp_path.glob("*.safetensors"):
        oracle.update(load_file(file))
    reader = CheckpointReader(tmp_path)
    assert set(reader.keys()) == set(oracle)
    for key in reversed(list(tensors)):  # another order than the files': shards are reopened
        loaded = reader.get_tensor(key)
        assert reader.shape(key) == tuple(oracle[key].shape) and reader.dtype(key) == oracle[key].dtype
        _assert_same(loaded, oracle[key])
    # each call returns a tensor of its own
    first = reader.get_tensor("f32")
    first.zero_()
    _assert_same(reader.get_tensor("f32"), oracle["f32"])
    reader.close()
    assert reader._open_file is None and reader._open_handle is None


def test_reader_reads_into_a_given_buffer(tmp_path):
    tensors = _many_dtypes()
    save_file(tensors, tmp_path / "model.safetensors")
    reader = CheckpointReader(tmp_path)
    buffer = torch.full((40, 17), -1.0)
    for key in ("f32", "f32"):  # reused: overwritten each time
        out = buffer[3 : 3 + 33]
        assert reader.get_tensor(key, out=out) is out
        _assert_same(out, tensors[key])
    assert torch.equal(buffer[:3], torch.full((3, 17), -1.0)) and torch.equal(buffer[36:], torch.full((4, 17), -1.0))
    half = torch.empty(9, dtype=torch.float16)
    _assert_same(reader.get_tensor("f16", out=half), tensors["f16"])
    with pytest.raises(ValueError, match="'f32' .* shape \\[33, 17\\] and dtype torch.float32"):
        reader.get_tensor("f32", out=torch.empty(33, 17, dtype=torch.float64))
    with pytest.raises(ValueError, match="not contiguous"):
        reader.get_tensor("f32", out=torch.empty(17, 33).t())
    with pytest.raises(ValueError, match="shape"):
        reader.get_tensor("f32", out=torch.empty(33 * 17))
    # state dicts and pickled checkpoints take out= as well
    source = open_checkpoint({"w": tensors["f32"]})
    out = torch.empty(33, 17)
    assert source.get_tensor("w", out=out) is out and torch.equal(out, tensors["f32"])
    torch.save({"w": tensors["bf16"]}, tmp_path / "w.bin")
    out = torch.empty(4, 6, dtype=torch.bfloat16)
    assert CheckpointReader(tmp_path / "w.bin").get_tensor("w", out=out) is out
    _assert_same(out, tensors["bf16"])


@pytest.mark.parametrize("source_kind", ["safetensors", "pickle", "state_dict"])
def test_read_range_equals_a_slice_of_the_tensor(tmp_path, source_kind):
    tensors = _many_dtypes()
    if source_kind == "safetensors":
        save_file(tensors, tmp_path / "model.safetensors")
        source = CheckpointReader(tmp_path)
    elif source_kind == "pickle":
        torch.save(tensors, tmp_path / "pytorch_model.bin")
        source = CheckpointReader(tmp_path)
    else:
        source = open_checkpoint(tensors)
    for key in ("f32", "f16", "bf16", "i64"):
        flat = tensors[key].reshape(-1)  # oracle: a slice of the whole tensor
        for start, stop in ((0, flat.numel()), (0, 1), (3, 8), (flat.numel() - 2, flat.numel()), (5, 5)):
            out = torch.full((stop - start,), 7, dtype=flat.dtype)
            assert source.read_range(key, start, stop, out) is out
            assert torch.equal(out.view(torch.uint8), flat[start:stop].contiguous().view(torch.uint8))
    with pytest.raises(ValueError, match="out of range"):
        source.read_range("f32", 5, 3, torch.empty(0))
    with pytest.raises(ValueError, match="out of range"):
        source.read_range("f32", 0, 10_000, torch.empty(10_000))
    with pytest.raises(ValueError, match="contiguous CPU tensor of 4 torch.float32"):
        source.read_range("f32", 0, 4, torch.empty(4, dtype=torch.float64))


def test_reader_reports_truncated_file_with_file_and_key(tmp_path):
    save_file({"a": torch.ones(100), "b": torch.arange(50.0)}, tmp_path / "model.safetensors")
    reader = CheckpointReader(tmp_path)  # headers are read now, data later
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-40])
    assert torch.equal(reader.get_tensor("a"), torch.ones(100))
    with pytest.raises(CheckpointError, match=r"model\.safetensors' is truncated: tensor 'b'"):
        reader.get_tensor("b")


def test_reader_rejects_inconsistent_header(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(12))
    with pytest.raises(CheckpointError, match="'w' in .*model.safetensors' spans 12 bytes.* needs 16"):
        CheckpointReader(tmp_path)


def test_reader_swaps_bytes_on_a_big_endian_host(tmp_path, monkeypatch):
    from hf_sta.io import checkpoints

    values = torch.tensor([1.0, -2.5, 3.25])
    save_file({"w": values, "b": torch.tensor([1, 2], dtype=torch.uint8)}, tmp_path / "model.safetensors")
    monkeypatch.setattr(checkpoints, "_LITTLE_ENDIAN_HOST", False)
    reader = CheckpointReader(tmp_path)
    swapped = reader.get_tensor("w")
    assert torch.equal(swapped.view(torch.uint8).view(3, 4), values.view(torch.uint8).view(3, 4).flip(-1))
    assert torch.equal(reader.get_tensor("b"), torch.tensor([1, 2], dtype=torch.uint8))
