"""State shared by one CLI invocation: the terminal, the settings, the global flags and the report.

``cli.main`` creates one ``App`` per process; the global options (``--json``, ``--quiet``,
``--verbose``, ``--log-file``, ``--home``; before or after the subcommand) set its fields and
rebuild its ``Terminal``. Commands take it with ``get_app()``, print their human result with
``app.result(...)`` (stdout; see ``cli.output``) and end with ``app.finish(report)``, or, when a
stage failed part-way and handed back a partial report, with ``app.fail(error, report)`` (the one
failure path: the report and the error in one JSON document, then the error raised for
``cli.main`` to print and map to its exit code). Stages never see it; it renders nothing but the
JSON envelope.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

from rich.console import RenderableType

from provision.cli.console import Terminal, emit_json
from provision.cli.output import write_result
from provision.errors import ProvisionError
from provision.settings import Settings
from provision.version import JSON_SCHEMA_VERSION, __version__


@dataclass
class App:
    terminal: Terminal
    settings: Settings
    json: bool = False
    command: str = ""
    manifest_sha256: str | None = None
    started: float = field(default_factory=time.monotonic)
    reported: bool = False
    quiet: bool = False
    verbose: bool = False
    log_file: Path | None = None

    def configure(self, *, quiet: bool | None = None, verbose: bool | None = None, log_file: Path | None = None,
                  home: Path | None = None) -> None:
        """Apply global options (given before or after the subcommand); a flag once set stays set."""
        self.quiet = self.quiet or bool(quiet)
        self.verbose = self.verbose or bool(verbose)
        if home is not None:
            self.settings = replace(self.settings, home=Path(home).expanduser())
        changed_log = log_file is not None and log_file != self.log_file
        if changed_log:
            self.log_file = log_file
        t = self.terminal
        if changed_log or t.quiet != self.quiet or t.verbose != self.verbose:
            t.close()
            self.terminal = Terminal(quiet=self.quiet, verbose=self.verbose,
                                     log_file=self.log_file or self.settings.log_file,
                                     progress_interval=self.settings.progress_interval)

    def result(self, item: RenderableType) -> None:
        """Print part of the command's human result: stdout, or stderr when ``--json`` owns stdout."""
        write_result(self.terminal, item, json_mode=self.json)

    def envelope(self, ok: bool, exit_code: int) -> dict[str, Any]:
        return {
            "schema_version": JSON_SCHEMA_VERSION,
            "tool": "provision",
            "version": __version__,
            "command": self.command,
            "ok": ok,
            "exit_code": exit_code,
            "manifest_sha256": self.manifest_sha256,
            "seconds": round(time.monotonic() - self.started, 3),
        }

    def finish(self, report: dict[str, Any], *, ok: bool = True, exit_code: int = 0) -> None:
        """Emit the JSON report (when --json) once, at the end of a command."""
        if self.json and not self.reported:
            doc = self.envelope(ok, exit_code)
            doc.update(report)
            emit_json(doc)
        self.reported = True

    def fail(self, error: ProvisionError, report: dict[str, Any]) -> NoReturn:
        """End a command whose stage failed with a partial report: emit ``report`` with the error
        under ``"error"`` (in that key's place when ``report`` names it), then raise ``error``.
        The report sits beside the error, so the error's own ``context`` drops its copy of it."""
        err = error.to_dict()
        err["context"].pop("report", None)
        doc = dict(report)
        doc["error"] = err
        self.finish(doc, ok=False, exit_code=error.exit_code)
        raise error

    def fail_report(self, error: dict[str, Any], exit_code: int) -> None:
        if self.json and not self.reported:
            doc = self.envelope(False, exit_code)
            doc["error"] = error
            emit_json(doc)
        self.reported = True


_CURRENT: App | None = None


def set_app(app: App) -> None:
    global _CURRENT
    _CURRENT = app


def current_app() -> App | None:
    return _CURRENT


def get_app(json_flag: bool | None = None, command: str | None = None) -> App:
    """The App of this invocation (created with defaults when a command runs outside ``main``)."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = App(terminal=Terminal(), settings=Settings.load())
    if json_flag:  # a --json given before the subcommand already set it; a False here keeps it
        _CURRENT.json = True
    if command is not None:
        _CURRENT.command = command
    return _CURRENT


__all__ = ["App", "current_app", "get_app", "set_app"]
