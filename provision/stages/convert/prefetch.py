"""Reading the source ahead of the converter: a helper thread, a ring of reused buffers, hashing on the way.

``Prefetcher`` reads a planned sequence of (source, offset, length) ranges on a helper thread,
consecutive ranges joined into requests of up to ``BLOCK_BYTES`` (a direct read gets no kernel
readahead: one synchronous request per 2 MiB piece left the disk idle between pieces and made
the reader the conversion's bottleneck), into a small ring of reused buffers (no page faults or zero-fill per chunk), feeds every byte of each
source, in file order, to that file's ``BackgroundHasher``, and drops the pages read from the page
cache. The converter asks for the ranges in the planned order. It does not cast, quantize or write.
"""

from __future__ import annotations

import contextlib
import mmap
import queue
import threading
from collections.abc import Callable

from provision.errors import ConvertError
from provision.io.hashing import BackgroundHasher
from provision.stages.convert.source import DIRECT_ALIGN, SafetensorsSource


class BufferRing:
    """Read buffers reused across chunks.

    ``acquire(holders)`` hands out a free buffer that returns to the pool once ``release``
    has been called ``holders`` times (the converter and the hasher each release it).
    """

    def __init__(self, size: int, count: int) -> None:
        # page-aligned (mmap), with room for a direct read's alignment on both ends
        self.bufs = [mmap.mmap(-1, max(size, 1) + 2 * DIRECT_ALIGN) for _ in range(count)]
        self.free: queue.Queue[int] = queue.Queue()
        for i in range(count):
            self.free.put(i)
        self.refs = [0] * count
        self.lock = threading.Lock()

    def acquire(self, holders: int, stop: threading.Event) -> int | None:
        while not stop.is_set():
            try:
                i = self.free.get(timeout=0.1)
            except queue.Empty:  # none free yet: wait again unless stopped
                continue
            self.refs[i] = holders
            return i
        return None

    def release(self, i: int) -> None:
        with self.lock:
            self.refs[i] -= 1
            if self.refs[i] == 0:
                self.free.put(i)


class SourceStream:
    """Reads one source's bytes in file order, feeding the hasher and dropping the page cache."""

    def __init__(self, src: SafetensorsSource, hasher: BackgroundHasher | None) -> None:
        self.src, self.hasher = src, hasher
        self.pos = src.data_start  # next byte the hasher expects
        # direct reads only for a plain file: a source that overrides read_into (one still
        # arriving, whose reads wait for verified bytes) is read through it
        self.direct = type(src).read_into is SafetensorsSource.read_into

    def read_ring(self, start: int, n: int, ring: BufferRing, stop: threading.Event,
                  holders: int = 1) -> tuple[int, memoryview] | None:
        """Read into a ring buffer held by ``holders`` users of the bytes and (until hashed) by the hasher."""
        if start != self.pos:  # the header reader proved the tensors tile the file, and reads follow them
            raise ConvertError(f"Internal error: {self.src.path.name} read at byte {start}, expected {self.pos}.")
        i = ring.acquire(holders + (1 if self.hasher else 0), stop)
        if i is None:
            return None
        got = self.src.read_direct(memoryview(ring.bufs[i]), start, n) if self.direct else None
        if got is None:
            mv = memoryview(ring.bufs[i])[:n]
            self.src.read_into(mv, start)
            self.src.drop_cache(start, n)
        else:
            mv = got
        if self.hasher:
            self.hasher.update(mv, lambda: ring.release(i))
        self.pos = start + n
        return i, mv


_Slot = tuple[tuple[int, int, int], int | None, memoryview | None, BaseException | None]

BLOCK_BYTES = 16 << 20  # consecutive planned ranges are read together, in reads of up to this size


def blocks(plan: list[tuple[int, int, int]], limit: int) -> list[list[tuple[int, int, int]]]:
    """``plan`` cut into runs of ranges that follow each other in one source and together span at
    most ``limit`` bytes (a longer range alone): each run is read with one request, so the disk sees
    big sequential reads whatever the piece size of the conversion (direct reads get no readahead)."""
    out: list[list[tuple[int, int, int]]] = []
    for key in plan:
        si, start, n = key
        if out:
            last = out[-1]
            lsi, lstart, _ = last[0]
            _, pstart, pn = last[-1]
            if lsi == si and pstart + pn == start and start + n - lstart <= limit:
                last.append(key)
                continue
        out.append([key])
    return out


class Prefetcher:
    """Reads a known sequence of (source, start, length) ranges ahead on a helper thread.

    At most ``depth`` chunks wait in memory, in a ring of reused buffers. ``read(si, start, n)``
    must ask for the ranges in the planned order; the memoryview it returns stays valid until
    the next ``read`` (or ``close``). ``take`` is the same read for a caller that keeps up to
    ``hold`` chunks at once: the buffer stays valid until the caller passes its number to
    ``release``. Progress is reported on the calling thread.
    """

    def __init__(self, streams: list[SourceStream], plan: list[tuple[int, int, int]],
                 on_bytes: Callable[[int], None], depth: int = 3, hold: int = 1) -> None:
        self.streams, self.plan, self.on_bytes = streams, plan, on_bytes
        size = max(max((n for _, _, n in plan), default=1), BLOCK_BYTES)
        self.blocks = blocks(plan, size)
        # depth read ahead + hold taken (each piece in at most one block) + buffers the hasher has
        # not finished with yet; the queue holds pieces of buffers from the ring, so it is bounded by it
        self.ring = BufferRing(size, depth + max(hold, 1) + 5)
        self.q: queue.Queue[_Slot] = queue.Queue()
        self.stop = threading.Event()
        self.held: int | None = None
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _put(self, x: _Slot) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(x, timeout=0.1)
                return True
            except queue.Full:  # the consumer is behind: wait again unless stopped
                continue
        return False

    def _run(self) -> None:
        for run in self.blocks:
            if self.stop.is_set():
                return
            si, start, _ = run[0]
            _, lstart, ln = run[-1]
            try:
                got = self.streams[si].read_ring(start, lstart + ln - start, self.ring, self.stop, len(run))
            except BaseException as e:
                self._put((run[0], None, None, e))
                return
            if got is None:
                return
            i, mv = got
            for key in run:
                _, s, n = key
                if not self._put((key, i, mv[s - start:s - start + n], None)):
                    return

    def _release_held(self) -> None:
        if self.held is not None:
            self.ring.release(self.held)
            self.held = None

    def take(self, si: int, start: int, n: int) -> tuple[int, memoryview]:
        """The next planned range, which must be (si, start, n): its buffer number and its bytes."""
        key, idx, mv, err = self.q.get()
        if err is not None:
            raise err
        if key != (si, start, n) or mv is None or idx is None:
            raise ConvertError(f"Internal error: read {key} arrived where {(si, start, n)} was expected.")
        self.on_bytes(n)
        return idx, mv

    def release(self, idx: int) -> None:
        """Give back a buffer ``take`` handed out."""
        self.ring.release(idx)

    def read(self, si: int, start: int, n: int) -> memoryview:
        self._release_held()
        self.held, mv = self.take(si, start, n)
        return mv

    def close(self) -> None:
        self.stop.set()
        self._release_held()
        with contextlib.suppress(queue.Empty):  # the end of the queue: everything in it is released
            while True:
                _, idx, _, _ = self.q.get_nowait()
                if idx is not None:
                    self.ring.release(idx)
        self.t.join(timeout=10)
