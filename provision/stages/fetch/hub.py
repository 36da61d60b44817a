"""The Hugging Face Hub source: pinned, verified, resumable downloads. The only module that
imports huggingface_hub.

What it does:

* ``hub_listing(ref)``: resolve ``hf://org/repo[@rev]`` to one commit and list that commit's
  files (path, size, LFS sha256) for ``plan``.
* ``fetch_hub(plan, dest=, options=, progress=)``: bring the plan's files from the Hub into
  ``dest``. huggingface_hub does what it does well: the token (``--token``, ``HF_TOKEN`` or
  the saved ``hf auth login``), the endpoint (``HF_ENDPOINT``), the commit a branch points to
  and each file's metadata (LFS sha256, git blob id). The bytes themselves go through our own
  HTTP Range download of the file's ``resolve`` URL with huggingface_hub's own HTTP client
  (httpx2), hashing while downloading, into a partial file in the staging folder keyed by the
  expected hash and size, with a provenance sidecar; a later process resumes it, a partial
  whose provenance does not match is discarded. 429/5xx are retried with backoff honouring
  ``Retry-After``; no byte for ``stall_timeout`` seconds is a ``StallError``. The token is
  sent to the endpoint only, never to a host a redirect leads to. Files download in parallel
  (``max_workers``), are checked by ``provision.stages.verify`` (manifest sha256, else the Hub's LFS
  sha256, else the git blob SHA-1) and only then renamed under their final name. Files with
  the same content are downloaded once; a resumed file that fails verification is fetched
  again from byte 0 once (the kept bytes may be what was damaged); one process at a time
  writes a partial (``flock``, else exit 6).
* ``HF_HUB_OFFLINE=1``: nothing goes on the network; a complete, verified local copy is
  success, an incomplete one a ``FetchError`` (exit 4) naming what is missing.

What it does not do: it never prints or exits (progress goes through the callback), never
writes to huggingface_hub's cache, never loads hf_xet (Xet-backed files come as plain bytes
through the resolve redirect), never logs or reports the token, and does not check
``params.json`` against the tensors (``provision verify`` does, on the whole folder).

Staging layout (``Layout(home).staging(model)``)::

    staging/<model>/
    ├── hub/<sha256-or-sha1>-<size>.part     bytes received so far (never trusted as such)
    ├── hub/<sha256-or-sha1>-<size>.json     provenance: what the bytes are supposed to be
    ├── hub/<sha256-or-sha1>-<size>.lock     held (flock) by the process writing the partial
    ├── hub/verify/<path>                    a finished download while it is being verified
    └── hub-record.json                      refs -> commit and the commit's listing (offline use)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import random
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urljoin, urlsplit

from provision.errors import (
    AuthError,
    FetchError,
    HashMismatchError,
    LockTimeoutError,
    NotFoundError,
    ProvisionError,
    SizeMismatchError,
    StallError,
    VerifyError,
)
from provision.formats.sources import HEX40, HFRef
from provision.io.atomic import TMP_PREFIX, fsync_dir
from provision.io.paths import safe_join, safe_relpath
from provision.layout import Layout
from provision.progress import ProgressEvent, ProgressFn, note
from provision.stages.fetch.request import FetchedFile, FetchResult, HubOptions

if TYPE_CHECKING:
    import httpx2

    from provision.stages.fetch.request import FetchRequest as Plan

PARTIAL_SCHEMA = 1
RECORD_SCHEMA = 1
HASH_QUEUE_DEPTH = 32  # chunks (up to READ_SIZE each) waiting for the hasher thread
READ_SIZE = 1 << 20
PROGRESS_EVERY_S = 0.25
MAX_REDIRECTS = 5
MAX_RETRY_AFTER_S = 120.0
_TRUE = {"1", "true", "yes", "on"}


# ---------------------------------------------------------------------------------------
# environment: endpoint, offline mode, token


def hub_endpoint() -> str:
    """``HF_ENDPOINT`` as it is now (huggingface_hub reads it once, at import)."""
    env = os.environ.get("HF_ENDPOINT")
    if env:
        return env.rstrip("/")
    from huggingface_hub import constants

    return str(constants.ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as it is now (huggingface_hub reads it once, at import)."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        v = os.environ.get(name)
        if v is not None and v.strip():
            return v.strip().lower() in _TRUE
    return False


_PROCESS_OPTIONS = HubOptions()


def use_options(options: HubOptions) -> None:
    """Options for this process's ``hub_listing`` calls (the CLI passes ``--token`` and
    ``--stall-timeout`` here so ``plan``'s listing of a private repo uses them). In memory only."""
    global _PROCESS_OPTIONS
    _PROCESS_OPTIONS = options


def _token(options: HubOptions) -> str | None:
    """--token (which the CLI fills from HF_TOKEN), else what huggingface_hub finds: HF_TOKEN or
    the token ``hf auth login`` saved."""
    if options.token:
        return options.token
    from huggingface_hub.utils import get_token

    try:
        return get_token()
    except Exception:
        return None


