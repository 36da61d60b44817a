"""`provision run` of a torrent converts while it fetches (``stages.overlap``): the profile it commits
is byte for byte the one a conversion after the fetch writes, a download that fails its full
verification leaves no profile, a run killed while converting and fetching resumes to the same
profile, and the report says how long the profile took after the last byte.

The tiny checkpoint (~28 MB) is seeded on 127.0.0.1 in closed mode; ``--max-download-rate`` makes
the download last a few seconds so the conversion really runs beside it (the stderr line the
overlapped conversion writes when it starts is asserted, never assumed)."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from provision.formats.manifest import Source, load_manifest, write_manifest
from provision.layout import Layout
from provision.stages.convert.record import RECORD_NAME
from provision.testing.torrent_fixtures import PROVISION, provision_env, seed_thread, stop_process, wait_for

ROOT = Path(__file__).resolve().parents[2]
NAME = "tiny-overlap"
STARTED = "while the download continues"  # the overlapped conversion's stderr line


@pytest.fixture()
def seeded(tiny_src: Path, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """The tiny checkpoint seeded on 127.0.0.1: a manifest naming it, and one whose weights sha256 is wrong."""
    manifest = load_manifest(tiny_src / "manifest.toml")
    with seed_thread(tiny_src, manifest=manifest, listen="127.0.0.1:0", seed_for=300) as info:
        m = dataclasses.replace(manifest, name=NAME,
                                sources=(Source(type="torrent", magnet=info.magnet, prefix=f"{info.name}/"),))
        good = write_manifest(m, tmp_path / "good.toml").path
        wrong = tuple(dataclasses.replace(f, sha256="0" * 64) if f.path == "consolidated.safetensors" else f
                      for f in m.files)
        assert any(f.sha256 == "0" * 64 for f in wrong)
        bad = write_manifest(dataclasses.replace(m, files=wrong), tmp_path / "bad.toml").path
        assert good is not None and bad is not None
        yield good, bad


def _cmd(manifest: Path, home: Path, *extra: str) -> list[str]:
    return [*PROVISION, "run", str(manifest), "--home", str(home), "--network", "closed", "--listen", "127.0.0.1:0",
            "--no-hf-cache", "--stall-timeout", "30", "--target", "cpu", "--skip-smoke", "--json", *extra]


def _run(manifest: Path, home: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_cmd(manifest, home, *extra), capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=provision_env())


def _profile(home: Path, name: str = NAME) -> Path:
    root = Layout(home).model_dir(name)
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name != "original"]
    assert len(dirs) == 1, dirs
    return dirs[0]


def _leftovers(home: Path, name: str = NAME) -> list[str]:
    """Conversion staging folders and overlap source views (and a Hub download's links) a run left behind."""
    lay = Layout(home)
    found = [p.name for p in lay.model_dir(name).iterdir() if p.name.startswith(".provision-tmp")] \
        if lay.model_dir(name).is_dir() else []
    staging = lay.staging(name)
    found += [p.name for p in staging.iterdir() if p.name.startswith("overlap-")] if staging.is_dir() else []
    return found


def _reference(manifest: Path, home: Path, *extra: str, name: str = NAME) -> Path:
    """The profile of a conversion after the fetch: fetch only, then a run whose fetch is skipped."""
    first = _run(manifest, home, "--skip-convert", *extra)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run(manifest, home, *extra)
    assert second.returncode == 0, second.stderr[-3000:]
    assert STARTED not in second.stderr  # nothing fetched: converted after the fetch
    stages = {s["stage"]: s["result"] for s in json.loads(second.stdout)["stages"]}
    assert stages["fetch"] == "skipped" and stages["convert"] == "ok"
    return _profile(home, name)


def _record_without_timing(folder: Path) -> dict[str, Any]:
    """The conversion record less its timing, with the run's home folder named ``HOME``."""
    home = folder.parents[2]  # HOME/models/<model>/<profile>
    rec = json.loads((folder / RECORD_NAME).read_text().replace(str(home), "HOME"))
    for k in ("seconds", "throughput_bytes_per_s"):
        rec.pop(k, None)
    return rec  # type: ignore[no-any-return]


def _assert_same_profile(got: Path, want: Path) -> None:
    names = sorted(p.name for p in want.iterdir())
    assert sorted(p.name for p in got.iterdir()) == names
    for n in names:
        if n in (RECORD_NAME, "provenance.json"):  # they time the conversion
            continue
        assert (got / n).read_bytes() == (want / n).read_bytes(), n
    assert _record_without_timing(got) == _record_without_timing(want)


@pytest.mark.slow
def test_an_overlapped_run_commits_the_same_bytes_as_a_conversion_after_the_fetch(
        seeded: tuple[Path, Path], tmp_path: Path) -> None:
    good, _ = seeded
    r = _run(good, tmp_path / "a", "--max-download-rate", "4M")
    assert r.returncode == 0, r.stderr[-3000:]
    assert STARTED in r.stderr
    doc = json.loads(r.stdout)
    assert doc["overlap"]["converted_while_fetching"] is True
    assert doc["overlap"]["bytes_converted_before_last_byte"] > 0  # converted during the download, not after
    assert 0 <= doc["ready_after_last_byte_seconds"] < 60
    from provision.formats.report_schema import report_errors, validate_report

    validate_report(doc, "run")
    doc["overlap"]["bytes_converted_before_last_byte"] = -1  # the schema bounds the new figures
    assert report_errors(doc, "run")
    _assert_same_profile(_profile(tmp_path / "a"), _reference(good, tmp_path / "b"))
    assert _leftovers(tmp_path / "a") == []


def _assert_failed_verification_commits_nothing(r: subprocess.CompletedProcess[str], home: Path, name: str) -> None:
    """The overlapped conversion ran, the download failed its full verification (exit 5), nothing is committed."""
    assert r.returncode == 5, r.stderr[-3000:]
    assert STARTED in r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["exit_code"] == 5
    root = Layout(home).model_dir(name)
    assert [p.name for p in root.iterdir() if p.is_dir() and p.name != "original"] == []  # nothing committed
    assert _leftovers(home, name) == []


@pytest.mark.slow
def test_a_download_failing_its_full_verification_commits_no_overlapped_profile(
        seeded: tuple[Path, Path], tmp_path: Path) -> None:
    # every piece passes the torrent's hashes, so the conversion runs; the manifest's sha256 of the
    # weights does not match, so the fetch fails verification (exit 5) and the profile is discarded
    _, bad = seeded
    home = tmp_path / "home"
    _assert_failed_verification_commits_nothing(_run(bad, home, "--max-download-rate", "8M"), home, NAME)


def _sigkill_when(cmd: list[str], log: Path, ready: Callable[[], bool], what: str, home: Path, name: str) -> None:
    """Start ``cmd`` (stderr to ``log``), SIGKILL it once ``ready()``; nothing of it may be committed."""
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, cwd=ROOT, env=provision_env(), stdout=subprocess.DEVNULL, stderr=fh, text=True)
    try:
        wait_for(lambda: ready() or p.poll() is not None, 120, interval=0.02, what=what)
        assert p.poll() is None, f"the run ended before it could be killed: {log.read_text()[-3000:]}"
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        stop_process(p, signal.SIGKILL)
    root = Layout(home).model_dir(name)
    assert not any((d / RECORD_NAME).exists() for d in root.iterdir() if d.is_dir() and d.name != "original")


