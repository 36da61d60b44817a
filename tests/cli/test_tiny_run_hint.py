"""`provision tiny OUT` ends by saying how to run what it wrote without any network (its manifest's
one source is the folder itself, a local source), and that command works as printed."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from provision.cli.main import run_cli
from tests.support.cli import cli_json


def test_tiny_prints_a_run_command_that_works_without_a_network(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.example.invalid")  # any Hub request would fail
    out = tmp_path / "my tiny"  # a space: the printed command must quote it
    capsys.readouterr()
    assert run_cli(["tiny", str(out)]) == 0
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("run it without a network: ")]
    argv = shlex.split(line.removeprefix("run it without a network: "))
    assert argv == ["provision", "run", str(out / "manifest.toml")]
    code, doc, err = cli_json(capsys, *argv[1:], "--no-hf-cache", "--skip-convert", "--skip-smoke")
    assert code == 0, err
    fetch = next(s for s in doc["stages"] if s["stage"] == "fetch")
    assert fetch["details"]["how"] == "local"
