"""`convert --force` adds a conversion to a folder that already holds a user's files; `provision verify`
then judges the files provenance.json records, lists a README, notes or licence beside them as "not in
the record" without failing (no model loader reads them), and fails (exit 5) on any other file the
record does not list (a shard, a config, code: what a server loading the folder could read)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from provision.formats.report_schema import validate_report
from tests.support.cli import cli_json


@pytest.fixture()
def forced(tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A folder holding a user's README.md and notes.txt, then a bf16 conversion added with --force."""
    out = tmp_path / "served"
    out.mkdir()
    (out / "README.md").write_text("# our deployment notes\n")
    (out / "notes.txt").write_text("converted for the h100 pool\n")
    rc, _doc, err = cli_json(capsys, "convert", str(tiny_src), "--out", str(out), "--target", "h100", "--scheme",
                             "bf16", "--layout", "mistral", "--force", "--no-compare")
    assert rc == 0, err
    record = json.loads((out / "provenance.json").read_text())
    assert {f["path"] for f in record["files"]}.isdisjoint({"README.md", "notes.txt"})  # outputs only
    return out


def test_verify_judges_the_recorded_files_and_lists_a_users_notes_as_not_in_the_record(
    forced: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, doc, err = cli_json(capsys, "verify", str(forced))
    assert rc == 0, err
    validate_report(doc)
    record = json.loads((forced / "provenance.json").read_text())
    assert doc["provenance"]["files"] == len(record["files"])
    assert doc["provenance"]["not_in_record"] == ["README.md", "notes.txt"]
    assert "not in provenance.json" in err and "README.md, notes.txt" in err


def test_a_recorded_file_changed_still_fails_next_to_the_users_notes(
    forced: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = forced / "params.json"
    p.write_bytes(p.read_bytes().replace(b"{", b"{ ", 1))
    rc, doc, err = cli_json(capsys, "verify", str(forced))
    assert rc == 5, err
    assert "params.json" in doc["error"]["message"] and "\n" not in doc["error"]["message"]


@pytest.mark.parametrize("name", ["tokenizer_config.json", "modeling_pixtral.py", "extra-00001.safetensors"])
def test_a_file_a_loader_could_read_that_the_record_does_not_list_fails_with_exit_5(
    forced: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    if name.endswith(".safetensors"):  # a stray shard: a valid file, a copy of a recorded one
        shard = next(forced.glob("*.safetensors"))
        (forced / name).write_bytes(shard.read_bytes())
    else:
        (forced / name).write_bytes(b"{}\n")
    (forced / "zz-also.json").write_bytes(b"{}\n")
    rc, doc, err = cli_json(capsys, "verify", str(forced))
    assert rc == 5, err
    msg = doc["error"]["message"]
    first, second = sorted([name, "zz-also.json"])
    assert "\n" not in msg and msg.startswith(f"{forced / first} is not in provenance.json (and 1 more: {second})")
    assert "README" not in msg


def test_sign_and_the_python_api_accept_the_notes_and_the_signature_covers_them(
    forced: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from provision import api
    from provision.testing.ci import require_module
    from tests.trust.keys import ec_keypair

    assert api.verify_profile(forced).not_in_record == ("README.md", "notes.txt")
    require_module("model_signing", why="provision sign")
    priv, pub = ec_keypair(tmp_path, "k")
    rc, doc, err = cli_json(capsys, "sign", str(forced), "--key", str(priv), "--signature", str(tmp_path / "s.sig"))
    assert rc == 0, err
    assert doc["sign"]["files"] == len([p for p in forced.iterdir() if p.is_file()])  # the notes included
    (forced / "README.md").write_text("# changed after signing\n")
    rc, doc, err = cli_json(capsys, "verify", str(forced), "--signature", str(tmp_path / "s.sig"), "--public-key",
                            str(pub))
    assert rc == 5 and "README.md changed" in doc["error"]["message"], err
