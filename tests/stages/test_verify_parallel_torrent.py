"""A torrent's info dictionary as the authority of files on disk: one big file is split into piece
ranges checked on several workers at once (no whole-file sha256 pass), a flipped byte is named by
its piece, the report says which authority and which torrent vouched, and ``verify --manifest``,
``run --adopt`` and ``run --reverify`` find the torrent the manifest pins in the store. Torrents are
built offline with provision's own ``create_torrent``; no session, no network."""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import provision.stages.verify.parallel as parallel
from provision.errors import HashMismatchError, VerifyError
from provision.formats.manifest import load_manifest
from provision.formats.report_schema import validate_report
from provision.layout import Layout
from provision.stages.fetch.torrent.create import create_torrent
from provision.stages.verify import verify_dir
from tests.support.cli import cli_json, provision_home
from tests.support.files import flip_byte, snapshot

PIECE = 256 * 1024
BIG = "consolidated.safetensors"  # 33,986,832 bytes in the tiny checkpoint
FILES = ("consolidated.safetensors", "params.json", "tekken.json")


def _torrent(folder: Path, version: str, files: tuple[str, ...] = FILES) -> tuple[bytes, str]:
    """(.torrent bytes, btih) of ``files`` in ``folder``, in a torrent named after the folder."""
    made = create_torrent(folder, files=[(f, (folder / f).stat().st_size) for f in files], version=version,
                          piece_length=PIECE)
    assert made.btih is not None
    return made.data, made.btih


