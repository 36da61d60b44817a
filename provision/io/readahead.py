"""Read ahead on a helper thread: a ring of page-aligned buffers that one thread fills (in order)
while the caller consumes the last, so reading a file and hashing it cost the slower of the two,
not their sum. Used by the output hasher that follows the shard writer
(``formats.safetensors_writer``) and by convert's source hasher (``stages.convert.stage``); each
says how to fill a buffer (direct reads, a growing end, page-cache advice), this owns the ring,
the thread and the hand-over of errors.
"""

from __future__ import annotations

import mmap
import queue
import threading
from collections.abc import Callable
from types import TracebackType

#: ``fill(buf, stop)``: the next bytes into ``buf``; how many (0: the end). It may wait for more
#: bytes to exist, but must return (0 is fine) once ``stop`` is set.
Fill = Callable[[memoryview, threading.Event], int]


class ReadAhead:
    """``depth`` buffers of ``size`` bytes (``mmap``: page-aligned, as ``O_DIRECT`` needs) filled
    by ``fill`` on a thread named ``name``. ``next()`` returns the next filled block (empty at the
    end) and hands the block before it back to the reader; an exception in ``fill`` is raised by
    ``next()``. Use it as a context manager: leaving stops and joins the reader and frees the ring."""

    def __init__(self, fill: Fill, *, size: int, depth: int, name: str) -> None:
        self.fill = fill
        self.bufs = [mmap.mmap(-1, size) for _ in range(depth)]
        self.free: queue.Queue[int] = queue.Queue()
        for i in range(depth):
            self.free.put(i)
        self.full: queue.Queue[tuple[int, int] | BaseException] = queue.Queue()
        self.stop = threading.Event()
        self.held: tuple[int, memoryview] | None = None  # the block the caller has now
        self.thread = threading.Thread(target=self._read, daemon=True, name=name)
        self.thread.start()

    def _read(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    i = self.free.get(timeout=0.1)
                except queue.Empty:  # the consumer is behind: wait again unless it stopped
                    continue
                with memoryview(self.bufs[i]) as mv:
                    n = self.fill(mv, self.stop)
                self.full.put((i, n))
                if not n:
                    return
        except BaseException as e:  # raised by ``next`` on the consumer's thread
            self.full.put(e)

    def _release(self) -> None:
        if self.held is not None:
            i, mv = self.held
            self.held = None
            mv.release()
            self.free.put(i)

    def next(self) -> memoryview:
        """The next block, read in order (valid until the next call); empty at the end."""
        self._release()
        got = self.full.get()
        if isinstance(got, BaseException):
            raise got
        i, n = got
        mv = memoryview(self.bufs[i])[:n]
        self.held = (i, mv)
        return mv

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        if self.held is not None:
            self.held[1].release()
            self.held = None
        for b in self.bufs:
            b.close()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
