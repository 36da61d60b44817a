"""A bare-magnet fetch hashes every file while it downloads: the sha256 it records is the one of
the bytes, and no file is read once more after the download for its whole-file sha256 (verify
checks the torrent's pieces in ranges and takes the streamed digest). A file whose stream hash
needed a piece released without its alert is read again; a resumed download is still hashed
right. Loopback only (closed network mode).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

import provision.stages.verify.parallel as vparallel
from provision.stages.fetch.torrent.live import PieceFence
from provision.stages.fetch.torrent.stream_hash import StreamFile, StreamHasher
from provision.testing.torrent_fixtures import (
    make_payload,
    seed_thread,
    sigkill_fetch_midway,
)
from tests.support.cli import cli_json, provision_home

SIZES = {"a.dat": (3 << 20) + 12345, "b.dat": (2 << 20) + 7, "sub/c.dat": 100_000}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def whole_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files verify reads in a whole-file pass (its sha256 / git / md5 unit), in order."""
    seen: list[str] = []
    real = vparallel._whole_unit

    def spy(w: Any, *a: Any, **kw: Any) -> None:
        seen.append(w.rel)
        real(w, *a, **kw)

    monkeypatch.setattr(vparallel, "_whole_unit", spy)
    return seen


def _fetch(capsys: pytest.CaptureFixture[str], magnet: str, dest: Path) -> dict[str, Any]:
    rc, doc, err = cli_json(capsys, "fetch", magnet, "--dest", str(dest), "--network", "closed",
                            "--stall-timeout", "30")
    assert rc == 0, (doc, err)
    return dict(doc["fetch"])


@pytest.mark.parametrize("version", ["hybrid", "v1"])
def test_bare_magnet_records_the_streamed_sha256_of_each_file_and_reads_none_whole_after_the_download(
        version: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], whole_reads: list[str]) -> None:
    src = tmp_path / "payload"
    make_payload(src, SIZES)
    dest = tmp_path / "dest"
    with seed_thread(src, version=version) as info:
        f = _fetch(capsys, info.magnet, dest)
    assert whole_reads == []  # nothing read a file from start to end after the download
    for x in f["files"]:
        assert x["authority"].startswith("torrent-"), x
        assert x["sha256"] == _sha(src / x["path"]) == _sha(dest / x["path"])
    vrep = f["extra"]["verify"]
    assert vrep["ok"] is True
    vfiles = {x["path"]: x for x in vrep["files"]}
    assert set(vfiles) == set(SIZES)
    for rel, x in vfiles.items():
        assert x["sha256_source"] == "fetcher" and x["sha256"] == _sha(src / rel)
        if "hash" in x:  # pieces checked in ranges (by verify or read back by the fetcher), no whole-file unit
            assert x["hash"]["units"] == x["hash"]["ranges"]
            assert x["hash"]["ranges"] + x["hash"].get("read_back_by_fetcher", 0) >= 1
    # each piece-checked file was read once more after it was written: back from the disk by the
    # fetcher's write-behind, or by verify's ranges (what the write-behind left: a short last piece)
    assert vrep["bytes_hashed"] + f["extra"]["read_back_while_downloading_bytes"] == sum(
        x["size"] for x in vfiles.values() if "hash" in x)
    if version == "hybrid":  # merkle chunks: all read back (v1: these files share pieces, the size is checked)
        assert f["extra"]["read_back_while_downloading_bytes"] == sum(SIZES.values())
    assert f["extra"]["hashed_while_downloading_bytes"] == sum(SIZES.values())


def test_a_file_whose_piece_alert_never_came_is_read_again_for_its_sha256(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], whole_reads: list[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = PieceFence.flushed

    def lose_piece_0(self: PieceFence) -> None:  # piece 0 never reaches the hasher: mark_all releases it
        if self.fenced is not None:
            self.fenced = [p for p in self.fenced if p != 0]
        real(self)

    monkeypatch.setattr(PieceFence, "flushed", lose_piece_0)
    src = tmp_path / "payload"
    make_payload(src, SIZES)
    dest = tmp_path / "dest"
    with seed_thread(src) as info:
        f = _fetch(capsys, info.magnet, dest)
    vfiles = {x["path"]: x for x in f["extra"]["verify"]["files"]}
    first = sorted(SIZES)[0]  # a.dat starts the torrent: piece 0 is its first
    assert whole_reads == [first]
    assert vfiles[first]["sha256_source"] == "read"
    assert all(vfiles[r]["sha256_source"] == "fetcher" for r in SIZES if r != first)
    for x in f["files"]:
        assert x["sha256"] == _sha(src / x["path"])


def test_forced_files_names_only_the_files_spanning_a_piece_released_by_mark_all(tmp_path: Path) -> None:
    pl = 1 << 14
    data = {"x": os.urandom(3 * pl), "y": os.urandom(2 * pl + 5)}
    (tmp_path / "x").write_bytes(data["x"])
    (tmp_path / "y").write_bytes(data["y"])
    files = [StreamFile("x", tmp_path / "x", 0, 3 * pl, True), StreamFile("y", tmp_path / "y", 3 * pl, 2 * pl + 5, True)]
    h = StreamHasher(files, pl, 6, drop_behind=False)
    h.start()
    try:
        for p in (0, 1, 2, 3, 5):
            h.mark(p)
        h.mark_all()  # piece 4 (inside y) never had its alert
        h.join(30)
    finally:
        h.stop()
    assert h.forced_files() == {"y"}
    assert h.results == {k: hashlib.sha256(v).hexdigest() for k, v in data.items()}
    assert h.bytes_hashed == sum(len(v) for v in data.values())


@pytest.mark.slow
def test_a_killed_bare_magnet_fetch_resumes_and_records_the_right_sha256_without_a_whole_file_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], whole_reads: list[str]) -> None:
    src = tmp_path / "payload"
    sizes = make_payload(src, {"a.dat": 12 << 20, "b.dat": 6 << 20})
    dest = tmp_path / "dest"
    with seed_thread(src) as info:
        resume = provision_home() / "torrents" / f"{info.btih}.resume"
        sigkill_fetch_midway(info.magnet, dest, resume, 0.4, tmp_path / "f1.log")
        f = _fetch(capsys, info.magnet, dest)
    assert f["extra"]["resumed"] is True and f["bytes_downloaded"] < sum(sizes.values())
    assert whole_reads == []
    for x in f["files"]:
        assert x["sha256"] == _sha(src / x["path"]) == _sha(dest / x["path"])
    assert all(x["sha256_source"] == "fetcher" for x in f["extra"]["verify"]["files"])
    # the pieces already on disk were hashed from the disk once, the rest as they arrived
    assert f["extra"]["hashed_while_downloading_bytes"] == sum(sizes.values())
