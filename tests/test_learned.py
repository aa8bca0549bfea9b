"""hf_sta.learned: merged parameters via functional_call, AdaMerging, DV-BASI (tiny MLP tasks and a tiny BERT)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hf_sta.learned import (
    bind_parameters,
    call_with_parameters,
    count_learnable,
    cross_entropy,
    dv_basi,
    dv_basi_finetune,
    layer_of,
    learn_coefficients,
    merged_parameters,
    parameter_groups,
    prediction_entropy,
)

BODY = ("0.weight", "0.bias")
HEAD = ("2.weight", "2.bias")
TASKS = ("alpha", "beta")


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.fixture(scope="module")
def setting():
    """A base MLP and two tasks fine-tuned from it: task vectors over the body, one head per task, labelled data."""
    torch.manual_seed(0)
    model = mlp()
    base = {name: p.detach().clone() for name, p in model.named_parameters() if name in BODY}
    taus, heads, data = {}, {}, {}
    for index, task in enumerate(TASKS):
        generator = torch.Generator().manual_seed(10 + index)
        x = torch.randn(64, 8, generator=generator)
        y = (x @ torch.randn(8, 3, generator=generator)).argmax(-1)
        tuned = copy.deepcopy(model)
        optimizer = torch.optim.Adam(tuned.parameters(), lr=1e-2)
        for _ in range(80):
            optimizer.zero_grad()
            nn.functional.cross_entropy(tuned(x), y).backward()
            optimizer.step()
        params = {name: p.detach().clone() for name, p in tuned.named_parameters()}
        taus[task] = {name: params[name] - base[name] for name in BODY}
        heads[task] = {name: params[name] for name in HEAD}
        data[task] = (x, y)
    return {"model": model, "base": base, "taus": taus, "heads": heads, "data": data}


def fresh(setting) -> nn.Module:
    """A copy of the base model for a learner (which moves its model to the accelerator's device)."""
    return copy.deepcopy(setting["model"])


def task_arithmetic(base, taus, scaling):
    """``(theta_0 + s tau_alpha) + s tau_beta``, summed in task order."""
    return {name: base[name] + scaling * taus["alpha"][name] + scaling * taus["beta"][name] for name in base}


def total_loss(setting, body, objective):
    """``sum_t objective`` of a model with weights ``body`` + head ``t`` loaded normally (no functional_call)."""
    total = 0.0
    for task in TASKS:
        model = copy.deepcopy(setting["model"])
        model.load_state_dict({**body, **setting["heads"][task]})
        x, y = setting["data"][task]
        with torch.no_grad():
            logits = model(x)
        total += float(prediction_entropy(logits) if objective == "entropy" else cross_entropy(logits, y))
    return total


# (1) merged parameters and functional_call -----------------------------------------------------------------------


def test_merged_parameters_equal_hand_task_arithmetic(setting):
    base, taus = setting["base"], setting["taus"]
    lam = torch.tensor([0.3, 0.55])
    stacked = {name: torch.stack([taus[t][name] for t in TASKS]) for name in BODY}
    merged = merged_parameters(base, stacked, {"all": lam}, parameter_groups(BODY, "task"))
    for name in BODY:
        by_hand = base[name] + lam[0] * taus["alpha"][name] + lam[1] * taus["beta"][name]
        assert torch.equal(merged[name], by_hand)
    # a list of D tensors is the same as a [D, *shape] stack; per-tensor coefficients act per tensor
    per_tensor = {"0.weight": torch.tensor([0.1, 0.9]), "0.bias": torch.tensor([-0.4, 0.2])}
    listed = {name: [taus[t][name] for t in TASKS] for name in BODY}
    merged = merged_parameters(base, listed, per_tensor, parameter_groups(BODY, "tensor"))
    for name in BODY:
        c = per_tensor[name]
        assert torch.equal(merged[name], base[name] + c[0] * taus["alpha"][name] + c[1] * taus["beta"][name])
    assert merged["0.weight"].shape == (16, 8)


def test_merged_parameters_are_differentiable_and_checked(setting):
    base, taus = setting["base"], setting["taus"]
    lam = torch.tensor([0.3, 0.5], requires_grad=True)
    stacked = {name: [taus[t][name] for t in TASKS] for name in BODY}
    merged = merged_parameters(base, stacked, {"all": lam}, parameter_groups(BODY, "task"))
    sum(t.sum() for t in merged.values()).backward()
    expected = torch.tensor([sum(float(taus[t][n].sum()) for n in BODY) for t in TASKS])
    torch.testing.assert_close(lam.grad, expected)
    with pytest.raises(ValueError, match="0.weight"):
        merged_parameters(base, stacked, {"all": torch.zeros(3)}, parameter_groups(BODY, "task"))


def test_functional_call_matches_loaded_model(setting):
    base, taus, heads = setting["base"], setting["taus"], setting["heads"]
    x = setting["data"]["beta"][0][:5]
    merged = task_arithmetic(base, taus, 0.3)
    params = {**merged, **heads["beta"]}
    loaded = copy.deepcopy(setting["model"])
    loaded.load_state_dict(params)
    with torch.no_grad():
        assert torch.equal(call_with_parameters(setting["model"], params, (x, None)), loaded(x))
        assert torch.equal(bind_parameters(setting["model"], params)(x), loaded(x))
    # the module itself is untouched
    assert torch.equal(setting["model"][0].weight, base["0.weight"])


def test_functional_call_swaps_a_head_of_another_shape():
    from transformers import BertForSequenceClassification

    from tests.conftest import tiny_bert_config

    torch.manual_seed(0)
    three = BertForSequenceClassification(tiny_bert_config(num_labels=3)).eval()
    two = BertForSequenceClassification(tiny_bert_config(num_labels=2)).eval()
    two.bert.load_state_dict(three.bert.state_dict())
    head = {"classifier.weight": two.classifier.weight.detach(), "classifier.bias": two.classifier.bias.detach()}
    batch = {"input_ids": torch.randint(0, 99, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    with torch.no_grad():
        out = call_with_parameters(three, head, batch).logits
        assert out.shape == (2, 2)
        torch.testing.assert_close(out, two(**batch).logits, rtol=0, atol=0)


# (2) objectives decrease -----------------------------------------------------------------------------------------


def test_adamerging_entropy_decreases_from_the_task_arithmetic_start(setting):
    data = {task: [(setting["data"][task][0],)] for task in TASKS}  # unlabelled
    result = learn_coefficients(
        fresh(setting), setting["base"], setting["taus"], data, task_parameters=setting["heads"],
        granularity="tensor", steps=40, lr=2e-2, progress=False,
    )  # fmt: skip
    start = total_loss(setting, task_arithmetic(setting["base"], setting["taus"], 0.3), "entropy")
    assert result.history[0] == pytest.approx(start, rel=1e-5)  # step 0 evaluates theta_0 + 0.3 sum tau
    assert result.history[-1] < result.history[0] - 1e-3
    learned = total_loss(setting, result.merged_parameters(setting["base"], setting["taus"]), "entropy")
    assert learned < start
    values = [v for row in result.coefficients.values() for v in row]
    assert all(0.0 <= v <= 1.0 for v in values) and any(abs(v - 0.3) > 1e-2 for v in values)
    assert result.direction_names == list(TASKS)
    assert result.examples_used == {"alpha": 64, "beta": 64}
    assert len(result.history) == 40 and set(result.task_history) == set(TASKS)


def test_clamp_keeps_coefficients_in_range(setting):
    # entropy keeps falling as the body is scaled up, so a large step drives the coefficients past 1 unless clamped
    data = {task: [(setting["data"][task][0],)] for task in TASKS}

    def run(clamp):
        return learn_coefficients(
            fresh(setting), setting["base"], setting["taus"], data, task_parameters=setting["heads"], steps=30,
            lr=0.2, clamp=clamp, progress=False,
        )  # fmt: skip

    clamped, free = run((0.0, 1.0)), run(None)
    values = [v for row in clamped.coefficients.values() for v in row]
    assert values == [1.0] * 4  # saturated at the bound ...
    # ... and the loop itself ran with the clamped coefficients: its last objective is that of the reported merge
    merged = clamped.merged_parameters(setting["base"], setting["taus"])
    assert clamped.history[-1] == pytest.approx(total_loss(setting, merged, "entropy"), rel=1e-5)
    assert max(v for row in free.coefficients.values() for v in row) > 1.0


def test_cross_entropy_objective_decreases(setting):
    data = {task: [setting["data"][task]] for task in TASKS}
    result = learn_coefficients(
        fresh(setting), setting["base"], setting["taus"], data, loss_fn="cross_entropy",
        task_parameters=setting["heads"], granularity="task", steps=30, lr=2e-2, clamp=None, progress=False,
    )  # fmt: skip
    assert result.history[-1] < result.history[0] - 1e-3
    assert set(result.coefficients) == {"all"} and result.num_learnable == 2


# (3) seeds ---------------------------------------------------------------------------------------------------------


def test_same_seed_same_coefficients_other_seed_other_shuffle(setting):
    def run(seed):
        data = {
            task: DataLoader(TensorDataset(setting["data"][task][0]), batch_size=8, shuffle=True) for task in TASKS
        }
        return learn_coefficients(
            fresh(setting), setting["base"], setting["taus"], data, task_parameters=setting["heads"],
            steps=12, lr=2e-2, seed=seed, progress=False,
        ).coefficients  # fmt: skip

    state = torch.get_rng_state()
    first, again, other = run(0), run(0), run(1)
    assert first == again
    assert first != other  # the seed drives the DataLoader's shuffling
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is restored


# (4) DV-BASI -------------------------------------------------------------------------------------------------------


def test_dv_basi_round_zero_with_zero_coefficients_is_the_initial_merge(setting):
    data = {task: [setting["data"][task]] for task in TASKS}
    result = dv_basi(
        fresh(setting), setting["base"], setting["taus"], data, task_parameters=setting["heads"], rounds=2,
        steps=0, progress=False,
    )  # fmt: skip
    initial = task_arithmetic(setting["base"], setting["taus"], 0.3)
    assert len(result.rounds) == 1 and not result.rounds[0].improved and result.best == 0
    assert result.rounds[0].directions == ["tau:alpha", "tau:beta", "d0"]
    for name in BODY:
        assert torch.equal(result.parameters[name], initial[name])
        assert result.coefficients[name] == [1.0, 0.0, 0.0]
    assert result.validation[0] == pytest.approx(total_loss(setting, initial, "cross_entropy"), rel=1e-5)


def test_dv_basi_supervised_beats_task_arithmetic_and_its_algebra_is_exact(setting):
    data = {task: [setting["data"][task]] for task in TASKS}
    result = dv_basi(
        fresh(setting), setting["base"], setting["taus"], data, task_parameters=setting["heads"], rounds=3,
        steps=25, lr=2e-2, min_improvement=-math.inf, progress=False,
    )  # fmt: skip
    assert [r.directions for r in result.rounds] == [
        ["tau:alpha", "tau:beta", "d0"],
        ["tau:alpha", "tau:beta", "d0", "d1"],
        ["tau:alpha", "tau:beta", "d0", "d1", "d2"],
    ]
    assert result.num_learnable_per_round == [3 * 2, 4 * 2, 5 * 2] and result.num_learnable == 24
    assert result.best == 3  # the last round's point: the difference vectors d1, d2 are part of the algebra
    rebuilt = result.reconstruct(setting["base"], setting["taus"])
    for name in BODY:
        torch.testing.assert_close(rebuilt[name], result.parameters[name], rtol=1e-5, atol=1e-6)
    folded = result.task_coefficients(fold_initial=True)
    for name in BODY:
        by_tasks = setting["base"][name] + sum(folded[name][t] * setting["taus"][t][name] for t in TASKS)
        torch.testing.assert_close(by_tasks, result.parameters[name], rtol=1e-5, atol=1e-6)
    task_arithmetic_ce = total_loss(setting, task_arithmetic(setting["base"], setting["taus"], 0.3), "cross_entropy")
    reached_ce = total_loss(setting, result.parameters, "cross_entropy")
    assert reached_ce < task_arithmetic_ce - 0.05
    assert result.validation[-1] == pytest.approx(reached_ce, rel=1e-5)
    assert result.validation == sorted(result.validation, reverse=True)


def test_dv_basi_from_a_given_merge_cumulative_official_search_space(setting):
    data = {task: [setting["data"][task]] for task in TASKS}
    initial = {name: setting["base"][name] + 0.6 * setting["taus"]["alpha"][name] for name in BODY}
    result = dv_basi(
        fresh(setting), setting["base"], setting["taus"], data, initial=initial, task_parameters=setting["heads"],
        rounds=2, steps=15, lr=2e-2, include_task_vectors=False, difference_vectors="cumulative",
        difference_init=0.1, min_improvement=-math.inf, granularity="layer", progress=False,
    )  # fmt: skip
    assert [r.directions for r in result.rounds] == [["theta0-theta_0"], ["theta1-theta_0"]]
    assert result.num_learnable == 2 and result.init_scaling is None
    with pytest.raises(ValueError, match="initial"):
        result.reconstruct(setting["base"], setting["taus"])
    rebuilt = result.reconstruct(setting["base"], setting["taus"], initial)
    for name in BODY:
        torch.testing.assert_close(rebuilt[name], result.parameters[name], rtol=1e-5, atol=1e-6)
        assert result.coefficients[name][1:] == [0.0, 0.0]  # only delta_0 = 0.6 tau_alpha was searched


def test_dv_basi_finetune_one_model(setting):
    x, y = setting["data"]["alpha"]
    result = dv_basi_finetune(
        fresh(setting), setting["base"], setting["taus"]["alpha"], [(x, y)], task="alpha",
        head=setting["heads"]["alpha"], rounds=2, steps=20, lr=2e-2, min_improvement=-math.inf, progress=False,
    )  # fmt: skip
    assert [r.directions for r in result.rounds] == [["tau:alpha"], ["tau:alpha", "d1"]]
    assert result.num_learnable_per_round == [2, 4]
    folded = result.task_coefficients(fold_initial=True)
    for name in BODY:
        rebuilt = setting["base"][name] + folded[name]["alpha"] * setting["taus"]["alpha"][name]
        torch.testing.assert_close(rebuilt, result.parameters[name], rtol=1e-5, atol=1e-6)
    assert result.validation[result.best] <= result.validation[0]


# (5) granularity and learnable counts ------------------------------------------------------------------------------


def test_layer_groups_and_learnable_counts():
    from transformers import BertModel

    from tests.conftest import tiny_bert_config

    torch.manual_seed(0)
    model = BertModel(tiny_bert_config())
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    taus = {task: {name: torch.zeros_like(t) for name, t in base.items()} for task in ("x", "y", "z")}
    assert layer_of("encoder.layer.1.attention.self.query.weight") == "encoder.layer.1"
    assert layer_of("bert.encoder.layer.3.output.dense.bias") == "bert.encoder.layer.3"
    assert layer_of("embeddings.word_embeddings.weight") == "embeddings"
    assert layer_of("pooler.dense.weight") == "other"
    assert layer_of("0.weight") == "0"
    layer_groups = set(parameter_groups(base, "layer").values())
    assert layer_groups == {"embeddings", "encoder.layer.0", "encoder.layer.1", "other"}
    expected = {"task": 3, "layer": 3 * 4, "tensor": 3 * len(base)}
    for granularity, count in expected.items():
        assert count_learnable(parameter_groups(base, granularity), 3) == count
        learned = learn_coefficients(
            model, base, taus, {t: [] for t in taus}, granularity=granularity, steps=0, progress=False
        )
        assert learned.num_learnable == count
        assert all(values == pytest.approx([0.3] * 3) for values in learned.coefficients.values())
    with pytest.raises(ValueError, match="granularity"):
        parameter_groups(base, "block")
