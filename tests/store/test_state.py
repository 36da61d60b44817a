"""The per-model state file: recording stages, validity by size/mtime/inode, corruption, cascade."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from provision.layout import Layout
from provision.store.state import STATE_SCHEMA_VERSION, State, load_state, save_state, shared_file_mode
from provision.version import __version__


def _model(tmp_path: Path) -> tuple[Path, Path]:
    lay = Layout(tmp_path / "home")
    orig = lay.original("tiny")
    orig.mkdir(parents=True)
    (orig / "a.safetensors").write_bytes(b"a" * 100)
    (orig / "params.json").write_text('{"dim": 8}')
    return lay.state_file("tiny"), orig


def _recorded(tmp_path: Path) -> tuple[State, Path, Path]:
    sf, orig = _model(tmp_path)
    st = load_state(sf)
    st.model = "tiny"
    st.record_stage("fetch", files={"a.safetensors": orig / "a.safetensors", "params.json": orig / "params.json"},
                    facts={"source": "torrent", "bytes": 110}, sha256={"a.safetensors": "ab" * 32})
    save_state(st, sf)
    return load_state(sf), sf, orig


def test_recorded_stage_is_valid_after_a_round_trip(tmp_path: Path) -> None:
    st, _sf, _orig = _recorded(tmp_path)
    assert st.warnings == []
    assert st.stage_valid("fetch")
    rec = st.get("fetch")
    assert rec is not None and rec.facts == {"source": "torrent", "bytes": 110}
    assert rec.files["a.safetensors"].sha256 == "ab" * 32
    assert rec.files["params.json"].sha256 is None
    assert rec.files["a.safetensors"].size == 100
    assert not st.stage_valid("verify")  # never recorded


def test_state_file_carries_schema_tool_version_and_relative_paths(tmp_path: Path) -> None:
    _st, sf, _orig = _recorded(tmp_path)
    doc = json.loads(sf.read_text())
    assert doc["schema_version"] == STATE_SCHEMA_VERSION
    assert doc["tool_version"] == __version__ and doc["tool"] == "provision"
    assert doc["model"] == "tiny"
    f = doc["stages"]["fetch"]["files"]["a.safetensors"]
    assert f["path"] == "original/a.safetensors"
    assert set(f) == {"path", "size", "mtime_ns", "inode", "sha256"}
    assert [p.name for p in sf.parent.iterdir() if p.name.startswith(".provision-tmp-")] == []


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# A new file's mode is 0o666 with the umask's bits cleared; the state file then gets 0o440 added
# (owner and group may always read it, so a shared home stays usable under a private umask):
#   umask 022: 0o666 & ~0o022 = 0o644, | 0o440 -> 0o644 (the usual default)
#   umask 002: 0o666 & ~0o002 = 0o664, | 0o440 -> 0o664 (the advice for a shared home: group-writable)
#   umask 027: 0o666 & ~0o027 = 0o640, | 0o440 -> 0o640
#   umask 077: 0o666 & ~0o077 = 0o600, | 0o440 -> 0o640 (group-readable even so)
@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o027, 0o640), (0o077, 0o640)])
def test_state_file_mode_follows_the_umask_and_stays_group_readable(tmp_path: Path, mask: int, mode: int) -> None:
    with umask(mask):
        assert shared_file_mode() == mode
        _st, sf, _orig = _recorded(tmp_path)
    assert stat.S_IMODE(sf.stat().st_mode) == mode


def test_files_outside_the_model_folder_are_stored_absolute(tmp_path: Path) -> None:
    sf, _ = _model(tmp_path)
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(b"x")
    st = State()
    st.record_stage("verify", files=[outside])
    save_state(st, sf)
    doc = json.loads(sf.read_text())
    assert doc["stages"]["verify"]["files"][str(outside)]["path"] == str(outside.absolute())
    assert load_state(sf).stage_valid("verify")


def test_touching_a_file_invalidates_the_stage(tmp_path: Path) -> None:
    st, _sf, orig = _recorded(tmp_path)
    p = orig / "params.json"
    s0 = p.stat()
    os.utime(p, ns=(s0.st_atime_ns, s0.st_mtime_ns + 1_000_000_000))
    chk = st.check("fetch")
    assert not chk.ok and any("modified" in r for r in chk.reasons)


def test_replacing_a_file_with_identical_bytes_and_mtime_invalidates_by_inode(tmp_path: Path) -> None:
    st, _sf, orig = _recorded(tmp_path)
    p = orig / "a.safetensors"
    s0 = p.stat()
    new = orig / "a.new"
    new.write_bytes(p.read_bytes())
    keep = orig / "keep-old-inode-alive"  # so the filesystem cannot hand the same inode back
    os.link(p, keep)
    os.replace(new, p)
    os.utime(p, ns=(s0.st_atime_ns, s0.st_mtime_ns))
    assert p.stat().st_size == s0.st_size and p.stat().st_mtime_ns == s0.st_mtime_ns
    chk = st.check("fetch")
    assert not chk.ok and any("replaced" in r for r in chk.reasons)


def test_size_change_and_deletion_invalidate_the_stage(tmp_path: Path) -> None:
    st, _sf, orig = _recorded(tmp_path)
    p = orig / "a.safetensors"
    s0 = p.stat()
    with open(p, "ab") as fh:
        fh.write(b"!")
    os.utime(p, ns=(s0.st_atime_ns, s0.st_mtime_ns))
    assert any("changed size" in r for r in st.check("fetch").reasons)
    p.unlink()
    assert any("missing" in r for r in st.check("fetch").reasons)
    assert not st.stage_valid("fetch")


def test_moving_the_model_folder_keeps_stages_valid(tmp_path: Path) -> None:
    _st, sf, _orig = _recorded(tmp_path)
    moved = tmp_path / "moved"
    os.rename(sf.parent, moved)
    assert load_state(moved / "state.json").stage_valid("fetch")


def test_missing_state_file_is_an_empty_state_without_warning(tmp_path: Path) -> None:
    st = load_state(tmp_path / "none" / "state.json")
    assert st.stages == {} and st.warnings == []


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        (b"{not json", "corrupt"),
        (b"\xff\xfe\x00garbage", "corrupt"),
        (b"[1, 2]", "no schema_version"),
        (json.dumps({"schema_version": 999, "kind": "provision-state", "stages": {}}).encode(), "schema 999"),
        (json.dumps({"schema_version": 1, "kind": "something-else", "stages": {}}).encode(), "malformed"),
        (json.dumps({"schema_version": 1, "kind": "provision-state", "stages": []}).encode(), "malformed"),
        (json.dumps({"schema_version": 1, "kind": "provision-state",
                     "stages": {"fetch": {"files": {"a": {"path": "a", "size": "big"}}}}}).encode(), "malformed"),
        (json.dumps({"schema_version": 1, "kind": "provision-state",
                     "stages": {"teleport": {"files": {}}}}).encode(), "malformed"),
        (json.dumps({"schema_version": True, "kind": "provision-state", "stages": {}}).encode(), "no schema_version"),
    ],
)
def test_unusable_state_file_loads_empty_with_a_warning(tmp_path: Path, content: bytes, expect: str) -> None:
    sf = tmp_path / "state.json"
    sf.write_bytes(content)
    st = load_state(sf)
    assert st.stages == {}
    assert len(st.warnings) == 1 and expect in st.warnings[0] and str(sf) in st.warnings[0]
    assert "\n" not in st.warnings[0]


def test_saving_over_a_corrupt_state_file_repairs_it(tmp_path: Path) -> None:
    sf, orig = _model(tmp_path)
    sf.write_text("garbage")
    st = load_state(sf)
    st.record_stage("fetch", files=[orig / "params.json"])
    save_state(st, sf)
    again = load_state(sf)
    assert again.warnings == [] and again.stage_valid("fetch")


def test_invalidate_drops_the_stage_and_every_later_one(tmp_path: Path) -> None:
    _sf, orig = _model(tmp_path)
    st = State()
    for s in ("plan", "fetch", "verify", "convert:fp8", "convert:bf16", "smoke:fp8", "smoke:bf16", "smoke"):
        st.record_stage(s, files=[orig / "params.json"])
    assert sorted(st.invalidate("convert:fp8")) == ["convert:fp8", "smoke", "smoke:fp8"]
    assert set(st.stages) == {"plan", "fetch", "verify", "convert:bf16", "smoke:bf16"}
    assert sorted(st.invalidate("fetch")) == ["convert:bf16", "fetch", "smoke:bf16", "verify"]
    assert set(st.stages) == {"plan"}


def test_invalidate_unqualified_convert_drops_every_profile(tmp_path: Path) -> None:
    st = State()
    for s in ("verify", "convert:fp8", "convert:bf16", "smoke:fp8"):
        st.record_stage(s)
    assert sorted(st.invalidate("convert")) == ["convert:bf16", "convert:fp8", "smoke:fp8"]
    assert set(st.stages) == {"verify"}


@pytest.mark.parametrize("bad", ["teleport", "convert:", "", "Fetch"])
def test_unknown_stage_names_are_refused(bad: str) -> None:
    st = State()
    with pytest.raises(ValueError, match="Unknown stage"):
        st.record_stage(bad)
    with pytest.raises(ValueError):
        st.stage_valid(bad)


def test_recording_a_missing_file_raises_and_leaves_the_state_unchanged(tmp_path: Path) -> None:
    st = State()
    with pytest.raises(FileNotFoundError):
        st.record_stage("fetch", files=[tmp_path / "nope"])
    assert st.stages == {}


def test_stage_without_files_is_valid_once_recorded() -> None:
    st = State()
    st.record_stage("smoke", facts={"tokens": 5})
    assert st.stage_valid("smoke")
