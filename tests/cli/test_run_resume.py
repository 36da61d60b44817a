"""`provision run` killed (SIGKILL, SIGTERM) during fetch and during convert resumes on the next
run without redoing finished stages: asserted from the state file and the byte counters.

When the signal lands is observed, never guessed: during the fetch, from the pieces libtorrent's
resume data says are downloaded and checked (``resume_fraction``; the staged files are
preallocated, so their size says nothing); during convert, from convert's own output (a shard,
under its temporary or final name, in the profile folder while convert's record, written last,
is not there yet), and checked again afterwards (the record never appeared)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from provision.formats.manifest import Source, load_manifest, write_manifest
from provision.layout import Layout
from provision.stages.convert.record import RECORD_NAME
from provision.store.state import load_state
from provision.testing.torrent_fixtures import (
    PROVISION,
    freeze_when,
    provision_env,
    resume_fraction,
    seed_thread,
    stop_process,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
NAME = "tiny-resume"


@pytest.fixture()
def seeded_manifest(tiny_src: Path, tmp_path: Path) -> Iterator[Path]:
    """The tiny checkpoint seeded on 127.0.0.1 (closed network) and a manifest pointing at it."""
    manifest = load_manifest(tiny_src / "manifest.toml")
    with seed_thread(tiny_src, manifest=manifest, listen="127.0.0.1:0", seed_for=300) as info:
        m = dataclasses.replace(manifest, name=NAME,
                                sources=(Source(type="torrent", magnet=info.magnet, prefix=f"{info.name}/"),))
        yield write_manifest(m, tmp_path / "resume.toml").path  # type: ignore[misc]


def _cmd(manifest: Path, home: Path, *extra: str) -> list[str]:
    return [*PROVISION, "run", str(manifest), "--home", str(home), "--network", "closed",
            "--listen", "127.0.0.1:0", "--no-hf-cache", "--stall-timeout", "30", "--target", "cpu", *extra]


def _start(manifest: Path, home: Path, log: Path, *extra: str) -> subprocess.Popen[str]:
    """``provision run ... --json`` in the background: the report on its stdout, stderr into ``log``."""
    with open(log, "w") as fh:
        return subprocess.Popen([*_cmd(manifest, home, *extra), "--json"], cwd=ROOT, env=provision_env(),
                                stdout=subprocess.PIPE, stderr=fh, text=True)


def _fetched_fraction(home: Path) -> float:
    """The share of the torrent's pieces downloaded and checked, from its resume data on disk."""
    resume = list(Layout(home).torrents.glob("*.resume"))
    assert len(resume) <= 1, resume  # one torrent: one resume file
    return resume_fraction(resume[0]) if resume else 0.0


def _profile_dirs(home: Path) -> list[Path]:
    root = Layout(home).model_dir(NAME)
    return [d for d in root.iterdir() if d.is_dir() and d.name != "original"] if root.is_dir() else []


def _shards_written(home: Path) -> list[str]:
    """Shards convert has written bytes to: under a temporary (``.provision-tmp-*``) or final name."""
    return [p.name for d in _profile_dirs(home) for p in d.iterdir()
            if ".safetensors" in p.name and _size(p) > 0]


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:  # renamed or removed meanwhile
        return 0


def _convert_recorded(home: Path) -> bool:
    """convert writes its record last, once the shards and side files are in place."""
    return any((d / RECORD_NAME).exists() for d in _profile_dirs(home))


def _signal_and_wait(p: subprocess.Popen[str], sig: int) -> str:
    p.send_signal(sig)
    return _wait_for_exit(p)


def _wait_for_exit(p: subprocess.Popen[str]) -> str:
    """Its JSON report (empty after SIGKILL), within 60 s; it is SIGKILLed on every path."""
    try:
        out, _ = p.communicate(timeout=60)
    finally:
        stop_process(p, signal.SIGKILL)
    return out


