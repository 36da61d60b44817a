"""A loopback Hugging Face Hub for tests and benchmarks (127.0.0.1 only).

It serves repositories made from local folders the way the real Hub does in what matters to a
client: ``/api/models/{repo}/revision/{rev}`` (commit ``sha`` and ``siblings``, with sizes, blob
ids and LFS facts when asked ``blobs=True``), ``/api/models/{repo}/tree/{rev}`` (``oid``,
``size``, ``lfs: {oid, size, pointerSize}``), and ``/{repo}/resolve/{rev}/{path}`` answering
with ``X-Repo-Commit``, ``ETag``/``X-Linked-Etag``, ``X-Linked-Size`` and, for LFS files, a 302
to a second loopback port (the "CDN"), as the Hub redirects to its CDN. Both ports answer HEAD,
ranges (206) and bad ranges (416). Gated repositories answer 401 without a token and 403 to a
user who has not accepted the licence; private ones 401 without a token and 404 to others;
unknown repos, revisions and files answer 404 with the Hub's ``X-Error-Code``. Faults are injected per file: a status once (``fail_once``, e.g. 429
with ``Retry-After``), other bytes of the same size (``serve_instead``), a rate limit. Bodies
go out with ``sendfile`` so the server is not what limits a benchmark. No Xet headers are ever
sent, so huggingface_hub never loads hf_xet.

Every request is recorded (which port, method, path, Authorization header, Range, when), and so
are the body bytes sent per file and the most bodies sent at once. ``loopback_proxy()`` is a
forward HTTP proxy to 127.0.0.1 only, for ``HTTP_PROXY`` tests. ``serve_tiny`` serves the tiny
checkpoint (tests/conftest.py's ``hub`` fixture wraps it); ``python -m provision.testing.hub_server
FOLDER REPO`` serves a folder (the benchmark uses it). It is a test double, not a Hub: no uploads,
no pagination, no auth beyond a token table. One responsibility, the Hub's HTTP surface; it is
long because that surface (API routes, resolve + CDN redirect, ranges, gating, fault injection,
request recording) must stay in one server to behave like one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from provision.io.hashing import sha256_file

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".model")
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub requires LFS (or Xet) for files above 10 MiB


def git_blob_sha1_file(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class HubFile:
    path: str
    source: Path  # the bytes the Hub vouches for
    size: int
    sha256: str
    lfs: bool
    blob_id: str  # git blob id: of the content for small files, of the LFS pointer for LFS files

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))


def make_file(path: str, source: Path, *, lfs: bool | None = None, sha256: str | None = None) -> HubFile:
    size = source.stat().st_size
    is_lfs = lfs if lfs is not None else (path.endswith(LFS_SUFFIXES) or size >= LFS_THRESHOLD)
    digest = sha256 or sha256_file(source)
    if is_lfs:
        ptr = lfs_pointer(digest, size)
        blob = hashlib.sha1(f"blob {len(ptr)}\0".encode() + ptr).hexdigest()
    else:
        blob = git_blob_sha1_file(source)
    return HubFile(path=path, source=source, size=size, sha256=digest, lfs=is_lfs, blob_id=blob)


@dataclass
class HubRepo:
    repo_id: str
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    gated: bool = False
    accepted: set[str] = field(default_factory=set)  # users who accepted the licence (or, private: members)
    private: bool = False  # then only ``accepted`` users see it at all (401 without a token, 404 otherwise)

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        if re.fullmatch(r"[0-9a-f]{40}", revision) and revision in self.commits:
            return revision
        return None


@dataclass(frozen=True)
class RequestRecord:
    role: str  # "hub" or "cdn"
    port: int
    method: str
    path: str
    authorization: str | None
    range: str | None
    status: int
    at: float = 0.0  # time.monotonic() when the answer was sent


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, hub: LoopbackHub, role: str) -> None:
        self.hub = hub
        self.role = role
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    # --- plumbing -------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _dispatch(self, *, head: bool) -> None:
        hub = self.server.hub
        self._status = 0
        with hub._changed:
            hub.in_flight += 1
        try:
            if self.server.role == "cdn":
                self._cdn(head)
            else:
                self._hub(head)
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            hub._record(RequestRecord(role=self.server.role, port=self.server.server_address[1],
                                      method=self.command, path=self.path,
                                      authorization=self.headers.get("Authorization"),
                                      range=self.headers.get("Range"), status=self._status,
                                      at=time.monotonic()))
            with hub._changed:
                hub.in_flight -= 1
                hub._changed.notify_all()

    def _send(self, status: int, headers: dict[str, str], body: bytes = b"", *, head: bool = False) -> None:
        self._status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _json(self, obj: Any, *, head: bool, headers: dict[str, str] | None = None) -> None:
        self._send(200, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode(), head=head)

    def _error(self, status: int, code: str | None, message: str, *, head: bool,
               headers: dict[str, str] | None = None) -> None:
        h = {"Content-Type": "application/json", "X-Error-Message": message, **(headers or {})}
        if code:
            h["X-Error-Code"] = code
        self._send(status, h, json.dumps({"error": message}).encode(), head=head)

    def _user(self) -> str | bool | None:
        """The user a bearer token maps to; None without a token; False for an unknown token."""
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        tok = auth.removeprefix("Bearer ").strip()
        return self.server.hub.tokens.get(tok, False)

    # --- the hub port ---------------------------------------------------------------------

    def _hub(self, head: bool) -> None:
        hub = self.server.hub
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        path = parts.path
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            self._api_info(m.group(1), unquote(m.group(2) or "main"), query, head)
            return
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
        if m:
            self._api_tree(m.group(1), unquote(m.group(2)), unquote(m.group(3) or "").strip("/"), query, head)
            return
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            self._resolve(m.group(1), unquote(m.group(2)), unquote(m.group(3)), head)
            return
        if path.startswith("/api/"):
            # telemetry, registries, whoami...: this hub knows none of them
            hub.unknown_api_calls.append(self.path)
        self._error(404, None, "Not Found", head=head)

    def _repo_and_commit(self, repo_id: str, revision: str, head: bool) -> tuple[HubRepo, str] | None:
        repo = self.server.hub.repos.get(repo_id)
        user = self._user()
        if repo is not None and repo.private and user not in repo.accepted:
            if user is False:
                self._error(401, None, "Invalid credentials in Authorization header", head=head)
            else:  # like the Hub: a private repo looks like no repo at all
                self._error(401 if user is None else 404, "RepoNotFound", "Repository not found", head=head)
            return None
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", head=head)
            return None
        commit = repo.resolve(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", "Invalid rev id: " + revision, head=head)
            return None
        return repo, commit

    def _api_info(self, repo_id: str, revision: str, query: dict[str, list[str]], head: bool) -> None:
        rc = self._repo_and_commit(repo_id, revision, head)
        if rc is None:
            return
        repo, commit = rc
        blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for f in sorted(repo.commits[commit].values(), key=lambda f: f.path):
            s: dict[str, Any] = {"rfilename": f.path}
            if blobs:
                s["blobId"] = f.blob_id
                s["size"] = f.size
                if f.lfs:
                    s["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
            siblings.append(s)
        self._json({"_id": "0" * 24, "id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                    "gated": "manual" if repo.gated else False, "disabled": False, "downloads": 0,
                    "likes": 0, "tags": [], "library_name": None, "lastModified": "2024-09-11T00:00:00.000Z",
                    "createdAt": "2024-09-11T00:00:00.000Z", "siblings": siblings}, head=head)

    def _api_tree(self, repo_id: str, revision: str, sub: str, query: dict[str, list[str]], head: bool) -> None:
        rc = self._repo_and_commit(repo_id, revision, head)
        if rc is None:
            return
        repo, commit = rc
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = sub + "/" if sub else ""
        entries: list[dict[str, Any]] = []
        dirs: set[str] = set()
        for f in sorted(repo.commits[commit].values(), key=lambda f: f.path):
            if not f.path.startswith(prefix):
                continue
            rest = f.path[len(prefix):]
            if "/" in rest and not recursive:
                dirs.add(prefix + rest.split("/", 1)[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                for i in range(1, len(parts) + 1):
                    dirs.add(prefix + "/".join(parts[:i]))
            e: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
            if f.lfs:
                e["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
            entries.append(e)
        if sub and not entries and not dirs:
            self._error(404, "EntryNotFound", f"{sub} does not exist on {revision}", head=head)
            return
        folders = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                   for d in sorted(dirs)]
        self._json(folders + entries, head=head)

    def _resolve(self, repo_id: str, revision: str, path: str, head: bool) -> None:
        hub = self.server.hub
        rc = self._repo_and_commit(repo_id, revision, head)
        if rc is None:
            return
        repo, commit = rc
        user = self._user()
        if user is False:
            self._error(401, None, "Invalid credentials in Authorization header", head=head)
            return
        if repo.gated and user is None:
            self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it "
                        "and be authenticated to access it. Please log in.", head=head)
            return
        if repo.gated and user not in repo.accepted:
            self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the "
                        f"authorized list. Visit {hub.endpoint}/{repo_id} to ask for access.", head=head)
            return
        f = repo.commits[commit].get(path)
        if f is None:
            self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", head=head,
                        headers={"X-Repo-Commit": commit})
            return
        with hub._lock:
            once = hub.fail_once.pop(path, None)
        if once is not None:
            status, extra = once
            self._error(status, None, "injected failure", head=head, headers={"X-Repo-Commit": commit, **extra})
            return
        common = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if f.lfs:
            location = f"{hub.cdn_url}/repos/{quote(repo_id)}/{f.sha256}?filename={quote(path)}"
            self._send(302, {**common, "ETag": f'"{f.blob_id}"', "X-Linked-Etag": f'"{f.sha256}"',
                             "X-Linked-Size": str(f.size), "Location": location,
                             "Content-Type": "text/plain; charset=utf-8"}, head=head)
            return
        self._body(f, {**common, "ETag": f'"{f.blob_id}"'}, head, role_path=path)

    # --- the CDN port ---------------------------------------------------------------------

    def _cdn(self, head: bool) -> None:
        hub = self.server.hub
        parts = urlsplit(self.path)
        m = re.fullmatch(r"/repos/([^/]+/[^/]+)/([0-9a-f]{64})", unquote(parts.path))
        f = None
        if m:
            repo = hub.repos.get(m.group(1))
            if repo is not None:
                f = next((x for files in repo.commits.values() for x in files.values()
                          if x.lfs and x.sha256 == m.group(2)), None)
        if f is None:
            self._error(404, None, "NoSuchKey", head=head)
            return
        self._body(f, {"ETag": f'"{f.sha256}"', "Accept-Ranges": "bytes",
                       "Content-Disposition": f'inline; filename="{f.path.rsplit("/", 1)[-1]}"'}, head,
                   role_path=f.path)

    # --- bodies ---------------------------------------------------------------------------

    def _body(self, f: HubFile, headers: dict[str, str], head: bool, *, role_path: str) -> None:
        hub = self.server.hub
        source = hub.serve_instead.get(f.path, f.source)
        size = source.stat().st_size
        start, end = 0, size - 1
        status = 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            ok = False
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                else:  # suffix range
                    start = max(size - int(m.group(2)), 0)
                ok = start < size and start <= end
            if not ok:
                self._send(416, {**headers, "Content-Range": f"bytes */{size}"}, head=head)
                return
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}
        count = end - start + 1
        self._status = status
        self.send_response(status)
        for k, v in {"Content-Type": "application/octet-stream", **headers}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(count))
        self.end_headers()
        if head or count == 0:
            return
        with hub._changed:
            hub.active += 1
            hub.max_active = max(hub.max_active, hub.active)
            hub._changed.notify_all()
            if hub.overlap_gate and not hub.gate_opened:
                # hold every body until that many are being sent at once (then never again)
                hub.gate_opened = hub._changed.wait_for(lambda: hub.active >= hub.overlap_gate or hub.gate_opened,
                                                        timeout=hub.gate_timeout)
                hub._changed.notify_all()
        try:
            self._send_range(f, source, start, count, role_path)
        finally:
            with hub._lock:
                hub.active -= 1

    def _send_range(self, f: HubFile, source: Path, start: int, count: int, role_path: str) -> None:
        hub = self.server.hub
        sent = 0
        rate = hub.rate_limit
        stall_at = hub.stall_after.get(f.path)
        if stall_at is not None:
            with open(source, "rb") as fh:
                self.connection.sendfile(fh, start, min(stall_at, count))
            hub._count(self.server.role, role_path, min(stall_at, count))
            hub.stalled.wait(timeout=30)  # hold the connection open, sending nothing, until the test ends
            self.close_connection = True
            return
        with open(source, "rb") as fh:
            try:
                if not rate:
                    while sent < count:
                        n = self.connection.sendfile(fh, start + sent, count - sent)
                        if not n:
                            break
                        sent += n
                else:
                    step = max(rate // 20, 1)
                    t0 = time.monotonic()
                    while sent < count:
                        n = self.connection.sendfile(fh, start + sent, min(step, count - sent))
                        if not n:
                            break
                        sent += n
                        hub._count(self.server.role, role_path, n)
                        ahead = sent / rate - (time.monotonic() - t0)
                        if ahead > 0:
                            time.sleep(ahead)
            finally:
                if not rate:
                    hub._count(self.server.role, role_path, sent)
        if sent < count:
            self.close_connection = True


class LoopbackHub:
    """Two loopback HTTP servers (hub and CDN) and the repositories they serve.

    Use as a context manager; ``endpoint`` goes into ``HF_ENDPOINT``.
    """

    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.tokens: dict[str, str] = dict(tokens or {})  # token -> user
        self.fail_once: dict[str, tuple[int, dict[str, str]]] = {}  # repo path -> (status, headers), once
        self.serve_instead: dict[str, Path] = {}  # repo path -> other bytes to serve (same size in tests)
        self.rate_limit: int = 0  # bytes/s per response body, 0 = unlimited
        self.stall_after: dict[str, int] = {}  # repo path -> send this many body bytes, then nothing
        self.stalled = threading.Event()  # set on stop: releases stalled responses
        self.requests: list[RequestRecord] = []
        self.unknown_api_calls: list[str] = []
        self.bytes_sent: dict[tuple[str, str], int] = {}  # (role, repo path) -> body bytes
        self.active = 0  # bodies being sent right now
        self.max_active = 0  # the most bodies sent at once
        self.in_flight = 0  # requests being answered (a finished one is in ``requests``)
        # > 0: the first bodies wait until this many are being sent at once (or gate_timeout
        # passes); gate_opened says whether that many ever overlapped. Proves parallelism
        # without relying on transfers happening to overlap.
        self.overlap_gate = 0
        self.gate_timeout = 30.0
        self.gate_opened = False
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._hub = _Server(self, "hub")
        self._cdn = _Server(self, "cdn")
        self._threads: list[threading.Thread] = []

    # lifecycle
    def start(self) -> LoopbackHub:
        for srv in (self._hub, self._cdn):
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
                                 name=f"loopback-hub-{srv.role}")
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self.stalled.set()
        for srv in (self._hub, self._cdn):
            srv.shutdown()
            srv.server_close()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def hub_port(self) -> int:
        return int(self._hub.server_address[1])

    @property
    def cdn_port(self) -> int:
        return int(self._cdn.server_address[1])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.hub_port}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self.cdn_port}"

    # repositories
    def add_repo(self, repo_id: str, files: dict[str, Path], *, revision: str | None = None,
                 branches: Iterable[str] = ("main",), gated: bool = False,
                 lfs: dict[str, bool] | None = None, sha256: dict[str, str] | None = None) -> str:
        """Add (or add a commit to) a repo; return the commit id. Branches are moved to it."""
        entries = {p: make_file(p, src, lfs=(lfs or {}).get(p), sha256=(sha256 or {}).get(p))
                   for p, src in sorted(files.items())}
        commit = revision or hashlib.sha1(
            "".join(f"{e.path}:{e.size}:{e.sha256}\n" for e in entries.values()).encode()
            + repo_id.encode()).hexdigest()
        repo = self.repos.setdefault(repo_id, HubRepo(repo_id))
        repo.gated = repo.gated or gated
        repo.commits[commit] = entries
        for b in branches:
            repo.refs[b] = commit
        return commit

    def add_folder(self, repo_id: str, folder: Path, *, revision: str | None = None,
                   branches: Iterable[str] = ("main",), gated: bool = False,
                   exclude: Iterable[str] = ()) -> str:
        skip = set(exclude)
        files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
                 if p.is_file() and p.relative_to(folder).as_posix() not in skip}
        return self.add_repo(repo_id, files, revision=revision, branches=branches, gated=gated)

    # observations
    def _record(self, rec: RequestRecord) -> None:
        with self._lock:
            self.requests.append(rec)

    def _count(self, role: str, path: str, n: int) -> None:
        with self._lock:
            self.bytes_sent[(role, path)] = self.bytes_sent.get((role, path), 0) + n

    def sent(self, path: str) -> int:
        """Body bytes of ``path`` sent on both ports."""
        with self._lock:
            return sum(v for (_, p), v in self.bytes_sent.items() if p == path)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until no request is being answered (a killed client's response has ended and is
        recorded in ``requests`` and the byte counters); ``TimeoutError`` after ``timeout``."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.in_flight == 0, timeout=timeout):
                raise TimeoutError(f"the loopback hub still answered {self.in_flight} request(s) after {timeout:.0f} s")

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_sent.clear()
            self.requests.clear()

    def authorizations(self, role: str) -> list[str | None]:
        with self._lock:
            return [r.authorization for r in self.requests if r.role == role]


class _ProxyHandler(BaseHTTPRequestHandler):
    """A forward HTTP proxy for absolute-URI requests to 127.0.0.1 only (anything else: 403)."""

    protocol_version = "HTTP/1.1"
    server: _ProxyServer
    HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailers",
                     "transfer-encoding", "upgrade"})

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self._forward()

    def do_HEAD(self) -> None:
        self._forward()

    def _forward(self) -> None:
        import http.client

        u = urlsplit(self.path)
        with self.server.lock:
            self.server.seen.append((self.command, self.path, self.headers.get("Authorization")))
        if u.scheme != "http" or u.hostname != "127.0.0.1" or not u.port:
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        conn = http.client.HTTPConnection("127.0.0.1", u.port, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in self.HOP}
            conn.request(self.command, u.path + (f"?{u.query}" if u.query else ""), headers=headers)
            resp = conn.getresponse()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in self.HOP:
                    self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                while block := resp.read(1 << 20):
                    self.wfile.write(block)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        finally:
            conn.close()


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []  # method, absolute URL, Authorization
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


@contextlib.contextmanager
def loopback_proxy() -> Iterator[_ProxyServer]:
    """A forward proxy on 127.0.0.1 (for HTTP_PROXY); ``.seen`` lists what went through it."""
    srv = _ProxyServer()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=5)


def tiny_facts(tiny_dir: Path) -> tuple[str, dict[str, Path]]:
    """The revision the tiny checkpoint's manifest pins, and its files (manifest.toml excluded)."""
    from provision.formats.manifest import load_manifest

    m = load_manifest(tiny_dir / "manifest.toml")
    src = m.source("hf")
    assert src is not None and src.revision is not None
    return src.revision, {f.path: tiny_dir / f.path for f in m.files}


