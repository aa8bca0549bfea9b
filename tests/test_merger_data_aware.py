"""Data-aware merges end to end: statistics measured by the merger, merged by the engine, checked against oracles."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from hf_sta import STAMerger
from hf_sta.errors import ConfigError

LAYER = "encoder.layer.0.attention.self.query"


def _padded_dataset(num_rows: int = 10, seq_len: int = 6, seed: int = 0):
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (num_rows, seq_len), generator=generator)
    lengths = torch.randint(2, seq_len + 1, (num_rows,), generator=generator)
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    labels = torch.randint(0, 2, (num_rows,), generator=generator)
    return Dataset.from_dict(
        {"input_ids": (ids * mask).tolist(), "attention_mask": mask.tolist(), "label": labels.tolist()}
    )


def _layer_inputs(model_dir, dataset) -> torch.Tensor:
    """Oracle inputs of LAYER in the fine-tuned model: one forward per row, unpadded tokens only."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    captured = []
    module = model.bert.get_submodule(LAYER)
    handle = module.register_forward_hook(lambda mod, args, out: captured.append(args[0].detach()))
    with torch.no_grad():
        for row in dataset:
            length = sum(row["attention_mask"])
            model(input_ids=torch.tensor([row["input_ids"][:length]]))
    handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in captured])


@pytest.fixture
def merger(bert_checkpoints):
    return STAMerger.from_pretrained(bert_checkpoints.base, bert_checkpoints.finetuned)


def test_regmean_alpha_1_is_least_squares_on_each_tasks_inputs(merger, bert_checkpoints, tmp_path):
    data = {task: _padded_dataset(seed=index) for index, task in enumerate(merger.tasks)}
    for task in merger.tasks:
        merger.compute_activation_statistics(
            task, data[task], num_samples=None, micro_batch_size=4, show_progress=False
        )
    merged = merger.merge(method="regmean", alpha=1.0).state_dict()
    # min_W sum_t ||X_t W^T - X_t W_t^T||^2 / n_t  (per-token mean Grams): lstsq on the stacked, scaled inputs
    rows, targets = [], []
    for task in merger.tasks:
        inputs = _layer_inputs(bert_checkpoints.finetuned[task], data[task])
        weight = merger.base.get_tensor(f"{LAYER}.weight") + merger.task_vectors[task].get(f"{LAYER}.weight")
        scale = inputs.shape[0] ** -0.5
        rows.append(inputs * scale)
        targets.append(inputs @ weight.T * scale)
    expected = torch.linalg.lstsq(torch.cat(rows).double(), torch.cat(targets).double()).solution.T.float()
    torch.testing.assert_close(merged[f"{LAYER}.weight"], expected, atol=2e-4, rtol=1e-3)
    # tensors without a Gram (biases, LayerNorm, embeddings) average the fine-tunes
    key = "encoder.layer.0.attention.output.LayerNorm.weight"
    mean_tau = torch.stack([merger.task_vectors[t].get(key) for t in merger.tasks]).mean(0)
    torch.testing.assert_close(merged[key], merger.base.get_tensor(key) + mean_tau)


def test_statistics_travel_with_the_result_and_reload(merger, bert_checkpoints, tmp_path):
    for task in merger.tasks:
        merger.compute_activation_statistics(task, _padded_dataset(), num_samples=None, show_progress=False)
    folder = merger.merge(method="regmean", output_dir=tmp_path / "out")
    assert sorted(p.name for p in (folder / "statistics").iterdir()) == sorted(
        f"{t}.safetensors" for t in merger.tasks
    )
    again = STAMerger.from_pretrained(bert_checkpoints.base, bert_checkpoints.finetuned)
    for task in again.tasks:
        again.load_activation_statistics(task, folder / "statistics" / f"{task}.safetensors")
    first = merger.merge(method="regmean").state_dict()
    second = again.merge(method="regmean").state_dict()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)


