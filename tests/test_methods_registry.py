"""Tests for hf_sta.methods.registry: registration, lookup, parameter validation, kernel contract."""

from __future__ import annotations

import inspect

import pytest
import torch

import hf_sta.methods as methods
from hf_sta.methods import MergeMethod, Parameter, get_merge_method, list_merge_methods, register_merge_method
from hf_sta.methods import registry as registry_module

BASELINES = ["average", "breadcrumbs", "dare_linear", "dare_ties", "magnitude_prune", "task_arithmetic", "ties"]


@pytest.fixture
def scratch_registry(monkeypatch):
    """An isolated registry, so that test registrations do not leak."""
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))


def test_public_exports():
    assert set(methods.__all__) >= {
        "register_merge_method",
        "get_merge_method",
        "list_merge_methods",
        "MergeMethod",
        "Parameter",
    }


def test_baselines_registered_and_sorted():
    names = list_merge_methods()
    assert names == sorted(names)
    assert set(BASELINES) <= set(names)


def test_unknown_method_lists_available():
    with pytest.raises(ValueError) as error:
        get_merge_method("nope")
    message = str(error.value)
    assert message.startswith("Unknown merge method 'nope'. Available: adamerging, average, breadcrumbs, ")
    for name in BASELINES:
        assert name in message


@pytest.mark.parametrize("name", BASELINES)
def test_metadata_and_kernel_signature(name):
    method = get_merge_method(name)
    assert isinstance(method, MergeMethod)
    assert method.name == name and method.pretty_name and method.paper_title and method.description
    assert method.paper_url is None or method.paper_url.startswith("https://")
    assert "\n" not in method.description
    assert method.function.__doc__
    signature = inspect.signature(method.function)
    parameters = list(signature.parameters.values())
    assert [p.name for p in parameters[:2]] == ["task_tensors", "weights"]
    assert signature.parameters["generator"].kind is inspect.Parameter.KEYWORD_ONLY
    assert signature.parameters["generator"].default is None
    # Every registered parameter is a keyword of the kernel with the same default, and nothing else is.
    keyword_only = {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keyword_only.pop("generator") is None
    assert keyword_only == method.defaults
    assert "scaling" not in keyword_only and "seed" not in keyword_only


def test_paper_urls():
    assert get_merge_method("task_arithmetic").paper_url == "https://arxiv.org/abs/2212.04089"
    assert get_merge_method("ties").paper_url == "https://arxiv.org/abs/2306.01708"
    assert get_merge_method("dare_linear").paper_url == "https://arxiv.org/abs/2311.03099"
    assert get_merge_method("dare_ties").paper_url == "https://arxiv.org/abs/2311.03099"
    assert get_merge_method("breadcrumbs").paper_url == "https://arxiv.org/abs/2312.06795"


def test_stochastic_flag():
    stochastic = {name for name in BASELINES if get_merge_method(name).stochastic}
    assert stochastic == {"dare_linear", "dare_ties"}


def test_validate_params_fills_defaults():
    assert get_merge_method("ties").validate_params({}) == {
        "density": 0.2,
        "majority_sign_method": "total",
        "weighting": "peft",
    }
    assert get_merge_method("ties").validate_params(None) == {
        "density": 0.2,
        "majority_sign_method": "total",
        "weighting": "peft",
    }
    assert get_merge_method("dare_ties").validate_params({"density": "0.3"}) == {
        "density": 0.3,
        "majority_sign_method": "total",
        "rescale": True,
    }
    assert get_merge_method("breadcrumbs").validate_params({}) == {"density": 0.9, "gamma": 0.01}
    assert get_merge_method("average").validate_params({}) == {}


def test_validate_params_does_not_mutate_input():
    params = {"density": 1}
    out = get_merge_method("ties").validate_params(params)
    assert params == {"density": 1} and out["density"] == 1.0 and isinstance(out["density"], float)


def test_unknown_param_lists_valid_names():
    with pytest.raises(ValueError, match=r"Unknown parameter\(s\) 'dens'.*'ties'.*density, majority_sign_method"):
        get_merge_method("ties").validate_params({"dens": 0.5})
    with pytest.raises(ValueError, match=r"Valid parameters: \(none\)"):
        get_merge_method("task_arithmetic").validate_params({"density": 0.5})
    with pytest.raises(ValueError, match="scaling"):
        get_merge_method("average").validate_params({"scaling": 1.0})


@pytest.mark.parametrize("value", [0, 0.0, 1.5, -1, float("nan"), float("inf")])
def test_out_of_range_density(value):
    with pytest.raises(ValueError) as error:
        get_merge_method("ties").validate_params({"density": value})
    assert str(error.value) == f"density must be in (0, 1], got {float(value)!r}"


def test_density_message_example():
    with pytest.raises(ValueError, match=r"^density must be in \(0, 1\], got 1\.5$"):
        get_merge_method("magnitude_prune").validate_params({"density": 1.5})


def test_bad_choice_and_type():
    with pytest.raises(ValueError, match="majority_sign_method must be one of 'total', 'frequency', got 'sum'"):
        get_merge_method("ties").validate_params({"majority_sign_method": "sum"})
    with pytest.raises(ValueError, match="density must be a float, got 'abc'"):
        get_merge_method("ties").validate_params({"density": "abc"})
    with pytest.raises(ValueError, match="density must be a float, got True"):
        get_merge_method("ties").validate_params({"density": True})
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\), got 1.0"):
        get_merge_method("breadcrumbs").validate_params({"gamma": 1})