@contextlib.contextmanager
def serve_tiny(tiny_dir: Path, **kwargs: Any) -> Iterator[LoopbackHub]:
    """A hub serving the tiny checkpoint as ``provision/tiny-pixtral`` at its manifest revision and ``main``."""
    from provision.testing.tiny import TINY_REPO

    rev, files = tiny_facts(tiny_dir)
    with LoopbackHub(**kwargs) as hub:
        hub.add_repo(TINY_REPO, files, revision=rev)
        yield hub


TOKENS = {"hf_alice_token_0123456789": "alice", "hf_bob_token_0123456789": "bob"}  # test users of the loopback hub


def main(argv: list[str] | None = None) -> int:
    """``python -m provision.testing.hub_server FOLDER [REPO] [--seconds N] [--rate B]``: serve FOLDER as
    REPO on 127.0.0.1 for at most N seconds (default 3600), each body at most B bytes/s (default 0,
    unlimited); print one JSON line (endpoint, cdn, repo, commit, files: {path: sha256}) once
    ready. Used by benchmarks/hub_fetch.py and benchmarks/run_overlap.py."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m provision.testing.hub_server")
    ap.add_argument("folder", type=Path)
    ap.add_argument("repo", nargs="?", default="local/repo")
    ap.add_argument("--seconds", type=float, default=3600.0)
    ap.add_argument("--rate", type=int, default=0)
    args = ap.parse_args(argv)
    with LoopbackHub() as h:
        h.rate_limit = args.rate
        commit = h.add_folder(args.repo, args.folder)
        files = {p: f.sha256 for p, f in h.repos[args.repo].commits[commit].items()}
        print(json.dumps({"endpoint": h.endpoint, "cdn": h.cdn_url, "repo": args.repo, "commit": commit,
                          "files": files}), flush=True)
        deadline = time.monotonic() + args.seconds
        with contextlib.suppress(KeyboardInterrupt):
            while time.monotonic() < deadline and not sys.stdin.closed:
                time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
