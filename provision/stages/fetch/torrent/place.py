"""After a verified download: hold SIGINT/SIGTERM back while files move into place
(``provision.io.staging.commit_file`` moves them), and forget the staging folder and resume data.

Nothing in this module checks content or talks to libtorrent.
"""

from __future__ import annotations

import shutil
import signal
import threading
from pathlib import Path
from typing import Any


def remove_staging(staging: Path, resume_path: Path) -> None:
    """Forget a finished download: its resume data, its staging folder and the model's staging
    parent when empty (each may be gone already, or the parent shared with another download)."""
    try:
        resume_path.unlink()
    except OSError:
        pass  # best effort: the files are in place; resume data left behind only costs a re-check
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.parent.rmdir()
    except OSError:
        pass  # not empty: another download of the same model stages there


class DeferredSignals:
    """Hold SIGINT/SIGTERM back for a short stretch that must not be cut (the moves into place
    and the start of seeding): the Python handlers are swapped for one that notes the signal,
    and :meth:`release` puts them back and raises a noted signal again, so it lands where the
    caller is ready for it. Python runs signal handlers in the main thread only, so this holds
    whichever thread the kernel delivered the signal to; elsewhere it does nothing."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self.saved: dict[int, Any] = {}

    def __enter__(self) -> DeferredSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum: int, _frame: Any) -> None:
        if self.pending is None:
            self.pending = signum

    def release(self) -> None:
        saved, self.saved = self.saved, {}
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if saved and self.pending is not None:
            signal.raise_signal(self.pending)

    def __exit__(self, *_exc: object) -> None:
        self.release()