def test_missing_statistics_name_the_task_and_the_call(merger):
    merger.compute_activation_statistics("news", _padded_dataset(), num_samples=4, show_progress=False)
    with pytest.raises(ConfigError, match=r"regmean.*sentiment, topic.*compute_activation_statistics"):
        merger.merge(method="regmean")
    with pytest.raises(ConfigError, match=r"fisher.*news.*metric='fisher'"):
        merger.merge(method="fisher")
    merger.compute_importance("news", _padded_dataset(), num_samples=4, show_progress=False)  # taylor, not fisher
    with pytest.raises(ConfigError, match=r"fisher.*news"):
        merger.merge(method="fisher")
    with pytest.raises(ValueError, match="needs calibration data for task 'news'"):
        merger.compute_activation_statistics("news", None)


def test_fisher_merge_is_the_closed_form_on_the_stored_fisher(merger):
    for index, task in enumerate(merger.tasks):
        merger.compute_importance(
            task, _padded_dataset(seed=index), metric="fisher", micro_batch_size=1, num_samples=None,
            show_progress=False,
        )  # fmt: skip
    merged = merger.merge(method="fisher", eps=1e-12).state_dict()
    for key in ("encoder.layer.0.attention.self.query.weight", "embeddings.LayerNorm.bias"):
        fisher = torch.stack([merger.importance[t][key] for t in merger.tasks]).clamp(min=1e-12)
        theta = torch.stack([merger.base.get_tensor(key) + merger.task_vectors[t].get(key) for t in merger.tasks])
        expected = (fisher * theta).sum(0) / fisher.sum(0)
        torch.testing.assert_close(merged[key], expected, atol=1e-5, rtol=1e-4)


class _PointwiseNet(torch.nn.Module):
    """3x3 conv -> pointwise (1x1) conv -> pooled linear head: RegMean's linear map is the pointwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.point = torch.nn.Conv2d(6, 5, 1)
        self.head = torch.nn.Linear(5, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.point(torch.relu(self.stem(images)))).mean((2, 3)))


def test_regmean_pointwise_conv_is_least_squares_over_positions():
    torch.manual_seed(0)
    base = _PointwiseNet()
    finetuned = {}
    for task in ("a", "b"):
        model = _PointwiseNet()
        model.load_state_dict({k: v + 0.3 * torch.randn_like(v) for k, v in base.state_dict().items()})
        finetuned[task] = model
    images = {task: torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(i)) for i, task in enumerate("ab")}
    merger = STAMerger.from_pretrained(base.state_dict(), {t: m.state_dict() for t, m in finetuned.items()})
    for task in merger.tasks:
        loader = torch.utils.data.DataLoader(images[task], batch_size=3)
        merger.compute_activation_statistics(
            task, loader, model=finetuned[task], num_samples=None, show_progress=False
        )
    merged = merger.merge(method="regmean", alpha=1.0)
    rows, targets = [], []
    for task in merger.tasks:  # per-position channel vectors entering `point`, equal weight per task
        model = finetuned[task]
        inputs = torch.relu(model.stem(images[task])).detach().movedim(1, -1).reshape(-1, 6)
        scale = inputs.shape[0] ** -0.5
        rows.append(inputs * scale)
        targets.append(inputs @ model.point.weight.detach()[:, :, 0, 0].T * scale)
    expected = torch.linalg.lstsq(torch.cat(rows).double(), torch.cat(targets).double()).solution.T.float()
    assert merged["point.weight"].shape == (5, 6, 1, 1)
    torch.testing.assert_close(merged["point.weight"][:, :, 0, 0], expected, atol=2e-4, rtol=1e-3)
    # the 3x3 conv has no Gram: the average of the fine-tunes
    mean_stem = torch.stack([finetuned[t].stem.weight.detach() for t in "ab"]).mean(0)
    torch.testing.assert_close(merged["stem.weight"], mean_stem)
