"""Hashing while downloading: the streamed, piece-aligned sha256 of each selected file and the
write-behind thread that gets what was hashed onto the disk and out of the page cache.

:class:`StreamHasher` follows the selected files in torrent order as their pieces arrive,
hashes them while the data is still in the page cache (so no file is read once more for its
whole-file sha256 after the download: a manifest sha256 is checked against this hash, and where
the torrent's pieces are the authority this hash is the sha256 recorded) and starts writing each
completed stretch back at once.
:class:`WriteBehind` waits for those stretches to reach the disk, drops them from the page
cache and fsyncs each file once complete, so the hasher never waits for the disk and the fsync
before the final rename is cheap. Neither talks to libtorrent: the download loop tells the
hasher which pieces are on disk (``mark``). A file whose hash needed a piece released only by
``mark_all`` (its alert never came) is listed by ``forced_files``: the caller reads it again
rather than trust bytes read before libtorrent surely wrote them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import queue
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from provision.io.diskio import (
    aligned_buffer,
    drop_cached,
    hash_range,
    read_full,
    reopen_direct,
    start_writeback,
    write_back_and_drop,
)
from provision.stages.verify.digests import V2_BLOCK, v2_chunk_roots_fd, v2_geometry

HASH_READ_BYTES = 4 << 20
SYNC_CHUNK = 64 << 20  # the write-behind waits for and drops 64 MiB stretches
HASH_RANGE_BYTES = 64 << 20  # at most this much is hashed before writeback of the next stretch starts


@dataclass(frozen=True)
class StreamFile:
    """One file the hasher follows: where it sits in the torrent and whether to hash it."""

    rel: str
    path: Path
    offset: int  # in the torrent
    size: int
    want_hash: bool
    read_back: ReadBack | None = None  # what the write-behind checks once a stretch is on the disk


@dataclass(frozen=True)
class ReadBack:
    """What the write-behind reads back and checks of a file once each stretch is on the disk, so
    that the verification after the download need not read those bytes again: the torrent's v1
    piece SHA-1s when they cover exactly this file (it starts on a piece boundary), or, for a v2
    merkle authority, the file's ``size`` (its merkle chunk roots are computed; verify reduces them
    to the root it checks)."""

    pieces: tuple[bytes, ...] = ()
    merkle_size: int = 0


class StreamHasher:
    """Hash the files in torrent order as their pieces are marked (see the module docstring)."""

    def __init__(self, files: Sequence[StreamFile], piece_length: int, num_pieces: int, *,
                 drop_behind: bool = True) -> None:
        self.files = list(files)
        self.pl = piece_length
        self.have = bytearray(num_pieces)
        self.cond = threading.Condition()
        self.stopped = False
        self.results: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.bytes_hashed = 0
        self.forced: set[int] = set()  # pieces ``mark_all`` released without their alert
        self.hashed_at: float | None = None  # when the last file's hash was done
        self.writer = WriteBehind(drop=drop_behind, piece_length=piece_length)
        self.thread = threading.Thread(target=self._run, name="provision-stream-hash", daemon=True)

    @property
    def synced(self) -> set[str]:
        """Files fsynced as they completed (the move need not fsync them again)."""
        return self.writer.synced

    def start(self) -> None:
        self.writer.start()
        self.thread.start()

    def mark(self, piece: int) -> None:
        with self.cond:
            if 0 <= piece < len(self.have):
                self.have[piece] = 1
            self.cond.notify_all()

    def mark_all(self) -> None:
        """Every piece is on disk (the download finished and its files are closed): release the
        hasher even for a piece whose alert never came (seen in swarms with rarest-first order;
        waiting for it would hang). Those pieces are remembered (``forced_files``): a stream hash
        that read them is not trusted without a sha256 to confirm it."""
        with self.cond:
            self.forced |= {i for i, b in enumerate(self.have) if not b}
            self.have[:] = b"\x01" * len(self.have)
            self.cond.notify_all()

    def forced_files(self) -> set[str]:
        """The files with a piece ``mark_all`` released without its alert (call after ``join``)."""
        with self.cond:
            forced = set(self.forced)
        return {f.rel for f in self.files if f.size > 0
                and not forced.isdisjoint(range(f.offset // self.pl, (f.offset + f.size - 1) // self.pl + 1))}

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.writer.stop()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the hashes, then for the write-behind (every file fsynced)."""
        if self.thread.is_alive():
            self.thread.join(timeout)
        self.writer.join(timeout)

    def _wait(self, piece: int) -> bool:
        with self.cond:
            while not self.have[piece] and not self.stopped:
                self.cond.wait(0.5)
            return not self.stopped

    def _run(self) -> None:
        mv = aligned_buffer(HASH_READ_BYTES)
        try:
            for f in self.files:
                if not self._file(f, mv):
                    return
        finally:
            self.writer.close()

    def _complete_up_to(self, piece: int, last: int) -> int:
        """The last piece of the run of marked pieces from ``piece`` (at most HASH_RANGE_BYTES)."""
        q = piece
        while q < last and self.have[q + 1] and (q + 1 - piece) * self.pl < HASH_RANGE_BYTES:
            q += 1
        return q

    def _file(self, f: StreamFile, mv: memoryview) -> bool:
        """Hash one file as its pieces arrive; False when stopped."""
        h = hashlib.sha256()
        pos = started_to = 0
        last = (f.offset + f.size - 1) // self.pl
        try:
            with contextlib.ExitStack() as stack:
                fd = -1
                while pos < f.size:
                    p = (f.offset + pos) // self.pl
                    if not self._wait(p):
                        return False
                    end = min(f.size, (self._complete_up_to(p, last) + 1) * self.pl - f.offset)
                    if fd < 0:
                        fd = os.open(f.path, os.O_RDONLY)
                        stack.callback(os.close, fd)
                    start_writeback(fd, pos, end - pos)  # complete: to disk now, not after the hash
                    if f.want_hash:
                        if os.fstat(fd).st_size < end:
                            raise OSError(errno.EIO, f"{f.path} is shorter than expected")
                        hash_range(h, fd, pos, end, mv)
                        self.bytes_hashed += end - pos
                    pos = end
                    if pos - started_to >= SYNC_CHUNK or pos >= f.size:  # hashed: the write-behind may drop it
                        self.writer.put(f.rel, f.path, started_to, pos, read_back=f.read_back)
                        started_to = pos
                if f.want_hash:
                    self.results[f.rel] = h.hexdigest()
                self.hashed_at = time.monotonic()
                if fd >= 0:
                    self.writer.put(f.rel, f.path, 0, f.size, final=True)
        except OSError as e:
            self.errors[f.rel] = str(e)  # verify reads the file itself instead; the move fsyncs it
        return True


