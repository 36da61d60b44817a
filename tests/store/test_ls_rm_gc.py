"""`provision ls`, `rm` and `gc` on a fabricated home: what they show, remove and never touch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provision.errors import LockTimeoutError, UsageError
from provision.io.atomic import TMP_PREFIX
from provision.layout import Layout
from provision.store.garbage import collect_garbage
from provision.store.inventory import list_models
from provision.store.lock import ModelLock, read_lock
from provision.store.remove import remove_model
from provision.store.state import load_state, save_state
from tests.support.cli import cli_json

IH_A = "a1" * 20  # infohash of model "alpha"'s torrent
IH_ORPHAN = "0f" * 20
IH_V2_ORPHAN = "e3" * 32


def make_model(home: Path, name: str, *, profiles: tuple[str, ...] = ("fp8-hf",), infohash: str | None = None,
               staging: bool = False) -> Path:
    lay = Layout(home)
    orig = lay.original(name)
    orig.mkdir(parents=True)
    (orig / "consolidated.safetensors").write_bytes(b"w" * 4096)
    (orig / "params.json").write_text('{"dim": 8}')
    st = load_state(lay.state_file(name))
    st.model = name
    st.record_stage("fetch", files={"consolidated.safetensors": orig / "consolidated.safetensors",
                                    "params.json": orig / "params.json"},
                    facts={"btih": infohash} if infohash else {})
    st.record_stage("verify", files=[orig / "consolidated.safetensors"])
    for p in profiles:
        pd = lay.profile(name, p)
        pd.mkdir()
        (pd / "model.safetensors").write_bytes(b"q" * 1024)
        st.record_stage(f"convert:{p}", files=[pd / "model.safetensors"], facts={"profile": p})
        st.record_stage(f"smoke:{p}", files=[pd / "model.safetensors"])
    save_state(st, lay.state_file(name))
    if staging:
        sd = lay.staging(name)
        sd.mkdir(parents=True)
        (sd / "consolidated.safetensors").write_bytes(b"p" * 2048)
    return lay.model_dir(name)


def snapshot(root: Path) -> set[str]:
    out = set()
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        for n in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            out.add(os.path.relpath(os.path.join(dirpath, n), root))
    return out


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_dead_lock(path: Path) -> None:
    import socket

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": "provision-lock", "host": socket.gethostname(), "pid": dead_pid(),
                                "started": time.time() - 100, "token": "d" * 32}))


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


# -- ls -------------------------------------------------------------------------------------
def test_ls_lists_models_sizes_profiles_stages_and_locks(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_model(home, "alpha", profiles=("fp8-hf", "bf16-mistral"), staging=True)
    make_model(home, "beta", profiles=())
    with ModelLock(Layout(home).lock_file("beta")):
        code, doc, _ = cli_json(capsys, "ls", "--home", str(home))
    assert code == 0 and doc["ok"] and doc["command"] == "ls"
    by = {m["name"]: m for m in doc["models"]}
    assert set(by) == {"alpha", "beta"}
    a = by["alpha"]
    assert a["original_bytes"] == 4096 + len('{"dim": 8}')
    assert a["profiles"] == [{"profile": "bf16-mistral", "bytes": 1024}, {"profile": "fp8-hf", "bytes": 1024}]
    assert a["staging_bytes"] == 2048
    assert {s["stage"]: s["valid"] for s in a["stages"]} == {
        "fetch": True, "verify": True, "convert:fp8-hf": True, "smoke:fp8-hf": True,
        "convert:bf16-mistral": True, "smoke:bf16-mistral": True}
    assert a["locked"] is False and by["beta"]["locked"] is True
    assert by["beta"]["lock"]["holder"]["pid"] == os.getpid()


def test_ls_shows_a_stage_whose_files_changed_as_invalid(home: Path) -> None:
    mdir = make_model(home, "alpha")
    with open(mdir / "original" / "params.json", "a") as fh:
        fh.write(" ")
    m = list_models(home)[0]
    stages = {s.stage: s for s in m.stages}
    assert not stages["fetch"].valid and "changed size" in stages["fetch"].reasons[0]
    assert stages["verify"].valid


def test_ls_on_an_empty_or_missing_home_lists_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, _ = cli_json(capsys, "ls", "--home", str(tmp_path / "nothing-here"))
    assert code == 0 and doc["models"] == []
    assert not (tmp_path / "nothing-here").exists()


def test_ls_warns_about_a_corrupt_state_file_and_still_lists(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mdir = make_model(home, "alpha")
    (mdir / "state.json").write_text("{oops")
    code, doc, _ = cli_json(capsys, "ls", "--home", str(home))
    assert code == 0 and doc["models"][0]["stages"] == []
    assert "corrupt" in doc["models"][0]["warnings"][0]


# -- rm -------------------------------------------------------------------------------------
def test_rm_removes_the_model_and_its_staging_and_nothing_else(home: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    make_model(home, "alpha", staging=True)
    make_model(home, "beta", staging=True)
    before = snapshot(home)
    code, doc, _ = cli_json(capsys, "rm", "alpha", "--yes", "--home", str(home))
    assert code == 0 and doc["ok"]
    assert doc["bytes_freed"] > 0
    after = snapshot(home)
    assert after == {p for p in before if not p.startswith(("models/alpha/", "staging/alpha/"))}
    assert not (home / "models" / "alpha").exists() and not (home / "staging" / "alpha").exists()


def test_rm_refuses_a_locked_model_with_exit_6_and_removes_nothing(home: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    make_model(home, "alpha", staging=True)
    with ModelLock(Layout(home).lock_file("alpha")):
        before = snapshot(home)
        code, doc, _ = cli_json(capsys, "rm", "alpha", "--yes", "--home", str(home))
        assert code == 6 and not doc["ok"] and doc["error"]["kind"] == "lock"
        assert f"pid {os.getpid()}" in doc["error"]["message"] and "not removing" in doc["error"]["message"]
        assert snapshot(home) == before
        with pytest.raises(LockTimeoutError):
            remove_model(home, "alpha", profile="fp8-hf")
        assert snapshot(home) == before


def test_rm_takes_over_a_dead_lock(home: Path) -> None:
    make_model(home, "alpha")
    write_dead_lock(Layout(home).lock_file("alpha"))
    res = remove_model(home, "alpha")
    assert any(r.kind == "dead-lock" for r in res.removed)
    assert not (home / "models" / "alpha").exists()


def test_rm_without_yes_and_without_a_terminal_refuses_with_exit_2(home: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    make_model(home, "alpha")
    before = snapshot(home)
    code, doc, _ = cli_json(capsys, "rm", "alpha", "--home", str(home))
    assert code == 2 and "--yes" in doc["error"]["message"]
    assert snapshot(home) == before


def test_rm_of_an_unknown_model_is_a_usage_error(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_model(home, "alpha")
    code, doc, _ = cli_json(capsys, "rm", "nope", "--yes", "--home", str(home))
    assert code == 2 and "No model named 'nope'" in doc["error"]["message"] and "alpha" in doc["error"]["message"]


def test_rm_profile_removes_only_that_profile_and_its_stages(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mdir = make_model(home, "alpha", profiles=("fp8-hf", "bf16-mistral"))
    code, doc, _ = cli_json(capsys, "rm", "alpha", "--profile", "fp8-hf", "--yes", "--home", str(home))
    assert code == 0 and doc["profile"] == "fp8-hf"
    assert sorted(doc["dropped_stages"]) == ["convert:fp8-hf", "smoke:fp8-hf"]
    assert not (mdir / "fp8-hf").exists() and (mdir / "bf16-mistral" / "model.safetensors").exists()
    st = load_state(mdir / "state.json")
    assert set(st.stages) == {"fetch", "verify", "convert:bf16-mistral", "smoke:bf16-mistral"}
    assert all(st.stage_valid(s) for s in st.stages)
    assert not (mdir / ".lock").exists()


@pytest.mark.parametrize(("profile", "message"), [("original", "Refusing to remove the original"),
                                                  ("int4", "has no profile 'int4'")])
def test_rm_profile_refuses_the_original_and_unknown_profiles(home: Path, profile: str, message: str) -> None:
    make_model(home, "alpha")
    before = snapshot(home)
    with pytest.raises(UsageError, match=message):
        remove_model(home, "alpha", profile=profile)
    assert snapshot(home) == before


def test_rm_never_follows_symlinks_out_of_the_home(home: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "dir" / "precious").write_text("keep me")
    (outside / "file").write_text("keep me too")
    mdir = make_model(home, "alpha")
    os.symlink(outside / "dir", mdir / "original" / "linked-dir")
    os.symlink(outside / "file", mdir / "fp8-hf" / "linked-file")
    os.symlink(outside, mdir / "linked-profile")
    remove_model(home, "alpha")
    assert not mdir.exists()
    assert (outside / "dir" / "precious").read_text() == "keep me"
    assert (outside / "file").read_text() == "keep me too"


def test_rm_of_a_symlinked_model_removes_only_the_link(home: Path, tmp_path: Path) -> None:
    elsewhere = make_model(tmp_path / "other-disk", "alpha")
    (home / "models").mkdir()
    os.symlink(elsewhere, home / "models" / "alpha")
    res = remove_model(home, "alpha")
    assert res.to_dict()["removed"] == [{"path": str(home / "models" / "alpha"), "kind": "symlink", "bytes": 0}]
    assert not (home / "models" / "alpha").is_symlink()
    assert (elsewhere / "original" / "params.json").exists()


# -- gc -------------------------------------------------------------------------------------
def fabricate_store(home: Path, tmp_path: Path) -> tuple[set[str], ModelLock]:
    """A home with garbage and non-garbage; returns the paths gc must remove, and a held lock."""
    lay = Layout(home)
    old = time.time() - 7200
    # alpha: finished model whose torrent resume data stays; garbage: staging, tmp and partial files
    a = make_model(home, "alpha", infohash=IH_A, staging=True)
    (a / "original" / f"{TMP_PREFIX}params.json.x1").write_bytes(b"t" * 10)
    (a / "fp8-hf" / "model.safetensors.incomplete").write_bytes(b"i" * 100)
    (a / ".lock.break").write_text("")
    os.utime(a / ".lock.break", (old, old))
    # beta: a live run holds it: its staging and tmp files stay
    b = make_model(home, "beta", staging=True)
    (b / "original" / f"{TMP_PREFIX}x.y").write_text("being written")
    held = ModelLock(lay.lock_file("beta"), heartbeat=None).acquire()
    # gamma: its run died: dead lock, staging
    make_model(home, "gamma", staging=True)
    write_dead_lock(lay.lock_file("gamma"))
    # delta: only a staging folder, holding a symlink out of the home
    (lay.staging("delta")).mkdir(parents=True)
    outside = tmp_path / "outside-precious"
    outside.write_text("keep")
    os.symlink(outside, lay.staging("delta") / "link")
    # resume data: alpha's stays, orphans go (old ones only: a live run could own a fresh one)
    lay.torrents.mkdir()
    for f in (f"{IH_A}.resume", f"{IH_A}.torrent", f"{IH_ORPHAN}.resume", f"{IH_V2_ORPHAN}.torrent",
              "notes.txt", f"{'7c' * 20}.resume"):
        (lay.torrents / f).write_bytes(b"r" * 64)
    for f in (f"{IH_ORPHAN}.resume", f"{IH_V2_ORPHAN}.torrent", "notes.txt"):
        os.utime(lay.torrents / f, (old, old))
    # manifests: alpha's manifest stays; an old tmp goes, a fresh tmp stays (a run is live)
    lay.manifests.mkdir()
    (lay.manifests / "alpha.toml").write_text(f'name = "alpha"\nbtih = "{IH_A}"\n')
    (lay.manifests / f"{TMP_PREFIX}old.toml.1").write_text("x")
    os.utime(lay.manifests / f"{TMP_PREFIX}old.toml.1", (old, old))
    (lay.manifests / f"{TMP_PREFIX}new.toml.2").write_text("x")
    expected = {
        "staging/alpha/consolidated.safetensors",
        f"models/alpha/original/{TMP_PREFIX}params.json.x1",
        "models/alpha/fp8-hf/model.safetensors.incomplete",
        "models/alpha/.lock.break",
        "models/gamma/.lock",
        "staging/gamma/consolidated.safetensors",
        "staging/delta/link",
        f"torrents/{IH_ORPHAN}.resume",
        f"torrents/{IH_V2_ORPHAN}.torrent",
        f"manifests/{TMP_PREFIX}old.toml.1",
    }
    return expected, held


def test_gc_dry_run_reports_the_garbage_and_removes_nothing(home: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    expected, held = fabricate_store(home, tmp_path)
    try:
        before = snapshot(home)
        code, doc, _ = cli_json(capsys, "gc", "--dry-run", "--partials", "--home", str(home))
        assert code == 0 and doc["dry_run"] is True
        assert snapshot(home) == before
        assert {os.path.relpath(i["path"], home) for i in doc["removed"]} >= {
            p for p in expected if not p.startswith("staging/")} | {"staging/alpha", "staging/gamma",
                                                                     "staging/delta"}
        assert doc["bytes_freed"] > 0
    finally:
        held.release()


def test_gc_removes_what_it_should_and_nothing_else(home: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    expected, held = fabricate_store(home, tmp_path)
    try:
        before = snapshot(home)
        assert expected <= before
        code, doc, _ = cli_json(capsys, "gc", "--partials", "--home", str(home))
        assert code == 0 and doc["dry_run"] is False
        after = snapshot(home)
        assert after == before - expected
        assert (tmp_path / "outside-precious").read_text() == "keep"
        assert not (home / "staging" / "alpha").exists() and not (home / "staging" / "delta").exists()
        assert not (home / "models" / "delta").exists()  # gc's own lock folder is not left behind
        info, _ = read_lock(Layout(home).lock_file("beta"))
        assert info is not None and held.info is not None and info.token == held.info.token
        kinds = {i["kind"] for i in doc["removed"]}
        assert kinds == {"staging", "tmp", "partial", "breaker", "dead-lock", "resume"}
        kept = {os.path.relpath(i["path"], home): i["reason"] for i in doc["kept"]}
        assert kept["models/beta/.lock"].startswith("live: held by")
        assert "in use" in kept["staging/beta"]
        assert "running fetch" in kept[f"torrents/{'7c' * 20}.resume"]
        assert doc["bytes_freed"] == sum(i["bytes"] for i in doc["removed"]) > 0
    finally:
        held.release()
    # with the run gone, its leftovers are garbage too; everything still vouched for stays
    res = collect_garbage(home, partials=True)
    removed = {os.path.relpath(i.path, home) for i in res.removed}
    assert removed == {"staging/beta", f"models/beta/original/{TMP_PREFIX}x.y", f"torrents/{'7c' * 20}.resume",
                       f"manifests/{TMP_PREFIX}new.toml.2"}
    for name in ("alpha", "beta", "gamma"):
        st = load_state(home / "models" / name / "state.json")
        assert st.stages and all(st.stage_valid(s) for s in st.stages)
    assert collect_garbage(home, partials=True).removed == []


def test_gc_keeps_resumable_staging_without_partials_and_says_why_each_item_goes(
        home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected, held = fabricate_store(home, tmp_path)
    held.release()
    lay = Layout(home)
    (lay.staging("epsilon") / "hub").mkdir(parents=True)  # an empty staging folder: nothing to resume
    code, doc, _ = cli_json(capsys, "gc", "--dry-run", "--home", str(home))
    assert code == 0
    would = {os.path.relpath(i["path"], home): i for i in doc["removed"]}
    kept = {os.path.relpath(i["path"], home): i for i in doc["kept"]}
    for name in ("alpha", "beta", "gamma", "delta"):  # staging holding files: resumable, kept
        assert f"staging/{name}" not in would
        assert kept[f"staging/{name}"]["kind"] == "staging"
        assert "gc --partials" in kept[f"staging/{name}"]["reason"]
    assert would["staging/epsilon"]["reason"].startswith("empty staging folder")
    assert "dead lock" in would["models/gamma/.lock"]["reason"]
    assert "no model" in would[f"torrents/{IH_ORPHAN}.resume"]["reason"]
    assert all(i["reason"] for i in doc["removed"])
    before = snapshot(home)
    code, doc, _ = cli_json(capsys, "gc", "--home", str(home))
    assert code == 0
    # everything but the partials goes (beta's leftovers too: its run is gone); every staged file stays
    assert before - snapshot(home) == {p for p in expected if not p.startswith("staging/")} | {
        f"models/beta/original/{TMP_PREFIX}x.y", f"torrents/{'7c' * 20}.resume", f"manifests/{TMP_PREFIX}new.toml.2"}
    assert not lay.staging("epsilon").exists()


def test_gc_on_a_missing_home_does_nothing(tmp_path: Path) -> None:
    res = collect_garbage(tmp_path / "none")
    assert res.removed == [] and res.kept == [] and not (tmp_path / "none").exists()


def test_gc_does_not_clean_inside_a_model_folder_that_is_a_symlink_out_of_the_home(home: Path,
                                                                                   tmp_path: Path) -> None:
    elsewhere = make_model(tmp_path / "other-disk", "alpha")
    tmp_outside = elsewhere / "original" / f"{TMP_PREFIX}theirs"
    tmp_outside.write_text("not ours to judge")
    (home / "models").mkdir()
    os.symlink(elsewhere, home / "models" / "alpha")
    (home / "staging" / "alpha").mkdir(parents=True)
    (home / "staging" / "alpha" / "part").write_bytes(b"p" * 10)
    res = collect_garbage(home, partials=True)
    assert {os.path.relpath(i.path, home) for i in res.removed} == {"staging/alpha"}
    assert tmp_outside.exists() and (home / "models" / "alpha").is_symlink()
    assert not (elsewhere / ".lock").exists()
