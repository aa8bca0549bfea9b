"""Importance: the calibration loop against a brute-force autograd loop, save/load, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_sta import STAMerger
from hf_sta.errors import CheckpointError, ConfigError
from tests.conftest import run_processes

ROOT = Path(__file__).resolve().parents[1]


def _classification_dataset(num_rows: int = 12, seq_len: int = 7, seed: int = 0):
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (num_rows, seq_len), generator=generator)
    labels = torch.randint(0, 2, (num_rows,), generator=generator)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "label": labels.tolist()}
    )


def _brute_force(model_dir: Path, dataset, micro_batch_size: int, metric: str, base_dir: Path) -> dict:
    """Oracle: per micro-batch, backward on a fresh copy of the model, |theta * g| (or g^2 / |tau * g|), mean."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    model.eval()
    base = load_file(base_dir / "model.safetensors")
    totals: dict[str, torch.Tensor] = {}
    batches = 0
    for start in range(0, len(dataset), micro_batch_size):
        rows = dataset[start : start + micro_batch_size]
        model.zero_grad()
        output = model(
            input_ids=torch.tensor(rows["input_ids"]),
            attention_mask=torch.tensor(rows["attention_mask"]),
            labels=torch.tensor(rows["label"]),
        )
        output.loss.backward()
        batches += 1
        for name, param in model.named_parameters():
            if not name.startswith("bert."):
                continue
            key = name[len("bert.") :]
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            if metric == "taylor":
                score = (param.detach() * grad).abs()
            elif metric == "taylor_delta":
                score = ((param.detach() - base[key]) * grad).abs()
            else:
                score = grad**2
            totals[key] = totals.get(key, 0) + score
    return {key: value / batches for key, value in totals.items()}


@pytest.mark.parametrize(
    ("metric", "micro_batch_size"), [("taylor", 1), ("taylor", 4), ("fisher", 3), ("taylor_delta", 2)]
)
def test_importance_matches_brute_force_autograd(bert_checkpoints, metric, micro_batch_size):
    dataset = _classification_dataset()
    merger = STAMerger.from_pretrained(bert_checkpoints.base, bert_checkpoints.finetuned)
    scores = merger.compute_importance(
        "news", dataset, metric=metric, num_samples=None, micro_batch_size=micro_batch_size, show_progress=False
    )
    expected = _brute_force(
        bert_checkpoints.finetuned["news"], dataset, micro_batch_size, metric, bert_checkpoints.base
    )
    assert sorted(scores.keys()) == sorted(merger.task_vectors["news"].keys())
    assert scores.micro_batches == -(-len(dataset) // micro_batch_size)
    assert scores.num_samples == len(dataset)
    for key in scores.keys():
        torch.testing.assert_close(scores[key], expected[key], rtol=1e-5, atol=1e-9, msg=key)
    # the task never touches the pooler? it does (CLS pooling) -- but every parameter has a score either way
    assert all(scores[key].shape == merger.task_vectors["news"].shape(key) for key in scores.keys())


def test_num_samples_takes_the_first_rows(bert_checkpoints):
    dataset = _classification_dataset(num_rows=12)
    merger = STAMerger.from_pretrained(bert_checkpoints.base, bert_checkpoints.finetuned)
    first = merger.compute_importance("news", dataset, num_samples=5, micro_batch_size=1, show_progress=False)
    again = merger.compute_importance(
        "news", dataset.select(range(5)), num_samples=None, micro_batch_size=1, show_progress=False
    )
    assert first.num_samples == 5 and first.micro_batches == 5
    key = "encoder.layer.0.attention.self.key.weight"
    torch.testing.assert_close(first[key], again[key])


def test_magnitude_needs_no_data(bert_checkpoints):
    merger = STAMerger.from_pretrained(bert_checkpoints.base, bert_checkpoints.finetuned)
    scores = merger.compute_importance("topic", metric="magnitude")
    key = "encoder.layer.1.intermediate.dense.weight"
    torch.testing.assert_close(scores[key], merger.task_vectors["topic"][key].abs())


def test_causal_lm_from_raw_text_uses_next_token_loss(llama_checkpoints):
    """Causal LMs get labels = input_ids; the oracle computes the same loss by hand."""
    from datasets import Dataset
    from transformers import LlamaForCausalLM

    ids = torch.randint(1, 95, (4, 6), generator=torch.Generator().manual_seed(1))
    dataset = Dataset.from_dict({"input_ids": ids.tolist()})
    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    model = LlamaForCausalLM.from_pretrained(llama_checkpoints.finetuned["math"])
    scores = merger.compute_importance(
        "math",
        dataset,
        micro_batch_size=2,
        num_samples=None,
        show_progress=False,
        model=model,
        collate_fn=lambda rows: {
            "input_ids": torch.tensor([r["input_ids"] for r in rows]),
            "labels": torch.tensor([r["input_ids"] for r in rows]),
        },
    )
    oracle = LlamaForCausalLM.from_pretrained(llama_checkpoints.finetuned["math"])
    totals = {}
    for start in (0, 2):
        oracle.zero_grad()
        logits = oracle(input_ids=ids[start : start + 2]).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[start : start + 2, 1:].reshape(-1)
        )
        loss.backward()
        for name, param in oracle.named_parameters():
            totals[name] = totals.get(name, 0) + (param.detach() * param.grad).abs() / 2
    for key in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight", "model.norm.weight"):
        torch.testing.assert_close(scores[key], totals[key], rtol=1e-4, atol=1e-9)


