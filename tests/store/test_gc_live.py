"""`provision gc` next to real downloads from the loopback hub: a live fetch holds the model's lock
(gc removes nothing of it), and the partial of a stopped run stays until `gc --partials`."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

from provision.layout import Layout
from provision.testing.hub_server import LoopbackHub
from provision.testing.torrent_fixtures import PROVISION, provision_env, stop_process, wait_for
from tests.support.cli import cli_json, provision_home

REPO = "provision/big"


def _big_repo(hub: LoopbackHub, tmp_path: Path, size: int) -> tuple[Path, Path]:
    """A repo with one file of random bytes; (its source, where its hub partial is staged)."""
    src = tmp_path / "weights.dat"
    src.write_bytes(os.urandom(size))
    hub.add_repo(REPO, {"weights.dat": src})
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    return src, Layout(provision_home()).staging(REPO) / "hub" / f"{sha}-{size}.part"


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0


def _tree(root: Path) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


@pytest.mark.slow
def test_gc_during_a_live_fetch_removes_nothing_of_it_and_the_fetch_finishes_byte_identical(
        hub: LoopbackHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    size = 24 << 20
    src, part = _big_repo(hub, tmp_path, size)
    hub.rate_limit = 6 << 20  # about 4 s for the file: gc runs while it downloads
    dest = tmp_path / "out"
    staging = Layout(provision_home()).staging(REPO)
    proc = subprocess.Popen([*PROVISION, "fetch", f"hf://{REPO}", "--dest", str(dest)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=provision_env())
    try:
        wait_for(lambda: _size(part) >= 2 << 20 or proc.poll() is not None, 60, what="2 MiB of the file")
        assert proc.poll() is None, "the fetch ended before gc could run beside it"
        staged_before = _tree(staging)
        for argv in (("gc", "--dry-run", "--partials"), ("gc", "--partials"), ("gc",)):
            code, doc, err = cli_json(capsys, *argv)
            assert code == 0, err
            assert not [i for i in doc["removed"] if Path(i["path"]).is_relative_to(staging)]
            kept = {Path(i["path"]): i["reason"] for i in doc["kept"]}
            assert "held by" in kept[Layout(provision_home()).lock_file(REPO)]
        assert proc.poll() is None, "the fetch ended while gc ran: the test proved nothing"
        assert staged_before <= _tree(staging)  # every staged file still there
        _, err_b = proc.communicate(timeout=120)
    finally:
        stop_process(proc, signal.SIGKILL)
    assert proc.returncode == 0, err_b.decode()
    assert hashlib.sha256((dest / "weights.dat").read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    assert not Layout(provision_home()).lock_file(REPO).exists()


def test_fetch_refuses_a_model_a_live_run_holds_with_exit_6(hub: LoopbackHub, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from provision.store.lock import ModelLock

    _big_repo(hub, tmp_path, 1 << 20)
    monkeypatch.setenv("PROVISION_LOCK_TIMEOUT", "0.5")
    with ModelLock(Layout(provision_home()).lock_file(REPO), heartbeat=None):
        code, _doc, err = cli_json(capsys, "fetch", f"hf://{REPO}", "--dest", str(tmp_path / "out"))
    assert code == 6, err
    assert not (tmp_path / "out" / "weights.dat").exists()


@pytest.mark.slow
def test_gc_after_a_sigterm_keeps_the_partial_the_rerun_resumes_and_gc_partials_removes_it(
        hub: LoopbackHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    size = 24 << 20
    src, part = _big_repo(hub, tmp_path, size)
    hub.rate_limit = 8 << 20
    argv = ["run", f"hf://{REPO}", "--skip-convert", "--skip-smoke", "--no-hf-cache"]
    proc = subprocess.Popen([*PROVISION, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=provision_env())
    try:
        wait_for(lambda: _size(part) >= 4 << 20 or proc.poll() is not None, 60, what="4 MiB of the file")
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        stop_process(proc, signal.SIGKILL)
    assert proc.returncode == 143, err.decode()
    kept_bytes = part.read_bytes()
    assert 0 < len(kept_bytes) < size
    assert kept_bytes == src.read_bytes()[:len(kept_bytes)]

    code, doc, gc_err = cli_json(capsys, "gc")
    assert code == 0, gc_err
    assert part.read_bytes() == kept_bytes  # kept, untouched
    staging = Layout(provision_home()).staging(REPO)
    assert "gc --partials" in {Path(i["path"]): i["reason"] for i in doc["kept"]}[staging]

    hub.wait_idle(30)
    hub.rate_limit = 0
    hub.reset_counters()
    code, doc, run_err = cli_json(capsys, *argv)
    assert code == 0, run_err
    fetch = next(s for s in doc["stages"] if s["stage"] == "fetch")
    assert fetch["details"]["extra"]["resumed"]["weights.dat"] == len(kept_bytes)
    assert hub.sent("weights.dat") == size - len(kept_bytes)
    out = Layout(provision_home()).original(REPO) / "weights.dat"
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()


def test_gc_partials_removes_a_stopped_downloads_staging_and_resume_data(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    lay = Layout(provision_home())
    key = "5e" * 20
    bt = lay.staging("some-magnet") / f"bt-{key[:16]}" / "some-magnet"
    bt.mkdir(parents=True)
    (bt / "consolidated.safetensors").write_bytes(b"\0" * 4096)
    lay.torrents.mkdir(parents=True)
    (lay.torrents / f"{key}.resume").write_bytes(b"d8:file-format22:libtorrent resume filee")
    code, doc, err = cli_json(capsys, "gc")
    assert code == 0, err
    assert (lay.torrents / f"{key}.resume").exists() and (bt / "consolidated.safetensors").exists()
    kept = {Path(i["path"]): i["reason"] for i in doc["kept"]}
    assert "resumable" in kept[lay.torrents / f"{key}.resume"]
    code, doc, err = cli_json(capsys, "gc", "--partials")
    assert code == 0, err
    assert not lay.staging("some-magnet").exists() and not (lay.torrents / f"{key}.resume").exists()
    assert {Path(i["path"]) for i in doc["removed"]} >= {lay.staging("some-magnet"), lay.torrents / f"{key}.resume"}
