"""The hashing work of a verification, spread over a thread pool.

Each expected file becomes a ``FileWork``; ``hash_all`` splits the work into units (one whole
file read once for every whole-file hash it needs: sha256, git blob SHA-1, md5; or a range of
torrent v1 pieces; or a range of torrent v2 merkle chunks), runs them largest first on
``workers`` threads (hashlib and ``readinto`` release the GIL) and stores the digests back on
the ``FileWork``. Only a torrent authority lets one file be split into ranges. Progress is one
throttled overall task plus one task per file of at least ``FILE_PROGRESS_MIN`` bytes. Each
file records its units, how many were piece ranges and which workers ran them (the report's
``hash``); a unit that never finished fails its file. With at least ``PROCESS_MIN_BYTES`` in
ranges of the ``PROCESS_KINDS`` (torrent v2 merkle chunks), the ranges run in ``worker``
processes instead of threads (see there). It records what it computed; ``content`` judges it
against the authority.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from provision.errors import ProvisionError, VerifyError
from provision.io.diskio import aligned_buffer
from provision.io.hashing import BLOCK_SIZE, PROGRESS_INTERVAL_S, stream_file
from provision.progress import ProgressEvent, ProgressFn
from provision.stages.verify.authority import Authority
from provision.stages.verify.digests import V2_BLOCK, v2_chunk_roots, v2_geometry

SPLIT_UNIT_BYTES = 64 << 20  # torrent files are split into ranges of about this size
# With at least this much in torrent v2 merkle ranges, worker processes hash the piece ranges.
# A v2 leaf is 16 KiB, one hashlib call each, and every call gives the GIL away and takes it
# back: two threads then wait on each other, while processes do not. Measured on the 2-core CI
# host (benchmarks/verify_pieces.py, 4 GiB hybrid torrent, page-aligned read buffers): threads
# 1.72x one `openssl dgst -sha256`, processes 1.89x; v1 pieces (one call per MiB) scale on
# threads (2.31x) and stay there. None: always threads.
PROCESS_MIN_BYTES: int | None = 256 << 20
PROCESS_KINDS: tuple[str, ...] = ("v2",)  # the range kinds whose bytes count towards PROCESS_MIN_BYTES
WORKER = Path(__file__).with_name("worker.py")  # run by path: the worker imports only the standard library
FILE_PROGRESS_MIN = 256 << 20  # files at least this large get their own progress task


@dataclass
class FileWork:
    """One expected file's hashing job and, once ``hash_all`` ran, its results."""

    rel: str
    path: Path
    size: int
    auth: Authority
    want_sha256: bool
    sha256: str | None = None
    git_sha1: str | None = None
    md5: str | None = None
    read_bytes: int | None = None  # bytes the whole-file pass read (to detect a changing file)
    v1_bad: list[int] = field(default_factory=list)
    v2_roots: dict[int, bytes] = field(default_factory=dict)
    error: ProvisionError | None = None
    units: int = 0  # hashing units the file was split into (1 whole-file pass, or that plus the piece ranges)
    range_units: int = 0  # of those, torrent piece / merkle-chunk ranges (independent of each other)
    threads: set[str] = field(default_factory=set)  # the pool threads (or worker processes) that ran its units
    done_units: int = 0  # units that finished (a unit that never ran must not read as "no bad piece")
    # v1 pieces (indices in the file) the caller already read back and matched: not read again
    skip_pieces: frozenset[int] = frozenset()
    given_roots: int = 0  # v2 chunk roots the caller computed from the disk (``v2_roots`` starts with them)


