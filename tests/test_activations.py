"""Input Gram matrices: the hook loop against inputs captured by a separate hook, padding, save/load, 2 processes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hf_sta.errors import CheckpointError
from hf_sta.importance import ActivationStatistics, ImportanceScores, accumulate_input_grams
from tests.conftest import run_processes

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location(
        "distributed_grams", ROOT / "tests" / "scripts" / "distributed_grams.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _captured_grams(model: nn.Module, batches, layer_types=(nn.Linear,)) -> dict[str, torch.Tensor]:
    """Oracle: store every layer's raw input with a forward hook, then X^T X in fp64 over the unpadded rows."""
    inputs: dict[str, list[torch.Tensor]] = {}
    masks: list[torch.Tensor | None] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, layer_types):

            def hook(module, args, output, name=name):
                inputs.setdefault(name, []).append((len(masks) - 1, args[0].detach().double().clone()))

            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for batch in batches:
            masks.append(batch.get("attention_mask") if isinstance(batch, dict) else None)
            model(**batch) if isinstance(batch, dict) else model(batch)
    for handle in handles:
        handle.remove()
    grams = {}
    for name, items in inputs.items():
        total = 0
        for batch_index, x in items:
            mask = masks[batch_index]
            rows = x[mask.bool()] if mask is not None and x.shape[:-1] == mask.shape else x.reshape(-1, x.shape[-1])
            total = total + rows.T @ rows
        grams[f"{name}.weight"] = total
    return grams


def _tiny_bert():
    return _script().build_model()


# -- the loop against the oracle ------------------------------------------------------------------------------------


def test_sequential_grams_equal_the_products_of_the_inputs():
    from transformers.pytorch_utils import Conv1D

    class WithSpareHead(nn.Sequential):
        def __init__(self, *layers):
            super().__init__(*layers)
            self.spare = nn.Linear(7, 7)  # registered but never called: left out

        def forward(self, x):
            for layer in list(self)[:-1]:
                x = layer(x)
            return x

    torch.manual_seed(0)
    model = WithSpareHead(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), Conv1D(2, 3))
    batches = [torch.randn(6, 5), torch.randn(2, 5), torch.randn(3, 5)]
    grams, layouts, num_tokens, num_samples = accumulate_input_grams(model, batches, progress=False)
    assert layouts == {"0.weight": "out_in", "2.weight": "out_in", "3.weight": "in_out"}
    assert (num_tokens, num_samples) == (11, 11)
    x = torch.cat(batches).double()
    hidden = torch.relu(x @ model[0].weight.double().T + model[0].bias.double())
    output = hidden @ model[2].weight.double().T + model[2].bias.double()
    for key, rows in (("0.weight", x), ("2.weight", hidden), ("3.weight", output)):
        assert grams[key].dtype == torch.float32 and grams[key].device.type == "cpu"
        torch.testing.assert_close(grams[key].double(), rows.T @ rows, rtol=1e-5, atol=1e-5, msg=key)


def test_bert_grams_equal_captured_inputs_without_padding_rows():
    model = _tiny_bert()
    loader = _script().build_loader(batch_size=3)
    grams, layouts, num_tokens, num_samples = accumulate_input_grams(model, loader, progress=False)
    expected = _captured_grams(model, loader)
    assert set(grams) == set(expected)
    assert "encoder.layer.0.attention.self.query.weight" in grams and "pooler.dense.weight" in grams
    assert set(layouts.values()) == {"out_in"}
    for key in expected:
        torch.testing.assert_close(grams[key].double(), expected[key], rtol=1e-5, atol=1e-5, msg=key)
    assert num_samples == 10
    assert num_tokens == sum(int(batch["attention_mask"].sum()) for batch in loader)
    # Query, key and value see the same hidden states (one product, shared).
    prefix = "encoder.layer.0.attention.self."
    assert torch.equal(grams[prefix + "query.weight"], grams[prefix + "key.weight"])


