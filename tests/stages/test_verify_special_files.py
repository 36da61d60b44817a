"""verify never blocks on a FIFO named like a model file and never follows a symlink out of the
folder: each is a one-line exit 5 within seconds (the command runs in a child with a deadline)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_CLI = "import sys; from provision.cli.main import run_cli; sys.exit(run_cli(sys.argv[1:]))"


def _verify(folder: Path, home: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PROVISION_HOME": str(home)}
    # the deadline only bounds a hang: reading a FIFO nobody writes never returns
    return subprocess.run([sys.executable, "-c", _CLI, "verify", str(folder), *extra], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", ["consolidated.safetensors", "params.json"])
def test_a_fifo_named_like_a_model_file_is_exit_5_without_blocking(tiny_src: Path, tmp_path: Path,
                                                                    name: str) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_src, folder)
    (folder / name).unlink()
    os.mkfifo(folder / name)
    r = _verify(folder, tmp_path / "h")
    assert r.returncode == 5, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_a_manifest_path_that_is_a_fifo_is_exit_5_without_blocking(tiny_src: Path, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "manifest.toml")
    r = _verify(tiny_src, tmp_path / "h", "--manifest", str(tmp_path / "manifest.toml"))
    assert r.returncode == 5, r.stderr[-2000:]
    assert "FIFO" in r.stderr and "Traceback" not in r.stderr
