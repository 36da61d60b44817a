"""`provision manifest lock` records a verified folder's sizes and sha256 atomically, and refuses
(writing nothing) when verification fails; `provision manifest show` prints a manifest."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from provision.formats.manifest import FileSpec, load_manifest, write_manifest
from tests.support.cli import cli_json
from tests.support.files import data_offset, flip_byte, snapshot


def _unlocked(tiny: Path, dest: Path) -> Path:
    """The tiny manifest with every size and sha256 removed, written to ``dest``."""
    m = load_manifest(tiny / "manifest.toml")
    bare = replace(m, files=tuple(FileSpec(path=f.path) for f in m.files))
    write_manifest(bare, dest)
    return dest


def test_lock_records_sizes_and_sha256_of_the_verified_folder(tiny_src: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    target = _unlocked(tiny_src, tmp_path / "m.toml")
    assert not load_manifest(target).complete
    rc, doc, err = cli_json(capsys, "manifest", "lock", str(tiny_src), "--manifest", str(target))
    assert rc == 0, err
    locked = load_manifest(target)
    ref = load_manifest(tiny_src / "manifest.toml")
    assert locked.complete
    assert {f.path: (f.size, f.sha256) for f in locked.files} == {f.path: (f.size, f.sha256) for f in ref.files}
    assert doc["written"] == str(target) and doc["manifest_sha256_after"] == locked.sha256
    assert sorted(doc["recorded"]) == sorted(f.path for f in ref.files)
    assert [p.name for p in tmp_path.iterdir()] == ["m.toml"]  # no temporary file left behind


def test_lock_with_out_leaves_the_original_manifest_untouched(tiny_src: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    src = _unlocked(tiny_src, tmp_path / "m.toml")
    raw = src.read_bytes()
    rc, _, err = cli_json(capsys, "manifest", "lock", str(tiny_src), "--manifest", str(src),
                     "--out", str(tmp_path / "locked.toml"))
    assert rc == 0, err
    assert src.read_bytes() == raw
    assert load_manifest(tmp_path / "locked.toml").complete


def test_lock_refuses_a_corrupt_folder_and_writes_nothing(tiny_copy: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    target = _unlocked(tiny_copy, tmp_path / "m.toml")
    p = tiny_copy / "consolidated.safetensors"
    with open(p, "r+b") as f:  # a structurally broken file: unknown sizes cannot excuse it
        f.write((p.stat().st_size + 1).to_bytes(8, "little"))
    before_dir, before_m = snapshot(tiny_copy), target.read_bytes()
    rc, doc, err = cli_json(capsys, "manifest", "lock", str(tiny_copy), "--manifest", str(target))
    assert rc == 5 and doc["error"]["kind"] == "structure" and doc["written"] is None
    assert target.read_bytes() == before_m and snapshot(tiny_copy) == before_dir
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(["m.toml", "tiny-pixtral"])
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1


def test_lock_refuses_when_a_pinned_hash_disagrees(tiny_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = tiny_copy / "manifest.toml"
    flip_byte(tiny_copy / "consolidated.safetensors", data_offset(tiny_copy / "consolidated.safetensors") + 1)
    raw = m.read_bytes()
    rc, doc, _ = cli_json(capsys, "manifest", "lock", str(tiny_copy), "--manifest", str(m))
    assert rc == 5 and doc["error"]["kind"] == "hash_mismatch"
    assert m.read_bytes() == raw


def test_lock_refuses_a_bad_params_json_with_exit_3(tiny_copy: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    target = _unlocked(tiny_copy, tmp_path / "m.toml")
    params = json.loads((tiny_copy / "params.json").read_text())
    params["n_layers"] = 2.5
    (tiny_copy / "params.json").write_text(json.dumps(params))
    raw = target.read_bytes()
    rc, doc, _ = cli_json(capsys, "manifest", "lock", str(tiny_copy), "--manifest", str(target))
    assert rc == 3 and doc["error"]["kind"] == "params"
    assert target.read_bytes() == raw


def test_lock_refuses_a_folder_holding_a_pickle(tiny_copy: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    target = _unlocked(tiny_copy, tmp_path / "m.toml")
    (tiny_copy / "extra.ckpt").write_bytes(b"\x80\x04")
    raw = target.read_bytes()
    rc, doc, _ = cli_json(capsys, "manifest", "lock", str(tiny_copy), "--manifest", str(target))
    assert rc == 5 and doc["error"]["kind"] == "hostile"
    assert target.read_bytes() == raw


def test_lock_refuses_when_a_listed_file_is_missing(tiny_copy: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    target = _unlocked(tiny_copy, tmp_path / "m.toml")
    os.unlink(tiny_copy / "tekken.json")
    raw = target.read_bytes()
    rc, doc, _ = cli_json(capsys, "manifest", "lock", str(tiny_copy), "--manifest", str(target))
    assert rc == 5 and "tekken.json" in doc["error"]["message"]
    assert target.read_bytes() == raw


def test_manifest_show_prints_files_and_completeness(tiny_src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc, err = cli_json(capsys, "manifest", "show", str(tiny_src / "manifest.toml"))
    assert rc == 0
    assert doc["complete"] is True and doc["manifest"]["name"] == "tiny-pixtral"
    assert "consolidated.safetensors" in err and "complete: yes" in err
    rc, doc, err = cli_json(capsys, "manifest", "show", "pixtral-12b-2409")
    assert rc == 0 and doc["complete"] is False
    assert "size unknown" in err


def test_manifest_show_of_a_bad_manifest_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.toml").write_text("schema_version = 1\nname = 'x'\n")
    rc, doc, _ = cli_json(capsys, "manifest", "show", str(tmp_path / "bad.toml"))
    assert rc == 3 and doc["error"]["kind"] == "manifest"
