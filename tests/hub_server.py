"""A small Hugging Face Hub-compatible HTTP server for the tests (standard library only).

The Hub cannot be reached from the project's machines, and nothing installable implements its upload API
(docs/environment.md §4). This server implements the routes that the real `huggingface_hub` client uses for
`create_repo`, `upload_folder`, `upload_file`, `create_commit`, `hf_hub_download`, `snapshot_download`,
`list_repo_files`, `list_repo_commits`, `ModelCard.push_to_hub` / `ModelCard.load`, transformers'
`push_to_hub` and `from_pretrained(repo_id)`, for model, dataset and space repos.

What it models, and what it does not:

- Every commit gets a 40-hex sha; a branch (`main` by default) points to its latest commit; any full sha
  (or a prefix of at least 7 characters) resolves to that commit's files, so `revision=` works.
- A new repo starts with one commit holding a `.gitattributes`, as on the Hub.
- Files are stored by content (sha256) in a folder on disk. A file is "LFS" when its name has a binary
  suffix (`.safetensors`, `.bin`, ...), its sample contains a NUL byte, or it is 10 MB or more; LFS content
  goes through the LFS batch API and a PUT, regular content travels base64-encoded inside the commit.
- Private repos need an `Authorization: Bearer ...` header (any token is accepted and recorded).
- Not modelled: pull requests, tags, Xet, pagination (every listing is one page), gated repos.

Test hooks: `LocalHubServer.requests` records every request (method, path, authorization header);
`inject_fault` makes matching requests fail with an HTTP status, a dropped connection or a truncated body.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import itertools
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

REPO_TYPES = ("model", "dataset", "space")
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
DEFAULT_BRANCH = "main"
DEFAULT_NAMESPACE = "local-user"
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
LFS_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".onnx",
    ".msgpack",
    ".npy",
    ".npz",
    ".pkl",
    ".faiss",
    ".index",
    ".arrow",
    ".parquet",
    ".zip",
    ".gz",
    ".tar",
    ".png",
    ".jpg",
    ".jpeg",
)
INITIAL_GITATTRIBUTES = "".join(
    f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES
).encode()


# helper functions


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what `git hash-object` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The text git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def iso_now() -> str:
    """Current UTC time in the Hub's format, e.g. 2024-01-02T03:04:05.678Z."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def is_lfs_upload(path: str, size: int, sample: bytes) -> bool:
    """Mirror of the Hub's choice between a regular git blob and an LFS object."""
    return path.lower().endswith(LFS_SUFFIXES) or size >= LFS_SIZE_THRESHOLD or b"\0" in sample


# data model


