"""What the README promises about `provision run`: ``--reverify`` re-hashes instead of trusting
state.json, the end-of-run table and the ``vllm serve`` hand-off, ``--adopt`` by hard link on the
same filesystem and by copy across filesystems, a second run that waits for the model's lock and then
proceeds, and SIGINT during a run exits 130 with its progress saved."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import provision.store.lock as lock_module
from provision.formats.report_schema import validate_report
from provision.layout import Layout
from provision.testing.ci import IN_CI
from provision.testing.hub_server import LoopbackHub
from provision.testing.torrent_fixtures import (
    PROVISION,
    REPO,
    json_report,
    provision_env,
    run_provision,
    stop_process,
    wait_for,
)
from tests.support.cli import cli_json

NAME = "tiny-pixtral"  # the tiny manifest's name
FILES = ("consolidated.safetensors", "params.json", "tekken.json")  # the tiny manifest's files


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _stages(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(s["stage"], s["result"]) for s in doc["stages"]]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[dict[str, Any], str]:
    rc, doc, err = cli_json(capsys, "run", *argv)
    assert rc == 0, err[-3000:]
    validate_report(doc)
    return doc, err


# -- --reverify ---------------------------------------------------------------------------------
def test_reverify_rehashes_the_files_a_plain_rerun_trusts_from_the_state(
    hub: LoopbackHub, tiny_src: Path, tiny_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    manifest = str(tiny_src / "manifest.toml")
    base = [manifest, "--home", str(home), "--no-hf-cache", "--skip-convert", "--skip-smoke"]
    _run(capsys, *base, "--adopt", str(tiny_copy))
    # one flipped byte, same size, same inode, same mtime: only reading the bytes can tell
    params = Layout(home).original(NAME) / "params.json"
    before = params.stat()
    with open(params, "r+b") as fh:
        fh.seek(10)
        b = fh.read(1)
        fh.seek(10)
        fh.write(bytes([b[0] ^ 0x01]))
    os.utime(params, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = params.stat()
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (before.st_size, before.st_ino, before.st_mtime_ns)
    bad = _sha256(params)
    assert bad != _sha256(tiny_src / "params.json")

    trusted, _ = _run(capsys, *base)
    assert _stages(trusted)[1:] == [("fetch", "skipped"), ("verify", "skipped")]
    assert _sha256(params) == bad  # the plain rerun trusted state.json and read nothing

    redone, _ = _run(capsys, *base, "--reverify")
    assert _stages(redone)[1:] == [("fetch", "ok"), ("verify", "ok")]
    fetch, verify = redone["stages"][1], redone["stages"][2]
    assert list(fetch["details"]["extra"]["reverified_bad"]) == ["params.json"]
    assert {f["path"]: f["reused"] for f in fetch["details"]["files"]} == {
        "consolidated.safetensors": True, "params.json": False, "tekken.json": True}
    assert fetch["bytes"] == (tiny_src / "params.json").stat().st_size  # only the bad file came again
    # the verify stage read every byte itself instead of reusing the fetch's hashes
    assert verify["bytes"] == sum((tiny_src / f).stat().st_size for f in FILES)
    assert {f["path"]: f["sha256_source"] for f in verify["details"]["files"]} == dict.fromkeys(FILES, "read")
    for f in FILES:
        assert _sha256(Layout(home).original(NAME) / f) == _sha256(tiny_src / f)


# -- the end of a run -----------------------------------------------------------------------------
def _table_rows(err: str) -> list[list[str]]:
    """The body rows of the rich table on stderr: cells between the vertical bars."""
    return [[c.strip() for c in line.strip().strip("│").split("│")] for line in err.splitlines()
            if line.lstrip().startswith("│")]


def test_run_ends_with_the_stage_table_and_the_vllm_serve_command_for_the_output(
    tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    doc, err = _run(capsys, str(tiny_src / "manifest.toml"), "--home", str(home), "--adopt", str(tiny_src),
                    "--target", "cpu", "--scheme", "bf16", "--skip-smoke")
    header = next(ln for ln in err.splitlines() if "stage" in ln and "result" in ln)
    for col in ("stage", "result", "seconds", "bytes"):
        assert col in header
    rows = _table_rows(err)
    assert [(r[0], r[1]) for r in rows] == [("plan", "ok"), ("fetch", "ok"), ("verify", "ok"), ("convert", "ok")]
    for r in rows:
        float(r[2])  # seconds
        assert r[3].split()[-1] in ("B", "KB", "MB", "GB", "TB")  # bytes, human-readable
    # a bf16 cast keeps the Mistral layout, in models/<model>/<scheme>-<layout> (README: layout, convert)
    out = home / "models" / NAME / "bf16-mistral"
    assert out.is_dir() and doc["profile_dir"] == str(out)
    serve = [ln for ln in err.splitlines() if "vllm serve" in ln]
    assert len(serve) == 1 and serve[0].startswith("serve it with: ")
    assert serve[0].removeprefix("serve it with: ").startswith(
        f"vllm serve {out} --tokenizer-mode mistral --config-format mistral --load-format mistral")
    assert err.rindex("vllm serve") > err.rindex("convert")  # at the end, after the table


# -- --adopt: hard link or copy -------------------------------------------------------------------
def test_adopt_takes_the_files_in_by_hard_link_on_the_same_filesystem(
    tiny_src: Path, tiny_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    assert os.stat(tiny_copy).st_dev == os.stat(tmp_path).st_dev
    _run(capsys, str(tiny_src / "manifest.toml"), "--home", str(home), "--adopt", str(tiny_copy),
         "--skip-convert", "--skip-smoke")
    original = Layout(home).original(NAME)
    for f in FILES:
        src, dst = (tiny_copy / f).stat(), (original / f).stat()
        assert (dst.st_dev, dst.st_ino) == (src.st_dev, src.st_ino), f  # the same file, no second copy
        assert src.st_nlink == 2, f


@pytest.fixture()
def other_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A fresh folder on another filesystem than ``tmp_path`` (a tmpfs: /dev/shm)."""
    here = os.stat(tmp_path).st_dev
    for root in ("/dev/shm", "/run", tempfile.gettempdir()):
        if os.path.isdir(root) and os.access(root, os.W_OK) and os.stat(root).st_dev != here:
            d = Path(tempfile.mkdtemp(prefix="provision-adopt-", dir=root))
            try:
                yield d
            finally:
                shutil.rmtree(d, ignore_errors=True)
            return
    if IN_CI:
        pytest.fail("no writable filesystem other than the one holding tmp_path (/dev/shm is expected)")
    pytest.skip("no writable filesystem other than the one holding tmp_path")


