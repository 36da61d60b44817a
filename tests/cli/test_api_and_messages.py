"""Two defects found while putting the README's promises under test: the Python API's fetch can choose its
source like `provision fetch --source`, and import-pickle names the hash it checked, not another one."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from provision.testing.hub_server import LoopbackHub
from tests.support.cli import cli_json


def test_api_fetch_takes_the_source_type_like_the_cli_source_option(hub: LoopbackHub, tiny_src: Path,
                                                                   tmp_path: Path) -> None:
    from provision import api

    res = api.fetch(str(tiny_src / "manifest.toml"), home=tmp_path / "home", dest=tmp_path / "got", via="hf")
    assert res.source == "hf"
    for name in ("consolidated.safetensors", "params.json", "tekken.json"):
        got = hashlib.sha256((tmp_path / "got" / name).read_bytes()).hexdigest()
        assert got == hashlib.sha256((tiny_src / name).read_bytes()).hexdigest(), name


def test_import_pickle_checked_by_md5_prints_the_md5_it_matched(tiny_7b_pickle: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    raw = (tiny_7b_pickle / "consolidated.00.pth").read_bytes()
    md5 = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    sha = hashlib.sha256(raw).hexdigest()
    rc, _doc, err = cli_json(capsys, "import-pickle", str(tiny_7b_pickle), "--out", str(tmp_path / "o"), "--md5", md5)
    assert rc == 0, err
    assert f"md5 matches the release ({md5})" in err
    assert f"sha256 {sha}" in err