def test_save_load_roundtrip_and_model_hash(tmp_path, bert_checkpoints):
    dataset = _classification_dataset(num_rows=4)
    merger = STAMerger.from_pretrained(bert_checkpoints.base, bert_checkpoints.finetuned)
    scores = merger.compute_importance("news", dataset, micro_batch_size=2, show_progress=False)
    path = merger.save_importance("news", tmp_path / "news.safetensors")

    other = STAMerger.from_pretrained(bert_checkpoints.base, bert_checkpoints.finetuned)
    loaded = other.load_importance("news", path)
    assert loaded.metric == "taylor" and loaded.num_samples == 4 and loaded.micro_batches == 2
    assert loaded.model_hash == merger.task_vectors["news"].model_hash
    assert loaded.dataset_fingerprint == dataset._fingerprint
    for key in scores.keys():
        assert torch.equal(loaded[key], scores[key])
    with pytest.raises(CheckpointError, match="computed on another model"):
        other.load_importance("sentiment", path)
    with pytest.raises(FileNotFoundError):
        other.load_importance("news", tmp_path / "missing.safetensors")


def test_bad_calibration_inputs(bert_checkpoints):
    from datasets import Dataset

    merger = STAMerger.from_pretrained(bert_checkpoints.base, bert_checkpoints.finetuned)
    with pytest.raises(ValueError, match="empty"):
        merger.compute_importance("news", _classification_dataset().select([]), show_progress=False)
    no_labels = Dataset.from_dict({"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1, 1]]})
    with pytest.raises(ValueError, match="no 'label' or 'labels' column.*loss_fn"):
        merger.compute_importance("news", no_labels, show_progress=False)
    with pytest.raises(ConfigError, match="Unknown task 'nope'"):
        merger.compute_importance("nope", no_labels)
    with pytest.raises(ValueError, match="Unknown importance metric 'taylr'"):
        merger.compute_importance("news", no_labels, metric="taylr")
    with pytest.raises(ValueError, match="needs calibration data"):
        merger.compute_importance("news", None)

    def nan_after_two(model, batch):
        nan_after_two.calls += 1
        loss = model(**batch).loss
        return loss * float("nan") if nan_after_two.calls == 3 else loss

    nan_after_two.calls = 0
    with pytest.raises(FloatingPointError, match="batch 2"):
        merger.compute_importance(
            "news", _classification_dataset(), micro_batch_size=1, loss_fn=nan_after_two, show_progress=False
        )

    class NanBackward(torch.autograd.Function):
        """Identity forward, NaN backward: a finite loss with non-finite gradients."""

        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")

    def nan_gradients(model, batch):
        return NanBackward.apply(model(**batch).loss)

    with pytest.raises(FloatingPointError, match="Non-finite gradients at calibration batch 0"):
        merger.compute_importance("news", _classification_dataset(), loss_fn=nan_gradients, show_progress=False)


def test_sta_merge_without_importance_says_how(bert_checkpoints):
    merger = STAMerger.from_pretrained(bert_checkpoints.base, bert_checkpoints.finetuned)
    with pytest.raises(ConfigError, match=r"compute_importance\(task, calibration_data\)"):
        merger.merge(method="sta")


@pytest.mark.slow
def test_two_processes_give_the_same_importance(tmp_path, bert_checkpoints):
    """2 gloo processes split the data (the script checks the world size); the reduced scores equal one process's."""
    script = ROOT / "tests" / "scripts" / "distributed_importance.py"
    outputs = {}
    for processes in (1, 2):
        out = tmp_path / f"importance-{processes}.safetensors"
        finetuned = bert_checkpoints.finetuned["news"]
        result = run_processes(processes, script, bert_checkpoints.base, finetuned, out, processes)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[processes] = load_file(out)
    assert set(outputs[1]) == set(outputs[2])
    for key in outputs[1]:
        torch.testing.assert_close(outputs[2][key], outputs[1][key], rtol=1e-5, atol=1e-10, msg=key)