class _Progress:
    """Thread-safe byte counter that emits throttled ProgressEvents.

    ``done`` counts the bytes read; the events count the files' own bytes (a file read twice, for
    its sha256 and for its torrent pieces, advances by half its reads), so a finished verify shows
    the real size at 100%."""

    def __init__(self, progress: ProgressFn | None, sizes: Mapping[str, int], work: Mapping[str, int],
                 big: Mapping[str, int]) -> None:
        self.fn = progress
        self.total = sum(sizes.values())
        self.scale = {k: sizes[k] / work[k] if work.get(k) else 0.0 for k in sizes}
        self.done = 0
        self.shown = 0.0
        self.per_file: dict[str, float] = {k: 0.0 for k in big}
        self.big = dict(big)
        self.lock = threading.Lock()
        self.last = 0.0
        self.last_file: dict[str, float] = {}

    def add(self, rel: str, n: int) -> None:
        events: list[ProgressEvent] = []
        with self.lock:
            self.done += n
            if self.fn is None:
                return
            self.shown += n * self.scale.get(rel, 0.0)
            now = time.monotonic()
            if now - self.last >= PROGRESS_INTERVAL_S:
                self.last = now
                events.append(ProgressEvent(task="verify", done=round(self.shown), total=self.total,
                                            description="verify"))
            if rel in self.per_file:
                self.per_file[rel] += n * self.scale.get(rel, 0.0)
                if now - self.last_file.get(rel, 0.0) >= PROGRESS_INTERVAL_S:
                    self.last_file[rel] = now
                    events.append(ProgressEvent(task=f"verify:{rel}", done=round(self.per_file[rel]),
                                                total=self.big[rel], description=f"verify {rel}"))
        for ev in events:
            self.fn(ev)

    def finish(self) -> None:
        if self.fn is None:
            return
        for rel, total in self.big.items():
            self.fn(ProgressEvent(task=f"verify:{rel}", done=round(self.per_file[rel]), total=total,
                                  description=f"verify {rel}", finished=True))
        self.fn(ProgressEvent(task="verify", done=round(self.shown), total=self.total, description="verify",
                              finished=True))


def _whole_unit(w: FileWork, want_git: bool, buf: memoryview, prog: _Progress) -> None:
    sha = hashlib.sha256() if w.want_sha256 else None
    git = hashlib.sha1(b"blob %d\x00" % w.size, usedforsecurity=False) if want_git else None
    md5 = hashlib.md5(usedforsecurity=False) if w.auth.md5 else None
    hashers: list[Any] = [h for h in (sha, git, md5) if h is not None]
    if len(hashers) == 1:
        consume = hashers[0].update
    else:
        def consume(mv: memoryview) -> None:
            for h in hashers:
                h.update(mv)
    n = stream_file(w.path, consume, buf=buf, on_bytes=lambda k: prog.add(w.rel, k))
    w.read_bytes = n
    if sha is not None:
        w.sha256 = sha.hexdigest()
    if git is not None:
        w.git_sha1 = git.hexdigest() if n == w.size else "changed-while-reading"
    if md5 is not None:
        w.md5 = md5.hexdigest()


def _v1_unit(w: FileWork, first: int, count: int, buf: memoryview, prog: _Progress) -> None:
    """Pieces ``first`` .. ``first + count - 1`` of ``w``: one sequential read of their range,
    split into SHA-1s at the piece boundaries."""
    a = w.auth
    plen = a.piece_length or 0
    last = len(a.piece_hashes) - 1
    cur = {"i": first, "got": 0}
    h = hashlib.sha1(usedforsecurity=False)

    def done_piece(short: bool) -> None:
        nonlocal h
        i = cur["i"]
        ok = h.digest() == a.piece_hashes[i]
        # the last piece of a file followed by a pad file (BEP 47) is hashed zero-padded
        if not ok and short and a.size is not None and i == last:
            h.update(bytes(plen - cur["got"]))
            ok = h.digest() == a.piece_hashes[i]
        if not ok:
            w.v1_bad.append(i)
        cur["i"], cur["got"] = i + 1, 0
        h = hashlib.sha1(usedforsecurity=False)

    def consume(mv: memoryview) -> None:
        pos, n = 0, len(mv)
        while pos < n:
            take = min(plen - cur["got"], n - pos)
            h.update(mv[pos:pos + take])
            cur["got"] += take
            pos += take
            if cur["got"] == plen:
                done_piece(False)

    stream_file(w.path, consume, offset=first * plen, length=count * plen, buf=buf,
                on_bytes=lambda k: prog.add(w.rel, k))
    if cur["got"]:
        done_piece(True)
    w.v1_bad.extend(range(cur["i"], first + count))  # pieces the file ended before (it shrank): bad


