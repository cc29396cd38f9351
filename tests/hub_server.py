"""A small Hugging Face Hub-compatible HTTP server on 127.0.0.1, for testing uploads and downloads offline.

It implements just the routes huggingface_hub (2.x) uses to create a repo, upload (preupload, NDJSON commit,
pull requests for `create_pr=True`, README metadata validation) and download (repo info, tree listing,
resolve). Every file is answered as a "regular" (inline, base64) upload, so neither LFS nor Xet storage is
needed. Repos live in memory as full snapshots per commit.

    with HubServer(tokens={"hf_secret": "alice"}) as hub:
        env = {"HF_ENDPOINT": hub.url, ...}   # set before huggingface_hub is imported (a subprocess)
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_NOW = "2026-01-01T00:00:00.000Z"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob with this content (what the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # "main", "refs/pr/1" -> commit oid
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit oid -> full snapshot
    messages: dict[str, str] = field(default_factory=dict)
    pull_requests: list[dict[str, Any]] = field(default_factory=list)

    def commit(self, parent: str | None, files: dict[str, bytes], message: str) -> str:
        digest = hashlib.sha1(repr((parent, sorted(files.items()), message)).encode())
        oid = digest.hexdigest()
        self.commits[oid] = dict(files)
        self.messages[oid] = message
        return oid

    def resolve(self, revision: str) -> str | None:
        revision = unquote(revision)
        revision = revision.removeprefix("refs/heads/")
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


class HubState:
    """Everything the server knows; tests read it to check what the client did."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self.tokens = dict(tokens)  # token -> user name
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.authorizations: list[str] = []
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    body = b""  # the request body, read by _dispatch

    # -- plumbing -----------------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        return

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers)

    def _body(self) -> bytes:
        return self.body

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization")
        if auth:
            with self.server.state.lock:
                self.server.state.authorizations.append(auth)
        token = auth.removeprefix("Bearer ").strip() if auth else None
        return self.server.state.tokens.get(token) if token else None

    def _repo(self, repo_id: str, write: bool = False) -> Repo | None:
        user = self._user()
        repo = self.server.state.repos.get(repo_id)
        if repo is None or (repo.private and user is None):
            self._error(404, f"Repository {repo_id} not found", "RepoNotFound")
            return None
        if write and user is None:
            self._error(401, "Invalid credentials in Authorization header")
            return None
        return repo

    def _dispatch(self) -> None:
        # Read the whole body first, so an early error reply never leaves bytes on a kept-alive connection.
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        with self.server.state.lock:
            self.server.state.requests.append((self.command, path))
        for method, pattern, handler in _ROUTES:
            match = re.fullmatch(pattern, path)
            if method == self.command and match:
                return handler(self, query=query, **match.groupdict())
        return self._error(404, f"no route for {self.command} {path}")

    do_GET = do_POST = do_HEAD = _dispatch

    # -- repos ----------------------------------------------------------------------------------------------
    def create_repo(self, query: dict) -> None:
        payload = json.loads(self._body() or b"{}")
        if self._user() is None:
            return self._error(401, "Invalid credentials in Authorization header")
        repo_id = f"{payload.get('organization') or self._user()}/{payload['name']}"
        state = self.server.state
        with state.lock:
            if repo_id in state.repos:
                # Like the Hub, a conflict still names the repo: `create_repo(exist_ok=True)` reads its url.
                message = "You already created this model repo"
                body = {"error": message, "url": f"{self.server.url}/{repo_id}"}
                return self._json(409, body, {"X-Error-Message": message})
            repo = Repo(
                repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private"))
            )
            files = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
            repo.refs["main"] = repo.commit(None, files, "initial commit")
            state.repos[repo_id] = repo
        self._json(200, {"url": f"{self.server.url}/{repo_id}", "name": repo_id})

    def model_info(self, query: dict, repo: str, revision: str = "main") -> None:
        found = self._repo(repo)
        if found is None:
            return None
        oid = found.resolve(revision)
        if oid is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = found.commits[oid]
        siblings = [{"rfilename": name, "size": len(data)} for name, data in sorted(files.items())]
        info = {
            "id": repo,
            "modelId": repo,
            "sha": oid,
            "private": found.private,
            "lastModified": _NOW,
            "tags": [],
            "siblings": siblings,
        }
        return self._json(200, info)

    def tree(self, query: dict, repo: str, revision: str, path: str | None = None) -> None:
        found = self._repo(repo)
        if found is None:
            return None
        oid = found.resolve(revision)
        if oid is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        prefix = unquote(path or "").strip("/")
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries, folders = [], set()
        for name, data in sorted(found.commits[oid].items()):
            if prefix and not name.startswith(prefix + "/"):
                continue
            rest = name[len(prefix) + 1 :] if prefix else name
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(filter(None, [prefix, *parts[:depth]]))
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    entries.append(
                        {"type": "directory", "oid": git_blob_oid(folder.encode()), "size": 0, "path": folder}
                    )
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": name})
        return self._json(200, entries)

    def resolve(self, query: dict, repo: str, revision: str, path: str) -> None:
        found = self._repo(repo)
        if found is None:
            return None
        oid = found.resolve(revision)
        if oid is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        name = unquote(path)
        data = found.commits[oid].get(name)
        if data is None:
            return self._error(404, f"Entry not found: {name}", "EntryNotFound")
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": oid,
            "ETag": f'"{git_blob_oid(data)}"',
            "Content-Length": str(len(data)),
        }
        return self._send(200, data, headers)

    # -- uploads --------------------------------------------------------------------------------------------
    def validate_yaml(self, query: dict) -> None:
        content = json.loads(self._body() or b"{}").get("content", "")
        match = re.match(r"^---\n(.*?)\n---", content, re.DOTALL)
        try:
            if match:
                yaml.safe_load(match.group(1))
        except yaml.YAMLError as err:
            return self._json(400, {"errors": [{"message": str(err)}], "warnings": []})
        return self._json(200, {"errors": [], "warnings": []})

    def preupload(self, query: dict, repo: str, revision: str) -> None:
        found = self._repo(repo, write=True)
        if found is None:
            return None
        payload = json.loads(self._body() or b"{}")
        oid = found.resolve(revision) or found.refs["main"]
        current = found.commits[oid]
        files = []
        for item in payload.get("files", []):
            existing = current.get(item["path"])
            files.append(
                {
                    "path": item["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_oid(existing) if existing is not None else None,
                }
            )
        return self._json(200, {"files": files, "commitOid": oid})

    def commit(self, query: dict, repo: str, revision: str) -> None:
        found = self._repo(repo, write=True)
        if found is None:
            return None
        revision = unquote(revision)
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        header = next((item["value"] for item in lines if item["key"] == "header"), {})
        with self.server.state.lock:
            pr_url = None
            if query.get("create_pr", ["0"])[0] == "1":
                revision, pr_url = self._open_pull_request(found, header.get("summary", ""))
            parent = found.resolve(revision)
            if parent is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            files = dict(found.commits[parent])
            for item in lines:
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "deletedFile":
                    files.pop(value["path"], None)
                elif item["key"] == "deletedFolder":
                    files = {
                        k: v for k, v in files.items() if not k.startswith(value["path"].rstrip("/") + "/")
                    }
                elif item["key"] != "header":
                    return self._error(
                        400, f"unsupported commit operation {item['key']!r} (only regular files)"
                    )
            oid = found.commit(parent, files, header.get("summary", ""))
            found.refs[revision.removeprefix("refs/heads/")] = oid
        payload = {"commitUrl": f"{self.server.url}/{repo}/commit/{oid}", "commitOid": oid, "success": True}
        if pr_url is not None:
            payload["pullRequestUrl"] = pr_url
        return self._json(200, payload)

    def _open_pull_request(self, repo: Repo, title: str) -> tuple[str, str]:
        num = len(repo.pull_requests) + 1
        ref = f"refs/pr/{num}"
        repo.refs[ref] = repo.refs["main"]
        repo.pull_requests.append({"num": num, "title": title, "ref": ref})
        return ref, f"{self.server.url}/{repo.repo_id}/discussions/{num}"

    def create_discussion(self, query: dict, repo: str) -> None:
        found = self._repo(repo, write=True)
        if found is None:
            return None
        payload = json.loads(self._body() or b"{}")
        if not payload.get("pullRequest"):
            return self._error(400, "only pull requests are supported")
        with self.server.state.lock:
            self._open_pull_request(found, payload.get("title", ""))
        return self._json(200, {"num": len(found.pull_requests)})

    def discussion(self, query: dict, repo: str, num: str) -> None:
        found = self._repo(repo)
        if found is None:
            return None
        pr = next((p for p in found.pull_requests if p["num"] == int(num)), None)
        if pr is None:
            return self._error(404, f"discussion {num} not found")
        details = {
            "title": pr["title"],
            "num": pr["num"],
            "author": {"name": "test"},
            "createdAt": _NOW,
            "status": "draft",
            "repo": {"name": repo, "type": "model"},
            "isPullRequest": True,
            "events": [],
            "changes": {"base": "refs/heads/main"},
            "filesWithConflicts": [],
            "diff": "",
        }
        return self._json(200, details)


_ROUTES = [
    ("POST", r"/api/repos/create", _Handler.create_repo),
    ("POST", r"/api/validate-yaml", _Handler.validate_yaml),
    ("GET", rf"/api/models/{_REPO}", _Handler.model_info),
    ("GET", rf"/api/models/{_REPO}/revision/(?P<revision>[^/]+)", _Handler.model_info),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?", _Handler.tree),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<revision>[^/]+)", _Handler.preupload),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<revision>[^/]+)", _Handler.commit),
    ("POST", rf"/api/models/{_REPO}/discussions", _Handler.create_discussion),
    ("GET", rf"/api/models/{_REPO}/discussions/(?P<num>\d+)", _Handler.discussion),
    ("HEAD", rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", _Handler.resolve),
    ("GET", rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", _Handler.resolve),
]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState
    url: str


class HubServer:
    """Context manager running the server in a background thread; `url` is its endpoint."""

    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self.state = HubState(tokens or {})
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = self.state
        self.url = self._server.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-server", daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.state.repos[repo_id]
        return dict(repo.commits[repo.resolve(revision)])
