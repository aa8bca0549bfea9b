"""``scaling="auto"`` / ``density="auto"``: the search picks the grid point a closed form says is best, every recorded
objective matches an independent computation, the chosen values reach the merge and the recipe, errors are clear."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForSequenceClassification

from hf_sta import STAMerger
from hf_sta.auto import DENSITY_GRIDS, SCALING_GRID
from hf_sta.errors import ConfigError
from hf_sta.methods.sta import DEFAULT_DENSITY
from hf_sta.recipe import parse_merge_config

SHAPE = (10, 10)


def _mse(model_fn, batch):
    return ((model_fn(batch[0]) - batch[1]) ** 2).mean()


def _linear_problem(targets: dict[str, torch.Tensor], vectors: dict[str, torch.Tensor], seed: int = 0):
    """A bias-free linear model at theta_0 = 0; each task's labels are ``X @ W_t^T`` for its target ``W_t``."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(40, SHAPE[1], generator=generator)
    merger = STAMerger.from_pretrained({"weight": torch.zeros(SHAPE)}, {t: {"weight": v} for t, v in vectors.items()})
    data = {t: DataLoader(TensorDataset(inputs, inputs @ w.T), batch_size=8) for t, w in targets.items()}
    return merger, inputs, data


def _oracle_mse(inputs: torch.Tensor, weight: torch.Tensor, targets: dict[str, torch.Tensor]) -> float:
    """``sum_t mean((X W^T - X W_t^T)^2)`` (equal batches: the mean of batch means is the overall mean)."""
    return sum(float(((inputs @ weight.T - inputs @ w.T) ** 2).mean()) for w in targets.values())


def test_scaling_auto_picks_the_grid_point_nearest_the_analytic_optimum(tmp_path):
    generator = torch.Generator().manual_seed(1)
    vectors = {"a": torch.randn(SHAPE, generator=generator), "b": torch.randn(SHAPE, generator=generator)}
    direction = vectors["a"] + vectors["b"]
    # J(lambda) = q ((lambda - 0.82)^2 + (lambda - 0.2)^2): a parabola with its minimum at 0.51, nearest grid point 0.5
    targets = {"a": 0.82 * direction, "b": 0.2 * direction}
    merger, inputs, data = _linear_problem(targets, vectors)
    loss = {"a": _mse, "b": _mse}
    model = torch.nn.Linear(SHAPE[1], SHAPE[0], bias=False)
    folder = merger.merge("task_arithmetic", scaling="auto", data=data, loss_fn=loss, model=model, output_dir=tmp_path)
    record = merger.last_record["auto"]
    expected = {s: _oracle_mse(inputs, s * direction, targets) for s in SCALING_GRID}
    assert [e["scaling"] for e in record["evaluations"]] == list(SCALING_GRID)
    for evaluation in record["evaluations"]:
        assert evaluation["objective"] == pytest.approx(expected[evaluation["scaling"]], rel=1e-5)
    assert min(expected, key=expected.get) == 0.5 == record["chosen"]["scaling"] == merger.last_config.scaling
    assert record["calibration_passes"] == len(SCALING_GRID) and record["objective"] == "loss_fn"
    assert record["examples"] == {"a": 40, "b": 40} and record["forward_batches"] == 6 * 2 * 5
    recipe = yaml.safe_load((folder / "hf_sta_config.yaml").read_text())
    assert recipe["merge"]["scaling"] == 0.5 and recipe["merge"]["auto"]["chosen"] == {"scaling": 0.5}
    assert "learned" not in recipe["merge"]
    # the written recipe parses again: the auto record is a result, the chosen scaling is the setting
    assert parse_merge_config(recipe["merge"]).scaling == 0.5
    card = (folder / "README.md").read_text()
    assert "## Settings chosen on calibration data" in card and "in 6 calibration pass(es)" in card
    for evaluation in record["evaluations"]:
        assert f"| {evaluation['scaling']:g} | {evaluation['objective']:.6g} |" in card
    merged = merger.merge("task_arithmetic", scaling="auto", data=data, loss_fn=loss, model=model)
    torch.testing.assert_close(merged["weight"], 0.5 * direction, atol=1e-6, rtol=0)


def test_density_auto_recovers_the_sparsity_of_the_target():
    """Two tasks on disjoint halves of the tensor; the target keeps each one's top 20 % by magnitude, which TIES at
    density 0.2 and scaling 1 reproduces exactly (one agreeing task per entry), so J(0.2) = 0."""
    generator = torch.Generator().manual_seed(2)
    half = torch.zeros(SHAPE, dtype=torch.bool)
    half[:5] = True
    vectors = {
        "a": torch.randn(SHAPE, generator=generator) * half,
        "b": torch.randn(SHAPE, generator=generator) * ~half,
    }

    def trimmed(density: float) -> torch.Tensor:  # oracle: torch.topk per task, summed (disjoint supports)
        total = torch.zeros(SHAPE)
        for vector in vectors.values():
            k = int(density * vector.numel())
            index = vector.abs().flatten().topk(k).indices
            total.view(-1)[index] += vector.flatten()[index]
        return total

    target = trimmed(0.2)
    merger, inputs, data = _linear_problem({"a": target, "b": target}, vectors)
    model = torch.nn.Linear(SHAPE[1], SHAPE[0], bias=False)
    merged = merger.merge("ties", density="auto", data=data, loss_fn={"a": _mse, "b": _mse}, model=model)
    record = merger.last_record["auto"]
    grid = DENSITY_GRIDS["ties"]
    assert [e["density"] for e in record["evaluations"]] == list(grid)
    for evaluation in record["evaluations"]:
        expected = _oracle_mse(inputs, trimmed(evaluation["density"]), {"a": target, "b": target})
        assert evaluation["objective"] == pytest.approx(expected, rel=1e-5, abs=1e-10)
    assert record["chosen"] == {"scaling": 1.0, "density": 0.2} and merger.last_config.params["density"] == 0.2
    torch.testing.assert_close(merged["weight"], target, atol=1e-6, rtol=0)


