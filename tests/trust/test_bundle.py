"""Air-gapped bundles: export from a store that ran the tiny model, import offline into a fresh
store, and refuse every kind of bad bundle with exit 5 and nothing in the store."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from provision.formats.report_schema import validate_report
from provision.testing.torrent_fixtures import stop_process
from tests.support.cli import cli_json, provision_home
from tests.support.files import data_offset, flip_byte

MODEL = "tiny-pixtral"
PROFILE = "bf16-mistral"  # what --target cpu converts the tiny model to (--scheme auto on the CPU)
ORIGINAL_FILES = ("consolidated.safetensors", "params.json", "tekken.json")  # the tiny model's manifest


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ran_store(tiny_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store that ran the tiny model (adopted, verified, converted for the CPU)."""
    from provision import api

    home = tmp_path_factory.mktemp("ran") / "home"
    api.run(str(tiny_src / "manifest.toml"), home=home, adopt=tiny_src, target="cpu", skip_smoke=True)
    return home


@pytest.fixture(scope="module")
def bundle_dir(ran_store: Path, tiny_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle of the tiny model's original and its bf16-mistral profile (read-only: copy to change)."""
    from provision import api

    out = tmp_path_factory.mktemp("bundle") / "b"
    api.bundle_export(MODEL, out, home=ran_store, profile=PROFILE, manifest=tiny_src / "manifest.toml")
    return out


@pytest.fixture()
def bundle_copy(bundle_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle_dir, dst)
    return dst


def _index(b: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((b / "bundle.json").read_text())
    return doc


def _write_index(b: Path, doc: dict[str, Any]) -> None:
    (b / "bundle.json").write_text(json.dumps(doc))


def _nothing_in_store(home: Path) -> bool:
    models = home / "models"
    staged = [p for p in (home / "staging").rglob("*") if p.is_file()] if (home / "staging").exists() else []
    return not (models / MODEL).exists() and not staged and not (home / "manifests" / f"{MODEL}.toml").exists()


def _import_fails_5(capsys: pytest.CaptureFixture[str], path: Path, match: str) -> None:
    rc, doc, err = cli_json(capsys, "bundle", "import", str(path))
    assert rc == 5, err
    msg = doc["error"]["message"]
    assert "\n" not in msg and match in msg, msg
    validate_report(doc, "bundle import")
    assert _nothing_in_store(provision_home())


def _tar(path: Path, members: list[tuple[str, bytes | None, bytes]]) -> None:
    """A tar of ``(name, data, type)`` members, written by hand (tarfile.REGTYPE, SYMTYPE, ...)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data, kind in members:
            ti = tarfile.TarInfo(name)
            ti.type = kind
            if kind == tarfile.SYMTYPE or kind == tarfile.LNKTYPE:
                ti.linkname = "/etc/passwd"
                tf.addfile(ti)
            else:
                ti.size = len(data or b"")
                tf.addfile(ti, io.BytesIO(data or b""))


def _bundle_members(b: Path) -> list[tuple[str, bytes | None, bytes]]:
    idx = _index(b)
    return [("bundle.json", (b / "bundle.json").read_bytes(), tarfile.REGTYPE),
            *((f["path"], (b / f["path"]).read_bytes(), tarfile.REGTYPE) for f in idx["files"])]


# -- round trips ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_an_imported_bundle_runs_offline_without_fetching_or_converting_and_passes_the_smoke_test(
        bundle_dir: Path, tiny_src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = provision_home()
    rc, doc, err = cli_json(capsys, "bundle", "import", str(bundle_dir))
    assert rc == 0, err
    validate_report(doc, "bundle import")
    assert doc["bundle"]["profiles"] == [PROFILE] and doc["bundle"]["files_reused"] == 0
    for name in ORIGINAL_FILES:  # the same bytes as the source the store ran from
        assert _sha(home / "models" / MODEL / "original" / name) == _sha(tiny_src / name)
    # HF_ENDPOINT is a dead port and BitTorrent is closed: any download would fail this run
    rc, run, err = cli_json(capsys, "run", str(tiny_src / "manifest.toml"), "--target", "cpu", "--offline",
                            "--network", "closed", "--device", "cpu")
    assert rc == 0, err
    stages = {s["stage"]: s for s in run["stages"]}
    assert [stages[s]["result"] for s in ("fetch", "verify", "convert", "smoke")] == ["skipped", "skipped",
                                                                                      "skipped", "ok"]
    assert stages["fetch"]["bytes"] == 0 and stages["smoke"]["details"]["passed"] is True
    assert run["vllm_command"].startswith(f"vllm serve {home / 'models' / MODEL / PROFILE} ")
    # the smoke test added its result to the profile's provenance.json: the next run still finds it all done
    rc, again, err = cli_json(capsys, "run", str(tiny_src / "manifest.toml"), "--target", "cpu", "--offline",
                              "--network", "closed", "--device", "cpu")
    assert rc == 0, err
    assert {s["stage"]: s["result"] for s in again["stages"]}["convert"] == "skipped"


def test_an_archive_bundle_imports_the_same_bytes_as_the_store_holds(
        ran_store: Path, tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.tar"
    rc, doc, err = cli_json(capsys, "bundle", "export", MODEL, str(out), "--archive", "--home", str(ran_store),
                            "--manifest", str(tiny_src / "manifest.toml"))
    assert rc == 0, err
    validate_report(doc, "bundle export")
    with tarfile.open(out) as tf:
        names = tf.getnames()
    assert names[0] == "bundle.json" and f"original/{ORIGINAL_FILES[0]}" in names
    assert not any(n.startswith(PROFILE) for n in names)  # no --profile: the original only
    assert not list((ran_store / "staging").glob(".provision-tmp-*"))  # the links the tar was written from are gone
    rc, doc, err = cli_json(capsys, "bundle", "import", str(out))
    assert rc == 0, err
    for name in ORIGINAL_FILES:
        assert _sha(provision_home() / "models" / MODEL / "original" / name) == _sha(tiny_src / name)


def test_the_python_api_exports_and_imports(ran_store: Path, tiny_src: Path, tmp_path: Path) -> None:
    from provision import api

    exp = api.bundle_export(MODEL, tmp_path / "b", home=ran_store, manifest=tiny_src / "manifest.toml")
    assert exp.original and exp.profiles == []
    imp = api.bundle_import(tmp_path / "b", home=tmp_path / "h")
    assert imp.files == len(ORIGINAL_FILES) + 2  # + the manifest lock and the torrent
    lock = (tmp_path / "h" / "manifests" / f"{MODEL}.toml").read_text()
    assert _sha(tiny_src / "params.json") in lock


def test_export_refuses_an_existing_out_with_exit_2(ran_store: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out.tar").write_bytes(b"keep")
    for args in ([str(tmp_path / "out")], [str(tmp_path / "out.tar"), "--archive"]):
        rc, doc, _ = cli_json(capsys, "bundle", "export", MODEL, *args, "--home", str(ran_store))
        assert rc == 2 and "exists" in doc["error"]["message"]
    assert (tmp_path / "out.tar").read_bytes() == b"keep" and not any((tmp_path / "out").iterdir())


def test_export_of_a_store_file_changed_since_verified_is_exit_5(
        tiny_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from provision import api

    home = tmp_path / "home"
    # adopted from a private copy: adoption may hard-link, and the flip below must not reach tiny_src
    api.run(str(tiny_copy / "manifest.toml"), home=home, adopt=tiny_copy, target="cpu", skip_convert=True,
            skip_smoke=True)
    w = home / "models" / MODEL / "original" / "consolidated.safetensors"
    st = os.stat(w)
    flip_byte(w, data_offset(w) + 10)
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only the bytes tell
    rc, doc, _ = cli_json(capsys, "bundle", "export", MODEL, str(tmp_path / "b"), "--home", str(home),
                          "--manifest", str(tiny_copy / "manifest.toml"))
    assert rc == 5 and "changed since it was verified" in doc["error"]["message"]
    assert not (tmp_path / "b").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".provision")]


# -- bad bundles: exit 5, one line, nothing in the store --------------------------------------------

def test_a_changed_byte_is_refused(bundle_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    w = bundle_copy / "original" / "consolidated.safetensors"
    flip_byte(w, data_offset(w) + 1000)
    _import_fails_5(capsys, bundle_copy, "original/consolidated.safetensors has sha256")


def test_a_missing_file_is_refused(bundle_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (bundle_copy / PROFILE / "params.json").unlink()
    _import_fails_5(capsys, bundle_copy, f"{PROFILE}/params.json is missing")


def test_an_extra_file_is_refused(bundle_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (bundle_copy / "original" / "extra.bin").write_bytes(b"x")
    _import_fails_5(capsys, bundle_copy, "original/extra.bin is not listed")


def test_a_symlink_in_a_bundle_folder_is_refused(bundle_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = bundle_copy / "original" / "params.json"
    p.unlink()
    p.symlink_to("/etc/hostname")
    _import_fails_5(capsys, bundle_copy, "symlink")


def test_a_path_with_dotdot_in_bundle_json_is_refused(bundle_copy: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    doc = _index(bundle_copy)
    doc["files"].append({"path": "original/../../escape", "size": 1, "sha256": "0" * 64})
    _write_index(bundle_copy, doc)
    _import_fails_5(capsys, bundle_copy, "'..'")
    assert not (tmp_path / "escape").exists()


def test_a_tar_member_with_dotdot_is_refused(bundle_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    t = tmp_path / "evil.tar"
    _tar(t, [*_bundle_members(bundle_dir)[:2], ("original/../../escape", b"x", tarfile.REGTYPE)])
    _import_fails_5(capsys, t, "'..'")
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize(("kind", "word"), [(tarfile.SYMTYPE, "symlink"), (tarfile.LNKTYPE, "hardlink"),
                                            (tarfile.CHRTYPE, "not a regular file")])
def test_a_link_or_device_tar_member_is_refused(bundle_dir: Path, tmp_path: Path, kind: bytes, word: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    t = tmp_path / "evil.tar"
    _tar(t, [*_bundle_members(bundle_dir)[:1], ("original/params.json", None, kind)])
    _import_fails_5(capsys, t, word)


def test_an_absolute_tar_member_is_refused(bundle_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    t = tmp_path / "evil.tar"
    _tar(t, [*_bundle_members(bundle_dir)[:1], (str(tmp_path / "abs"), b"x", tarfile.REGTYPE)])
    _import_fails_5(capsys, t, "absolute")
    assert not (tmp_path / "abs").exists()


def test_a_truncated_archive_is_refused(bundle_dir: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    t = tmp_path / "b.tar"
    _tar(t, _bundle_members(bundle_dir))
    with open(t, "r+b") as f:
        f.truncate(os.path.getsize(t) // 2)  # mid-way through the payload
    _import_fails_5(capsys, t, "truncated")


def test_a_manifest_lock_that_does_not_match_the_files_is_refused(bundle_copy: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    lock = bundle_copy / "manifest.lock.toml"
    real = _sha(bundle_copy / "original" / "params.json")
    lock.write_text(lock.read_text().replace(real, "ab" * 32))
    doc = _index(bundle_copy)  # bundle.json made consistent with the changed lock: only the record disagrees
    for f in doc["files"]:
        if f["path"] == "manifest.lock.toml":
            f["size"], f["sha256"] = lock.stat().st_size, _sha(lock)
    _write_index(bundle_copy, doc)
    _import_fails_5(capsys, bundle_copy, "original/params.json does not match the bundle's manifest lock")


def test_a_torrent_that_does_not_match_bundle_json_is_refused(bundle_copy: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    doc = _index(bundle_copy)
    doc["torrent"]["btih"] = "0" * 40
    _write_index(bundle_copy, doc)
    _import_fails_5(capsys, bundle_copy, "other infohashes")


def test_import_checks_every_file_against_the_torrent_pieces_and_reports_both_authorities(
        bundle_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from provision.stages.fetch.torrent.meta import info_hashes, load_torrent_info

    rc, doc, err = cli_json(capsys, "bundle", "import", str(bundle_dir))
    assert rc == 0, err
    validate_report(doc, "bundle import")
    auth = doc["bundle"]["authority"]
    idx = _index(bundle_dir)
    ti = load_torrent_info(bundle_dir / idx["torrent"]["path"])
    btih, btmh = info_hashes(ti.info_hashes())
    assert btmh is not None  # the export writes a hybrid torrent: v2 merkle roots vouch for every file
    assert auth == {"sha256": "bundle.json", "pieces": "torrent-v2-merkle", "torrent": idx["torrent"]["path"],
                    "btih": btih, "btmh": btmh,
                    "piece_checked_files": sum(1 for f in idx["files"]
                                               if f["path"] != idx["torrent"]["path"] and f["size"] > 0)}
    assert "pieces (torrent-v2-merkle" in err


def test_a_file_that_matches_bundle_json_but_not_the_torrent_pieces_is_refused(
        bundle_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the profile's provenance.json changed in one digit (same size, still a valid record naming the
    # same files) and bundle.json rewritten to match it: only the torrent's pieces can tell
    rel = f"{PROFILE}/provenance.json"
    p = bundle_copy / rel
    text = p.read_text()
    i = text.index('"created": "') + len('"created": "2')
    p.write_text(text[:i] + ("1" if text[i] != "1" else "3") + text[i + 1:])
    doc = _index(bundle_copy)
    for f in doc["files"]:
        if f["path"] == rel:
            f["sha256"] = _sha(p)
    _write_index(bundle_copy, doc)
    _import_fails_5(capsys, bundle_copy, f"Bundle file {rel} does not match the bundle torrent's pieces")


def test_a_malformed_bundle_json_is_refused(bundle_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _index(bundle_copy)
    doc["files"][0]["size"] = -1
    _write_index(bundle_copy, doc)
    _import_fails_5(capsys, bundle_copy, "bundle.json is malformed at $.files[0].size")


def test_an_existing_original_in_the_store_is_refused_with_exit_2(bundle_dir: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    original = provision_home() / "models" / MODEL / "original"
    original.mkdir(parents=True)
    (original / "params.json").write_text("{}")
    rc, doc, _ = cli_json(capsys, "bundle", "import", str(bundle_dir))
    assert rc == 2 and "already exists" in doc["error"]["message"]
    assert (original / "params.json").read_text() == "{}"


# -- resuming ----------------------------------------------------------------------------------------

_KILLED_AFTER_TWO = """
import sys, time
from pathlib import Path
import provision.stages.bundle.importing as imp
record = imp._Journal.record
done = []
def stop_after_two(self, staged, f):
    record(self, staged, f)
    done.append(f.path)
    if len(done) == 2:  # two files verified into staging: wait here to be killed
        Path(sys.argv[1]).write_text("\\n".join(done))
        time.sleep(600)
imp._Journal.record = stop_after_two
from provision.cli.main import main
main(sys.argv[2:])
"""


@pytest.mark.slow
def test_an_import_killed_mid_way_resumes_without_copying_verified_files_again(
        bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = provision_home()
    marker = tmp_path / "two-done"
    p = subprocess.Popen([sys.executable, "-c", _KILLED_AFTER_TWO, str(marker), "bundle", "import",
                          str(bundle_dir), "--home", str(home), "-q"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), p.stderr.read().decode() if p.poll() is not None and p.stderr else "no marker"
    assert stop_process(p, signal.SIGKILL) == -signal.SIGKILL
    if p.stderr:
        p.stderr.close()
    staged_paths = marker.read_text().splitlines()
    stage = home / "staging" / MODEL / "bundle"
    inodes = {rel: os.stat(stage / rel).st_ino for rel in staged_paths}
    assert not (home / "models" / MODEL / "original").exists()  # killed before anything was committed

    rc, doc, err = cli_json(capsys, "bundle", "import", str(bundle_dir))
    assert rc == 0, err
    total = sum((bundle_dir / f["path"]).stat().st_size for f in _index(bundle_dir)["files"])
    reused = sum((bundle_dir / rel).stat().st_size for rel in staged_paths)
    assert doc["bundle"]["files_reused"] == 2 and doc["bundle"]["bytes_copied"] == total - reused
    for rel in staged_paths:  # the very files staged before the kill, moved (not copied) into the store
        assert os.stat(home / "models" / MODEL / rel).st_ino == inodes[rel]
        assert _sha(home / "models" / MODEL / rel) == _sha(bundle_dir / rel)
    assert not stage.exists()


# -- provenance records and profile-only bundles -----------------------------------------------------

@pytest.fixture()
def store_with_record(tiny_src: Path, tmp_path: Path) -> Path:
    """A store that converted the tiny model, its profile holding a provenance.json."""
    from provision import api
    from provision.formats import provenance

    home = tmp_path / "src"
    api.run(str(tiny_src / "manifest.toml"), home=home, adopt=tiny_src, target="cpu", skip_smoke=True)
    folder = home / "models" / MODEL / PROFILE
    if not (folder / provenance.PROVENANCE_NAME).is_file():  # a run that does not write one yet
        provenance.write(folder, provenance.build(folder, source=provenance.SourceIdentity(manifest_name=MODEL),
                                                  source_files=[], recipe=None))
    return home


@pytest.mark.slow
def test_a_bundled_provenance_record_is_checked_against_the_bundled_files(
        store_with_record: Path, tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = tmp_path / "b"
    rc, _, err = cli_json(capsys, "bundle", "export", MODEL, str(b), "--profile", PROFILE, "--home",
                          str(store_with_record), "--manifest", str(tiny_src / "manifest.toml"))
    assert rc == 0, err
    rec = b / PROFILE / "provenance.json"
    assert rec.is_file()
    doc = json.loads(rec.read_text())
    for f in doc["files"]:  # a record vouching for other params.json bytes than the bundle carries
        if f["path"] == "params.json":
            f["sha256"] = hashlib.sha256(b"other bytes").hexdigest()
    rec.write_text(json.dumps(doc))
    idx = _index(b)  # bundle.json made consistent with the changed record: only the record disagrees
    for f in idx["files"]:
        if f["path"] == f"{PROFILE}/provenance.json":
            f["size"], f["sha256"] = rec.stat().st_size, _sha(rec)
    _write_index(b, idx)
    _import_fails_5(capsys, b, f"Bundle record {PROFILE}/provenance.json does not match")


@pytest.mark.slow
def test_a_profile_bundled_without_its_original_runs_offline_without_fetching_or_converting(
        ran_store: Path, tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = tmp_path / "b"
    rc, _, err = cli_json(capsys, "bundle", "export", MODEL, str(b), "--profile", PROFILE, "--no-original",
                          "--home", str(ran_store), "--manifest", str(tiny_src / "manifest.toml"))
    assert rc == 0, err
    assert not (b / "original").exists()
    assert _index(b)["original_params"] == json.loads((tiny_src / "params.json").read_text())
    rc, _, err = cli_json(capsys, "bundle", "import", str(b))
    assert rc == 0, err
    rc, run, err = cli_json(capsys, "run", str(tiny_src / "manifest.toml"), "--target", "cpu", "--offline",
                            "--network", "closed", "--device", "cpu")
    assert rc == 0, err
    stages = {s["stage"]: s["result"] for s in run["stages"]}
    assert [stages[s] for s in ("fetch", "verify", "convert", "smoke")] == ["skipped", "skipped", "skipped", "ok"]
    assert not (provision_home() / "models" / MODEL / "original").exists()


def test_an_import_while_a_run_holds_the_model_exits_6_and_stages_nothing(
        bundle_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from provision.store.lock import ModelLock

    home = provision_home()
    monkeypatch.setenv("PROVISION_LOCK_TIMEOUT", "0")  # one try: the holder below never lets go
    root = home / "models" / MODEL
    root.mkdir(parents=True)
    with ModelLock(root / ".lock", command="run"):
        rc, doc, _ = cli_json(capsys, "bundle", "import", str(bundle_dir))
    assert rc == 6 and "locked" in doc["error"]["message"]
    assert not (home / "staging" / MODEL).exists() and not (root / "original").exists()


def test_an_interrupted_archive_import_resumes_without_copying_verified_members_again(
        bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import provision.stages.bundle.importing as imp
    from provision import api
    from provision.errors import Interrupted

    t = tmp_path / "b.tar"
    _tar(t, _bundle_members(bundle_dir))
    home = tmp_path / "home"
    record = imp._Journal.record

    def interrupted_after_one(self: Any, staged: Path, f: Any) -> None:
        record(self, staged, f)
        raise Interrupted("Interrupted by SIGINT.")  # as Ctrl-C after the first verified member

    monkeypatch.setattr(imp._Journal, "record", interrupted_after_one)
    with pytest.raises(Interrupted):
        api.bundle_import(t, home=home)
    monkeypatch.setattr(imp._Journal, "record", record)
    first = _index(bundle_dir)["files"][0]["path"]  # tar order is bundle.json's order
    res = api.bundle_import(t, home=home)
    assert res.files_reused == 1
    assert res.bytes_copied == sum(f["size"] for f in _index(bundle_dir)["files"][1:])
    assert _sha(home / "models" / MODEL / first) == _sha(bundle_dir / first)


@pytest.mark.parametrize(("args", "word"), [(["no-such-model"], "not in the store"),
                                            ([MODEL, "--profile", "fp8-hf"], "no converted, unchanged profile"),
                                            ([MODEL, "--no-original"], "--no-original needs --profile")])
def test_export_of_what_the_store_does_not_have_is_exit_2(ran_store: Path, tmp_path: Path, args: list[str],
                                                         word: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc, _ = cli_json(capsys, "bundle", "export", args[0], str(tmp_path / "b"), *args[1:], "--home",
                          str(ran_store))
    assert rc == 2 and word in doc["error"]["message"]
    assert not (tmp_path / "b").exists()
