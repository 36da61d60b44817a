"""What reaches the terminal: a name carrying control characters (from a torrent, a Hub listing or a
checkpoint's header) is shown escaped in every message, result line and progress line, and
``NO_COLOR`` leaves the ``error:`` prefix without any escape sequence at all (bold included)."""

from __future__ import annotations

import io

import pytest

from provision.cli.console import Terminal
from provision.progress import ProgressEvent

CLEAR = "\x1b[2J"  # "erase the screen": must never reach a terminal from a name
HOSTILE = f"weights{CLEAR}.safetensors"
SHOWN = "weights\\x1b[2J.safetensors"  # ESC (0x1b) written as a visible \x1b escape


def _terminal(monkeypatch: pytest.MonkeyPatch, *, tty: bool) -> tuple[Terminal, io.StringIO]:
    monkeypatch.delenv("NO_COLOR", raising=False)
    buf = io.StringIO()
    return Terminal(stream=buf, force_tty=tty, progress_interval=0.0), buf


@pytest.mark.parametrize("method", ["info", "success", "warn", "error"])
@pytest.mark.parametrize("tty", [False, True])
def test_every_message_kind_shows_a_hostile_name_escaped(monkeypatch: pytest.MonkeyPatch, method: str,
                                                         tty: bool) -> None:
    term, buf = _terminal(monkeypatch, tty=tty)
    getattr(term, method)(f"refusing {HOSTILE}")
    out = buf.getvalue()
    assert CLEAR not in out and SHOWN in out


def test_a_result_line_keeps_its_newlines_and_escapes_the_rest(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    term, _ = _terminal(monkeypatch, tty=False)
    term.out(f"first {HOSTILE}\nsecond\tline")
    out = capsys.readouterr().out
    assert out == f"first {SHOWN}\nsecond\\x09line\n"


@pytest.mark.parametrize("tty", [False, True])
def test_a_progress_description_shows_a_hostile_name_escaped(monkeypatch: pytest.MonkeyPatch, tty: bool) -> None:
    term, buf = _terminal(monkeypatch, tty=tty)
    term.progress(ProgressEvent(task="fetch:x", done=0, total=100, description=f"fetch {HOSTILE}"))
    term.progress(ProgressEvent(task="fetch:x", done=100, total=100, description=f"fetch {HOSTILE}", finished=True))
    term.progress(ProgressEvent(task="note", done=0, total=0, unit="msg", description=f"kept {HOSTILE}",
                                finished=True))
    term.close()
    out = buf.getvalue()
    assert CLEAR not in out and out.count(SHOWN) >= 2  # the summary line and the note


def test_no_color_prints_the_error_prefix_without_any_escape_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    buf = io.StringIO()
    term = Terminal(stream=buf, force_tty=True)
    term.error("it failed")
    assert buf.getvalue() == "error: it failed\n"  # no ESC byte: neither colour nor bold


def test_with_colour_the_error_prefix_is_styled(monkeypatch: pytest.MonkeyPatch) -> None:
    term, buf = _terminal(monkeypatch, tty=True)  # the check above can fail: here the prefix is styled
    term.error("it failed")
    assert "\x1b[" in buf.getvalue() and "it failed" in buf.getvalue()
