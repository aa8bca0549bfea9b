"""STAMerger.compress / hf_sta.compression: structured pruning of a multi-task model for the kept tasks.

Oracles: the uncompressed model with the removed heads' / neurons' output columns zeroed (and removed pre-norm
decoder layers made identities by zeroing both their output projections), a closed-form parameter count, a
checkpoint reloaded with stock ``AutoModel``, and group Taylor scores from a brute-force autograd loop.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from hf_sta import STAMerger
from hf_sta.compression import (
    CompressionConfig,
    TaskHead,
    Widths,
    architecture_spec,
    compress_model,
    fuse,
    non_embedding_parameters,
    save_compressed,
    structure_scores,
)
from hf_sta.compression.recovery import distill_loss
from hf_sta.compression.scoring import StructureScores, task_scores
from hf_sta.errors import ConfigError
from tests.conftest import tiny_bert_config

TOL = dict(atol=1e-5, rtol=1e-5)


def _decoder(model_type: str, layers: int = 3):
    import transformers

    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                    "mistral": transformers.MistralConfig, "qwen3": transformers.Qwen3Config}[model_type]  # fmt: skip
    config = config_class(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                          tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _bert(layers: int = 2, heads: int = 2, intermediate: int = 48, model_type: str = "bert"):
    from transformers import BertModel, RobertaConfig, RobertaModel

    torch.manual_seed(0)
    config = tiny_bert_config(num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate)
    if model_type == "roberta":
        return RobertaModel(RobertaConfig(**{**config.to_dict(), "pad_token_id": 1})).eval()
    return BertModel(config).eval()


def _zeroed_decoder(model, record: dict, widths: Widths):
    """The oracle: removed heads' o_proj columns and removed neurons' down_proj columns set to 0; a removed layer
    gets all of both zeroed (a pre-norm residual layer whose outputs are 0 is the identity)."""
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(oracle.model.layers):
            kept = record["layers"].get(str(i), {"heads": [], "neurons": []})
            heads = [h for h in range(widths.num_attention_heads) if h not in kept["heads"]]
            for h in heads:
                layer.self_attn.o_proj.weight[:, h * widths.head_dim : (h + 1) * widths.head_dim] = 0
            removed = [j for j in range(widths.intermediate_size) if j not in kept["neurons"]]
            layer.mlp.down_proj.weight[:, removed] = 0
    return oracle


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_decoder_outputs_equal_zeroed_columns(model_type, tmp_path):
    model = _decoder(model_type)
    widths = Widths.of(model.config)
    config = CompressionConfig(["a"], importance="random", num_attention_heads=2, intermediate_size=40,
                               num_hidden_layers=2, seed=3)  # fmt: skip
    result = compress_model(model, {"a": TaskHead()}, None, config)
    record = result.record
    assert record["compressed"]["num_attention_heads"] == 2 and record["compressed"]["num_key_value_heads"] == 1
    assert len(record["layers"]) == 2 and all(len(v["neurons"]) == 40 for v in record["layers"].values())
    for kept in record["layers"].values():  # whole key/value groups: heads come in consecutive pairs
        assert kept["heads"] in ([0, 1], [2, 3])
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _zeroed_decoder(model, record, widths)(ids).logits
        actual = result.model(ids).logits
    torch.testing.assert_close(actual, expected, **TOL)
    if getattr(model.config, "layer_types", None):
        assert len(result.model.config.layer_types) == 2
    if model_type in ("llama", "qwen2"):  # stock AutoModel reload: fewer heads, same head_dim, GQA kept
        from transformers import AutoModel

        folder = save_compressed(result, tmp_path / "out")
        reloaded = AutoModel.from_pretrained(folder)
        assert type(reloaded).__name__ == f"{type(model.model).__name__}"
        assert (reloaded.config.num_attention_heads, reloaded.config.num_key_value_heads) == (2, 1)
        assert reloaded.config.head_dim == 8 and reloaded.config.intermediate_size == 40
        with torch.no_grad():
            torch.testing.assert_close(reloaded(ids).last_hidden_state, result.model.model(ids).last_hidden_state)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_bert_outputs_equal_zeroed_ffn_columns(model_type):
    model = _bert(model_type=model_type)
    config = CompressionConfig(["a"], importance="random", intermediate_size=20, seed=1)
    result = compress_model(model, {"a": TaskHead()}, None, config)
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(oracle.encoder.layer):
            removed = [j for j in range(48) if j not in result.record["layers"][str(i)]["neurons"]]
            layer.output.dense.weight[:, removed] = 0
        ids = torch.randint(0, 99, (3, 9), generator=torch.Generator().manual_seed(2))
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0
        expected, actual = oracle(ids, attention_mask=mask), result.model(ids, attention_mask=mask)
    torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, **TOL)
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output, **TOL)
    assert result.record["layers"]["0"]["heads"] == [0, 1]  # BERT heads are all kept


def _llama_closed_form(w: Widths, hidden: int = 32) -> int:
    per_layer = 2 * hidden * w.num_attention_heads * w.head_dim + 2 * hidden * w.num_key_value_heads * w.head_dim
    return w.num_hidden_layers * (per_layer + 3 * hidden * w.intermediate_size + 2 * hidden) + hidden


def _bert_closed_form(w: Widths, hidden: int = 32) -> int:
    # q, k, v, o with biases; two LayerNorms; intermediate (weight + bias) and output (weight + bias)
    per_layer = (
        4 * hidden * hidden + 4 * hidden + 4 * hidden + 2 * hidden * w.intermediate_size + w.intermediate_size + hidden
    )
    return w.num_hidden_layers * per_layer + hidden * hidden + hidden  # + pooler


def _counted(model, excluded_prefixes) -> int:
    """Independent count: named parameters outside the embeddings / lm_head."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(excluded_prefixes))