@pytest.mark.slow
def test_a_run_killed_while_converting_during_the_fetch_resumes_to_the_same_profile(
        seeded: tuple[Path, Path], tmp_path: Path) -> None:
    good, _ = seeded
    home, log = tmp_path / "home", tmp_path / "first.log"
    _sigkill_when(_cmd(good, home, "--max-download-rate", "4M"), log, lambda: STARTED in log.read_text(),
                  "the overlapped conversion to start", home, NAME)
    r = _run(good, home)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _leftovers(home) == []
    _assert_same_profile(_profile(home), _reference(good, tmp_path / "ref"))


# -- from the Hub: the written prefix of each partial is converted; the whole-file sha256 gates it --

HUB_NAME = "tiny-pixtral"  # the tiny checkpoint's own manifest, served by the loopback hub (conftest ``hub``)
WEIGHTS = "consolidated.safetensors"
HUB_RATE = 4_000_000  # bytes/s per body: the weights take about 8 s, so the conversion runs beside them


def _hub_run(manifest: Path, home: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return _run(manifest, home, "--source", "hf", *extra)


def _partial(home: Path, size: int) -> Path:
    """The weights' resumable partial in the run's staging folder (``hub/<sha256>-<size>.part``)."""
    parts = list((Layout(home).staging(HUB_NAME) / "hub").glob(f"*-{size}.part"))
    assert len(parts) == 1, parts
    return parts[0]


def _kill_midway(manifest: Path, home: Path, log: Path, size: int) -> Path:
    """Start an overlapped Hub run and SIGKILL it once it converts and has a third of the weights
    (``size`` bytes); the weights' partial."""
    part_dir = Layout(home).staging(HUB_NAME) / "hub"

    def far_enough() -> bool:
        parts = [q.stat().st_size for q in part_dir.glob(f"*-{size}.part")] if part_dir.is_dir() else []
        return STARTED in log.read_text() and bool(parts) and parts[0] > size // 3

    _sigkill_when(_cmd(manifest, home, "--source", "hf"), log, far_enough,
                  "the overlapped conversion to start and a third of the weights", home, HUB_NAME)
    return _partial(home, size)


@pytest.mark.slow
def test_an_overlapped_hub_run_commits_the_same_bytes_as_a_conversion_after_the_fetch(
        hub: Any, tiny_src: Path, tmp_path: Path) -> None:
    manifest = tiny_src / "manifest.toml"
    hub.rate_limit = HUB_RATE
    r = _hub_run(manifest, tmp_path / "a")
    assert r.returncode == 0, r.stderr[-3000:]
    assert STARTED in r.stderr
    doc = json.loads(r.stdout)
    assert doc["overlap"]["converted_while_fetching"] is True
    assert doc["overlap"]["bytes_converted_before_last_byte"] > 0  # converted while the weights arrived
    assert 0 <= doc["ready_after_last_byte_seconds"] < 60
    fetch = next(s for s in doc["stages"] if s["stage"] == "fetch")
    assert fetch["details"]["how"] == "hf"
    hub.rate_limit = 0
    _assert_same_profile(_profile(tmp_path / "a", HUB_NAME),
                         _reference(manifest, tmp_path / "b", "--source", "hf", name=HUB_NAME))
    assert _leftovers(tmp_path / "a", HUB_NAME) == []


@pytest.mark.slow
def test_hub_weights_failing_their_sha256_commit_no_overlapped_profile(
        hub: Any, tiny_src: Path, tmp_path: Path) -> None:
    # the server sends other bytes of the right size (a valid header, one weight byte changed): the
    # conversion reads and converts them, the whole-file sha256 fails (exit 5), and it is discarded
    bad = tmp_path / "bad.safetensors"
    data = bytearray((tiny_src / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    hub.serve_instead[WEIGHTS] = bad
    hub.rate_limit = HUB_RATE
    home = tmp_path / "home"
    _assert_failed_verification_commits_nothing(_hub_run(tiny_src / "manifest.toml", home), home, HUB_NAME)
    assert not (Layout(home).model_dir(HUB_NAME) / "original" / WEIGHTS).exists()


@pytest.mark.slow
def test_a_hub_run_killed_while_converting_resumes_its_partial_to_the_same_profile(
        hub: Any, tiny_src: Path, tmp_path: Path) -> None:
    manifest, home = tiny_src / "manifest.toml", tmp_path / "home"
    hub.rate_limit = HUB_RATE
    kept = _kill_midway(manifest, home, tmp_path / "first.log", (tiny_src / WEIGHTS).stat().st_size).stat().st_size
    r = _hub_run(manifest, home)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    fetch = next(s for s in doc["stages"] if s["stage"] == "fetch")
    assert fetch["details"]["extra"]["resumed"][WEIGHTS] == kept  # the kept bytes were not downloaded again
    assert doc["overlap"]["converted_while_fetching"] is True
    assert _leftovers(home, HUB_NAME) == []
    hub.rate_limit = 0
    _assert_same_profile(_profile(home, HUB_NAME),
                         _reference(manifest, tmp_path / "ref", "--source", "hf", name=HUB_NAME))


@pytest.mark.slow
def test_a_damaged_kept_prefix_discards_the_overlapped_conversion_and_converts_the_good_download(
        hub: Any, tiny_src: Path, tmp_path: Path) -> None:
    # a killed run kept a partial; a byte of it is damaged on disk. The next run converts the kept
    # prefix at once, the resumed file fails its sha256 and is downloaded again from byte 0 (a new
    # file): what was converted from the damaged bytes must be discarded, never committed
    manifest, home = tiny_src / "manifest.toml", tmp_path / "home"
    hub.rate_limit = HUB_RATE
    part = _kill_midway(manifest, home, tmp_path / "first.log", (tiny_src / WEIGHTS).stat().st_size)
    with open(part, "r+b") as fh:
        fh.seek(part.stat().st_size // 2)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0xFF]))
    r = _hub_run(manifest, home)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "did not verify; downloading it again" in r.stderr
    assert "downloaded again from its first byte" in r.stderr  # the overlapped conversion said why it went
    doc = json.loads(r.stdout)
    assert doc["overlap"]["converted_while_fetching"] is False
    assert _leftovers(home, HUB_NAME) == []
    hub.rate_limit = 0
    _assert_same_profile(_profile(home, HUB_NAME),
                         _reference(manifest, tmp_path / "ref", "--source", "hf", name=HUB_NAME))


def test_the_run_report_schema_describes_the_overlap_figures() -> None:
    from provision.formats.report_schema import bundled_schema

    props = bundled_schema("run")["properties"]
    assert props["ready_after_last_byte_seconds"]["type"] == ["number", "null"]
    assert "bytes_converted_before_last_byte" in props["overlap"]["properties"]
