"""The local Hub server (tests/hub_server.py) against the real ``huggingface_hub`` client, over 127.0.0.1 only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from safetensors.torch import load_file, save_file

from tests.hub_server import LocalHubServer
from tests.hub_server import local_hub as _local_hub  # noqa: F401  (registers the fixture)

REPO = "local-user/tiny-model"


def _model_folder(root: Path) -> Path:
    """A folder like the output of ``save_pretrained``: config.json, README.md and a ~1.5 MB model.safetensors."""
    folder = root / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 384}))
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- hf-sta\n---\n\n# Tiny model\n")
    generator = torch.Generator().manual_seed(0)
    weights = {"dense.weight": torch.randn(384, 1024, generator=generator), "dense.bias": torch.zeros(384)}
    save_file(weights, str(folder / "model.safetensors"))
    return folder


def test_upload_folder_then_download(local_hub: LocalHubServer, tmp_path: Path) -> None:
    api = HfApi()
    url = api.create_repo(REPO, exist_ok=True)
    assert url.repo_id == REPO and url.startswith(local_hub.endpoint)
    api.create_repo(REPO, exist_ok=True, private=False)  # a second call is harmless
    folder = _model_folder(tmp_path)

    info = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="Upload tiny model")

    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert files["model.safetensors"].__len__() > 1_000_000
    stored = local_hub.repos[REPO]["main"]
    assert {k: stored[k] for k in files} == files
    # The weights went through the LFS path (batch + PUT + verify), the small text files did not.
    assert [(u.path, u.revision) for u in local_hub.lfs_uploads] == [("model.safetensors", "main")]
    assert local_hub.is_lfs(REPO, "model.safetensors")
    assert not local_hub.is_lfs(REPO, "config.json") and not local_hub.is_lfs(REPO, "README.md")
    assert any(r.startswith("PUT /_lfs_upload/") for r in local_hub.requests)
    assert not [r for r in local_hub.requests if "xet" in r.lower()]
    assert info.oid == local_hub.history(REPO)[0].oid
    assert local_hub.history(REPO)[0].title == "Upload tiny model"

    assert sorted(api.list_repo_files(REPO)) == sorted([".gitattributes", *files])
    assert api.model_info(REPO).sha == info.oid
    assert api.file_exists(REPO, "model.safetensors") and not api.file_exists(REPO, "missing.bin")

    local_dir = snapshot_download(REPO, local_dir=tmp_path / "snapshot")
    for name, data in files.items():
        assert (Path(local_dir) / name).read_bytes() == data
    weights = load_file(str(Path(local_dir) / "model.safetensors"))
    assert weights["dense.weight"].shape == (384, 1024)

    config_path = hf_hub_download(REPO, "config.json", cache_dir=tmp_path / "cache")
    assert Path(config_path).read_bytes() == files["config.json"]
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "nope.json", cache_dir=tmp_path / "cache")


def test_create_pr_and_branch(local_hub: LocalHubServer, tmp_path: Path) -> None:
    api = HfApi()
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b'{"v": 1}', path_in_repo="config.json", repo_id=REPO)

    pr = api.upload_folder(repo_id=REPO, folder_path=_model_folder(tmp_path), create_pr=True)

    assert pr.pr_revision == "refs/pr/1" and pr.pr_num == 1
    assert local_hub.repos[REPO]["main"]["config.json"] == b'{"v": 1}'  # main untouched
    assert "model.safetensors" not in local_hub.repos[REPO]["main"]
    assert local_hub.is_lfs(REPO, "model.safetensors", revision="refs/pr/1")
    assert local_hub.lfs_uploads[-1].revision == "refs/pr/1"
    assert "model.safetensors" in api.list_repo_files(REPO, revision="refs/pr/1")
    downloaded = hf_hub_download(REPO, "config.json", revision="refs/pr/1", cache_dir=tmp_path / "cache")
    assert json.loads(Path(downloaded).read_text()) == {"model_type": "tiny", "hidden_size": 384}

    api.create_branch(REPO, branch="dev")
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="notes.txt", repo_id=REPO, revision="dev")
    assert local_hub.repos[REPO]["dev"]["notes.txt"] == b"dev"
    assert "notes.txt" not in local_hub.repos[REPO]["main"]
    refs = api.list_repo_refs(REPO, include_pull_requests=True)
    assert {b.name for b in refs.branches} == {"main", "dev"}
    assert [p.ref for p in refs.pull_requests] == ["refs/pr/1"]


def test_forced_commit_failure_raises(local_hub: LocalHubServer, tmp_path: Path) -> None:
    api = HfApi()
    api.create_repo(REPO)
    folder = _model_folder(tmp_path)
    local_hub.fail_next_commits(1)

    with pytest.raises(HfHubHTTPError) as excinfo:
        api.upload_folder(repo_id=REPO, folder_path=folder)

    assert excinfo.value.response.status_code == 500
    assert "model.safetensors" not in local_hub.repos[REPO]["main"]
    assert local_hub.lfs_uploads == []
    api.upload_folder(repo_id=REPO, folder_path=folder)  # only the next commit failed
    assert "model.safetensors" in local_hub.repos[REPO]["main"]


def test_write_without_token_is_rejected(local_hub: LocalHubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HfHubHTTPError) as excinfo:
        HfApi().create_repo(REPO)
    assert excinfo.value.response.status_code == 401
    assert REPO not in local_hub.repos


def test_explicit_endpoint(local_hub: LocalHubServer) -> None:
    """``endpoint=`` works too: a second server, addressed explicitly, gets the writes; the patched one does not."""
    with LocalHubServer() as other:
        api = HfApi(endpoint=other.endpoint, token="hf_other")
        api.create_repo("org/explicit")
        api.upload_file(path_or_fileobj=b"x" * 10, path_in_repo="weights.bin", repo_id="org/explicit")
        assert other.is_lfs("org/explicit", "weights.bin")
        assert api.list_repo_files("org/explicit") == [".gitattributes", "weights.bin"]
    assert local_hub.repos == {}
