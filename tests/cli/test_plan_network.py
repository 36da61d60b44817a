"""`plan` takes --network (the BitTorrent mode a bare magnet is listed in), and `run MAGNET --dry-run`
calls itself offline only when --offline was given."""

from __future__ import annotations

from pathlib import Path

import pytest

from provision.formats.manifest import load_manifest
from provision.testing.torrent_fixtures import seed_thread
from tests.support.cli import cli_json

TINY_FILES = {"consolidated.safetensors", "params.json", "tekken.json"}


def test_plan_lists_a_bare_magnet_in_the_closed_network_mode_it_is_given(
    tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with seed_thread(tiny_src, manifest=load_manifest(tiny_src / "manifest.toml"), listen="127.0.0.1:0",
                     seed_for=120) as info:
        code, doc, err = cli_json(capsys, "plan", info.magnet, "--network", "closed", "--home", str(tmp_path / "h"))
    assert code == 0, err
    sizes = {f["path"]: f["size"] for f in doc["plan"]["files"]}
    assert sizes == {n: (tiny_src / n).stat().st_size for n in TINY_FILES}  # the listing came from the seeder
    assert doc["plan"]["offline"] is False


def test_plan_rejects_an_unknown_network_mode(capsys: pytest.CaptureFixture[str]) -> None:
    code, _doc, err = cli_json(capsys, "plan", "magnet:?xt=urn:btih:" + "a" * 40, "--network", "sideways")
    assert code == 2, err


@pytest.mark.parametrize(("flags", "offline"), [((), False), (("--offline",), True)])
def test_run_dry_run_of_a_magnet_says_offline_only_when_asked(
    flags: tuple[str, ...], offline: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    magnet = "magnet:?xt=urn:btih:" + "b" * 40 + "&dn=some-model"
    code, doc, err = cli_json(capsys, "run", magnet, "--dry-run", "--home", str(tmp_path / "h"), *flags)
    assert code == 0, err
    plan = doc["plan"]
    assert plan["offline"] is offline
    said_offline = [n for n in plan["notes"] if "offline" in n]
    assert bool(said_offline) is offline
    assert any("the file list of a bare magnet comes from peers" in n for n in plan["notes"])
    assert ("offline" in err) is offline  # nor in the human notes
