"""Cheap checks of the benchmark scripts (the heavy runs themselves are not run here)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from benchmarks import bench_importance, bench_merge_io
from benchmarks.smollm import perturbed_copies


@pytest.fixture
def tiny_checkpoints(tmp_path):
    """A two-tensor 'base' folder and 3 perturbed copies of it."""
    torch.manual_seed(0)
    base = tmp_path / "base"
    base.mkdir()
    tensors = {"a.weight": torch.randn(16, 8), "b.bias": torch.randn(8), "c.scale": torch.ones(1)}
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    return [base, *perturbed_copies(3, scale=1e-2, seed=1, base=base, cache_dir=tmp_path / "cache")], tensors


def test_perturbed_copies_are_cached_and_scaled(tiny_checkpoints, tmp_path):
    inputs, tensors = tiny_checkpoints
    assert [p.name for p in inputs[1:]] == [f"base-perturbed-0.01-s1-{i}" for i in range(3)]
    assert (inputs[1] / "config.json").is_file()
    with safe_open(inputs[1] / "model.safetensors", framework="pt") as handle:
        noise = handle.get_tensor("a.weight") - tensors["a.weight"]
        assert torch.equal(handle.get_tensor("c.scale"), tensors["c.scale"])  # 1-element tensors are copied
    assert 0.3e-2 < float(noise.std() / tensors["a.weight"].std()) < 3e-2
    mtime = (inputs[1] / "model.safetensors").stat().st_mtime_ns
    again = perturbed_copies(3, scale=1e-2, seed=1, base=inputs[0], cache_dir=tmp_path / "cache")
    assert again == inputs[1:] and (inputs[1] / "model.safetensors").stat().st_mtime_ns == mtime


def test_buffered_reads_match_safetensors(tiny_checkpoints):
    inputs, _ = tiny_checkpoints
    paths = [path / "model.safetensors" for path in inputs]
    buffered = dict(bench_merge_io.buffered_tensors(paths))
    reference = dict(bench_merge_io.safe_open_tensors(paths))
    assert buffered.keys() == reference.keys()
    for name, tensors in buffered.items():
        assert all(torch.equal(x, y) for x, y in zip(tensors, reference[name]))


def test_reference_workloads(tiny_checkpoints, tmp_path):
    inputs, tensors = tiny_checkpoints
    bench_merge_io.work_io_floor(inputs, tmp_path / "floor")
    bench_merge_io.work_plain_task_arithmetic(inputs, tmp_path / "plain")
    with safe_open(tmp_path / "floor" / "model.safetensors", framework="pt") as handle:
        assert torch.equal(handle.get_tensor("a.weight"), tensors["a.weight"])
    finetuned = [dict(bench_merge_io.safe_open_tensors([path / "model.safetensors"])) for path in inputs[1:]]
    expected = tensors["a.weight"] + sum(ft["a.weight"][0] - tensors["a.weight"] for ft in finetuned)
    with safe_open(tmp_path / "plain" / "model.safetensors", framework="pt") as handle:
        torch.testing.assert_close(handle.get_tensor("a.weight"), expected)


def test_table_and_targets():
    run = {"seconds": 1.0, "process_seconds": 2.0, "peak_rss_gb": 1.0, "peak_anon_gb": 0.5}
    summary = {"io_floor": {**run, "seconds": 2.0}}
    for method in bench_merge_io.METHODS:
        summary[f"hf_sta_{method}"] = {**run, "seconds": 2.5}
        summary[f"mergekit_{method}"] = {**run, "seconds": 15.0}
    targets = bench_merge_io.check_targets(summary)
    assert targets["ratio_met"] and targets["ties_speedup_met"] and targets["rss_met"]
    assert targets["ratio_to_io_floor_max"] == pytest.approx(1.25) and targets["ties_speedup"] == pytest.approx(6.0)
    table = bench_merge_io.markdown_table(summary)
    assert "| ties | 2.50 | 1.00 (0.50) | 1.25 | 15.00 | 1.00 | 6.0x |" in table


def test_importance_loops_agree_on_a_tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForCausalLM(config)

    def tokenizer(text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 64 for c in text]}

    batches = bench_importance.make_batches(tokenizer, ["abcdefghij" * 2, "xyz", "klmnopqrst" * 2], 2, 8, 1)
    assert len(batches) == 2 and batches[0]["input_ids"].shape == (1, 8)
    mean_abs_grad = bench_importance.hf_sta_loop(model, batches)
    naive = bench_importance.naive_loop(model, batches)
    for name, parameter in model.named_parameters():
        # naive sums |theta * g_j| over J = 2 micro-batches; hf_sta keeps mean_j |g_j|.
        torch.testing.assert_close(naive[name], 2 * parameter.detach().abs() * mean_abs_grad[name])
    assert all(p.grad is None for p in model.parameters())
    with bench_importance.PeakRSS() as peak:
        bench_importance.plain_loop(model, batches)
    assert peak.peak > 0


def test_startup_benchmark_tiny(capsys):
    """`hf-sta --help` runs in a fresh process without torch; the benchmark reports it against the interpreter."""
    from benchmarks import bench_startup

    result = bench_startup.main(["--tiny"])
    rows = result["results"]
    assert set(rows) == {"python -c pass", "import hf_sta", "hf-sta --help", "hf-sta --version"}
    assert all(row["median_s"] > 0 for row in rows.values())
    assert "| `hf-sta --help` |" in capsys.readouterr().out