def test_parameter_coercion():
    flag = Parameter("rescale", bool, True, "doc")
    assert flag.validate("false") is False and flag.validate("True") is True and flag.validate(1) is True
    with pytest.raises(ValueError, match="rescale must be a bool"):
        flag.validate("maybe")
    count = Parameter("k", int, 1, "doc", low=1)
    assert count.validate("3") == 3 and count.validate(4.0) == 4
    with pytest.raises(ValueError, match="k must be an int"):
        count.validate(2.5)
    with pytest.raises(ValueError, match=r"k must be in \[1, inf\), got 0"):
        count.validate(0)
    name = Parameter("mode", str, "a", "doc", choices=("a", "b"))
    assert name.validate("b") == "b"
    with pytest.raises(ValueError, match="mode must be a string"):
        name.validate(3)
    unbounded_low = Parameter("x", float, 0.0, "doc", high=2.0, high_inclusive=False)
    assert unbounded_low.interval == "(-inf, 2)"
    with pytest.raises(ValueError, match=r"x must be in \(-inf, 2\), got 2.0"):
        unbounded_low.validate(2)


def test_parameter_rejects_bad_definition():
    with pytest.raises(ValueError, match="type"):
        Parameter("x", list, [], "doc")
    with pytest.raises(ValueError, match="density must be in"):
        Parameter("density", float, 2.0, "doc", low=0.0, high=1.0)


def test_register_and_duplicate(scratch_registry):
    @register_merge_method(
        "toy_sum",
        pretty_name="Toy",
        paper_title="None",
        paper_url=None,
        parameters=(Parameter("alpha", float, 1.0, "scale"),),
        description="Toy method.",
    )
    def toy_sum(task_tensors, weights, *, generator=None, alpha=1.0):
        return task_tensors.sum(0) * alpha

    method = get_merge_method("toy_sum")
    assert method.function is toy_sum and not method.requires_importance and not method.stochastic
    assert "toy_sum" in list_merge_methods()
    params = method.validate_params({"alpha": "2"})
    assert torch.equal(method.function(torch.ones(2, 3), torch.ones(2), **params), torch.full((3,), 4.0))
    with pytest.raises(ValueError, match="already registered"):
        register_merge_method("toy_sum", pretty_name="x", paper_title="x", paper_url=None, parameters=())(toy_sum)
    with pytest.raises(ValueError, match="already registered"):
        register_merge_method("ties", pretty_name="x", paper_title="x", paper_url=None, parameters=())(toy_sum)