def _v2_unit(w: FileWork, first: int, count: int, chunk: int, buf: memoryview, prog: _Progress) -> None:
    roots = v2_chunk_roots(w.path, first, count, chunk, buf, on_bytes=lambda k: prog.add(w.rel, k))
    w.v2_roots.update(zip(range(first, first + count), roots, strict=True))


# (bytes, run here, the file it is for, the same job for a worker process or None: a whole-file pass)
_Unit = tuple[int, Callable[[memoryview, _Progress], None], FileWork, "dict[str, Any] | None"]


def _apply(w: FileWork, job: dict[str, Any], res: dict[str, Any]) -> None:
    """A worker process's answer to ``job`` (see ``worker``), stored as ``_v1_unit``/``_v2_unit`` would."""
    if "error" in res:
        w.error = VerifyError(f"Cannot read {w.rel}: {res['error']}.", hint="Check the file's permissions and the disk.",
                              path=w.rel)
        return
    if "v1" in job:
        a = w.auth
        _path, offset, plen, count = job["v1"]
        first, last = offset // plen, len(a.piece_hashes) - 1
        got = [bytes.fromhex(h) for h in res["sha1"]]
        padded = bytes.fromhex(res["padded"]) if res.get("padded") else None
        for k, dg in enumerate(got):
            i = first + k
            ok = dg == a.piece_hashes[i] or (
                padded is not None and k == len(got) - 1 and i == last and a.size is not None
                and padded == a.piece_hashes[i])  # BEP 47: the last piece before a pad file, zero-padded
            if not ok:
                w.v1_bad.append(i)
        w.v1_bad.extend(range(first + len(got), first + count))  # the file ended first (it shrank)
        return
    _path, first, count, _chunk = job["v2"]
    for k, root in enumerate(res["roots"]):
        w.v2_roots[first + k] = bytes.fromhex(root)


def _runs(n: int, skip: frozenset[int], per: int) -> list[tuple[int, int]]:
    """(first, count) ranges of at most ``per`` consecutive indices of ``range(n)`` not in ``skip``."""
    out: list[tuple[int, int]] = []
    i = 0
    while i < n:
        if i in skip:
            i += 1
            continue
        j = i
        while j < n and j - i < per and j not in skip:
            j += 1
        out.append((i, j - i))
        i = j
    return out


