"""The vision (BatchNorm) benchmark: its ``--tiny`` run (no optional assets) and BN re-estimation against an oracle."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from benchmarks import bench_vision, vision
from hf_sta import STAMerger, reestimate_batchnorm


def _results_state():
    path = bench_vision.RESULTS / "vision.json"
    return path.stat().st_mtime_ns if path.exists() else None


@pytest.fixture(scope="module")
def tiny_result():
    before = _results_state()
    result = bench_vision.main(["--tiny"])
    assert _results_state() == before, "--tiny must not write benchmarks/results/vision.json"
    return result


def test_tiny_rows_table_and_json(tiny_result):
    tasks = tiny_result["tasks"]
    assert tasks == ["synthetic_0", "synthetic_1", "synthetic_2"]
    names = [(row["name"], row["bn_stats"]) for row in tiny_result["rows"]]
    expected = [("individual", "fine-tuned (own)")]
    new_methods = [*bench_vision.TINY_NEW_METHODS["data_free"], *bench_vision.TINY_NEW_METHODS["data_aware"]]
    new_methods += list(bench_vision.TINY_NEW_METHODS["learned"])
    for name in ("average", "task_arithmetic", "ties", "sta_default", "sta", *new_methods):
        expected += [(name, "base stats"), (name, "re-estimated")]
    assert names == expected
    for row in tiny_result["rows"]:
        assert set(row["test"]) == set(tasks)
        assert all(0.0 <= v <= 1.0 for v in row["test"].values())
        assert row["average"] == pytest.approx(sum(row["test"].values()) / 3)
    individual = tiny_result["rows"][0]
    assert individual["normalized"] == pytest.approx(1.0)
    assert tiny_result["individual_beats_chance"]
    for row in tiny_result["rows"]:
        grids = {**bench_vision.TINY_GRIDS, **bench_vision.TINY_NEW_METHODS["data_free"]}
        grids.update(bench_vision.TINY_NEW_METHODS["data_aware"])
        if row["name"] in grids:  # tuned rows: a grid member, chosen by its validation score
            grid = grids[row["name"]]
            assert row["config"] in grid and len(row["trials"]) == len(grid)
            assert row["validation"] == max(trial[row["bn_stats"]] for trial in row["trials"])
    # The synthetic tasks' statistics differ from the random base's: merging without re-estimation collapses.
    by_key = {(row["name"], row["bn_stats"]): row for row in tiny_result["rows"]}
    assert by_key[("average", "re-estimated")]["average"] > by_key[("average", "base stats")]["average"] + 0.1
    table = bench_vision.markdown_table(tiny_result)
    lines = table.splitlines()
    assert lines[0].startswith("| model | BN statistics | chosen on validation | synthetic_0 |")
    assert len(lines) == 2 + len(tiny_result["rows"])
    assert all(line.count("|") == 9 for line in lines)
    assert json.loads(json.dumps(tiny_result, default=str))["environment"]["threads"] == 1


def test_reestimation_matches_batch_statistics_oracle():
    torch.set_num_threads(1)
    suite = bench_vision.tiny_suite().prepare()
    merger = STAMerger.from_pretrained(suite.base_state, suite.finetuned, task_specific=list(vision.HEAD_PATTERNS))
    for task in suite.tasks:  # the classifiers (3 classes; the base has 5) are heads, not task vectors
        assert merger.task_vectors[task].head_keys == ["_fc.weight", "_fc.bias"]
        assert "_fc.weight" not in merger.task_vectors[task]
    state = merger.merge(method="average")
    assert torch.equal(state["_fc.weight"], suite.base_state["_fc.weight"])
    stats = [k for k in state if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 8 and all(torch.equal(state[k], suite.base_state[k]) for k in stats)  # copied, not merged

    model = suite.model(state)
    batches = suite.bn_batches()
    assert len(batches) == 3 and all(len(b) == 32 for b in batches)

    # Oracle, independent of the library: every BN layer's input per batch (BN normalising with batch statistics, as
    # in training), its per-channel mean and unbiased variance, averaged over the batches.
    oracle = copy.deepcopy(model).train()
    seen: dict[str, list[torch.Tensor]] = {}
    for name, module in oracle.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_hook(lambda m, inputs, out, name=name: seen.setdefault(name, []).append(inputs[0]))
    with torch.no_grad():
        for batch in batches:
            oracle(batch)
    norms = dict(model.named_modules())
    reestimate_batchnorm(model, batches)
    assert not model.training
    for name, inputs in seen.items():
        norm = norms[name]
        expected_mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs]).mean(0)
        expected_var = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in inputs]).mean(0)
        torch.testing.assert_close(norm.running_mean, expected_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(norm.running_var, expected_var, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(norm.running_mean, state[f"{name}.running_mean"], atol=1e-3)
        assert norm.momentum == 0.1 and int(norm.num_batches_tracked) == len(batches)


@pytest.mark.skipif(not vision.assets_available(), reason="vision assets absent (make bench-assets)")
def test_real_assets_splits_and_model():
    splits = vision.load_task("digits", resolution=32)
    assert {k: len(v) for k, v in splits.items()} == {"train": 997, "validation": 300, "test": 500}
    flat = {k: v.images.flatten(1) for k, v in splits.items()}
    assert flat["train"].min() >= -1 and flat["train"].max() <= 1
    assert splits["train"].rgb().shape == (997, 3, 32, 32)
    # Fixed splits: the same call gives the same images.
    assert torch.equal(vision.load_task("digits", resolution=32)["test"].images, splits["test"].images)
    model = vision.efficientnet_builder(64)(1000)
    model.load_state_dict(vision.efficientnet_base_state())  # strict: every key and shape matches
    with torch.no_grad():
        assert vision.pooled_features(model.eval(), torch.zeros(2, 3, 64, 64)).shape == (2, 1280)
