"""`provision run`: the whole pipeline on the tiny model, reruns that skip, locks, adopt, the API."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import provision
from provision.cli.main import run_cli
from provision.formats.manifest import load_manifest
from provision.formats.report_schema import validate_report
from provision.layout import Layout
from provision.store.state import load_state
from provision.testing.torrent_fixtures import stop_process
from tests.support.cli import cli_json

ROOT = Path(__file__).resolve().parents[2]


def _run_json(argv: list[str], capsys: pytest.CaptureFixture[str], code: int = 0) -> dict[str, Any]:
    rc, doc, err = cli_json(capsys, *argv)
    assert rc == code, err
    validate_report(doc) if code == 0 else None
    return doc


def _stages(doc: dict) -> list[tuple[str, str]]:  # type: ignore[type-arg]
    return [(s["stage"], s["result"]) for s in doc["stages"]]


def test_run_adopts_verifies_converts_and_smoke_tests_then_a_rerun_skips_everything(
    tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    manifest = str(tiny_src / "manifest.toml")
    doc = _run_json(["run", manifest, "--home", str(home), "--adopt", str(tiny_src)], capsys)
    assert _stages(doc) == [("plan", "ok"), ("fetch", "ok"), ("verify", "ok"), ("convert", "ok"), ("smoke", "ok")]
    assert doc["stages"][1]["details"]["how"] == "adopt"
    smoke = doc["stages"][4]["details"]
    assert smoke["passed"] is True and smoke["tokens_generated"] > 0
    lay = Layout(home)
    original = lay.original("tiny-pixtral")
    for f in load_manifest(manifest).files:
        assert (original / f.path).stat().st_size == f.size
    state = load_state(lay.state_file("tiny-pixtral"))
    assert {"fetch", "verify"} <= set(state.stages) and any(s.startswith("convert:") for s in state.stages)

    again = _run_json(["run", manifest, "--home", str(home), "--adopt", str(tiny_src)], capsys)
    assert _stages(again)[1:] == [("fetch", "skipped"), ("verify", "skipped"), ("convert", "skipped"),
                                  ("smoke", "skipped")]
    assert sum(s["bytes"] for s in again["stages"][1:]) == 0


def test_a_replaced_or_corrupted_original_file_is_fetched_and_verified_again(
    tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    base = ["run", str(tiny_src / "manifest.toml"), "--home", str(home), "--adopt", str(tiny_src),
            "--skip-convert", "--skip-smoke"]
    _run_json(base, capsys)
    params = Layout(home).original("tiny-pixtral") / "params.json"
    good = params.read_bytes()
    flipped = bytearray(good)
    flipped[5] ^= 1
    params.unlink()  # a new inode: the recorded facts no longer match
    params.write_bytes(bytes(flipped))
    doc = _run_json(base, capsys)
    assert _stages(doc)[1:] == [("fetch", "ok"), ("verify", "ok")]
    assert params.read_bytes() == good


def test_hf_cache_snapshot_is_discovered_and_adopted_without_download(
    tiny_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    m = load_manifest(tiny_src / "manifest.toml")
    src = m.source("hf")
    assert src is not None and src.revision
    cache = tmp_path / "hfhome" / "hub" / ("models--" + src.repo.replace("/", "--"))  # type: ignore[union-attr]
    (cache / "blobs").mkdir(parents=True)
    snap = cache / "snapshots" / src.revision
    snap.mkdir(parents=True)
    for f in m.files:
        blob = cache / "blobs" / str(f.sha256)
        shutil.copy(tiny_src / f.path, blob)
        (snap / f.path).symlink_to(os.path.relpath(blob, snap))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    doc = _run_json(["run", str(tiny_src / "manifest.toml"), "--home", str(tmp_path / "home"), "--skip-convert",
                     "--skip-smoke"], capsys)
    assert doc["stages"][1]["details"]["how"] == "hf-cache"
    assert doc["stages"][1]["bytes"] == 0
    # a cache blob whose bytes do not match its name is refused (exit 5), nothing adopted
    blob = cache / "blobs" / str(m.file("params.json").sha256)  # type: ignore[union-attr]
    blob.write_bytes(blob.read_bytes().replace(b"64", b"65", 1))
    home2 = tmp_path / "home2"
    rc = run_cli(["run", str(tiny_src / "manifest.toml"), "--home", str(home2), "--skip-convert", "--skip-smoke"])
    assert rc == 5
    assert not (Layout(home2).original("tiny-pixtral") / "params.json").exists()


def test_adopt_refuses_a_symlink_out_of_the_folder(tiny_src: Path, tmp_path: Path) -> None:
    src = tmp_path / "copy"
    shutil.copytree(tiny_src, src)
    outside = tmp_path / "outside.json"
    shutil.copy(src / "params.json", outside)
    (src / "params.json").unlink()
    (src / "params.json").symlink_to(outside)
    home = tmp_path / "home"
    rc = run_cli(["run", str(tiny_src / "manifest.toml"), "--home", str(home), "--adopt", str(src)])
    assert rc == 5
    assert not Layout(home).original("tiny-pixtral").exists()


def test_drop_original_removes_it_after_a_verified_conversion_and_smoke(
    tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    doc = _run_json(["run", str(tiny_src / "manifest.toml"), "--home", str(home), "--adopt", str(tiny_src),
                     "--drop-original"], capsys)
    assert _stages(doc)[-1] == ("drop-original", "ok")
    assert not Layout(home).original("tiny-pixtral").exists()
    assert Path(doc["profile_dir"]).is_dir()


def test_a_second_run_waits_for_the_lock_then_exits_6_naming_the_holder(
    tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    lock = Layout(home).lock_file("tiny-pixtral")
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom provision.store.lock import ModelLock\n"
         f"with ModelLock({str(lock)!r}, timeout=5):\n    print('held', flush=True)\n    time.sleep(30)\n"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        rc = run_cli(["run", str(tiny_src / "manifest.toml"), "--home", str(home), "--adopt", str(tiny_src),
                      "--lock-timeout", "1"])
        err = capsys.readouterr().err
        assert rc == 6
        assert f"pid {holder.pid}" in err
        assert not Layout(home).original("tiny-pixtral").exists()
    finally:
        stop_process(holder, signal.SIGKILL)


def test_a_stale_lock_from_a_dead_process_is_taken_over(
    tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    lock = Layout(home).lock_file("tiny-pixtral")
    lock.parent.mkdir(parents=True)
    dead = subprocess.Popen(
        [sys.executable, "-c",
         "import os\nfrom provision.store.lock import ModelLock\n"
         f"ModelLock({str(lock)!r}, timeout=5, heartbeat=0).acquire()\nos._exit(0)\n"], cwd=ROOT)
    dead.wait(timeout=30)
    assert lock.exists()
    doc = _run_json(["run", str(tiny_src / "manifest.toml"), "--home", str(home), "--adopt", str(tiny_src),
                     "--skip-convert", "--skip-smoke", "--lock-timeout", "5"], capsys)
    assert _stages(doc)[1] == ("fetch", "ok")
    assert not lock.exists()


def test_python_api_runs_the_same_pipeline(tiny_src: Path, tmp_path: Path) -> None:
    res = provision.run(str(tiny_src / "manifest.toml"), home=tmp_path / "home", adopt=tiny_src,
                        skip_convert=True)
    assert [s["stage"] for s in res.stages] == ["plan", "fetch", "verify", "smoke"]
    assert res.stages[-1]["details"]["passed"] is True
    from provision import api

    p = api.plan(str(tiny_src / "manifest.toml"), home=tmp_path / "home", offline=True)
    assert all(f.status == "present" for f in p.files)


def test_dry_run_touches_nothing(tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    doc = _run_json(["run", str(tiny_src / "manifest.toml"), "--home", str(home), "--dry-run"], capsys)
    assert doc["dry_run"] is True and _stages(doc) == [("plan", "ok")]
    assert not home.exists()


def test_nothing_fits_exits_6_before_any_download(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    rc = run_cli(["run", "mixtral-8x22b-v0.1", "--home", str(home), "--target", "h100", "--offline"])
    err = capsys.readouterr().err
    assert rc == 6 and "Nothing fits on h100" in err
    assert not (home / "models").exists() and not (home / "staging").exists()


def test_a_scheme_the_target_cannot_run_exits_3_before_any_download(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    rc = run_cli(["run", "pixtral-12b-2409", "--home", str(home), "--target", "t4", "--scheme", "fp8", "--offline"])
    err = capsys.readouterr().err
    assert rc == 3 and "w4a16" in err
    assert not (home / "models").exists()