def test_frozen_dataclasses():
    method = get_merge_method("ties")
    with pytest.raises(AttributeError):
        method.name = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        method.parameters[0].default = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("name", BASELINES)
def test_kernel_contract(name):
    """Every kernel: [T, *shape] x [T] -> [*shape], inputs unchanged, shape checks at the boundary."""
    method = get_merge_method(name)
    generator = torch.Generator().manual_seed(0)
    task_tensors = torch.randn(3, 4, 5, generator=generator)
    weights = torch.tensor([1.0, 0.5, 2.0])
    before = (task_tensors.clone(), weights.clone())
    params = method.validate_params({})
    out = method.function(task_tensors, weights, generator=torch.Generator().manual_seed(1), **params)
    assert out.shape == (4, 5) and out.dtype == torch.float32
    assert torch.equal(task_tensors, before[0]) and torch.equal(weights, before[1])
    assert out.data_ptr() != task_tensors.data_ptr()
    # A single task and a 0-dim parameter.
    single = method.function(torch.randn(1, 7), torch.ones(1), generator=torch.Generator().manual_seed(1), **params)
    assert single.shape == (7,)
    scalar = method.function(torch.randn(2), torch.ones(2), generator=torch.Generator().manual_seed(1), **params)
    assert scalar.shape == ()
    with pytest.raises(ValueError, match="weights must have shape"):
        method.function(task_tensors, torch.ones(2), **params)
    with pytest.raises(ValueError, match="task_tensors must"):
        method.function(torch.ones(3, 4, dtype=torch.int64), weights, **params)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name", BASELINES)
def test_kernels_keep_other_float_dtypes(name, dtype):
    method = get_merge_method(name)
    task_tensors = torch.randn(3, 10, 20, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = method.function(
        task_tensors, torch.ones(3), generator=torch.Generator().manual_seed(1), **method.validate_params({})
    )
    assert out.shape == (10, 20) and out.dtype == dtype and torch.isfinite(out).all()


def test_default_scaling_is_the_methods_own(scratch_registry, bert_checkpoints, tmp_path):
    """``scaling`` left out means the method's ``default_scaling`` in the config, the recipe and the merged weights
    (theta_0 + 2.5 * sum tau, checked against the checkpoints); a given scaling wins; other methods keep 1."""
    from hf_sta import MergeConfig, STAMerger
    from hf_sta.recipe import Recipe
    from tests.conftest import load_state_dict

    @register_merge_method("toy_scaled", pretty_name="Toy", paper_title="None", paper_url=None, default_scaling=2.5)
    def toy_scaled(task_tensors, weights, *, generator=None):
        return task_tensors.sum(0)

    assert (
        MergeConfig(method="toy_scaled").scaling == 2.5
        and MergeConfig(method="toy_scaled", scaling=0.5).scaling == 0.5
    )
    assert MergeConfig(method="ties").scaling == 1.0 and MergeConfig().scaling == 1.0
    merge = {"method": "toy_scaled"}
    recipe = {"base_model": str(bert_checkpoints.base), "models": {"news": str(bert_checkpoints.finetuned["news"])}}
    assert Recipe.from_dict({**recipe, "merge": merge}).merge.scaling == 2.5
    assert Recipe.from_dict({**recipe, "merge": {**merge, "scaling": 1.5}}).merge.scaling == 1.5
    merger = STAMerger.from_pretrained(bert_checkpoints.base, bert_checkpoints.finetuned)
    merged = load_state_dict(merger.merge("toy_scaled", output_dir=tmp_path / "out"))
    base = load_state_dict(bert_checkpoints.base)
    tunes = [load_state_dict(folder) for folder in bert_checkpoints.finetuned.values()]
    key = next(k for k in merged if k.endswith("query.weight"))
    expected = base[key] + 2.5 * sum(tune[f"bert.{key}"] - base[key] for tune in tunes)
    torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6)
