"""Page-cache aware reads (``provision.io.diskio``): what the cache holds, else past it, same bytes."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from provision.io.diskio import DIRECT_ALIGN, open_direct, read_at, read_cached, reopen_direct


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages: dropped
    finally:
        os.close(fd)


def test_read_cached_gives_only_bytes_the_page_cache_holds(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    buf = memoryview(bytearray(len(data)))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages: dropped
        assert read_cached(fd, buf, 0) == 0  # none cached: nothing read, no wait for the disk
        assert os.pread(fd, len(data), 0) == data  # now cached
        n = read_cached(fd, buf, 4096)
        assert n == len(data) - 4096 and bytes(buf[:n]) == data[4096:]
    finally:
        os.close(fd)


def test_read_at_returns_the_files_bytes_from_any_offset_cached_or_not(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = os.urandom(3 * DIRECT_ALIGN * 64 + 1234)
    path.write_bytes(data)
    buf = memoryview(mmap.mmap(-1, 64 << 10))  # page-aligned, as O_DIRECT needs
    for cold in (True, False):
        if cold:
            _drop(path)
        fd = os.open(path, os.O_RDONLY)
        dfd = reopen_direct(fd)
        try:
            for start in (0, 1, DIRECT_ALIGN - 7, 5 * DIRECT_ALIGN, len(data) - 100):
                got, pos = bytearray(), start
                while n := read_at(fd, dfd, buf, pos):
                    got += buf[:n]
                    pos += n
                assert bytes(got) == data[start:], (cold, start)
        finally:
            os.close(fd)
            if dfd is not None:
                os.close(dfd)


def test_open_direct_and_reopen_direct_name_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * DIRECT_ALIGN)
    fd = os.open(path, os.O_RDONLY)
    try:
        a, b = open_direct(path), reopen_direct(fd)
        assert (a is None) == (b is None)  # both need a filesystem that takes O_DIRECT
        for d in (a, b):
            if d is not None:
                assert os.path.samestat(os.fstat(d), os.fstat(fd))
                os.close(d)
    finally:
        os.close(fd)
