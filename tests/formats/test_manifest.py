"""Manifests: the shipped Pixtral manifest, validation errors naming the field, exit 3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from provision.cli.main import run_cli
from provision.errors import ManifestError
from provision.formats.manifest import dump_manifest, load_manifest, parse_manifest_bytes, write_manifest
from provision.formats.sources import parse_magnet
from tests.support.reference_facts import PIXTRAL_12B

ROOT = Path(__file__).resolve().parents[2]
PIXTRAL = (ROOT / "manifests" / "pixtral-12b-2409.toml").resolve()

GOOD = """
schema_version = 1
name = "m"
architecture = "pixtral"
format = "mistral"
[[sources]]
type = "hf"
repo = "org/repo"
revision = "a9da202d8e3192195835f077c43435c8b22545ab"
[[files]]
path = "params.json"
size = 10
"""


def test_shipped_pixtral_manifest_has_real_sources_and_only_confirmed_facts() -> None:
    m = load_manifest("pixtral-12b-2409")
    assert m.path == PIXTRAL
    tor, hf = m.source("torrent"), m.source("hf")
    ref = PIXTRAL_12B.magnet
    assert ref is not None
    assert tor is not None and tor.magnet is not None and parse_magnet(tor.magnet).btih == ref.btih
    assert tor.prefix == f"{ref.name}/"
    assert hf is not None and hf.repo == PIXTRAL_12B.hf_repo
    assert hf.revision == PIXTRAL_12B.hf_revision
    params = m.file("params.json")
    assert params is not None and params.size == PIXTRAL_12B.files["params.json"]["size"]
    cons = m.file("consolidated.safetensors")
    # the reference's sha256 07bddad7... belongs to the Base repo: it must not be borrowed here
    assert cons is not None and cons.sha256 is None and cons.size is None
    assert "07bddad7" not in PIXTRAL.read_text().split("must not be used here")[1]
    assert m.smoke.expected == "red"


def test_manifest_round_trips_through_write(tmp_path: Path) -> None:
    m = load_manifest(PIXTRAL)
    out = write_manifest(m, tmp_path / "copy.toml")
    again = load_manifest(tmp_path / "copy.toml")
    assert again == m and again.sha256 == out.sha256


def _bad(text: str) -> ManifestError:
    with pytest.raises(ManifestError) as ei:
        parse_manifest_bytes(text.encode())
    assert ei.value.exit_code == 3
    return ei.value


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        ('name = "m"', "", "name: required field is missing"),
        ('name = "m"', 'name = "m"\ncolour = "blue"', "colour: unknown field"),
        ('revision = "a9da202d8e3192195835f077c43435c8b22545ab"', 'revision = "main"', "sources[0].revision"),
        ('revision = "a9da202d8e3192195835f077c43435c8b22545ab"', 'revision = "a9da202"', "full 40-hex commit"),
        ('revision = "a9da202d8e3192195835f077c43435c8b22545ab"', 'revision = "z9da202d8e3192195835f077c43435c8b22545ab"', "40-hex"),
        ('path = "params.json"', 'path = "../params.json"', "files[0].path"),
        ('path = "params.json"', 'path = "/etc/passwd"', "absolute paths"),
        ('path = "params.json"', 'path = "model.bin"', "pickle format"),
        ("size = 10", 'size = "10"', "files[0].size: expected int"),
        ("size = 10", "size = -1", "must be >= 0"),
        ("size = 10", 'sha256 = "abc"', "64 hex"),
        ('type = "hf"', 'type = "ftp"', "sources[0].type"),
        ('architecture = "pixtral"', 'architecture = "llama"', "architecture"),
        ("schema_version = 1", "schema_version = 9", "schema_version"),
    ],
)
def test_invalid_manifests_name_the_field(old: str, new: str, needle: str) -> None:
    err = _bad(GOOD.replace(old, new, 1))
    assert needle in str(err)
    assert "\n" not in str(err)


def test_magnet_without_xt_in_a_manifest_is_a_manifest_error() -> None:
    text = GOOD.replace('type = "hf"\nrepo = "org/repo"\nrevision = "a9da202d8e3192195835f077c43435c8b22545ab"',
                        'type = "torrent"\nmagnet = "magnet:?dn=x"')
    err = _bad(text)
    assert "sources[0].magnet" in str(err) and "infohash" in str(err)


def test_torrent_path_escaping_the_manifest_folder_is_refused() -> None:
    text = GOOD.replace('type = "hf"\nrepo = "org/repo"\nrevision = "a9da202d8e3192195835f077c43435c8b22545ab"',
                        'type = "torrent"\ntorrent = "../../x.torrent"')
    assert "sources[0].torrent" in str(_bad(text))


def test_malformed_toml_is_a_manifest_error() -> None:
    assert "not valid TOML" in str(_bad("name = \n[[["))


def test_unknown_manifest_name_lists_the_known_ones() -> None:
    with pytest.raises(ManifestError, match=r"Unknown manifest 'nope'.*pixtral-12b-2409"):
        load_manifest("nope")


def test_duplicate_file_paths_are_refused() -> None:
    assert "duplicate path" in str(_bad(GOOD + '[[files]]\npath = "params.json"\n'))


def test_dump_is_valid_toml_that_parses_back() -> None:
    m = parse_manifest_bytes(GOOD.encode())
    assert parse_manifest_bytes(dump_manifest(m).encode()) == m


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["plan", "no-such-model"], 3, "Unknown manifest"),
        (["plan", "magnet:?dn=broken"], 2, "no 'xt=urn:btih:'"),
        (["plan", "hf://not-a-repo"], 2, "Malformed Hugging Face repo"),
        (["plan", "hf://org/repo@", "--offline"], 2, "Empty revision"),
    ],
)
def test_bad_sources_exit_with_the_documented_code_and_one_line(
    argv: list[str], code: int, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(argv) == code
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err


def test_bad_manifest_file_exits_3_with_json_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(GOOD.replace('revision = "a9da202d8e3192195835f077c43435c8b22545ab"', 'revision = "v1"'))
    before = sorted(tmp_path.rglob("*"))
    assert run_cli(["plan", str(p), "--json"]) == 3
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["exit_code"] == 3 and doc["error"]["kind"] == "manifest"
    assert "sources[0].revision" in doc["error"]["message"]
    assert sorted(tmp_path.rglob("*")) == before