@pytest.mark.parametrize("target", [0.75, 0.5, 0.3])
def test_parameter_count_matches_formula_and_target(target):
    model = _decoder("llama")
    original = Widths.of(model.config)
    assert _counted(model, ("model.embed_tokens", "lm_head")) == _llama_closed_form(original)
    result = compress_model(model, {"a": TaskHead()}, None, CompressionConfig(["a"], importance="magnitude",
                                                                              target=target))  # fmt: skip
    new = Widths.of(result.model.config)
    count = _counted(result.model, ("model.embed_tokens", "lm_head"))
    assert count == _llama_closed_form(new) == non_embedding_parameters(result.model, architecture_spec(model))
    assert count == result.record["compressed"]["non_embedding_parameters"]
    limit = target * _llama_closed_form(original)
    assert count <= limit < _llama_closed_form(new.with_(intermediate_size=new.intermediate_size + 1))

    bert = _bert(intermediate=200)  # FFN-heavy like real BERTs: only neurons go, so the FFN must hold the cut
    bert_result = compress_model(bert, {"a": TaskHead()}, None, CompressionConfig(["a"], importance="magnitude",
                                                                                  target=target))  # fmt: skip
    bert_new = Widths.of(bert_result.model.config)
    assert bert_new.num_attention_heads == 2  # only FFN neurons go
    bert_count = _counted(bert_result.model, ("embeddings.",))
    assert bert_count == _bert_closed_form(bert_new) == bert_result.record["compressed"]["non_embedding_parameters"]
    assert _counted(bert, ("embeddings.",)) == _bert_closed_form(Widths.of(bert.config))
    assert bert_count <= target * _bert_closed_form(Widths.of(bert.config))


def test_ratios_give_the_widths():
    """head_ratio keeps round(ratio * G) whole key/value groups, neuron_ratio round(ratio * F) neurons (rounded down
    to multiple_of); either combines with target, which then sets what is left."""

    def widths(model, **options):
        config = CompressionConfig(["a"], importance="magnitude", **options)
        return Widths.of(compress_model(model, {"a": TaskHead()}, None, config).model.config)

    llama = _decoder("llama")  # 4 query heads in 2 groups of 2, intermediate 64
    got = widths(llama, head_ratio=0.5, neuron_ratio=0.75)
    assert (got.num_attention_heads, got.num_key_value_heads, got.intermediate_size) == (2, 1, 48)
    assert widths(llama, neuron_ratio=0.3, multiple_of=8).intermediate_size == 16  # round(19.2) = 19 -> 16
    assert widths(llama, neuron_ratio=0.01).intermediate_size == 1
    got = widths(llama, head_ratio=0.5, target=0.5)
    half = 0.5 * _llama_closed_form(Widths.of(llama.config))  # the FFN takes what the heads leave
    assert got.num_attention_heads == 2
    assert got.intermediate_size == max(
        f for f in range(65) if _llama_closed_form(got.with_(intermediate_size=f)) <= half
    )
    bert = _bert(heads=4)
    assert widths(bert, head_ratio=1.0, neuron_ratio=0.5) == Widths.of(bert.config).with_(intermediate_size=24)
    with pytest.raises(ConfigError, match="BERT-family"):
        widths(bert, head_ratio=0.5)


