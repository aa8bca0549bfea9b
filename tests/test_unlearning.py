"""``STAMerger.unlearn`` (FUSED-style adapters), the layer sensitivity, the objectives and the membership attack,
each against an independent oracle (brute-force autograd, a reloaded adapter, closed forms, pairwise counts)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_sta import CheckpointError, ConfigError, STAMerger
from hf_sta.unlearning import (
    UnlearnConfig,
    candidate_layers,
    choose_layers,
    forget_term,
    label_prior,
    layer_of,
    layer_sensitivity,
    membership_attack_accuracy,
    membership_auc,
)
from tests.conftest import perturb_, tiny_bert_config, tiny_llama_config

SEQUENCE = 8


def _rows(low: int, high: int, count: int, seed: int):
    """Tokenized rows of equal length (no tokenizer needed): ids in ``[low, high)``, label = first id mod 3."""
    import datasets

    ids = torch.randint(low, high, (count, SEQUENCE), generator=torch.Generator().manual_seed(seed))
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * SEQUENCE] * count, "label": (ids[:, 0] % 3).tolist()}
    )


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny ``BertForSequenceClassification`` base (3 labels) and one perturbed fine-tune of it."""
    from transformers import BertForSequenceClassification

    root = tmp_path_factory.mktemp("unlearn")
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(num_labels=3))
    model.save_pretrained(root / "base")
    perturb_(model, scale=0.02, seed=1)
    model.save_pretrained(root / "ft")
    return root


@pytest.fixture()
def merger(classifier):
    return STAMerger.from_pretrained(classifier / "base", {"ft": classifier / "ft"})


def _fresh(classifier):
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(classifier / "ft").eval()


FORGET, RETAIN = _rows(5, 40, 24, 0), _rows(40, 99, 32, 1)
QUICK = dict(max_steps=4, eval_steps=2, batch_size=8, sensitivity_samples=8, eval_samples=8, show_progress=False)


def _logits(model, rows) -> torch.Tensor:
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(rows["input_ids"]), attention_mask=torch.tensor(rows["attention_mask"])
        ).logits


def test_adapter_only_on_chosen_layers_target_frozen_and_disabling_is_exact(merger, classifier, tmp_path):
    target = _fresh(classifier)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    logits_before = _logits(target, RETAIN)
    model = merger.unlearn(target, FORGET, RETAIN, layers=["bert.encoder.layer.1"], learning_rate=0.05, **QUICK)

    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("bert.encoder.layer.1." in n and "lora_" in n for n in trained)
    inner = {
        k.replace(".base_layer", ""): v for k, v in model.get_base_model().state_dict().items() if "lora_" not in k
    }
    assert inner.keys() == before.keys()
    assert all(torch.equal(inner[k], before[k]) for k in before)  # the target's weights never change
    assert not torch.equal(_logits(model, RETAIN), logits_before)  # the adapter does something...
    with model.disable_adapter():
        assert torch.equal(_logits(model, RETAIN), logits_before)  # ...and switching it off is exact

    folder = merger.unlearn(_fresh(classifier), FORGET, RETAIN, layers=[1], output_dir=tmp_path / "adapter", **QUICK)
    from peft import PeftModel
    from safetensors import safe_open

    with safe_open(folder / "adapter_model.safetensors", "pt") as handle:
        keys = list(handle.keys())
    assert keys and all(".encoder.layer.1." in k for k in keys)
    record = json.loads((folder / "hf_sta_unlearning.json").read_text())
    assert record["layers"] == ["bert.encoder.layer.1"] and record["steps"] == 4
    assert record["trainable_parameters"] == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    reloaded = PeftModel.from_pretrained(_fresh(classifier), folder).eval()  # oracle: the written folder
    again = merger.unlearn(_fresh(classifier), FORGET, RETAIN, layers=[1], **QUICK)  # same seed, same run
    torch.testing.assert_close(_logits(reloaded, RETAIN), _logits(again, RETAIN), rtol=0, atol=1e-6)


def test_auto_layers_follow_the_scores_and_targets_resolve(merger, classifier):
    model = merger.unlearn("ft", FORGET, RETAIN, forget_loss="prior", **QUICK)
    record = merger.last_unlearning
    scores = record["sensitivity"]["scores"]
    assert list(scores) == ["bert.encoder.layer.0", "bert.encoder.layer.1", "bert.pooler.dense", "classifier"]
    expected = [name for name, s in scores.items() if s > 1] or [max(scores, key=scores.get)]
    assert record["layers"] == expected
    assert math.isclose(sum(record["sensitivity"]["forget_share"].values()), 1.0, rel_tol=1e-9)
    adapted = {
        layer_of(n.split("base_model.model.")[1].split(".lora_")[0])
        for n, _ in model.named_parameters()
        if "lora_" in n
    }
    assert adapted == set(expected)
    top = merger.unlearn(None, FORGET, RETAIN, layers=1, **QUICK)  # the base as target, top-1 layer
    assert len(merger.last_unlearning["layers"]) == 1 and top.peft_config["default"].r == 16


