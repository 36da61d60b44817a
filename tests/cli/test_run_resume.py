"""`provision run` killed (SIGKILL, SIGTERM) during fetch and during convert resumes on the next
run without redoing finished stages: asserted from the state file and the byte counters."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from provision.formats.manifest import Source, load_manifest, write_manifest
from provision.layout import Layout
from provision.store.state import load_state
from provision.testing.torrent_fixtures import wait_for

ROOT = Path(__file__).resolve().parents[2]
NAME = "tiny-resume"


@pytest.fixture()
def seeded_manifest(tiny_src: Path, tmp_path: Path) -> Iterator[Path]:
    """The tiny checkpoint seeded on 127.0.0.1 (closed network) and a manifest pointing at it."""
    from provision.stages.fetch.torrent import SeedInfo, seed

    manifest = load_manifest(tiny_src / "manifest.toml")
    ready, stop = threading.Event(), threading.Event()
    box: dict[str, SeedInfo] = {}

    def on_ready(info: SeedInfo) -> None:
        box["info"] = info
        ready.set()

    th = threading.Thread(target=seed, args=(tiny_src,), daemon=True,
                          kwargs={"manifest": manifest, "network": "closed", "listen": "127.0.0.1:0",
                                  "stop": stop, "on_ready": on_ready, "seed_for": 300})
    th.start()
    try:
        assert ready.wait(60), "seeder did not start"
        info = box["info"]
        m = dataclasses.replace(manifest, name=NAME,
                                sources=(Source(type="torrent", magnet=info.magnet, prefix=f"{info.name}/"),))
        yield write_manifest(m, tmp_path / "resume.toml").path  # type: ignore[misc]
    finally:
        stop.set()
        th.join(timeout=30)


def _cmd(manifest: Path, home: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "provision.cli.main", "run", str(manifest), "--home", str(home), "--network", "closed",
            "--listen", "127.0.0.1:0", "--no-hf-cache", "--stall-timeout", "30", "--target", "cpu", *extra]


def _staged_bytes(home: Path) -> int:
    root = Layout(home).staging(NAME)
    if not root.exists():
        return 0
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


def _finish(manifest: Path, home: Path) -> dict:  # type: ignore[type-arg]
    r = subprocess.run([*_cmd(manifest, home), "--json"], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_run_killed_during_fetch_resumes_and_downloads_only_the_rest(
    seeded_manifest: Path, tmp_path: Path, sig: int
) -> None:
    home = tmp_path / "home"
    total = sum(f.size or 0 for f in load_manifest(seeded_manifest).files)
    p = subprocess.Popen(_cmd(seeded_manifest, home, "--max-download-rate", "4M"), cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _staged_bytes(home) > total * 0.5, 60, interval=0.02, what="the fetch to get halfway")
        time.sleep(1.5)  # resume data is saved every second: let one save see the halfway mark
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == (-9 if sig == signal.SIGKILL else 143), err[-2000:]
    state = load_state(Layout(home).state_file(NAME))
    assert "fetch" not in state.stages  # an interrupted stage is never recorded as done
    doc = _finish(seeded_manifest, home)
    stages = {s["stage"]: s for s in doc["stages"]}
    assert stages["fetch"]["result"] == "ok"
    assert stages["fetch"]["bytes"] < 0.55 * total, (stages["fetch"]["bytes"], total)
    assert stages["smoke"]["result"] == "ok"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_run_killed_during_convert_resumes_without_fetching_or_verifying_again(
    seeded_manifest: Path, tmp_path: Path, sig: int
) -> None:
    home = tmp_path / "home"
    state_file = Layout(home).state_file(NAME)

    def verified() -> bool:
        try:
            return "verify" in json.loads(state_file.read_text()).get("stages", {})
        except (OSError, ValueError):
            return False

    p = subprocess.Popen(_cmd(seeded_manifest, home, "--scheme", "w4a16"), cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(verified, 120, interval=0.02, what="verify to finish")
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == (-9 if sig == signal.SIGKILL else 143), err[-2000:]
    state = load_state(state_file)
    assert "fetch" in state.stages and "verify" in state.stages
    assert not any(s.startswith("convert:") for s in state.stages)
    out = Layout(home).model_dir(NAME)
    # nothing half-written under a final shard name: every shard present parses
    for shard in out.glob("*/model-*.safetensors"):
        from provision.formats.safetensors import check_safetensors

        check_safetensors(shard)
    doc = _finish(seeded_manifest, home)
    got = [(s["stage"], s["result"]) for s in doc["stages"]]
    assert got == [("plan", "ok"), ("fetch", "skipped"), ("verify", "skipped"), ("convert", "ok"), ("smoke", "ok")]
    assert doc["stages"][1]["bytes"] == 0
    assert os.path.isdir(doc["profile_dir"])
