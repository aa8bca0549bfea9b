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
    assert "hf_sta" in card.data.tags and "sta" in card.data.tags
    assert card.data.eval_results[0].metric_value == 0.5
    assert (folder / "importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Selective Task Arithmetic" in card.text
    assert (folder / "hf_sta_config.yaml").is_file()


def test_api_push_creates_the_revision_branch_like_the_cli(local_hub, llama_checkpoints):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    merger.merge(scaling=0.5)
    merger.push_to_hub("local-user/branchy", revision="v2")
    assert "model.safetensors" in local_hub.repos["local-user/branchy"]["v2"]
    assert "model.safetensors" not in local_hub.repos["local-user/branchy"]["main"]


@pytest.mark.parametrize("repo_id", ["a/b/c", "bad repo", "x" * 97 + "/y"])
def test_bad_repo_id_is_refused_before_any_work(local_hub, llama_checkpoints, repo_id):
    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    with pytest.raises(ConfigError, match="repo_id"):
        merger.push_to_hub(repo_id)  # before the check that something was merged
    assert local_hub.requests == []


def test_failed_upload_keeps_the_result_and_says_where(tmp_path, local_hub, llama_checkpoints, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    merger.merge(scaling=0.5)
    local_hub.fail_next_commits(n=5, status=500)
    with pytest.raises(HfHubHTTPError) as excinfo:
        merger.push_to_hub("local-user/kept")
    note = " ".join(getattr(excinfo.value, "__notes__", []))
    kept = Path(note.split("'")[1])
    assert "retry with `hf-sta push" in note and kept.parent.parent == tmp_path
    reloaded, expected = load_state_dict(kept), merger.merge(scaling=0.5).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in expected.items())
    local_hub.fail_next_commits(n=0)
    merger.push_to_hub("local-user/kept")  # a successful push leaves no temporary folder behind
    assert list(tmp_path.glob("hf_sta-push-*")) == [kept.parent]


def test_second_push_updates_the_repo_card(tmp_path, local_hub, llama_checkpoints):
    from huggingface_hub import HfApi, ModelCard

    merger = STAMerger.from_pretrained(llama_checkpoints.base, llama_checkpoints.finetuned)
    merger.merge(method="task_arithmetic", scaling=0.5)
    merger.push_to_hub("local-user/carded")
    card = ModelCard(local_hub.repos["local-user/carded"]["main"]["README.md"].decode())
    card.data.license = "mit"
    card.text = "\n# My notes\n\nWritten on the Hub.\n" + card.text
    HfApi().upload_file(path_or_fileobj=card.content.encode(), path_in_repo="README.md", repo_id="local-user/carded")
    merger.merge(method="ties", density=0.5)
    merger.push_to_hub("local-user/carded")
    updated = ModelCard(local_hub.repos["local-user/carded"]["main"]["README.md"].decode())
    assert updated.data.license == "mit" and "Written on the Hub." in updated.text
    assert "TIES" in updated.text and "ties" in updated.data.tags
    assert updated.text.count("<!-- hf_sta:start -->") == 1
