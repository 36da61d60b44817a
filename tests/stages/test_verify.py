"""Verify: the tiny checkpoint passes; every bad input of issue 3 fails with its exit code, a
one-line message naming expected vs actual and the authority, and nothing on disk changes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from provision.cli.main import run_cli
from provision.errors import (
    HashMismatchError,
    HostileContentError,
    ParamsError,
    SizeMismatchError,
    StructureError,
    VerifyError,
)
from provision.formats.manifest import load_manifest
from provision.formats.safetensors import check_safetensors
from provision.progress import ProgressEvent
from provision.stages.verify import (
    Authority,
    authorities_from_manifest,
    git_blob_sha1,
    sha256_file,
    verify_dir,
    verify_files,
)
from tests.support.cli import cli_json
from tests.support.files import (
    data_offset,
    flip_byte,
    pack,
    read_parts,
    rewrite_header,
    safetensors_bytes,
    snapshot,
)

W = "consolidated.safetensors"


def assert_fails(capsys: pytest.CaptureFixture[str], root: Path, code: int, kind: str,
                 *extra: str) -> dict[str, Any]:
    """`provision verify root` fails with ``code``/``kind``, one error line, disk untouched."""
    before = snapshot(root)
    rc, doc, err = cli_json(capsys, "verify", str(root), *extra)
    assert rc == code, err
    assert doc["ok"] is False and doc["exit_code"] == code
    assert doc["error"]["kind"] == kind, doc["error"]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    assert snapshot(root) == before
    assert doc["verify"]["failures"] >= 1
    return doc


# -- the good case ---------------------------------------------------------------------------


def test_tiny_checkpoint_verifies_clean_against_its_manifest(tiny_src: Path) -> None:
    m = load_manifest(tiny_src / "manifest.toml")
    before = snapshot(tiny_src)
    rep = verify_dir(tiny_src, m)
    rep.raise_for_failure()
    assert rep.ok
    by = {f.path: f for f in rep.files}
    for spec in m.files:
        assert by[spec.path].status == "ok"
        assert by[spec.path].authority == "manifest-sha256"
        assert by[spec.path].sha256 == spec.sha256
        assert by[spec.path].size == spec.size
    assert by["manifest.toml"].status == "unlisted"
    names = {c.name for c in rep.checks}
    assert {"present", "size", "sha256", "safetensors", "params", "tensors"} <= names
    assert snapshot(tiny_src) == before


def test_verify_cli_exit_0_and_json_lists_every_check(tiny_src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc, _ = cli_json(capsys, "verify", str(tiny_src), "--manifest", str(tiny_src / "manifest.toml"))
    assert rc == 0
    assert doc["ok"] is True and doc["command"] == "verify"
    assert doc["manifest_sha256"] == load_manifest(tiny_src / "manifest.toml").sha256
    checks = doc["verify"]["checks"]
    assert all(c["ok"] for c in checks)
    sha_checks = [c for c in checks if c["check"] == "sha256"]
    assert {c["file"] for c in sha_checks} == {"consolidated.safetensors", "params.json", "tekken.json"}
    assert all(c["authority"] == "manifest-sha256" and c["expected"] == c["actual"] for c in sha_checks)


def test_without_manifest_structure_is_checked_and_hashes_reported_under_authority_none(tiny_src: Path) -> None:
    m = load_manifest(tiny_src / "manifest.toml")
    rep = verify_dir(tiny_src)
    assert rep.ok
    by = {f.path: f for f in rep.files}
    for spec in m.files:
        assert by[spec.path].authority == "none"
        assert by[spec.path].sha256 == spec.sha256
    assert any(c.name == "tensors" and c.ok for c in rep.checks)
    assert rep.facts[W] == (m.file(W).size, m.file(W).sha256)  # type: ignore[union-attr]


def test_verify_does_not_import_torch(tiny_src: Path) -> None:
    code = (
        "import sys\n"
        "from provision.cli.main import run_cli\n"
        f"rc = run_cli(['verify', {str(tiny_src)!r}, '--manifest', {str(tiny_src / 'manifest.toml')!r}])\n"
        "heavy = [m for m in ('torch', 'safetensors', 'libtorrent', 'huggingface_hub', 'numpy') if m in sys.modules]\n"
        "print(rc, heavy)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "0 []"  # after verify's per-file lines (its result, on stdout)


def test_our_header_parse_matches_the_safetensors_library(tiny_src: Path) -> None:
    from safetensors import safe_open

    info = check_safetensors(tiny_src / W)
    with safe_open(str(tiny_src / W), framework="numpy") as f:
        names = set(f.keys())
        assert f.metadata() == info.metadata
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
    assert names == set(info.tensors)
    assert shapes == info.shapes()
    assert info.data_offset == data_offset(tiny_src / W)
    assert all(t.dtype == "BF16" for t in info.tensors.values())


# -- content hashes -------------------------------------------------------------------------


def test_flipped_byte_in_data_section_fails_sha256_naming_expected_actual_and_authority(
        tiny_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tiny_copy / W
    flip_byte(p, data_offset(p) + 12345)
    exp = load_manifest(tiny_copy / "manifest.toml").file(W).sha256  # type: ignore[union-attr]
    doc = assert_fails(capsys, tiny_copy, 5, "hash_mismatch", "--manifest", str(tiny_copy / "manifest.toml"))
    ctx = doc["error"]["context"]
    assert ctx["expected"] == exp and ctx["actual"] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert ctx["authority"] == "manifest-sha256" and ctx["path"] == W
    assert exp in doc["error"]["message"] and "manifest-sha256" in doc["error"]["message"]
    # the structure is still fine: only the hash catches a flipped data byte
    failed = [c for c in doc["verify"]["checks"] if not c["ok"]]
    assert [(c["check"], c["file"]) for c in failed] == [("sha256", W)]


def test_truncated_file_fails_size_check_before_hashing(tiny_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tiny_copy / W
    full = p.stat().st_size
    os.truncate(p, full - 1000)
    doc = assert_fails(capsys, tiny_copy, 5, "size_mismatch", "--manifest", str(tiny_copy / "manifest.toml"))
    assert doc["error"]["context"] == {"path": W, "expected": full, "actual": full - 1000,
                                       "authority": "manifest-sha256"}
    assert not any(c["check"] == "sha256" and c["file"] == W for c in doc["verify"]["checks"])


def test_truncated_file_without_manifest_fails_structure(tiny_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.truncate(tiny_copy / W, (tiny_copy / W).stat().st_size - 2)
    doc = assert_fails(capsys, tiny_copy, 5, "structure")
    assert "past the" in doc["error"]["message"] or "data section" in doc["error"]["message"]


def test_hub_lfs_and_git_blob_authorities_are_checked_and_named(tiny_copy: Path) -> None:
    m = load_manifest(tiny_copy / "manifest.toml")
    blob = git_blob_sha1(tiny_copy / "params.json")
    raw = (tiny_copy / "params.json").read_bytes()
    assert blob == hashlib.sha1(b"blob %d\x00" % len(raw) + raw).hexdigest()
    if shutil.which("git"):
        git = subprocess.run(["git", "hash-object", str(tiny_copy / "params.json")], capture_output=True, text=True)
        assert blob == git.stdout.strip()
    exp = {W: Authority("hub-lfs-sha256", size=m.file(W).size, sha256=m.file(W).sha256),  # type: ignore[union-attr]
           "params.json": Authority("git-blob-sha1", git_sha1=blob)}
    rep = verify_files(tiny_copy, exp)
    assert rep.ok
    assert rep.file("params.json").authority == "git-blob-sha1"  # type: ignore[union-attr]
    assert rep.file("params.json").git_sha1 == blob  # type: ignore[union-attr]
    (tiny_copy / "params.json").write_text((tiny_copy / "params.json").read_text().replace("64", "65", 1))
    bad = verify_files(tiny_copy, exp)
    fail = bad.failures[0]
    assert (fail.name, fail.file, fail.authority, fail.expected) == ("git-sha1", "params.json", "git-blob-sha1", blob)
    with pytest.raises(HashMismatchError):
        bad.raise_for_failure()


def test_known_sha256_from_the_fetcher_replaces_the_read_but_is_still_compared(tiny_src: Path) -> None:
    auths = authorities_from_manifest(load_manifest(tiny_src / "manifest.toml"))
    good = {k: a.sha256 for k, a in auths.items() if a.sha256}
    rep = verify_files(tiny_src, auths, known_sha256=good)
    assert rep.ok and rep.bytes_hashed == 0
    assert all(f.sha256_source == "fetcher" for f in rep.files if f.status == "ok")
    lied = dict(good, **{W: "0" * 64})
    bad = verify_files(tiny_src, auths, known_sha256=lied)
    assert [(c.name, c.file, c.actual) for c in bad.failures] == [("sha256", W, "0" * 64)]
    assert bad.file("params.json").sha256_source == "fetcher"  # type: ignore[union-attr]


def test_missing_listed_file_fails_but_missing_optional_file_does_not(tiny_copy: Path) -> None:
    m = load_manifest(tiny_copy / "manifest.toml")
    (tiny_copy / "tekken.json").unlink()
    rep = verify_dir(tiny_copy, m)
    assert [(c.name, c.file) for c in rep.failures] == [("present", "tekken.json")]
    with pytest.raises(VerifyError) as ei:
        rep.raise_for_failure()
    assert ei.value.exit_code == 5
    from dataclasses import replace

    opt = replace(m, files=tuple(replace(f, optional=True) if f.path == "tekken.json" else f for f in m.files))
    assert verify_dir(tiny_copy, opt).ok


def test_unlisted_files_are_reported_not_failed_and_not_opened(tiny_copy: Path) -> None:
    (tiny_copy / "notes.txt").write_text("hello")
    (tiny_copy / "sub").mkdir()
    (tiny_copy / "sub" / "extra.safetensors").write_bytes(b"garbage, never opened")
    rep = verify_dir(tiny_copy, load_manifest(tiny_copy / "manifest.toml"))
    assert rep.ok
    by = {f.path: f for f in rep.files}
    assert by["notes.txt"].status == "unlisted" and by["notes.txt"].sha256 is None
    assert by["sub/extra.safetensors"].status == "unlisted"


def test_sha256_file_streams_and_reports_progress(tmp_path: Path) -> None:
    p = tmp_path / "f"
    data = os.urandom(3 * (1 << 20) + 7)
    p.write_bytes(data)
    events: list[ProgressEvent] = []
    assert sha256_file(p, progress=events.append, block_size=64 << 10) == hashlib.sha256(data).hexdigest()
    assert events[-1].finished and events[-1].done == len(data) == events[-1].total


def test_parallel_workers_give_the_same_report_as_one(tiny_src: Path) -> None:
    m = load_manifest(tiny_src / "manifest.toml")
    one = verify_dir(tiny_src, m, workers=1)
    two = verify_dir(tiny_src, m, workers=4)
    assert [f.to_dict() for f in one.files] == [f.to_dict() for f in two.files]
    assert [c.to_dict() for c in one.checks] == [c.to_dict() for c in two.checks]


# -- structure --------------------------------------------------------------------------------


def _small_dir(tmp_path: Path, blob: bytes, name: str = "model.safetensors") -> Path:
    d = tmp_path / "m"
    d.mkdir()
    (d / name).write_bytes(blob)
    return d


def test_header_length_pointing_past_the_end_is_refused(tiny_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tiny_copy / W
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.write((size + 10).to_bytes(8, "little"))
    doc = assert_fails(capsys, tiny_copy, 5, "structure")
    assert "points past the end" in doc["error"]["message"]


def test_a_2gb_header_claim_is_refused_as_hostile_without_reading_it(
        tiny_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with open(tiny_copy / W, "r+b") as f:
        f.write((2 * 10**9).to_bytes(8, "little"))
    doc = assert_fails(capsys, tiny_copy, 5, "hostile")
    assert "2,000,000,000" in doc["error"]["message"]
    assert doc["error"]["context"]["header_len"] == 2 * 10**9


def test_overlapping_tensor_offsets_are_refused(tiny_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tiny_copy / W
    header, data = read_parts(p)
    a, b = "norm.weight", "layers.0.attention_norm.weight"  # same shape: (dim,)
    header[b]["data_offsets"] = list(header[a]["data_offsets"])
    rewrite_header(p, header, data)
    doc = assert_fails(capsys, tiny_copy, 5, "structure")
    assert "overlap" in doc["error"]["message"]


def test_a_gap_in_the_data_section_is_refused(tmp_path: Path) -> None:
    h = {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
         "b": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]}}
    d = _small_dir(tmp_path, pack(h, bytes(12)))
    with pytest.raises(StructureError, match="belong to no tensor"):
        check_safetensors(d / "model.safetensors")


def test_trailing_bytes_after_the_last_tensor_are_refused(tmp_path: Path) -> None:
    d = _small_dir(tmp_path, safetensors_bytes({"a": ("F32", [2, 3])}) + b"\0\0")
    with pytest.raises(StructureError, match="cover 24 bytes but the data section holds 26"):
        check_safetensors(d / "model.safetensors")


def test_unknown_dtype_is_refused(tiny_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tiny_copy / W
    header, data = read_parts(p)
    header["norm.weight"]["dtype"] = "Q4_K"
    rewrite_header(p, header, data)
    doc = assert_fails(capsys, tiny_copy, 5, "structure")
    assert "unknown dtype 'Q4_K'" in doc["error"]["message"]


def test_shape_that_disagrees_with_the_byte_size_is_refused(tiny_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tiny_copy / W
    header, data = read_parts(p)
    header["norm.weight"]["shape"] = [header["norm.weight"]["shape"][0] + 1]
    rewrite_header(p, header, data)
    doc = assert_fails(capsys, tiny_copy, 5, "structure")
    assert "norm.weight" in doc["error"]["message"] and "offsets span" in doc["error"]["message"]


def test_duplicate_json_keys_and_non_json_headers_are_refused(tmp_path: Path) -> None:
    raw = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    raw += b" " * (-len(raw) % 8)
    d = _small_dir(tmp_path, len(raw).to_bytes(8, "little") + raw + b"\0")
    with pytest.raises(StructureError, match="duplicate key"):
        check_safetensors(d / "model.safetensors")
    (d / "model.safetensors").write_bytes((4).to_bytes(8, "little") + b"\xff\xfe{}")
    with pytest.raises(StructureError, match="not valid JSON"):
        check_safetensors(d / "model.safetensors")


def test_sub_byte_dtypes_and_empty_tensors_are_accepted(tmp_path: Path) -> None:
    d = _small_dir(tmp_path, safetensors_bytes({"f4": ("F4", [4, 2]), "e": ("F32", [0, 5]), "b": ("BF16", [3])},
                                               metadata={"format": "pt"}))
    info = check_safetensors(d / "model.safetensors")
    assert info.tensors["f4"].nbytes == 4 and info.tensors["e"].nbytes == 0
    assert info.metadata == {"format": "pt"}


def test_index_naming_a_missing_shard_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "hf"
    d.mkdir()
    (d / "model-00001-of-00002.safetensors").write_bytes(safetensors_bytes({"a": ("F16", [4])}))
    idx = {"metadata": {"total_size": 16},
           "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    doc = assert_fails(capsys, d, 5, "structure")
    assert "model-00002-of-00002.safetensors" in doc["error"]["message"] and "missing" in doc["error"]["message"]


def test_index_that_misplaces_a_tensor_or_omits_one_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "hf"
    d.mkdir()
    (d / "s1.safetensors").write_bytes(safetensors_bytes({"a": ("F16", [4]), "c": ("F16", [1])}))
    (d / "s2.safetensors").write_bytes(safetensors_bytes({"b": ("F16", [4])}))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s2.safetensors",
                                                                              "b": "s2.safetensors",
                                                                              "c": "s1.safetensors"}}))
    rep = verify_dir(d)
    assert "does not hold it" in rep.failures[0].message
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors",
                                                                              "b": "s2.safetensors"}}))
    rep = verify_dir(d)
    assert "'c'" in rep.failures[0].message
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors",
                                                                              "b": "s2.safetensors",
                                                                              "c": "s1.safetensors"}}))
    assert verify_dir(d).ok


def test_index_pointing_outside_the_folder_is_hostile(tmp_path: Path) -> None:
    d = tmp_path / "hf"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    rep = verify_dir(d)
    with pytest.raises(HostileContentError):
        rep.raise_for_failure()


# -- params.json against the tensors ------------------------------------------------------------


def test_params_json_missing_key_exits_3(tiny_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = json.loads((tiny_copy / "params.json").read_text())
    del params["n_heads"]
    (tiny_copy / "params.json").write_text(json.dumps(params))
    doc = assert_fails(capsys, tiny_copy, 3, "params")
    assert "'n_heads'" in doc["error"]["message"]


def test_params_json_wrong_type_exits_3(tiny_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = json.loads((tiny_copy / "params.json").read_text())
    params["dim"] = "64"
    (tiny_copy / "params.json").write_text(json.dumps(params))
    doc = assert_fails(capsys, tiny_copy, 3, "params")
    assert "'dim'" in doc["error"]["message"] and "str" in doc["error"]["message"]
    with pytest.raises(ParamsError):
        verify_dir(tiny_copy).raise_for_failure()


def test_params_json_that_implies_other_shapes_fails_the_tensor_spec(
        tiny_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = json.loads((tiny_copy / "params.json").read_text())
    params["hidden_dim"] = 96
    (tiny_copy / "params.json").write_text(json.dumps(params))
    doc = assert_fails(capsys, tiny_copy, 5, "structure")
    assert "wrong shape" in doc["error"]["message"] and "feed_forward.w1.weight" in doc["error"]["message"]


def test_missing_and_extra_tensors_fail_the_tensor_spec(tiny_copy: Path) -> None:
    p = tiny_copy / W
    header, data = read_parts(p)
    entry = header.pop("output.weight")
    header["lm_head.weight"] = entry
    rewrite_header(p, header, data)
    rep = verify_dir(tiny_copy)
    [fail] = rep.failures
    assert fail.name == "tensors"
    assert "1 tensors missing (first 'output.weight')" in fail.message
    assert "1 tensors not in the spec (first 'lm_head.weight')" in fail.message


# -- refusals ------------------------------------------------------------------------------------


def test_a_pickle_file_in_the_folder_is_refused_and_never_opened(
        tiny_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.mkfifo(tiny_copy / "pytorch_model.bin")  # opening a FIFO would block: proof it is never opened
    (tiny_copy / "old.pt").write_bytes(b"\x80\x04\x95pickle")
    doc = assert_fails(capsys, tiny_copy, 5, "hostile", "--manifest", str(tiny_copy / "manifest.toml"))
    assert "old.pt" in doc["error"]["message"] and "pickle" in doc["error"]["message"]
    refused = {f["path"] for f in doc["verify"]["files"] if f["status"] == "refused"}
    assert refused == {"old.pt", "pytorch_model.bin"}


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl"])
def test_every_pickle_suffix_is_refused(tiny_copy: Path, suffix: str) -> None:
    (tiny_copy / f"weights{suffix.upper()}").write_bytes(b"x")
    rep = verify_dir(tiny_copy)
    with pytest.raises(HostileContentError, match="pickle"):
        rep.raise_for_failure()


def test_a_symlink_out_of_the_folder_is_refused(tiny_copy: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    (tiny_copy / "tekken.json").unlink()
    (tiny_copy / "tekken.json").symlink_to(outside)
    doc = assert_fails(capsys, tiny_copy, 5, "hostile", "--manifest", str(tiny_copy / "manifest.toml"))
    assert "symlink" in doc["error"]["message"] and "tekken.json" in doc["error"]["message"]
    assert outside.read_text() == "{}"


def test_a_symlink_to_a_folder_outside_is_refused_but_one_inside_is_followed(tiny_copy: Path, tmp_path: Path) -> None:
    (tiny_copy / "real").mkdir()
    shutil.move(str(tiny_copy / "tekken.json"), tiny_copy / "real" / "tekken.json")
    (tiny_copy / "tekken.json").symlink_to("real/tekken.json")
    assert verify_dir(tiny_copy, load_manifest(tiny_copy / "manifest.toml")).ok
    (tiny_copy / "escape").symlink_to(tmp_path)
    with pytest.raises(HostileContentError, match="escape"):
        verify_dir(tiny_copy, load_manifest(tiny_copy / "manifest.toml")).raise_for_failure()


def test_a_fifo_posing_as_a_listed_file_is_refused(tiny_copy: Path) -> None:
    (tiny_copy / "tekken.json").unlink()
    os.mkfifo(tiny_copy / "tekken.json")
    rep = verify_dir(tiny_copy, load_manifest(tiny_copy / "manifest.toml"))
    with pytest.raises(HostileContentError, match="not a regular file"):
        rep.raise_for_failure()


def test_a_hostile_expected_path_is_refused(tiny_src: Path) -> None:
    rep = verify_files(tiny_src, {"../etc/passwd": Authority("none")})
    with pytest.raises(HostileContentError, match=r"\.\."):
        rep.raise_for_failure()


def test_raise_for_failure_raises_the_first_failure_in_check_order(tiny_copy: Path) -> None:
    (tiny_copy / "evil.pkl").write_bytes(b"x")
    os.truncate(tiny_copy / W, 100)
    rep = verify_dir(tiny_copy, load_manifest(tiny_copy / "manifest.toml"))
    assert [c.name for c in rep.failures][:2] == ["hostile", "size"]
    with pytest.raises(HostileContentError):
        rep.raise_for_failure()
    (tiny_copy / "evil.pkl").unlink()
    with pytest.raises(SizeMismatchError):
        verify_dir(tiny_copy, load_manifest(tiny_copy / "manifest.toml")).raise_for_failure()


def test_verify_of_a_missing_folder_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = run_cli(["verify", str(tmp_path / "nope")])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err
    from provision.errors import UsageError

    with pytest.raises(UsageError):
        verify_dir(tmp_path / "nope")


def test_unknown_manifest_exits_3(tiny_src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc, _ = cli_json(capsys, "verify", str(tiny_src), "--manifest", "no-such-model")
    assert rc == 3 and doc["error"]["kind"] == "manifest"


def test_hf_layout_with_index_verifies_and_is_not_held_to_the_mistral_tensor_spec(
        tiny_src: Path, tmp_path: Path) -> None:
    d = tmp_path / "hf"
    d.mkdir()
    shutil.copy(tiny_src / "params.json", d / "params.json")
    (d / "config.json").write_text("{}")
    (d / "model-00001-of-00002.safetensors").write_bytes(safetensors_bytes({"model.a": ("BF16", [4, 4])}))
    (d / "model-00002-of-00002.safetensors").write_bytes(safetensors_bytes({"lm_head.weight": ("BF16", [8])}))
    idx = {"metadata": {"total_size": 48}, "weight_map": {"model.a": "model-00001-of-00002.safetensors",
                                                          "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    rep = verify_dir(d)
    assert rep.ok, rep.failures
    assert [c.actual for c in rep.checks if c.name == "index"] == ["2 tensors in 2 shards"]
    assert not any(c.name == "tensors" for c in rep.checks)


def test_verify_reports_overall_and_large_file_progress(tiny_src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import provision.stages.verify.parallel as V

    monkeypatch.setattr(V, "FILE_PROGRESS_MIN", 1 << 20)
    events: list[ProgressEvent] = []
    rep = verify_dir(tiny_src, load_manifest(tiny_src / "manifest.toml"), progress=events.append)
    assert rep.ok
    finals = {e.task: e for e in events if e.finished}
    assert finals["verify"].done == finals["verify"].total == rep.bytes_hashed
    assert finals[f"verify:{W}"].done == (tiny_src / W).stat().st_size
    assert "verify:params.json" not in finals  # small files only count towards the total


def test_expected_paths_are_normalised_before_lookup(tiny_src: Path) -> None:
    rep = verify_files(tiny_src, {"./params.json": Authority("none")})
    assert rep.ok and rep.file("params.json").size == (tiny_src / "params.json").stat().st_size  # type: ignore[union-attr]
    assert rep.file("params.json").authority == "none"  # type: ignore[union-attr]