def test_multiple_of_rounds_the_ffn_width():
    result = compress_model(_decoder("llama"), {"a": TaskHead()}, None,
                            CompressionConfig(["a"], importance="magnitude", target=0.6, multiple_of=8))  # fmt: skip
    assert result.model.config.intermediate_size % 8 == 0


def _labelled(rows: int, length: int, labels: int, seed: int):
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (rows, length), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * length] * rows,
                              "label": torch.randint(0, labels, (rows,), generator=generator).tolist()})  # fmt: skip


def _bert_head(labels: int, seed: int) -> TaskHead:
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_bert_config(num_labels=labels, architectures=["BertForSequenceClassification"])
    model = BertForSequenceClassification(config)
    return TaskHead({k: v.detach().clone() for k, v in model.classifier.state_dict(prefix="classifier.").items()},
                    config.to_dict())  # fmt: skip


def test_group_taylor_matches_brute_force_autograd():
    """task_scores == sum over each structure of (1/J) sum_j |theta * g_j|, g_j from torch.autograd.grad."""
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    body, head = _bert(), _bert_head(3, 5)
    data = _labelled(8, 7, 3, 0)
    loader = DataLoader(data.rename_column("label", "labels"), batch_size=4, collate_fn=default_data_collator)
    spec, widths = architecture_spec(body), Widths.of(body.config)
    scores = task_scores(body, spec, widths, importance="taylor", head=head, loader=loader)
    model = head.task_model(body)
    params = dict(body.encoder.layer.named_parameters())
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    for batch in loader:
        grads = torch.autograd.grad(model(**batch).loss, list(params.values()))
        for (k, p), g in zip(params.items(), grads, strict=True):
            total[k] += (p.detach() * g).abs() / len(loader)
    expected = structure_scores(total, spec, widths)
    for got, want in zip(scores.astuple(), expected.astuple(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-8)
    # the structure sums themselves, by hand for layer 1 neuron 7 and head 1
    layer = {k.removeprefix("1."): v for k, v in total.items() if k.startswith("1.")}
    neuron = (layer["intermediate.dense.weight"][7].sum() + layer["intermediate.dense.bias"][7]
              + layer["output.dense.weight"][:, 7].sum())  # fmt: skip
    torch.testing.assert_close(expected.neurons[1, 7], neuron)
    rows = slice(16, 32)
    head_sum = (
        sum(
            layer[f"attention.self.{m}.weight"][rows].sum() + layer[f"attention.self.{m}.bias"][rows].sum()
            for m in ("query", "key", "value")
        )
        + layer["attention.output.dense.weight"][:, rows].sum()
    )
    torch.testing.assert_close(expected.groups[1, 1], head_sum)


def test_ranking_keeps_structures_made_important():
    """A neuron whose output is scaled up, and the key/value group left when the other one's output is scaled down
    to almost nothing, are what the loss depends on: taylor keeps them (random does not keep the neuron)."""
    from datasets import Dataset

    model = _decoder("llama", layers=2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, 5] *= 40
            layer.mlp.up_proj.weight[5] *= 4
            layer.self_attn.o_proj.weight[:, :8] *= 1e-3  # heads 0, 1 (group 0) barely reach the output
    ids = torch.randint(0, 96, (8, 12), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 12] * 8})
    config = CompressionConfig(["lm"], num_attention_heads=2, intermediate_size=4)
    result = compress_model(model, {"lm": TaskHead()}, {"lm": data}, config)
    for kept in result.record["layers"].values():
        assert 5 in kept["neurons"] and kept["heads"] == [2, 3]
    baseline = compress_model(
        model, {"lm": TaskHead()}, None, CompressionConfig(["lm"], importance="random", intermediate_size=4, seed=0)
    )
    assert any(5 not in kept["neurons"] for kept in baseline.record["layers"].values())  # not kept by chance


