"""The provenance record module: build, write, read and check a folder against its record."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from provision.errors import HashMismatchError, HostileContentError, SizeMismatchError, StructureError
from provision.formats import provenance
from provision.formats.provenance import PROVENANCE_NAME, SourceIdentity

SRC = [{"path": "consolidated.safetensors", "size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}]


def _folder(tmp_path: Path) -> Path:
    d = tmp_path / "profile"
    (d / "sub").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"weights-bytes")
    (d / "sub" / "config.json").write_bytes(b"{}")
    return d


def _record(d: Path) -> dict:
    rec = provenance.build(d, source=SourceIdentity(manifest_name="tiny", manifest_sha256="a" * 64, btih="B" * 40,
                                                    hf_repo="org/tiny", hf_commit="c" * 40),
                           source_files=SRC, recipe=provenance.recipe(scheme="fp8", layout="hf", target={"name": "h100"},
                                                                       profile="fp8-hf", context=4096))
    provenance.write(d, rec)
    return rec


def test_build_records_every_file_with_size_and_sha256_from_hashlib(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    rec = _record(d)
    assert rec["files"] == [
        {"path": "model.safetensors", "size": 13, "sha256": hashlib.sha256(b"weights-bytes").hexdigest()},
        {"path": "sub/config.json", "size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()},
    ]
    assert rec["source"]["btih"] == "b" * 40  # stored lowercase
    assert rec["source"]["hf"] == {"repo": "org/tiny", "commit": "c" * 40}
    assert rec["source"]["files"] == SRC
    assert rec["recipe"]["tool"] == "provision" and "torch" in rec["recipe"]["packages"]
    assert rec["smoke"] is None
    assert provenance.read(d) == rec


def test_check_passes_on_an_untouched_folder_and_links_the_record_digest(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    _record(d)
    res = provenance.check(d)
    assert (res.files, res.bytes) == (2, 15)
    assert res.record_sha256 == hashlib.sha256((d / PROVENANCE_NAME).read_bytes()).hexdigest()


def test_check_refuses_a_changed_byte(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    _record(d)
    (d / "model.safetensors").write_bytes(b"weights-bytez")  # same size, one byte changed
    with pytest.raises(HashMismatchError) as e:
        provenance.check(d)
    assert e.value.exit_code == 5 and "\n" not in str(e.value)


def test_check_refuses_a_changed_size(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    _record(d)
    (d / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(SizeMismatchError):
        provenance.check(d)


def test_check_refuses_a_missing_file(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    _record(d)
    (d / "sub" / "config.json").unlink()
    with pytest.raises(StructureError, match="missing"):
        provenance.check(d)


def test_check_refuses_an_extra_file(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    _record(d)
    (d / "extra.bin").write_bytes(b"x")
    with pytest.raises(StructureError, match=r"extra\.bin"):
        provenance.check(d)


@pytest.mark.parametrize("bad", ["../outside.bin", "/etc/passwd", "sub/../../x"])
def test_check_refuses_a_record_naming_a_path_outside_the_folder(tmp_path: Path, bad: str) -> None:
    d = _folder(tmp_path)
    rec = _record(d)
    rec["files"].append({"path": bad, "size": 1, "sha256": "0" * 64})
    (d / PROVENANCE_NAME).write_text(json.dumps(rec))
    with pytest.raises(HostileContentError) as e:
        provenance.check(d)
    assert e.value.exit_code == 5


def test_check_refuses_a_symlink_in_the_folder(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    _record(d)
    (tmp_path / "secret").write_bytes(b"s")
    os.symlink(tmp_path / "secret", d / "link")
    with pytest.raises(HostileContentError):
        provenance.check(d)


def test_read_refuses_a_malformed_or_missing_record(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    with pytest.raises(StructureError, match=r"no provenance\.json"):
        provenance.read(d)
    (d / PROVENANCE_NAME).write_text("{not json")
    with pytest.raises(StructureError, match="not valid JSON"):
        provenance.read(d)
    (d / PROVENANCE_NAME).write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(StructureError, match="not a valid provenance record"):
        provenance.read(d)


def test_add_smoke_rewrites_the_record_and_the_files_still_check(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    _record(d)
    entry = provenance.smoke_entry({"device": "cpu", "dtype": "float32", "prompt": "hi", "token_ids": [1, 2],
                                    "text": "ok", "passed": True,
                                    "checks": [{"name": "finite", "passed": True, "detail": ""}]})
    provenance.add_smoke(d, entry)
    assert provenance.read(d)["smoke"]["token_ids"] == [1, 2]
    assert provenance.check(d).files == 2
    assert not [p for p in d.iterdir() if p.name.startswith(".provision-tmp")]


def test_known_hashes_stand_in_only_for_files_whose_size_still_matches(tmp_path: Path) -> None:
    d = tmp_path / "p"
    d.mkdir()
    (d / "a.bin").write_bytes(b"aaaa")
    (d / "b.bin").write_bytes(b"bbbbbb")
    fake = "0" * 64  # what a caller claims to have read: used for a.bin (size 4 matches)
    got = {f["path"]: f["sha256"] for f in provenance.hash_files(d, ["a.bin", "b.bin"],
                                                                   {"a.bin": (4, fake), "b.bin": (5, fake)})}
    assert got == {"a.bin": fake, "b.bin": hashlib.sha256(b"bbbbbb").hexdigest()}  # b.bin is 6 bytes: re-hashed


def test_convert_reads_its_weights_once_for_verify_and_provenance(tiny_src: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from provision.stages.convert import convert

    hashed: list[str] = []
    real = provenance.sha256_file

    def spy(p: Path) -> str:
        hashed.append(Path(p).name)
        return real(p)

    monkeypatch.setattr(provenance, "sha256_file", spy)
    out = tmp_path / "o"
    convert(tiny_src, out, target="h100", scheme="fp8", layout="hf", hf_tokenizer=False)
    weights = [p.name for p in out.iterdir() if p.suffix == ".safetensors"]
    assert weights and not set(weights) & set(hashed)  # verify's digests stood in for a second read
    rec = json.loads((out / PROVENANCE_NAME).read_text())
    for f in rec["files"]:  # and the record is still the truth about the bytes
        assert f["sha256"] == hashlib.sha256((out / f["path"]).read_bytes()).hexdigest(), f["path"]
