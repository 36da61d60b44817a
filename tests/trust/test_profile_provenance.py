"""Every committed profile carries provenance.json: convert writes it before the commit, run adds
the smoke result and links it from the report, `provision verify PROFILE` checks the folder."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import tomllib

from provision import api
from provision.formats.report_schema import validate_report
from tests.support.cli import cli_json


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_convert_commits_a_record_hashing_every_output_and_source_file(tiny_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    api.convert(tiny_src, out, target="h100", scheme="bf16", layout="mistral")
    rec = json.loads((out / "provenance.json").read_text())
    on_disk = sorted(p.name for p in out.iterdir() if p.name != "provenance.json")
    assert [f["path"] for f in rec["files"]] == on_disk
    for f in rec["files"]:
        assert f["size"] == (out / f["path"]).stat().st_size and f["sha256"] == _sha(out / f["path"])
    src = {f["path"]: f for f in rec["source"]["files"]}
    for name in ("consolidated.safetensors", "params.json"):
        assert src[name]["sha256"] == _sha(tiny_src / name) and src[name]["size"] == (tiny_src / name).stat().st_size
    assert rec["recipe"]["scheme"] == "bf16" and rec["recipe"]["layout"] == "mistral"
    assert rec["recipe"]["packages"]["safetensors"] is not None
    assert rec["source"]["manifest"] is None  # a plain convert does not know the manifest
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".provision-tmp")]


def test_run_records_the_source_and_smoke_links_the_record_and_a_rerun_still_skips(
    tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    argv = ["run", str(tiny_src / "manifest.toml"), "--home", str(home), "--adopt", str(tiny_src), "--device", "cpu"]
    rc, doc, err = cli_json(capsys, *argv)
    assert rc == 0, err
    validate_report(doc)
    record = Path(doc["provenance"]["path"])
    assert record.parent == Path(doc["profile_dir"]) and doc["provenance"]["sha256"] == _sha(record)
    rec = json.loads(record.read_text())
    manifest_bytes = (tiny_src / "manifest.toml").read_bytes()
    assert rec["source"]["manifest"] == {"name": "tiny-pixtral", "sha256": hashlib.sha256(manifest_bytes).hexdigest()}
    hf = next(s for s in tomllib.loads(manifest_bytes.decode())["sources"] if s["type"] == "hf")
    assert rec["source"]["hf"] == {"repo": hf["repo"], "commit": hf["revision"]}
    src = {f["path"]: f["sha256"] for f in rec["source"]["files"]}
    assert src["consolidated.safetensors"] == _sha(tiny_src / "consolidated.safetensors")
    smoke = next(s for s in doc["stages"] if s["stage"] == "smoke")["details"]
    assert rec["smoke"]["token_ids"] == smoke["token_ids"] and rec["smoke"]["passed"] is True
    assert rec["smoke"]["device"] == "cpu" and rec["smoke"]["prompt"] == smoke["prompt"]
    rc, again, err = cli_json(capsys, *argv)
    assert rc == 0, err
    assert [s["result"] for s in again["stages"][1:]] == ["skipped"] * 4  # the smoke rewrite kept convert valid
    assert again["provenance"] == doc["provenance"]
    rc, ver, err = cli_json(capsys, "verify", str(record.parent))
    assert rc == 0, err
    validate_report(ver)
    assert ver["provenance"]["record_sha256"] == _sha(record)


def _profile(tiny_src: Path, tmp_path: Path) -> Path:
    out = tmp_path / "profile"
    api.convert(tiny_src, out, target="h100", scheme="bf16", layout="mistral")
    return out


@pytest.mark.parametrize("tamper", ["byte", "missing", "extra", "outside", "record"])
def test_verify_of_a_tampered_profile_exits_5_with_one_line(
    tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], tamper: str
) -> None:
    out = _profile(tiny_src, tmp_path)
    if tamper == "byte":
        data = bytearray((out / "consolidated.safetensors").read_bytes())
        data[-1] ^= 1
        (out / "consolidated.safetensors").write_bytes(bytes(data))
    elif tamper == "missing":
        (out / "tekken.json").unlink()
    elif tamper == "extra":
        shutil.copy(out / "params.json", out / "params.json.bak")
    else:
        rec = json.loads((out / "provenance.json").read_text())
        if tamper == "outside":
            rec["files"].append({"path": "../secret", "size": 1, "sha256": "0" * 64})
        else:  # a record whose digest of one file was changed
            rec["files"][0]["sha256"] = "0" * 64
        (out / "provenance.json").write_text(json.dumps(rec))
    rc, doc, err = cli_json(capsys, "verify", str(out))
    assert rc == 5, err
    assert doc["ok"] is False and "\n" not in doc["error"]["message"]
    validate_report(doc)


def test_the_recorded_source_identity_takes_the_infohash_and_hub_commit_from_the_manifest(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from provision.formats.manifest import parse_manifest_bytes
    from provision.layout import Layout
    from provision.pipeline import RunOptions, RunResult, _Run

    btih, commit = "ab" * 20, "cd" * 20
    raw = (f'schema_version = 1\nname = "m"\narchitecture = "pixtral"\nformat = "mistral"\n'
           f'[[sources]]\ntype = "torrent"\nmagnet = "magnet:?xt=urn:btih:{btih.upper()}&dn=m"\n'
           f'[[sources]]\ntype = "hf"\nrepo = "org/m"\nrevision = "{commit}"\n'
           f'[[files]]\npath = "params.json"\nsize = 2\nsha256 = "{"0" * 64}"\n').encode()
    manifest = parse_manifest_bytes(raw)
    plan: Any = SimpleNamespace(name="m", dest=tmp_path / "o", manifest=manifest, magnet=None, hf=None)
    run = _Run(plan, RunOptions(), Layout(tmp_path), RunResult(plan=plan, dry_run=False), state=None,  # type: ignore[arg-type]
               progress=None, seeding=None, chosen=None)
    ident = run.source_identity().to_dict()
    assert ident["btih"] == btih and ident["hf"] == {"repo": "org/m", "commit": commit}
    assert ident["manifest"] == {"name": "m", "sha256": hashlib.sha256(raw).hexdigest()}
