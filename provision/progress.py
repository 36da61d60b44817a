"""The progress protocol stages use: a callback taking ``ProgressEvent``s.

Stages never print; they call ``progress(ProgressEvent(...))``. ``console.py`` renders the
events (bars on a TTY, a plain line every few seconds otherwise); library users may pass
their own callable or ``None``. This module imports nothing heavy.
"""

from __future__ import annotations

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


def null_progress(_event: ProgressEvent) -> None:
    """A progress callback that ignores everything."""


def note(progress: ProgressFn | None, task: str, message: str) -> None:
    """Send a one-off message (total 0, finished) through a progress callback."""
    if progress is not None:
        progress(ProgressEvent(task=task, done=0, total=0, unit="msg", description=message, finished=True))
