"""The one terminal writer: messages and progress on stderr, the JSON report on stdout.

Only ``cli.py`` and this module touch the terminal. On a TTY progress is a set of rich bars;
without one (CI logs, pipes) it is a plain line per task every few seconds, never a redraw.
``--quiet`` keeps errors only, ``--verbose`` adds debug lines (library log records among them:
the root logger's handler turns them into debug lines); ``NO_COLOR`` is honoured by
rich; ``--log-file``/``PROVISION_LOG_FILE`` appends every message with a timestamp; the plain
progress interval comes from ``Settings.progress_interval``.
It does not decide exit codes (``cli.main`` does) nor format reports beyond rendering.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from provision.errors import printable
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
        self._clocks: dict[str, _Clock] = {}
        _LIBRARY_LOGS.attach(self)

    # -- messages ---------------------------------------------------------------
    def _logline(self, level: str, msg: str) -> None:
        if self._log is not None:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            self._log.write(f"{stamp} {level} {msg}\n")
            self._log.flush()

    def info(self, msg: str) -> None:
        msg = visible(msg)
        self._logline("INFO", msg)
        if not self.quiet:
            self.console.print(msg, markup=False)

    def success(self, msg: str) -> None:
        msg = visible(msg)
        self._logline("INFO", msg)
        if not self.quiet:
            self.console.print(f"[green]✓[/green] {escape(msg)}")

    def warn(self, msg: str) -> None:
        msg = visible(msg)
        self._logline("WARN", msg)
        if not self.quiet:
            self.console.print(f"[yellow]warning:[/yellow] {escape(msg)}")

    def error(self, msg: str) -> None:
        msg = visible(msg)
        self._logline("ERROR", msg)
        # NO_COLOR: rich drops the colour but keeps bold; a plain prefix then, as NO_COLOR users expect
        prefix = "error:" if self.console.no_color else "[bold red]error:[/bold red]"
        self.console.print(f"{prefix} {escape(msg)}")

    def debug(self, msg: str) -> None:
        msg = visible(msg)
        self._logline("DEBUG", msg)
        if self.verbose and not self.quiet:
            self.console.print(f"[dim]{escape(msg)}[/dim]")

    def out(self, text: str, *, commentary: bool = False) -> None:
        """Write one line exactly as given, never wrapped at the terminal width and without markup
        (so a command in it pastes): on stdout as the result, which ``--quiet`` does not silence; with
        ``commentary`` (the result is in a ``--json`` document) on stderr instead, unless quiet."""
        text = visible(text)
        self._logline("RESULT", text)
        if commentary and self.quiet:
            return
        with self._lock:
            if self._progress is not None:  # live bars redraw stderr: let them end their line first
                self._progress.refresh()
            dest = self.console.file if commentary else sys.stdout
            dest.write(text + "\n")
            dest.flush()

    def print(self, renderable: Any) -> None:
        """Print a rich renderable (a table, a panel) unless quiet; bars still drawn end first, so
        nothing is left stacked under it."""
        if not self.quiet:
            self.end_progress()
            self.console.print(renderable)

    def end_progress(self) -> None:
        """Take down the live bars (their finished tasks have printed their summaries)."""
        with self._lock:
            if self._progress is not None:
                self._progress.stop()
                self._progress = None
                self._tasks.clear()

    # -- progress -----------------------------------------------------------------
    def progress(self, ev: ProgressEvent) -> None:
        """A ``ProgressFn``: pass ``terminal.progress`` to any stage."""
        if _CONTROL_CHARS.search(ev.description):  # a name from a download: never raw on the terminal
            ev = replace(ev, description=printable(ev.description))
        with self._lock:
            if ev.unit == "msg":
                self.info(ev.description)
                return
            if self.quiet:
                return
            clock = self._clocks.get(ev.task)
            if ev.finished and clock is not None and clock.finished == _shown(ev):
                return  # already summed up: a finished task is reported once
            if clock is None or clock.finished is not None:
                clock = self._clocks[ev.task] = _Clock(time.monotonic(), ev.done)  # a new (or restarted) task
            if ev.finished and not ev.done and not ev.total:
                clock.finished = 0.0  # nothing to do, nothing to report
                return
            if self.is_tty:
                self._progress_tty(ev, clock)
            else:
                self._progress_plain(ev, clock)
            if ev.finished:
                clock.finished = _shown(ev)

    def _progress_tty(self, ev: ProgressEvent, clock: _Clock) -> None:
        tid = self._tasks.get(ev.task)
        if ev.finished:  # the bar gives way to its one-line summary
            if tid is not None and self._progress is not None:
                self._progress.remove_task(tid)
                del self._tasks[ev.task]
            self._plain(summary_line(ev, clock.rate(ev.done), clock.seconds()))
            if not self._tasks and self._progress is not None:
                self._progress.stop()
                self._progress = None
            return
        if self._progress is None:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), _AmountColumn(), _RateColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[extra]}"),
                console=self.console, transient=True, redirect_stdout=False, redirect_stderr=False)
            self._progress.start()
        desc = ev.description or ev.task
        extra, rate = format_extra(ev.extra), ev.extra.get("rate")
        if tid is None:
            tid = self._progress.add_task(desc, total=ev.total, completed=int(_shown(ev)), unit=ev.unit, extra=extra,
                                          rate=rate)
            self._tasks[ev.task] = tid
        self._progress.update(tid, completed=_shown(ev), total=ev.total, description=desc, unit=ev.unit, extra=extra,
                              rate=rate)

    def _progress_plain(self, ev: ProgressEvent, clock: _Clock) -> None:
        now = time.monotonic()
        if ev.finished:
            self._plain(summary_line(ev, clock.rate(ev.done), clock.seconds()))
            return
        if ev.total is None:  # open-ended (seeding, waiting): a line only when something changed
            key = (ev.done, tuple(sorted((k, str(v)) for k, v in ev.extra.items() if k not in VOLATILE)))
            if key == clock.last_key:
                return
            clock.last_key = key
        elif clock.printed_at is None:  # the first event starts the clock: a task that ends within
            clock.printed_at = now  # the interval needs no line before its summary
            return
        elif now - clock.printed_at < self.progress_interval:
            return
        clock.printed_at = now
        self._plain(progress_line(ev, clock.rate(ev.done)))

    def _plain(self, line: str) -> None:
        self._logline("PROGRESS", line)
        self.console.print(line, markup=False, highlight=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._tasks.clear()
        self._clocks.clear()
        if self._log is not None:
            self._log.close()
            self._log = None


VOLATILE = frozenset({"rate", "eta", "left"})  # extras that change without anything happening


@dataclass
class _Clock:
    """When a task started (and at what count), and what of it was last shown."""

    start: float
    start_done: float
    printed_at: float | None = None
    last_key: tuple[Any, ...] | None = None
    finished: float | None = None  # the count its summary showed, once finished

    def seconds(self) -> float:
        """Seconds since the task's first event."""
        return time.monotonic() - self.start

    def rate(self, done: float) -> float | None:
        """Units per second since the task's first event (None when no time has passed)."""
        elapsed = time.monotonic() - self.start
        return (done - self.start_done) / elapsed if elapsed > 0 else None


