"""hf_sta.fusion: heterogeneous sources (two BERT widths, a Llama + PEFT LoRA read through answer words, a plain
nn.Module) fused by AKF / simple fusion. Oracles: each source's own forward pass, closed-form sampling
probabilities, brute-force pooling loops, a reloaded checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_sta.errors import CheckpointError, ConfigError
from hf_sta.fusion import (
    FusedMultiTaskModel,
    FusionTrainingArguments,
    ModuleSource,
    MultiTaskSampler,
    evaluate_fusion,
    train_fusion,
)
from hf_sta.fusion.card import render_fused_card
from hf_sta.fusion.config import FusionConfig
from hf_sta.fusion.sources import pool
from tests.conftest import perturb_, tiny_bert_config, tiny_llama_config

WORDS = (
    "good bad great awful movie film the a is was positive negative sports tech game match phone chip "
    "team win lost fast slow love hate boring fun score goal app code"
).split()
TEXTS = ["good movie", "the film was awful", "team win the match", "fast phone chip", "boring slow game", "love it"]


def word_tokenizer(specials: list[str], words: list[str], template: str | None):
    """A word-level ``PreTrainedTokenizerFast`` built offline (no files downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*specials, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(s, vocab[s]) for s in specials[2:]]
        )
    names = dict(pad_token=specials[0], unk_token=specials[1])
    if template:
        names.update(cls_token=specials[2], sep_token=specials[3])
    else:
        names.update(eos_token=specials[2])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **names)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Folders: BERT (h=32, 2 labels), a wider BERT (h=48, 3 labels), a Llama LoRA adapter (+ its base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification, LlamaForCausalLM

    root = tmp_path_factory.mktemp("fusion-sources")
    bert_tok = word_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]"], WORDS, "[CLS] $A [SEP]")
    llama_tok = word_tokenizer(["<pad>", "<unk>", "</s>"], list(reversed(WORDS)), None)  # other ids, no specials
    folders = {}
    for index, (task, width, labels) in enumerate([("sentiment", 32, 2), ("topic", 48, 3)]):
        torch.manual_seed(index)
        model = BertForSequenceClassification(
            tiny_bert_config(hidden_size=width, num_labels=labels, vocab_size=len(bert_tok), num_hidden_layers=3)
        )
        model.save_pretrained(root / task)
        bert_tok.save_pretrained(root / task)
        folders[task] = root / task
    torch.manual_seed(5)
    base = LlamaForCausalLM(tiny_llama_config(vocab_size=len(llama_tok), head_dim=8, pad_token_id=0))
    base.save_pretrained(root / "llama-base")
    llama_tok.save_pretrained(root / "llama-base")
    base = LlamaForCausalLM.from_pretrained(root / "llama-base")  # so the adapter records the folder as its base
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    perturb_(peft_model, scale=0.3, seed=7, skip=("base_layer", "embed", "norm", "mlp", "lm_head", "k_proj", "o_proj"))
    peft_model.save_pretrained(root / "polarity")
    folders["polarity"] = root / "polarity"
    return folders


@pytest.fixture(scope="module")
def stance_adapter(sources) -> Path:
    """A second LoRA adapter of the polarity adapter's base (other weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base_dir = sources["polarity"].parent / "llama-base"
    peft_model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base_dir), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    )
    perturb_(
        peft_model, scale=0.3, seed=11, skip=("base_layer", "embed", "norm", "mlp", "lm_head", "k_proj", "o_proj")
    )
    peft_model.save_pretrained(base_dir.parent / "stance")
    return base_dir.parent / "stance"


LABEL_WORDS = {"polarity": ["positive", "negative"]}
PROMPTS = {"polarity": "{text} is"}


def fused(sources, **kwargs) -> FusedMultiTaskModel:
    return FusedMultiTaskModel.from_pretrained(
        dict(sources), label_words=LABEL_WORDS, prompts=PROMPTS, fusion_dim=16, num_heads=2, components=2, **kwargs
    )


def own_logits(folder: Path, task: str, texts: list[str]) -> torch.Tensor:
    """Oracle: the source model on its own, through transformers/PEFT only."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if task != "polarity":
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        with torch.no_grad():
            return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    from peft import PeftModel

    base_dir = folder.parent / "llama-base"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folder).eval()
    answers = [tokenizer(" " + w, add_special_tokens=False).input_ids[0] for w in LABEL_WORDS["polarity"]]
    rows = []
    with torch.no_grad():
        for text in texts:  # one at a time: no padding at all
            ids = tokenizer(PROMPTS["polarity"].format(text=text), return_tensors="pt").input_ids
            rows.append(model(input_ids=ids).logits[0, -1, answers])
    return torch.stack(rows)