def test_padding_does_not_change_the_grams():
    model = _tiny_bert()
    generator = torch.Generator().manual_seed(3)
    lengths = [5, 3, 4]
    tokens = [torch.randint(1, 50, (n,), generator=generator) for n in lengths]

    def padded(width: int) -> dict[str, torch.Tensor]:
        ids = torch.zeros(len(tokens), width, dtype=torch.long)
        mask = torch.zeros(len(tokens), width, dtype=torch.long)
        for row, sequence in enumerate(tokens):
            ids[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    tight, _, tight_tokens, _ = accumulate_input_grams(model, [padded(5)], progress=False)
    loose, _, loose_tokens, _ = accumulate_input_grams(model, [padded(11)], progress=False)
    assert tight_tokens == loose_tokens == 12
    for key in tight:
        torch.testing.assert_close(loose[key], tight[key], rtol=1e-4, atol=1e-4, msg=key)
    # Without the mask the padding rows would count.
    unmasked = {"input_ids": padded(11)["input_ids"]}
    polluted, _, polluted_tokens, _ = accumulate_input_grams(model, [unmasked], progress=False)
    assert polluted_tokens == 33
    assert not torch.allclose(
        polluted["encoder.layer.0.intermediate.dense.weight"], tight["encoder.layer.0.intermediate.dense.weight"]
    )


def test_gpt2_conv1d_layers_are_in_out():
    from transformers import GPT2Config, GPT2Model
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=32)).eval()
    batch = {"input_ids": torch.randint(0, 50, (2, 6)), "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])}
    grams, layouts, num_tokens, _ = accumulate_input_grams(model, [batch], progress=False)
    assert layouts == {
        "h.0.attn.c_attn.weight": "in_out",
        "h.0.attn.c_proj.weight": "in_out",
        "h.0.mlp.c_fc.weight": "in_out",
        "h.0.mlp.c_proj.weight": "in_out",
    }
    assert grams["h.0.mlp.c_proj.weight"].shape == (64, 64) and num_tokens == 10
    expected = _captured_grams(model, [batch], layer_types=(Conv1D,))
    for key in expected:
        torch.testing.assert_close(grams[key].double(), expected[key], rtol=1e-5, atol=1e-5, msg=key)


# -- options, state, errors -----------------------------------------------------------------------------------------


def test_modules_forward_fn_num_samples_and_model_state():
    model = _tiny_bert().train()
    loader = _script().build_loader(batch_size=2)
    query = "encoder.layer.0.attention.self.query"
    grams, layouts, _, num_samples = accumulate_input_grams(
        model,
        loader,
        modules={query: "q.weight", "pooler.dense.weight": "pool.weight"},
        forward_fn=lambda model, batch: model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
        num_samples=4,
        progress=False,
    )
    assert set(grams) == set(layouts) == {"q.weight", "pool.weight"} and num_samples == 4
    expected = _captured_grams(model.eval(), list(loader)[:2])
    torch.testing.assert_close(grams["q.weight"].double(), expected[query + ".weight"], rtol=1e-5, atol=1e-5)
    model.train()
    accumulate_input_grams(model, loader, modules=[query], progress=False)
    assert model.training  # mode restored
    assert all(not module._forward_pre_hooks for module in model.modules())  # hooks removed
    with pytest.raises(KeyError, match="No module 'encoder.nope'"):
        accumulate_input_grams(model, loader, modules=["encoder.nope"], progress=False)
    with pytest.raises(ValueError, match="is a LayerNorm"):
        accumulate_input_grams(model, loader, modules=["embeddings.LayerNorm"], progress=False)


def test_errors_name_the_problem():
    model = _tiny_bert()
    with pytest.raises(ValueError, match=r"activations\[news\]: the calibration data \(`batches`\) is empty"):
        accumulate_input_grams(model, [], description="activations[news]", progress=False)
    with pytest.raises(ValueError, match="no nn.Linear or Conv1D"):
        accumulate_input_grams(nn.Sequential(nn.ReLU()), [torch.ones(2, 2)], progress=False)
    with pytest.raises(ValueError, match="need a `forward_fn"):
        accumulate_input_grams(nn.Linear(2, 2), [[torch.ones(2, 2)]], progress=False)
    nan_model = nn.Linear(2, 2)
    with pytest.raises(FloatingPointError, match="'weight' is not finite"):
        accumulate_input_grams(nan_model, [torch.tensor([[float("nan"), 1.0]])], progress=False)


# -- save / load ----------------------------------------------------------------------------------------------------


def test_save_load_roundtrip(tmp_path):
    model = _tiny_bert()
    grams, layouts, num_tokens, num_samples = accumulate_input_grams(model, _script().build_loader(), progress=False)
    statistics = ActivationStatistics(grams, layouts, num_tokens, num_samples, dataset_fingerprint="abc", task="news")
    path = statistics.save(tmp_path / "activations.safetensors")
    loaded = ActivationStatistics.load(path)
    assert loaded.layouts == layouts and set(loaded.keys()) == set(grams)
    assert (loaded.num_tokens, loaded.num_samples, loaded.task, loaded.dataset_fingerprint) == (
        num_tokens,
        num_samples,
        "news",
        "abc",
    )
    assert loaded.model_hash is None
    for key in grams:
        assert torch.equal(loaded[key], grams[key])
    means = loaded.mean_grams()
    torch.testing.assert_close(means["pooler.dense.weight"], grams["pooler.dense.weight"] / num_tokens)


def test_load_rejects_other_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ActivationStatistics.load(tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"weight": torch.eye(2)}, str(plain))
    with pytest.raises(CheckpointError, match="without hf_sta metadata"):
        ActivationStatistics.load(plain)
    importance = ImportanceScores.from_dict(
        {"weight": torch.ones(2, 2)}, metric="fisher", num_samples=1, micro_batches=1
    )
    importance_path = importance.save(tmp_path / "importance.safetensors")
    with pytest.raises(CheckpointError, match="hf_sta 'importance' file, not activation statistics"):
        ActivationStatistics.load(importance_path)
    text = tmp_path / "grams.txt"
    text.write_text("not tensors")
    with pytest.raises(CheckpointError, match="not an hf_sta activation statistics file"):
        ActivationStatistics.load(text)
    broken = tmp_path / "broken.safetensors"
    save_file({"weight": torch.eye(2)}, str(broken), metadata={"hf_sta_kind": "activation_statistics"})
    with pytest.raises(CheckpointError, match="incomplete or malformed"):
        ActivationStatistics.load(broken)
    with pytest.raises(ValueError, match="same keys"):
        ActivationStatistics({"a.weight": torch.eye(2)}, {}, 1, 1)