def _shown(ev: ProgressEvent) -> float:
    """The count to show: never past the total (a bar does not end at 101%)."""
    return min(ev.done, ev.total) if ev.total else ev.done


def _has_rate(unit: str, total: float | None) -> bool:
    """Bytes, and counts working towards a total, have a rate; an open-ended count (peers) has none."""
    return unit == "B" or total is not None


def format_amount(done: float, total: float | None, unit: str) -> str:
    """``12.00 MB / 34.00 MB`` for bytes, ``9/16 tokens`` for anything counted."""
    if unit == "B":
        return human_bytes(done) + (f" / {human_bytes(total)}" if total else "")
    return f"{done:g}" + (f"/{total:g}" if total else "") + f" {unit}"


def format_rate(rate: float | None, unit: str) -> str:
    if rate is None or rate <= 0:
        return ""
    return f"{human_bytes(rate)}/s" if unit == "B" else f"{rate:.1f} {unit}/s"


def format_extra(extra: dict[str, Any]) -> str:
    """The stage's own facts (peers, eta, ...), ``rate`` excepted: a line shows one rate."""
    return " ".join(f"{k}={v}" for k, v in extra.items() if k != "rate")


def progress_line(ev: ProgressEvent, rate: float | None) -> str:
    """One plain progress line: what, how far (with the percentage of the real total), one rate."""
    shown = _shown(ev)
    pct = f" ({100 * shown / ev.total:.0f}%)" if ev.total else ""
    speed = str(ev.extra["rate"]) if "rate" in ev.extra else format_rate(rate if _has_rate(ev.unit, ev.total) else None,
                                                                         ev.unit)
    parts = [f"{ev.description or ev.task}: {format_amount(shown, ev.total, ev.unit)}{pct}", speed,
             format_extra(ev.extra)]
    return " ".join(p for p in parts if p)


