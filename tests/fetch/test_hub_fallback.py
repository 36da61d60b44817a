"""Sources back each other up: a manifest whose first source is a torrent that fails falls back to
the Hub under ``--source auto``: a dead infohash nobody has (no peers at all), and a real stall, a
torrent whose one peer accepts the connection and never sends a byte. All on closed loopback."""

from __future__ import annotations

import json
import secrets
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from provision.cli.main import run_cli
from provision.testing.hub_server import LoopbackHub


def dead_torrent_first(tiny_src: Path, out: Path) -> Path:
    """The tiny manifest with a torrent source nobody seeds put before its hf source."""
    text = (tiny_src / "manifest.toml").read_text()
    magnet = f"magnet:?xt=urn:btih:{secrets.token_hex(20)}&dn=tiny-pixtral"
    first = text.index("[[sources]]")
    out.write_text(text[:first] + f'[[sources]]\ntype = "torrent"\nmagnet = "{magnet}"\n\n' + text[first:])
    return out


TINY_FILES = ("consolidated.safetensors", "params.json", "tekken.json")


@contextmanager
def silent_peer() -> Iterator[tuple[int, list[socket.socket]]]:
    """A loopback TCP listener that accepts every connection, keeps it open and never sends a byte:
    a BitTorrent peer that is there and never answers. Yields (port, the accepted connections)."""
    accepted: list[socket.socket] = []
    stop = threading.Event()
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.1)  # so the accept loop sees ``stop`` (bounded: the loop ends with the test)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(conn)

    t = threading.Thread(target=serve, name="silent-peer", daemon=True)
    t.start()
    try:
        yield int(srv.getsockname()[1]), accepted
    finally:
        stop.set()
        t.join(timeout=10)
        srv.close()
        for c in accepted:
            c.close()


def torrent_file_first(tiny_src: Path, out_dir: Path) -> Path:
    """The tiny manifest with a real .torrent of its three files (so the fetch has the metadata and
    goes straight to downloading) put before its hf source; nobody seeds that torrent."""
    from provision.stages.fetch.torrent.create import create_torrent

    listing = [(n, (tiny_src / n).stat().st_size) for n in TINY_FILES]
    ct = create_torrent(tiny_src, files=listing, name="tiny-pixtral")
    (out_dir / "tiny.torrent").write_bytes(ct.data)
    text = (tiny_src / "manifest.toml").read_text()
    first = text.index("[[sources]]")
    manifest = out_dir / "m.toml"
    manifest.write_text(text[:first] + '[[sources]]\ntype = "torrent"\ntorrent = "tiny.torrent"\n\n' + text[first:])
    return manifest


def test_a_torrent_whose_only_peer_never_sends_a_byte_stalls_and_falls_back_to_the_hub(
        hub: LoopbackHub, tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = torrent_file_first(tiny_src, tmp_path)
    dest = tmp_path / "out"
    capsys.readouterr()
    with silent_peer() as (port, accepted):
        code = run_cli(["fetch", str(manifest), "--dest", str(dest), "--network", "closed",
                        "--listen", "127.0.0.1:0", "--peer", f"127.0.0.1:{port}", "--stall-timeout", "2",
                        "--json"])
        contacted = len(accepted)
    out = capsys.readouterr()
    assert code == 0, out.err
    assert contacted >= 1  # the torrent really reached its peer: the stall is the peer's silence
    rep = json.loads(out.out)["fetch"]
    assert rep["source"] == "hf"
    assert [a["source"] for a in rep["attempts"]] == ["torrent"]
    err = rep["attempts"][0]["error"]
    assert (err["kind"], err["exit_code"]) == ("stalled", 4)
    assert err["context"]["phase"] == "downloading" and err["context"]["peers"] >= 1
    assert "stalled: no progress" in err["message"]
    for name in TINY_FILES:
        assert (dest / name).read_bytes() == (tiny_src / name).read_bytes()
    assert {f["authority"] for f in rep["files"]} == {"manifest-sha256"}
    assert "source torrent failed" in out.err and "trying hf" in out.err


def test_a_dead_torrent_source_falls_back_to_the_hub(
        hub: LoopbackHub, tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = dead_torrent_first(tiny_src, tmp_path / "m.toml")
    dest = tmp_path / "out"
    capsys.readouterr()
    code = run_cli(["fetch", str(manifest), "--dest", str(dest), "--network", "closed",
                    "--listen", "127.0.0.1:0", "--stall-timeout", "2", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    rep = json.loads(out.out)["fetch"]
    assert rep["source"] == "hf"
    assert [a["source"] for a in rep["attempts"]] == ["torrent"]
    assert rep["attempts"][0]["error"]["exit_code"] == 4
    for name in ("consolidated.safetensors", "params.json", "tekken.json"):
        assert (dest / name).read_bytes() == (tiny_src / name).read_bytes()
    assert "trying hf" in out.err


def test_source_hf_skips_the_torrent_entirely(
        hub: LoopbackHub, tiny_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from provision.stages.fetch import fetch, torrent
    from provision.stages.plan import make_plan

    def never(*_a: object, **_k: object) -> None:
        raise AssertionError("the torrent source must not be tried")

    monkeypatch.setattr(torrent, "fetch_torrent", never)
    plan = make_plan(str(dead_torrent_first(tiny_src, tmp_path / "m.toml")), dest=tmp_path / "out",
                     check_disk=False)
    res = fetch(plan, source="hf")
    assert res.source == "hf" and res.attempts == []
