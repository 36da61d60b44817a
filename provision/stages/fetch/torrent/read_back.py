"""Reading a torrent download back from the disk while it goes on, so that the verification after
the last byte need not read it all again.

Where the torrent itself vouches for a file (``ReadBack``: its v1 piece SHA-1s when they cover
exactly this file, or the size of a file a v2 merkle root vouches for), the write-behind hands
each stretch it has written back and dropped from the page cache to a ``ReadBackWorker``. The
worker reads the stretch from the disk (``O_DIRECT`` where the filesystem takes it, else through
the cache, as any later read would) on its own thread and records each whole v1 piece whose SHA-1
matches, or each v2 merkle chunk's root (4 MiB of leaves; verify reduces the roots to the file's
merkle root and checks that as before). Its queue is bounded: a stretch offered while it is
``READ_BACK_QUEUE`` stretches behind is not read back (a download faster than one core hashes
must not leave a backlog behind its last byte) and the pieces or chunks it touches are left to
verify, which reads them on every core. A piece that does not match is only left out (verify
reads it and reports it); a stretch it cannot read ends the read-back of that file. It writes
nothing and judges nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

from provision.io.diskio import aligned_buffer, read_full, reopen_direct
from provision.stages.verify.digests import V2_BLOCK, v2_chunk_roots_fd, v2_geometry

READ_BACK_QUEUE = 8  # stretches (of SYNC_CHUNK, 64 MiB) the read-back may lag behind the write-behind


@dataclass(frozen=True)
class ReadBack:
    """What to check of a file once each stretch is on the disk: the torrent's v1 piece SHA-1s when
    they cover exactly this file (it starts on a piece boundary), or, for a v2 merkle authority,
    the file's size (``merkle_size``: its merkle chunk roots are computed)."""

    pieces: tuple[bytes, ...] = ()
    merkle_size: int = 0


class ReadBackWorker:
    """Read written stretches back on a thread of its own (see the module docstring); after
    ``join``, ``checked`` (v1 pieces that matched, by file) and ``roots`` (v2 chunk roots, by file)
    hold what it read, ``read_back_bytes`` how much, ``skipped_bytes`` what it let go."""

    def __init__(self, piece_length: int, *, depth: int = READ_BACK_QUEUE) -> None:
        self.pl = piece_length
        self.queue: queue.Queue[tuple[str, Path, int, int, ReadBack] | None] = queue.Queue(maxsize=max(depth, 1))
        self.checked: dict[str, set[int]] = {}
        self.roots: dict[str, dict[int, bytes]] = {}
        self.read_back_bytes = 0
        self.skipped_bytes = 0
        self.stopped = False
        self._covered: dict[str, int] = {}  # file -> where the last stretch read back ended
        self._frontier: dict[str, int] = {}  # file -> the first piece / chunk not read back yet
        self._failed: set[str] = set()
        self._fds: dict[str, tuple[int, int | None]] = {}  # file -> (descriptor, its O_DIRECT twin)
        self._buf: memoryview | None = None
        self.thread = threading.Thread(target=self._run, name="provision-read-back", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def offer(self, rel: str, path: Path, start: int, end: int, rb: ReadBack) -> bool:
        """Queue the written stretch ``[start, end)`` unless the worker is too far behind (then it is
        left to verify); whether it was queued. A file's stretches are offered in order."""
        try:
            self.queue.put_nowait((rel, path, start, end, rb))
            return True
        except queue.Full:
            self.skipped_bytes += end - start
            return False

    def close(self) -> None:
        """No more stretches: read the queued ones, then end (at once when the worker has ended)."""
        while True:
            try:
                self.queue.put(None, timeout=0.2)
                return
            except queue.Full:
                if not self.thread.is_alive():
                    return

    def stop(self) -> None:
        """End after the stretch being read (the queued ones are dropped)."""
        self.stopped = True
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(None)

    def join(self, timeout: float | None = None) -> None:
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _run(self) -> None:
        try:
            while not self.stopped:
                item = self.queue.get()
                if item is None:
                    break
                rel = item[0]
                if rel in self._failed:
                    continue
                try:
                    self._stretch(*item)
                except Exception:  # a check that could not be made is left to verify
                    self._failed.add(rel)
                    self.checked.pop(rel, None)
                    self.roots.pop(rel, None)
        finally:
            for fd, dfd in self._fds.values():
                for d in (fd, dfd):
                    if d is not None:
                        with contextlib.suppress(OSError):  # read-only descriptors: nothing to lose
                            os.close(d)

    def _stretch(self, rel: str, path: Path, start: int, end: int, rb: ReadBack) -> None:
        if rb.merkle_size > 0:
            nchunks, chunk, _ = v2_geometry(rb.merkle_size)
            unit, count = chunk * V2_BLOCK, nchunks
            hi = count if end >= rb.merkle_size else end // unit  # the short last chunk once the file is complete
        elif rb.pieces and self.pl > 0:
            unit, count = self.pl, len(rb.pieces)
            hi = min(end // unit, count)  # whole pieces only: a short last piece is left to verify
        else:
            return
        # after a stretch that was let go, start at the first unit wholly in this one
        lo = self._frontier.get(rel, 0) if self._covered.get(rel, 0) == start else -(-start // unit)
        self._covered[rel] = end
        if hi <= lo:
            return
        self._frontier[rel] = hi
        if self._buf is None or self._buf.nbytes < unit:
            self._buf = aligned_buffer(max(unit, 4 << 20))
        if rel not in self._fds:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self._fds[rel] = (fd, reopen_direct(fd))
        fd, dfd = self._fds[rel]
        if dfd is not None:
            try:
                self._units(rel, dfd, lo, hi, unit, rb, self._buf)
                return
            except OSError:  # the filesystem refused the direct read after all: read through the cache
                os.close(dfd)
                self._fds[rel] = (fd, None)
        self._units(rel, fd, lo, hi, unit, rb, self._buf)

    def _units(self, rel: str, fd: int, lo: int, hi: int, unit: int, rb: ReadBack, buf: memoryview) -> None:
        if rb.merkle_size > 0:
            roots = v2_chunk_roots_fd(fd, lo, hi - lo, unit // V2_BLOCK, buf, on_bytes=self._count)
            self.roots.setdefault(rel, {}).update(zip(range(lo, hi), roots, strict=True))
            return
        mv = buf[:unit]
        done = self.checked.setdefault(rel, set())
        for i in range(lo, hi):
            n = read_full(fd, mv, i * unit)
            self._count(n)
            if n == unit and hashlib.sha1(mv, usedforsecurity=False).digest() == rb.pieces[i]:
                done.add(i)

    def _count(self, n: int) -> None:
        self.read_back_bytes += n
