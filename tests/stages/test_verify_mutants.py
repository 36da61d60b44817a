"""The verify scan, the structure checks and verify_dir's options, entry by entry and field by field.

Gaps the mutation run of ``stages/verify/{scan,structure,verifier}.py`` found: a symlink whose
target (not its name) is a pickle, the path and target a symlink entry keeps, every field of
the safetensors, index and params checks a report prints, an index in a nested folder, a tensor
stored twice, the worker count and the format that turns the params check on. Expected entries
are built here from the tree the test makes.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from provision.errors import ParamsError, StructureError
from provision.formats.safetensors import SafetensorsInfo
from provision.stages.verify.report import Check
from provision.stages.verify.scan import Entry, scan
from provision.stages.verify.structure import index_checks, params_checks, safetensors_check


def _weights(path: Path, tensors: int) -> Path:
    header = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(tensors)}
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * tensors)
    return path


def test_a_link_named_like_weights_to_a_pickle_inside_is_a_pickle(tmp_path: Path) -> None:
    (tmp_path / "consolidated.00.pth").write_bytes(b"\x80\x02")
    (tmp_path / "model.safetensors").symlink_to("consolidated.00.pth")
    entries = {e.rel: e for e in scan(tmp_path)}
    target = os.path.realpath(tmp_path / "consolidated.00.pth")
    assert entries["model.safetensors"] == Entry("model.safetensors", tmp_path / "model.safetensors", "pickle",
                                                 target=target)


def test_a_link_to_a_file_inside_keeps_its_own_path_the_target_and_the_target_s_size(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "params.json").write_text("{}\n")  # 3 bytes
    (tmp_path / "params.json").symlink_to("real/params.json")
    entries = {e.rel: e for e in scan(tmp_path)}
    assert entries["params.json"] == Entry("params.json", tmp_path / "params.json", "symlink-in", size=3,
                                           target=os.path.realpath(tmp_path / "real" / "params.json"))
    assert entries["params.json"].readable


def test_the_safetensors_check_reports_its_name_file_outcome_authority_and_tensor_count(tmp_path: Path) -> None:
    good = _weights(tmp_path / "good.safetensors", 2)
    info, check = safetensors_check("good.safetensors", good, "manifest-sha256")
    assert info is not None and sorted(info.tensors) == ["t0", "t1"]
    assert check == Check("safetensors", "good.safetensors", True, "manifest-sha256", actual="2 tensors")


def test_a_malformed_weights_file_fails_the_check_with_the_error_it_raised(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 2) + b"{}" + b"\0")  # one byte no tensor accounts for
    info, check = safetensors_check("bad.safetensors", bad, "hub-lfs-sha256")
    assert info is None
    assert (check.name, check.file, check.ok, check.authority) == ("safetensors", "bad.safetensors", False,
                                                                   "hub-lfs-sha256")
    assert isinstance(check.error, StructureError)
    assert check.message == check.error.message
    assert check.message.startswith("bad.safetensors is not a valid safetensors file: ")


def test_an_index_in_a_nested_folder_is_checked_against_the_headers_checked_beside_it(tmp_path: Path) -> None:
    """``index_checks`` passes an index only the headers of shards in its own folder (by the
    shard's name there): here the shard files are gone, so only those headers can satisfy it, and
    a same-named shard elsewhere (holding other tensors) must not be taken for it."""
    (tmp_path / "x" / "sub").mkdir(parents=True)
    inner = check_safetensors_of(_weights(tmp_path / "x" / "sub" / "a.safetensors", 2))
    outer = check_safetensors_of(_weights(tmp_path / "x" / "a.safetensors", 1))
    index = tmp_path / "x" / "sub" / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"t0": "a.safetensors", "t1": "a.safetensors"}}))
    (tmp_path / "x" / "sub" / "a.safetensors").unlink()
    rel = "x/sub/model.safetensors.index.json"
    checks = index_checks([rel], {rel: index}, {"x/sub/a.safetensors": inner, "x/a.safetensors": outer})
    assert checks == [Check("index", rel, True, actual="2 tensors in 1 shards")]


def check_safetensors_of(path: Path) -> SafetensorsInfo:
    from provision.formats.safetensors import check_safetensors

    return check_safetensors(path)


def test_a_params_json_that_does_not_parse_fails_its_check_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "params.json").write_text("{not json")
    w = _weights(tmp_path / "consolidated.safetensors", 1)
    checks = params_checks(["params.json", "consolidated.safetensors"],
                           {"params.json": tmp_path / "params.json", "consolidated.safetensors": w}, {})
    assert len(checks) == 1
    c = checks[0]
    assert (c.name, c.file, c.ok) == ("params", "params.json", False)
    assert isinstance(c.error, ParamsError) and c.message == c.error.message != ""


def test_a_tensor_stored_in_two_weights_files_is_named_as_stored_twice(tiny_src: Path, tmp_path: Path) -> None:
    from provision.formats.safetensors import check_safetensors

    a = _weights(tmp_path / "consolidated-00001.safetensors", 52)  # t0..t51: none of them in the spec
    b = _weights(tmp_path / "consolidated-00002.safetensors", 1)  # t0 again
    rels = ["params.json", a.name, b.name]
    paths = {"params.json": tiny_src / "params.json", a.name: a, b.name: b}
    checks = params_checks(rels, paths, {a.name: check_safetensors(a), b.name: check_safetensors(b)})
    tensors = checks[-1]
    assert (tensors.name, tensors.ok) == ("tensors", False)
    where = f"{a.name}, {b.name}"
    assert tensors.message.startswith(f"The tensors in {where} do not match params.json: ")
    assert tensors.message.endswith("; 52 tensors not in the spec (first 't0'); 1 stored twice (first 't0').")
    err = tensors.error
    assert err is not None and err.context["duplicated"] == ["t0"] and err.context["path"] == where
    assert err.context["extra"] == sorted(f"t{i}" for i in range(52))[:50]  # the first 50 of 52, by name
    assert err.hint == "The weights and params.json come from different models or revisions; fetch both again."


def test_verify_runs_on_the_cpus_it_may_use_or_the_workers_asked(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from provision.stages.verify import verifier

    (tmp_path / "a.txt").write_text("a")
    monkeypatch.setattr(verifier.os, "sched_getaffinity", lambda pid: {0})
    assert verifier.verify_dir(tmp_path).workers == 1
    monkeypatch.setattr(verifier.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert verifier.verify_dir(tmp_path).workers == 3
    assert verifier.verify_dir(tmp_path, workers=2).workers == 2


@pytest.mark.parametrize(("fmt", "params_checked"), [("mistral", True), ("hf", False)])
def test_a_manifest_s_params_json_is_checked_only_for_the_mistral_format(
        tiny_src: Path, fmt: str, params_checked: bool) -> None:
    from provision.formats.manifest import parse_manifest
    from provision.stages.verify import verifier

    m = parse_manifest({"schema_version": 1, "name": "m", "architecture": "pixtral", "format": fmt,
                        "sources": [{"type": "hf", "repo": "org/repo"}],
                        "files": [{"path": "params.json"}, {"path": "consolidated.safetensors"}]})
    report = verifier.verify_dir(tiny_src, m, workers=2)
    assert report.workers == 2
    assert any(c.name == "params" for c in report.checks) is params_checked
    if params_checked:  # and the weights' tensors against it, counted from the file by the safetensors library
        from safetensors import safe_open

        with safe_open(str(tiny_src / "consolidated.safetensors"), "pt") as f:
            n = len(list(f.keys()))
        assert [(c.ok, c.expected, c.actual) for c in report.checks if c.name == "tensors"] == \
            [(True, f"{n} tensors", f"{n} tensors")]


def test_an_expected_pickle_is_refused_under_its_authority_naming_it_even_when_absent(tmp_path: Path) -> None:
    """(A pickle on disk is refused by the scan already; one the authority expects is refused by name.)"""
    from provision.stages.verify.authority import Authority
    from provision.stages.verify.verifier import verify_files

    report = verify_files(tmp_path, {"consolidated.00.pth": Authority(kind="manifest-sha256", size=2)})
    refused = [c for c in report.checks if c.name == "hostile"]
    assert [(c.file, c.ok, c.authority) for c in refused] == [("consolidated.00.pth", False, "manifest-sha256")]
    err = refused[0].error
    assert err is not None and err.context == {"path": "consolidated.00.pth"}
    assert err.message == ("Refusing consolidated.00.pth: it is a pickle format; provision reads safetensors only "
                           "and never opens it.")


def test_an_empty_file_of_a_v2_torrent_gets_the_merkle_check_a_rootless_one_does_not(tmp_path: Path) -> None:
    """BEP 52: an empty file has no pieces root, so its check is the empty one; a non-empty file
    whose authority carries no root has nothing to be checked against."""
    from provision.stages.verify.authority import Authority
    from provision.stages.verify.verifier import verify_files

    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "data.txt").write_bytes(b"abc")
    report = verify_files(tmp_path, {"empty.txt": Authority(kind="torrent-v2-merkle", size=0),
                                     "data.txt": Authority(kind="torrent-v2-merkle", size=3)})
    merkle = [(c.file, c.ok) for c in report.checks if c.name == "torrent-v2-merkle"]
    assert merkle == [("empty.txt", True)]


def test_a_missing_expected_file_says_what_the_authority_expects_and_to_fetch_it_again(tmp_path: Path) -> None:
    from provision.stages.verify.authority import Authority
    from provision.stages.verify.verifier import verify_files

    report = verify_files(tmp_path, {"params.json": Authority(kind="manifest-sha256", size=1234)})
    missing = [c for c in report.checks if c.name == "present"]
    assert [(c.file, c.ok, c.expected, c.actual) for c in missing] == [("params.json", False, "file", "missing")]
    err = missing[0].error
    assert err is not None
    assert err.message == "params.json is missing; the manifest-sha256 authority expects a file of 1,234 bytes."
    assert err.hint == "Fetch it again."
    assert err.context == {"path": "params.json", "authority": "manifest-sha256"}


def test_a_read_error_and_a_file_that_changed_size_while_hashed_are_failed_checks(tmp_path: Path) -> None:
    """What the hashing pass found, judged: a read error, and fewer bytes read than the file had
    when it was admitted (something wrote it meanwhile). The hashing results are given here
    (a fault the pass would meet), not produced by racing a writer."""
    from provision.errors import VerifyError
    from provision.stages.verify.authority import Authority
    from provision.stages.verify.parallel import FileWork
    from provision.stages.verify.report import FileReport
    from provision.stages.verify.verifier import _content_checks

    auth = Authority(kind="hub-lfs-sha256", size=10)
    boom = VerifyError("Cannot read w.bin: Input/output error.", path="w.bin")
    w = FileWork(rel="w.bin", path=tmp_path / "w.bin", size=10, auth=auth, want_sha256=False, read_bytes=7,
                 error=boom)
    checks = _content_checks(w, FileReport(path="w.bin", status="ok"), {})
    assert checks[0] == Check("read", "w.bin", False, "hub-lfs-sha256", message=boom.message, error=boom)
    size = checks[1]
    assert (size.name, size.file, size.ok, size.authority, size.expected, size.actual) == \
        ("size", "w.bin", False, "hub-lfs-sha256", 10, 7)
    assert size.message == "w.bin changed size while it was verified (10 -> 7 bytes)."
    assert size.error is not None and size.error.hint == "Run verify again when nothing writes it."


def test_each_hostile_entry_is_a_failed_check_saying_why_and_what_to_do(tmp_path: Path) -> None:
    import socket

    from provision.errors import HostileContentError
    from provision.stages.verify.scan import hostile_check

    root = tmp_path / "m"
    root.mkdir()
    secret = tmp_path / "secret.txt"  # outside the model folder
    secret.write_text("s")
    out = os.path.realpath(secret)
    (root / "consolidated.00.pth").write_bytes(b"\x80\x02")
    (root / "out.json").symlink_to(secret)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "s.sock"))  # a special file
    (root / "w.safetensors").write_bytes(b"x")
    try:
        entries = {e.rel: e for e in scan(root)}
    finally:
        sock.close()
    assert entries["w.safetensors"] == Entry("w.safetensors", root / "w.safetensors", "file", size=1)
    assert hostile_check(entries["w.safetensors"]) is None
    want = {
        "consolidated.00.pth": ("pickle", "Refusing consolidated.00.pth: it is a pickle format (.pth), which can run "
                                "code when loaded; provision reads safetensors only and never opens it.",
                                "Delete it, or fetch the safetensors release instead.",
                                {"path": "consolidated.00.pth"}),
        "out.json": (f"symlink -> {out}", f"Refusing out.json: it is a symlink that leaves the model folder "
                     f"(to {out}).", "Replace it with the real file, or fetch the folder again.",
                     {"path": "out.json", "target": out}),
        "s.sock": ("special", "Refusing s.sock: not a regular file (a FIFO, device, socket or dangling link).",
                   "Remove it.", {"path": "s.sock"}),
    }
    for rel, (actual, message, hint, context) in want.items():
        c = hostile_check(entries[rel])
        assert c is not None and (c.name, c.file, c.ok, c.actual, c.message) == ("hostile", rel, False, actual,
                                                                                 message), rel
        assert isinstance(c.error, HostileContentError)
        assert (c.error.hint, c.error.context) == (hint, context), rel


def test_sizes_are_judged_under_their_authority_and_a_wrong_hash_fails_the_file(tmp_path: Path) -> None:
    import hashlib

    from provision.errors import UsageError
    from provision.stages.verify.authority import Authority
    from provision.stages.verify.verifier import verify_files

    (tmp_path / "short.dat").write_bytes(b"ab")
    (tmp_path / "right.dat").write_bytes(b"abc")
    (tmp_path / "other.dat").write_bytes(b"abc")
    report = verify_files(tmp_path, {
        "short.dat": Authority(kind="manifest-sha256", size=3),
        "right.dat": Authority(kind="manifest-sha256", size=3, sha256=hashlib.sha256(b"abc").hexdigest()),
        "other.dat": Authority(kind="manifest-sha256", size=3, sha256=hashlib.sha256(b"abd").hexdigest()),
    })
    sizes = {c.file: c for c in report.checks if c.name == "size"}
    assert sizes["right.dat"] == Check("size", "right.dat", True, "manifest-sha256", 3, 3)
    assert sizes["short.dat"].error is not None
    assert sizes["short.dat"].error.hint == ("The file is truncated or a different version; delete it and fetch "
                                             "it again.")
    assert {f.path: f.status for f in report.files} == {"short.dat": "failed", "right.dat": "ok",
                                                        "other.dat": "failed"}
    with pytest.raises(UsageError) as ei:
        verify_files(tmp_path / "right.dat", {})
    assert ei.value.hint == "Pass the folder that holds the model files."
    assert ei.value.context == {"path": str(tmp_path / "right.dat")}


def test_verify_files_checks_params_json_unless_told_not_to(tiny_src: Path) -> None:
    from provision.stages.verify.authority import Authority
    from provision.stages.verify.verifier import verify_files

    expected = {"params.json": Authority(kind="none"), "consolidated.safetensors": Authority(kind="none")}
    assert any(c.name == "params" for c in verify_files(tiny_src, expected).checks)
    assert not any(c.name == "params" for c in verify_files(tiny_src, expected, check_params=False).checks)
