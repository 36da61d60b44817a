"""Sources back each other up: a manifest whose first source is a dead torrent (an infohash
nobody has, on a closed loopback network) falls back to the Hub under ``--source auto``."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from provision.cli.main import run_cli
from provision.errors import StallError
from provision.testing.hub_server import LoopbackHub


def dead_torrent_first(tiny_src: Path, out: Path) -> Path:
    """The tiny manifest with a torrent source nobody seeds put before its hf source."""
    text = (tiny_src / "manifest.toml").read_text()
    magnet = f"magnet:?xt=urn:btih:{secrets.token_hex(20)}&dn=tiny-pixtral"
    first = text.index("[[sources]]")
    out.write_text(text[:first] + f'[[sources]]\ntype = "torrent"\nmagnet = "{magnet}"\n\n' + text[first:])
    return out


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


def test_source_auto_moves_on_when_the_torrent_stalls_and_records_why(
        hub: LoopbackHub, tiny_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from provision.stages.fetch import TorrentOptions, fetch, torrent
    from provision.stages.plan import make_plan

    def stalled(*_a: object, **_k: object) -> None:
        raise StallError("No peers found for tiny-pixtral in 2 s.", phase="metadata")

    monkeypatch.setattr(torrent, "fetch_torrent", stalled)
    plan = make_plan(str(dead_torrent_first(tiny_src, tmp_path / "m.toml")), dest=tmp_path / "out",
                     check_disk=False)
    res = fetch(plan, source="auto", torrent=TorrentOptions(network="closed"))
    assert res.source == "hf" and res.attempts[0]["error"]["kind"] == "stalled"
    assert {f.authority for f in res.files} == {"manifest-sha256"}


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
