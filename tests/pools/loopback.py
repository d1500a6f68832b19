"""Loopback HTTP servers for download tests: an image host and a stand-in for the HF hub.

Both listen on 127.0.0.1 on a free port, run in a daemon thread, and stop themselves after
`lifetime` seconds even if a test forgets to (they are also context managers).

The hub stand-in implements the two endpoints huggingface_hub's real code path calls, so
`HfApi.list_repo_tree` and `hf_hub_download` run unmodified against it:

- ``GET /api/datasets/<repo>/tree/<revision>[/<path>]`` -> JSON list of files with size and LFS sha256;
- ``HEAD|GET /datasets/<repo>/resolve/<revision>/<path>`` -> the file, with ``X-Repo-Commit``,
  ``ETag``/``X-Linked-Etag`` and ``X-Linked-Size`` headers, honouring ``Range``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class _Server:
    def __init__(self, handler_cls, lifetime: float):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.requests: list[str] = []
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self):
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")  # no keep-alive: a stopped server serves nothing
        self.close_connection = True
        self.end_headers()
        if not head and body:
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout under test): nothing to do


class ImageServer(_Server):
    """Serves ``/<name>``: bytes from `images`, 404 for unknown names, `slow` names after a
    delay, `corrupt` names as non-image bytes with an image content type."""

    def __init__(self, images: dict[str, bytes], *, slow: set[str] = frozenset(), corrupt: set[str] = frozenset(),
                 delay: float = 3.0, lifetime: float = 300):
        self.images, self.slow, self.corrupt, self.delay = images, set(slow), set(corrupt), delay
        super().__init__(_ImageHandler, lifetime)


class _ImageHandler(_Quiet):
    def do_GET(self):
        server: ImageServer = self.server.owner
        name = unquote(urlparse(self.path).path).lstrip("/")
        server.requests.append(name)
        if name in server.slow:
            time.sleep(server.delay)
        if name in server.corrupt:
            self._send(200, b"\x00\x01 not an image " * 20, {"Content-Type": "image/jpeg"})
        elif name in server.images:
            self._send(200, server.images[name], {"Content-Type": "image/jpeg"})
        else:
            self._send(404, b"not found", {"Content-Type": "text/plain"})


class HubServer(_Server):
    """Serves dataset repos from local folders: `repos` maps ``owner/name`` to a folder."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, repos: dict[str, Path], *, lifetime: float = 300):
        self.repos = {k: Path(v) for k, v in repos.items()}
        super().__init__(_HubHandler, lifetime)

    def files(self, repo: str) -> list[Path]:
        root = self.repos[repo]
        return sorted(p for p in root.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _HubHandler(_Quiet):
    TREE = re.compile(r"^/api/datasets/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$")
    RESOLVE = re.compile(r"^/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")

    def do_GET(self):
        self._route(head=False)

    def do_HEAD(self):
        self._route(head=True)

    def _route(self, head: bool):
        server: HubServer = self.server.owner
        path = unquote(urlparse(self.path).path)
        server.requests.append(f"{self.command} {path}")
        if m := self.TREE.match(path):
            repo, sub = m.group(1), m.group(3) or ""
            if repo not in server.repos:
                return self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepositoryNotFound"})
            root = server.repos[repo]
            entries = [{"type": "file", "oid": hashlib.sha1(p.read_bytes()).hexdigest(), "size": p.stat().st_size,
                        "path": p.relative_to(root).as_posix(),
                        "lfs": {"oid": _sha256(p), "size": p.stat().st_size, "pointerSize": 134}}
                       for p in server.files(repo) if p.relative_to(root).as_posix().startswith(sub)]
            return self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, head)
        if m := self.RESOLVE.match(path):
            repo, filename = m.group(1), m.group(3)
            file = server.repos.get(repo, Path("/nonexistent")) / filename
            if repo not in server.repos or not file.is_file():
                return self._send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound"}, head)
            data = file.read_bytes()
            etag = f'"{_sha256(file)}"'
            headers = {"X-Repo-Commit": HubServer.COMMIT, "ETag": etag, "X-Linked-Etag": etag,
                       "X-Linked-Size": str(len(data)), "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            code = 200
            rng = self.headers.get("Range")
            if rng and (r := re.match(r"bytes=(\d+)-(\d*)", rng)):
                start = int(r.group(1))
                end = int(r.group(2)) if r.group(2) else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data, code = data[start:end + 1], 206
            return self._send(code, data, headers, head)
        self._send(404, b"no such endpoint", head=head)