def test_adopt_copies_the_files_across_filesystems(
    tiny_src: Path, other_filesystem: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = other_filesystem / "tiny"
    shutil.copytree(tiny_src, src)
    home = tmp_path / "home"
    _run(capsys, str(tiny_src / "manifest.toml"), "--home", str(home), "--adopt", str(src),
         "--skip-convert", "--skip-smoke")
    original = Layout(home).original(NAME)
    for f in FILES:
        s, d = (src / f).stat(), (original / f).stat()
        assert d.st_dev != s.st_dev and d.st_nlink == 1 and s.st_nlink == 1, f
        assert _sha256(original / f) == _sha256(tiny_src / f), f


# -- the model lock: wait, then proceed -----------------------------------------------------------
def test_a_second_run_waits_for_the_lock_and_proceeds_once_it_is_released(
    tiny_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    lock = Layout(home).lock_file(NAME)
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\nfrom provision.store.lock import ModelLock\n"
         f"with ModelLock({str(lock)!r}, timeout=5):\n"
         "    print('held', flush=True)\n    sys.stdin.readline()\n"
         "print('released', flush=True)\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    seen: list[str] = []
    real_status = lock_module.lock_status

    def watching(*a: Any, **kw: Any) -> Any:
        """The real lock_status; the first time the run finds the lock live, the holder lets go."""
        st = real_status(*a, **kw)
        if st.state == "live" and not seen:
            seen.append(f"pid {st.info.pid}" if st.info else "?")
            assert not Layout(home).original(NAME).exists()  # nothing done while it waits
            assert holder.stdin is not None
            holder.stdin.write("go\n")
            holder.stdin.flush()
        return st

    monkeypatch.setattr(lock_module, "lock_status", watching)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        doc, _ = _run(capsys, str(tiny_src / "manifest.toml"), "--home", str(home), "--adopt", str(tiny_src),
                      "--skip-convert", "--skip-smoke", "--lock-timeout", "60")
        assert holder.stdout.readline().strip() == "released"
        assert holder.wait(timeout=30) == 0
    finally:
        stop_process(holder, signal.SIGKILL)
    assert seen == [f"pid {holder.pid}"]  # it found the holder's lock and waited
    assert _stages(doc)[1:] == [("fetch", "ok"), ("verify", "ok")]
    assert not lock.exists()  # and released its own


# -- SIGINT ---------------------------------------------------------------------------------------
def test_sigint_during_a_run_exits_130_and_the_next_run_resumes(
    hub: LoopbackHub, tiny_src: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    argv = ["run", str(tiny_src / "manifest.toml"), "--home", str(home), "--no-hf-cache", "--skip-convert",
            "--skip-smoke"]
    big = "consolidated.safetensors"
    hub.rate_limit = 4 << 20  # about 8 s for the big file: the run is surely mid-download when signalled
    p = subprocess.Popen([*PROVISION, *argv], cwd=REPO, env=provision_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: hub.sent(big) >= 1 << 20 or p.poll() is not None, 60, interval=0.02,
                 what="the download to be under way")
        assert p.poll() is None, "the run ended before it could be interrupted"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        stop_process(p, signal.SIGKILL)
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert not (Layout(home).original(NAME) / big).exists()  # nothing unverified under its final name
    saved = sum(p.stat().st_size for p in (Layout(home).staging(NAME) / "hub").glob("*.part"))
    assert saved >= 1 << 20  # progress saved: the partial download stayed in staging
    hub.rate_limit = 0
    cp = run_provision([*argv, "--json"], timeout=120)
    assert cp.returncode == 0, cp.stderr[-3000:]
    doc = json_report(cp)
    assert _stages(doc)[1:] == [("fetch", "ok"), ("verify", "ok")]
    everything = sum((tiny_src / f).stat().st_size for f in FILES)
    assert doc["stages"][1]["bytes"] <= everything - saved  # the saved part was not downloaded again
    for f in FILES:
        assert _sha256(Layout(home).original(NAME) / f) == _sha256(tiny_src / f)
