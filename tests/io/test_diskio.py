"""Page-cache aware reads (``provision.io.diskio``): what the cache holds, else past it, same bytes."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from provision.io.diskio import DIRECT_ALIGN, read_at, read_cached, reopen_direct


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


def test_reopen_direct_reads_the_open_file_even_after_its_path_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * DIRECT_ALIGN)
    fd = os.open(path, os.O_RDONLY)
    try:
        (tmp_path / "other.bin").write_bytes(b"b" * DIRECT_ALIGN)
        os.replace(tmp_path / "other.bin", path)  # the path now names another file
        try:  # does this filesystem take O_DIRECT at all (tmpfs does not)?
            os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
            direct_ok = True
        except OSError:
            direct_ok = False
        dfd = reopen_direct(fd)
        assert (dfd is not None) == direct_ok
        if dfd is not None:
            try:
                assert os.path.samestat(os.fstat(dfd), os.fstat(fd))
                buf = mmap.mmap(-1, DIRECT_ALIGN)
                assert os.preadv(dfd, [buf], 0) == DIRECT_ALIGN and buf[:] == b"a" * DIRECT_ALIGN
            finally:
                os.close(dfd)
    finally:
        os.close(fd)


def _address(mv: memoryview) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(mv))


def test_aligned_buffer_is_page_aligned_writable_and_holds_what_is_read_into_it(tmp_path: Path) -> None:
    from provision.io.diskio import aligned_buffer

    buf = aligned_buffer(3 << 20)
    assert buf.nbytes == 3 << 20 and not buf.readonly and _address(buf) % mmap.PAGESIZE == 0
    path = tmp_path / "f.bin"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.preadv(fd, [buf[:len(data)]], 0) == len(data)
    finally:
        os.close(fd)
    assert bytes(buf[:len(data)]) == data


def test_stream_file_and_merkle_chunks_read_into_cache_line_aligned_memory_by_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bytearray's data starts 16 bytes into a page, where the kernel's copy from the page cache runs at a
    quarter of its speed on AMD EPYC: the default read buffers are page-aligned instead."""
    from provision.io.hashing import stream_file
    from provision.stages.verify import digests

    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(3 << 20))
    seen: list[int] = []
    assert stream_file(path, lambda mv: seen.append(_address(mv))) == 3 << 20
    assert len(seen) == 3 and all(a % 64 == 0 for a in seen)
    reads: list[int] = []
    orig = os.preadv

    def spy(fd: int, bufs: list[memoryview], offset: int, *flags: int) -> int:
        reads.append(_address(bufs[0]))
        return orig(fd, bufs, offset, *flags)

    monkeypatch.setattr(os, "preadv", spy)
    assert digests.merkle_root_file(path) is not None
    monkeypatch.undo()
    assert reads and all(a % 64 == 0 for a in reads)


@pytest.mark.parametrize("kernel", [True, False])
def test_copy_fd_copies_every_byte_in_the_kernel_or_through_memory_and_continues_after_a_refusal_midway(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: bool) -> None:
    import errno

    from provision.io import atomic

    data = os.urandom((9 << 20) + 4321)
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(data)
    calls: list[int] = []
    real = os.copy_file_range

    def refuse_after_first(fi: int, fo: int, n: int, *a: int) -> int:
        calls.append(n)
        if len(calls) > 1:  # a filesystem pair that copies once and then refuses: the rest goes through memory
            raise OSError(errno.EXDEV, "cross-device")
        return real(fi, fo, 3 << 20)

    def counted(fi: int, fo: int, n: int, *a: int) -> int:
        calls.append(n)
        return real(fi, fo, n, *a)

    through_memory: list[int] = []
    real_readv = os.readv

    def readv(fd: int, bufs: list[memoryview]) -> int:
        n = real_readv(fd, bufs)
        through_memory.append(n)
        return n

    monkeypatch.setattr(os, "copy_file_range", counted if kernel else refuse_after_first)
    monkeypatch.setattr(os, "readv", readv)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        assert atomic.copy_fd(fi.fileno(), fo.fileno()) == len(data)
    assert dst.read_bytes() == data
    if kernel:  # copy_file_range until it reports the end (a 0); nothing through this process
        assert calls[-1:] and through_memory == []
    else:  # 3 MiB in the kernel, then the refusal; the rest through memory
        assert len(calls) == 2 and sum(through_memory) == len(data) - (3 << 20)


def test_atomic_copy_replaces_the_target_with_the_source_bytes(tmp_path: Path) -> None:
    from provision.io.atomic import atomic_copy

    src, target = tmp_path / "src.bin", tmp_path / "out" / "t.bin"
    data = os.urandom(5 << 20)
    src.write_bytes(data)
    target.parent.mkdir()
    target.write_bytes(b"old")
    atomic_copy(src, target)
    assert target.read_bytes() == data and sorted(p.name for p in target.parent.iterdir()) == ["t.bin"]
