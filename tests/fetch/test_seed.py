"""`provision seed DIR`: the torrent it makes, what it publishes before serving, how it ends.

All on loopback in closed network mode; seeds that serve run as subprocesses stopped by PID.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import libtorrent as lt
import pytest

from provision.cli.main import run_cli
from provision.formats.sources import parse_magnet
from provision.testing.torrent_fixtures import json_report, provision_seed, run_provision


def torrent_dict(path: Path) -> dict[bytes, object]:
    d = lt.bdecode(path.read_bytes())
    assert isinstance(d, dict)
    return d


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_seed_publishes_torrent_magnet_and_whitelist_before_serving_and_a_signal_ends_it_with_exit_0(
        tiny_src: Path, tmp_path: Path, sig: int) -> None:
    with provision_seed(tiny_src, tmp_path / "w", "--tracker", "http://127.0.0.1:9/announce") as s:
        assert s.proc.poll() is None  # serving
        # the signal goes out the moment the magnet file appears (as a fleet script's would): all the
        # seed publishes, stderr's magnet line included, must be out by then
        rc = s.stop(sig)
        rep = s.report()
    m = parse_magnet(s.magnet)
    ti = lt.torrent_info(str(s.torrent))
    assert m.btih == str(ti.info_hashes().v1) and m.btmh == str(ti.info_hashes().v2)
    assert m.peers and m.peers[0].startswith("127.0.0.1:")
    assert m.trackers == ("http://127.0.0.1:9/announce",)
    assert s.whitelist == [m.btih, m.btmh[:40]]  # type: ignore[index]
    assert rc == 0, s.log.read_text()
    assert rep["ok"] is True and rep["seed"]["stopped_by"] == "signal"
    assert rep["seed"]["magnet"] == s.magnet
    assert "magnet:?xt=urn:btih:" in s.log.read_text()  # also on stderr, for a human or a fleet script


def test_seed_announces_before_it_writes_the_magnet_file_so_the_file_means_all_is_published(
        tiny_src: Path, tmp_path: Path) -> None:
    """The magnet file is the signal a script waits for: when it appears, the .torrent and the
    whitelist are written and the announcement (the CLI's stderr magnet line) is out. Written
    before the announcement, a SIGTERM sent at once lost the stderr line (a random-order failure)."""
    from provision.stages.fetch.torrent import SeedInfo, seed

    outs = {"magnet": tmp_path / "m.txt", "torrent": tmp_path / "t.torrent", "whitelist": tmp_path / "wl.txt"}
    seen: list[dict[str, bool]] = []

    def on_ready(info: SeedInfo) -> None:
        seen.append({k: p.exists() for k, p in outs.items()})

    seed(tiny_src, network="closed", listen="127.0.0.1:0", seed_for=0, magnet_out=outs["magnet"],
         torrent_out=outs["torrent"], whitelist_out=outs["whitelist"], on_ready=on_ready)
    assert seen == [{"magnet": False, "torrent": True, "whitelist": True}]
    assert outs["magnet"].read_text().startswith("magnet:?xt=urn:btih:")


@pytest.mark.parametrize(("version", "v1", "v2"), [("hybrid", True, True), ("v1", True, False), ("v2", False, True)])
def test_seed_torrent_versions_and_never_private(tiny_src: Path, tmp_path: Path, version: str, v1: bool,
                                                 v2: bool) -> None:
    out = tmp_path / "t.torrent"
    cp = run_provision(["seed", str(tiny_src), "--network", "closed", "--seed-for", "0", "--torrent-version",
                        version, "--torrent-out", str(out), "--json"])
    assert cp.returncode == 0, cp.stderr
    ti = lt.torrent_info(str(out))
    assert ti.info_hashes().has_v1() is v1 and ti.info_hashes().has_v2() is v2
    assert not ti.priv()
    info = lt.bdecode(ti.info_section())
    assert isinstance(info, dict) and b"private" not in info
    rep = json_report(cp)["seed"]
    assert rep["stopped_by"] == "none" and rep["version"] == version
    names = {f["path"] for f in rep["files"]}
    assert {"consolidated.safetensors", "params.json", "tekken.json"} <= names


def test_seed_with_a_manifest_and_a_web_seed_names_the_torrent_after_the_hub_commit(
        tiny_src: Path, tmp_path: Path) -> None:
    from provision.formats.manifest import load_manifest

    m = load_manifest(str(tiny_src / "manifest.toml"))
    hf = m.source("hf")
    assert hf is not None and hf.revision
    ws = f"http://127.0.0.1:9/{hf.repo}/resolve/"
    out = tmp_path / "t.torrent"
    cp = run_provision(["seed", str(tiny_src), "--manifest", str(tiny_src / "manifest.toml"), "--web-seed", ws,
                        "--network", "closed", "--seed-for", "0", "--torrent-out", str(out),
                        "--magnet-out", str(tmp_path / "m.txt"), "--json"])
    assert cp.returncode == 0, cp.stderr
    ti = lt.torrent_info(str(out))
    assert ti.name() == hf.revision  # web seed + name + "/" + path is the file's resolve URL
    url_list = torrent_dict(out)[b"url-list"]
    assert url_list in (ws.encode(), [ws.encode()])
    fs = ti.layout()
    paths = {fs.file_path(i) for i in range(fs.num_files()) if not fs.file_flags(i) & fs.flag_pad_file}
    assert paths == {f"{hf.revision}/{f.path}" for f in m.files}  # exactly the manifest's files
    mag = parse_magnet((tmp_path / "m.txt").read_text().strip())
    assert mag.web_seeds == (ws,)


def test_seed_for_ends_by_itself_with_the_report(tiny_src: Path, tmp_path: Path) -> None:
    cp = run_provision(["seed", str(tiny_src), "--network", "closed", "--seed-for", "1", "--json"], timeout=60)
    assert cp.returncode == 0, cp.stderr
    rep = json_report(cp)["seed"]
    assert rep["stopped_by"] == "timeout" and rep["seconds"] >= 1


@pytest.mark.parametrize(("args", "code", "needle"), [
    (["{missing}"], 2, "not a folder"),
    (["{src}", "--tracker", "ftp://x/announce"], 2, "tracker URL"),
    (["{src}", "--web-seed", "not-a-url"], 2, "web seed URL"),
    (["{src}", "--listen", "nowhere"], 2, "--listen"),
    (["{src}", "--max-upload-rate", "fast"], 2, "rate"),
    (["{src}", "--torrent-version", "v3"], 2, "v3"),
    (["{src}", "--manifest", "{badmanifest}"], 2, "lacks it"),
])
def test_seed_bad_input_is_one_line_with_its_exit_code_and_writes_nothing(
        tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], code: int,
        needle: str) -> None:
    from provision.formats.manifest import FileSpec, load_manifest, write_manifest

    m = load_manifest(str(tiny_src / "manifest.toml"))
    import dataclasses

    bad = dataclasses.replace(m, files=(*m.files, FileSpec(path="missing.safetensors", size=10)))
    write_manifest(bad, tmp_path / "bad.toml")
    subst = {"{src}": str(tiny_src), "{missing}": str(tmp_path / "nope"), "{badmanifest}": str(tmp_path / "bad.toml")}
    argv = [subst.get(a, a) for a in args]
    out = tmp_path / "t.torrent"
    rc = run_cli(["seed", *argv, "--network", "closed", "--seed-for", "0", "--torrent-out", str(out), "--json"])
    cap = capsys.readouterr()
    assert rc == code
    assert needle in cap.err and "Traceback" not in cap.err
    if "--torrent-version" not in args:  # click rejects a bad choice before the command (and --json) runs
        assert json.loads(cap.out)["ok"] is False
    assert not out.exists()


def test_seed_refuses_a_symlink_in_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "a.dat").write_bytes(b"x" * 100)
    (d / "link.dat").symlink_to("/etc/hostname")
    rc = run_cli(["seed", str(d), "--network", "closed", "--seed-for", "0"])
    assert rc == 2
    assert "symlink" in capsys.readouterr().err
