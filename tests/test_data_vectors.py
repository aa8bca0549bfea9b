"""Data vectors: sites ship task vectors (and importance) instead of data; the merger combines the files."""

import pytest
import torch

from hf_sta import STAMerger, TaskVector
from hf_sta.errors import CheckpointError, ConfigError
from tests.conftest import load_state_dict


@pytest.fixture()
def shipped(tmp_path, llama_checkpoints):
    """What each site sends: tau_s with its sample count, and magnitude importance."""
    files = {}
    for index, (site, folder) in enumerate(llama_checkpoints.finetuned.items()):
        vector = TaskVector.from_pretrained(llama_checkpoints.base, folder, name=site)
        path = vector.save(tmp_path / f"{site}.safetensors", metadata={"num_samples": str(100 * (index + 1))})
        site_merger = STAMerger.from_pretrained(llama_checkpoints.base, {site: folder})
        site_merger.compute_importance(site, metric="magnitude")
        files[site] = (path, site_merger.save_importance(site, tmp_path / f"{site}.importance.safetensors"))
    return files


def test_uniform_and_sample_weighted_merges(shipped, llama_checkpoints):
    merger = STAMerger.from_task_vectors(llama_checkpoints.base, {s: p for s, (p, _) in shipped.items()})
    fts = {s: load_state_dict(p) for s, p in llama_checkpoints.finetuned.items()}
    key = "model.layers.0.self_attn.v_proj.weight"
    uniform = merger.merge(method="average").state_dict()[key]
    torch.testing.assert_close(uniform, torch.stack([ft[key] for ft in fts.values()]).mean(0))
    weighted = merger.merge(method="average", weights="num_samples").state_dict()[key]
    expected = sum(w * fts[s][key] for s, w in zip(fts, (100, 200, 300))) / 600
    torch.testing.assert_close(weighted, expected)


def test_sta_with_shipped_importance(shipped, llama_checkpoints):
    merger = STAMerger.from_task_vectors(
        llama_checkpoints.base,
        {s: p for s, (p, _) in shipped.items()},
        importance={s: i for s, (_, i) in shipped.items()},
    )
    reference = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    for task in reference.tasks:
        reference.compute_importance(task, metric="magnitude")
    key = "model.layers.1.mlp.up_proj.weight"
    ours = merger.merge(method="sta", density=0.3).state_dict()[key]
    theirs = reference.merge(method="sta", density=0.3).state_dict()[key]
    torch.testing.assert_close(ours, theirs)


def test_shipped_files_are_checked(tmp_path, shipped, llama_checkpoints, bert_checkpoints):
    path, importance = shipped["code"]
    with pytest.raises(CheckpointError, match="which the base does not have"):
        STAMerger.from_task_vectors(bert_checkpoints.base, {"code": path})
    with pytest.raises(CheckpointError, match="computed on another model"):
        STAMerger.from_task_vectors(
            llama_checkpoints.base, {"math": shipped["math"][0]}, importance={"math": importance}
        )
    plain = tmp_path / "plain.safetensors"
    TaskVector.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned["code"]).save(plain)
    merger = STAMerger.from_task_vectors(llama_checkpoints.base, {"code": plain})
    with pytest.raises(ConfigError, match="records no num_samples"):
        merger.merge(weights="num_samples")


def test_in_memory_task_vector_of_another_base_keeps_its_own_delta(tmp_path, llama_checkpoints):
    """A task vector built against theta_0 and merged onto another model adds theta_t - theta_0, not
    theta_t - other."""
    merged = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned).merge(
        output_dir=tmp_path / "merged"
    )
    vector = TaskVector.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned["code"], name="code")
    result = STAMerger.from_task_vectors(merged, {"code": vector}).merge(scaling=-1.0)
    base = load_state_dict(llama_checkpoints.base)
    code = load_state_dict(llama_checkpoints.finetuned["code"])
    start = load_state_dict(merged)
    key = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(result.state_dict()[key], start[key] - (code[key] - base[key]))
