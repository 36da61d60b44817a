"""One file's bytes from the Hub into its resumable partial file, hashed while they arrive.

The partial lives in the staging folder under ``hub/<sha256-or-sha1>-<size>.part`` beside a
provenance sidecar (``.json``, what the bytes are supposed to be; a partial whose provenance
does not match is discarded) and a ``.lock`` that one process at a time holds (``flock``, else
``LockTimeoutError``). ``download`` continues a partial with an HTTP Range request, hashing on a
helper thread (the kept prefix is hashed first), retries 408/429/5xx and dropped connections
with backoff honouring ``Retry-After``, starts over when the server will not continue the range,
and raises ``StallError`` when no byte came for ``stall_timeout`` seconds. It does not verify or
move the finished file (``fetch`` does) and never trusts the partial's bytes as such. A full disk is
``DiskSpaceError`` (exit 6), the partial kept to resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.errors import FetchError, LockTimeoutError, SizeMismatchError, StallError
from provision.io.atomic import atomic_write_text
from provision.io.hashing import BackgroundHasher, sha256_prefix
from provision.io.space import disk_full_error, is_disk_full
from provision.progress import ProgressEvent, ProgressFn, note
from provision.stages.fetch.hub.errors import (
    RetryPolicy,
    http_status,
    hub_error,
    is_transient,
    unresolved_host,
)
from provision.stages.fetch.hub.http import RangeRefused, ResolveTarget, open_resolve, read_body
from provision.stages.fetch.hub.stream import HubStream
from provision.stages.fetch.hub.wanted import Wanted
from provision.stages.fetch.request import HubOptions

PARTIAL_SCHEMA = 1
HASH_QUEUE_DEPTH = 32  # chunks (up to READ_SIZE each) waiting for the hasher thread
PROGRESS_EVERY_S = 0.25


class ByteProgress:
    """Per-file and total byte counters, reported through the (serialised) callback."""

    def __init__(self, fn: ProgressFn | None, total: int, done: int = 0) -> None:
        self.fn = fn
        self.total = total
        self.done_total = done
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


@dataclass
class Transfer:
    """What every file download of one fetch shares: where from, where to, and the counters."""

    endpoint: str
    repo: str
    commit: str
    token: str | None
    options: HubOptions
    staging: Path
    progress: ByteProgress
    note: ProgressFn | None
    cancel: threading.Event = field(default_factory=threading.Event)
    retries_used: int = 0
    resumed: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stream: HubStream | None = None  # ``provision run`` converts the written prefix while the rest arrives
    last_byte_at: float | None = None  # when the last file's last byte was written (time.monotonic)

    @property
    def partials(self) -> Path:
        return self.staging / "hub"

    def target(self, w: Wanted) -> ResolveTarget:
        return ResolveTarget(endpoint=self.endpoint, repo=self.repo, commit=self.commit, repo_path=w.repo_path,
                             token=self.token, timeout=self.options.stall_timeout)


def _partial(tr: Transfer, w: Wanted) -> tuple[Path, int]:
    """The partial file for ``w`` and how many of its bytes can be trusted to continue from."""
    d = tr.partials
    d.mkdir(parents=True, exist_ok=True)
    part, side = d / f"{w.key}.part", d / f"{w.key}.json"
    want: dict[str, Any] = {"schema": PARTIAL_SCHEMA, "source": "hf", "kind": w.kind, "sha256": w.sha256,
                            "git_sha1": w.git_sha1, "size": w.size}
    try:
        have = json.loads(side.read_text())
    except (OSError, ValueError):
        have = None
    size = part.stat().st_size if part.exists() else 0
    if not isinstance(have, dict) or {k: have.get(k) for k in want} != want or size > w.size:
        part.unlink(missing_ok=True)
        size = 0
        record = dict(want, repo=tr.repo, commit=tr.commit, path=w.repo_path, started=time.time())
        atomic_write_text(side, json.dumps(record, indent=1) + "\n", durable=False)
    return part, size


def partial_path(tr: Transfer, w: Wanted) -> Path:
    return tr.partials / f"{w.key}.part"


def discard_partial(tr: Transfer, w: Wanted) -> None:
    """Forget ``w``'s partial and its provenance."""
    for p in (tr.partials / f"{w.key}.part", tr.partials / f"{w.key}.json"):
        p.unlink(missing_ok=True)


@contextlib.contextmanager
def partial_lock(tr: Transfer, w: Wanted) -> Iterator[None]:
    """Only one process writes a partial at a time (``flock`` on ``<key>.lock`` beside it)."""
    import fcntl

    d = tr.partials
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
            path.unlink(missing_ok=True)
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _cancelled(tr: Transfer, w: Wanted) -> None:
    if tr.cancel.is_set():
        raise FetchError("Cancelled.", path=w.path)


@dataclass
class _Cursor:
    """Where a download stands: bytes in the partial, bytes received by this process, and when
    the server last answered (a request that connects but delivers nothing counts)."""

    offset: int
    received: int = 0
    alive_at: float = field(default_factory=time.monotonic)


