"""The BitTorrent fetch's disk side: hashing through a mapping, write-behind, drop-behind.

``hash_range`` must give the same sha256 as reading the bytes (mapped or, where mapping
fails, through ``preadv``); ``WriteBehind`` must fsync every file it is told is complete and
leave what it dropped intact on disk and out of the page cache; and a whole fetch must leave
its files verified but not resident (``fincore`` from util-linux reads the residency).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import mmap
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from provision.cli.main import run_cli
from provision.io import diskio
from provision.stages.fetch.torrent.read_back import ReadBack, ReadBackWorker
from provision.stages.fetch.torrent.stream_hash import WriteBehind
from provision.testing.torrent_fixtures import seed_thread


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache, as util-linux's fincore counts them."""
    if shutil.which("fincore") is None:
        pytest.fail("fincore (util-linux) is needed to read page-cache residency")
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


MEMORY_FS = {"tmpfs", "ramfs"}


def fs_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (longest mount point in /proc/mounts)."""
    best, kind = "", ""
    real = str(path.resolve())
    with open("/proc/mounts") as fh:
        for line in fh:
            parts = line.split()
            mnt = parts[1].replace("\\040", " ")
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, kind = mnt, parts[2]
    return kind


@pytest.fixture
def disk_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on a disk filesystem: ``tmp_path``, unless that is in memory (tmpfs has no page
    cache to drop), then one under the repository's ignored ``.pytest-disk/``. PROVISION_HOME
    moves there too, so staging and destination share the filesystem (a rename, not a copy)."""
    if fs_type(tmp_path) not in MEMORY_FS:
        yield tmp_path
        return
    base = Path(__file__).resolve().parents[2] / ".pytest-disk"
    base.mkdir(exist_ok=True)
    d = Path(tempfile.mkdtemp(dir=base))
    monkeypatch.setenv("PROVISION_HOME", str(d / "home"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def random_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(3 * mmap.ALLOCATIONGRANULARITY * 17 + 12345)
    p = tmp_path / "blob.bin"
    p.write_bytes(data)
    return p, data


@pytest.mark.parametrize(("start", "end"), [(0, None), (1, 70000), (mmap.ALLOCATIONGRANULARITY + 3, None),
                                            (4095, 4097), (100, 100)])
def test_hash_range_through_a_mapping_equals_the_sha256_of_those_bytes(
        random_file: tuple[Path, bytes], start: int, end: int | None) -> None:
    path, data = random_file
    stop = len(data) if end is None else end
    buf = memoryview(bytearray(1 << 16))
    fd = os.open(path, os.O_RDONLY)
    try:
        h = hashlib.sha256()
        diskio.hash_range(h, fd, start, stop, buf)
    finally:
        os.close(fd)
    assert h.hexdigest() == hashlib.sha256(data[start:stop]).hexdigest()
    if stop == start:  # nothing fed: the digest of no bytes, known independently
        assert h.hexdigest() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_hash_range_reads_with_preadv_where_mapping_fails(random_file: tuple[Path, bytes],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path, data = random_file

    def no_mapping(*_a: Any, **_k: Any) -> Any:
        raise OSError(19, "mmap not supported here")

    monkeypatch.setattr(diskio.mmap, "mmap", no_mapping)
    fd = os.open(path, os.O_RDONLY)
    try:
        h = hashlib.sha256()
        diskio.hash_range(h, fd, 7, len(data) - 5, memoryview(bytearray(1000)))  # many short reads
    finally:
        os.close(fd)
    assert h.hexdigest() == hashlib.sha256(data[7:len(data) - 5]).hexdigest()


def test_write_behind_fsyncs_complete_files_and_drops_what_is_on_disk(disk_dir: Path) -> None:
    size = 6 << 20
    data = os.urandom(size)
    path = disk_dir / "part.bin"
    with open(path, "wb") as fh:  # dirty pages, as libtorrent leaves them
        fh.write(data)
    assert resident_bytes(path) > 0
    wb = WriteBehind(drop=True)
    wb.start()
    wb.put("part.bin", path, 0, 2 << 20)  # a stretch: waited for and dropped
    wb.put("part.bin", path, 2 << 20, size)
    wb.put("part.bin", path, 0, size, final=True)  # the file is complete: fsync, drop the rest
    wb.close()
    wb.join(30)
    assert not wb.thread.is_alive()
    assert wb.synced == {"part.bin"}
    assert wb.finished_at is not None
    assert resident_bytes(path) < size // 4
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()  # nothing lost


@pytest.mark.parametrize("drop", [False, True])
def test_write_behind_drops_pages_only_when_asked_and_fsyncs_either_way(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drop: bool) -> None:
    # what it asks of the kernel, not what the kernel keeps: a page evicted under memory pressure
    # must not decide this (the residency itself is measured where pages are dropped, above)
    size = 4 << 20
    path = tmp_path / "keep.bin"
    path.write_bytes(os.urandom(size))
    advice: list[tuple[int, int, int]] = []
    fsynced: list[int] = []
    real_fadvise, real_fsync = os.posix_fadvise, os.fsync

    def spy_fadvise(fd: int, offset: int, length: int, adv: int) -> None:
        advice.append((offset, length, adv))
        real_fadvise(fd, offset, length, adv)

    def spy_fsync(fd: int) -> None:
        fsynced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "posix_fadvise", spy_fadvise)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    wb = WriteBehind(drop=drop)
    wb.start()
    wb.put("keep.bin", path, 0, 2 << 20)
    wb.put("keep.bin", path, 0, size, final=True)
    wb.close()
    wb.join(30)
    assert not wb.thread.is_alive()
    assert wb.synced == {"keep.bin"}
    assert fsynced == [path.stat().st_ino]  # fsynced once, when complete
    dropped = [(o, n) for o, n, adv in advice if adv == os.POSIX_FADV_DONTNEED]
    if drop:  # the stretch, then the whole file once fsynced
        assert dropped == [(0, 2 << 20), (0, size)]
    else:
        assert dropped == []


def test_write_behind_of_a_missing_file_leaves_it_for_the_move_to_fsync(tmp_path: Path) -> None:
    wb = WriteBehind(drop=True)
    wb.start()
    wb.put("gone.bin", tmp_path / "gone.bin", 0, 10, final=True)
    wb.close()
    wb.join(30)
    assert wb.synced == set()  # the move fsyncs every file not in ``synced``


def test_a_fetch_leaves_its_verified_files_out_of_the_page_cache(
        tiny_src: Path, disk_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Hashed from the stream against the manifest and written back as they arrive, the files
    are dropped from the page cache: a multi-GB model does not push the host's working set out."""
    import dataclasses

    from provision.formats.manifest import Source, load_manifest, write_manifest

    torrent = disk_dir / "m" / "tiny.torrent"
    torrent.parent.mkdir()
    dest = disk_dir / "dest"
    with seed_thread(tiny_src, torrent_out=torrent) as info:
        m = load_manifest(str(tiny_src / "manifest.toml"))
        m2 = dataclasses.replace(m, sources=(Source(type="torrent", torrent="tiny.torrent", magnet=info.magnet,
                                                    prefix="tiny-pixtral/"),))
        write_manifest(m2, disk_dir / "m" / "manifest.toml")
        capsys.readouterr()
        rc = run_cli(["fetch", str(disk_dir / "m" / "manifest.toml"), "--dest", str(dest), "--network", "closed",
                      "--stall-timeout", "20", "--json"])
        rep = json.loads(capsys.readouterr().out)
    assert rc == 0, rep
    vfiles = rep["fetch"]["extra"]["verify"]["files"]
    assert vfiles and all(f["status"] == "ok" and f["sha256_source"] == "fetcher" for f in vfiles)
    big = dest / "consolidated.safetensors"
    assert big.stat().st_size > 8 << 20
    assert resident_bytes(big) < big.stat().st_size // 4
    for f in vfiles:  # still the verified bytes
        assert hashlib.sha256((dest / f["path"]).read_bytes()).hexdigest() == f["sha256"]


@pytest.mark.parametrize("direct", [True, False])
def test_the_read_back_reads_each_written_stretch_from_the_disk_and_records_only_whole_pieces_that_match(
        disk_dir: Path, monkeypatch: pytest.MonkeyPatch, direct: bool) -> None:
    pl = 64 * 1024
    data = os.urandom(9 * pl + 1000)  # nine whole pieces and a short tenth
    path = disk_dir / "part.bin"
    path.write_bytes(data)
    hashes = [hashlib.sha1(data[i:i + pl]).digest() for i in range(0, len(data), pl)]
    hashes[4] = bytes(20)  # what the disk holds for piece 4 is not what the torrent says
    if not direct:  # a filesystem without O_DIRECT: read through the page cache
        monkeypatch.setattr("provision.stages.fetch.torrent.read_back.reopen_direct", lambda fd: None)
    reader = ReadBackWorker(pl)
    wb = WriteBehind(drop=True, reader=reader)
    wb.start()
    rb = ReadBack(pieces=tuple(hashes))
    wb.put("part.bin", path, 0, 3 * pl + 5, read_back=rb)  # pieces 0-2 whole; 3 not yet
    wb.put("part.bin", path, 3 * pl + 5, len(data), read_back=rb)  # then 3 (now complete) to 8
    wb.put("part.bin", path, 0, len(data), final=True)
    wb.close()
    wb.join(30)
    assert not wb.thread.is_alive() and not reader.thread.is_alive()
    assert reader.checked == {"part.bin": {0, 1, 2, 3, 5, 6, 7, 8}}  # not 4 (bad) nor 9 (short: verify's)
    assert reader.read_back_bytes == 9 * pl  # each whole piece read back once
    assert wb.synced == {"part.bin"} and path.read_bytes() == data


def test_a_read_back_too_far_behind_lets_stretches_go_and_resumes_at_the_first_chunk_wholly_after_them(
        tmp_path: Path) -> None:
    from provision.stages.verify.digests import v2_chunk_roots, v2_geometry

    chunk_bytes = 4 << 20
    data = os.urandom(5 * chunk_bytes + 12345)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    nchunks, chunk, _ = v2_geometry(len(data))
    assert (nchunks, chunk) == (6, 256)
    reader = ReadBackWorker(1 << 20, depth=1)  # not started yet: its one slot fills at once
    rb = ReadBack(merkle_size=len(data))
    edges = [0, chunk_bytes + 3, 2 * chunk_bytes + 100, 3 * chunk_bytes + 7, 5 * chunk_bytes]
    queued = [reader.offer("f.bin", path, a, b, rb) for a, b in itertools.pairwise(edges)]
    assert queued == [True, False, False, False]  # behind by its whole queue: the rest is left to verify
    assert reader.skipped_bytes == edges[-1] - edges[1]
    reader.start()
    reader.join(0.5)
    assert reader.thread.is_alive()  # waiting for more
    assert reader.offer("f.bin", path, edges[-1], len(data), rb)  # the last stretch, after the gap
    reader.close()
    reader.join(30)
    assert not reader.thread.is_alive()
    want = dict(enumerate(v2_chunk_roots(path, 0, nchunks, chunk)))
    # chunk 0 from the first stretch (chunk 1 straddles into the gap); after the gap, the short last chunk
    assert reader.roots == {"f.bin": {0: want[0], 5: want[5]}}


def test_a_stopped_read_back_does_not_hold_up_the_write_behind_closing(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(1 << 20))
    reader = ReadBackWorker(1 << 16, depth=1)
    reader.start()
    reader.stop()
    reader.join(10)
    assert not reader.thread.is_alive()
    reader.offer("f.bin", path, 0, 1 << 20, ReadBack(merkle_size=1 << 20))  # fills the queue nobody reads
    reader.close()  # returns: the worker is gone
    assert reader.roots == {}
