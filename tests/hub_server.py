"""In-process fake of the Hugging Face Hub HTTP API, for testing ``push_to_hub`` with the real ``huggingface_hub`` client.

Standard library only (plus ``pytest`` for the fixture). The server runs an ``http.server.ThreadingHTTPServer`` in a
daemon thread on ``127.0.0.1`` (random port) and keeps everything in memory. It speaks enough of the Hub protocol for
``huggingface_hub`` (>= 1.0, checked against 2.4.0) to:

- create / delete repos (``HfApi.create_repo(exist_ok=True)`` may be called any number of times),
- upload with ``create_commit`` / ``upload_file`` / ``upload_folder``: preupload ("regular" vs "lfs"), the LFS batch API
  with basic-transfer upload URLs pointing back at this server (PUT + verify), and the ndjson commit endpoint
  (``header`` / ``file`` / ``lfsFile`` / ``deletedFile`` / ``deletedFolder`` lines), ``revision=`` branches and
  ``create_pr=True`` (creates ``refs/pr/N``),
- read back: ``model_info`` / ``repo_info`` / ``repo_exists``, ``list_repo_files`` / ``list_repo_tree``,
  ``get_paths_info``, ``file_exists``, ``list_repo_refs``, ``list_repo_commits``, ``create_branch``, ``whoami``,
  ``hf_hub_download`` and ``snapshot_download`` (HEAD/GET ``/{repo_id}/resolve/{revision}/{path}``, Range supported).

The server never advertises Xet (no ``X-Xet-*`` headers, the Xet token endpoints answer 501). Note that
``huggingface_hub`` >= 1.x uploads through Xet whenever the ``hf_xet`` package is installed, without asking the server
first, so the client side must also set ``huggingface_hub.constants.HF_HUB_DISABLE_XET = True``: the ``local_hub``
fixture (and :func:`patch_huggingface_hub`) does that.

Example::

    from tests.hub_server import local_hub  # noqa: F401  (or register it in conftest.py)

    def test_push(local_hub, tmp_path):
        HfApi().create_repo("user/model")
        HfApi().upload_folder(repo_id="user/model", folder_path=tmp_path)
        assert local_hub.repos["user/model"]["main"]["config.json"] == b"{}"
        assert local_hub.is_lfs("user/model", "model.safetensors")
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

__all__ = [
    "DEFAULT_TOKEN",
    "LFS_PATTERNS",
    "HubCommit",
    "LfsUpload",
    "LocalHubServer",
    "local_hub",
    "patch_huggingface_hub",
]

#: Token the ``local_hub`` fixture exposes through ``HF_TOKEN``.
DEFAULT_TOKEN = "hf_localhubtesttoken"

#: File patterns stored through LFS, as in the ``.gitattributes`` the Hub creates with a new repo.
LFS_PATTERNS: tuple[str, ...] = (
    "*.7z",
    "*.arrow",
    "*.bin",
    "*.bz2",
    "*.ckpt",
    "*.ftz",
    "*.gguf",
    "*.gz",
    "*.h5",
    "*.joblib",
    "*.lfs.*",
    "*.mlmodel",
    "*.model",
    "*.msgpack",
    "*.npy",
    "*.npz",
    "*.onnx",
    "*.ot",
    "*.parquet",
    "*.pb",
    "*.pickle",
    "*.pkl",
    "*.pt",
    "*.pth",
    "*.rar",
    "*.safetensors",
    "*.tar",
    "*.tar.*",
    "*.tflite",
    "*.tgz",
    "*.wasm",
    "*.xz",
    "*.zip",
    "*.zst",
    "*tfevents*",
)

#: Files at least this large go through LFS whatever their name (the Hub's limit for regular git files is 10 MB).
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024

_REPO_TYPE_PLURALS = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_REPO_ACTIONS = frozenset(
    {
        "revision",
        "tree",
        "paths-info",
        "preupload",
        "commit",
        "commits",
        "refs",
        "branch",
        "xet-write-token",
        "xet-read-token",
    }
)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_WRITE_NEEDS_TOKEN = "You must be authenticated (Authorization: Bearer <token>) to write to the Hub."


def git_blob_oid(data: bytes) -> str:
    """Git object id (sha1) of a blob, as the Hub reports it for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """Content of the git-lfs pointer file that stands for an LFS object in the git tree."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _truthy(values: list[str] | None) -> bool:
    return bool(values) and values[0].lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class LfsUpload:
    """A file committed as an ``lfsFile`` (its bytes were PUT to the LFS upload URL beforehand)."""

    repo_id: str
    revision: str
    path: str
    oid: str
    size: int


@dataclass
class HubCommit:
    """One commit: an immutable snapshot of the repo's files."""

    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, bytes]
    lfs: dict[str, str]  # path -> sha256, for the files stored through LFS