def _receive(tr: Transfer, w: Wanted, part: Path, cur: _Cursor, hasher: BackgroundHasher) -> None:
    """One GET from ``cur.offset`` into ``part``, advancing ``cur`` chunk by chunk (fsynced when complete)."""
    import httpx2

    with open_resolve(tr.target(w), cur.offset) as resp:
        if resp.status_code == 200 and cur.offset:
            raise RangeRefused()
        if resp.status_code == 206:
            m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != cur.offset:
                raise RangeRefused()
        cur.alive_at = time.monotonic()
        with open(part, "r+b" if part.exists() else "wb") as out:
            out.seek(cur.offset)
            out.truncate()
            stream = tr.stream
            if stream is not None:
                stream.begin(w.path, part, cur.offset)
            shown = cur.offset // stream.pl if stream is not None else 0  # pieces the stream was shown
            for chunk in read_body(resp, tr.options.stall_timeout):
                _cancelled(tr, w)
                if cur.offset + len(chunk) > w.size:
                    raise SizeMismatchError(
                        f"{w.repo_path} from {tr.endpoint} is longer than the {w.size} bytes expected.",
                        hint="The Hub and the expected size disagree; check the manifest.", path=w.path)
                out.write(chunk)
                hasher.update(chunk)
                cur.offset += len(chunk)
                cur.received += len(chunk)
                tr.progress.file(w, cur.offset, delta=len(chunk))
                if stream is not None and (cur.offset // stream.pl > shown or cur.offset == w.size):
                    out.flush()  # a reader of the file sees these bytes before they count
                    shown = cur.offset // stream.pl
                    stream.advance(w.path, cur.offset)
            out.flush()
            if cur.offset == w.size:  # durable before it is verified and renamed into place
                os.fsync(out.fileno())
                with tr.lock:
                    tr.last_byte_at = max(tr.last_byte_at or 0.0, time.monotonic())
        cur.alive_at = time.monotonic()
        if cur.offset < w.size:
            raise httpx2.RemoteProtocolError("the response ended before the file did")


def _wait_to_retry(tr: Transfer, w: Wanted, err: BaseException, status: int | None, attempt: int,
                   wait_s: float) -> None:
    """Count the retry, say so, and sleep ``wait_s`` (the policy's wait; cancellable)."""
    with tr.lock:
        tr.retries_used += 1
    note(tr.note, "hf", f"{w.path}: {status or type(err).__name__}; retrying in {wait_s:.1f} s "
                        f"(attempt {attempt + 2} of {tr.options.retries + 1})")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and not tr.cancel.is_set():
        time.sleep(min(0.1, max(deadline - time.monotonic(), 0)))


def download(tr: Transfer, w: Wanted) -> tuple[Path, str, int]:
    """Download ``w`` into its partial file; return (partial, sha256, bytes received now)."""
    try:
        return _download(tr, w)
    except OSError as e:
        if is_disk_full(e):  # the partial stays (under staging, never under the final name): resume later
            raise disk_full_error(partial_path(tr, w), kept="the partial download is kept to resume") from None
        raise


def _download(tr: Transfer, w: Wanted) -> tuple[Path, str, int]:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    part, offset = _partial(tr, w)
    if w.size == 0:
        part.touch()
    if offset:
        with tr.lock:
            tr.resumed[w.path] = offset
        note(tr.note, "hf", f"{w.path}: resuming at {offset} of {w.size} bytes")
    h = sha256_prefix(part, offset)
    cur = _Cursor(offset)
    attempt = 0
    restarts = 0
    tr.progress.file(w, offset, delta=offset, force=True)
    while cur.offset < w.size:
        _cancelled(tr, w)
        hasher = BackgroundHasher(h, depth=HASH_QUEUE_DEPTH, name="hub-hash")
        try:
            try:
                _receive(tr, w, part, cur, hasher)
            finally:
                hasher.close()
                h = hasher.hash
            attempt = 0
        except RangeRefused:
            restarts += 1
            if restarts > 2:
                raise FetchError(f"{tr.endpoint} keeps refusing ranges for {w.repo_path}.",
                                 hint="Run again later.", path=w.path) from None
            note(tr.note, "hf", f"{w.path}: the server did not continue at byte {cur.offset}; starting over")
            if tr.stream is not None:
                tr.stream.restart(w.path)
            tr.progress.file(w, 0, delta=-cur.offset, force=True)
            cur.offset = 0
            h = sha256_prefix(part, 0)
            part.unlink(missing_ok=True)
        except httpx2.ReadTimeout:
            raise StallError(f"No data for {w.path} from {tr.endpoint} for {tr.options.stall_timeout:.0f} s.",
                             hint="Run again to resume, or raise --stall-timeout.", path=w.path,
                             received=cur.offset, size=w.size) from None
        except (HfHubHTTPError, httpx2.TransportError) as e:
            status = http_status(e)
            err = hub_error(e, repo=tr.repo, revision=tr.commit, path=w.repo_path, token=bool(tr.token),
                            endpoint=tr.endpoint)
            if not is_transient(status) or (status is None and unresolved_host(e)):
                raise err from None
            # the one retry rule (RetryPolicy): the deadline runs from the server's last sign of life
            policy = RetryPolicy(retries=tr.options.retries, deadline_s=tr.options.stall_timeout,
                                 first_failure=cur.alive_at)
            wait_s = policy.wait_before_retry(e, status, attempt)
            if wait_s is None:
                raise type(err)(f"{err.message} Gave up after {attempt + 1} attempts.", hint=err.hint,
                                **err.context) from None
            _wait_to_retry(tr, w, e, status, attempt, wait_s)
            attempt += 1
            if status is not None:
                cur.alive_at = time.monotonic()
    if tr.stream is not None:  # an empty file, or one whose partial was already complete, shows every piece
        tr.stream.begin(w.path, part, w.size)
    tr.progress.file(w, cur.offset, finished=True)
    return part, h.hexdigest(), cur.received