def _write_small(path: Path, text: str) -> None:
    """Replace a small bookkeeping file atomically, without fsync: losing it to a power cut only
    means a partial is discarded or a listing is fetched again, never that bytes are trusted."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{threading.get_ident()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _origin(url: str) -> tuple[str, str, int]:
    p = urlsplit(url)
    return p.scheme, (p.hostname or "").lower(), p.port or {"http": 80, "https": 443}.get(p.scheme, 0)


# ---------------------------------------------------------------------------------------
# what the Hub says about a repo


@dataclass(frozen=True)
class RemoteFile:
    path: str  # path in the repo
    size: int
    blob_id: str | None  # git blob SHA-1 (of the content, or of the LFS pointer for LFS files)
    lfs_sha256: str | None  # None for files kept in git (Xet-backed files have it too)


@dataclass(frozen=True)
class Snapshot:
    repo: str
    revision: str  # what was asked for
    commit: str  # what it resolved to
    files: dict[str, RemoteFile]

    def listing(self) -> list[tuple[str, int | None, str | None]]:
        return [(f.path, f.size, f.lfs_sha256) for f in sorted(self.files.values(), key=lambda f: f.path)]


_RESOLVED: dict[tuple[str, str, str], Snapshot] = {}  # (endpoint, repo, revision) -> what hub_listing saw
_RESOLVED_LOCK = threading.Lock()


def _status(err: BaseException) -> int | None:
    resp = getattr(err, "response", None)
    code = getattr(resp, "status_code", None)
    return int(code) if isinstance(code, int) else None


def _retry_after(headers: Any, attempt: int) -> float:
    """Seconds to wait: the server's Retry-After (seconds or a date), else exponential backoff."""
    raw = headers.get("Retry-After") if headers is not None else None
    if raw:
        raw = raw.strip()
        if raw.isdigit():
            return min(float(raw), MAX_RETRY_AFTER_S)
        with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
            when = parsedate_to_datetime(raw).timestamp()
            return min(max(when - time.time(), 0.0), MAX_RETRY_AFTER_S)
    return min(0.5 * 2**attempt, 30.0) * (0.75 + 0.5 * random.random())


def _hub_error(err: BaseException, *, repo: str, revision: str, path: str | None, token: bool,
               endpoint: str) -> ProvisionError:
    """Turn a huggingface_hub/httpx2 error into ours, with a message saying what to do."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = _status(err)
    uri = f"hf://{repo}@{revision}"
    page = f"{endpoint}/{repo}"
    ctx: dict[str, Any] = {"repo": repo, "revision": revision, "status": status}
    if path:
        ctx["path"] = path
    login = "pass --token, set HF_TOKEN, or run `hf auth login`"
    if isinstance(err, GatedRepoError) or (isinstance(err, HfHubHTTPError) and status in (401, 403)
                                           and "gated" in str(err).lower()):
        if status == 403 or token:
            return AuthError(f"{uri} is a gated repo and the licence has not been accepted for this token's account.",
                             hint=f"Open {page} while logged in as that user, accept the licence, then run again.",
                             **ctx)
        return AuthError(f"{uri} is a gated repo and no Hugging Face token was given.",
                         hint=f"Accept the licence on {page}, then {login}, and run again.", **ctx)
    if isinstance(err, RevisionNotFoundError):
        return NotFoundError(f"Revision {revision!r} does not exist in {repo}.",
                             hint="Check the branch, tag or commit id.", **ctx)
    if isinstance(err, RemoteEntryNotFoundError) or (status == 404 and path):
        return NotFoundError(f"{path} does not exist in {uri}.",
                             hint="Check the file name and revision in the manifest.", **ctx)
    if isinstance(err, RepositoryNotFoundError) or status == 404:
        if status == 401 and not token:
            return AuthError(f"{repo} was not found on {endpoint}, or it is private and no token was given.",
                             hint=f"Check the repo name; if it is private, {login}.", **ctx)
        if status == 401:
            return AuthError(f"The token was refused for {repo} on {endpoint} (invalid or without access).",
                             hint="Create a read token at https://huggingface.co/settings/tokens and pass it.", **ctx)
        return NotFoundError(f"{repo} was not found on {endpoint}.",
                             hint="Check the repo name (org/name); a private repo also needs a token.", **ctx)
    if status == 401:
        return AuthError(f"{endpoint} refused the request for {uri} (401): the token is missing or invalid.",
                         hint=f"{login.capitalize()}.", **ctx)
    if status == 403:
        return AuthError(f"{endpoint} forbids access to {uri} (403).",
                         hint=f"Check that your token can read {repo} and that its licence is accepted on {page}.",
                         **ctx)
    if isinstance(err, OfflineModeIsEnabled):
        return FetchError(f"huggingface_hub is in offline mode, so {uri} cannot be reached.",
                          hint="Unset HF_HUB_OFFLINE to download.", **ctx)
    if isinstance(err, httpx2.TimeoutException):
        return StallError(f"{endpoint} did not answer for {uri} in time.",
                          hint="Check the network or HF_ENDPOINT and run again.", **ctx)
    if isinstance(err, (httpx2.TransportError, OSError)):
        return FetchError(f"Cannot reach {endpoint} for {uri}: {type(err).__name__}.",
                          hint="Check the network, proxies and HF_ENDPOINT, then run again.", **ctx)
    return FetchError(f"The Hub answered {status} for {uri}{' ' + path if path else ''}.",
                      hint="Run again later; if it persists check HF_ENDPOINT.", **ctx)


def _with_retries(fn: Callable[[], Any], *, retries: int, what: Callable[[BaseException], ProvisionError],
                  progress: ProgressFn | None = None, give_up_after: float = 120.0) -> Any:
    """Call ``fn``; retry 429/5xx and transport errors with backoff honouring Retry-After.
    Transport errors (no answer at all) stop being retried ``give_up_after`` seconds after the first."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    attempt = 0
    first_failure: float | None = None
    while True:
        try:
            return fn()
        except (HfHubHTTPError, httpx2.TransportError) as e:
            status = _status(e)
            transient = status in (408, 429) or (status is not None and status >= 500) or (
                status is None and isinstance(e, httpx2.TransportError))
            if first_failure is None:
                first_failure = time.monotonic()
            if not transient or attempt >= retries or (
                    status is None and time.monotonic() - first_failure > give_up_after):
                raise what(e) from None
            wait_s = _retry_after(getattr(getattr(e, "response", None), "headers", None), attempt)
            note(progress, "hf", f"the Hub answered {status or type(e).__name__}; retrying in {wait_s:.1f} s")
            time.sleep(wait_s)
            attempt += 1