def _units(works: Mapping[str, FileWork]) -> list[_Unit]:
    units: list[_Unit] = []
    for w in works.values():
        before = len(units)
        a = w.auth
        want_git = bool(a.git_sha1)
        if w.want_sha256 or want_git or a.md5:
            units.append((w.size, partial(_whole_unit, w, want_git), w, None))
        if a.piece_hashes and a.piece_length and -(-w.size // a.piece_length) == len(a.piece_hashes):
            plen = a.piece_length
            per = max(1, SPLIT_UNIT_BYTES // plen)
            for first, cnt in _runs(len(a.piece_hashes), w.skip_pieces, per):
                nbytes = min(cnt * plen, w.size - first * plen)  # the last piece may be short
                units.append((nbytes, partial(_v1_unit, w, first, cnt), w,
                              {"v1": [str(w.path), first * plen, plen, cnt]}))
        if a.merkle_root is not None and w.size > 0:
            nchunks, chunk, _ = v2_geometry(w.size)
            per = max(1, SPLIT_UNIT_BYTES // (chunk * V2_BLOCK))
            for first, cnt in _runs(nchunks, frozenset(w.v2_roots), per):
                nbytes = min(cnt * chunk * V2_BLOCK, w.size - first * chunk * V2_BLOCK)  # the last may be short
                units.append((nbytes, partial(_v2_unit, w, first, cnt, chunk), w,
                              {"v2": [str(w.path), first, cnt, chunk]}))
        w.units = len(units) - before
        w.range_units = w.units - (1 if w.want_sha256 or want_git or a.md5 else 0)
    return units


def hash_all(works: Mapping[str, FileWork], nworkers: int, progress: ProgressFn | None) -> int:
    """Run every hashing unit of ``works`` on a thread pool (largest first) and fill in the
    results; a file that cannot be read gets its ``error``. Returns the bytes hashed."""
    units = _units(works)
    work: dict[str, int] = {}
    for size, _run, w, _job in units:
        work[w.rel] = work.get(w.rel, 0) + size
    big = {w.rel: w.size for w in works.values() if w.size >= FILE_PROGRESS_MIN}
    prog = _Progress(progress, {w.rel: w.size for w in works.values() if w.rel in work}, work, big)
    units.sort(key=lambda u: -u[0])
    local = threading.local()

    def run(unit: _Unit) -> None:
        buf = getattr(local, "buf", None)  # one reusable read buffer per pool thread
        if buf is None:
            buf = local.buf = aligned_buffer(BLOCK_SIZE)
        with prog.lock:
            unit[2].threads.add(threading.current_thread().name)
        try:
            unit[1](buf, prog)
            with prog.lock:
                unit[2].done_units += 1
        except ProvisionError as exc:
            unit[2].error = exc
        except OSError as exc:
            unit[2].error = VerifyError(f"Cannot read {unit[2].rel}: {exc.strerror}.",
                                        hint="Check the file's permissions and the disk.", path=unit[2].rel)

    to_procs = sum(u[0] for u in units if u[3] is not None and any(k in u[3] for k in PROCESS_KINDS))
    if len(units) <= 1 or nworkers == 1:
        for u in units:
            run(u)
    elif PROCESS_MIN_BYTES is not None and to_procs and to_procs >= PROCESS_MIN_BYTES:
        _run_in_processes(units, min(nworkers, len(units)), prog, run)
    else:
        with ThreadPoolExecutor(max_workers=min(nworkers, len(units)), thread_name_prefix="verify") as ex:
            list(ex.map(run, units))
    prog.finish()
    for w in works.values():
        if w.done_units < w.units and w.error is None:
            w.error = VerifyError(f"{w.rel}: {w.units - w.done_units} of its {w.units} hashing units did not run.",
                                  hint="Run verify again with --workers 1.", path=w.rel)
    return prog.done


def _run_in_processes(units: list[_Unit], nprocs: int, prog: _Progress, run_here: Callable[[_Unit], None]) -> None:
    """Run the range units on ``nprocs`` worker processes (``worker``), one driver thread each
    (the whole-file passes run in the driver threads themselves). Each driver starts with its own
    unit, then takes the next largest; a worker that dies fails the unit it had, and a driver whose
    worker cannot start hashes its units on its own thread instead."""
    queue = deque(units[nprocs:])
    lock = threading.Lock()

    def drive(first: _Unit) -> None:
        try:
            proc = subprocess.Popen([sys.executable, "-I", str(WORKER)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, bufsize=1)
        except OSError:  # no worker process (a process limit, a sandbox): this driver hashes on its own thread
            unit: _Unit | None = first
            while unit is not None:
                run_here(unit)
                with lock:
                    unit = queue.popleft() if queue else None
            return
        assert proc.stdin is not None and proc.stdout is not None
        unit = first
        try:
            while unit is not None:
                job = unit[3]
                if job is None:
                    run_here(unit)
                else:
                    w = unit[2]
                    with lock:
                        w.threads.add(f"pid {proc.pid}")
                    try:
                        proc.stdin.write(json.dumps(job) + "\n")
                        proc.stdin.flush()
                        line = proc.stdout.readline()
                    except OSError:  # the worker is gone (BrokenPipeError)
                        line = ""
                    if not line:
                        w.error = VerifyError(f"The hashing worker for {w.rel} stopped (exit {proc.poll()}).",
                                              hint="Run verify again with --workers 1.", path=w.rel)
                    else:
                        res = json.loads(line)
                        _apply(w, job, res)
                        prog.add(w.rel, int(res.get("n", 0)))
                        with lock:
                            w.done_units += 1
                with lock:
                    unit = queue.popleft() if queue else None
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:  # pragma: no cover - a worker never outlives its stdin
                proc.kill()
                proc.wait()

    drivers = [threading.Thread(target=drive, args=(units[k],), name=f"verify-{k}", daemon=True)
               for k in range(nprocs)]
    for d in drivers:
        d.start()
    for d in drivers:
        d.join()
