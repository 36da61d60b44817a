"""``io.readahead.ReadAhead``: blocks come back in order and whole, a reader's error reaches the
consumer, and leaving stops a reader that is waiting for bytes that never come."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from provision.io.readahead import ReadAhead


def test_blocks_come_in_order_and_join_to_the_file(tmp_path: Path) -> None:
    data = os.urandom(5 * 4096 + 123)  # not a multiple of the block: a short last block
    (tmp_path / "f").write_bytes(data)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    off = 0

    def fill(mv: memoryview, _stop: threading.Event) -> int:
        nonlocal off
        n = os.preadv(fd, [mv], off)
        off += n
        return n

    got = bytearray()
    sizes = []
    try:
        with ReadAhead(fill, size=4096, depth=2, name="t") as ahead:
            while block := ahead.next():
                sizes.append(block.nbytes)
                got += block
    finally:
        os.close(fd)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    assert sizes == [4096] * 5 + [123]


def test_an_error_in_the_reader_is_raised_by_next() -> None:
    calls = 0

    def fill(mv: memoryview, _stop: threading.Event) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError("disk gone")
        mv[:3] = b"abc"
        return 3

    with ReadAhead(fill, size=4096, depth=3, name="t") as ahead:
        assert bytes(ahead.next()) == b"abc"
        with pytest.raises(OSError, match="disk gone"):
            ahead.next()


def test_leaving_stops_a_reader_that_waits_for_more_bytes() -> None:
    waiting = threading.Event()

    def fill(mv: memoryview, stop: threading.Event) -> int:
        waiting.set()
        stop.wait(30)  # bytes that never come: only the stop ends the wait
        return 0

    ahead = ReadAhead(fill, size=4096, depth=2, name="t")
    assert waiting.wait(10)
    ahead.close()
    assert not ahead.thread.is_alive()