def _snapshot(endpoint: str, repo: str, revision: str, token: str | None, options: HubOptions,
              progress: ProgressFn | None = None, commit: str | None = None) -> Snapshot:
    """Resolve ``revision`` to a commit (unless given) and list every file of that commit."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token if token else False)

    def err(e: BaseException) -> ProvisionError:
        return _hub_error(e, repo=repo, revision=revision, path=None, token=bool(token), endpoint=endpoint)

    if commit is None:
        info = _with_retries(lambda: api.model_info(repo, revision=revision, timeout=options.stall_timeout),
                             retries=options.retries, what=err, progress=progress,
                             give_up_after=options.stall_timeout)
        commit = str(info.sha or "")
        if not HEX40.match(commit):
            raise FetchError(f"{endpoint} did not return a commit id for {repo}@{revision}.",
                             hint="Check that HF_ENDPOINT points to a Hugging Face Hub.", repo=repo)
    pinned = commit

    def listing() -> list[Any]:
        return list(api.list_repo_tree(repo, revision=pinned, recursive=True))

    entries = _with_retries(listing, retries=options.retries, what=err, progress=progress,
                            give_up_after=options.stall_timeout)
    from huggingface_hub.hf_api import RepoFile

    files: dict[str, RemoteFile] = {}
    for e in entries:
        if not isinstance(e, RepoFile):
            continue  # a folder
        path = str(e.path)
        safe_relpath(path, what=f"file name from {repo}")
        lfs = e.lfs
        files[path] = RemoteFile(path=path, size=int(e.size), blob_id=e.blob_id,
                                 lfs_sha256=str(lfs.sha256).lower() if lfs is not None else None)
    return Snapshot(repo=repo, revision=revision, commit=pinned, files=files)


def hub_listing(ref: HFRef) -> list[tuple[str, int | None, str | None]]:
    """Files of ``ref`` at the commit its revision points to now: (path, size, LFS sha256 or None).

    The commit is remembered for this process so the following ``fetch_hub`` of the same ref
    downloads from exactly the commit that was listed. With ``HF_HUB_OFFLINE`` set, the listing
    recorded by the last fetch is returned (empty when there is none).
    """
    from provision.settings import Settings

    revision = ref.revision or "main"
    if hub_offline():
        rec = _Record(Layout(Settings.load().home).staging(ref.repo))
        snap = rec.snapshot(ref.repo, revision)
        return snap.listing() if snap else []
    endpoint = hub_endpoint()
    opts = _PROCESS_OPTIONS
    snap = _snapshot(endpoint, ref.repo, revision, _token(opts), opts)
    with _RESOLVED_LOCK:
        _RESOLVED[(endpoint, ref.repo, revision)] = snap
    return snap.listing()


# ---------------------------------------------------------------------------------------
# the record kept for offline use


class _Record:
    """``hub-record.json``: which commit each revision resolved to, and each commit's files."""

    def __init__(self, staging: Path) -> None:
        self.path = staging / "hub-record.json"

    def load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {"schema": RECORD_SCHEMA, "repos": {}}
        if not isinstance(data, dict) or data.get("schema") != RECORD_SCHEMA or not isinstance(data.get("repos"), dict):
            return {"schema": RECORD_SCHEMA, "repos": {}}
        return data

    def save(self, snap: Snapshot) -> None:
        data = self.load()
        r = data["repos"].setdefault(snap.repo, {"refs": {}, "commits": {}})
        r["refs"][snap.revision] = snap.commit
        r["commits"][snap.commit] = [[f.path, f.size, f.blob_id, f.lfs_sha256] for f in snap.files.values()]
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _write_small(self.path, json.dumps(data, indent=1, sort_keys=True) + "\n")

    def snapshot(self, repo: str, revision: str) -> Snapshot | None:
        r = self.load()["repos"].get(repo)
        if not isinstance(r, dict):
            return None
        commit = revision if HEX40.match(revision) else r.get("refs", {}).get(revision)
        rows = r.get("commits", {}).get(commit) if commit else None
        if not isinstance(rows, list):
            return None
        try:
            files = {str(p): RemoteFile(path=str(p), size=int(s), blob_id=b, lfs_sha256=sh) for p, s, b, sh in rows}
        except (TypeError, ValueError):
            return None
        for p in files:
            safe_relpath(p, what=f"file name recorded for {repo}")
        return Snapshot(repo=repo, revision=revision, commit=str(commit), files=files)


# ---------------------------------------------------------------------------------------
# what to fetch


