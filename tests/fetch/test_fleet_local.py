"""Fleet behaviour that needs no namespaces, on loopback (closed network mode): `provision run
--seed-for` serves while convert and smoke run and then for the rest of S; a signal during that
wait ends it normally; a rerun whose fetch is skipped still serves late hosts; closed mode keeps
PEX (how members find each other) but not DHT/LSD; bad origin options are usage errors.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from provision.cli.main import run_cli
from provision.testing.torrent_fixtures import (
    PROVISION,
    REPO,
    provision_env,
    seed_thread,
    seeding_endpoint,
    stop_process,
    wait_for,
)

TINY_FILES = ["consolidated.safetensors", "params.json", "tekken.json"]


def run_cmd(source: str, home: Path, *extra: str) -> list[str]:
    return [*PROVISION, "run", source, "--home", str(home), "--network", "closed",
            "--no-hf-cache", "--stall-timeout", "30", "--target", "cpu", "--json", *extra]


def test_closed_mode_keeps_pex_for_fleet_members_but_not_dht_or_lsd() -> None:
    import libtorrent as lt

    from provision.stages.fetch.torrent import closed_flags

    flags = closed_flags("closed")
    assert flags & int(lt.torrent_flags.disable_dht) and flags & int(lt.torrent_flags.disable_lsd)
    assert not flags & int(lt.torrent_flags.disable_pex)
    assert closed_flags("public") == 0


@pytest.mark.parametrize("bad", ["-1", "two"])
def test_seed_upload_slots_must_be_a_count_and_nothing_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.dat").write_bytes(b"x" * 10)
    rc = run_cli(["seed", str(tmp_path / "m"), "--network", "closed", "--upload-slots", bad,
                  "--magnet-out", str(tmp_path / "magnet.txt")])
    assert rc == 2
    assert "--upload-slots" in capsys.readouterr().err
    assert not (tmp_path / "magnet.txt").exists()


@pytest.mark.slow
def test_run_seed_for_serves_while_convert_and_smoke_run_then_for_the_rest_of_s(
        tiny_src: Path, tmp_path: Path) -> None:
    with seed_thread(tiny_src) as info:
        t0 = time.monotonic()
        cp = subprocess.run(run_cmd(info.magnet, tmp_path / "home", "--seed-for", "6"), capture_output=True,
                            text=True, timeout=240, cwd=REPO, env=provision_env())
        took = time.monotonic() - t0
    assert cp.returncode == 0, cp.stderr[-3000:]
    doc = json.loads(cp.stdout)
    stages = [s["stage"] for s in doc["stages"]]
    assert stages == ["plan", "fetch", "verify", "convert", "smoke", "seed"]
    fetch = doc["stages"][1]["details"]
    assert fetch["extra"]["seed"]["background"] is True  # returned at once: seeding went on in a thread
    seed = doc["stages"][-1]
    assert seed["result"] == "ok" and seed["details"]["stopped_by"] == "timeout"
    assert 5.5 <= seed["details"]["seconds"] <= took  # S counted from the fetch's end, not after smoke
    from provision.formats.report_schema import validate_report

    validate_report(doc)


@pytest.mark.slow
def test_a_signal_while_run_waits_out_seed_for_ends_the_seed_normally_and_a_rerun_serves_late_hosts(
        tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    with seed_thread(tiny_src) as info:
        first = subprocess.run(run_cmd(info.magnet, home, "--skip-convert", "--skip-smoke"), capture_output=True,
                               text=True, timeout=240, cwd=REPO, env=provision_env())
        assert first.returncode == 0, first.stderr[-3000:]
    # the origin is gone; the rerun skips the fetch but serves the verified files on a known port
    log = tmp_path / "rerun.log"
    with open(log, "w") as lf:  # port 0: the seeding line says which port it bound
        p = subprocess.Popen(run_cmd(info.magnet, home, "--skip-convert", "--skip-smoke", "--seed-for", "120",
                                     "--listen", "127.0.0.1:0"),
                             stdout=subprocess.PIPE, stderr=lf, text=True, cwd=REPO, env=provision_env())
    try:
        endpoint = wait_for(lambda: seeding_endpoint(log.read_text()) or p.poll() is not None, 60,
                            what="the rerun to seed")
        assert p.poll() is None, log.read_text()
        late = info.magnet.split("&x.pe=")[0] + f"&x.pe={endpoint}"
        capsys.readouterr()
        rc = run_cli(["fetch", late, "--dest", str(tmp_path / "late"), "--network", "closed",
                      "--stall-timeout", "30", "--json"])
        rep: dict[str, Any] = json.loads(capsys.readouterr().out)
        assert rc == 0, rep
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
    finally:
        stop_process(p)
    assert p.returncode == 0, log.read_text()[-3000:]
    doc = json.loads(out)
    got = {s["stage"]: s for s in doc["stages"]}
    assert got["fetch"]["result"] == "skipped"
    assert got["seed"]["details"]["stopped_by"] == "signal"
    assert got["seed"]["bytes"] >= sum((tiny_src / f).stat().st_size for f in TINY_FILES)
    for f in TINY_FILES:
        assert (tmp_path / "late" / f).read_bytes() == (tiny_src / f).read_bytes()
