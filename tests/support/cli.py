"""Running ``provision`` in-process the way the tests read it: the ``--json`` report from stdout.

``cli_json`` runs ``provision ARGV --json`` through ``run_cli`` and returns the exit code, the parsed
report (``{}`` when nothing was printed) and stderr; ``provision_home`` is the ``PROVISION_HOME``
the root conftest gives each test. No fixtures, no subprocesses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from provision.cli.main import run_cli


def cli_output(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``provision ARGV`` in-process as given: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = run_cli(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any], str]:
    """Run ``provision ARGV --json`` in-process: (exit code, JSON report or ``{}``, stderr)."""
    capsys.readouterr()
    rc = run_cli([*argv, "--json"])
    out, err = capsys.readouterr()
    doc: dict[str, Any] = json.loads(out) if out.strip() else {}
    return rc, doc, err


def provision_home() -> Path:
    """This test's ``PROVISION_HOME`` (set by the autouse fixture in tests/conftest.py)."""
    return Path(os.environ["PROVISION_HOME"])