def _finish(manifest: Path, home: Path, *extra: str) -> dict:  # type: ignore[type-arg]
    """The same command again, to the end: its JSON report."""
    r = subprocess.run([*_cmd(manifest, home, *extra), "--json"], capture_output=True, text=True, timeout=240, cwd=ROOT,
                       env=provision_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def _assert_interrupted_report(out: str, sig: int) -> None:
    """SIGKILL leaves no report; SIGTERM ends with the JSON error report of an interruption."""
    if sig == signal.SIGKILL:
        assert out == ""
        return
    doc = json.loads(out)
    assert doc["exit_code"] == 143 and doc["error"]["kind"] == "interrupted", doc


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_run_killed_during_fetch_resumes_and_downloads_only_the_rest(
    seeded_manifest: Path, tmp_path: Path, sig: int
) -> None:
    home, log = tmp_path / "home", tmp_path / "first.log"
    total = sum(f.size or 0 for f in load_manifest(seeded_manifest).files)
    p = _start(seeded_manifest, home, log, "--max-download-rate", "4M")
    try:
        # half the pieces checked and in the resume data a rerun starts from (4 MB/s: about 7 s in)
        wait_for(lambda: _fetched_fraction(home) >= 0.5 or p.poll() is not None, 120, interval=0.02,
                 what="half of the pieces in the resume data")
        assert p.poll() is None, f"the run ended before it could be killed: {log.read_text()[-3000:]}"
    except BaseException:
        stop_process(p, signal.SIGKILL)
        raise
    out = _signal_and_wait(p, sig)
    assert p.returncode == (-9 if sig == signal.SIGKILL else 143), log.read_text()[-2000:]
    _assert_interrupted_report(out, sig)
    state = load_state(Layout(home).state_file(NAME))
    assert "fetch" not in state.stages  # an interrupted stage is never recorded as done
    kept = _fetched_fraction(home)
    assert 0.5 <= kept < 1.0, kept  # killed midway, and the resume data survived the kill

    doc = _finish(seeded_manifest, home)
    stages = {s["stage"]: s for s in doc["stages"]}
    assert stages["fetch"]["result"] == "ok"
    # only the missing pieces come again: at most half, plus pieces in flight when the run ended
    assert 0 < stages["fetch"]["bytes"] < 0.55 * total, (stages["fetch"]["bytes"], total)
    assert stages["verify"]["result"] == stages["smoke"]["result"] == "ok"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_run_killed_during_convert_resumes_without_fetching_or_verifying_again(
    seeded_manifest: Path, tmp_path: Path, sig: int
) -> None:
    home, log = tmp_path / "home", tmp_path / "first.log"
    state_file = Layout(home).state_file(NAME)

    def converting() -> bool:  # verify recorded (a conversion overlapping the fetch may have begun before)
        verified = state_file.exists() and "verify" in load_state(state_file).stages
        return verified and bool(_shards_written(home)) and not _convert_recorded(home)

    # w4a16 on a CPU target: the hf layout, whose tokenizer export keeps convert busy for seconds
    # after the first shard bytes are written. The run goes in slices and the state is read while
    # it is stopped, so the signal lands in the state seen: verify recorded, shard bytes written,
    # no convert record.
    p = _start(seeded_manifest, home, log, "--scheme", "w4a16")
    try:
        inside = freeze_when(p, converting, 240, what="convert to write shard bytes")
        assert inside, f"the run ended before convert could be interrupted: {log.read_text()[-3000:]}"
        os.kill(p.pid, sig)
        os.kill(p.pid, signal.SIGCONT)
    except BaseException:
        stop_process(p, signal.SIGKILL)
        raise
    out = _wait_for_exit(p)
    err = log.read_text()
    assert p.returncode == (-9 if sig == signal.SIGKILL else 143), err[-2000:]
    _assert_interrupted_report(out, sig)
    # the signal landed inside convert: it had written shard bytes and never reached its record
    assert not _convert_recorded(home), "convert had finished before the signal landed"
    assert "stage verify: ok" in err and "stage convert" not in err, err[-2000:]
    state = load_state(state_file)
    assert "fetch" in state.stages and "verify" in state.stages
    assert not any(s.startswith("convert:") or s.startswith("smoke:") for s in state.stages), state.stages
    # nothing half-written under a final shard name: every committed shard present parses
    from provision.formats.safetensors import check_safetensors

    for d in _profile_dirs(home):
        for shard in d.glob("model*.safetensors"):
            check_safetensors(shard)

    leftovers = [p for d in _profile_dirs(home) for p in d.glob(".provision-tmp-*")]
    doc = _finish(seeded_manifest, home, "--scheme", "w4a16")
    got = [(s["stage"], s["result"]) for s in doc["stages"]]
    assert got == [("plan", "ok"), ("fetch", "skipped"), ("verify", "skipped"), ("convert", "ok"), ("smoke", "ok")]
    by_stage = {s["stage"]: s for s in doc["stages"]}
    assert by_stage["fetch"]["bytes"] == 0 and by_stage["verify"]["bytes"] == 0
    assert os.path.isdir(doc["profile_dir"]) and _convert_recorded(home)
    assert [d.name for d in _profile_dirs(home)] == [Path(doc["profile_dir"]).name]  # the same conversion, resumed
    assert not any(p.exists() for p in leftovers)  # the rerun cleared the killed run's temporaries


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.1, 0.3])
def test_sigterm_while_converting_beside_the_download_always_ends_143_and_never_carries_on(
    seeded_manifest: Path, tmp_path: Path, delay: float
) -> None:
    """SIGTERM soon after the conversion beside the download began, at a few offsets (the fetch's
    end, verify, the conversion's reads, its tokenizer export). Each used to go wrong at times:
    the handler's exception, then an ``Exception``, was swallowed by a broad ``except`` in the
    main thread and the run went on to exit 0; the cancelled conversion ran on to its commit; and
    the interpreter's teardown aborted the process (exit -6) over helper threads inside torch."""
    home, log = tmp_path / "home", tmp_path / "first.log"
    p = _start(seeded_manifest, home, log, "--scheme", "w4a16")
    try:
        wait_for(lambda: "while the download continues" in log.read_text() or p.poll() is not None, 240,
                 interval=0.005, what="the conversion beside the download to start")
        assert p.poll() is None, log.read_text()[-3000:]
        if delay:
            time.sleep(delay)
    except BaseException:
        stop_process(p, signal.SIGKILL)
        raise
    out = _signal_and_wait(p, signal.SIGTERM)
    assert p.returncode == 143, log.read_text()[-3000:]
    _assert_interrupted_report(out, signal.SIGTERM)
    state = load_state(Layout(home).state_file(NAME))
    assert not any(s.startswith("convert:") for s in state.stages), state.stages
    assert not _convert_recorded(home)  # the cancelled conversion did not run on to its commit
