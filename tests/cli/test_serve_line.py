"""The serve command: one unbroken, shell-quoted line at the end of `convert` and of every successful
`run` (a cached rerun included), in the human output and in the ``--json`` report.

The terminal case runs the real command under a pseudo-terminal of a given width; the expected
command is written out here, argument by argument, from what vLLM needs for a Mistral-layout bf16
checkpoint, and compared after ``shlex.split`` (so the quoting is proven to paste back).
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import shlex
import struct
import sys
import termios
import time
from pathlib import Path

import pytest

from provision.cli.main import run_cli
from provision.testing.torrent_fixtures import provision_env
from tests.support.cli import cli_json

ROOT = Path(__file__).resolve().parents[2]


def _expected_argv(out: Path) -> list[str]:
    """vLLM's flags for a Mistral-layout bf16 folder at the default 32768-token context."""
    return ["vllm", "serve", str(out), "--tokenizer-mode", "mistral", "--config-format", "mistral",
            "--load-format", "mistral", "--dtype", "bfloat16", "--max-model-len", "32768",
            "--limit-mm-per-prompt", '{"image": 4}']


def _run_in_pty(argv: list[str], columns: int, deadline_s: float = 240.0) -> tuple[int, str]:
    """Run ``argv`` with stdout and stderr on a pseudo-terminal ``columns`` wide; (exit code, output)."""
    env = {**provision_env(), "COLUMNS": str(columns), "LINES": "40", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its terminal
        try:
            fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
            os.chdir(ROOT)
            os.execvpe(argv[0], argv, env)
        finally:
            os._exit(127)
    chunks: list[bytes] = []
    end = time.monotonic() + deadline_s
    try:
        while time.monotonic() < end:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        else:
            os.kill(pid, 9)
            raise AssertionError(f"no end of output within {deadline_s} s")
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
@pytest.mark.parametrize("columns", [80, 200])
def test_convert_prints_the_serve_command_as_one_unbroken_pastable_line_on_a_terminal(
    tiny_src: Path, tmp_path: Path, columns: int
) -> None:
    out = tmp_path / "converted for serving"  # spaces: the line must quote them to paste
    rc, text = _run_in_pty([sys.executable, "-m", "provision.cli.main", "convert", str(tiny_src), "--out", str(out),
                            "--target", "cpu", "--scheme", "bf16", "--no-compare"], columns)
    assert rc == 0, text[-3000:]
    lines = [ln for ln in text.replace("\r\n", "\n").split("\n") if "serve it with:" in ln]
    assert len(lines) == 1, text[-3000:]
    line = lines[0][lines[0].index("serve it with:"):]
    assert len(line) > columns or columns == 200  # at 80 columns the line is longer than the terminal
    assert shlex.split(line.removeprefix("serve it with: ")) == _expected_argv(out)


def _run_human(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = run_cli(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_cached_rerun_still_ends_with_the_serve_command_in_human_and_json_output(
    tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    args = ["run", str(tiny_src / "manifest.toml"), "--home", str(home), "--adopt", str(tiny_src), "--no-hf-cache",
            "--target", "cpu", "--scheme", "bf16", "--skip-smoke"]
    rc, first, err = _run_human(capsys, *args)
    assert rc == 0, err[-3000:]
    serve = [ln for ln in first.splitlines() if ln.startswith("serve it with: ")]
    assert len(serve) == 1, first
    argv = shlex.split(serve[0].removeprefix("serve it with: "))
    out_dir = Path(argv[2])
    assert argv == _expected_argv(out_dir) and out_dir.is_dir()

    rc, doc, err = cli_json(capsys, *args)  # the cached rerun, --json
    assert rc == 0, err[-3000:]
    assert [s["result"] for s in doc["stages"] if s["stage"] == "convert"] == ["skipped"]
    assert shlex.split(doc["vllm_command"]) == argv

    rc, again, err = _run_human(capsys, *args)  # the cached rerun, human
    assert rc == 0, err[-3000:]
    assert [ln for ln in again.splitlines() if ln.startswith("serve it with: ")] == serve


def test_the_serve_line_under_json_goes_to_stderr_and_quiet_silences_it_there(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from provision.cli.console import Terminal

    long = "serve it with: vllm serve /x " + "--flag value " * 30
    t = Terminal(force_tty=True)
    t.out(long)
    out, err = capsys.readouterr()
    assert out == long + "\n" and err == ""  # one line, however wide the console thinks it is
    t.out(long, commentary=True)
    out, err = capsys.readouterr()
    assert out == "" and err == long + "\n"
    Terminal(quiet=True).out(long, commentary=True)
    Terminal(quiet=True).out("result")
    out, err = capsys.readouterr()
    assert (out, err) == ("result\n", "")


@pytest.mark.parametrize(("target", "dtype"), [("cpu", "bfloat16"), ("t4", "float16")])  # T4 is sm_75: no bf16
def test_a_run_without_conversion_ends_with_the_serve_command_for_the_original(
    target: str, dtype: str, tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    rc, out, err = _run_human(capsys, "run", str(tiny_src / "manifest.toml"), "--home", str(home), "--adopt",
                              str(tiny_src), "--no-hf-cache", "--target", target, "--skip-convert", "--skip-smoke")
    assert rc == 0, err[-3000:]
    (line,) = [ln for ln in out.splitlines() if ln.startswith("serve it with: ")]
    argv = shlex.split(line.removeprefix("serve it with: "))
    original = home / "models" / "tiny-pixtral" / "original"
    expected = _expected_argv(original)
    expected[expected.index("--dtype") + 1] = dtype
    assert argv == expected