@dataclass(frozen=True)
class Wanted:
    path: str  # relative path under dest
    repo_path: str  # path in the repo
    size: int
    kind: str  # manifest-sha256 | hub-lfs-sha256 | git-blob-sha1
    sha256: str | None
    git_sha1: str | None

    @property
    def key(self) -> str:
        digest = self.sha256 if self.sha256 else self.git_sha1
        return f"{digest}-{self.size}"

    def authority(self) -> Any:
        from provision.stages.verify import Authority

        return Authority(kind=self.kind, size=self.size, sha256=self.sha256,
                         git_sha1=self.git_sha1 if self.kind == "git-blob-sha1" else None)


def _wanted(plan: Plan, snap: Snapshot, prefix: str) -> tuple[list[Wanted], list[str]]:
    """Pair the plan's files with the Hub's facts; refuse disagreements before downloading."""
    out: list[Wanted] = []
    skipped: list[str] = []
    if plan.kind == "hf":
        names = [f.path for f in plan.files] if plan.files else sorted(snap.files)
        specs: list[tuple[str, int | None, str | None, str | None, bool]] = [(n, None, None, None, False) for n in names]
    else:
        assert plan.manifest is not None
        specs = []
        for pf in plan.files:
            if "hf" not in pf.sources:
                skipped.append(pf.path)
                continue
            fs = plan.manifest.file(pf.path)
            specs.append((pf.path, pf.size, pf.sha256, fs.git_sha1 if fs else None, pf.optional))
    for path, size, sha, gsha, optional in specs:
        repo_path = prefix + path
        rf = snap.files.get(repo_path)
        if rf is None:
            if optional:
                skipped.append(path)
                continue
            raise NotFoundError(f"{repo_path} is not in hf://{snap.repo}@{snap.commit}.",
                                hint="Check the manifest's file list, prefix and revision.",
                                repo=snap.repo, commit=snap.commit, path=repo_path)
        if size is not None and size != rf.size:
            raise SizeMismatchError(
                f"{repo_path} is {rf.size} bytes at hf://{snap.repo}@{snap.commit} but the manifest says {size}.",
                hint="The manifest and the pinned revision disagree; fix the manifest.",
                path=path, expected=size, actual=rf.size)
        if sha and rf.lfs_sha256 and sha != rf.lfs_sha256:
            raise HashMismatchError(
                f"{repo_path} has sha256 {rf.lfs_sha256} at hf://{snap.repo}@{snap.commit} but the manifest says {sha}.",
                hint="The manifest and the pinned revision disagree; fix the manifest.",
                path=path, expected=sha, actual=rf.lfs_sha256)
        if sha:
            out.append(Wanted(path, repo_path, rf.size, "manifest-sha256", sha, None))
        elif rf.lfs_sha256:
            out.append(Wanted(path, repo_path, rf.size, "hub-lfs-sha256", rf.lfs_sha256, None))
        elif gsha or rf.blob_id:
            out.append(Wanted(path, repo_path, rf.size, "git-blob-sha1", None, gsha or rf.blob_id))
        else:
            raise FetchError(f"The Hub gave no hash for {repo_path} in {snap.repo}, so it cannot be verified.",
                             hint="Pin its sha256 in the manifest.", path=repo_path)
    return out, skipped


def _wanted_offline(plan: Plan, snap: Snapshot | None, prefix: str) -> list[Wanted]:
    if snap is not None:
        return _wanted(plan, snap, prefix)[0]
    if plan.kind == "hf" or plan.manifest is None:
        assert plan.hf is not None
        raise FetchError(
            f"HF_HUB_OFFLINE is set and there is no record of a previous fetch of {plan.hf.uri}.",
            hint="Unset HF_HUB_OFFLINE and fetch once with the network, or use a manifest.", repo=plan.hf.repo)
    out = []
    for pf in plan.files:
        if "hf" not in pf.sources:
            continue
        fs = plan.manifest.file(pf.path)
        if pf.size is None or not (pf.sha256 or (fs and fs.git_sha1)):
            raise FetchError(f"HF_HUB_OFFLINE is set and the manifest pins no size and hash for {pf.path}, so the "
                             "local copy cannot be verified.", hint="Unset HF_HUB_OFFLINE, or lock the manifest.",
                             path=pf.path)
        if pf.sha256:
            out.append(Wanted(pf.path, prefix + pf.path, pf.size, "manifest-sha256", pf.sha256, None))
        else:
            assert fs is not None
            out.append(Wanted(pf.path, prefix + pf.path, pf.size, "git-blob-sha1", None, fs.git_sha1))
    return out


# ---------------------------------------------------------------------------------------
# progress


class _Progress:
    """Per-file and total byte counters, reported through the (serialised) callback."""

    def __init__(self, fn: ProgressFn | None, total: int) -> None:
        self.fn = fn
        self.total = total
        self.done_total = 0
        self.lock = threading.Lock()
        self.last: dict[str, float] = {}

    def file(self, w: Wanted, done: int, *, finished: bool = False, delta: int = 0, force: bool = False) -> None:
        with self.lock:
            self.done_total += delta
            if self.fn is None:
                return
            now = time.monotonic()
            if not (finished or force) and now - self.last.get(w.path, 0.0) < PROGRESS_EVERY_S:
                return
            self.last[w.path] = now
            self.fn(ProgressEvent(task=f"hf:{w.path}", done=done, total=w.size, description=w.path,
                                  finished=finished))
            self.fn(ProgressEvent(task="hf:total", done=self.done_total, total=self.total,
                                  description="total", finished=finished and self.done_total >= self.total))


# ---------------------------------------------------------------------------------------
# hashing beside the download


