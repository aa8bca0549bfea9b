"""The one way hf_sta uploads a folder to the Hub: ``STAMerger.push_to_hub``, ``hf-sta push``, a recipe's
``push_to_hub:`` section, the Trainer callback and the fused model all call :func:`push_folder` (or
:func:`save_and_push`, which builds the folder first).

``push_folder`` checks the repo id (``huggingface_hub.utils.validate_repo_id``), creates the repo when missing and the
``revision`` branch when missing, and uploads the folder as one commit. When the folder's ``README.md`` is an hf_sta
card and the repo already has a card at that revision, the repo's card is updated (its own text and metadata kept, the
hf_sta section and metadata replaced) instead of overwritten.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .layout import CARD_NAME

logger = logging.getLogger(__name__)

__all__ = ["check_repo_id", "push_folder", "save_and_push"]

# Folders a local snapshot may hold that are not part of the model (huggingface_hub's download metadata, git).
_SKIPPED_FOLDERS = (".cache", ".git")


def check_repo_id(repo_id: Any, what: str = "repo_id") -> str:
    """``repo_id`` if it is a valid Hub model repo id (``user/name`` or ``org/name``); else :class:`ConfigError`."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ConfigError(f"{what} must be a Hub repo id like 'user/name', got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ConfigError(f"{what}: {' '.join(str(err).split())}") from None
    return repo_id


def _remote_card(api: Any, repo_id: str, revision: str | None) -> Any:
    """The repo's ``README.md`` at ``revision`` as a ``ModelCard``, or ``None`` when it has none."""
    from huggingface_hub import ModelCard, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    try:
        if not api.file_exists(repo_id, CARD_NAME, revision=revision, repo_type="model"):
            return None
        path = hf_hub_download(repo_id, CARD_NAME, revision=revision, token=api.token, repo_type="model")
    except (EntryNotFoundError, RevisionNotFoundError):
        return None
    return ModelCard.load(path, ignore_metadata_errors=True)


def _operations(api: Any, folder: Path, repo_id: str, revision: str | None) -> list[Any]:
    """One ``CommitOperationAdd`` per file of ``folder``; an hf_sta card is merged into the repo's existing one."""
    from huggingface_hub import CommitOperationAdd, ModelCard

    from .card import SECTION_START, update_card

    operations = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or relative.parts[0] in _SKIPPED_FOLDERS:
            continue
        content: str | bytes | Path = path
        if relative.as_posix() == CARD_NAME and SECTION_START in path.read_text(errors="replace"):
            existing = _remote_card(api, repo_id, revision)
            if existing is not None:
                content = update_card(existing, ModelCard.load(path)).content.encode()
        operations.append(CommitOperationAdd(path_in_repo=relative.as_posix(), path_or_fileobj=content))
    return operations


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    revision: str | None = None,
):
    """Upload ``folder`` (an hf_sta output or any model folder) to the model repo ``repo_id`` as one commit.

    The repo is created when missing (``private`` applies then; an existing repo keeps its visibility), the
    ``revision`` branch too (unless ``create_pr``: the pull request then targets ``revision``). Returns the
    ``CommitInfo``; Hub errors propagate.
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Folder to push '{folder}' does not exist or is not a folder.")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    commit = api.create_commit(
        repo_id,
        _operations(api, folder, repo_id, revision),
        commit_message=commit_message or f"Upload {folder.name} with hf_sta",
        create_pr=create_pr,
        revision=revision,
        repo_type="model",
    )
    logger.info("Pushed %s to %s", folder, commit.pr_url or commit.commit_url)
    return commit


def save_and_push(
    save: Callable[[Path], Path], repo_id: str, *, output_dir: str | os.PathLike | None = None, **push_options: Any
):
    """``save(folder)`` then :func:`push_folder`. With ``output_dir`` the folder is kept there; without it, it is
    built in a temporary folder that is removed once the upload succeeded and kept when it failed (the error says
    where, and how to retry with ``hf-sta push``)."""
    check_repo_id(repo_id)
    if output_dir is not None:
        return push_folder(save(Path(output_dir)), repo_id, **push_options)
    tmp_root = Path(tempfile.mkdtemp(prefix="hf_sta-push-"))
    try:
        folder = save(tmp_root / repo_id.split("/")[-1])
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise
    try:
        commit = push_folder(folder, repo_id, **push_options)
    except Exception as err:
        note = f"The result was kept in '{folder}'; retry with `hf-sta push {folder} {repo_id}`."
        if hasattr(err, "add_note"):
            err.add_note(note)
        else:  # pragma: no cover - Python 3.10
            logger.error("%s", note)
        raise
    shutil.rmtree(tmp_root, ignore_errors=True)
    return commit