def summary_line(ev: ProgressEvent, rate: float | None, seconds: float | None = None) -> str:
    """What a finished task leaves behind, once: its total, how long it took, its average rate."""
    speed = format_rate(rate, ev.unit)
    took = f" in {seconds:.1f} s" if seconds is not None and seconds >= 0.05 else ""
    return f"{ev.description or ev.task}: done, {format_amount(_shown(ev), None, ev.unit)}{took}" + (
        f" ({speed})" if speed else "")


class _AmountColumn(ProgressColumn):
    """Bytes as sizes, anything else as ``done/total unit``."""

    def render(self, task: Task) -> Text:
        unit = str(task.fields.get("unit", "B"))
        done = min(task.completed, task.total) if task.total else task.completed
        if unit == "B":
            return Text(format_amount(done, task.total, unit).replace(" / ", "/"), style="progress.download")
        return Text(format_amount(done, task.total, unit), style="progress.download")


class _RateColumn(ProgressColumn):
    """The stage's own rate when it gives one, else the measured one, in the task's unit."""

    def render(self, task: Task) -> Text:
        given = task.fields.get("rate")
        unit = str(task.fields.get("unit", "B"))
        speed = str(given) if given else format_rate(task.speed if _has_rate(unit, task.total) else None, unit)
        return Text(speed, style="progress.data.speed")


class _LibraryLogs(logging.Handler):
    """Python logging's root handler: a library's log line (huggingface_hub's retries, say) becomes a
    debug line of the newest terminal, shown with ``--verbose`` and kept in ``--log-file``."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.terminal: Terminal | None = None

    def attach(self, terminal: Terminal) -> None:
        self.terminal = terminal
        root = logging.getLogger()
        if self not in root.handlers:
            root.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        t = self.terminal
        if t is not None:
            try:
                t.debug(f"{record.name}: {record.getMessage()}")
            except Exception:  # a log line must never break the command it is about
                self.handleError(record)


_LIBRARY_LOGS = _LibraryLogs()


_CONTROL_CHARS = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # control characters but the newline


def visible(text: str) -> str:
    """``text`` with every control character but the newline escaped (``errors.printable`` per
    line): a file or tensor name cannot move the cursor or clear the screen."""
    if not _CONTROL_CHARS.search(text):
        return text
    return "\n".join(printable(line) for line in text.split("\n"))


def escape(msg: str) -> str:
    from rich.markup import escape as _escape

    return _escape(msg)


def emit_json(report: dict[str, Any], stream: IO[str] | None = None) -> None:
    """Write one JSON document on stdout (the only thing that ever goes to stdout)."""
    out = stream or sys.stdout
    out.write(json.dumps(report, indent=2, sort_keys=False, default=str))
    out.write("\n")
    out.flush()
