"""STA selection, merge and forgetting, checked against direct (brute-force) computations of the definitions."""

from __future__ import annotations

import pytest
import torch

from hf_sta import STAMerger
from hf_sta.methods import get_merge_method
from hf_sta.methods.sta import forget_delta, global_thresholds, importance_masks, sta


def _inputs(tasks: int = 3, shape=(40, 30), seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    tau = torch.randn((tasks, *shape), generator=generator)
    importance = torch.rand((tasks, *shape), generator=generator) ** 3  # skewed, tie-free
    return tau, importance


def test_threshold_mask_is_the_definition():
    tau, importance = _inputs()
    masks, scores = importance_masks(importance, threshold=0.3, density=None, normalize="max")
    for t in range(3):
        expected = importance[t] / importance[t].max() >= 0.3
        assert torch.equal(masks[t], expected)
    masks, _ = importance_masks(importance, threshold=1.5, density=None, normalize="mean")
    for t in range(3):
        assert torch.equal(masks[t], importance[t] / importance[t].mean() >= 1.5)
    masks, _ = importance_masks(importance, threshold=0.01, density=None, normalize="none")
    assert torch.equal(masks, importance >= 0.01)


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 1.0])
def test_density_mask_keeps_exactly_the_top_entries(density):
    tau, importance = _inputs()
    masks, _ = importance_masks(importance, threshold=None, density=density)
    k = int(density * importance[0].numel())
    for t in range(3):
        assert int(masks[t].sum()) == k
        top = torch.topk(importance[t].flatten(), k).indices  # oracle on tie-free scores
        expected = torch.zeros(importance[t].numel(), dtype=torch.bool)
        expected[top] = True
        assert torch.equal(masks[t].flatten(), expected)


def test_default_selection_is_density_default():
    from hf_sta.methods.sta import DEFAULT_DENSITY, DEFAULT_FORGET_DENSITY

    tau, importance = _inputs()
    masks, _ = importance_masks(importance, threshold=None, density=None)
    assert int(masks[0].sum()) == int(DEFAULT_DENSITY * importance[0].numel())
    kept = forget_delta(tau[0], importance[0]) != 0
    assert int(kept.sum()) == int(DEFAULT_FORGET_DENSITY * importance[0].numel())


@pytest.mark.parametrize("overlap", ["sum", "mean", "max_importance", "elect"])
def test_overlap_modes(overlap):
    tau, importance = _inputs()
    weights = torch.tensor([1.0, 0.5, 2.0])
    delta = sta(tau, weights, importance=importance, threshold=0.2, density=None, overlap=overlap)
    masks = torch.stack([importance[t] / importance[t].max() >= 0.2 for t in range(3)])
    weighted = [weights[t] * tau[t] * masks[t] for t in range(3)]
    if overlap == "sum":
        expected = sum(weighted)
    elif overlap == "mean":
        expected = sum(weighted) / masks.sum(0).clamp(min=1)
    elif overlap == "elect":  # PEFT's TIES sign election and disjoint mean over the selected entries
        from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge

        stacked = torch.stack(weighted)
        expected = disjoint_merge(stacked, calculate_majority_sign_mask(stacked, "total"))
        assert not torch.allclose(expected, sum(weighted) / masks.sum(0).clamp(min=1))  # election matters here
    else:  # brute force, entry by entry
        expected = torch.zeros_like(tau[0])
        normalized = torch.stack([importance[t] / importance[t].max() for t in range(3)])
        for i in range(tau.shape[1]):
            for j in range(tau.shape[2]):
                chosen = [t for t in range(3) if masks[t, i, j]]
                if chosen:
                    best = max(chosen, key=lambda t: normalized[t, i, j])
                    expected[i, j] = weights[best] * tau[best, i, j]
    torch.testing.assert_close(delta, expected)
    assert (masks.sum(0) > 1).any()  # the test exercises real overlaps


def test_global_thresholds_equal_a_full_sort():
    generator = torch.Generator().manual_seed(1)
    tensors = [torch.rand((2, *shape), generator=generator) ** 4 for shape in [(50, 20), (300,), (7, 9, 11)]]
    density = 0.13
    thresholds = global_thresholds(lambda: iter(tensors), 2, density, normalize="max")
    for t in range(2):
        normalized = torch.cat([(x[t] / x[t].max()).flatten() for x in tensors])
        k = int(density * normalized.numel())
        expected = torch.sort(normalized, descending=True).values[k - 1]
        assert thresholds[t] == expected
        kept = sum(int(((x[t] / x[t].max()) >= thresholds[t]).sum()) for x in tensors)
        assert kept == k  # tie-free scores: exactly k kept over the whole model


def test_forget_delta_definition():
    tau, importance = _inputs(tasks=1)
    edit = forget_delta(tau[0], importance[0], threshold=None, density=0.25)
    k = int(0.25 * tau[0].numel())
    top = torch.topk(importance[0].flatten(), k).indices
    expected = torch.zeros(tau[0].numel())
    expected[top] = tau[0].flatten()[top]
    torch.testing.assert_close(edit, expected.view_as(tau[0]))
    torch.testing.assert_close(forget_delta(tau[0], None), tau[0])


def test_kernel_defaults_are_the_registered_defaults():
    import inspect

    signature = inspect.signature(sta)
    for name, default in get_merge_method("sta").defaults.items():
        assert signature.parameters[name].default == default, name