def test_scores_are_reused_for_the_same_data_only(monkeypatch):
    """The score cache: a second call with the same DataLoader object or an equal Dataset reuses the scores; another
    loader over the same rows (other batches) or another ranking seed is scored again."""
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    from hf_sta.compression import api

    calls = []
    monkeypatch.setattr(api, "task_scores", lambda *a, **k: calls.append(k["loader"]) or task_scores(*a, **k))
    body, head, cache = _bert(), _bert_head(3, 5), {}
    rows = _labelled(8, 7, 3, 0)
    loader = DataLoader(rows.rename_column("label", "labels"), batch_size=4, collate_fn=default_data_collator)
    other = DataLoader(rows.rename_column("label", "labels"), batch_size=2, collate_fn=default_data_collator)

    def run(data, **options):
        config = CompressionConfig(["t"], intermediate_size=24, num_samples=8, **options)
        return compress_model(body, {"t": head}, {"t": data}, config, cache=cache).record["layers"]

    first = run(loader)
    assert run(loader) == first and len(calls) == 1
    run(other)
    run(rows.select(range(8))), run(rows.select(range(8)))  # equal Datasets (same fingerprint): scored once
    assert len(calls) == 3
    run(rows, importance="random", seed=1), run(rows, importance="random", seed=2)
    assert len(calls) == 5


def test_fusion_rules_closed_form():
    a = StructureScores(torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 2.0]]), torch.tensor([4.0]))
    b = StructureScores(torch.tensor([[30.0, 10.0]]), torch.tensor([[1.0, 3.0]]), torch.tensor([1.0]))
    mean, high = fuse({"a": a, "b": b}, "mean"), fuse({"a": a, "b": b}, "max")
    torch.testing.assert_close(mean.groups, torch.tensor([[(0.25 + 0.75) / 2, (0.75 + 0.25) / 2]]))
    torch.testing.assert_close(high.groups, torch.tensor([[0.75, 0.75]]))
    torch.testing.assert_close(mean.neurons, torch.tensor([[(0.5 + 0.25) / 2, (0.5 + 0.75) / 2]]))
    torch.testing.assert_close(high.neurons, torch.tensor([[0.5, 0.75]]))
    with pytest.raises(ConfigError, match="fusion"):
        fuse({"a": a}, "median")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(target=0), "target"),
        (dict(target=1), "target"),
        (dict(target=1.5), "target"),
        (dict(target=True), "target"),
        (dict(target=0.001), "cannot be met"),
        (dict(num_attention_heads=6), "num_attention_heads"),
        (dict(num_attention_heads=3), "multiple"),
        (dict(intermediate_size=0), "intermediate_size"),
        (dict(num_hidden_layers=4), "num_hidden_layers"),
        (dict(target=0.5, intermediate_size=8), "not both"),
        (dict(), "nothing would be removed"),
        (dict(head_ratio=0), "head_ratio"),
        (dict(neuron_ratio=1.5), "neuron_ratio"),
        (dict(neuron_ratio=True), "neuron_ratio"),
        (dict(head_ratio=0.5, num_attention_heads=2), "not both"),
        (dict(neuron_ratio=0.5, intermediate_size=8), "not both"),
        (dict(neuron_ratio=0.5, target=0.5), "not both"),
        (dict(head_ratio=1.0, neuron_ratio=1.0), "nothing would be removed"),
    ],
)
def test_bad_targets_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        compress_model(_decoder("llama"), {"a": TaskHead()}, None, CompressionConfig(["a"], importance="magnitude",
                                                                                     **options))  # fmt: skip


def test_bert_heads_and_unsupported_architectures_are_refused():
    from transformers import GPT2Config, GPT2Model

    with pytest.raises(ConfigError, match="BERT-family"):
        compress_model(_bert(heads=4), {"a": TaskHead()}, None,
                       CompressionConfig(["a"], importance="magnitude", num_attention_heads=2))  # fmt: skip
    gpt2 = GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(ConfigError, match="not supported.*llama"):
        compress_model(gpt2, {"a": TaskHead()}, None, CompressionConfig(["a"], importance="magnitude", target=0.5))
    with pytest.raises(ConfigError, match="calibration data"):
        compress_model(_bert(), {"a": TaskHead()}, None, CompressionConfig(["a"], target=0.8))
    with pytest.raises(ConfigError, match="keep_tasks"):
        CompressionConfig([], target=0.5)


