"""Scale: merges take device= and num_threads=; a merge completes, with the same output, under a memory cap of half
the size of its inputs (a cgroup v1 memory limit when one can be created here, else RLIMIT_DATA)."""

from __future__ import annotations

import pytest
import torch

from hf_sta import STAMerger
from hf_sta.errors import ConfigError
from tests.conftest import load_state_dict


@pytest.mark.parametrize("method,params", [("tsv", {}), ("ties", {"density": 0.4}), ("dare_ties", {"density": 0.5})])
def test_device_and_threads_give_the_same_merge(tmp_path, llama_checkpoints, monkeypatch, method, params):
    import hf_sta.engine as engine

    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    reference = merger.merge(method, output_dir=tmp_path / "reference", **params)
    seen = []
    original = engine.parallel_map
    monkeypatch.setattr(engine, "parallel_map", lambda *a, **k: seen.append(k["workers"]) or original(*a, **k))
    threads = torch.get_num_threads()
    out = merger.merge(method, output_dir=tmp_path / "cpu", device="cpu", num_threads=1, **params)
    assert seen == [1] and torch.get_num_threads() == threads  # one worker; torch's setting restored
    expected, merged = load_state_dict(reference), load_state_dict(out)
    assert all(torch.equal(expected[k], merged[k]) for k in expected)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"device": "cuda"}, "sees no CUDA device"),
        ({"device": "nonsense"}, "device must be a torch device"),
        ({"num_threads": 0}, "num_threads must be an integer >= 1"),
    ],
)
def test_bad_device_or_threads_are_refused(tmp_path, llama_checkpoints, options, message):
    if options.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    with pytest.raises(ConfigError, match=message):
        merger.merge("ties", output_dir=tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_merge_completes_under_a_cap_of_half_its_inputs(tmp_path):
    """4 x 320 MB of inputs (64 tensors each), a cgroup memory limit of 640 MB: hf_sta's streamed merge completes with
    the bytes of an uncapped run; loading the four state dicts under the same limit is killed (the limit bites). (At
    4 x 200 MB in 16 tensors the cap, 400 MB, left no room above the interpreter, torch and a 12.5 MB tensor's working
    set: the capped merge was killed now and then.)"""
    from benchmarks import bench_memory_cap

    if not bench_memory_cap.cgroup_available():
        pytest.skip("no writable cgroup v1 memory controller here (RLIMIT_DATA counts reserved address space)")
    folder = bench_memory_cap.make_inputs(tmp_path / "inputs", 320, tensors=64)
    result = bench_memory_cap.prove(folder, tmp_path, "cgroup", log=lambda line: None)
    assert result["cap_bytes"] * 2 >= result["input_bytes"] - 1
    assert result["runs"]["capped"]["returncode"] == 0, result["runs"]["capped"]
    assert result["capped_output_identical"]
    assert result["runs"]["naive"]["returncode"] != 0
    assert result["runs"]["capped"]["cgroup_peak_bytes"] <= result["cap_bytes"]


def calibration_rows():
    """Six causal-LM rows in micro-batches of 2 (the same batches on every process)."""
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 96, (6, 10), generator=generator)
    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]
    return DataLoader(rows, batch_size=2)


@pytest.mark.slow
def test_two_fsdp_sharded_processes_give_the_statistics_of_one(tmp_path, llama_checkpoints):
    """Importance (taylor), Fisher and activation Grams of a tiny Llama sharded over 2 CPU processes with FSDP2 (gloo)
    equal one unsharded process's on the same data."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from hf_sta.importance import ActivationStatistics

    root = Path(__file__).resolve().parents[1]
    merger = STAMerger.from_pretrained(llama_checkpoints.base, {"code": llama_checkpoints.finetuned["code"]})
    model = LlamaForCausalLM.from_pretrained(llama_checkpoints.finetuned["code"])
    options = dict(model=model, show_progress=False, num_samples=None)
    expected = {
        "taylor": merger.compute_importance("code", calibration_rows(), **options),
        "fisher": merger.compute_importance("code", calibration_rows(), metric="fisher", **options),
    }
    grams = merger.compute_activation_statistics("code", calibration_rows(), **options)
    port = str(29500 + os.getpid() % 1000)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               str(root / "tests" / "scripts" / "fsdp_statistics.py"), str(llama_checkpoints.base),
               str(llama_checkpoints.finetuned["code"]), str(tmp_path)]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=root, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    processes, shard = (tmp_path / "shard.txt").read_text().split(" ", 1)
    assert processes == "2" and shard == "[16, 32]"  # each process holds half of every [32, 32] projection
    for metric, scores in expected.items():
        sharded = load_file(tmp_path / f"{metric}.safetensors")
        assert set(sharded) == set(scores.keys())
        for key in scores.keys():
            torch.testing.assert_close(sharded[key], scores[key], rtol=1e-5, atol=1e-9, msg=f"{metric} {key}")
    loaded = ActivationStatistics.load(tmp_path / "grams.safetensors")
    assert (loaded.num_tokens, loaded.num_samples) == (grams.num_tokens, grams.num_samples)
    for key in grams.keys():
        torch.testing.assert_close(loaded[key], grams.grams[key], rtol=1e-5, atol=1e-5, msg=key)
