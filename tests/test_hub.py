"""push_to_hub against the local Hub-protocol server, with the real huggingface_hub client."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError

from hf_sta import STAMerger
from hf_sta.errors import ConfigError
from tests.conftest import load_state_dict


def test_push_merge_and_download_it_back(tmp_path, local_hub, llama_checkpoints):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    model = merger.merge(method="ties", density=0.5, scaling=0.9)
    commit = merger.push_to_hub("local-user/merged-llama", commit_message="merge three tasks")
    assert "merged-llama" in commit.commit_url
    assert local_hub.is_lfs("local-user/merged-llama", "model.safetensors")

    folder = snapshot_download("local-user/merged-llama", cache_dir=tmp_path / "cache")
    pushed = load_state_dict(folder)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(pushed[key], value, rtol=0, atol=0)
    saved = merger.save_pretrained(tmp_path / "local")
    assert {p.name for p in saved.iterdir()} == {p.name for p in Path(folder).iterdir()} - {".gitattributes"}


def test_push_forget_as_pr(tmp_path, local_hub, llama_checkpoints):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    merger.forget("code", method="negation", scaling=0.5)
    merger.push_to_hub("local-user/forgot", private=True)
    commit = merger.push_to_hub("local-user/forgot", create_pr=True, commit_message="again")
    assert commit.pr_url is None or "refs/pr" in commit.pr_revision or commit.pr_num is not None


def test_upload_failure_surfaces_and_keeps_nothing_half_done(tmp_path, local_hub, llama_checkpoints):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    merger.merge()
    local_hub.fail_next_commits(n=5, status=500)
    with pytest.raises(HfHubHTTPError):
        merger.push_to_hub("local-user/broken")
    assert "model.safetensors" not in local_hub.repos.get("local-user/broken", {}).get("main", {})


def test_nothing_to_push(local_hub, llama_checkpoints):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    with pytest.raises(ConfigError, match="merge"):
        merger.push_to_hub("local-user/x")


def test_pushed_card_metadata_and_importance_plot(tmp_path, local_hub, llama_checkpoints):
    from huggingface_hub import ModelCard

    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    for task in merger.tasks:
        merger.compute_importance(task, metric="magnitude")
    merger.merge(method="sta", density=0.3)
    merger.eval_results = [
        {
            "task_type": "text-generation",
            "dataset_type": "demo",
            "dataset_name": "demo",
            "metric_type": "accuracy",
            "metric_value": 0.5,
        }
    ]
    merger.push_to_hub("local-user/sta-card")
    folder = Path(snapshot_download("local-user/sta-card", cache_dir=tmp_path / "cache"))
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers"
    assert "hf-sta" in card.data.tags and "sta" in card.data.tags
    assert card.data.eval_results[0].metric_value == 0.5
    assert (folder / "importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Selective Task Arithmetic" in card.text
    assert (folder / "hf_sta_config.yaml").is_file()