def test_pool_matches_loops():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # right, left, no padding
    for b in range(3):
        kept = [hidden[b, i] for i in range(5) if mask[b, i]]
        torch.testing.assert_close(pool(hidden, mask, "mean")[b], sum(kept) / len(kept))
        torch.testing.assert_close(pool(hidden, mask, "last")[b], kept[-1], rtol=0, atol=0)
    torch.testing.assert_close(pool(hidden, mask, "first"), hidden[:, 0], rtol=0, atol=0)


@pytest.mark.parametrize("fusion", ["akf", "concat"])
def test_untrained_fusion_reproduces_every_source(sources, fusion):
    model = fused(sources, fusion=fusion).eval()
    out = model(texts=TEXTS)
    assert set(out.task_logits) == {"sentiment", "topic", "polarity"}
    for task, folder in sources.items():
        expected = own_logits(folder, task, TEXTS)
        exact = task != "polarity"  # the oracle runs unpadded, one text at a time
        torch.testing.assert_close(out.task_logits[task], expected, **({"rtol": 0, "atol": 0} if exact else {}))


def test_left_padded_decoder_reads_as_unpadded(tmp_path):
    """GPT-2 (absolute positions: a shifted position changes the output) left-padded: position ids count real
    tokens, so every text is read as it is alone. Oracle: GPT-2 on each text unpadded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = word_tokenizer(["<pad>", "<unk>", "</s>"], WORDS, None)
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=16, n_layer=2, n_head=2, pad_token_id=0)
    gpt2 = GPT2LMHeadModel(config).eval()
    model = FusedMultiTaskModel.from_pretrained(
        {"polarity": gpt2}, tokenizers={"polarity": tokenizer}, label_words=LABEL_WORDS, components=2, fusion_dim=16,
        num_heads=2,
    ).eval()  # fmt: skip
    assert (model.sources["polarity"].tokenize(TEXTS)["attention_mask"][:, 0] == 0).any()  # left padding happens
    answers = [tokenizer(" " + w, add_special_tokens=False).input_ids[0] for w in LABEL_WORDS["polarity"]]
    with torch.no_grad():
        expected = torch.stack([gpt2(**tokenizer(text, return_tensors="pt")).logits[0, -1, answers] for text in TEXTS])
    torch.testing.assert_close(model(texts=TEXTS, task="polarity").logits, expected, rtol=1e-5, atol=1e-5)


def test_one_source_identity_fusion_is_exactly_its_head(sources):
    model = FusedMultiTaskModel.from_pretrained({"topic": sources["topic"]}, fusion_dim=16, num_heads=2).eval()
    torch.testing.assert_close(
        model(texts=TEXTS, task="topic").logits, own_logits(sources["topic"], "topic", TEXTS), rtol=0, atol=0
    )


def test_source_options_set_how_a_source_reads_text(sources, tmp_path):
    """Oracle: the BERT source run by transformers on the texts cut to 6 characters, without [CLS]/[SEP]."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    options = {"topic": {"add_special_tokens": False, "max_chars": 6}}
    model = FusedMultiTaskModel.from_pretrained(
        {"topic": sources["topic"]}, source_options=options, fusion_dim=16, num_heads=2
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(sources["topic"])
    oracle = AutoModelForSequenceClassification.from_pretrained(sources["topic"]).eval()
    cut = [text[:6].strip() for text in TEXTS]
    with torch.no_grad():
        expected = oracle(**tokenizer(cut, add_special_tokens=False, padding=True, return_tensors="pt")).logits
        with_specials = oracle(**tokenizer(cut, padding=True, return_tensors="pt")).logits
    assert not torch.allclose(expected, with_specials)
    torch.testing.assert_close(model(texts=TEXTS, task="topic").logits, expected, rtol=0, atol=0)
    loaded = FusedMultiTaskModel.from_pretrained(model.save_pretrained(tmp_path / "options"))
    torch.testing.assert_close(loaded(texts=TEXTS, task="topic").logits, expected, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="source_options.*'topic'.*padding_side"):
        FusedMultiTaskModel.from_pretrained({"topic": sources["topic"]}, source_options={"topic": {"padding_side": 1}})
    with pytest.raises(ConfigError, match="nope"):
        FusedMultiTaskModel.from_pretrained({"topic": sources["topic"]}, source_options={"nope": {"max_chars": 5}})


def test_adapters_of_one_base_share_one_copy_of_it(sources, stance_adapter, tmp_path):
    """Two LoRA adapters of one Llama: one PeftModel, one base; outputs exactly those of separate copies (oracle:
    share_bases=False), whichever source ran last; shipped and reloaded, still shared and exact."""
    folders = {"polarity": sources["polarity"], "stance": stance_adapter, "topic": sources["topic"]}
    kwargs = dict(
        label_words={"polarity": LABEL_WORDS["polarity"], "stance": LABEL_WORDS["polarity"]},
        prompts={"polarity": PROMPTS["polarity"], "stance": PROMPTS["polarity"]}, components=2, fusion_dim=16,
        num_heads=2,
    )  # fmt: skip
    shared = FusedMultiTaskModel.from_pretrained(folders, **kwargs).eval()
    separate = FusedMultiTaskModel.from_pretrained(folders, share_bases=False, **kwargs).eval()
    assert shared.sources["polarity"].model is shared.sources["stance"].model
    assert separate.sources["polarity"].model is not separate.sources["stance"].model
    base = sum(p.numel() for n, p in separate.sources["stance"].named_parameters() if "lora_" not in n)
    assert separate.num_parameters() - shared.num_parameters() == base
    assert not any(p.requires_grad for p in shared.sources.parameters())
    expected = separate(texts=TEXTS).task_logits
    assert not torch.equal(expected["polarity"], expected["stance"])
    for order in (["stance", "polarity"], ["polarity", "stance"]):
        for task in order:
            torch.testing.assert_close(shared(texts=TEXTS, task=task).logits, expected[task], rtol=0, atol=0)
    folder = shared.save_pretrained(tmp_path / "shipped", ship_sources=True)
    assert {p.name for p in (folder / "sources").iterdir()} == {"polarity", "stance", "topic"}
    assert (folder / "sources" / "stance" / "adapter_config.json").is_file()
    loaded = FusedMultiTaskModel.from_pretrained(folder)
    assert loaded.sources["polarity"].model is loaded.sources["stance"].model
    for task, logits in loaded(texts=TEXTS).task_logits.items():
        torch.testing.assert_close(logits, expected[task], rtol=0, atol=0)


def _train_data():
    sentiment = {"text": TEXTS * 3, "label": [0, 1, 0, 0, 1, 0] * 3}
    topic = {"text": TEXTS * 3, "label": [0, 0, 1, 2, 1, 0] * 3}
    polarity = {"text": TEXTS * 3, "label": [0, 1, 0, 0, 1, 0] * 3}
    return {"sentiment": sentiment, "topic": topic, "polarity": polarity}


def test_training_changes_only_the_fusion_module(sources):
    model = fused(sources)
    before = {k: v.clone() for k, v in model.sources.state_dict().items()}
    fusion_before = {k: v.clone() for k, v in model.fusion.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("fusion.") for n in trainable)
    assert model.num_parameters(only_trainable=True) == sum(p.numel() for p in model.fusion.parameters())
    data = _train_data()
    start = evaluate_fusion(model, data)
    args = FusionTrainingArguments(max_steps=60, per_device_train_batch_size=6, learning_rate=1e-2, disable_tqdm=True)
    result = train_fusion(model, data, args, eval_data=data)
    for key, value in model.sources.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert any(not torch.equal(v, fusion_before[k]) for k, v in model.fusion.state_dict().items())
    final = result.history[-1]["eval"]
    assert sum(final.values()) > sum(start.values())  # it learned something on its training data
    assert final == evaluate_fusion(model, data) or result.best_step != args.max_steps


def test_tensor_inputs_and_cached_features_match_texts(sources):
    model = fused(sources).eval()
    by_text = model(texts=TEXTS, task="topic").logits
    tokenized = {name: source.tokenize(TEXTS) for name, source in model.sources.items()}
    torch.testing.assert_close(model(inputs=tokenized, task="topic").logits, by_text, rtol=0, atol=0)
    mixed = model(texts=TEXTS, inputs={"polarity": tokenized["polarity"]}, task="topic").logits
    torch.testing.assert_close(mixed, by_text, rtol=0, atol=0)
    torch.testing.assert_close(model(features=model.encode(TEXTS), task="topic").logits, by_text, rtol=0, atol=0)


def test_save_load_reproduces_outputs_exactly(sources, tmp_path):
    model = fused(sources)
    train_fusion(
        model, _train_data(), FusionTrainingArguments(max_steps=8, per_device_train_batch_size=4, disable_tqdm=True)
    )
    model.eval()
    expected = model(texts=TEXTS).task_logits
    folder = model.save_pretrained(tmp_path / "fused")
    assert {p.name for p in folder.iterdir()} == {"fusion_config.json", "model.safetensors", "README.md"}
    config = json.loads((folder / "fusion_config.json").read_text())
    assert config["sources"]["polarity"]["peft"] is True and config["sources"]["polarity"]["kind"] == "transformers"
    card = (folder / "README.md").read_text()
    assert all(str(path) in card.replace("\\", "") for path in sources.values())
    loaded = FusedMultiTaskModel.from_pretrained(folder)
    for task, logits in loaded(texts=TEXTS).task_logits.items():
        torch.testing.assert_close(logits, expected[task], rtol=0, atol=0)
    shipped = model.save_pretrained(tmp_path / "shipped", ship_sources=True)
    assert (shipped / "sources" / "polarity" / "adapter_config.json").is_file()
    reloaded = FusedMultiTaskModel.from_pretrained(shipped)
    torch.testing.assert_close(reloaded(texts=TEXTS, task="polarity").logits, expected["polarity"], rtol=0, atol=0)
    # a shipped source stays shipped when the loaded model is saved elsewhere (its only copy is in `shipped`)
    again = reloaded.save_pretrained(tmp_path / "again")
    spec = json.loads((again / "fusion_config.json").read_text())["sources"]["topic"]
    assert spec["shipped"] and spec["origin"] == str(sources["topic"]) and (again / "sources" / "topic").is_dir()
    shutil.rmtree(shipped)
    for task, logits in FusedMultiTaskModel.from_pretrained(again)(texts=TEXTS).task_logits.items():
        torch.testing.assert_close(logits, expected[task], rtol=0, atol=0)


def test_card_lists_hub_sources_as_base_model():
    config = FusionConfig(
        tasks=["a", "b", "c", "d"],
        num_labels={"a": 2, "b": 3, "c": 2, "d": 2},
        sources={
            "a": {
                "kind": "transformers",
                "reference": "org/minilm-sentiment",
                "class": "BertForSequenceClassification",
            },
            "b": {
                "kind": "transformers",
                "reference": "org/smollm2-topic-lora",
                "class": "LlamaForCausalLM",
                "peft": True,
            },
            "c": {"kind": "transformers", "reference": "/local/folder", "class": "BertModel"},
            "d": {"kind": "transformers", "reference": "sources/d", "shipped": True, "origin": "org/shipped-copy"},
        },
    )
    card = render_fused_card(config)
    assert card.data.base_model == ["org/minilm-sentiment", "org/smollm2-topic-lora", "org/shipped-copy"]
    assert "/local/folder" in card.text.replace("\\", "")


class TinyClassifier(nn.Module):
    """A plain module: embedding bag -> two hidden layers -> head (a stand-in for anyone's own model)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 12)
        self.layer1 = nn.Sequential(nn.Linear(12, 20), nn.Tanh())
        self.layer2 = nn.Sequential(nn.Linear(20, 20), nn.Tanh())
        self.head = nn.Linear(20, 4)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer2(self.layer1(self.embed(token_ids).mean(1))))


def hash_tokenize(texts):
    return {"token_ids": torch.tensor([[hash(w) % 40 for w in (t.split() + ["pad"] * 6)[:6]] for t in texts])}


def module_source(seed: int = 3) -> ModuleSource:
    torch.manual_seed(seed)
    return ModuleSource(
        TinyClassifier(),
        component_modules=["layer1", "layer2"],
        head_module="head",
        tokenizer=hash_tokenize,
        example_inputs=hash_tokenize(["x"]),
    )


def test_plain_module_source_through_hooks(sources, tmp_path):
    source = module_source()
    oracle = source.module(**hash_tokenize(TEXTS)).detach()
    model = FusedMultiTaskModel.from_pretrained(
        {"sentiment": sources["sentiment"], "intent": source}, fusion_dim=16, num_heads=2
    ).eval()
    assert source.component_widths == [20, 20] and source.feature_width == 20 and source.num_labels == 4
    torch.testing.assert_close(model(texts=TEXTS, task="intent").logits, oracle, rtol=0, atol=0)
    with torch.no_grad():
        model.fusion.up["intent"].weight.normal_()  # make the fused output differ from the source's
    expected = model(texts=TEXTS, task="intent").logits
    folder = model.save_pretrained(tmp_path / "with-module")
    with pytest.raises(ConfigError, match="module_sources"):
        FusedMultiTaskModel.from_pretrained(folder)
    loaded = FusedMultiTaskModel.from_pretrained(folder, module_sources={"intent": module_source(seed=99)})
    torch.testing.assert_close(loaded(texts=TEXTS, task="intent").logits, expected, rtol=0, atol=0)


def test_sampler_probabilities_closed_form():
    sizes = {"a": 100, "b": 400, "c": 25}
    total = sum(sizes.values())
    proportional = MultiTaskSampler(sizes, batch_size=4, sampling="proportional").probabilities
    uniform = MultiTaskSampler(sizes, batch_size=4, sampling="uniform").probabilities
    tempered = MultiTaskSampler(sizes, batch_size=4, sampling="temperature", temperature=2.0).probabilities
    roots = {t: n**0.5 for t, n in sizes.items()}
    for task, n in sizes.items():
        assert proportional[task] == pytest.approx(n / total)
        assert uniform[task] == pytest.approx(1 / 3)
        assert tempered[task] == pytest.approx(roots[task] / sum(roots.values()))
    stream = iter(MultiTaskSampler(sizes, batch_size=4, sampling="temperature", temperature=2.0, seed=1))
    draws = [next(stream) for _ in range(4000)]
    for task in sizes:
        assert sum(t == task for t, _ in draws) / len(draws) == pytest.approx(tempered[task], abs=0.03)
    c_rows = [i for t, rows in draws if t == "c" for i in rows]
    assert sorted(c_rows[:25]) == list(range(25))  # an epoch visits every example once


def test_clear_errors(sources, tmp_path):
    with pytest.raises(ConfigError, match="nope"):
        fused(sources, num_labels={"nope": 2})
    with pytest.raises(CheckpointError, match="'topic'.*missing-folder"):
        FusedMultiTaskModel.from_pretrained({"sentiment": sources["sentiment"], "topic": tmp_path / "missing-folder"})
    with pytest.raises(ConfigError, match="num_labels"):
        FusedMultiTaskModel.from_pretrained({"sentiment": sources["sentiment"]}, num_labels={"sentiment": 5})
    model = FusedMultiTaskModel.from_pretrained({"sentiment": sources["sentiment"], "topic": sources["topic"]})
    with pytest.raises(ConfigError, match="Unknown task 'polarity'"):
        model(texts=TEXTS, task="polarity")
    tokenized = model.sources["topic"].tokenize(TEXTS)
    with pytest.raises(ConfigError, match="not sources.*polarity|polarity.*not sources"):
        model(texts=TEXTS, inputs={"polarity": tokenized}, task="topic")
    with pytest.raises(ConfigError, match="sentiment"):
        model(inputs={"topic": tokenized}, task="topic")
    with pytest.raises(ConfigError, match="polarity"):
        train_fusion(model, {"polarity": _train_data()["polarity"]})
    with pytest.raises(CheckpointError, match="fusion_config.json"):
        FusedMultiTaskModel.from_pretrained(sources["topic"])


def test_source_lora_trains_only_lora_and_fusion(sources, tmp_path):
    """LoRA added to a BERT and to a PEFT source (beside its own, frozen, still active adapter): before training the
    outputs are exactly those without it (B = 0); only the new adapter and the fusion module train."""
    from peft import LoraConfig

    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value", "q_proj"])
    model = fused(sources, source_lora=lora)
    reference = fused(sources).eval()
    model.eval()
    for task, logits in model(texts=TEXTS).task_logits.items():
        torch.testing.assert_close(logits, reference(texts=TEXTS).task_logits[task], rtol=0, atol=0)
    frozen = {k: v.clone() for k, v in model.sources.state_dict().items() if "hf_sta_fusion" not in k}
    assert any("lora_A.default" in k for k in frozen)  # the PEFT source's own adapter is part of the frozen source
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".polarity." in n for n in trainable) and any(".topic." in n for n in trainable)
    assert all(".hf_sta_fusion." in n or n.startswith("fusion.") for n in trainable)
    args = FusionTrainingArguments(max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2, disable_tqdm=True)
    train_fusion(model, _train_data(), args)
    for key, value in model.sources.state_dict().items():
        if key in frozen:
            torch.testing.assert_close(value, frozen[key], rtol=0, atol=0)
    model.eval()
    expected = model(texts=TEXTS).task_logits
    assert not torch.equal(expected["polarity"], reference(texts=TEXTS, task="polarity").logits)
    loaded = FusedMultiTaskModel.from_pretrained(model.save_pretrained(tmp_path / "lora"))
    for task, logits in loaded(texts=TEXTS).task_logits.items():
        torch.testing.assert_close(logits, expected[task], rtol=0, atol=0)


def test_push_to_hub_ships_local_sources(sources, tmp_path, local_hub):
    model = fused(sources).eval()
    expected = model(texts=TEXTS).task_logits
    model.push_to_hub("local-user/fused")
    files = set(local_hub.repos["local-user/fused"]["main"])
    assert {"fusion_config.json", "model.safetensors", "README.md"} <= files
    assert "sources/topic/model.safetensors" in files and "sources/polarity/adapter_config.json" in files
    loaded = FusedMultiTaskModel.from_pretrained("local-user/fused")
    for task, logits in loaded(texts=TEXTS).task_logits.items():
        torch.testing.assert_close(logits, expected[task], rtol=0, atol=0)


def test_bench_fusion_tiny_runs():
    from benchmarks.bench_fusion import main, markdown

    result = main(["--tiny"])
    assert set(result["rows"]) == {"individual", "akf", "concat", "multitask_finetune"}
    assert 0 < result["rows"]["akf"]["trainable_fraction"] < 0.05
    for kind in ("akf", "concat"):  # the best validation checkpoint can be step 0: never below the sources there
        row = result["rows"][kind]
        assert sum(row["validation"].values()) >= sum(result["rows"]["individual"]["validation"].values())
    assert result["latency"]["fused_seconds"] > 0 and result["latency"]["ratio"] > 0
    assert "| akf |" in markdown(result)


def test_cached_features_train_the_same_model_as_running_the_sources(sources):
    """Oracle for the feature cache: the same seed trains the same weights whether each step runs the sources on
    the texts or reads their cached outputs (padding differs, so up to float rounding)."""
    data = _train_data()
    weights = []
    for cache in (True, False):
        model = fused(sources)
        args = FusionTrainingArguments(
            max_steps=5, per_device_train_batch_size=4, learning_rate=1e-2, cache_features=cache, disable_tqdm=True
        )
        train_fusion(model, data, args)
        weights.append(model.fusion.state_dict())
    assert any(not torch.equal(v, fused(sources).fusion.state_dict()[k]) for k, v in weights[0].items())
    for key, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][key], rtol=1e-4, atol=1e-5)
