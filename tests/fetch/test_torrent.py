"""`provision fetch` over BitTorrent, on loopback only (closed network mode).

A seed runs in this process (``provision.stages.fetch.torrent.seed`` in a thread) or as a
``provision seed`` subprocess; fetches run in-process through ``run_cli`` or as subprocesses
when a test kills them. Every libtorrent session is built from ``session_settings("closed")``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import secrets
import signal
from pathlib import Path
from typing import Any

import pytest

from provision.cli.main import run_cli
from provision.testing.torrent_fixtures import (
    corrupt_peer,
    make_payload,
    resume_fraction,
    same_tree,
    seed_thread,
    seeding_endpoint,
    sigkill_fetch_midway,
    start_fetch,
    stop_process,
    wait_for,
)
from tests.support.cli import cli_json, provision_home

TINY_FILES = ["consolidated.safetensors", "params.json", "tekken.json"]


def fetch_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    rc, doc, _ = cli_json(capsys, "fetch", *args, "--network", "closed")
    return rc, doc


def final_names(dest: Path) -> list[str]:
    return sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) if dest.exists() else []


# ---------------------------------------------------------------------------------------
# settings: the network rule


def test_closed_settings_turn_off_dht_lsd_upnp_natpmp_utp_and_listen_on_loopback() -> None:
    import libtorrent as lt

    from provision.stages.fetch.torrent import open_session, session_settings

    s = session_settings("closed")
    for key in ("enable_dht", "enable_lsd", "enable_upnp", "enable_natpmp", "enable_outgoing_utp",
                "enable_incoming_utp"):
        assert s[key] is False, key
    assert s["listen_interfaces"] == "127.0.0.1:0"
    ses = open_session(s)
    try:
        live = ses.get_settings()
        assert live["enable_dht"] is False and live["enable_lsd"] is False
        assert live["enable_upnp"] is False and live["enable_natpmp"] is False
        assert live["listen_interfaces"] == "127.0.0.1:0"
        assert not ses.is_dht_running()
    finally:
        del ses
    pub = session_settings("public", listen="0.0.0.0:6881")
    assert "enable_dht" not in pub and pub["listen_interfaces"] == "0.0.0.0:6881"
    assert lt.default_settings()["enable_dht"] is True  # why closed mode must say so explicitly


def test_rate_limits_apply_to_loopback_peers_too() -> None:
    from provision.stages.fetch.torrent import session_settings

    s = session_settings("closed", download_rate=1_000_000)
    assert s["download_rate_limit"] == 1_000_000 and s["ignore_limits_on_local_network"] is False


@pytest.mark.parametrize("bad", ["localhost", "127.0.0.1:x", ":6881", "[::1:0", "127.0.0.1:70000"])
def test_malformed_listen_address_is_a_usage_error(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = run_cli(["fetch", "magnet:?xt=urn:btih:" + "a" * 40, "--network", "closed", "--listen", bad,
                  "--stall-timeout", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--listen" in err and "Traceback" not in err


def test_unknown_network_mode_is_a_usage_error() -> None:
    from provision.errors import UsageError
    from provision.stages.fetch.torrent import session_settings

    with pytest.raises(UsageError):
        session_settings("everywhere")


# ---------------------------------------------------------------------------------------
# seed -> fetch


def test_seed_then_fetch_by_magnet_verifies_and_nothing_stands_under_a_final_name_before_verify(
        tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import provision.stages.verify as verify_mod

    dest = tmp_path / "dest"
    seen_at_verify: list[list[str]] = []
    real = verify_mod.verify_files

    def spy(root: Path, expected: Any, **kw: Any) -> Any:
        if Path(root) != dest:  # the staging check, not a re-check of files already in place
            seen_at_verify.append(final_names(dest))
        return real(root, expected, **kw)

    monkeypatch.setattr(verify_mod, "verify_files", spy)
    with seed_thread(tiny_src) as info:
        assert "x.pe=127.0.0.1:" in info.magnet and info.btih and info.btmh
        rc, rep = fetch_json(capsys, info.magnet, "--dest", str(dest), "--stall-timeout", "20")
        assert rc == 0, rep
        assert seen_at_verify == [[]]  # verify ran once, before anything was under its final name
        assert same_tree(tiny_src, dest, TINY_FILES)
        f = rep["fetch"]
        assert f["source"] == "torrent" and f["extra"]["btih"] == info.btih
        assert f["extra"]["verify"]["ok"] is True
        by_path = {x["path"]: x for x in f["files"]}
        for rel in TINY_FILES:
            assert by_path[rel]["authority"] == "torrent-v2-merkle"
            assert by_path[rel]["sha256"] == hashlib.sha256((tiny_src / rel).read_bytes()).hexdigest()
        assert not (provision_home() / "staging").exists() or not any((provision_home() / "staging").rglob("*"))
        assert not list((provision_home() / "torrents").glob("*.resume"))

        # again: everything is in place and verified, nothing is downloaded
        rc, rep2 = fetch_json(capsys, info.magnet, "--dest", str(dest), "--stall-timeout", "20")
        assert rc == 0
        assert rep2["fetch"]["bytes_downloaded"] == 0
        assert sorted(rep2["fetch"]["extra"]["reused"]) == sorted(x["path"] for x in f["files"])


def test_a_magnet_download_takes_its_pieces_in_order_once_the_files_are_wanted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # the stream hasher (and run's conversion beside the download) read the files in order: a
    # download in random order makes them wait for the tail (libtorrent kept its sequential
    # cursor from while a magnet wanted nothing, until the flag was set again)
    from provision.stages.fetch.torrent.stream_hash import StreamHasher

    marked: list[int] = []
    real = StreamHasher.mark

    def spy(self: StreamHasher, piece: int) -> None:
        marked.append(piece)
        real(self, piece)

    monkeypatch.setattr(StreamHasher, "mark", spy)
    src = tmp_path / "payload"
    make_payload(src, {"a.dat": 48 << 20})
    with seed_thread(src) as info:
        rc, rep = fetch_json(capsys, info.magnet, "--dest", str(tmp_path / "dest"), "--stall-timeout", "30")
    assert rc == 0, rep
    assert len(marked) >= 48, len(marked)
    backwards = sum(1 for a, b in itertools.pairwise(marked) if b < a)
    assert backwards <= len(marked) // 10, f"{backwards} of {len(marked)} pieces came before an earlier one: {marked[:40]}"


def test_manifest_with_a_torrent_source_fetches_only_its_files_and_trusts_the_stream_hash(
        tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from provision.formats.manifest import Source, load_manifest, write_manifest

    torrent = tmp_path / "m" / "tiny.torrent"
    torrent.parent.mkdir()
    with seed_thread(tiny_src, torrent_out=torrent) as info:
        m = load_manifest(str(tiny_src / "manifest.toml"))
        import dataclasses

        keep = [f for f in m.files if f.path != "tekken.json"]
        m2 = dataclasses.replace(m, files=tuple(keep), sources=(
            Source(type="torrent", torrent="tiny.torrent", magnet=info.magnet, prefix="tiny-pixtral/"),))
        mpath = tmp_path / "m" / "manifest.toml"
        write_manifest(m2, mpath)
        dest = tmp_path / "dest"
        rc, rep = fetch_json(capsys, str(mpath), "--dest", str(dest), "--stall-timeout", "20")
        assert rc == 0, rep
        assert final_names(dest) == sorted(f.path for f in keep)
        files = {x["path"]: x for x in rep["fetch"]["files"]}
        assert all(x["authority"] == "manifest-sha256" for x in files.values())
        vfiles = {x["path"]: x for x in rep["fetch"]["extra"]["verify"]["files"]}
        assert all(vfiles[p]["sha256_source"] == "fetcher" for p in files)
        kept = sum((tiny_src / f.path).stat().st_size for f in keep)
        assert rep["fetch"]["bytes_downloaded"] < kept + (1 << 20)  # tekken.json was not downloaded


def test_include_glob_selects_files_of_a_bare_magnet(tiny_src: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "dest"
    with seed_thread(tiny_src) as info:
        rc, rep = fetch_json(capsys, info.magnet, "--dest", str(dest), "--include", "*.json",
                             "--stall-timeout", "20")
    assert rc == 0, rep
    assert final_names(dest) == ["params.json", "tekken.json"]


def test_magnet_listing_reads_the_file_list_from_peers(tiny_src: Path) -> None:
    from provision.stages.fetch.torrent import magnet_listing

    with seed_thread(tiny_src) as info:
        listing = magnet_listing(info.magnet, timeout=20, network="closed")
    got = {p: s for p, s, _ in listing}
    for rel in TINY_FILES:
        assert got[rel] == (tiny_src / rel).stat().st_size


# ---------------------------------------------------------------------------------------
# bad inputs and failures


def hostile_torrent(path: Path, parts: list[bytes]) -> Path:
    import libtorrent as lt

    data = b"x" * 1000
    info = {b"name": b"model", b"piece length": 16384, b"pieces": hashlib.sha1(data).digest(),
            b"files": [{b"length": len(data), b"path": parts}]}
    path.write_bytes(lt.bencode({b"info": info}))
    return path


@pytest.mark.parametrize("parts", [[b"..", b"evil.txt"], [b"a", b"..", b"..", b"b"], [b"/etc", b"x"], [b"a\\..\\b"]])
def test_hostile_names_in_a_torrent_file_are_refused_before_anything_is_written(
        parts: list[bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = hostile_torrent(tmp_path / "evil.torrent", parts)
    dest = tmp_path / "dest"
    rc = run_cli(["fetch", str(t), "--dest", str(dest), "--network", "closed", "--stall-timeout", "2"])
    err = capsys.readouterr().err
    assert rc == 5
    assert "Refusing" in err and "Traceback" not in err
    assert not dest.exists() and not (provision_home() / "staging").exists()


@pytest.mark.parametrize("tree", [{b"..": {b"x": {b"": {b"length": 1}}}}, {b"a": {b"/etc": {b"": {b"length": 1}}}},
                                  {b"ok": {b"": {b"length": 1}}, b"": {b"": {b"length": 1}}}])
def test_hostile_names_in_a_v2_file_tree_are_refused(tree: dict[bytes, Any]) -> None:
    import libtorrent as lt

    from provision.errors import HostileContentError
    from provision.stages.fetch.torrent import check_info_names

    info = lt.bencode({b"name": b"model", b"piece length": 16384, b"meta version": 2, b"file tree": tree})
    with pytest.raises(HostileContentError):
        check_info_names(info)
    check_info_names(lt.bencode({b"name": b"model", b"piece length": 16384, b"meta version": 2,
                                 b"file tree": {b"ok.dat": {b"": {b"length": 1}}}}))


def test_hostile_names_in_magnet_metadata_are_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import libtorrent as lt

    from provision.stages.fetch.torrent import open_session, session_settings

    t = hostile_torrent(tmp_path / "evil.torrent", [b"..", b"..", b"evil.txt"])
    ti = lt.torrent_info(str(t))
    ses = open_session(session_settings("closed"))
    try:
        atp = lt.add_torrent_params()
        atp.ti = ti
        atp.save_path = str(tmp_path / "evil-seed")
        atp.flags &= ~lt.torrent_flags.auto_managed & ~lt.torrent_flags.paused
        ses.add_torrent(atp)
        magnet = f"magnet:?xt=urn:btih:{ti.info_hashes().v1}&x.pe=127.0.0.1:{ses.listen_port()}"
        dest = tmp_path / "dest"
        rc = run_cli(["fetch", magnet, "--dest", str(dest), "--network", "closed", "--stall-timeout", "15"])
        err = capsys.readouterr().err
    finally:
        ses.pause()
    assert rc == 5, err
    assert "Refusing" in err
    assert not dest.exists()
    staged = [p for p in (provision_home() / "staging").rglob("*") if p.is_file()] if (provision_home() / "staging").exists() else []
    assert staged == []


def test_unknown_infohash_with_no_peers_in_closed_mode_exits_4_at_once_saying_no_peer_to_ask(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # issue 17: closed mode with nobody named (no x.pe, --peer, tracker) cannot find a peer: said at
    # once (no wait for the stall timeout, 600 s here), with the fix
    magnet = "magnet:?xt=urn:btih:" + secrets.token_hex(20)
    rc = run_cli(["fetch", magnet, "--dest", str(tmp_path / "d"), "--network", "closed", "--stall-timeout", "600",
                  "--json"])
    cap = capsys.readouterr()
    assert rc == 4
    assert "No peer to ask" in cap.err and "--peer HOST:PORT" in cap.err
    rep = json.loads(cap.out)
    assert rep["error"]["exit_code"] == 4 and rep["error"]["context"]["peers"] == 0


def test_disk_space_is_checked_again_once_the_metadata_is_known(
        tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import provision.io.space as fsutil

    dest = tmp_path / "dest"
    with seed_thread(tiny_src) as info:
        monkeypatch.setattr(fsutil, "free_bytes", lambda _p: 1000)  # only the torrent's re-check sees it
        rc = run_cli(["fetch", info.magnet, "--dest", str(dest), "--network", "closed", "--stall-timeout", "20"])
    err = capsys.readouterr().err
    assert rc == 6
    assert "disk space" in err
    assert not dest.exists()


@pytest.mark.slow
def test_a_peer_serving_corrupted_pieces_is_survived_and_its_hash_failures_counted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "payload"
    make_payload(src, {"a.dat": 3 << 20, "b.dat": 1 << 20})
    torrent = tmp_path / "p.torrent"
    with seed_thread(src, torrent_out=torrent, max_upload_rate=1_000_000) as info, \
            corrupt_peer(torrent, src, tmp_path) as bad:
        dest = tmp_path / "dest"
        rc, rep = fetch_json(capsys, info.magnet, "--dest", str(dest), "--peer", bad, "--stall-timeout", "30")
    assert rc == 0, rep
    assert same_tree(src, dest, ["a.dat", "b.dat"])
    assert rep["fetch"]["extra"]["hash_failures"] >= 1
    assert rep["fetch"]["extra"]["failed_bytes"] > 0


# ---------------------------------------------------------------------------------------
# interruption and resume


@pytest.mark.slow
def test_sigkill_midway_then_rerun_downloads_under_55_percent_of_the_total(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "payload"
    sizes = make_payload(src, {"a.dat": 16 << 20, "b.dat": 8 << 20})
    total = sum(sizes.values())
    dest = tmp_path / "dest"
    with seed_thread(src) as info:
        resume = provision_home() / "torrents" / f"{info.btih}.resume"
        sigkill_fetch_midway(info.magnet, dest, resume, 0.5, tmp_path / "f1.log")
        assert final_names(dest) == []
        rc, rep = fetch_json(capsys, info.magnet, "--dest", str(dest), "--stall-timeout", "30")
    assert rc == 0, rep
    assert same_tree(src, dest, list(sizes))
    second = rep["fetch"]["bytes_downloaded"]
    assert rep["fetch"]["extra"]["resumed"] is True
    assert second < 0.55 * total, f"re-downloaded {second / total:.0%} of the total"


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code", "name"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_a_signal_midway_saves_resume_data_and_staging_and_exits_with_its_code(
        tmp_path: Path, sig: int, code: int, name: str) -> None:
    src = tmp_path / "payload"
    make_payload(src, {"a.dat": 16 << 20})
    dest = tmp_path / "dest"
    with seed_thread(src) as info:
        resume = provision_home() / "torrents" / f"{info.btih}.resume"
        p = start_fetch(info.magnet, dest, "--max-download-rate", "4M", log=tmp_path / "f.log")
        try:
            wait_for(lambda: resume_fraction(resume) >= 0.25 or p.poll() is not None, 60, what="a quarter")
            before = resume_fraction(resume)
            os.kill(p.pid, sig)
            out, _ = p.communicate(timeout=30)
        finally:
            stop_process(p)
    log = (tmp_path / "f.log").read_text()
    assert p.returncode == code, log
    assert name in log
    rep = json.loads(out)
    assert rep["exit_code"] == code
    assert resume_fraction(resume) >= before > 0
    staged = [x for x in (provision_home() / "staging").rglob("*.dat")]
    assert staged, "the partial download stays in staging"
    assert final_names(dest) == []


@pytest.mark.slow
def test_seed_for_after_a_fetch_serves_the_verified_files_to_the_next_host(
        tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, alog = tmp_path / "first", tmp_path / "a.log"
    with seed_thread(tiny_src) as info:
        # port 0: the seeding line says which port it bound (no port picked here and used later)
        a = start_fetch(info.magnet, first, "--seed-for", "60", "--listen", "127.0.0.1:0", log=alog)
        try:
            endpoint = wait_for(lambda: seeding_endpoint(alog.read_text()) or a.poll() is not None, 60,
                                what="the first fetch to finish and seed")
            assert a.poll() is None, alog.read_text()
            assert (first / "consolidated.safetensors").is_file()
        except BaseException:
            stop_process(a)
            raise
    # the original seed is gone: only the first host can serve now
    try:
        magnet = info.magnet.split("&x.pe=")[0] + f"&x.pe={endpoint}"
        rc, rep = fetch_json(capsys, magnet, "--dest", str(tmp_path / "second"), "--stall-timeout", "20")
        assert rc == 0, rep
        assert same_tree(tiny_src, tmp_path / "second", TINY_FILES)
        os.kill(a.pid, signal.SIGTERM)  # ends the seeding normally: exit 0 with the report
        out, _ = a.communicate(timeout=30)
    finally:
        stop_process(a)
    assert a.returncode == 0, (tmp_path / "a.log").read_text()
    seed = json.loads(out)["fetch"]["extra"]["seed"]
    assert seed["uploaded_bytes"] >= sum((tiny_src / r).stat().st_size for r in TINY_FILES)
    assert seed["stopped_by"] == "signal"


def test_deferred_signals_hold_sigterm_until_released_then_raise_it_where_the_caller_is_ready() -> None:
    from provision.stages.fetch.torrent import DeferredSignals

    class Landed(Exception):
        pass

    def handler(_sig: int, _frame: Any) -> None:
        raise Landed

    old = signal.signal(signal.SIGTERM, handler)
    try:
        with DeferredSignals() as deferred:
            os.kill(os.getpid(), signal.SIGTERM)
            # the noting handler runs in this thread at its next check; nothing is raised
            wait_for(lambda: deferred.pending == signal.SIGTERM, 10, interval=0.01, what="the signal to be noted")
            with pytest.raises(Landed):
                deferred.release()
        assert signal.getsignal(signal.SIGTERM) is handler  # the caller's handler is back
        with DeferredSignals():  # no signal: leaving the block raises nothing
            pass
    finally:
        signal.signal(signal.SIGTERM, old)


def test_sigterm_once_the_files_are_in_place_ends_the_seed_for_normally(tmp_path: Path) -> None:
    src = tmp_path / "payload"
    make_payload(src, {"a.dat": 4 << 20, "b.dat": 1 << 20})
    dest = tmp_path / "dest"
    with seed_thread(src) as info:
        p = start_fetch(info.magnet, dest, "--seed-for", "60", log=tmp_path / "f.log")
        try:
            wait_for(lambda: final_names(dest) == ["a.dat", "b.dat"] or p.poll() is not None, 60,
                     interval=0.005, what="the files in place")
            os.kill(p.pid, signal.SIGTERM)  # right away: seeding may not have started yet
            out, _ = p.communicate(timeout=30)
        finally:
            stop_process(p)
    log = (tmp_path / "f.log").read_text()
    assert p.returncode == 0, log
    rep = json.loads(out)
    assert rep["fetch"]["extra"]["seed"]["stopped_by"] == "signal"
    assert same_tree(src, dest, ["a.dat", "b.dat"])


def test_a_magnet_fetch_reads_each_stretch_back_from_the_disk_while_downloading_and_verify_reads_none_again(
        tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from provision.stages.verify.digests import v2_geometry

    dest = tmp_path / "dest"
    with seed_thread(tiny_src) as info:  # hybrid: the v2 merkle roots are the authority
        rc, rep = fetch_json(capsys, info.magnet, "--dest", str(dest), "--stall-timeout", "20")
    assert rc == 0, rep
    assert same_tree(tiny_src, dest, TINY_FILES)
    extra = rep["fetch"]["extra"]
    vfiles = {x["path"]: x for x in extra["verify"]["files"]}
    assert set(TINY_FILES) <= set(vfiles)
    total = 0
    for rel in vfiles:  # the tiny source's manifest.toml is in the torrent too
        size = (tiny_src / rel).stat().st_size
        f = vfiles[rel]
        assert f["authority"] == "torrent-v2-merkle" and f["status"] == "ok"
        # every merkle chunk was computed from the disk once written back; verify read none again
        assert f["hash"] == {"units": 0, "ranges": 0, "workers": 0, "read_back_by_fetcher": v2_geometry(size)[0]}
        total += size
    assert extra["read_back_while_downloading_bytes"] == total
