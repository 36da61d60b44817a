"""A closed-network fetch with nobody to ask (a .torrent from `seed`, or a magnet without x.pe, and no
--peer/--tracker) says so at once, with how to fix it, instead of waiting out the stall timeout
with peers=0; the same torrent with --peer is fetched."""

from __future__ import annotations

from pathlib import Path

import pytest

from provision.formats.manifest import load_manifest
from provision.stages.fetch.torrent import seed
from provision.testing.torrent_fixtures import seed_thread
from tests.support.cli import cli_json


@pytest.fixture()
def torrent_file(tiny_src: Path, tmp_path: Path) -> Path:
    out = tmp_path / "tiny.torrent"
    seed(tiny_src, manifest=load_manifest(tiny_src / "manifest.toml"), network="closed", seed_for=0,
         torrent_out=out)
    return out


def test_a_torrent_file_in_closed_mode_without_peers_fails_at_once_naming_the_fix(
    torrent_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --stall-timeout 600: the answer must not come from waiting for a stall
    code, doc, err = cli_json(capsys, "fetch", str(torrent_file), "--dest", str(tmp_path / "out"),
                              "--network", "closed", "--listen", "127.0.0.1:0", "--stall-timeout", "600")
    assert code == 4, err
    e = doc["error"]
    assert e["message"].startswith("No peer to ask for ") and "the network is closed" in e["message"]
    assert "torrent file names no peer, tracker or web seed" in e["message"]
    assert "--peer HOST:PORT" in e["message"] and "--network public" in e["message"]  # the hint
    assert e["context"]["peers"] == 0
    assert "peers=0" not in err


def test_a_magnet_without_peers_in_closed_mode_fails_at_once(
    tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with seed_thread(tiny_src, manifest=load_manifest(tiny_src / "manifest.toml"), listen="127.0.0.1:0",
                     seed_for=60) as info:
        bare = info.magnet.split("&x.pe=")[0]  # the seeder runs, but the magnet does not say where
        code, doc, err = cli_json(capsys, "fetch", bare, "--dest", str(tmp_path / "out"), "--network", "closed",
                                  "--listen", "127.0.0.1:0", "--stall-timeout", "600")
        assert code == 4, err
        assert "magnet names no peer, tracker or web seed" in doc["error"]["message"]
        # told where the seeder is, the same fetch works
        port = info.magnet.split("&x.pe=")[1].split("&")[0]
        code, doc, err = cli_json(capsys, "fetch", bare, "--dest", str(tmp_path / "out"), "--network", "closed",
                                  "--listen", "127.0.0.1:0", "--peer", port, "--stall-timeout", "60")
        assert code == 0, err