def test_distill_loss_closed_form():
    z_s, z_t = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    h_s, h_t = torch.zeros(1, 2, 4), torch.ones(1, 2, 4)
    p_t, p_s = torch.softmax(z_t / 2, -1), torch.softmax(z_s / 2, -1)
    kl = (p_t * (p_t.log() - p_s.log())).sum()
    got = distill_loss((z_s, h_s), (z_t, h_t), torch.ones(1, 2), temperature=2.0, hidden_weight=0.5)
    torch.testing.assert_close(got, 4 * kl + 0.5 * 1.0)
    assert float(distill_loss((z_t, h_t), (z_t, h_t), None, 2.0, 1.0)) == pytest.approx(0.0, abs=1e-7)


def test_recovery_callback_sees_the_students_of_shorter_runs():
    """With a constant learning rate, step k of a 4-step recovery is the student of a k-step recovery (what the
    benchmark relies on to tune the number of steps in one run); the callback sees steps 1..4."""
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    from hf_sta.compression.recovery import distill

    body, head = _bert(), _bert_head(3, 5)
    loader = DataLoader(_labelled(8, 7, 3, 0).rename_column("label", "labels"), batch_size=4,
                        collate_fn=default_data_collator)  # fmt: skip
    pruned = compress_model(body, {"t": head}, None, CompressionConfig(["t"], importance="magnitude",
                                                                       intermediate_size=24)).model  # fmt: skip
    seen = {}

    def snapshot(step, student):
        seen[step] = {k: v.detach().clone() for k, v in student.state_dict().items()}

    long_run = copy.deepcopy(pruned)
    distill(long_run, body, {"t": head}, {"t": loader}, steps=4, lr=1e-2, callback=snapshot)
    assert sorted(seen) == [1, 2, 3, 4]
    short_run = copy.deepcopy(pruned)
    distill(short_run, body, {"t": head}, {"t": loader}, steps=2, lr=1e-2)
    for key, value in short_run.state_dict().items():
        torch.testing.assert_close(seen[2][key], value, rtol=0, atol=0)
    assert not torch.equal(seen[2]["encoder.layer.0.output.dense.weight"], pruned.encoder.layer[0].output.dense.weight)
    torch.testing.assert_close(seen[4]["encoder.layer.0.output.dense.weight"],
                               long_run.encoder.layer[0].output.dense.weight, rtol=0, atol=0)  # fmt: skip


