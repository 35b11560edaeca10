"""A Hugging Face Hub stand-in for the tests, on 127.0.0.1 only: the routes and headers huggingface_hub's client uses
to resolve a model repo's revision and download its files, and nothing else.

    GET  /api/models/{repo}[/revision/{revision}]   {"id", "sha", "siblings": [{"rfilename"}], "private", "gated"}
    HEAD /{repo}/resolve/{revision}/{path}           X-Repo-Commit, ETag, Content-Length (no body)
    GET  /{repo}/resolve/{revision}/{path}           the file (a Range request gets 206 and the rest)

    with StandInHub() as hub:
        commit = hub.add("test-org/tiny-bert", folder, revision="main")
        os.environ["HF_ENDPOINT"] = hub.url

Failures as the Hub answers them: an unknown repo is 404 with X-Error-Code RepoNotFound, an unknown revision 404
RevisionNotFound; a private repo is 401 without its token, a gated one 403 GatedRepo with another token; a file marked
`cut` is sent half, then the connection is closed. Every request is logged in `requests` for the tests to read.
"""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class StandInHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}        # repo id -> {"refs": {revision: commit}, "commits": {commit: files},
        #                                                      "token": str | None, "gated": bool}
        self.cut: set[tuple[str, str]] = set()  # (repo id, path) sent half and cut off
        self.requests: list[tuple[str, str]] = []
        self._server = None
        self._thread = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, repo_id: str, files, *, revision: str = "main", token: str | None = None, gated: bool = False) -> str:
        """Publish `files` ({path: bytes}, or a folder, read whole) as `revision` of `repo_id`; -> its commit."""
        if not isinstance(files, dict):
            folder = Path(files)
            files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
                     if p.is_file() and not p.name.startswith(".")}
        h = hashlib.sha1()
        for name in sorted(files):
            h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        commit = h.hexdigest()
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}, "token": token, "gated": gated})
        repo["refs"][revision] = commit
        repo["commits"][commit] = dict(files)
        return commit

    def served(self, repo_id: str, since: int = 0) -> list[str]:
        """The files of `repo_id` whose bytes were sent (GET), in order, from request number `since` on."""
        prefix = f"/{repo_id}/resolve/"
        return [path.split("/resolve/", 1)[1].split("/", 1)[1] for method, path in self.requests[since:]
                if method == "GET" and path.startswith(prefix)]

    def __enter__(self) -> "StandInHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: StandInHub
    timeout = 10  # seconds a connection may idle: no test hangs on a client that went away

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._route(body=True)

    def do_HEAD(self) -> None:
        self._route(body=False)

    def _route(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.hub.requests.append((self.command, path))
        if path.startswith("/api/models/"):
            repo_id, _, revision = path[len("/api/models/"):].partition("/revision/")
            return self._info(repo_id, revision or "main")
        if "/resolve/" in path:
            repo_id, _, rest = path[1:].partition("/resolve/")
            revision, _, name = rest.partition("/")
            return self._file(repo_id, revision, name, body)
        self._error(404, "EntryNotFound", "no such route")

    def _repo(self, repo_id: str, revision: str):
        """-> (repo, commit) or None once the error was sent."""
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if repo["token"] is not None:
            auth = self.headers.get("Authorization", "")
            if not auth:
                return self._error(401, None, "Access to this resource requires authentication")
            if auth != f"Bearer {repo['token']}":
                if repo["gated"]:
                    return self._error(403, "GatedRepo", "Access to this gated repo is restricted")
                return self._error(404, "RepoNotFound", "Repository not found")
        commit = repo["refs"].get(revision, revision if revision in repo["commits"] else None)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo, commit

    def _info(self, repo_id: str, revision: str) -> None:
        found = self._repo(repo_id, revision)
        if found is None:
            return
        repo, commit = found
        info = {"id": repo_id, "modelId": repo_id, "sha": commit, "private": repo["token"] is not None,
                "gated": "manual" if repo["gated"] else False,
                "siblings": [{"rfilename": name} for name in sorted(repo["commits"][commit])]}
        self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, True)

    def _file(self, repo_id: str, revision: str, name: str, body: bool) -> None:
        found = self._repo(repo_id, revision)
        if found is None:
            return
        repo, commit = found
        data = repo["commits"][commit].get(name)
        if data is None:
            return self._error(404, "EntryNotFound", f"{name} does not exist")
        headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        start = _range_start(self.headers.get("Range"))
        if body and (repo_id, name) in self.hub.cut:
            return self._send_cut(data, headers)
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return self._send(206, data[start:], headers, body)
        self._send(200, data, headers, body)

    def _send_cut(self, data: bytes, headers: dict) -> None:
        """Promise the whole file, send half of it, then close: a download cut in the middle."""
        self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers, self.command != "HEAD")

    def _send(self, status: int, data: bytes, headers: dict, body: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


def _range_start(value: str | None) -> int:
    """The first byte of a `Range: bytes=N-` header (the only form huggingface_hub sends, to resume), else 0."""
    if not value or not value.startswith("bytes="):
        return 0
    first = value[len("bytes="):].split("-", 1)[0]
    return int(first) if first.isdigit() else 0
