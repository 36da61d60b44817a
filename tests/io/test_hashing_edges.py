"""Streamed hashing edge by edge: digests equal hashlib over the raw bytes, prefixes and offsets
cut where asked, only regular files are read, and the background hasher keeps order and errors.

Every expected digest is hashlib over bytes written in the test, never the code under test.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from provision.errors import HostileContentError
from provision.io.hashing import (
    BackgroundHasher,
    hash_file,
    open_regular,
    sha256_file,
    sha256_prefix,
    stream_file,
)
from provision.progress import ProgressEvent
from provision.testing.torrent_fixtures import wait_for

DATA = bytes(range(256)) * 41 + b"tail"  # 10500 bytes, not a multiple of any block size used here


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    p = tmp_path / "blob.bin"
    p.write_bytes(DATA)
    return p


@pytest.mark.parametrize("block", [1, 7, 4096, 1 << 20])
def test_sha256_file_equals_hashlib_for_any_block_size(blob: Path, block: int) -> None:
    assert sha256_file(blob, block_size=block) == hashlib.sha256(DATA).hexdigest()


def test_sha256_file_of_an_empty_file_is_the_digest_of_no_bytes(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sha256_file(empty) == hashlib.sha256(b"").hexdigest()


def test_sha256_file_reports_progress_on_its_task_and_ends_with_the_full_count(blob: Path) -> None:
    events: list[ProgressEvent] = []
    sha256_file(blob, progress=events.append, block_size=1000)
    assert events, "no progress event"
    assert {e.task for e in events} == {"sha256:blob.bin"}
    assert all(e.total == len(DATA) for e in events)
    last = events[-1]
    assert last.finished and last.done == len(DATA)
    assert [e.finished for e in events].count(True) == 1


@pytest.mark.parametrize("md5", [False, True])
def test_hash_file_gives_sha256_and_md5_only_when_asked(blob: Path, md5: bool) -> None:
    sha, m = hash_file(blob, md5=md5)
    assert sha == hashlib.sha256(DATA).hexdigest()
    assert m == (hashlib.md5(DATA).hexdigest() if md5 else None)


@pytest.mark.parametrize("length", [0, 1, 4096, len(DATA) - 1, len(DATA), len(DATA) + 500])
def test_sha256_prefix_hashes_the_first_bytes_and_continues_to_the_whole(blob: Path, length: int) -> None:
    h = sha256_prefix(blob, length)
    assert h.hexdigest() == hashlib.sha256(DATA[:length]).hexdigest()
    h.update(DATA[length:])
    assert h.hexdigest() == hashlib.sha256(DATA).hexdigest()


@pytest.mark.parametrize(("offset", "length"), [(0, None), (5, None), (5, 100), (0, 0), (10499, 50),
                                                 (len(DATA), None), (3000, 4097)])
def test_stream_file_feeds_exactly_the_asked_range_and_counts_it(blob: Path, offset: int, length: int | None) -> None:
    got = bytearray()
    counted: list[int] = []
    n = stream_file(blob, lambda mv: got.extend(mv), offset=offset, length=length, buf=bytearray(1000),
                    on_bytes=counted.append)
    want = DATA[offset:] if length is None else DATA[offset:offset + length]
    assert bytes(got) == want
    assert n == len(want) == sum(counted)
    assert all(0 < c <= 1000 for c in counted)


def test_a_fifo_a_device_and_a_directory_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link-to-fifo"
    link.symlink_to(fifo)
    for p in (fifo, link, Path("/dev/null"), tmp_path):
        with pytest.raises(HostileContentError, match="not a regular file") as ei:
            open_regular(p)
        assert ei.value.exit_code == 5
        with pytest.raises(HostileContentError):
            sha256_file(p)


def test_open_regular_returns_a_blocking_descriptor_of_the_file(blob: Path) -> None:
    fd = open_regular(blob)
    try:
        assert os.get_blocking(fd)
        assert os.read(fd, 4) == DATA[:4]
    finally:
        os.close(fd)


def test_the_background_hasher_digests_chunks_in_order_and_acknowledges_each() -> None:
    chunks = [DATA[i:i + 333] for i in range(0, len(DATA), 333)]
    acked: list[int] = []
    h = BackgroundHasher(depth=2)
    for i, c in enumerate(chunks):
        h.update(memoryview(c), done=lambda i=i: acked.append(i))
    assert h.hexdigest() == hashlib.sha256(DATA).hexdigest()
    assert acked == list(range(len(chunks)))


def test_the_background_hasher_continues_a_running_prefix_hash(blob: Path) -> None:
    h = BackgroundHasher(sha256_prefix(blob, 4000))
    h.update(DATA[4000:])
    assert h.hexdigest() == hashlib.sha256(DATA).hexdigest()
    assert h.hash.hexdigest() == hashlib.sha256(DATA).hexdigest()


def test_an_error_on_the_hasher_thread_is_raised_by_close_on_the_caller() -> None:
    h = BackgroundHasher()

    def boom() -> None:
        raise OSError("disk went away")

    h.update(b"abc", done=boom)
    with pytest.raises(OSError, match="disk went away"):
        h.close()


def test_abandon_drops_queued_chunks_and_stops_the_thread() -> None:
    entered, gate = threading.Event(), threading.Event()

    def hold() -> None:  # the thread has hashed b"first" and waits here while chunks queue up
        entered.set()
        gate.wait(30)

    h = BackgroundHasher(depth=8, name="test-abandon")
    h.update(b"first", done=hold)
    assert entered.wait(30)
    for _ in range(5):
        h.update(b"never hashed")
    stopper = threading.Thread(target=h.abandon)
    stopper.start()
    wait_for(lambda: h._q.qsize() <= 1, 30, what="abandon to drop the queued chunks")  # 5 queued, then at most its stop mark
    gate.set()
    stopper.join(30)
    assert not stopper.is_alive() and not h._t.is_alive()
    assert h.hash.hexdigest() == hashlib.sha256(b"first").hexdigest()