def test_compress_merge_folder_end_to_end(bert_checkpoints, tmp_path, monkeypatch):
    """merge -> compress(folder) with recovery -> folder that AutoModel reloads; the JSON's kept neurons reproduce
    the model (before recovery) as the merged body with the other neurons' output columns zeroed."""
    from safetensors.torch import load_file
    from transformers import AutoModel, BertModel

    merger = STAMerger.from_pretrained(bert_checkpoints.base, bert_checkpoints.finetuned)
    merged = merger.merge(method="task_arithmetic", scaling=0.5, output_dir=tmp_path / "merged")
    data = {"news": _labelled(16, 8, 2, 1), "topic": _labelled(16, 8, 4, 2)}
    options = dict(keep_tasks=["news", "topic"], data=data, target=0.7, num_samples=16, show_progress=False)
    from hf_sta.compression import api

    calls = []
    monkeypatch.setattr(api, "task_scores", lambda *a, **k: calls.append(k["task"]) or task_scores(*a, **k))
    in_memory = merger.compress(merged, **options)
    record = merger.last_compression
    assert record["kept_tasks"] == ["news", "topic"] and set(merger.last_compression_heads) == {"news", "topic"}
    body = BertModel.from_pretrained(merged).eval()
    oracle = copy.deepcopy(body)
    with torch.no_grad():
        for i, layer in enumerate(oracle.encoder.layer):
            removed = [j for j in range(48) if j not in record["layers"][str(i)]["neurons"]]
            layer.output.dense.weight[:, removed] = 0
        ids = torch.randint(0, 99, (2, 8), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(in_memory(ids).pooler_output, oracle(ids).pooler_output, **TOL)

    out = merger.compress(merged, **options, recovery_steps=4, accuracy={"news": 0.91}, output_dir=tmp_path / "edge")
    # eval_fn measures both models: here a closed form that tells them apart (intermediate_size / 100 + task)
    evaluated = merger.compress(
        merged, **options, eval_fn=lambda model, task: model.config.intermediate_size / 100 + (task == "topic") / 10,
        output_dir=tmp_path / "measured",
    )  # fmt: skip
    measured = json.loads((evaluated / "hf_sta_compression.json").read_text())
    size = measured["compressed"]["intermediate_size"]
    assert measured["accuracy"] == pytest.approx({"news": size / 100, "topic": size / 100 + 0.1})
    assert measured["uncompressed_accuracy"] == pytest.approx({"news": 0.48, "topic": 0.58})
    assert (
        f"| topic | {size / 100 + 0.1:.4f} | 0.5800 | {(size / 100 + 0.1) / 0.58:.3f} |"
        in (evaluated / "README.md").read_text()
    )
    assert calls == ["news", "topic"]  # the second call on the same folder and data reused the scores
    assert sorted(p.name for p in (out / "heads").iterdir()) == ["news.safetensors", "topic.safetensors"]
    head = load_file(out / "heads" / "topic.safetensors")
    torch.testing.assert_close(
        head["classifier.weight"],
        load_file(bert_checkpoints.finetuned["topic"] / "model.safetensors")["classifier.weight"],
    )
    saved = json.loads((out / "hf_sta_compression.json").read_text())
    assert {"kept_tasks", "rule", "layers"} <= set(saved) and saved["layers"]["0"]["neurons"] == \
        record["layers"]["0"]["neurons"]  # fmt: skip
    assert saved["recovery"]["steps"] == 4 and saved["accuracy"] == {"news": 0.91}
    reloaded = AutoModel.from_pretrained(out)
    assert type(reloaded).__name__ == "BertModel"
    assert reloaded.config.intermediate_size == saved["compressed"]["intermediate_size"] < 48
    assert sum(p.numel() for n, p in reloaded.named_parameters() if not n.startswith("embeddings.")) == \
        saved["compressed"]["non_embedding_parameters"]  # fmt: skip
    with torch.no_grad():  # recovery moved the weights away from the pruned merge
        assert not torch.allclose(reloaded(ids).pooler_output, in_memory(ids).pooler_output)
    card = (out / "README.md").read_text()
    assert "news" in card and "| news | 0.9100 | - | - |" in card and "Recovery" in card
    from huggingface_hub import ModelCard

    data = ModelCard.load(out / "README.md").data
    assert data.tags[:2] == ["hf_sta", "compression"] and data.pipeline_tag == "feature-extraction"
    with pytest.raises(ConfigError, match="unknown task"):
        merger.compress(merged, keep_tasks=["nope"], importance="magnitude", target=0.5)


def test_bench_compression_tiny(tmp_path):
    """``--tiny`` runs every part (rows with validation-chosen fusion and recovery, latency, report) on a tiny BERT
    merge and a tiny Llama LoRA merge; rows are cached and reused."""
    from benchmarks import bench_compression

    argv = ["--tiny", "--work-dir", str(tmp_path), "--methods", "taylor", "random", "--recovery-checkpoints", "1",
            "2"]  # fmt: skip
    result = bench_compression.main(argv)
    bert, llama = result["rows"]["minilm"], result["rows"]["smollm2"]
    keep = "tweet_sentiment,product_sentiment"
    sizes = {"target=0.75": ("taylor", "random"), "target=0.75,L1": ("taylor",)}
    expected = {
        f"{keep}|{size}|{m}|{r}" for size, methods in sizes.items() for m in methods for r in ("r0", "recovery")
    }
    assert set(bert) == {f"{keep}|uncompressed", *expected, *(f"latency|{size}|threads1" for size in sizes)}
    row = bert[f"{keep}|target=0.75|taylor|r0"]
    assert row["non_embedding_parameters"] <= 0.75 * 18144 and 0 <= row["relative"] <= 2
    assert {t["fusion"] for t in row["trials"]} == {"mean", "max"}
    best = max(row["trials"], key=lambda t: t["validation_mean"])  # chosen on validation
    assert row["fusion"] == best["fusion"]
    pilot = bert[f"{keep}|target=0.75|taylor|recovery"]  # the learning rate is chosen on this row's validation
    assert [(t["lr"], t["steps"]) for t in pilot["trials"]] == [(3e-3, 1), (3e-3, 2), (1e-2, 1), (1e-2, 2)]
    chosen = max(pilot["trials"], key=lambda t: t["validation_mean"])
    assert (pilot["recovery"]["lr"], pilot["recovery"]["steps"]) == (chosen["lr"], chosen["steps"])
    assert pilot["recovery"]["run"]["steps"] == 2
    other = bert[f"{keep}|target=0.75|random|recovery"]
    assert {t["lr"] for t in other["trials"]} == {chosen["lr"]} and len(other["trials"]) == 2
    assert bert[f"{keep}|target=0.75,L1|taylor|r0"]["num_hidden_layers"] == 1
    assert set(bert["latency|target=0.75|threads1"]["batches"]) == {"1", "32"}
    ffn = llama["tweet_sentiment,subjectivity|neuron_ratio=0.75|taylor|r0"]
    assert ffn["intermediate_size"] == 48 and ffn["num_attention_heads"] == 4  # tiny Llama: 64 neurons, 4 heads
    assert "latency|neuron_ratio=0.75|threads1" in llama
    assert result["summary"]["taylor"] and "| taylor |" in bench_compression.markdown(result["rows"])
    cached = json.loads((tmp_path / "rows-minilm.json").read_text())["rows"]
    assert cached.keys() == bert.keys()


def test_compress_example_tiny(tmp_path):
    from examples import compress

    argv = ["--tiny", "--num-threads", "1", "--eval-size", "16", "--output-dir", str(tmp_path), "--tasks",
            "tweet_sentiment", "product_sentiment", "subjectivity", "--calibration-samples", "8",
            "--recovery-steps", "2"]  # fmt: skip
    result = compress.main(argv)
    assert list(result["scores"]) == ["STA merge (all tasks)", "compressed to 0.75", "+ recovery (2 steps)"]
    for row, folder in result["compressed_dirs"].items():
        assert sorted(p.name for p in (folder / "heads").iterdir()) == ["product_sentiment.safetensors",
                                                                       "tweet_sentiment.safetensors"]  # fmt: skip
        record = result["records"][row]
        assert record["kept_fraction"] <= 0.75
        assert record["accuracy"] == {t: result["scores"][row][t].accuracy for t in record["kept_tasks"]}
        assert record["uncompressed_accuracy"] == {
            t: result["scores"]["STA merge (all tasks)"][t].accuracy for t in record["kept_tasks"]
        }
    assert all(0 <= s.accuracy <= 1 for row in result["scores"].values() for s in row.values())


def test_cli_compress_recipe(bert_checkpoints, tmp_path, capsys):
    import yaml
    from transformers import AutoModel

    from hf_sta.cli import main

    merger = STAMerger.from_pretrained(bert_checkpoints.base, bert_checkpoints.finetuned)
    merged = merger.merge(method="task_arithmetic", scaling=0.5, output_dir=tmp_path / "merged")
    rows = _labelled(8, 6, 2, 3)
    (tmp_path / "news.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows.to_list()))
    recipe = {
        "base_model": str(bert_checkpoints.base),
        "models": {t: str(p) for t, p in bert_checkpoints.finetuned.items()},
        "model": str(merged),
        "compress": {"keep_tasks": ["news"], "target": 0.8, "num_samples": 8},
        "data": {"news": {"data": str(tmp_path / "news.jsonl")}},
        "output_dir": str(tmp_path / "edge"),
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["compress", str(tmp_path / "recipe.yaml"), "--dry-run"]) == 0
    assert not (tmp_path / "edge").exists()
    assert main(["compress", str(tmp_path / "recipe.yaml")]) == 0
    assert "Wrote" in capsys.readouterr().out
    saved = json.loads((tmp_path / "edge" / "hf_sta_compression.json").read_text())
    assert saved["kept_tasks"] == ["news"] and saved["kept_fraction"] <= 0.8
    assert (
        AutoModel.from_pretrained(tmp_path / "edge").config.intermediate_size
        == saved["compressed"]["intermediate_size"]
    )
    recipe["compress"]["tagret"] = 0.5
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["compress", str(tmp_path / "bad.yaml")]) == 2
    assert "compress.tagret: unknown field" in capsys.readouterr().err