class _Hasher:
    """sha256 of a stream, computed on its own thread (hashlib releases the GIL) so hashing
    overlaps receiving and writing."""

    def __init__(self, initial: hashlib._Hash | None = None) -> None:
        self.h = initial or hashlib.sha256()
        self.q: queue.Queue[bytes | None] = queue.Queue(HASH_QUEUE_DEPTH)
        self.t = threading.Thread(target=self._run, daemon=True, name="hub-hash")
        self.t.start()

    def _run(self) -> None:
        while (b := self.q.get()) is not None:
            self.h.update(b)

    def update(self, b: bytes) -> None:
        self.q.put(b)

    def hexdigest(self) -> str:
        self.close()
        return self.h.hexdigest()

    def close(self) -> None:
        if self.t.is_alive():
            self.q.put(None)
            self.t.join()


def _hash_prefix(path: Path, length: int) -> hashlib._Hash:
    h = hashlib.sha256()
    left = length
    with open(path, "rb") as f:
        while left > 0:
            b = f.read(min(1 << 22, left))
            if not b:
                break
            h.update(b)
            left -= len(b)
    return h


# ---------------------------------------------------------------------------------------
# one file: resumable ranged download of the resolve URL


@dataclass
class _Ctx:
    endpoint: str
    repo: str
    commit: str
    token: str | None
    options: HubOptions
    staging: Path
    progress: _Progress
    note: ProgressFn | None
    cancel: threading.Event = field(default_factory=threading.Event)
    retries_used: int = 0
    resumed: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Restart(Exception):
    """The server ignored or refused our range: start the file again from byte 0."""


def _provenance(ctx: _Ctx, w: Wanted) -> dict[str, Any]:
    return {"schema": PARTIAL_SCHEMA, "source": "hf", "kind": w.kind, "sha256": w.sha256, "git_sha1": w.git_sha1,
            "size": w.size}


def _partial(ctx: _Ctx, w: Wanted) -> tuple[Path, int]:
    """The partial file for ``w`` and how many of its bytes can be trusted to continue from."""
    d = ctx.staging / "hub"
    d.mkdir(parents=True, exist_ok=True)
    part, side = d / f"{w.key}.part", d / f"{w.key}.json"
    want = _provenance(ctx, w)
    try:
        have = json.loads(side.read_text())
    except (OSError, ValueError):
        have = None
    size = part.stat().st_size if part.exists() else 0
    if not isinstance(have, dict) or {k: have.get(k) for k in want} != want or size > w.size:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        size = 0
        record = dict(want, repo=ctx.repo, commit=ctx.commit, path=w.repo_path, started=time.time())
        _write_small(side, json.dumps(record, indent=1) + "\n")
    return part, size