def test_registered_with_parameters():
    spec = get_merge_method("sta")
    assert spec.requires_importance
    params = spec.validate_params({"threshold": "0.1"})
    assert params["threshold"] == 0.1 and params["density"] is None and params["overlap"] == "elect"
    with pytest.raises(ValueError, match="overlap"):
        spec.validate_params({"overlap": "union"})
    with pytest.raises(ValueError, match="density"):
        spec.validate_params({"density": 0.0})


# -- through STAMerger, streamed to disk --------------------------------------------------------------------------


@pytest.fixture()
def merger_with_importance(llama_checkpoints):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    for task in merger.tasks:
        merger.compute_importance(task, metric="magnitude")
    return merger


@pytest.mark.parametrize(
    "params",
    [
        {"density": 0.3},
        {"threshold": 0.4, "overlap": "mean"},
        {"density": 0.2, "density_scope": "global", "overlap": "max_importance"},
    ],
)
def test_sta_merge_end_to_end(tmp_path, llama_checkpoints, merger_with_importance, params):
    from tests.conftest import load_state_dict

    merger = merger_with_importance
    out = merger.merge(method="sta", scaling=0.8, output_dir=tmp_path / "sta", **params)
    merged = load_state_dict(out)
    base = load_state_dict(llama_checkpoints.base)
    fts = [load_state_dict(p) for p in llama_checkpoints.finetuned.values()]
    global_threshold = None
    if params.get("density_scope") == "global":
        keys = [k for k in base if base[k].is_floating_point()]
        stacked = [torch.stack([(ft[k] - base[k]).abs() for ft in fts]) for k in keys]
        global_threshold = global_thresholds(lambda: iter(stacked), 3, params["density"])
    for key, theta_0 in base.items():
        tau = torch.stack([ft[key] - theta_0 for ft in fts])
        delta = sta(
            tau,
            torch.ones(3),
            importance=tau.abs(),
            global_threshold=global_threshold,
            **{"threshold": None, "density": None, **params},
        )
        torch.testing.assert_close(merged[key], theta_0 + 0.8 * delta, msg=key)
    assert set(merger.last_kept_fraction) == set(base)
    if "density" in params and params.get("density_scope") != "global":
        fractions = merger.last_kept_fraction["model.layers.0.mlp.up_proj.weight"]
        assert fractions == pytest.approx(dict.fromkeys(merger.tasks, params["density"]), abs=1e-3)


@pytest.mark.parametrize("method", ["sta", "negation"])
def test_forget_from_merged_model_on_disk(tmp_path, llama_checkpoints, merger_with_importance, method):
    from tests.conftest import load_state_dict

    merger = merger_with_importance
    merged_dir = merger.merge(method="task_arithmetic", output_dir=tmp_path / "merged")
    params = {"density": 0.5} if method == "sta" else {}
    out = merger.forget(
        "math", method=method, scaling=0.7, target=merged_dir, output_dir=tmp_path / "forgot", **params
    )
    merged = load_state_dict(merged_dir)
    base = load_state_dict(llama_checkpoints.base)
    math = load_state_dict(llama_checkpoints.finetuned["math"])
    result = load_state_dict(out)
    for key in base:
        tau = math[key] - base[key]
        mask_edit = forget_delta(tau, tau.abs(), density=0.5) if method == "sta" else tau
        torch.testing.assert_close(result[key], merged[key] - 0.7 * mask_edit, msg=key)


def test_forget_from_a_finetuned_task_and_from_base(llama_checkpoints, merger_with_importance):
    from tests.conftest import load_state_dict

    merger = merger_with_importance
    base = load_state_dict(llama_checkpoints.base)
    code = load_state_dict(llama_checkpoints.finetuned["code"])
    model = merger.forget("code", method="negation", scaling=1.0, target="code")
    key = "model.layers.1.mlp.gate_proj.weight"
    torch.testing.assert_close(model.state_dict()[key], base[key], atol=1e-6, rtol=0)  # theta_t - tau_t = theta_0
    model = merger.forget("code", method="negation", scaling=0.5)
    torch.testing.assert_close(model.state_dict()[key], base[key] - 0.5 * (code[key] - base[key]))


def test_tune_forgetting_picks_largest_drop_within_control(merger_with_importance):
    merger = merger_with_importance
    key = "model.layers.0.mlp.down_proj.weight"
    tau = merger.task_vectors["math"][key]

    def target_metric(model):  # 1 - s: falls as more of the math vector is removed
        removed = model.state_dict()[key] - merger.base.get_tensor(key)
        return float(1.0 + (removed * tau).sum() / (tau * tau).sum())

    def control_metric(model):  # a control that degrades with the scaling
        distance = (model.state_dict()[key] - merger.base.get_tensor(key)).norm() / tau.norm()
        return float(1.0 - 0.04 * distance)

    curve = merger.tune_forgetting(
        "math", target_metric, control_metric, method="negation", scalings=(0.5, 1.0, 1.5, 2.0)
    )
    assert [p["scaling"] for p in curve.points] == [0.5, 1.0, 1.5, 2.0]
    allowed = [p for p in curve.points if p["control"] >= 0.95 * curve.baseline["control"]]
    assert curve.best_scaling == min(allowed, key=lambda p: p["target"])["scaling"]
    assert curve.best_scaling == 1.0  # 1.5 breaks the 95% control rule (distance 1.5 -> 0.94)
