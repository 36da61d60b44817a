"""Hashing while downloading: the streamed, piece-aligned sha256 of each selected file and the
write-behind thread that gets what was hashed onto the disk and out of the page cache.

:class:`StreamHasher` follows the selected files in torrent order as their pieces arrive,
hashes them while the data is still in the page cache (so no file is read once more for its
whole-file sha256 after the download: a manifest sha256 is checked against this hash, and where
the torrent's pieces are the authority this hash is the sha256 recorded) and starts writing each
completed stretch back at once.
:class:`WriteBehind` waits for those stretches to reach the disk, drops them from the page
cache and fsyncs each file once complete, so the hasher never waits for the disk and the fsync
before the final rename is cheap; where a file's ``read_back`` says what to check, it hands each
stretch on the disk to the ``read_back.ReadBackWorker``. Neither talks to libtorrent: the download loop tells the
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
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from provision.io.diskio import aligned_buffer, drop_cached, hash_range, start_writeback, write_back_and_drop
from provision.stages.fetch.torrent.read_back import ReadBack, ReadBackWorker

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
    read_back: ReadBack | None = None  # what the read-back checks once a stretch is on the disk


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
        self.read_back = ReadBackWorker(piece_length)
        self.writer = WriteBehind(drop=drop_behind,
                                  reader=self.read_back if any(f.read_back for f in self.files) else None)
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

    def __init__(self, *, drop: bool, reader: ReadBackWorker | None = None) -> None:
        self.drop = drop
        self.reader = reader  # reads the stretches back from the disk once written (``read_back``)
        self.queue: queue.SimpleQueue[tuple[str, Path, int, int, bool, ReadBack | None] | None] = queue.SimpleQueue()
        self.synced: set[str] = set()
        self.finished_at: float | None = None
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="provision-write-behind", daemon=True)

    def start(self) -> None:
        if self.reader is not None:
            self.reader.start()
        self.thread.start()

    def put(self, rel: str, path: Path, start: int, end: int, *, final: bool = False,
            read_back: ReadBack | None = None) -> None:
        """Queue a stretch ``[start, end)`` of a file (``final``: the whole file, complete); with
        ``read_back``, the stretch is handed to the reader once it is on the disk (stretches of one
        file come in order, each starting where the last one ended)."""
        self.queue.put((rel, path, start, end, final, read_back))

    def close(self) -> None:
        """No more stretches: finish the queued ones, then end."""
        self.queue.put(None)

    def stop(self) -> None:
        self.stopped = True
        self.queue.put(None)
        if self.reader is not None:
            self.reader.stop()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the write-behind, then for the reader it hands stretches to."""
        if self.thread.is_alive():
            self.thread.join(timeout)
        if self.reader is not None:
            self.reader.join(timeout)

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
            for fd in fds.values():
                with contextlib.suppress(OSError):  # closing a read-only descriptor: nothing to lose
                    os.close(fd)
            self.finished_at = time.monotonic()
            if self.reader is not None:
                self.reader.close()

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
            return
        if self.drop:
            write_back_and_drop(fd, start, end - start)
        if read_back is not None and self.reader is not None:
            self.reader.offer(rel, path, start, end, read_back)