def _discard(ctx: _Ctx, w: Wanted) -> None:
    d = ctx.staging / "hub"
    for p in (d / f"{w.key}.part", d / f"{w.key}.json"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _resolve_url(ctx: _Ctx, w: Wanted) -> str:
    return f"{ctx.endpoint}/{ctx.repo}/resolve/{ctx.commit}/{quote(w.repo_path)}"


@contextlib.contextmanager
def _open(ctx: _Ctx, w: Wanted, offset: int) -> Iterator[httpx2.Response]:
    """GET the resolve URL from ``offset``, following redirects ourselves so the token never
    leaves the endpoint's origin. Yields a streaming response with status 200 or 206."""
    import httpx2
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = _resolve_url(ctx, w)
    home = _origin(ctx.endpoint)
    headers = build_hf_headers(token=ctx.token if ctx.token else False, library_name="provision")
    headers["Accept-Encoding"] = "identity"
    if offset:
        headers["Range"] = f"bytes={offset}-"
    timeout = httpx2.Timeout(ctx.options.stall_timeout, connect=min(30.0, ctx.options.stall_timeout))
    session = get_session()
    left_home = False
    for _hop in range(MAX_REDIRECTS + 1):
        send = dict(headers)
        left_home = left_home or _origin(url) != home
        if left_home:  # a host a redirect led to (a CDN, a signed URL) never sees the token
            send.pop("authorization", None)
            send.pop("Authorization", None)
        req = session.build_request("GET", url, headers=send, timeout=timeout)
        resp = session.send(req, stream=True, follow_redirects=False)
        try:
            if resp.is_redirect and resp.headers.get("Location"):
                url = urljoin(url, resp.headers["Location"])
                continue
            if resp.status_code == 416:
                raise _Restart()
            if resp.status_code >= 400:
                resp.read()
                hf_raise_for_status(resp)
            if resp.status_code not in (200, 206):
                raise FetchError(f"Unexpected HTTP {resp.status_code} for {w.repo_path} from {ctx.endpoint}.",
                                 hint="Check HF_ENDPOINT.", path=w.repo_path)
            yield resp
            return
        finally:
            resp.close()
    raise FetchError(f"Too many redirects for {w.repo_path} from {ctx.endpoint}.", hint="Check HF_ENDPOINT.",
                     path=w.repo_path)


def _body(resp: httpx2.Response, timeout: float) -> Iterator[bytes]:
    """The raw body of ``resp``.

    The bytes h11 already buffered come through httpx2's ``iter_raw`` (which drains its buffer
    in one chunk); then a plain HTTP/1.1 body of known length is read straight from the
    connection's network stream (httpcore's ``network_stream`` extension) in ``READ_SIZE``
    reads, because h11's 64 KiB parsing loop caps a download at about half the loopback rate.
    The connection is closed afterwards, never reused. Anything else (chunked, compressed,
    HTTP/2) goes through ``iter_raw`` only."""
    import httpcore2
    import httpx2

    it = resp.iter_raw()
    h = resp.headers
    clen = h.get("Content-Length", "")
    ns = resp.extensions.get("network_stream")
    fast = (resp.http_version == "HTTP/1.1" and clen.isdigit() and ns is not None and hasattr(ns, "read")
            and h.get("Content-Encoding", "identity").lower() in ("", "identity")
            and "chunked" not in h.get("Transfer-Encoding", "").lower())
    if not fast or ns is None:
        yield from it
        return
    left = int(clen)
    first = next(it, b"")
    if first:
        left -= len(first)
        yield first
    while left > 0:
        try:
            b = ns.read(min(READ_SIZE, left), timeout)
        except httpcore2.TimeoutException as e:
            raise httpx2.ReadTimeout(str(e) or "read timed out") from None
        except (httpcore2.NetworkError, httpcore2.ProtocolError, OSError) as e:
            raise httpx2.ReadError(str(e) or type(e).__name__) from None
        if not b:
            raise httpx2.RemoteProtocolError("the server closed the connection before the body was complete")
        left -= len(b)
        yield b


def _download(ctx: _Ctx, w: Wanted) -> tuple[Path, str, int]:
    """Download ``w`` into its partial file; return (partial, sha256, bytes received now)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    part, offset = _partial(ctx, w)
    if w.size == 0:
        part.touch()
    if offset:
        with ctx.lock:
            ctx.resumed[w.path] = offset
        note(ctx.note, "hf", f"{w.path}: resuming at {offset} of {w.size} bytes")
    h = _hash_prefix(part, offset) if offset else hashlib.sha256()
    received = 0
    attempt = 0
    restarts = 0
    last_progress = time.monotonic()
    ctx.progress.file(w, offset, delta=offset, force=True)
    while offset < w.size:
        if ctx.cancel.is_set():
            raise FetchError("Cancelled.", path=w.path)
        hasher = _Hasher(h)
        try:
            with _open(ctx, w, offset) as resp:
                if resp.status_code == 200 and offset:
                    raise _Restart()
                if resp.status_code == 206:
                    m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
                    if not m or int(m.group(1)) != offset:
                        raise _Restart()
                last_progress = time.monotonic()
                with open(part, "r+b" if part.exists() else "wb") as out:
                    out.seek(offset)
                    out.truncate()
                    for chunk in _body(resp, ctx.options.stall_timeout):
                        if ctx.cancel.is_set():
                            raise FetchError("Cancelled.", path=w.path)
                        if offset + len(chunk) > w.size:
                            raise SizeMismatchError(
                                f"{w.repo_path} from {ctx.endpoint} is longer than the {w.size} bytes expected.",
                                hint="The Hub and the expected size disagree; check the manifest.", path=w.path)
                        out.write(chunk)
                        hasher.update(chunk)
                        offset += len(chunk)
                        received += len(chunk)
                        ctx.progress.file(w, offset, delta=len(chunk))
                    out.flush()
                    if offset == w.size:  # durable before it is verified and renamed into place
                        os.fsync(out.fileno())
                last_progress = time.monotonic()
                attempt = 0
                if offset < w.size:
                    raise httpx2.RemoteProtocolError("the response ended before the file did")
            hasher.close()
            h = hasher.h
        except _Restart:
            hasher.close()
            restarts += 1
            if restarts > 2:
                raise FetchError(f"{ctx.endpoint} keeps refusing ranges for {w.repo_path}.",
                                 hint="Run again later.", path=w.path) from None
            note(ctx.note, "hf", f"{w.path}: the server did not continue at byte {offset}; starting over")
            ctx.progress.file(w, 0, delta=-offset, force=True)
            offset = 0
            h = hashlib.sha256()
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
            continue
        except httpx2.ReadTimeout:
            hasher.close()
            raise StallError(f"No data for {w.path} from {ctx.endpoint} for {ctx.options.stall_timeout:.0f} s.",
                             hint="Run again to resume, or raise --stall-timeout.", path=w.path,
                             received=offset, size=w.size) from None
        except (HfHubHTTPError, httpx2.TransportError) as e:
            hasher.close()
            h = hasher.h
            status = _status(e)
            transient = status in (408, 429) or (status is not None and status >= 500) or status is None
            if not transient:
                raise _hub_error(e, repo=ctx.repo, revision=ctx.commit, path=w.repo_path, token=bool(ctx.token),
                                 endpoint=ctx.endpoint) from None
            if attempt >= ctx.options.retries or (
                    status is None and time.monotonic() - last_progress > ctx.options.stall_timeout):
                err = _hub_error(e, repo=ctx.repo, revision=ctx.commit, path=w.repo_path, token=bool(ctx.token),
                                 endpoint=ctx.endpoint)
                raise type(err)(f"{err.message} Gave up after {attempt + 1} attempts.", hint=err.hint,
                                **err.context) from None
            wait_s = _retry_after(getattr(getattr(e, "response", None), "headers", None), attempt)
            with ctx.lock:
                ctx.retries_used += 1
            note(ctx.note, "hf", f"{w.path}: {status or type(e).__name__}; retrying in {wait_s:.1f} s "
                                 f"(attempt {attempt + 2} of {ctx.options.retries + 1})")
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and not ctx.cancel.is_set():
                time.sleep(min(0.1, max(deadline - time.monotonic(), 0)))
            attempt += 1
            if status is not None:
                last_progress = time.monotonic()
            continue
        except BaseException:
            hasher.close()
            raise
    ctx.progress.file(w, offset, finished=True)
    return part, h.hexdigest(), received


# ---------------------------------------------------------------------------------------
# verify, then move into place


def _verify(root: Path, items: dict[str, Wanted], known: dict[str, str], progress: ProgressFn | None = None) -> Any:
    """Content hashes (and safetensors structure) through ``provision.stages.verify``; the params.json
    versus tensors check belongs to ``provision verify`` on the whole folder, not to a download."""
    from provision.stages.verify import verify_files

    return verify_files(root, {p: w.authority() for p, w in items.items()},
                        known_sha256={p: s for p, s in known.items() if p in items},
                        structure=True, check_params=False, progress=progress)


def _place(src: Path, target: Path) -> None:
    """Move a verified file under its final name atomically (copy + rename across filesystems)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, target)
    except OSError as e:
        if e.errno != 18:  # EXDEV: another filesystem
            raise
        tmp = target.parent / f"{TMP_PREFIX}{target.name}.{os.getpid()}"
        try:
            with open(src, "rb") as fi, open(tmp, "wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 22)
                fo.flush()
                os.fsync(fo.fileno())
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        src.unlink()
    fsync_dir(target.parent)


def _verify_root(ctx: _Ctx, w: Wanted) -> Path:
    """A verify folder of this file's own: files downloading in parallel never see each other
    (a folder scan racing another file's rename into place would fail)."""
    return ctx.staging / "hub" / "verify" / w.key


def _check_and_place(ctx: _Ctx, w: Wanted, staged: Path, sha: str | None, dest: Path, part: Path | None) -> None:
    """Verify ``staged`` (a finished download under ``staging/hub/verify/<key>/<path>``) and rename
    it under its final name; a failed verdict deletes it, an interruption keeps it as the partial."""
    try:
        report = _verify(_verify_root(ctx, w), {w.path: w}, {w.path: sha} if sha else {})
        report.raise_for_failure()
    except VerifyError:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
        _discard(ctx, w)
        _prune(_verify_root(ctx, w))
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            if part is not None:
                os.replace(staged, part)  # not a verdict on the bytes: keep them for the next run
            else:
                staged.unlink()
        _prune(_verify_root(ctx, w))
        raise
    _place(staged, safe_join(dest, w.path))
    _prune(_verify_root(ctx, w))


def _prune(root: Path) -> None:
    """Remove the empty folders of a per-file verify root (and the root itself when empty)."""
    if not root.is_dir():
        return
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()


@contextlib.contextmanager
def _partial_lock(ctx: _Ctx, w: Wanted) -> Iterator[None]:
    """Only one process writes a partial at a time (``flock`` on ``<key>.lock`` beside it)."""
    import fcntl

    d = ctx.staging / "hub"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{w.key}.lock"
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise LockTimeoutError(f"Another process is downloading {w.path} into {d} right now.",
                                   hint="Wait for it to finish (or stop it), then run again.",
                                   path=w.path, lock=str(path)) from None
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _fetch_group(ctx: _Ctx, group: list[Wanted], dest: Path) -> list[FetchedFile]:
    """Download the first of files with the same content once; copy it for the others."""
    with _partial_lock(ctx, group[0]):
        return _fetch_group_locked(ctx, group, dest)


def _fetch_group_locked(ctx: _Ctx, group: list[Wanted], dest: Path) -> list[FetchedFile]:
    w = group[0]
    received = 0
    for attempt in (1, 2):
        part, sha, got = _download(ctx, w)
        received += got
        staged = safe_join(_verify_root(ctx, w), w.path)
        staged.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, staged)
        try:
            _check_and_place(ctx, w, staged, sha, dest, part)
        except VerifyError:
            # bytes kept from an earlier run (a crash, a power cut) may be what is wrong: once,
            # start that file over; fresh bytes that fail are the source's fault
            if attempt == 1 and w.path in ctx.resumed and got < w.size:
                note(ctx.note, "hf", f"{w.path}: the resumed download did not verify; downloading it again")
                ctx.progress.file(w, 0, delta=-w.size, force=True)
                continue
            raise
        break
    _discard(ctx, w)
    out = [FetchedFile(path=w.path, size=w.size, sha256=sha, authority=w.kind, downloaded_bytes=received)]
    for other in group[1:]:
        staged = safe_join(_verify_root(ctx, other), other.path)
        staged.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(safe_join(dest, w.path), staged)
        _check_and_place(ctx, other, staged, None, dest, None)
        out.append(FetchedFile(path=other.path, size=other.size, sha256=sha, authority=other.kind))
    return out


