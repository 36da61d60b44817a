"""The stdout half of the output contract: a command's human result, as text lines.

A command's result (the tables of ``ls`` and ``plan``, ``manifest show``, ``verify``'s per-file
lines, the serve command) goes to stdout, so ``provision ls 2>/dev/null`` and ``provision -q ls``
still print it; progress, notes and warnings go to stderr; ``--quiet`` silences stderr only. With
``--json`` stdout carries the one JSON report, so the human result moves to stderr beside the notes
(where ``--quiet`` silences it). ``Terminal.out`` writes each line (and appends it to ``--log-file``);
this module only turns a result (a line or a rich table) into those lines, never wrapping a text line.
"""

from __future__ import annotations

import io
import shutil
import sys
from typing import TYPE_CHECKING

from rich.console import Console, RenderableType

if TYPE_CHECKING:
    from provision.cli.console import Terminal

PIPE_WIDTH = 160  # columns a table gets on a pipe or in a file (no terminal to ask)


def result_width(to_stderr: bool) -> int:
    """Columns a table may use: the terminal's when the destination is one, else ``PIPE_WIDTH``."""
    stream = sys.stderr if to_stderr else sys.stdout
    try:
        is_tty = stream is not None and stream.isatty()
    except (ValueError, OSError):  # a closed stream
        is_tty = False
    return shutil.get_terminal_size((PIPE_WIDTH, 24)).columns if is_tty else PIPE_WIDTH


def render_plain(item: RenderableType, width: int = PIPE_WIDTH) -> str:
    """``item`` as plain text lines (no colour, no trailing blank line)."""
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, highlight=False, force_terminal=False,
            soft_wrap=False).print(item)
    return buf.getvalue().rstrip("\n")


def write_result(terminal: Terminal, item: RenderableType, *, json_mode: bool) -> None:
    """Print ``item`` (a line of text, never wrapped, or a rich renderable) as part of the result."""
    text = item if isinstance(item, str) else render_plain(item, result_width(json_mode))
    for line in text.split("\n"):
        terminal.out(line, commentary=json_mode)


__all__ = ["PIPE_WIDTH", "render_plain", "result_width", "write_result"]
