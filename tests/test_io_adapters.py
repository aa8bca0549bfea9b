"""PEFT LoRA adapters as task vectors, and dense deltas written back as LoRA adapters; PEFT itself is the oracle."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_sta.errors import CheckpointError
from hf_sta.io.adapters import (
    factorize_delta,
    lora_delta_weight,
    lora_layouts,
    select_rank,
    write_lora_adapter,
)
from hf_sta.io.checkpoints import CheckpointReader, StateDictSource
from hf_sta.lora_task_vector import LoraTaskVector
from tests.conftest import load_state_dict, tiny_llama_config

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _quiet_peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about fan_in_fan_out, saved embeddings, ...
        yield


# -- tiny models ---------------------------------------------------------------------------------------------------


def _llama(folder: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder)


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory) -> Path:
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("lora_llama") / "base"
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(folder)
    return folder


def _gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory) -> Path:
    from transformers import GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("lora_gpt2") / "base"
    torch.manual_seed(1)
    GPT2LMHeadModel(_gpt2_config()).save_pretrained(folder)
    return folder


class TinyConvNet(nn.Module):
    """Conv2d 3x3, Conv2d 1x1, Conv1d and Linear layers: the module kinds PEFT's LoRA handles besides transformers'."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.point = nn.Conv2d(8, 6, 1)
        self.conv1d = nn.Conv1d(6, 5, 3)
        self.head = nn.Linear(5, 4)


def _conv_net() -> TinyConvNet:
    torch.manual_seed(2)
    return TinyConvNet()