# ---------------------------------------------------------------------------------------
# the stage


def _source_of(plan: Plan) -> tuple[str, str, str]:
    """(repo, revision as asked, prefix) for an hf:// plan or a manifest's hf source."""
    if plan.kind == "hf":
        assert plan.hf is not None
        return plan.hf.repo, plan.hf.revision or "main", ""
    src = plan.manifest.source("hf") if plan.manifest is not None else None
    if src is None or src.repo is None:
        raise FetchError(f"{plan.name} has no Hugging Face source.", hint="Use --source torrent.")
    return src.repo, src.revision or "main", src.prefix  # no pinned commit: main (file hashes vouch)


def _present(dest: Path, wanted: list[Wanted],
             progress: ProgressFn | None = None) -> tuple[dict[str, FetchedFile], dict[str, str]]:
    """Files already in ``dest`` that pass verification: {path: reused file}, and {path: why not}."""
    cands = {}
    for w in wanted:
        p = safe_join(dest, w.path)
        if p.is_file() and not p.is_symlink() and p.stat().st_size == w.size:
            cands[w.path] = w
    if not cands:
        return {}, {}
    report = _verify(dest, cands, {}, progress)
    failed: dict[str, str] = {}
    ok: dict[str, FetchedFile] = {}
    for fr in report.files:
        if fr.path not in cands:
            continue
        w = cands[fr.path]
        if fr.status == "ok":
            ok[fr.path] = FetchedFile(path=w.path, size=w.size, sha256=fr.sha256 or w.sha256, authority=w.kind,
                                      reused=True)
        else:
            bad = [c.message or c.name for c in fr.checks if not c.ok]
            failed[fr.path] = bad[0] if bad else fr.status
    return ok, failed