def test_early_stop_when_the_forget_metric_reaches_the_goal(merger):
    values = iter([0.9, 0.8, 0.6, 0.5, 0.4])
    merger.unlearn("ft", FORGET, RETAIN, layers=[0], eval_fn=lambda model: next(values), goal=0.65,
                   **{**QUICK, "max_steps": 50})  # fmt: skip
    record = merger.last_unlearning
    assert record["goal_reached"] and record["steps"] == 4  # metric 0.9 (step 0), 0.8 (2), 0.6 (4) <= 0.65
    assert [h["forget_metric"] for h in record["history"]] == [0.9, 0.8, 0.6]


def test_clear_errors(merger, classifier, tmp_path):
    from transformers import LlamaForCausalLM

    with pytest.raises(ConfigError, match="forget_data 'forget' is empty"):
        merger.unlearn("ft", FORGET.select([]), RETAIN, **QUICK)
    with pytest.raises(ConfigError, match="retain_data 'retain' is empty"):
        merger.unlearn("ft", FORGET, RETAIN.select([]), **QUICK)
    with pytest.raises(ConfigError, match="retain data 'retain' example 3 is also in the forget data"):
        merger.unlearn("ft", FORGET, RETAIN.select([0, 1, 2]).add_item(FORGET[5]), **QUICK)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "llama")
    with pytest.raises(CheckpointError, match="unlearn target .* has no tensor 'bert.embeddings"):
        merger.unlearn(tmp_path / "llama", FORGET, RETAIN, **QUICK)
    with pytest.raises(CheckpointError, match="unlearn target"):
        merger.unlearn(LlamaForCausalLM(tiny_llama_config()), FORGET, RETAIN, **QUICK)
    with pytest.raises(ConfigError, match="layer 'encoder.layer.7' is not a candidate"):
        merger.unlearn("ft", FORGET, RETAIN, layers=["encoder.layer.7"], **QUICK)
    with pytest.raises(ConfigError, match="unknown option.*rnak"):
        merger.unlearn("ft", FORGET, RETAIN, rnak=4, **QUICK)
    with pytest.raises(ConfigError, match="forget_loss must be one of"):
        UnlearnConfig(forget_loss="kl")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(FileExistsError):  # refused before any training
        merger.unlearn("ft", FORGET, RETAIN, output_dir=tmp_path / "taken", **QUICK)


class _Stack(nn.Module):
    """Residual blocks over 4 features; the forget inputs live in features 0-1, the retained ones in 2-3. Block
    ``sensitive`` only reads and writes features 0-1, the others only 2-3: by construction the forget data's Taylor
    importance sits in that block (and the head) only, the retained data's never in it."""

    def __init__(self, sensitive: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            for index, block in enumerate(self.blocks):
                mask = torch.zeros(4, 4)
                lanes = slice(0, 2) if index == sensitive else slice(2, 4)
                mask[lanes, lanes] = 1
                block.weight.mul_(mask)
                block.bias.zero_()

    def forward(self, x):
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(x)


def _lane_batches(lanes: slice, seed: int, count: int = 3) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        x = torch.zeros(5, 4)
        x[:, lanes] = torch.randn(5, 2, generator=generator)
        batches.append({"x": x, "labels": torch.randint(0, 3, (5,), generator=generator)})
    return batches


def _loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["labels"])


def _brute_force_shares(model, batches) -> dict[str, float]:
    """Oracle: per-batch gradients by ``torch.autograd.grad``, ``sum |theta| * mean_j |g_j|`` per layer, normalised."""
    layers = {"blocks.0": [], "blocks.1": [], "blocks.2": [], "head": []}
    for name, param in model.named_parameters():
        layers[layer_of(name.rsplit(".", 1)[0])].append(param)
    params = [p for group in layers.values() for p in group]
    mean_abs = [torch.zeros_like(p) for p in params]
    for batch in batches:
        grads = torch.autograd.grad(_loss(model, batch), params)
        for total, grad in zip(mean_abs, grads):
            total += grad.abs() / len(batches)
    taylor = {id(p): float((p.detach().abs() * g).sum()) for p, g in zip(params, mean_abs)}
    mass = {layer: sum(taylor[id(p)] for p in group) for layer, group in layers.items()}
    return {layer: value / sum(mass.values()) for layer, value in mass.items()}


@pytest.mark.parametrize("sensitive", [0, 2])
def test_sensitivity_finds_the_layer_made_sensitive_and_matches_autograd(sensitive):
    torch.manual_seed(3)
    model = _Stack(sensitive)
    forget, retain = _lane_batches(slice(0, 2), 1), _lane_batches(slice(2, 4), 2)
    result = layer_sensitivity(model, [(forget, _loss)], [(retain, _loss)])
    assert list(result.scores) == ["blocks.0", "blocks.1", "blocks.2", "head"] == list(candidate_layers(model))
    expected_forget, expected_retain = _brute_force_shares(model, forget), _brute_force_shares(model, retain)
    for layer in result.scores:
        assert math.isclose(result.forget_share[layer], expected_forget[layer], rel_tol=1e-5, abs_tol=1e-12)
        assert math.isclose(result.retain_share[layer], expected_retain[layer], rel_tol=1e-5, abs_tol=1e-12)
    block = f"blocks.{sensitive}"
    assert result.retain_share[block] == 0.0 and result.forget_share[block] > 0.1
    assert result.ranked()[0] == block
    assert choose_layers(1, list(result.scores), result) == [block]
    assert block in choose_layers("auto", list(result.scores), result)
    assert not {f"blocks.{i}" for i in range(3) if i != sensitive} & set(
        choose_layers("auto", list(result.scores), result)
    )
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # gradients freed