def _randomise_trainable_(model: nn.Module, seed: int) -> None:
    """PEFT starts LoRA at B = 0 (a no-op); make every trainable adapter tensor non-trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def _make_adapter(model: nn.Module, config: LoraConfig, folder: Path, seed: int, **save_kwargs):
    peft_model = get_peft_model(model, config)
    _randomise_trainable_(peft_model, seed)
    peft_model.save_pretrained(folder, **save_kwargs)
    return peft_model


def _lora_layers(peft_model, adapter: str = "default") -> dict[str, LoraLayer]:
    """Base tensor name (``<module>.weight``) -> the PEFT LoRA layer holding ``adapter``."""
    layers = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.scaling:
            layers[name.removeprefix("base_model.model.") + ".weight"] = module
    return layers


def _check_against_peft(vector: LoraTaskVector, peft_model, base_state: dict[str, torch.Tensor]) -> None:
    """Oracles: ``get_delta_weight`` per LoRA layer, and ``merge_and_unload() - base`` for every tensor."""
    layers = _lora_layers(peft_model)
    assert layers and set(layers) <= set(vector.keys())
    for key, layer in layers.items():
        torch.testing.assert_close(vector[key], layer.get_delta_weight("default").float(), rtol=1e-5, atol=1e-6)
    merged = peft_model.merge_and_unload().state_dict()
    for key, theta_0 in base_state.items():
        expected = merged[key].float() - theta_0.float()
        actual = vector[key] if key in vector else torch.zeros_like(expected)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=f"tensor {key}")


# -- reading: oracle PEFT ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="plain"),
        pytest.param({"use_rslora": True, "lora_alpha": 5}, id="rslora"),
        pytest.param(
            {"rank_pattern": {"layers.1.self_attn.q_proj": 2, "down_proj": 3}, "alpha_pattern": {"k_proj": 11}},
            id="rank_alpha_pattern",
        ),
        pytest.param(
            {"target_modules": ["q_proj", "v_proj", "embed_tokens"], "modules_to_save": ["lm_head"]},
            id="embedding_modules_to_save",
        ),
    ],
)
def test_llama_adapter_matches_peft(llama_base, tmp_path, options):
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": LLAMA_TARGETS, **options})
    peft_model = _make_adapter(_llama(llama_base), config, tmp_path / "adapter", seed=3)
    vector = LoraTaskVector.from_pretrained(tmp_path / "adapter", CheckpointReader(llama_base), name="task")

    assert vector.name == "task"
    assert vector.adapter_config["peft_type"] == "LORA"
    base_keys = CheckpointReader(llama_base).keys()
    assert vector.keys() == [k for k in base_keys if k in vector]  # base order
    if "modules_to_save" in options:
        assert "lm_head.weight" in vector and vector.layouts["model.embed_tokens.weight"] == "embedding"
    if "rank_pattern" in options:
        assert vector.ranks["model.layers.1.self_attn.q_proj.weight"] == 2
        assert vector.ranks["model.layers.0.mlp.down_proj.weight"] == 3
    _check_against_peft(vector, peft_model, load_state_dict(llama_base))


def test_gpt2_conv1d_fan_in_fan_out_matches_peft(gpt2_base, tmp_path):
    from transformers import GPT2LMHeadModel

    config = LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    peft_model = _make_adapter(GPT2LMHeadModel.from_pretrained(gpt2_base), config, tmp_path / "adapter", seed=4)
    vector = LoraTaskVector.from_pretrained(tmp_path / "adapter", CheckpointReader(gpt2_base))

    assert vector.layouts["transformer.h.0.attn.c_attn.weight"] == "linear_transposed"  # (16, 48): by shape
    assert vector.layouts["transformer.h.0.attn.c_proj.weight"] == "linear_transposed"  # (16, 16): by config
    _check_against_peft(vector, peft_model, load_state_dict(gpt2_base))


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"target_modules": ["conv", "point", "conv1d", "head"]}, id="conv_kxk_1x1_conv1d"),
        pytest.param({"target_modules": ["conv", "head"], "lora_bias": True, "use_rslora": True}, id="lora_bias"),
        pytest.param(
            {"target_modules": ["conv", "head"], "bias": "lora_only", "modules_to_save": ["conv1d"]},
            id="trained_bias_modules_to_save",
        ),
    ],
)
def test_conv_adapter_matches_peft(tmp_path, options):
    model = _conv_net()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = _make_adapter(model, LoraConfig(r=2, lora_alpha=3, **options), tmp_path / "adapter", seed=5)
    vector = LoraTaskVector.from_pretrained(tmp_path / "adapter", StateDictSource(base_state))

    assert vector.layouts["conv.weight"] == "conv"
    if options.get("lora_bias"):
        assert "head.bias" in vector and "conv.bias" in vector
    _check_against_peft(vector, peft_model, base_state)


def test_pickled_adapter_equals_safetensors(llama_base, tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft_model = _make_adapter(_llama(llama_base), config, tmp_path / "safe", seed=6)
    peft_model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert (tmp_path / "pickled" / "adapter_model.bin").is_file()
    base = CheckpointReader(llama_base)
    safe = LoraTaskVector.from_pretrained(tmp_path / "safe", base)
    pickled = LoraTaskVector.from_pretrained(tmp_path / "pickled", base)
    assert safe.keys() == pickled.keys()
    for key in safe.keys():
        torch.testing.assert_close(safe[key], pickled[key], rtol=0, atol=0)
    assert safe.model_hash == LoraTaskVector.from_pretrained(tmp_path / "safe", base).model_hash
    assert safe.model_hash != pickled.model_hash


def test_adapter_from_hub_repo(llama_base, tmp_path, local_hub):
    from huggingface_hub import HfApi

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    _make_adapter(_llama(llama_base), config, tmp_path / "adapter", seed=16)
    api = HfApi()
    api.create_repo("local-user/tiny-lora")
    api.upload_folder(repo_id="local-user/tiny-lora", folder_path=tmp_path / "adapter", path_in_repo="task_a")
    base = CheckpointReader(llama_base)
    local = LoraTaskVector.from_pretrained(tmp_path / "adapter", base)
    remote = LoraTaskVector.from_pretrained("local-user/tiny-lora", base, subfolder="task_a", name="a")
    assert remote.name == "a" and remote.keys() == local.keys() and remote.model_hash == local.model_hash
    for key in local.keys():
        torch.testing.assert_close(remote[key], local[key], rtol=0, atol=0)


def test_task_arithmetic_matches_peft_cat(llama_base, tmp_path):
    _make_adapter(
        _llama(llama_base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), tmp_path / "a", 7
    )
    config_b = LoraConfig(r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj"])
    _make_adapter(_llama(llama_base), config_b, tmp_path / "b", 8)
    base = CheckpointReader(llama_base)
    weights = (0.7, -1.3)
    combined = weights[0] * LoraTaskVector.from_pretrained(tmp_path / "a", base) + weights[
        1
    ] * LoraTaskVector.from_pretrained(tmp_path / "b", base)

    peft_model = PeftModel.from_pretrained(_llama(llama_base), tmp_path / "a", adapter_name="a")
    peft_model.load_adapter(tmp_path / "b", adapter_name="b")
    peft_model.add_weighted_adapter(["a", "b"], list(weights), "merged", combination_type="cat")
    layers = _lora_layers(peft_model, "merged")
    assert set(layers) == set(combined.keys())
    for key, layer in layers.items():
        torch.testing.assert_close(combined[key], layer.get_delta_weight("merged"), rtol=1e-5, atol=1e-6)


# -- reading: errors -----------------------------------------------------------------------------------------------


def test_dora_adapter_is_refused(llama_base, tmp_path):
    config = LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    _make_adapter(_llama(llama_base), config, tmp_path / "dora", seed=9)
    with pytest.raises(CheckpointError, match="uses DoRA, which hf_sta does not support yet"):
        LoraTaskVector.from_pretrained(tmp_path / "dora", CheckpointReader(llama_base))


def test_ia3_adapter_is_refused(llama_base, tmp_path):
    from peft import IA3Config

    config = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    _make_adapter(_llama(llama_base), config, tmp_path / "ia3", seed=10)
    with pytest.raises(CheckpointError, match="is a IA3 adapter"):
        LoraTaskVector.from_pretrained(tmp_path / "ia3", CheckpointReader(llama_base))


@pytest.fixture
def q_proj_adapter(llama_base, tmp_path) -> Path:
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    _make_adapter(_llama(llama_base), config, tmp_path / "adapter", seed=11)
    return tmp_path / "adapter"


def test_adapter_for_missing_or_reshaped_module_is_refused(llama_base, q_proj_adapter):
    state = load_state_dict(llama_base)
    key = "model.layers.0.self_attn.q_proj.weight"
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(CheckpointError, match=rf"adapter_model\.safetensors.*has no tensor '{re.escape(key)}'"):
        LoraTaskVector.from_pretrained(q_proj_adapter, StateDictSource(missing))
    reshaped = {**state, key: torch.zeros(32, 16)}
    with pytest.raises(CheckpointError, match=r"delta of shape \[32, 32\].*\[32, 16\]"):
        LoraTaskVector.from_pretrained(q_proj_adapter, StateDictSource(reshaped))


def test_base_modifying_initialisation_is_refused(llama_base, q_proj_adapter):
    config_path = q_proj_adapter / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "init_lora_weights": "pissa"}))
    with pytest.raises(CheckpointError, match="modifies the base weights"):
        LoraTaskVector.from_pretrained(q_proj_adapter, CheckpointReader(llama_base))


class _NotATensor:
    pass


@pytest.mark.parametrize(
    ("extra", "message"),
    [("a string", "flat state dict of tensors"), (_NotATensor(), r"weights_only=True")],
    ids=["str", "object"],
)
def test_pickled_adapter_with_non_tensor_objects_is_refused(llama_base, q_proj_adapter, tmp_path, extra, message):
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(q_proj_adapter / "adapter_config.json", folder)
    state = load_file(q_proj_adapter / "adapter_model.safetensors")
    torch.save({**state, "step": extra}, folder / "adapter_model.bin")
    with pytest.raises(CheckpointError, match=message):
        LoraTaskVector.from_pretrained(folder, CheckpointReader(llama_base))


def test_modules_to_save_absent_from_base_are_heads(tmp_path):
    model = _conv_net()
    base_state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("conv1d.")}
    config = LoraConfig(r=2, target_modules=["conv", "head"], modules_to_save=["conv1d"])
    _make_adapter(model, config, tmp_path / "adapter", seed=14)
    vector = LoraTaskVector.from_pretrained(tmp_path / "adapter", StateDictSource(base_state))
    assert sorted(vector.keys()) == ["conv.weight", "head.weight"]
    assert sorted(vector.heads()) == ["conv1d.bias", "conv1d.weight"]


def test_base_saved_without_its_head_prefix(llama_base, tmp_path):
    """An adapter trained on LlamaForCausalLM (``model.layers...``) read against a bare LlamaModel (``layers...``)."""
    from transformers import LlamaModel

    LlamaModel.from_pretrained(llama_base).save_pretrained(tmp_path / "bare")
    config = LoraConfig(r=2, target_modules=["q_proj"])
    _make_adapter(_llama(llama_base), config, tmp_path / "adapter", seed=15)
    full = LoraTaskVector.from_pretrained(tmp_path / "adapter", CheckpointReader(llama_base))
    bare = LoraTaskVector.from_pretrained(tmp_path / "adapter", CheckpointReader(tmp_path / "bare"))
    assert bare.keys() == [key.removeprefix("model.") for key in full.keys()]
    for key in full.keys():
        torch.testing.assert_close(bare[key.removeprefix("model.")], full[key], rtol=0, atol=0)


def test_not_an_adapter_folder(llama_base, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        LoraTaskVector.from_pretrained(tmp_path / "empty", CheckpointReader(llama_base))


# -- writing: SVD factorisation ------------------------------------------------------------------------------------


def _best_rank_approximation(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """Eckart-Young oracle, computed independently of hf_sta's factor layout."""
    matrix = delta.reshape(delta.shape[0], -1).double()
    left, singular, right_h = torch.linalg.svd(matrix, full_matrices=False)
    approx = (left[:, :rank] * singular[:rank]) @ right_h[:rank]
    return approx.reshape(delta.shape).float()