def test_sta_scaling_and_density_auto_costs_nine_passes_and_is_the_merge_it_scored():
    generator = torch.Generator().manual_seed(3)
    vectors = {t: torch.randn(SHAPE, generator=generator) for t in ("a", "b")}
    targets = {t: 0.6 * v for t, v in vectors.items()}
    merger, inputs, data = _linear_problem(targets, vectors)
    for task in merger.tasks:
        merger.compute_importance(task, metric="magnitude")
    model = torch.nn.Linear(SHAPE[1], SHAPE[0], bias=False)
    loss = {"a": _mse, "b": _mse}
    merger.merge("sta", scaling="auto", density="auto", data=data, loss_fn=loss, model=model)
    record = merger.last_record["auto"]
    assert record["calibration_passes"] == len(SCALING_GRID) + len(DENSITY_GRIDS["sta"]) - 1 == 9
    points = [(e["scaling"], e["density"]) for e in record["evaluations"]]
    assert len(set(points)) == 9 and points[: len(SCALING_GRID)] == [(s, DEFAULT_DENSITY) for s in SCALING_GRID]
    best = min(record["evaluations"], key=lambda e: e["objective"])
    assert record["chosen"] == {"scaling": best["scaling"], "density": best["density"]}
    # the scored point is the streamed merge at the chosen values (an independent call)
    merged = merger.merge("sta", scaling=best["scaling"], density=best["density"])
    assert _oracle_mse(inputs, merged["weight"], targets) == pytest.approx(best["objective"], rel=1e-5)


def test_entropy_objective_with_predict_fn():
    generator = torch.Generator().manual_seed(4)
    vectors = {"a": torch.randn(SHAPE, generator=generator)}
    merger, inputs, data = _linear_problem({"a": vectors["a"]}, vectors)
    predict = {"a": lambda model_fn, batch: model_fn(batch[0])}
    model = torch.nn.Linear(SHAPE[1], SHAPE[0], bias=False)
    merger.merge("task_arithmetic", scaling=[0.1, 0.5], data=data, predict_fn=predict, model=model)
    record = merger.last_record["auto"]
    assert record["objective"] == "entropy" and record["grid"]["scaling"] == [0.1, 0.5]
    for evaluation in record["evaluations"]:
        probs = torch.softmax(inputs @ (evaluation["scaling"] * vectors["a"]).T, dim=-1)
        entropy = float(-(probs * probs.log()).sum(-1).mean())
        assert evaluation["objective"] == pytest.approx(entropy, rel=1e-5)
    assert record["chosen"]["scaling"] == 0.5  # sharper predictions have lower entropy


def test_auto_on_transformers_models_scores_each_task_with_its_own_head(bert_checkpoints):
    from datasets import Dataset

    merger = STAMerger.from_pretrained(bert_checkpoints.base, bert_checkpoints.finetuned)
    data = {}
    for index, (task, labels) in enumerate(zip(merger.tasks, (2, 3, 4))):
        generator = torch.Generator().manual_seed(index)
        ids = torch.randint(1, 99, (8, 6), generator=generator)
        data[task] = Dataset.from_dict({
            "input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
            "label": torch.randint(0, labels, (8,), generator=generator).tolist(),
        })  # fmt: skip
    merger.merge("task_arithmetic", scaling=[0.3, 1.0], data=data)
    record = merger.last_record["auto"]
    assert record["objective"] == "cross_entropy" and record["calibration_passes"] == 2
    for evaluation in record["evaluations"]:
        state = merger.merge("task_arithmetic", scaling=evaluation["scaling"]).state_dict()
        total = 0.0
        for task in merger.tasks:  # oracle: each task's own fine-tuned model class and head, with the merged body
            model = AutoModelForSequenceClassification.from_pretrained(merger.sources[task]).eval()
            model.bert.load_state_dict(state)
            rows = data[task][:]
            with torch.no_grad():
                total += float(
                    model(
                        input_ids=torch.tensor(rows["input_ids"]),
                        attention_mask=torch.tensor(rows["attention_mask"]),
                        labels=torch.tensor(rows["label"]),
                    ).loss
                )
        assert evaluation["objective"] == pytest.approx(total, rel=1e-4)


def test_auto_says_what_is_missing():
    merger = STAMerger.from_pretrained({"weight": torch.zeros(SHAPE)}, {"a": {"weight": torch.ones(SHAPE)}})
    with pytest.raises(ConfigError, match=r"scaling='auto' chooses its value on calibration data.*task\(s\) a.*data="):
        merger.merge("task_arithmetic", scaling="auto")
    with pytest.raises(ConfigError, match=r"density='auto' chooses its value.*data="):
        merger.merge("ties", density="auto")
    with pytest.raises(ConfigError, match=r"density='auto' needs a method with a density; method='task_arithmetic'"):
        merger.merge("task_arithmetic", density="auto")
    with pytest.raises(ConfigError, match=r"density='auto' is not available for method='breadcrumbs'.*dare_linear"):
        merger.merge("breadcrumbs", density="auto")
    with pytest.raises(ConfigError, match=r"scaling as a list is a grid to search and needs numbers"):
        merger.merge("task_arithmetic", scaling=["big"])