def fetch_hub(plan: Plan, *, dest: Path, options: HubOptions, progress: ProgressFn | None) -> FetchResult:
    """Fetch ``plan``'s files from the Hub into ``dest``, verified; see the module docstring."""
    t0 = time.monotonic()
    dest = Path(dest)
    repo, revision, prefix = _source_of(plan)
    staging = Layout(plan.home).staging(plan.name)
    record = _Record(staging)
    endpoint = hub_endpoint()
    lock = threading.Lock()

    def serial(ev: ProgressEvent) -> None:
        if progress is not None:
            with lock:
                progress(ev)

    if hub_offline():
        snap = record.snapshot(repo, revision)
        wanted = _wanted_offline(plan, snap, prefix)
        present, failed = _present(dest, wanted, serial)
        missing = [w.path for w in wanted if w.path not in present]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            why = f" ({len(failed)} of them failed verification)" if failed else ""
            raise FetchError(f"HF_HUB_OFFLINE is set and {len(missing)} of {len(wanted)} files are missing from "
                             f"{dest}{why}: {shown}.",
                             hint="Unset HF_HUB_OFFLINE to download them, or copy them there.",
                             missing=missing, failed=failed, dest=str(dest))
        files = [present[w.path] for w in wanted]
        return FetchResult(dest=dest, source="hf", files=files, seconds=time.monotonic() - t0,
                           extra={"repo": repo, "revision": revision, "commit": snap.commit if snap else revision,
                                  "endpoint": endpoint, "offline": True})

    token = _token(options)
    with _RESOLVED_LOCK:
        listed = _RESOLVED.pop((endpoint, repo, revision), None)
    if listed is not None and plan.kind == "hf":
        snap = listed  # the commit and listing the plan was made from: resolved once
    else:
        pinned = revision.lower() if HEX40.match(revision) else None
        snap = _snapshot(endpoint, repo, revision, token, options, serial, commit=pinned)
    record.save(snap)
    if plan.kind == "hf":
        note(serial, "hf", f"hf://{repo}@{revision} is commit {snap.commit}")
    wanted, skipped = _wanted(plan, snap, prefix)
    present, failed = _present(dest, wanted, serial)
    for p, why in failed.items():
        note(serial, "hf", f"{p} in {dest} failed verification ({why}); downloading it again")
    todo = sorted((w for w in wanted if w.path not in present), key=lambda w: -w.size)
    prog = _Progress(serial, sum(w.size for w in wanted))
    prog.done_total = sum(w.size for w in present.values())
    ctx = _Ctx(endpoint=endpoint, repo=repo, commit=snap.commit, token=token, options=options, staging=staging,
               progress=prog, note=serial)
    results: dict[str, FetchedFile] = dict(present)
    if todo:
        dest.mkdir(parents=True, exist_ok=True)
        staging.mkdir(parents=True, exist_ok=True)
        groups: dict[str, list[Wanted]] = {}
        for w in todo:  # files with the same content share one partial: download it once
            groups.setdefault(w.key, []).append(w)
        pool = ThreadPoolExecutor(max_workers=max(1, min(options.max_workers, len(groups))),
                                  thread_name_prefix="hub-fetch")
        futures: dict[Future[list[FetchedFile]], list[Wanted]] = {}
        try:
            futures = {pool.submit(_fetch_group, ctx, g, dest): g for g in groups.values()}
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            errors = [f.exception() for f in done if f.exception() is not None]
            if errors:
                ctx.cancel.set()
                wait(futures)
                real = [e for e in (f.exception() for f in futures) if e is not None
                        and not (isinstance(e, FetchError) and e.message == "Cancelled.")]
                first = (real or errors)[0]
                assert first is not None
                raise first
            for f in futures:
                for ff in f.result():
                    results[ff.path] = ff
        finally:
            ctx.cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
    vroot = staging / "hub" / "verify"
    if vroot.is_dir():
        for d in sorted((p for p in vroot.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()  # only when empty: partials of other downloads stay
    for d in (vroot, staging / "hub"):
        with contextlib.suppress(OSError):
            d.rmdir()
    files = [results[w.path] for w in wanted]
    return FetchResult(
        dest=dest, source="hf", files=files, bytes_downloaded=sum(f.downloaded_bytes for f in files),
        seconds=time.monotonic() - t0,
        extra={"repo": repo, "revision": revision, "commit": snap.commit, "endpoint": endpoint, "prefix": prefix,
               "authenticated": bool(token), "retries": ctx.retries_used, "resumed": ctx.resumed,
               "skipped": skipped, "reverified_bad": failed})