class WriteBehind:
    """The disk side of the stream hasher, in its own thread: wait until each completed stretch
    is on disk and drop it from the page cache (hashed and written, nothing reads it again during
    the fetch; the freed pages are reused for the next stretch instead of the cache growing by
    the model's size, which on a VM whose fresh pages are costly is most of a write's CPU), and
    fsync each file once its last stretch is queued."""

    def __init__(self, *, drop: bool, piece_length: int = 0) -> None:
        self.drop = drop
        self.pl = piece_length
        self.queue: queue.SimpleQueue[tuple[str, Path, int, int, bool, ReadBack | None] | None] = queue.SimpleQueue()
        self.synced: set[str] = set()
        self.checked: dict[str, set[int]] = {}  # file -> its v1 pieces read back from the disk and matched
        self.roots: dict[str, dict[int, bytes]] = {}  # file -> its v2 merkle chunk roots, read back from the disk
        self.read_back_bytes = 0
        self._buf: memoryview | None = None
        self._direct: dict[str, int | None] = {}
        self._frontier: dict[str, int] = {}  # file -> the first piece / chunk not read back yet
        self.finished_at: float | None = None
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="provision-write-behind", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def put(self, rel: str, path: Path, start: int, end: int, *, final: bool = False,
            read_back: ReadBack | None = None) -> None:
        """Queue a stretch ``[start, end)`` of a file (``final``: the whole file, complete); with
        ``read_back``, what the file holds up to ``end`` is read back and checked once it is on the
        disk (stretches of one file come in order, each starting where the last one ended)."""
        self.queue.put((rel, path, start, end, final, read_back))

    def close(self) -> None:
        """No more stretches: finish the queued ones, then end."""
        self.queue.put(None)

    def stop(self) -> None:
        self.stopped = True
        self.queue.put(None)

    def join(self, timeout: float | None = None) -> None:
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _run(self) -> None:
        fds: dict[str, int] = {}
        try:
            while not self.stopped:
                item = self.queue.get()
                if item is None:
                    break
                try:
                    self._stretch(fds, *item)
                except OSError:
                    pass  # the move fsyncs a file that is not in ``synced``
        finally:
            for fd in [*fds.values(), *(d for d in self._direct.values() if d is not None)]:
                with contextlib.suppress(OSError):  # closing a read-only descriptor: nothing to lose
                    os.close(fd)
            self.finished_at = time.monotonic()

    def _stretch(self, fds: dict[str, int], rel: str, path: Path, start: int, end: int, final: bool,
                 read_back: ReadBack | None) -> None:
        fd = fds.get(rel)
        if fd is None:
            fd = fds[rel] = os.open(path, os.O_RDONLY)
        if final:
            os.fsync(fd)
            self.synced.add(rel)
            if self.drop:
                drop_cached(fd, start, end - start)
            os.close(fds.pop(rel))
            dfd = self._direct.pop(rel, None)
            if dfd is not None:
                os.close(dfd)
            return
        if self.drop:
            write_back_and_drop(fd, start, end - start)
        if read_back is not None:
            self._read_back(rel, fd, end, read_back)

    def _read_back(self, rel: str, fd: int, end: int, rb: ReadBack) -> None:
        """Read back the whole pieces (v1) or merkle chunks (v2) of the file that end by ``end``
        and were not read yet: from the disk with ``O_DIRECT`` where the filesystem takes it (as a
        later read of the file would otherwise). A v1 piece is recorded when its SHA-1 matches (one
        that does not is only left out: verify reads it again and reports it); a chunk's root is
        recorded as computed (verify's merkle root check judges it)."""
        if rb.merkle_size > 0:
            nchunks, chunk, _ = v2_geometry(rb.merkle_size)
            unit, count = chunk * V2_BLOCK, nchunks
            hi = count if end >= rb.merkle_size else end // unit  # the short last chunk once the file is complete
        elif rb.pieces and self.pl > 0:
            unit, count = self.pl, len(rb.pieces)
            hi = min(end // unit, count)  # whole pieces only: a short last piece is left to verify
        else:
            return
        lo = self._frontier.get(rel, 0)
        if hi <= lo:
            return
        self._frontier[rel] = hi
        if self._buf is None or self._buf.nbytes < unit:
            self._buf = aligned_buffer(max(unit, 4 << 20))
        if rel not in self._direct:
            self._direct[rel] = reopen_direct(fd)
        dfd = self._direct[rel]
        try:
            try:
                self._read_units(rel, dfd if dfd is not None else fd, lo, hi, unit, rb, self._buf)
            except OSError:
                if dfd is None:
                    raise
                os.close(dfd)  # the filesystem refused the direct read after all: read through the cache
                self._direct[rel] = None
                self._read_units(rel, fd, lo, hi, unit, rb, self._buf)
        except Exception:  # a check that could not be made is left to verify; the write-behind goes on
            self.checked.pop(rel, None)
            self.roots.pop(rel, None)
            self._frontier[rel] = sys.maxsize  # nothing more of this file is read back

    def _read_units(self, rel: str, fd: int, lo: int, hi: int, unit: int, rb: ReadBack, buf: memoryview) -> None:
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