@dataclass
class _Repo:
    repo_id: str
    repo_type: str
    private: bool
    created_at: str
    refs: dict[str, str] = field(default_factory=dict)  # "main", "dev", "refs/pr/1" -> commit oid
    commits: dict[str, HubCommit] = field(default_factory=dict)
    num_discussions: int = 0


@dataclass
class _Request:
    method: str
    segments: list[str]  # percent-decoded path segments
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    body: bytes
    token: str | None

    def json(self) -> Any:
        return json.loads(self.body or b"{}")


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class _HubError(Exception):
    """Raised inside a route to answer with an HTTP error (Hub style: JSON body + ``X-Error-*`` headers)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}

    def response(self) -> _Response:
        headers = {"Content-Type": "application/json", "X-Error-Message": self.message, **self.headers}
        if self.code is not None:
            headers["X-Error-Code"] = self.code
        return _Response(self.status, json.dumps({"error": self.message}).encode(), headers)


def _json(obj: Any, status: int = 200, content_type: str = "application/json") -> _Response:
    return _Response(status, json.dumps(obj).encode(), {"Content-Type": content_type})


class _Handler(BaseHTTPRequestHandler):
    """Reads one request, hands it to the owning :class:`LocalHubServer`, writes the response."""

    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every response carries a Content-Length
    timeout = 30  # idle keep-alive connections end eventually
    server: _HubHTTPServer

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        body = self._read_body()
        response = self.server.hub._handle(self.command, self.path, self.headers, body)
        self.send_response(response.status)
        for key, value in response.headers.items():
            self.send_header(key, value)
        if "Content-Length" not in response.headers:
            self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD" and response.body:
            self.wfile.write(response.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        """Silence the default stderr access log (requests are recorded in ``LocalHubServer.requests``)."""


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    hub: LocalHubServer


class LocalHubServer:
    """In-memory Hugging Face Hub speaking HTTP on ``127.0.0.1``; use as a context manager.

    Args:
        require_token_for_writes: answer 401 to write requests (create/delete repo, preupload, LFS batch, commit,
            branch) that carry no ``Authorization: Bearer`` token. Reads of private repos also need a token.
        valid_tokens: if given, only these tokens are accepted; any other token gets 401 "Invalid credentials in
            Authorization header" (on every endpoint, as on the Hub). ``None`` accepts any token.
        username: namespace of repos created without one, and the user ``whoami`` returns.
        init_gitattributes: like the Hub, start each new repo with a commit adding the default ``.gitattributes``.
            With ``False`` the initial commit is empty.
        lfs_size_threshold: files at least this large are uploaded through LFS whatever their name.

    Attributes (read them from tests; hold no lock, the data are snapshots or append-only):
        repos: ``{repo_id: {ref: {path: bytes}}}`` with refs such as ``"main"``, ``"dev"``, ``"refs/pr/1"``.
        lfs_uploads: every ``lfsFile`` committed, as :class:`LfsUpload` records, in commit order.
        lfs_objects: LFS objects received through PUT, ``{sha256: bytes}``.
        requests: ``"METHOD /path?query"`` of every request received, in order.
        errors: tracebacks of unexpected exceptions raised while handling requests (should stay empty).
    """

    def __init__(
        self,
        *,
        require_token_for_writes: bool = True,
        valid_tokens: set[str] | None = None,
        username: str = "local-user",
        init_gitattributes: bool = True,
        lfs_size_threshold: int = LFS_SIZE_THRESHOLD,
    ) -> None:
        self.require_token_for_writes = require_token_for_writes
        self.valid_tokens = valid_tokens
        self.username = username
        self.init_gitattributes = init_gitattributes
        self.lfs_size_threshold = lfs_size_threshold
        self.lfs_objects: dict[str, bytes] = {}
        self.lfs_uploads: list[LfsUpload] = []
        self.requests: list[str] = []
        self.errors: list[str] = []
        self._repos: dict[str, _Repo] = {}
        self._lock = threading.RLock()
        self._commit_counter = 0
        self._fail_commits = 0
        self._fail_status = 500
        self._httpd: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LocalHubServer:
        """Bind a random port on 127.0.0.1 and serve from a daemon thread."""
        if self._httpd is not None:
            return self
        httpd = _HubHTTPServer(("127.0.0.1", 0), _Handler)
        httpd.hub = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="LocalHubServer", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd, self._thread = None, None

    def __enter__(self) -> LocalHubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """Base URL of the server, e.g. ``"http://127.0.0.1:54321"`` (use as ``HF_ENDPOINT`` / ``endpoint=``)."""
        if self._httpd is None:
            raise RuntimeError("LocalHubServer is not running: use it as a context manager or call start().")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # ------------------------------------------------------------------ inspection / control from tests

    @property
    def repos(self) -> dict[str, dict[str, dict[str, bytes]]]:
        """Snapshot ``{repo_id: {ref: {path: bytes}}}`` of every repo at the head of every ref."""
        with self._lock:
            return {
                repo_id: {ref: dict(repo.commits[oid].files) for ref, oid in repo.refs.items()}
                for repo_id, repo in self._repos.items()
            }

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Files of ``repo_id`` at ``revision`` (a ref or a commit oid)."""
        with self._lock:
            return dict(self._commit_at(self._repo(repo_id), revision).files)

    def is_lfs(self, repo_id: str, path: str, revision: str = "main") -> bool:
        """Whether ``path`` is stored through LFS at ``revision`` (it arrived as an ``lfsFile`` commit line)."""
        with self._lock:
            return path in self._commit_at(self._repo(repo_id), revision).lfs

    def history(self, repo_id: str, revision: str = "main") -> list[HubCommit]:
        """Commits reachable from ``revision``, newest first (the last one is the repo's initial commit)."""
        with self._lock:
            repo = self._repo(repo_id)
            commit: HubCommit | None = self._commit_at(repo, revision)
            out = []
            while commit is not None:
                out.append(commit)
                commit = repo.commits[commit.parent] if commit.parent else None
            return out

    def fail_next_commits(self, n: int = 1, status: int = 500) -> None:
        """Make the next ``n`` commit requests fail with ``status`` (before touching any state).

        Only the commit endpoint is affected: ``huggingface_hub`` sends commits without retry, so the error surfaces
        at once as ``HfHubHTTPError`` (preupload / LFS calls are retried with back-off on 5xx, which would be slow).
        """
        with self._lock:
            self._fail_commits, self._fail_status = n, status

    def create_repo(self, repo_id: str, *, private: bool = False, repo_type: str = "model") -> None:
        """Create a repo directly (no HTTP), e.g. to seed a test; no-op if it exists."""
        with self._lock:
            if repo_id not in self._repos:
                self._new_repo(repo_id, repo_type, private)

    def add_commit(
        self, repo_id: str, files: Mapping[str, bytes], *, revision: str = "main", message: str = "Seed files"
    ) -> str:
        """Commit ``files`` directly (no HTTP) on ``revision``; files matching :data:`LFS_PATTERNS` count as LFS.

        Returns the new commit oid. The repo is created if needed.
        """
        with self._lock:
            self.create_repo(repo_id)
            repo = self._repos[repo_id]
            parent = self._commit_at(repo, revision if revision in repo.refs else "main")  # new branches fork main
            new_files, new_lfs = dict(parent.files), dict(parent.lfs)
            for path, data in files.items():
                new_files[path] = data
                if self._upload_mode(path, len(data), data[:512]) == "lfs":
                    new_lfs[path] = hashlib.sha256(data).hexdigest()
                    self.lfs_objects[new_lfs[path]] = data
                else:
                    new_lfs.pop(path, None)
            commit = self._make_commit(repo, parent.oid, message, "", new_files, new_lfs)
            repo.refs[revision] = commit.oid
            return commit.oid

    # ------------------------------------------------------------------ request handling

    def _handle(self, method: str, raw_path: str, headers: Mapping[str, str], body: bytes) -> _Response:
        """Entry point of the HTTP handler threads."""
        split = urlsplit(raw_path)
        self.requests.append(f"{method} {raw_path}")
        auth = headers.get("Authorization") or ""
        token = (auth[len("bearer ") :].strip() or None) if auth.lower().startswith("bearer ") else None
        request = _Request(
            method=method,
            segments=[unquote(s) for s in split.path.strip("/").split("/")] if split.path.strip("/") else [],
            query=parse_qs(split.query, keep_blank_values=True),
            headers=headers,
            body=body,
            token=token,
        )
        try:
            with self._lock:
                if token is not None and self.valid_tokens is not None and token not in self.valid_tokens:
                    raise _HubError(401, "Invalid credentials in Authorization header")
                return self._route(request)
        except _HubError as err:
            return err.response()
        except Exception:  # noqa: BLE001 - report any bug of the fake as a 500, and keep it for the test to see
            self.errors.append(traceback.format_exc())
            return _HubError(500, f"LocalHubServer crashed:\n{traceback.format_exc()}").response()

    def _route(self, req: _Request) -> _Response:
        seg, method = req.segments, req.method
        if seg[:2] == ["api", "whoami-v2"] and method == "GET":
            return self._whoami(req)
        if seg[:2] == ["api", "validate-yaml"] and method == "POST":
            return _json({"errors": [], "warnings": []})
        if seg[:2] == ["api", "telemetry"]:
            return _json({})
        if seg[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(req)
        if seg[:3] == ["api", "repos", "delete"] and method == "DELETE":
            return self._delete_repo(req)
        if len(seg) >= 3 and seg[0] == "api" and seg[1] in _REPO_TYPE_PLURALS:
            return self._repo_api(req, _REPO_TYPE_PLURALS[seg[1]], seg[2:])
        if len(seg) == 2 and seg[0] == "_lfs_upload" and method == "PUT":
            return self._lfs_put(req, seg[1])
        git_idx = next((i for i, s in enumerate(seg) if s.endswith(".git")), None)
        if git_idx is not None and seg[git_idx + 1 : git_idx + 4] == ["info", "lfs", "objects"] and method == "POST":
            repo_type, repo_id = self._split_repo_path([*seg[:git_idx], seg[git_idx][: -len(".git")]])
            action = seg[git_idx + 4 : git_idx + 5]
            if action == ["batch"]:
                return self._lfs_batch(req, repo_type, repo_id)
            if action == ["verify"]:
                return self._lfs_verify(req, repo_type, repo_id)
        if "resolve" in seg[1:] and method in ("GET", "HEAD"):
            idx = seg.index("resolve", 1)
            if len(seg) >= idx + 3:
                repo_type, repo_id = self._split_repo_path(seg[:idx])
                return self._resolve(req, repo_type, repo_id, seg[idx + 1], "/".join(seg[idx + 2 :]))
        raise _HubError(404, f"LocalHubServer: endpoint not implemented: {method} /{'/'.join(seg)}")

    @staticmethod
    def _split_repo_path(parts: list[str]) -> tuple[str, str]:
        if len(parts) > 1 and parts[0] in _REPO_TYPE_PLURALS and parts[0] != "models":
            return _REPO_TYPE_PLURALS[parts[0]], "/".join(parts[1:])
        return "model", "/".join(parts)

    def _repo_api(self, req: _Request, repo_type: str, rest: list[str]) -> _Response:
        # rest = [namespace, name, action, ...] or [name, action, ...] (legacy repos without a namespace)
        if len(rest) >= 2 and (len(rest) == 2 or rest[2] in _REPO_ACTIONS or f"{rest[0]}/{rest[1]}" in self._repos):
            repo_id, tail = f"{rest[0]}/{rest[1]}", rest[2:]
        else:
            repo_id, tail = rest[0], rest[1:]
        action, args, method = (tail[0] if tail else ""), tail[1:], req.method
        if action.startswith("xet-"):
            raise _HubError(
                501,
                "LocalHubServer does not implement Xet storage: set huggingface_hub.constants.HF_HUB_DISABLE_XET = True"
                " (the local_hub fixture does) so that the client uses LFS.",
            )
        if action == "" and method == "GET":
            return self._repo_info(req, repo_type, repo_id, "main")
        if action == "revision" and args and method == "GET":
            return self._repo_info(req, repo_type, repo_id, "/".join(args))
        if action == "tree" and args and method == "GET":
            return self._tree(req, repo_type, repo_id, args[0], "/".join(args[1:]))
        if action == "paths-info" and args and method == "POST":
            return self._paths_info(req, repo_type, repo_id, "/".join(args))
        if action == "preupload" and args and method == "POST":
            return self._preupload(req, repo_type, repo_id, "/".join(args))
        if action == "commit" and args and method == "POST":
            return self._commit(req, repo_type, repo_id, "/".join(args))
        if action == "commits" and args and method == "GET":
            return self._list_commits(req, repo_type, repo_id, "/".join(args))
        if action == "refs" and method == "GET":
            return self._refs(req, repo_type, repo_id)
        if action == "branch" and args and method in ("POST", "DELETE"):
            return self._branch(req, repo_type, repo_id, "/".join(args))
        raise _HubError(404, f"LocalHubServer: endpoint not implemented: {method} {action} on {repo_id}")

    # ------------------------------------------------------------------ helpers on the state

    def _check_write(self, req: _Request) -> None:
        if self.require_token_for_writes and req.token is None:
            raise _HubError(401, _WRITE_NEEDS_TOKEN)

    def _repo(self, repo_id: str, repo_type: str | None = None, req: _Request | None = None) -> _Repo:
        repo = self._repos.get(repo_id)
        hidden = repo is not None and repo.private and req is not None and req.token is None
        if repo is None or hidden or (repo_type is not None and repo.repo_type != repo_type):
            raise _HubError(404, "Repository not found", code="RepoNotFound")
        return repo

    def _commit_at(self, repo: _Repo, revision: str) -> HubCommit:
        if revision in repo.refs:
            return repo.commits[repo.refs[revision]]
        if revision.startswith("refs/heads/") and revision[len("refs/heads/") :] in repo.refs:
            return repo.commits[repo.refs[revision[len("refs/heads/") :]]]
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            matches = [oid for oid in repo.commits if oid.startswith(revision)]
            if len(matches) == 1:
                return repo.commits[matches[0]]
        raise _HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    def _new_repo(self, repo_id: str, repo_type: str, private: bool) -> _Repo:
        repo = _Repo(repo_id=repo_id, repo_type=repo_type, private=private, created_at=_now())
        self._repos[repo_id] = repo
        files: dict[str, bytes] = {}
        if self.init_gitattributes:
            files[".gitattributes"] = "".join(
                f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS
            ).encode()
        repo.refs["main"] = self._make_commit(repo, None, "initial commit", "", files, {}).oid
        return repo

    def _make_commit(
        self, repo: _Repo, parent: str | None, title: str, message: str, files: dict[str, bytes], lfs: dict[str, str]
    ) -> HubCommit:
        self._commit_counter += 1
        digest = hashlib.sha1(f"{repo.repo_id}\n{parent}\n{title}\n{message}\n{self._commit_counter}".encode())
        for path in sorted(files):
            digest.update(f"\n{path}\0{self._oid(files[path], lfs.get(path))}".encode())
        commit = HubCommit(digest.hexdigest(), parent, title, message, _now(), files, lfs)
        repo.commits[commit.oid] = commit
        return commit

    @staticmethod
    def _oid(data: bytes, sha256: str | None) -> str:
        """Git oid of a file: blob sha1 of the content, or of the LFS pointer for LFS files."""
        return git_blob_oid(lfs_pointer(sha256, len(data)) if sha256 else data)

    def _url(self, repo: _Repo) -> str:
        return f"{self.endpoint}/{_URL_PREFIXES.get(repo.repo_type, '')}{repo.repo_id}"

    def _upload_mode(self, path: str, size: int, sample: bytes) -> str:
        name = path.rsplit("/", 1)[-1]
        if size >= self.lfs_size_threshold or b"\0" in sample:
            return "lfs"
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in LFS_PATTERNS):
            return "lfs"
        return "regular"

    def _file_entry(self, commit: HubCommit, path: str) -> dict[str, Any]:
        data, sha256 = commit.files[path], commit.lfs.get(path)
        entry: dict[str, Any] = {"type": "file", "oid": self._oid(data, sha256), "size": len(data), "path": path}
        if sha256:
            entry["lfs"] = {"oid": sha256, "size": len(data), "pointerSize": len(lfs_pointer(sha256, len(data)))}
        return entry

    @staticmethod
    def _folders(commit: HubCommit) -> set[str]:
        return {path.rsplit("/", i)[0] for path in commit.files for i in range(1, path.count("/") + 1)}

    def _folder_entry(self, commit: HubCommit, folder: str) -> dict[str, Any]:
        listing = "\n".join(f"{p}\0{self._oid(d, commit.lfs.get(p))}" for p, d in sorted(commit.files.items()))
        oid = hashlib.sha1(f"tree {folder}\n{listing}".encode()).hexdigest()
        return {"type": "directory", "oid": oid, "size": 0, "path": folder}

    # ------------------------------------------------------------------ routes: account and repos

    def _whoami(self, req: _Request) -> _Response:
        if req.token is None:
            raise _HubError(401, "Invalid username or password.")
        return _json(
            {
                "type": "user",
                "id": "0" * 24,
                "name": self.username,
                "fullname": self.username,
                "email": f"{self.username}@localhost",
                "emailVerified": True,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
            }
        )

    def _create_repo(self, req: _Request) -> _Response:
        self._check_write(req)
        payload = req.json()
        name, organization = payload.get("name"), payload.get("organization")
        if not name:
            raise _HubError(400, "Missing repo name")
        repo_id = f"{organization or self.username}/{name}"
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIXES:
            raise _HubError(400, f"Unsupported repo type {repo_type!r}")
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        if repo_id in self._repos:
            url = self._url(self._repos[repo_id])
            body = {"error": f"You already created this {repo_type} repo", "url": url}
            return _Response(409, json.dumps(body).encode(), {"Content-Type": "application/json"})
        repo = self._new_repo(repo_id, repo_type, private)
        return _json({"url": self._url(repo), "name": repo_id, "id": repo_id})

    def _delete_repo(self, req: _Request) -> _Response:
        self._check_write(req)
        payload = req.json()
        repo_id = f"{payload.get('organization') or self.username}/{payload.get('name')}"
        self._repo(repo_id, payload.get("type") or "model", req)
        del self._repos[repo_id]
        return _json({})

    def _repo_info(self, req: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo = self._repo(repo_id, repo_type, req)
        commit = self._commit_at(repo, revision)
        with_blobs = _truthy(req.query.get("blobs"))
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                entry = self._file_entry(commit, path)
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if "lfs" in entry:
                    lfs = entry["lfs"]
                    sibling["lfs"] = {"size": lfs["size"], "sha256": lfs["oid"], "pointerSize": lfs["pointerSize"]}
            siblings.append(sibling)
        return _json(
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0] if "/" in repo_id else None,
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            }
        )

    def _tree(self, req: _Request, repo_type: str, repo_id: str, revision: str, path: str) -> _Response:
        commit = self._commit_at(self._repo(repo_id, repo_type, req), revision)
        path = path.strip("/")
        recursive = _truthy(req.query.get("recursive"))
        folders = self._folders(commit)
        if path and path not in folders:
            if path in commit.files:
                return _json([self._file_entry(commit, path)])
            raise _HubError(404, f"{path} does not exist on {revision}", code="EntryNotFound")
        prefix = f"{path}/" if path else ""

        def listed(item: str) -> bool:
            return item.startswith(prefix) and (recursive or "/" not in item[len(prefix) :])

        entries = [self._folder_entry(commit, f) for f in sorted(folders) if listed(f)]
        entries += [self._file_entry(commit, p) for p in sorted(commit.files) if listed(p)]
        return _json(entries)

    def _paths_info(self, req: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        commit = self._commit_at(self._repo(repo_id, repo_type, req), revision)
        if (req.headers.get("Content-Type") or "").startswith("application/json"):
            paths = req.json().get("paths", [])
        else:
            paths = parse_qs(req.body.decode(), keep_blank_values=True).get("paths", [])
        folders = self._folders(commit)
        out = []
        for raw in [paths] if isinstance(paths, str) else paths:
            path = raw.strip("/")
            if path in commit.files:
                out.append(self._file_entry(commit, path))
            elif path in folders:
                out.append(self._folder_entry(commit, path))
        return _json(out)

    def _refs(self, req: _Request, repo_type: str, repo_id: str) -> _Response:
        repo = self._repo(repo_id, repo_type, req)
        branches = [
            {"name": ref, "ref": f"refs/heads/{ref}", "targetCommit": oid}
            for ref, oid in repo.refs.items()
            if not ref.startswith("refs/")
        ]
        prs = [
            {"name": ref, "ref": ref, "targetCommit": oid}
            for ref, oid in repo.refs.items()
            if ref.startswith("refs/pr/")
        ]
        body: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
        if _truthy(req.query.get("include_prs")):
            body["pullRequests"] = prs
        return _json(body)

    def _branch(self, req: _Request, repo_type: str, repo_id: str, branch: str) -> _Response:
        self._check_write(req)
        repo = self._repo(repo_id, repo_type, req)
        if req.method == "DELETE":
            if branch not in repo.refs or branch == "main":
                raise _HubError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
            del repo.refs[branch]
            return _json({})
        if branch in repo.refs:
            raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
        starting_point = req.json().get("startingPoint") or "main"
        repo.refs[branch] = self._commit_at(repo, starting_point).oid
        return _json({})

    def _list_commits(self, req: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        self._repo(repo_id, repo_type, req)
        return _json(
            [
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "authors": [{"user": self.username}],
                    "date": c.date,
                }
                for c in self.history(repo_id, revision)
            ]
        )

    # ------------------------------------------------------------------ routes: upload

    def _preupload(self, req: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        self._check_write(req)
        repo = self._repo(repo_id, repo_type, req)
        commit = self._commit_at(repo, revision)
        files = []
        for item in req.json().get("files", []):
            path, size = item["path"], int(item["size"])
            mode = self._upload_mode(path, size, base64.b64decode(item.get("sample") or ""))
            oid = None
            if path in commit.files:  # lets the client skip unchanged files (sha256 for LFS, blob sha1 otherwise)
                data = commit.files[path]
                oid = commit.lfs[path] if path in commit.lfs else git_blob_oid(data)
            files.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return _json({"files": files, "commitOid": commit.oid})

    def _lfs_batch(self, req: _Request, repo_type: str, repo_id: str) -> _Response:
        self._check_write(req)
        repo = self._repo(repo_id, repo_type, req)
        payload = req.json()
        if payload.get("operation") != "upload":
            raise _HubError(422, "LocalHubServer only implements LFS uploads (downloads go through /resolve)")
        verify_url = f"{self.endpoint}/{_URL_PREFIXES[repo.repo_type]}{repo.repo_id}.git/info/lfs/objects/verify"
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not _SHA256_RE.match(oid) or not isinstance(size, int):
                objects.append({"oid": str(oid), "size": int(size or 0), "error": {"code": 422, "message": "bad oid"}})
            elif oid in self.lfs_objects and len(self.lfs_objects[oid]) == size:
                objects.append({"oid": oid, "size": size})  # already stored: no actions, the client skips it
            else:
                actions = {
                    "upload": {"href": f"{self.endpoint}/_lfs_upload/{oid}?size={size}", "header": {}},
                    "verify": {"href": verify_url, "header": {}},
                }
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        return _json(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, 200, "application/vnd.git-lfs+json"
        )

    def _lfs_put(self, req: _Request, oid: str) -> _Response:
        # Plays the presigned storage URL: no Authorization header is sent here by the client.
        expected_size = req.query.get("size", [None])[0]
        if expected_size is not None and int(expected_size) != len(req.body):
            raise _HubError(400, f"LFS upload size mismatch: expected {expected_size}, got {len(req.body)}")
        if hashlib.sha256(req.body).hexdigest() != oid:
            raise _HubError(400, "LFS upload sha256 mismatch")
        self.lfs_objects[oid] = req.body
        return _Response(200, b"", {"ETag": f'"{hashlib.md5(req.body).hexdigest()}"'})

    def _lfs_verify(self, req: _Request, repo_type: str, repo_id: str) -> _Response:
        self._check_write(req)
        self._repo(repo_id, repo_type, req)
        payload = req.json()
        oid, size = payload.get("oid"), payload.get("size")
        if oid not in self.lfs_objects or len(self.lfs_objects[oid]) != size:
            raise _HubError(404, f"LFS object {oid} (size {size}) was not uploaded")
        return _json({"success": True})

    def _commit(self, req: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        if self._fail_commits > 0:
            self._fail_commits -= 1
            raise _HubError(self._fail_status, f"Injected failure (LocalHubServer.fail_next_commits) on {repo_id}")
        self._check_write(req)
        repo = self._repo(repo_id, repo_type, req)
        base = self._commit_at(repo, revision)
        create_pr = _truthy(req.query.get("create_pr"))
        lines = [json.loads(line) for line in req.body.decode().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line.get("key") == "header"), {})
        parent_commit = header.get("parentCommit")
        if parent_commit and not base.oid.startswith(parent_commit):
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")

        files, lfs = dict(base.files), dict(base.lfs)
        new_lfs_uploads = []
        for line in lines:
            key, value = line.get("key"), line.get("value") or {}
            if key == "header":
                continue
            path = str(value.get("path", "")).strip("/")
            if key == "file":
                content = value.get("content", "")
                files[path] = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                lfs.pop(path, None)
            elif key == "lfsFile":
                oid = value.get("oid")
                if oid not in self.lfs_objects:
                    raise _HubError(400, f"LFS object {oid} for {path} was not uploaded before the commit")
                data = self.lfs_objects[oid]
                if value.get("size") is not None and int(value["size"]) != len(data):
                    raise _HubError(400, f"LFS object {oid} has size {len(data)}, commit says {value['size']}")
                files[path], lfs[path] = data, oid
                new_lfs_uploads.append((path, oid, len(data)))
            elif key == "deletedFile":
                if path not in files:
                    raise _HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                del files[path]
                lfs.pop(path, None)
            elif key == "deletedFolder":
                doomed = [p for p in files if p.startswith(f"{path}/")]
                if not doomed:
                    raise _HubError(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
                for p in doomed:
                    del files[p]
                    lfs.pop(p, None)
            else:
                raise _HubError(400, f"LocalHubServer: unsupported commit operation {key!r}")

        commit = self._make_commit(
            repo, base.oid, header.get("summary") or "Upload files", header.get("description") or "", files, lfs
        )
        pr_url = None
        if create_pr:
            repo.num_discussions += 1
            target_ref = f"refs/pr/{repo.num_discussions}"
            pr_url = f"{self._url(repo)}/discussions/{repo.num_discussions}"
        else:
            target_ref = revision if revision in repo.refs else revision.removeprefix("refs/heads/")
            if target_ref not in repo.refs:  # `revision` resolved to a commit oid, which cannot move
                raise _HubError(400, f"Cannot commit to {revision}: not a branch", code="RevisionNotFound")
        repo.refs[target_ref] = commit.oid
        self.lfs_uploads.extend(LfsUpload(repo_id, target_ref, p, oid, size) for p, oid, size in new_lfs_uploads)
        return _json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._url(repo)}/commit/{commit.oid}",
                "commitMessage": commit.title,
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            }
        )

    # ------------------------------------------------------------------ routes: download

    def _resolve(self, req: _Request, repo_type: str, repo_id: str, revision: str, path: str) -> _Response:
        repo = self._repo(repo_id, repo_type, req)
        commit = self._commit_at(repo, revision)
        if path not in commit.files:
            raise _HubError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        data, sha256 = commit.files[path], commit.lfs.get(path)
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{sha256 or git_blob_oid(data)}"',
        }
        if sha256:
            headers.update({"X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data))})
        status, body = 200, data
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", (req.headers.get("Range") or "").strip())
        if match and (match[1] or match[2]):
            total = len(data)
            start, end = (
                (int(match[1]), int(match[2] or total - 1)) if match[1] else (total - int(match[2]), total - 1)
            )
            if start >= total or start > end:
                headers["Content-Range"] = f"bytes */{total}"
                return _Response(416, b"", headers)
            end = min(end, total - 1)
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        headers["Content-Length"] = str(len(body))
        return _Response(status, body, headers)


# ---------------------------------------------------------------------- client-side patching and pytest fixture


def patch_huggingface_hub(
    monkeypatch: pytest.MonkeyPatch, endpoint: str, hf_home: str | Path, token: str | None = DEFAULT_TOKEN
) -> None:
    """Point an already imported ``huggingface_hub`` (and ``transformers``, if imported) at ``endpoint``.

    ``huggingface_hub`` reads its environment once, at import time, into ``huggingface_hub.constants`` (and a few
    module-level copies), so setting ``HF_ENDPOINT`` in a running process is not enough: this patches the constants
    themselves, with ``monkeypatch`` so that everything is restored at teardown. It also
    - turns offline mode off (``HF_HUB_OFFLINE=1`` in the environment would block every request),
    - disables Xet (the client would otherwise upload through Xet whenever ``hf_xet`` is installed),
    - puts ``HF_HOME`` / caches / the token file under ``hf_home`` and sets ``HF_TOKEN`` to ``token``,
    - disables telemetry, bypasses proxies for 127.0.0.1 and resets the shared HTTP client and the HfApi instances
      cached at module level (``huggingface_hub.hf_api.api``, ``transformers.utils.hub._hf_api``).
    """
    from urllib.parse import urlsplit as _urlsplit

    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    hf_home = Path(hf_home)
    hub_cache = hf_home / "hub"
    hub_cache.mkdir(parents=True, exist_ok=True)
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HUGGINGFACE_CO_STAGING"):
        monkeypatch.delenv(key, raising=False)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)

    host = _urlsplit(endpoint).hostname or "127.0.0.1"
    for name, value in {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(constants.HF_URL_HOSTS | {host}),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
    }.items():
        monkeypatch.setattr(constants, name, value, raising=False)
    # Module-level copies taken with `from ..constants import X` at import time.
    for module_name, attr, value in (
        ("huggingface_hub.utils._cache_manager", "HF_HUB_CACHE", str(hub_cache)),
        ("huggingface_hub.utils._cache_assets", "HF_ASSETS_CACHE", str(hf_home / "assets")),
        ("huggingface_hub.utils._git_credential", "ENDPOINT", endpoint),
    ):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attr):
            monkeypatch.setattr(module, attr, value)
    if hasattr(_http, "_HUB_ORIGINS") and hasattr(_http, "_url_origin"):  # redirects kept on the Hub keep auth
        monkeypatch.setattr(_http, "_HUB_ORIGINS", frozenset(_http._HUB_ORIGINS | {_http._url_origin(endpoint)}))
    # `huggingface_hub.create_repo`, `.upload_folder`, ... are bound methods of this module-level HfApi instance.
    hf_api_module = sys.modules.get("huggingface_hub.hf_api")
    if hf_api_module is not None and hasattr(hf_api_module, "api"):
        monkeypatch.setattr(hf_api_module.api, "endpoint", endpoint)
    # transformers caches one HfApi (with its endpoint) in `transformers.utils.hub._hf_api`.
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
        monkeypatch.setattr(transformers_hub, "_hf_api", None)
    _http.close_session()  # the next request builds a client that sees NO_PROXY


def _reset_cached_clients() -> None:
    """Drop HTTP connections and HfApi instances that may still point at a stopped server."""
    http = sys.modules.get("huggingface_hub.utils._http")
    if http is not None:
        http.close_session()
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
        transformers_hub._hf_api = None  # created during the test, after the patch: not restored by monkeypatch


@pytest.fixture(name="local_hub")  # explicit name: importable as `local_hub as _local_hub` without ruff F811
def local_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHubServer]:
    """A running :class:`LocalHubServer`, with ``huggingface_hub`` pointed at it (see :func:`patch_huggingface_hub`).

    ``HF_TOKEN`` is :data:`DEFAULT_TOKEN`; ``HF_HOME`` and the hub cache are under ``tmp_path / "hf_home"``. Everything
    is restored, and the server stopped, at teardown.
    """
    with LocalHubServer() as hub:
        patch_huggingface_hub(monkeypatch, hub.endpoint, tmp_path / "hf_home")
        try:
            yield hub
        finally:
            _reset_cached_clients()
