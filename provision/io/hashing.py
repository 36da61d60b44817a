"""Streamed content hashing: the one place that reads a file (or a byte stream) into hashlib.

It offers the whole-file SHA-256 with a progress callback, SHA-256 and MD5 in one pass, the
running SHA-256 of a prefix of a partial file (to resume a download without re-reading the
part already received twice), and a hasher that digests a stream on its own thread (hashlib
releases the GIL, so hashing overlaps receiving and writing). Files are opened without
following a final symlink into a FIFO or device (``HostileContentError``), read through one
reused buffer. It does not decide what a hash should be (``provision.stages.verify`` does) and
keeps no state between calls.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from provision.errors import HostileContentError
from provision.io.diskio import aligned_buffer
from provision.progress import ByteCounter, ProgressFn

if TYPE_CHECKING:
    from hashlib import _Hash

BLOCK_SIZE = 1 << 20  # 64 KiB..1 MiB measured fastest; 1 MiB keeps syscalls rare
PROGRESS_INTERVAL_S = 0.25

Chunk = bytes | bytearray | memoryview


def open_regular(path: Path) -> int:
    """Open a regular file for reading (a descriptor); refuse a FIFO, device or socket."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise HostileContentError(f"Refusing {Path(path).name}: not a regular file.", path=str(path))
        os.set_blocking(fd, True)
        if hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except OSError:
                pass  # advice only: a filesystem without it reads the same bytes
    except BaseException:
        os.close(fd)
        raise
    return fd


def stream_file(path: Path, consume: Callable[[memoryview], None], *, offset: int = 0, length: int | None = None,
                buf: bytearray | memoryview | None = None, on_bytes: Callable[[int], None] | None = None) -> int:
    """Feed ``consume`` the bytes of ``path`` from ``offset`` (``length`` bytes or to EOF) through
    one reused buffer (by default a page-aligned one: ``aligned_buffer``). Returns the number of
    bytes read."""
    if buf is None:
        buf = aligned_buffer(BLOCK_SIZE)
    mv = memoryview(buf)
    fd = open_regular(path)
    total = 0
    try:
        with open(fd, "rb", buffering=0, closefd=False) as f:
            if offset:
                f.seek(offset)
            while length is None or total < length:
                want = len(buf) if length is None else min(len(buf), length - total)
                n = f.readinto(mv[:want])
                if not n:
                    break
                consume(mv[:n])
                total += n
                if on_bytes is not None:
                    on_bytes(n)
    finally:
        os.close(fd)
    return total


def sha256_file(path: Path, *, progress: ProgressFn | None = None, block_size: int = BLOCK_SIZE) -> str:
    """The whole-file SHA-256 (hex), streamed through one reused ``block_size`` buffer; progress
    events (task ``sha256:<name>``) at most every ``PROGRESS_INTERVAL_S`` and once at the end."""
    path = Path(path)
    h = hashlib.sha256()
    total = os.stat(path).st_size
    counter = ByteCounter(progress, task=f"sha256:{path.name}", total=total, description=f"sha256 {path.name}",
                          interval=PROGRESS_INTERVAL_S)
    stream_file(path, h.update, buf=aligned_buffer(block_size), on_bytes=counter if progress else None)
    counter.finish()
    return h.hexdigest()


def hash_file(path: Path, *, md5: bool = False) -> tuple[str, str | None]:
    """(sha256, md5 or None) of a regular file in one streamed pass."""
    sha = hashlib.sha256()
    m = hashlib.md5(usedforsecurity=False) if md5 else None

    def consume(b: memoryview) -> None:
        sha.update(b)
        if m is not None:
            m.update(b)

    stream_file(path, consume)
    return sha.hexdigest(), (m.hexdigest() if m is not None else None)


def sha256_prefix(path: Path, length: int) -> _Hash:
    """A running SHA-256 of the first ``length`` bytes of ``path`` (fewer if the file is shorter),
    ready to be continued with the bytes that follow."""
    h = hashlib.sha256()
    if length > 0:
        stream_file(path, h.update, length=length)
    return h


class BackgroundHasher:
    """Digest a stream, fed in order, on a helper thread.

    ``update(b, done)`` queues ``b`` (at most ``depth`` chunks wait; the caller blocks beyond
    that) and calls ``done`` once it has been hashed, so a reused buffer can be refilled.
    ``initial`` continues a running hash (``sha256_prefix``). ``close`` drains the queue and
    stops the thread; ``hash`` is then the running hash (to continue later), ``hexdigest()``
    the digest. ``abandon`` drops what is queued and stops the thread without finishing."""

    def __init__(self, initial: _Hash | None = None, *, depth: int = 32, name: str = "hasher") -> None:
        self.hash: _Hash = initial if initial is not None else hashlib.sha256()
        self._q: queue.Queue[tuple[Chunk, Callable[[], None] | None] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._t = threading.Thread(target=self._run, daemon=True, name=name)
        self._t.start()

    def _run(self) -> None:
        try:
            while (item := self._q.get()) is not None:
                data, done = item
                self.hash.update(data)
                if done is not None:
                    done()
        except BaseException as e:  # re-raised by close() on the caller's thread
            self._error = e

    def update(self, b: Chunk, done: Callable[[], None] | None = None) -> None:
        self._q.put((b, done))

    def close(self) -> None:
        if self._t.is_alive():
            self._q.put(None)
            self._t.join()
        if self._error is not None:
            raise self._error

    def hexdigest(self) -> str:
        self.close()
        return self.hash.hexdigest()

    def abandon(self) -> None:
        with contextlib.suppress(queue.Empty):  # emptying the queue: Empty is how it ends
            while True:
                self._q.get_nowait()
        if self._t.is_alive():
            self._q.put(None)
            self._t.join()
