"""The progress protocol stages use: a callback taking ``ProgressEvent``s.

Stages never print; they call ``progress(ProgressEvent(...))``. ``console.py`` renders the
events (bars on a TTY, a plain line every few seconds otherwise); library users may pass
their own callable or ``None``. This module imports nothing heavy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ProgressEvent:
    task: str  # a stable id for one bar, e.g. "fetch:consolidated.safetensors"
    done: float  # units done so far (absolute, not a delta)
    total: float | None = None  # None when unknown
    unit: str = "B"  # "B" for bytes (rendered with rates), anything else is a count
    description: str = ""  # what a human sees beside the bar
    finished: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. peers, rate, eta


ProgressFn = Callable[[ProgressEvent], None]


def note(progress: ProgressFn | None, task: str, message: str) -> None:
    """Send a one-off message (total 0, finished) through a progress callback."""
    if progress is not None:
        progress(ProgressEvent(task=task, done=0, total=0, unit="msg", description=message, finished=True))


class ByteCounter:
    """Counts bytes as they are processed and reports them through ``progress`` at most every
    ``interval`` seconds (and, with ``report_end``, as soon as ``total`` is reached)."""

    def __init__(self, progress: ProgressFn | None, *, task: str, total: int, description: str,
                 interval: float, report_end: bool = False) -> None:
        self.progress = progress
        self.task = task
        self.total = total
        self.description = description
        self.interval = interval
        self.report_end = report_end
        self.done = 0
        self._last = 0.0

    def __call__(self, n: int) -> None:
        self.done += n
        if self.progress is None:
            return
        now = time.monotonic()
        if now - self._last >= self.interval or (self.report_end and self.done >= self.total):
            self._last = now
            self.progress(ProgressEvent(task=self.task, done=self.done, total=self.total,
                                        description=self.description))

    def finish(self) -> None:
        """Report the final count as finished."""
        if self.progress is not None:
            self.progress(ProgressEvent(task=self.task, done=self.done, total=self.total,
                                        description=self.description, finished=True))
