"""Shared fixtures: the tiny checkpoint (built once per session), a clean PROVISION_HOME, and
``require_tool`` (fails in CI when a tool .ci/run installs is missing, skips elsewhere).

Area-specific fixtures live in ``tests/<area>_fixtures.py`` modules imported by their tests.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from provision.testing.ci import IN_CI, require_tool

__all__ = ["IN_CI", "require_tool"]

@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own PROVISION_HOME and no Hugging Face credentials or telemetry."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("PROVISION_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    # a dead loopback port: a test that forgets to start its hub fails fast instead of leaving the machine
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("PROVISION_DEBUG", raising=False)
    monkeypatch.setenv("PROVISION_PROGRESS_INTERVAL", "0.2")
    # BitTorrent in tests is always the closed network mode (no DHT/LSD/UPnP/NAT-PMP, loopback):
    # a test that forgets --network closed can never reach a public tracker or the DHT.
    monkeypatch.setenv("PROVISION_NETWORK", "closed")
    monkeypatch.setenv("PROVISION_FORBID_PUBLIC_NETWORK", "1")


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint, written once per session. Treat it as read-only: copy it to modify."""
    from provision.testing.tiny import write_tiny

    out = tmp_path_factory.mktemp("tiny") / "tiny-pixtral"
    write_tiny(out, seed=0)
    return out


@pytest.fixture()
def tiny_copy(tiny_src: Path, tmp_path: Path) -> Iterator[Path]:
    """A private, writable copy of the tiny checkpoint."""
    dst = tmp_path / "tiny-pixtral"
    shutil.copytree(tiny_src, dst)
    yield dst
