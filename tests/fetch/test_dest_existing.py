"""`provision fetch --dest` over BitTorrent never replaces a file it did not write: one that differs
is refused (exit 2, unchanged), replaced only with --force, which names it."""

from __future__ import annotations

from pathlib import Path

import pytest

from provision.testing.torrent_fixtures import same_tree, seed_thread
from tests.support.cli import cli_json


def test_torrent_fetch_refuses_a_differing_file_in_dest_and_replaces_it_only_with_force(
        tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    theirs = dest / "params.json"
    theirs.write_text('{"dim": 1, "note": "the user\'s own file"}')
    before = theirs.read_bytes()
    with seed_thread(tiny_src) as info:
        argv = ["fetch", info.magnet, "--dest", str(dest), "--network", "closed", "--stall-timeout", "30"]
        code, doc, err = cli_json(capsys, *argv)
        assert code == 2, err
        assert "refusing to replace" in doc["error"]["message"] and "params.json" in doc["error"]["message"]
        assert theirs.read_bytes() == before
        assert sorted(p.name for p in dest.iterdir()) == ["params.json"]  # nothing else placed either
        code, doc, err = cli_json(capsys, *argv, "--force")
    assert code == 0, err
    assert f"replacing {theirs}" in err
    assert same_tree(tiny_src, dest, ["params.json", "consolidated.safetensors"])