def test_forget_terms_against_closed_forms():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    p = logits.softmax(-1)
    uniform = torch.full((3,), 1 / 3)
    expected_uniform = sum(float((uniform * (uniform / p[i]).log()).sum()) for i in range(2)) / 2
    assert math.isclose(float(forget_term("uniform", logits)), expected_uniform, rel_tol=1e-6)
    prior = label_prior(torch.tensor([0, 0, 2, 2, 2, -100]), 3)
    assert torch.equal(prior, torch.tensor([0.4, 0.0, 0.6]))
    expected_prior = sum(
        sum(float(prior[c] * (prior[c] / p[i, c]).log()) for c in range(3) if prior[c] > 0) for i in range(2)
    ) / 2  # fmt: skip
    assert math.isclose(float(forget_term("prior", logits, prior=prior)), expected_prior, rel_tol=1e-6)
    assert float(forget_term("prior", torch.log(prior.clamp_min(1e-30)).expand(2, 3), prior=prior)) < 1e-6  # at q
    assert float(forget_term("ascent", None, loss=torch.tensor(1.25))) == -1.25


def _pairwise_auc(members, nonmembers) -> float:
    wins = sum((m < n) + 0.5 * (m == n) for m in members for n in nonmembers)
    return float(wins) / (len(members) * len(nonmembers))


def test_membership_attack_against_brute_force():
    generator = torch.Generator().manual_seed(0)
    members = (torch.rand(37, generator=generator) * 4).round() / 4  # ties on purpose
    nonmembers = (torch.rand(23, generator=generator) * 4 + 0.5).round() / 4
    assert math.isclose(membership_auc(members, nonmembers), _pairwise_auc(members.tolist(), nonmembers.tolist()))
    best = max(
        0.5 * (float((members <= t).double().mean()) + float((nonmembers > t).double().mean()))
        for t in torch.cat([members, nonmembers]).tolist()
    )
    assert math.isclose(membership_attack_accuracy(members, nonmembers), max(0.5, best))
    same = torch.ones(10)
    assert membership_auc(same, same) == 0.5 and membership_attack_accuracy(same, same) == 0.5
    assert membership_auc(torch.zeros(3), torch.ones(4)) == 1.0  # every member has the lower loss


@pytest.mark.parametrize("forget_loss", ["uniform", "ascent"])
def test_dataloader_inputs_and_forget_losses(merger, classifier, forget_loss):
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    def loader(rows):
        return DataLoader(rows.rename_column("label", "labels"), batch_size=8, collate_fn=default_data_collator)

    target = _fresh(classifier)
    logits_before = _logits(target, FORGET)
    model = merger.unlearn(target, loader(FORGET), {"a": loader(RETAIN)}, layers=[0], forget_loss=forget_loss,
                           learning_rate=0.05, **QUICK)  # fmt: skip
    record = merger.last_unlearning
    assert record["steps"] == 4 and record["examples_touched"]["forget_training"] == 24  # 4 batches of 8, 24 rows
    assert not torch.equal(_logits(model, FORGET), logits_before)
    with pytest.raises(ConfigError, match="retain data 'a' example 0 is also in the forget data"):
        merger.unlearn(_fresh(classifier), loader(FORGET), {"a": loader(FORGET)}, **QUICK)


def test_module_target_matches_a_base_that_stores_non_persistent_buffers(classifier):
    from transformers import BertForSequenceClassification

    base = BertForSequenceClassification.from_pretrained(classifier / "base")
    position_ids = base.bert.embeddings.position_ids
    state = {**base.state_dict(), "bert.embeddings.position_ids": position_ids}  # as MiniLM's file stores it
    assert "bert.embeddings.position_ids" not in base.state_dict()
    merger = STAMerger.from_pretrained(state, {"ft": classifier / "ft"})
    model = merger.unlearn(_fresh(classifier), FORGET, RETAIN, layers=[0], **QUICK)
    assert merger.last_unlearning["layers"] == ["bert.encoder.layer.0"] and model.peft_config["default"].r == 16


def test_training_mode_survives_an_eval_fn_that_switches_to_eval(merger):
    modes = []

    def eval_fn(model):  # like a scorer: leaves the model in eval mode
        modes.append(model.training)
        model.eval()
        return 1.0

    merger.unlearn("ft", FORGET, RETAIN, layers=[0], eval_fn=eval_fn, **{**QUICK, "max_steps": 6})
    assert len(modes) == 4 and all(modes[1:])  # after steps 2, 4, 6: still in training mode (dropout on)