# -- several processes ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_give_the_same_grams(tmp_path):
    """2 gloo processes each take their share (the script checks the world size); the reduced sums equal one
    process's."""
    script = _script()
    expected, layouts, num_tokens, num_samples = accumulate_input_grams(
        script.build_model(), script.build_loader(), progress=False
    )
    out = tmp_path / "grams-2.safetensors"
    result = run_processes(2, ROOT / "tests" / "scripts" / "distributed_grams.py", out, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = ActivationStatistics.load(out)
    assert loaded.layouts == layouts
    assert (loaded.num_tokens, loaded.num_samples) == (num_tokens, num_samples)
    for key in expected:
        torch.testing.assert_close(loaded[key], expected[key], rtol=1e-5, atol=1e-5, msg=key)


def test_grams_feed_regmean_in_both_layouts():
    """End to end on one layer each way: statistics of two 'fine-tunes' on their own data -> regmean = least squares."""
    from transformers.pytorch_utils import Conv1D

    from hf_sta.methods.regmean import regmean

    torch.manual_seed(0)
    for layer in (nn.Linear(4, 3), Conv1D(3, 4)):
        base = layer.weight.detach().clone()
        taus, grams, inputs = [], [], []
        for task in range(2):
            x = torch.randn(20, 4) * (task + 1)
            tau = torch.randn_like(base) * 0.1
            statistics, layouts, _, _ = accumulate_input_grams(layer, [x], progress=False, dtype=torch.float64)
            taus.append(tau)
            grams.append(statistics["weight"])
            inputs.append(x.double())
        layout = layouts["weight"]
        delta = regmean(torch.stack(taus), torch.ones(2), gram=torch.stack(grams), gram_layout=layout, alpha=1.0)
        # y = x W^T for out_in, x W for in_out; least squares on the stacked inputs in the matching orientation.
        finetuned = [(base + tau).double() for tau in taus]
        as_matrix = (lambda w: w.T) if layout == "out_in" else (lambda w: w)
        targets = torch.cat([x @ as_matrix(w) for x, w in zip(inputs, finetuned)])
        expected = torch.linalg.lstsq(torch.cat(inputs), targets).solution
        torch.testing.assert_close(as_matrix((base + delta).double()), expected, atol=1e-4, rtol=1e-4)