def _matrix_with_spectrum(rows: int, cols: int, singular_values: list[float], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(rows, len(singular_values), generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(cols, len(singular_values), generator=generator, dtype=torch.float64))
    return (left * torch.tensor(singular_values, dtype=torch.float64)) @ right.T


def _delta_with_gaps(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A full-rank delta whose singular values ``2^-i`` are well separated, so its best rank-r approximation is well
    conditioned (nearly equal s_r, s_{r+1} make the rank-r subspace, hence any fp32 SVD, ill-determined)."""
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
    spectrum = [2.0**-i for i in range(min(rows, cols))]
    return _matrix_with_spectrum(rows, cols, spectrum, seed).float().reshape(shape)


def test_select_rank_by_energy_on_known_spectrum():
    singular = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5])  # s^2: 16, 9, 4, 1, 0.25; total 30.25
    assert select_rank(singular, energy=0.5) == 1  # 16 / 30.25 = 0.53
    assert select_rank(singular, energy=0.8) == 2  # 25 / 30.25 = 0.83
    assert select_rank(singular, energy=0.9) == 3  # 29 / 30.25 = 0.96
    assert select_rank(singular, energy=0.99) == 4  # 30 / 30.25 = 0.992
    assert select_rank(singular, energy=1.0) == 5
    assert select_rank(singular, energy=0.99, max_rank=2) == 2
    assert select_rank(singular, max_rank=9) == 5
    assert select_rank(torch.zeros(4), energy=0.9) == 1
    with pytest.raises(ValueError, match="max_rank, energy"):
        select_rank(singular)

    delta = _matrix_with_spectrum(24, 20, [4.0, 3.0, 2.0, 1.0, 0.5], seed=0).float()
    lora_A, lora_B, _ = factorize_delta(delta, energy=0.9)
    assert lora_A.shape == (3, 20) and lora_B.shape == (24, 3)
    torch.testing.assert_close(lora_B @ lora_A, _best_rank_approximation(delta, 3), rtol=1e-5, atol=1e-5)


def test_exact_reconstruction_at_or_above_true_rank(tmp_path):
    delta = _matrix_with_spectrum(20, 12, [3.0, 2.0, 1.0], seed=1).float()
    report = write_lora_adapter(tmp_path / "a", [("lin.weight", delta)], base_model_name_or_path=None, max_rank=6)
    assert report.modules["lin.weight"].rank == 6 and report.max_relative_error < 1e-5
    report = write_lora_adapter(tmp_path / "b", [("lin.weight", delta)], base_model_name_or_path=None, energy=1 - 1e-6)
    assert report.modules["lin.weight"].rank == 3 and report.max_relative_error < 1e-5


def test_write_in_low_precision_reports_the_rounding_error(tmp_path):
    from safetensors.torch import load_file

    delta = _matrix_with_spectrum(20, 12, [3.0, 2.0, 1.0], seed=1).float()
    report = write_lora_adapter(
        tmp_path, [("lin.weight", delta)], base_model_name_or_path=None, max_rank=3, torch_dtype=torch.bfloat16
    )
    factors = load_file(tmp_path / "adapter_model.safetensors")
    assert {t.dtype for t in factors.values()} == {torch.bfloat16}
    lora_A, lora_B = factors["base_model.model.lin.lora_A.weight"], factors["base_model.model.lin.lora_B.weight"]
    error = float((delta - lora_B.float() @ lora_A.float()).norm() / delta.norm())
    assert report.modules["lin.weight"].relative_error == pytest.approx(error)
    assert 1e-4 < error < 1e-2


def _reloaded_deltas(model: nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    peft_model = PeftModel.from_pretrained(model, folder)
    return {key: layer.get_delta_weight("default").float() for key, layer in _lora_layers(peft_model).items()}


def test_write_llama_adapter_reloads_in_peft_as_best_rank_r(llama_base, tmp_path):
    """Per-module ranks from an energy threshold (so rank_pattern is exercised); embedding LoRA included."""
    spectra = {
        "model.embed_tokens.weight": ((96, 32), [5.0, 4.0, 0.1, 0.1]),
        "model.layers.0.self_attn.q_proj.weight": ((32, 32), [3.0, 0.1, 0.1]),
        "model.layers.0.self_attn.k_proj.weight": ((16, 32), [2.0, 2.0, 2.0, 0.1]),
        "model.layers.1.mlp.down_proj.weight": ((32, 64), [1.0, 1.0, 1.0, 1.0, 1.0, 0.1]),
        "model.layers.1.self_attn.v_proj.weight": ((16, 32), [2.0, 2.0, 2.0, 0.1]),
    }
    deltas = {
        key: _matrix_with_spectrum(*shape, spectrum, seed=i).float()
        for i, (key, (shape, spectrum)) in enumerate(spectra.items())
    }
    deltas["model.layers.1.mlp.down_proj.weight"] += 1e-3 * torch.randn(32, 64)  # full rank, small tail
    expected_ranks = {key: sum(s > 0.5 for s in spectrum) for key, (_, spectrum) in spectra.items()}
    base = CheckpointReader(llama_base)
    ordered = [(key, deltas[key]) for key in base.keys() if key in deltas]  # streamed in base order

    report = write_lora_adapter(
        tmp_path / "out",
        iter(ordered),
        base_model_name_or_path=str(llama_base),
        energy=0.99,
        max_rank=8,
        layouts=lora_layouts(llama_base),
    )
    assert {key: m.rank for key, m in report.modules.items()} == expected_ranks
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 3 and config["rank_pattern"]
    assert config["base_model_name_or_path"] == str(llama_base)

    reloaded = _reloaded_deltas(_llama(llama_base), tmp_path / "out")
    assert set(reloaded) == set(deltas)
    for key, delta in deltas.items():
        approx = _best_rank_approximation(delta, expected_ranks[key])
        torch.testing.assert_close(reloaded[key], approx, rtol=1e-5, atol=1e-5, msg=key)
        error = float((delta - approx).norm() / delta.norm())
        assert report.modules[key].relative_error == pytest.approx(error, rel=1e-3, abs=1e-6)
    assert report.max_relative_error == max(m.relative_error for m in report.modules.values())

    # and our own reader reads it back to the same deltas
    vector = LoraTaskVector.from_pretrained(tmp_path / "out", base)
    for key in deltas:
        torch.testing.assert_close(vector[key], reloaded[key], rtol=1e-5, atol=1e-6)


def test_write_gpt2_conv1d_adapter_reloads_in_peft(gpt2_base, tmp_path):
    from transformers import GPT2LMHeadModel

    shapes = {"transformer.h.0.attn.c_attn.weight": (16, 48), "transformer.h.0.attn.c_proj.weight": (16, 16)}
    deltas = {key: _delta_with_gaps(shape, seed=i) for i, (key, shape) in enumerate(shapes.items())}
    layouts = lora_layouts(gpt2_base)
    assert layouts["transformer.h.0.attn.c_attn.weight"] == "linear_transposed"
    write_lora_adapter(tmp_path / "out", deltas.items(), base_model_name_or_path=None, max_rank=4, layouts=layouts)
    reloaded = _reloaded_deltas(GPT2LMHeadModel.from_pretrained(gpt2_base), tmp_path / "out")
    for key, delta in deltas.items():
        torch.testing.assert_close(reloaded[key], _best_rank_approximation(delta, 4), rtol=1e-5, atol=1e-5)


def test_write_conv_adapter_reloads_in_peft(tmp_path):
    shapes = {
        "conv.weight": (8, 3, 3, 3),
        "point.weight": (6, 8, 1, 1),
        "conv1d.weight": (5, 6, 3),
        "head.weight": (4, 5),
    }
    deltas = {key: _delta_with_gaps(shape, seed=i) for i, (key, shape) in enumerate(shapes.items())}
    layouts = lora_layouts(TinyConvNet())
    assert layouts == dict.fromkeys(shapes, "conv") | {"head.weight": "linear"}
    report = write_lora_adapter(tmp_path / "out", deltas.items(), base_model_name_or_path=None, max_rank=2)
    assert {m.layout for m in report.modules.values()} == {"conv", "linear"}
    reloaded = _reloaded_deltas(_conv_net(), tmp_path / "out")
    for key, delta in deltas.items():
        torch.testing.assert_close(reloaded[key], _best_rank_approximation(delta, 2), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            lora_delta_weight(
                *factorize_delta(delta, layout=layouts[key], max_rank=2)[:2], scaling=1.0, layout=layouts[key]
            ),
            _best_rank_approximation(delta, 2),
            rtol=1e-5,
            atol=1e-5,
        )


def test_write_refuses_or_skips_non_lora_deltas(tmp_path):
    deltas = [("lin.weight", torch.randn(6, 5)), ("lin.bias", torch.randn(6)), ("other.weight", torch.zeros(3, 3))]
    with pytest.raises(ValueError, match=r"'lin\.bias'.*non_lora='skip'"):
        write_lora_adapter(tmp_path / "a", iter(deltas), base_model_name_or_path=None, max_rank=2)
    report = write_lora_adapter(
        tmp_path / "b", iter(deltas), base_model_name_or_path=None, max_rank=2, non_lora="skip"
    )
    assert list(report.modules) == ["lin.weight"]
    assert set(report.skipped) == {"lin.bias", "other.weight"}
    layouts = {"lin.weight": "linear"}
    with pytest.raises(ValueError, match="No non-zero LoRA-able delta"):
        write_lora_adapter(tmp_path / "c", deltas[1:], base_model_name_or_path=None, max_rank=2, non_lora="skip")
    with pytest.raises(ValueError, match="max_rank, energy"):
        write_lora_adapter(tmp_path / "d", deltas[:1], base_model_name_or_path=None, layouts=layouts)