def _only_big(tiny_copy: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "single"
    folder.mkdir()
    shutil.copyfile(tiny_copy / BIG, folder / BIG)
    return folder


def _single_torrent(tiny_copy: Path, tmp_path: Path, version: str) -> Path:
    """A folder holding only BIG, and its ``version`` torrent as ``tmp_path/t.torrent``."""
    folder = _only_big(tiny_copy, tmp_path)
    data, _ = _torrent(folder, version, (BIG,))
    (tmp_path / "t.torrent").write_bytes(data)
    return folder


def _meet_on_two_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make each range unit wait until a second pool thread runs one too (a broken barrier, after
    30 s, fails the verification): passing proves two ranges ran at the same time."""
    barrier = threading.Barrier(2, timeout=30)
    seen: list[str] = []
    for name in ("_v1_unit", "_v2_unit"):
        real: Callable[..., None] = getattr(parallel, name)

        def unit(*args: Any, _real: Callable[..., None] = real) -> None:
            me = threading.current_thread().name
            if me not in seen:
                seen.append(me)
                barrier.wait()
            _real(*args)

        monkeypatch.setattr(parallel, name, unit)
    return seen


@pytest.mark.parametrize("version,kind", [("v1", "torrent-v1-pieces"), ("hybrid", "torrent-v2-merkle")])
def test_a_single_big_file_is_checked_in_piece_ranges_on_two_workers_without_a_sha256_pass(
        tiny_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str, kind: str) -> None:
    folder = _single_torrent(tiny_copy, tmp_path, version)
    monkeypatch.setattr(parallel, "SPLIT_UNIT_BYTES", 4 << 20)  # 34 MB -> 9 ranges
    threads = _meet_on_two_threads(monkeypatch)

    rep = verify_dir(folder, torrent=tmp_path / "t.torrent", workers=2)

    rep.raise_for_failure()
    [f] = rep.files
    assert (f.path, f.status, f.authority) == (BIG, "ok", kind)
    size = (folder / BIG).stat().st_size
    assert f.hash_ranges == -(-size // (4 << 20)) and f.hash_units == f.hash_ranges  # no whole-file unit
    assert f.hash_threads == 2 and len(threads) == 2
    assert f.sha256 is None  # nothing read the file as one stream
    assert rep.bytes_hashed == size  # every byte read once, by the ranges
    assert rep.authority == kind and rep.authorities == {kind: 1}
    assert rep.torrent is not None and rep.torrent["chain"] == "the torrent file given"
    assert any(c.name == kind and c.ok for c in rep.checks)


def test_a_flipped_byte_is_named_by_its_piece_and_nothing_is_written(
        tiny_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _single_torrent(tiny_copy, tmp_path, "v1")
    monkeypatch.setattr(parallel, "SPLIT_UNIT_BYTES", 4 << 20)
    offset = 20_000_123
    flip_byte(folder / BIG, offset)
    before = snapshot(folder)

    rep = verify_dir(folder, torrent=tmp_path / "t.torrent", workers=2)

    assert snapshot(folder) == before
    [fail] = rep.failures
    assert (fail.name, fail.file, fail.authority) == ("torrent-v1-pieces", BIG, "torrent-v1-pieces")
    piece = offset // PIECE  # 76
    assert f"piece {piece}," in fail.message
    assert fail.error is not None and fail.error.context["bad_pieces"] == [piece]
    with pytest.raises(HashMismatchError):
        rep.raise_for_failure()


def test_a_flipped_byte_fails_the_v2_merkle_root_of_its_file(
        tiny_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, _ = _torrent(tiny_copy, "hybrid")
    (tmp_path / "t.torrent").write_bytes(data)
    monkeypatch.setattr(parallel, "SPLIT_UNIT_BYTES", 4 << 20)
    flip_byte(tiny_copy / "tekken.json", 12_345_678)
    rep = verify_dir(tiny_copy, torrent=tmp_path / "t.torrent", workers=2)
    assert [(c.name, c.file) for c in rep.failures] == [("torrent-v2-merkle", "tekken.json")]
    assert {f.path: f.status for f in rep.files if f.path in FILES} == {
        "consolidated.safetensors": "ok", "params.json": "ok", "tekken.json": "failed"}


def test_a_torrent_file_missing_from_the_folder_fails_and_an_unlisted_one_keeps_its_sha256(
        tiny_copy: Path, tmp_path: Path) -> None:
    data, _ = _torrent(tiny_copy, "hybrid")
    (tmp_path / "t.torrent").write_bytes(data)
    (tiny_copy / "params.json").unlink()
    rep = verify_dir(tiny_copy, torrent=tmp_path / "t.torrent")
    assert {(c.name, c.file) for c in rep.failures} >= {("present", "params.json")}
    extra = rep.file("manifest.toml")  # not in the torrent: checked as before, its sha256 reported
    assert extra is not None and extra.authority == "none"
    assert extra.sha256 == hashlib.sha256((tiny_copy / "manifest.toml").read_bytes()).hexdigest()


def _pinning_manifest(tiny_src: Path, tmp_path: Path, btih: str) -> Path:
    """The tiny manifest with a torrent source whose magnet pins ``btih`` (beside no .torrent file)."""
    text = (tiny_src / "manifest.toml").read_text()
    src = f'[[sources]]\ntype = "torrent"\nmagnet = "magnet:?xt=urn:btih:{btih}&dn=tiny-pixtral"\n\n'
    out = tmp_path / "pinned" / "manifest.toml"
    out.parent.mkdir()
    out.write_text(text.replace("[[files]]", src + "[[files]]", 1))
    return out


def test_verify_with_a_manifest_uses_the_stores_copy_of_the_pinned_torrent_and_says_so(
        tiny_src: Path, tiny_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, btih = _torrent(tiny_copy, "hybrid")
    manifest = _pinning_manifest(tiny_src, tmp_path, btih)
    store = Layout(provision_home()).torrents
    store.mkdir(parents=True)

    # no copy in the store yet: the manifest's sha256 is the authority, read as one stream
    rc, doc, err = cli_json(capsys, "verify", str(tiny_copy), "--manifest", str(manifest))
    assert rc == 0, err
    assert doc["verify"]["authorities"] == {"manifest-sha256": 3} and "torrent" not in doc["verify"]

    (store / f"{btih}.torrent").write_bytes(data)
    rc, doc, err = cli_json(capsys, "verify", str(tiny_copy), "--manifest", str(manifest))
    assert rc == 0, err
    v = doc["verify"]
    assert v["authority"] == "torrent-v2-merkle" and v["authorities"] == {"torrent-v2-merkle": 3}
    assert v["torrent"]["chain"] == f"btih {btih}" and v["torrent"]["btih"] == btih
    big = next(f for f in v["files"] if f["path"] == BIG)
    assert big["authority"] == "torrent-v2-merkle" and "sha256" not in big and big["hash"]["ranges"] >= 1
    assert "checked against: torrent-v2-merkle (3 files" in err

    # a store copy that is not the pinned torrent is skipped: back to the manifest's sha256
    other, _ = _torrent(tiny_copy, "v1")
    (store / f"{btih}.torrent").write_bytes(other)
    rc, doc, err = cli_json(capsys, "verify", str(tiny_copy), "--manifest", str(manifest))
    assert rc == 0, err
    assert doc["verify"]["authorities"] == {"manifest-sha256": 3}


def test_an_explicit_torrent_that_is_not_the_one_the_manifest_pins_is_refused(
        tiny_src: Path, tiny_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, btih = _torrent(tiny_copy, "hybrid")
    other, _ = _torrent(tiny_copy, "v1")
    (tmp_path / "other.torrent").write_bytes(other)
    manifest = _pinning_manifest(tiny_src, tmp_path, btih)
    with pytest.raises(VerifyError, match="not the one the sources pin"):
        verify_dir(tiny_copy, load_manifest(str(manifest)), torrent=tmp_path / "other.torrent")
    rc, _doc, err = cli_json(capsys, "verify", str(tiny_copy), "--manifest", str(manifest),
                             "--torrent", str(tmp_path / "other.torrent"))
    assert rc == 5 and "not the one the sources pin" in err


def test_run_adopt_and_reverify_check_the_pieces_of_the_pinned_torrent(
        tiny_src: Path, tiny_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, btih = _torrent(tiny_copy, "hybrid")
    manifest = _pinning_manifest(tiny_src, tmp_path, btih)
    home = tmp_path / "home"
    (Layout(home).torrents).mkdir(parents=True)
    (Layout(home).torrents / f"{btih}.torrent").write_bytes(data)
    base = ["run", str(manifest), "--home", str(home), "--no-hf-cache", "--skip-convert", "--skip-smoke"]

    rc, doc, err = cli_json(capsys, *base, "--adopt", str(tiny_copy))
    assert rc == 0, err[-3000:]
    fetch = next(s for s in doc["stages"] if s["stage"] == "fetch")
    assert {f["path"]: f["authority"] for f in fetch["details"]["files"]} == dict.fromkeys(FILES, "torrent-v2-merkle")

    rc, doc, err = cli_json(capsys, *base, "--adopt", str(tiny_copy), "--reverify")
    assert rc == 0, err[-3000:]
    validate_report(doc)
    verify = next(s for s in doc["stages"] if s["stage"] == "verify")
    assert verify["result"] == "ok"
    v = verify["details"]
    assert v["authorities"] == {"torrent-v2-merkle": 3} and v["torrent"]["chain"] == f"btih {btih}"
    assert verify["bytes"] == sum((tiny_src / f).stat().st_size for f in FILES)  # read once, by the pieces
    original = Layout(home).original("tiny-pixtral")
    for f in FILES:
        assert hashlib.sha256((original / f).read_bytes()).digest() == hashlib.sha256(
            (tiny_src / f).read_bytes()).digest()


# -- worker processes (a big file: no GIL between the hashing workers) ------------------------------
@pytest.mark.parametrize("version,kind", [("v1", "torrent-v1-pieces"), ("hybrid", "torrent-v2-merkle")])
def test_worker_processes_check_the_ranges_and_find_the_same_flipped_piece_as_threads(
        tiny_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str, kind: str) -> None:
    folder = _single_torrent(tiny_copy, tmp_path, version)
    monkeypatch.setattr(parallel, "SPLIT_UNIT_BYTES", 4 << 20)
    monkeypatch.setattr(parallel, "PROCESS_MIN_BYTES", 0)  # the 34 MB file counts as big
    monkeypatch.setattr(parallel, "PROCESS_KINDS", ("v1", "v2"))

    rep = verify_dir(folder, torrent=tmp_path / "t.torrent", workers=2)
    rep.raise_for_failure()
    [f] = rep.files
    assert f.authority == kind and f.hash_units == f.hash_ranges == 9 and f.sha256 is None
    assert f.hash_threads == 2  # two worker processes (each driver starts with a range of its own)
    assert rep.bytes_hashed == (folder / BIG).stat().st_size

    offset = 20_000_123
    flip_byte(folder / BIG, offset)
    procs = verify_dir(folder, torrent=tmp_path / "t.torrent", workers=2)
    monkeypatch.setattr(parallel, "PROCESS_MIN_BYTES", 1 << 62)
    threads = verify_dir(folder, torrent=tmp_path / "t.torrent", workers=2)
    assert [(c.name, c.file, c.message) for c in procs.failures] == [
        (c.name, c.file, c.message) for c in threads.failures]
    [fail] = procs.failures
    assert fail.name == kind
    if kind == "torrent-v1-pieces":
        assert fail.error is not None and fail.error.context["bad_pieces"] == [offset // PIECE]


@pytest.mark.parametrize("version,procs", [("hybrid", 2), ("v1", 0)])
def test_by_default_merkle_ranges_past_the_threshold_go_to_worker_processes_and_v1_pieces_stay_on_threads(
        tiny_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str, procs: int) -> None:
    folder = _single_torrent(tiny_copy, tmp_path, version)
    monkeypatch.setattr(parallel, "SPLIT_UNIT_BYTES", 4 << 20)
    monkeypatch.setattr(parallel, "PROCESS_MIN_BYTES", 30 << 20)  # 34 MB of ranges: past it (the kinds stay default)
    started: list[int] = []
    real_popen = parallel.subprocess.Popen

    def popen(*a: Any, **k: Any) -> Any:
        p = real_popen(*a, **k)
        started.append(p.pid)
        return p

    monkeypatch.setattr(parallel.subprocess, "Popen", popen)
    rep = verify_dir(folder, torrent=tmp_path / "t.torrent", workers=2)
    rep.raise_for_failure()
    assert len(started) == procs
    monkeypatch.setattr(parallel, "PROCESS_MIN_BYTES", 40 << 20)  # below the threshold: threads for both
    started.clear()
    verify_dir(folder, torrent=tmp_path / "t.torrent", workers=2).raise_for_failure()
    assert started == []


def test_worker_processes_accept_a_zero_padded_last_piece_only_with_the_size_pinned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from provision.stages.verify import Authority, verify_files

    monkeypatch.setattr(parallel, "SPLIT_UNIT_BYTES", 64 * 1024)
    monkeypatch.setattr(parallel, "PROCESS_MIN_BYTES", 0)
    monkeypatch.setattr(parallel, "PROCESS_KINDS", ("v1", "v2"))
    d = tmp_path / "x"
    d.mkdir()
    plen = 32 * 1024
    data = bytes(range(256)) * 1000 + b"tail"  # 256,004 bytes: 7 full pieces and a short one
    (d / "f").write_bytes(data)
    hashes = [hashlib.sha1(data[i:i + plen]).digest() for i in range(0, len(data), plen)]
    padded = (*hashes[:-1], hashlib.sha1(data[7 * plen:] + bytes(8 * plen - len(data))).digest())
    assert verify_files(d, {"f": Authority("torrent-v1-pieces", piece_length=plen, piece_hashes=tuple(hashes))},
                        workers=2).ok
    assert verify_files(d, {"f": Authority("torrent-v1-pieces", size=len(data), piece_length=plen,
                                           piece_hashes=padded)}, workers=2).ok
    rep = verify_files(d, {"f": Authority("torrent-v1-pieces", piece_length=plen, piece_hashes=padded)}, workers=2)
    assert [c.name for c in rep.failures] == ["torrent-v1-pieces"] and "piece 7," in rep.failures[0].message


def test_a_range_that_never_ran_fails_the_file_instead_of_passing_it(
        tiny_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _single_torrent(tiny_copy, tmp_path, "v1")
    monkeypatch.setattr(parallel, "SPLIT_UNIT_BYTES", 4 << 20)

    class LosesOne:  # a pool that never runs the last unit it is given
        def __init__(self, **_k: Any) -> None:
            pass

        def __enter__(self) -> LosesOne:
            return self

        def __exit__(self, *_a: Any) -> None:
            return None

        def map(self, fn: Callable[[Any], None], items: Any) -> list[None]:
            return [fn(u) for u in list(items)[:-1]]

    monkeypatch.setattr(parallel, "ThreadPoolExecutor", LosesOne)
    rep = verify_dir(folder, torrent=tmp_path / "t.torrent", workers=2)
    assert not rep.ok
    assert [(c.name, c.file) for c in rep.failures] == [("read", BIG)]
    assert "hashing units did not run" in rep.failures[0].message


def test_when_no_worker_process_can_start_the_ranges_are_hashed_on_the_driver_threads(
        tiny_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _single_torrent(tiny_copy, tmp_path, "hybrid")
    monkeypatch.setattr(parallel, "SPLIT_UNIT_BYTES", 4 << 20)
    monkeypatch.setattr(parallel, "PROCESS_MIN_BYTES", 0)

    def no_worker(*_a: Any, **_k: Any) -> Any:
        raise OSError("no processes left")

    monkeypatch.setattr(parallel.subprocess, "Popen", no_worker)
    rep = verify_dir(folder, torrent=tmp_path / "t.torrent", workers=2)
    rep.raise_for_failure()
    [f] = rep.files
    assert f.hash_ranges == 9 and f.hash_threads == 2  # every range ran, on the two driver threads
    assert rep.bytes_hashed == (folder / BIG).stat().st_size

    flip_byte(folder / BIG, 20_000_123)  # and they still find a damaged piece
    assert [c.name for c in verify_dir(folder, torrent=tmp_path / "t.torrent", workers=2).failures] == [
        "torrent-v2-merkle"]


def test_the_worker_process_answers_json_lines_with_the_digests_verify_computes_itself(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from provision.stages.verify.digests import v2_chunk_root

    f = tmp_path / "f"
    data = bytes(range(256)) * 5000 + b"x" * 777  # 1,280,777 bytes: a short last 16 KiB block
    f.write_bytes(data)
    jobs = [{"v1": [str(f), 65536, 65536, 30]}, {"v2": [str(f), 0, 2, 64]}, {"v1": [str(tmp_path / "gone"), 0, 1, 1]}]
    out = subprocess.run([sys.executable, "-I", str(parallel.WORKER)], input="".join(json.dumps(j) + "\n" for j in jobs),
                         capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    v1, v2, gone = (json.loads(line) for line in out)
    pieces = [data[i:i + 65536] for i in range(65536, len(data), 65536)]
    assert v1["sha1"] == [hashlib.sha1(p).hexdigest() for p in pieces] and v1["n"] == len(data) - 65536
    assert v1["padded"] == hashlib.sha1(pieces[-1] + bytes(65536 - len(pieces[-1]))).hexdigest()
    buf = bytearray(1 << 20)
    assert v2["roots"] == [v2_chunk_root(f, i, 64, buf).hex() for i in (0, 1)] and v2["n"] == len(data)
    assert gone == {"error": "No such file or directory"}


def _single_file_authority(tiny_copy: Path, tmp_path: Path, version: str) -> tuple[Path, dict[str, Any]]:
    """A folder holding only BIG and the authorities its ``version`` torrent gives (as ``verify --torrent``)."""
    from provision.stages.verify.torrent import find_torrent, with_torrent

    folder = _single_torrent(tiny_copy, tmp_path, version)
    return folder, with_torrent({}, find_torrent(None, None, torrent_file=tmp_path / "t.torrent"), add_missing=True)


def _record_ranges(monkeypatch: pytest.MonkeyPatch, unit: str) -> list[tuple[int, int]]:
    """The (first, count) of every range ``parallel.<unit>`` (``_v1_unit`` or ``_v2_unit``) reads."""
    ranges: list[tuple[int, int]] = []
    real = getattr(parallel, unit)

    def spy(w: Any, first: int, count: int, *rest: Any) -> None:
        ranges.append((first, count))
        real(w, first, count, *rest)

    monkeypatch.setattr(parallel, unit, spy)
    return ranges


def test_pieces_the_fetcher_read_back_are_not_read_again_and_the_others_still_catch_a_flipped_byte(
        tiny_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from provision.stages.verify import verify_files

    folder, auths = _single_file_authority(tiny_copy, tmp_path, "v1")
    npieces = -(-(folder / BIG).stat().st_size // PIECE)
    ranges = _record_ranges(monkeypatch, "_v1_unit")
    assert auths[BIG].kind == "torrent-v1-pieces" and len(auths[BIG].piece_hashes) == npieces
    read_back = set(range(npieces)) - {7, 8, 50}
    rep = verify_files(folder, auths, checked_pieces={BIG: read_back}, whole_sha256=False)
    rep.raise_for_failure()
    assert sorted(ranges) == [(7, 2), (50, 1)]  # only the pieces nobody read back
    [f] = rep.files
    assert f.to_dict()["hash"]["read_back_by_fetcher"] == len(read_back)

    flip_byte(folder / BIG, 50 * PIECE + 3)  # a piece nobody read back: found
    ranges.clear()
    bad = verify_files(folder, auths, checked_pieces={BIG: read_back}, whole_sha256=False)
    assert [c.name for c in bad.failures] == ["torrent-v1-pieces"]
    assert bad.failures[0].error is not None and bad.failures[0].error.context["bad_pieces"] == [50]


def test_merkle_chunk_roots_the_fetcher_read_back_are_not_read_again_and_a_wrong_one_fails_the_root_check(
        tiny_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from provision.stages.verify import verify_files
    from provision.stages.verify.digests import v2_chunk_roots, v2_geometry

    folder, auths = _single_file_authority(tiny_copy, tmp_path, "hybrid")
    assert auths[BIG].kind == "torrent-v2-merkle"
    nchunks, chunk, _ = v2_geometry((folder / BIG).stat().st_size)
    roots = dict(enumerate(v2_chunk_roots(folder / BIG, 0, nchunks, chunk)))
    read = _record_ranges(monkeypatch, "_v2_unit")
    given = {i: r for i, r in roots.items() if i != 3}
    rep = verify_files(folder, auths, chunk_roots={BIG: given}, whole_sha256=False)
    rep.raise_for_failure()
    assert read == [(3, 1)]  # only the chunk nobody read back
    assert rep.files[0].to_dict()["hash"]["read_back_by_fetcher"] == nchunks - 1

    # a root computed from bad bytes on the disk is not trusted blindly: the merkle root fails
    bad = dict(given)
    bad[5] = bytes(32)
    failed = verify_files(folder, auths, chunk_roots={BIG: bad}, whole_sha256=False)
    assert [c.name for c in failed.failures] == ["torrent-v2-merkle"]
