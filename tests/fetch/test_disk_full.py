"""A full disk on both fetch paths (Hub and BitTorrent), on a real small tmpfs: exit 6 with a one-line
message, nothing under a final name, the partial kept; once some space is freed (less than the whole
download, enough for the rest) the same command resumes and finishes byte-identical. Also
`provision run`'s preflight, which counts the conversion beside the download."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from provision.layout import Layout
from provision.testing.hub_server import LoopbackHub
from provision.testing.tiny import TINY_REPO
from provision.testing.torrent_fixtures import (
    PROVISION,
    make_payload,
    provision_env,
    same_tree,
    seed_thread,
    stop_process,
    wait_for,
)
from tests.support.cli import cli_json
from tests.support.disk import fill, small_tmpfs

MiB = 1 << 20


def free_to(filler: Path, target_free: int) -> None:
    """Shrink ``filler`` until the filesystem has about ``target_free`` bytes free."""
    now = shutil.disk_usage(filler.parent).free
    size = filler.stat().st_size
    os.truncate(filler, max(size - (target_free - now), 0))


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0


def _partial(home: Path, repo: str) -> Path:
    """The hub partial of a one-file repo (named by the file's sha256, or git blob sha1 for a small file)."""
    found = sorted((Layout(home).staging(repo) / "hub").glob("*.part"))
    return found[0] if found else Layout(home).staging(repo) / "hub" / "none.part"


def _one_line_error(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if "No space left" in ln]
    assert len(lines) == 1, stderr
    return lines[0]


def _big_repo(hub: LoopbackHub, tmp_path: Path, size: int = 6 * MiB) -> Path:
    """A loopback Hub repo ``provision/big`` holding one random ``weights.dat`` of ``size`` bytes: its source."""
    src = tmp_path / "weights.dat"
    src.write_bytes(os.urandom(size))
    hub.add_repo("provision/big", {"weights.dat": src})
    return src


@pytest.mark.slow
def test_hub_disk_full_midway_exits_6_keeps_the_partial_and_resumes_once_space_is_freed(
        hub: LoopbackHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    src = _big_repo(hub, tmp_path)
    size, sha = src.stat().st_size, hashlib.sha256(src.read_bytes()).hexdigest()
    with small_tmpfs(tmp_path / "disk", 8 * MiB) as disk:
        home = disk / "home"
        monkeypatch.setenv("PROVISION_HOME", str(home))
        dest = home / "out"
        hub.rate_limit = 2 * MiB
        proc = subprocess.Popen([*PROVISION, "fetch", "hf://provision/big", "--dest", str(dest)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=provision_env())
        try:
            wait_for(lambda: _size(_partial(home, "provision/big")) >= 2 * MiB or proc.poll() is not None, 60,
                     what="2 MiB of the file")
            assert proc.poll() is None, "the fetch ended before the disk could fill"
            filler = fill(disk / "filler")
            _, err = proc.communicate(timeout=60)
        finally:
            stop_process(proc)
        assert proc.returncode == 6, err
        assert "No space left on the device" in _one_line_error(err)
        assert not (dest / "weights.dat").exists()
        assert not [p for p in home.rglob("*") if p.name.startswith(".provision-tmp")]  # nothing half-written
        kept = _partial(home, "provision/big").read_bytes()
        assert 2 * MiB <= len(kept) < size and kept == src.read_bytes()[:len(kept)]

        # room for the rest, not for the whole file: only a preflight that counts staged bytes lets it resume
        free_to(filler, size - len(kept) + 512 * 1024)
        assert shutil.disk_usage(disk).free < size
        hub.wait_idle(30)
        hub.rate_limit = 0
        hub.reset_counters()
        code, doc, err2 = cli_json(capsys, "fetch", "hf://provision/big", "--dest", str(dest))
        assert code == 0, err2
        assert doc["fetch"]["extra"]["resumed"]["weights.dat"] == len(kept)
        assert hub.sent("weights.dat") == size - len(kept)
        assert hashlib.sha256((dest / "weights.dat").read_bytes()).hexdigest() == sha


def test_the_preflight_names_the_bytes_already_staged(
        hub: LoopbackHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    src = _big_repo(hub, tmp_path)
    with small_tmpfs(tmp_path / "disk", 4 * MiB) as disk:
        home = disk / "home"
        monkeypatch.setenv("PROVISION_HOME", str(home))
        part = Layout(home).staging("provision/big") / "hub" / "stopped-fetch.part"
        part.parent.mkdir(parents=True)
        part.write_bytes(src.read_bytes()[:MiB])  # a stopped fetch's first MiB (counted whatever its name)
        code, doc, err = cli_json(capsys, "fetch", "hf://provision/big", "--dest", str(home / "out"))
    assert code == 6, err
    msg = doc["error"]["message"]
    # 6 MiB to fetch less 1 MiB staged = 5 MiB = 5,242,880 B, shown as 5.24 MB; 1 MiB shown as 1.05 MB
    assert "5.24 MB more (1.05 MB of it already staged)" in msg
    assert doc["error"]["context"]["staged"] == MiB


@pytest.mark.slow
def test_torrent_disk_full_midway_exits_6_and_resumes_once_space_is_freed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "payload"
    sizes = make_payload(src, {"a.dat": 6 * MiB})
    total = sum(sizes.values())
    with small_tmpfs(tmp_path / "disk", 8 * MiB) as disk, seed_thread(src) as info:
        home = disk / "home"
        monkeypatch.setenv("PROVISION_HOME", str(home))
        dest = home / "out"
        staging = Layout(home).staging(info.name if hasattr(info, "name") else "payload")
        proc = subprocess.Popen([*PROVISION, "fetch", info.magnet, "--dest", str(dest), "--network", "closed",
                                 "--stall-timeout", "30", "--max-download-rate", "2M"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=provision_env())
        try:
            def staged() -> int:
                return sum(f.stat().st_blocks * 512 for f in Layout(home).staging_root.rglob("*.dat") if f.is_file())
            wait_for(lambda: staged() >= 2 * MiB or proc.poll() is not None, 60, what="2 MiB staged")
            assert proc.poll() is None, ("the fetch ended before the disk could fill", proc.communicate())
            filler = fill(disk / "filler")
            _, err = proc.communicate(timeout=90)
        finally:
            stop_process(proc)
        assert proc.returncode == 6, err
        _one_line_error(err)
        assert not (dest / "a.dat").exists()
        have = staged()
        assert 0 < have < total, staging

        free_to(filler, total - have + MiB)
        assert shutil.disk_usage(disk).free < total
        code, doc, err2 = cli_json(capsys, "fetch", info.magnet, "--dest", str(dest), "--network", "closed",
                                   "--stall-timeout", "30")
        assert code == 0, err2
        assert same_tree(src, dest, list(sizes))
        assert doc["fetch"]["bytes_downloaded"] < total


def test_run_preflight_counts_the_conversion_and_names_both_numbers(
        hub: LoopbackHub, tiny_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    download = sum(p.stat().st_size for p in tiny_src.iterdir() if p.is_file() and p.name != "manifest.toml")
    # room for the download, not for the download and the conversion (its weights plus a 64 MiB margin)
    with small_tmpfs(tmp_path / "disk", download + 8 * MiB) as disk:
        home = disk / "home"
        monkeypatch.setenv("PROVISION_HOME", str(home))
        code, doc, err = cli_json(capsys, "run", f"hf://{TINY_REPO}", "--no-hf-cache", "--drop-original")
        assert code == 6, err
        ctx = doc["error"]["context"]
        assert ctx["fetch_bytes"] > 0 and ctx["convert_bytes"] >= 64 * MiB
        msg = doc["error"]["message"]
        assert "the download needs" in msg and "the conversion" in msg and "--drop-original" in msg
        assert not [r for r in hub.requests if "/resolve/" in r.path]  # refused before a byte was downloaded
