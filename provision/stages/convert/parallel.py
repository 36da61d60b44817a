"""Running a conversion's chunk jobs on several threads and handing their results back in order.

``OrderedPool.ordered`` takes an ordered stream of (key, job) pairs, runs the jobs on ``workers``
threads (torch and hashlib release the GIL in their kernels, so the threads share the cores) and
yields (key, result) in the order the jobs came, with at most ``window`` jobs started and not yet
handed back: the caller's memory for in-flight chunks is bounded by ``window`` times one chunk.
One worker runs every job inline on the calling thread. A job's exception is raised when its
turn comes, as the serial loop would raise it. ``resolve_workers`` decides the worker count
(``--workers``, then ``PROVISION_CONVERT_WORKERS``, then the usable CPUs capped at
``MAX_DEFAULT_WORKERS``). It does not read, convert or write tensors.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

from provision.errors import UsageError
from provision.settings import Settings

K = TypeVar("K")
R = TypeVar("R")

MAX_DEFAULT_WORKERS = 8  # the default stops here: a disk rarely takes more than 8 cores' worth of conversion
MAX_WORKERS = 256


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS has no affinity mask
        return max(1, os.cpu_count() or 1)


def resolve_workers(workers: int | None, settings: Settings | None = None) -> int:
    """The number of conversion threads: ``workers`` when given, else ``PROVISION_CONVERT_WORKERS``,
    else the usable CPUs (at most ``MAX_DEFAULT_WORKERS``). A count outside 1..MAX_WORKERS, or an
    environment value that is not a whole number, is a ``UsageError`` (exit 2)."""
    if workers is None:
        raw = (settings or Settings.load()).convert_workers
        if raw is None:
            return min(usable_cpus(), MAX_DEFAULT_WORKERS)
        try:
            workers = int(raw)
        except ValueError:
            raise UsageError(f"PROVISION_CONVERT_WORKERS={raw!r} is not a whole number of threads.") from None
        if not 1 <= workers <= MAX_WORKERS:
            raise UsageError(f"PROVISION_CONVERT_WORKERS={workers} must be between 1 and {MAX_WORKERS}.")
        return workers
    if not 1 <= workers <= MAX_WORKERS:
        raise UsageError(f"--workers {workers} must be between 1 and {MAX_WORKERS}.")
    return workers


class OrderedPool(Generic[K, R]):
    """``workers`` threads running jobs, results handed back in submission order (see the module)."""

    def __init__(self, workers: int, window: int) -> None:
        if workers < 1 or window < 1:
            raise ValueError("OrderedPool needs at least one worker and a window of at least one job.")
        self.workers, self.window = workers, max(window, workers)
        self._ex: ThreadPoolExecutor | None = (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="convert") if workers > 1 else None)

    def ordered(self, jobs: Iterable[tuple[K, Callable[[], R]]]) -> Iterator[tuple[K, R]]:
        """Run ``jobs``; yield (key, result) in their order, never more than ``window`` ahead."""
        if self._ex is None:
            for key, job in jobs:
                yield key, job()
            return
        pending: deque[tuple[K, Future[R]]] = deque()
        for key, job in jobs:
            if len(pending) >= self.window:
                k, fut = pending.popleft()
                yield k, fut.result()
            pending.append((key, self._ex.submit(job)))
        while pending:
            k, fut = pending.popleft()
            yield k, fut.result()

    def close(self) -> None:
        """Drop the jobs not started and wait for the running ones (they may hold the caller's buffers)."""
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=True)
            self._ex = None

    def __enter__(self) -> OrderedPool[K, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