class HubError(Exception):
    """An error answer: HTTP status, the Hub's `X-Error-Code` (client exception type) and a message."""

    def __init__(self, status: int, message: str, error_code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.commit = commit


@dataclass(frozen=True)
class StoredFile:
    """One file of one commit. `sha256` names its content in the blob store."""

    path: str
    size: int
    sha256: str
    blob_oid: str  # git sha1 of the content (regular) or of the LFS pointer (LFS)
    is_lfs: bool

    def tree_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": self.blob_oid, "size": self.size, "path": self.path}
        if self.is_lfs:
            pointer_size = len(lfs_pointer(self.sha256, self.size))
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": pointer_size}
        return entry

    def sibling(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"rfilename": self.path, "size": self.size, "blobId": self.blob_oid}
        if self.is_lfs:
            pointer_size = len(lfs_pointer(self.sha256, self.size))
            entry["lfs"] = {"size": self.size, "sha256": self.sha256, "pointerSize": pointer_size}
        return entry


@dataclass
class Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        """Branch name, full sha, or sha prefix (>= 7 characters) -> commit; RevisionNotFound otherwise."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.commits:
            return self.commits[revision]
        if re.fullmatch(r"[0-9a-f]{7,39}", revision):
            matches = [sha for sha in self.commits if sha.startswith(revision)]
            if len(matches) == 1:
                return self.commits[matches[0]]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def history(self, revision: str) -> list[Commit]:
        """Commits reachable from `revision`, newest first."""
        commits, commit = [], self.resolve(revision)
        while commit is not None:
            commits.append(commit)
            commit = self.commits[commit.parent] if commit.parent else None
        return commits


class HubStore:
    """Repos and their commits in memory, file contents on disk (content-addressed by sha256)."""

    def __init__(self, root: Path) -> None:
        self.blob_dir = Path(root) / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.RLock()
        self._counter = itertools.count()

    # blobs

    def blob_path(self, sha256: str) -> Path:
        return self.blob_dir / sha256

    def has_blob(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    def put_blob(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha256)
        if not path.exists():
            temporary = path.with_suffix(f".tmp{threading.get_ident()}")
            temporary.write_bytes(data)
            temporary.replace(path)
        return sha256

    def read_blob(self, sha256: str) -> bytes:
        return self.blob_path(sha256).read_bytes()

    # repos

    def get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo")
            repo = Repo(repo_type, repo_id, private)
            self.repos[(repo_type, repo_id)] = repo
            sha256 = self.put_blob(INITIAL_GITATTRIBUTES)
            gitattributes = StoredFile(
                ".gitattributes",
                len(INITIAL_GITATTRIBUTES),
                sha256,
                git_blob_sha1(INITIAL_GITATTRIBUTES),
                False,
            )
            self._add_commit(repo, DEFAULT_BRANCH, "initial commit", "", {".gitattributes": gitattributes})
            return repo

    def _add_commit(
        self, repo: Repo, branch: str, title: str, message: str, files: dict[str, StoredFile]
    ) -> Commit:
        parent = repo.branches.get(branch)
        payload = json.dumps(
            [
                repo.repo_id,
                parent,
                title,
                message,
                sorted((p, f.blob_oid) for p, f in files.items()),
                next(self._counter),
                iso_now(),
            ]
        )
        sha = hashlib.sha1(payload.encode()).hexdigest()
        commit = Commit(sha, parent, title, message, iso_now(), dict(files))
        repo.commits[sha] = commit
        repo.branches[branch] = sha
        return commit

    def commit(
        self, repo: Repo, branch: str, header: dict[str, Any], operations: list[dict[str, Any]]
    ) -> Commit:
        """Apply the NDJSON operations of a `/commit` request on top of `branch` and move the branch."""
        with self.lock:
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch} (commits go to a branch)", "RevisionNotFound")
            head = repo.commits[repo.branches[branch]]
            expected_parent = header.get("parentCommit")
            if expected_parent and not head.sha.startswith(expected_parent):
                raise HubError(
                    412, f"Parent commit {expected_parent} is not the head of {branch} ({head.sha})"
                )
            files = dict(head.files)
            for operation in operations:
                self._apply(files, operation["key"], operation["value"])
            return self._add_commit(
                repo, branch, header.get("summary", ""), header.get("description", ""), files
            )

    def _apply(self, files: dict[str, StoredFile], key: str, value: dict[str, Any]) -> None:
        path = value["path"]
        if key == "file":
            data = base64.b64decode(value["content"])
            files[path] = StoredFile(path, len(data), self.put_blob(data), git_blob_sha1(data), False)
        elif key == "lfsFile":
            sha256 = value["oid"]
            if not self.has_blob(sha256):
                raise HubError(422, f"LFS object {sha256} for {path} was never uploaded")
            size = self.blob_path(sha256).stat().st_size
            files[path] = StoredFile(path, size, sha256, git_blob_sha1(lfs_pointer(sha256, size)), True)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            prefix = path.rstrip("/") + "/"
            for name in [name for name in files if name.startswith(prefix)]:
                del files[name]
        else:
            raise HubError(400, f"Unknown commit operation {key!r}")


@dataclass
class Fault:
    """Make requests matching `method` and `path_pattern` fail `remaining` times.

    kind: "status" answers `status`; "drop" closes the connection without an answer; "truncate" (GET only)
    sends the headers of the real answer and half of its body, then closes the connection.
    """

    method: str
    path_pattern: str
    kind: str = "status"
    status: int = 500
    remaining: int = 1

    def matches(self, method: str, path: str) -> bool:
        return self.remaining > 0 and method == self.method and re.search(self.path_pattern, path) is not None


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    authorization: str | None


# HTTP layer

_REPO = r"(?P<ns>[^/]+)/(?P<name>[^/]+)"
_API_TYPE = r"/api/(?P<kind>models|datasets|spaces)"
_WEB_TYPE = r"/(?:(?P<kind>datasets|spaces)/)?"


class HubRequestHandler(BaseHTTPRequestHandler):
    """Routes each request to a `route_*` method; errors become the Hub's error headers."""

    server: LocalHubServer
    protocol_version = "HTTP/1.0"  # one request per connection: simple, and faults cannot poison a pool

    ROUTES: list[tuple[str, str, str]] = [
        ("POST", r"/api/repos/create", "route_create_repo"),
        ("POST", r"/api/validate-yaml", "route_validate_yaml"),
        ("GET", r"/api/whoami-v2", "route_whoami"),
        ("GET", _API_TYPE + rf"/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "route_repo_info"),
        ("GET", _API_TYPE + rf"/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "route_tree"),
        ("POST", _API_TYPE + rf"/{_REPO}/paths-info/(?P<rev>[^/]+)", "route_paths_info"),
        ("GET", _API_TYPE + rf"/{_REPO}/commits/(?P<rev>[^/]+)", "route_list_commits"),
        ("GET", _API_TYPE + rf"/{_REPO}/refs", "route_refs"),
        ("POST", _API_TYPE + rf"/{_REPO}/branch/(?P<branch>[^/]+)", "route_create_branch"),
        ("POST", _API_TYPE + rf"/{_REPO}/preupload/(?P<rev>[^/]+)", "route_preupload"),
        ("POST", _API_TYPE + rf"/{_REPO}/commit/(?P<rev>[^/]+)", "route_commit"),
        ("POST", _WEB_TYPE + rf"{_REPO}\.git/info/lfs/objects/batch", "route_lfs_batch"),
        ("PUT", r"/_lfs/(?P<sha256>[0-9a-f]{64})", "route_lfs_put"),
        ("HEAD", _WEB_TYPE + rf"{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "route_resolve"),
        ("GET", _WEB_TYPE + rf"{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "route_resolve"),
    ]

    # plumbing

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        self.server.record(RecordedRequest(method, split.path, self.headers.get("Authorization")))
        body = self._read_body()
        fault = self.server.take_fault(method, split.path)
        if fault is not None and fault.kind == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault is not None and fault.kind == "status":
            self._send_error(HubError(fault.status, f"Injected fault: HTTP {fault.status}"))
            return
        self.truncate_body = fault is not None and fault.kind == "truncate"
        for route_method, pattern, handler_name in self.ROUTES:
            match = re.fullmatch(pattern, split.path)
            if route_method == method and match is not None:
                params = {
                    key: unquote(value) for key, value in match.groupdict().items() if value is not None
                }
                try:
                    getattr(self, handler_name)(body=body, **params)
                except HubError as error:
                    self._send_error(error)
                return
        self._send_error(HubError(404, f"No route for {method} {split.path}"))

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers, then the empty line
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if getattr(self, "truncate_body", False):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def _send_json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(
            status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})}
        )

    def _send_error(self, error: HubError) -> None:
        headers = {"X-Error-Message": error.message.replace("\n", " ")}
        if error.error_code:
            headers["X-Error-Code"] = error.error_code
        if error.commit:
            headers["X-Repo-Commit"] = error.commit
        self._send_json({"error": error.message}, status=error.status, headers=headers)

    def _json_body(self, body: bytes) -> dict[str, Any]:
        try:
            return json.loads(body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Body is not valid JSON: {error}") from error

    def _repo(self, kind: str | None, ns: str, name: str) -> Repo:
        repo_type = (kind or "models").rstrip("s")
        repo = self.server.store.get_repo(repo_type, f"{ns}/{name}")
        if repo.private and not (self.headers.get("Authorization") or "").startswith("Bearer "):
            # The Hub answers 401 for private repos without credentials; the client reports RepoNotFound.
            raise HubError(401, "Repository not found (private repo, no token)", "RepoNotFound")
        return repo

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.server.url}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    # routes: account and repos

    def route_whoami(self, body: bytes) -> None:
        if not self.headers.get("Authorization"):
            raise HubError(401, "Invalid credentials in Authorization header")
        self._send_json(
            {"type": "user", "name": DEFAULT_NAMESPACE, "orgs": [], "auth": {"type": "access_token"}}
        )

    def route_validate_yaml(self, body: bytes) -> None:
        self._json_body(body)
        self._send_json({"errors": [], "warnings": []})

    def route_create_repo(self, body: bytes) -> None:
        payload = self._json_body(body)
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        repo_id = f"{payload.get('organization') or DEFAULT_NAMESPACE}/{payload['name']}"
        url = f"{self.server.url}/{URL_PREFIXES[repo_type]}{repo_id}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        try:
            self.server.store.create_repo(repo_type, repo_id, private)
        except HubError as error:
            self._send_json({"error": error.message, "url": url}, status=error.status)
            return
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def route_repo_info(self, body: bytes, kind: str, ns: str, name: str, rev: str = DEFAULT_BRANCH) -> None:
        repo = self._repo(kind, ns, name)
        commit = repo.resolve(rev)
        self._send_json(
            {
                "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.sha,
                "private": repo.private,
                "lastModified": commit.date,
                "tags": [],
                "siblings": [stored.sibling() for _, stored in sorted(commit.files.items())],
            }
        )

    def route_refs(self, body: bytes, kind: str, ns: str, name: str) -> None:
        repo = self._repo(kind, ns, name)
        branches = [
            {"name": branch, "ref": f"refs/heads/{branch}", "targetCommit": sha}
            for branch, sha in repo.branches.items()
        ]
        self._send_json({"branches": branches, "converts": [], "tags": []})

    def route_create_branch(self, body: bytes, kind: str, ns: str, name: str, branch: str) -> None:
        repo = self._repo(kind, ns, name)
        payload = self._json_body(body)
        with self.server.store.lock:
            if branch in repo.branches:
                raise HubError(409, f"Branch {branch} already exists")
            repo.branches[branch] = repo.resolve(payload.get("startingPoint") or DEFAULT_BRANCH).sha
        self._send_json({})

    # routes: listing

    def route_tree(self, body: bytes, kind: str, ns: str, name: str, rev: str, path: str = "") -> None:
        repo = self._repo(kind, ns, name)
        commit = repo.resolve(rev)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(name.startswith(prefix) for name in commit.files):
            raise HubError(404, f"Path {path} not found in {rev}", "EntryNotFound", commit.sha)
        entries: dict[str, dict[str, Any]] = {}
        for file_path, stored in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # folders on the way down
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(
                    folder,
                    {"type": "directory", "oid": git_blob_sha1(folder.encode()), "size": 0, "path": folder},
                )
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                entries[file_path] = stored.tree_entry()
        self._send_json(list(entries.values()))

    def route_paths_info(self, body: bytes, kind: str, ns: str, name: str, rev: str) -> None:
        repo = self._repo(kind, ns, name)
        commit = repo.resolve(rev)
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = self._json_body(body).get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        found = []
        for path in paths:
            if path in commit.files:
                found.append(commit.files[path].tree_entry())
            elif any(name.startswith(path.rstrip("/") + "/") for name in commit.files):
                found.append(
                    {"type": "directory", "oid": git_blob_sha1(path.encode()), "size": 0, "path": path}
                )
        self._send_json(found)

    def route_list_commits(self, body: bytes, kind: str, ns: str, name: str, rev: str) -> None:
        repo = self._repo(kind, ns, name)
        self._send_json(
            [
                {
                    "id": c.sha,
                    "title": c.title,
                    "message": c.message,
                    "date": c.date,
                    "authors": [{"user": DEFAULT_NAMESPACE}],
                }
                for c in repo.history(rev)
            ]
        )

    # routes: upload

    def route_preupload(self, body: bytes, kind: str, ns: str, name: str, rev: str) -> None:
        repo = self._repo(kind, ns, name)
        head = repo.resolve(rev)
        answers = []
        for file in self._json_body(body).get("files", []):
            sample = base64.b64decode(file.get("sample", ""))
            lfs = is_lfs_upload(file["path"], int(file.get("size", 0)), sample)
            existing = head.files.get(file["path"])
            oid = None
            if existing is not None:  # the client skips files whose oid did not change
                oid = existing.sha256 if lfs else git_blob_sha1(self.server.store.read_blob(existing.sha256))
            answers.append(
                {
                    "path": file["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        self._send_json({"files": answers, "commitOid": head.sha})

    def route_lfs_batch(self, body: bytes, ns: str, name: str, kind: str | None = None) -> None:
        self._repo(kind, ns, name)
        payload = self._json_body(body)
        objects = []
        for obj in payload.get("objects", []):
            answer: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not self.server.store.has_blob(obj["oid"]):
                answer["actions"] = {
                    "upload": {"href": f"{self.server.url}/_lfs/{obj['oid']}?size={obj['size']}"}
                }
            objects.append(answer)
        self._send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def route_lfs_put(self, body: bytes, sha256: str) -> None:
        expected_size = int(self.query.get("size", [len(body)])[0])
        if hashlib.sha256(body).hexdigest() != sha256 or len(body) != expected_size:
            raise HubError(400, f"Uploaded content does not match oid {sha256} / size {expected_size}")
        self.server.store.put_blob(body)
        self._send(200)

    def route_commit(self, body: bytes, kind: str, ns: str, name: str, rev: str) -> None:
        repo = self._repo(kind, ns, name)
        if self.query.get("create_pr"):
            raise HubError(400, "This test server does not implement pull requests")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        commit = self.server.store.commit(repo, rev, lines[0]["value"], lines[1:])
        self._send_json(
            {
                "success": True,
                "commitOid": commit.sha,
                "commitUrl": f"{self._repo_url(repo)}/commit/{commit.sha}",
                "hookOutput": "",
            }
        )

    # routes: download

    def route_resolve(
        self, body: bytes, ns: str, name: str, rev: str, path: str, kind: str | None = None
    ) -> None:
        repo = self._repo(kind, ns, name)
        commit = repo.resolve(rev)
        stored = commit.files.get(path)
        if stored is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit.sha)
        headers = {
            "X-Repo-Commit": commit.sha,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        headers["ETag"] = f'"{stored.blob_oid}"'
        if stored.is_lfs:
            headers["X-Linked-Etag"] = f'"{stored.sha256}"'
            headers["X-Linked-Size"] = str(stored.size)
        data = b"" if self.command == "HEAD" else self.server.store.read_blob(stored.sha256)
        if self.command == "HEAD":
            self.send_response(200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(stored.size))
            self.end_headers()
            return
        start = self._range_start(stored.size)
        if start:
            headers["Content-Range"] = f"bytes {start}-{stored.size - 1}/{stored.size}"
            self._send(206, data[start:], headers)
            return
        self._send(200, data, headers)

    def _range_start(self, size: int) -> int:
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "").strip())
        if match is None:
            return 0
        start = int(match.group(1))
        if start >= size:
            raise HubError(416, f"Range start {start} is past the end of a {size}-byte file")
        return start


class LocalHubServer(ThreadingHTTPServer):
    """The test Hub: a threading HTTP server bound to 127.0.0.1 with a `HubStore` in `root`.

    Args:
        root: folder for the stored file contents.
        sock: an already bound (not yet listening) socket to serve on; when None, a free port is chosen.
        verbose: log every request to stderr.

    Use `start()` / `stop()`, or the object as a context manager.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root: str | Path, sock: socket.socket | None = None, verbose: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), HubRequestHandler, bind_and_activate=sock is None)
        if sock is not None:
            self.socket.close()
            self.socket = sock
            self.server_address = sock.getsockname()
            self.server_activate()
        self.store = HubStore(Path(root))
        self.verbose = verbose
        self.requests: list[RecordedRequest] = []
        self.faults: list[Fault] = []
        self._fault_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalHubServer:
        self._thread = threading.Thread(target=self.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LocalHubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # test hooks

    def record(self, request: RecordedRequest) -> None:
        with self._fault_lock:
            self.requests.append(request)

    def inject_fault(
        self, method: str, path_pattern: str, kind: str = "status", status: int = 500, times: int = 1
    ) -> Fault:
        """Make the next `times` requests whose path matches the regex `path_pattern` fail (see `Fault`)."""
        if kind not in ("status", "drop", "truncate"):
            raise ValueError(f"kind must be 'status', 'drop' or 'truncate', got {kind!r}")
        fault = Fault(method.upper(), path_pattern, kind, status, times)
        with self._fault_lock:
            self.faults.append(fault)
        return fault

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self._fault_lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.remaining -= 1
                    return fault
        return None

    def clear_faults(self) -> None:
        with self._fault_lock:
            self.faults.clear()

    def clear_requests(self) -> None:
        with self._fault_lock:
            self.requests.clear()

    def requests_matching(self, method: str, path_pattern: str) -> list[RecordedRequest]:
        with self._fault_lock:
            return [r for r in self.requests if r.method == method and re.search(path_pattern, r.path)]

    def commits(self, repo_id: str, repo_type: str = "model", revision: str = DEFAULT_BRANCH) -> list[Commit]:
        """Commits of a repo, newest first (read directly from the store, not over HTTP)."""
        with self.store.lock:
            return self.store.get_repo(repo_type, repo_id).history(revision)


def reserve_local_port() -> socket.socket:
    """Bind (but do not listen on) a free 127.0.0.1 port: connections are refused until the server starts."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


__all__ = [
    "Commit",
    "Fault",
    "HubError",
    "HubRequestHandler",
    "HubStore",
    "LocalHubServer",
    "RecordedRequest",
    "Repo",
    "StoredFile",
    "reserve_local_port",
]
