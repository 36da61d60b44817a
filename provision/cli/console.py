"""The one terminal writer: messages and progress on stderr, the JSON report on stdout.

Only ``cli.py`` and this module touch the terminal. On a TTY progress is a set of rich bars;
without one (CI logs, pipes) it is a plain line per task every few seconds, never a redraw.
``--quiet`` keeps errors only, ``--verbose`` adds debug lines; ``NO_COLOR`` is honoured by
rich; ``--log-file``/``PROVISION_LOG_FILE`` appends every message with a timestamp; the plain
progress interval comes from ``Settings.progress_interval``.
It does not decide exit codes (``cli.main`` does) nor format reports beyond rendering.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from provision.progress import ProgressEvent
from provision.settings import Settings
from provision.units import human_bytes


class Terminal:
    """Wraps one rich Console on stderr plus an optional log file."""

    def __init__(
        self,
        *,
        quiet: bool = False,
        verbose: bool = False,
        log_file: Path | None = None,
        stream: IO[str] | None = None,
        force_tty: bool | None = None,
        progress_interval: float | None = None,
    ) -> None:
        self.quiet = quiet
        # seconds between plain progress lines of one task (no TTY); default: the settings'
        self.progress_interval = Settings.load().progress_interval if progress_interval is None else progress_interval
        self.verbose = verbose
        self.console = Console(file=stream or sys.stderr, stderr=stream is None, highlight=False,
                               force_terminal=force_tty)
        if not self.console.is_terminal:  # logs and pipes: never wrap long lines
            self.console.soft_wrap = True
            self.console.width = 160
        self.is_tty = self.console.is_terminal if force_tty is None else force_tty
        self._log: IO[str] | None = None
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(log_file, "a", encoding="utf-8")
        self._lock = threading.Lock()
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._plain_last: dict[str, float] = {}
        self._plain_start: dict[str, tuple[float, float]] = {}

    # -- messages ---------------------------------------------------------------
    def _logline(self, level: str, msg: str) -> None:
        if self._log is not None:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            self._log.write(f"{stamp} {level} {msg}\n")
            self._log.flush()

    def info(self, msg: str) -> None:
        self._logline("INFO", msg)
        if not self.quiet:
            self.console.print(msg, markup=False)

    def success(self, msg: str) -> None:
        self._logline("INFO", msg)
        if not self.quiet:
            self.console.print(f"[green]✓[/green] {escape(msg)}")

    def warn(self, msg: str) -> None:
        self._logline("WARN", msg)
        if not self.quiet:
            self.console.print(f"[yellow]warning:[/yellow] {escape(msg)}")

    def error(self, msg: str) -> None:
        self._logline("ERROR", msg)
        self.console.print(f"[bold red]error:[/bold red] {escape(msg)}")

    def debug(self, msg: str) -> None:
        self._logline("DEBUG", msg)
        if self.verbose and not self.quiet:
            self.console.print(f"[dim]{escape(msg)}[/dim]")

    def print(self, renderable: Any) -> None:
        """Print a rich renderable (a table, a panel) unless quiet."""
        if not self.quiet:
            self.console.print(renderable)

    # -- progress -----------------------------------------------------------------
    def progress(self, ev: ProgressEvent) -> None:
        """A ``ProgressFn``: pass ``terminal.progress`` to any stage."""
        with self._lock:
            if ev.unit == "msg":
                self.info(ev.description)
                return
            if self.quiet:
                return
            if self.is_tty:
                self._progress_tty(ev)
            else:
                self._progress_plain(ev)

    def _progress_tty(self, ev: ProgressEvent) -> None:
        if self._progress is None:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn() if ev.unit == "B" else MofNCompleteColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.start()
        tid = self._tasks.get(ev.task)
        desc = ev.description or ev.task
        if tid is None:
            tid = self._progress.add_task(desc, total=ev.total)
            self._tasks[ev.task] = tid
        self._progress.update(tid, completed=ev.done, total=ev.total, description=desc)
        if ev.finished:
            self._progress.update(tid, completed=ev.total if ev.total is not None else ev.done)

    def _progress_plain(self, ev: ProgressEvent) -> None:
        now = time.monotonic()
        start = self._plain_start.setdefault(ev.task, (now, ev.done))
        last = self._plain_last.get(ev.task)
        if not ev.finished and last is not None and now - last < self.progress_interval:
            return
        if last is None and not ev.finished:
            self._plain_last[ev.task] = now  # first event: start the clock, print later
            return
        self._plain_last[ev.task] = now
        elapsed = max(now - start[0], 1e-9)
        rate = max(0.0, (ev.done - start[1]) / elapsed)
        desc = ev.description or ev.task
        if ev.unit == "B":
            done = human_bytes(ev.done)
            tot = f" / {human_bytes(ev.total)}" if ev.total else ""
            pct = f" ({100 * ev.done / ev.total:.0f}%)" if ev.total else ""
            extra = f" {human_bytes(rate)}/s"
        else:
            done = f"{ev.done:g}"
            tot = f" / {ev.total:g}" if ev.total else ""
            pct = f" ({100 * ev.done / ev.total:.0f}%)" if ev.total else ""
            extra = ""
        for k, v in ev.extra.items():
            extra += f" {k}={v}"
        state = " done" if ev.finished else ""
        line = f"{desc}: {done}{tot}{pct}{extra}{state}"
        self._logline("PROGRESS", line)
        self.console.print(line, markup=False, highlight=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._tasks.clear()
        if self._log is not None:
            self._log.close()
            self._log = None


def escape(msg: str) -> str:
    from rich.markup import escape as _escape

    return _escape(msg)


def emit_json(report: dict[str, Any], stream: IO[str] | None = None) -> None:
    """Write one JSON document on stdout (the only thing that ever goes to stdout)."""
    out = stream or sys.stdout
    out.write(json.dumps(report, indent=2, sort_keys=False, default=str))
    out.write("\n")
    out.flush()
