"""Atomic writes: a unique temporary name beside the target, fsync, rename, fsync the folder.

A crash leaves the old file or the new one, never a half file under the final name. Temporary
names start with ``.provision-tmp-`` so ``gc`` can find them. A new file gets the mode a plain
``open()`` would give it (0o666 less the umask, so ``umask 002`` makes it group-writable) unless
the caller asks for another. ``durable=False`` skips the
fsyncs, for bookkeeping files whose loss only costs work, never trust. Nothing here checks
paths or space, or moves whole folders (``provision.io.staging`` does).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from provision.io.diskio import aligned_buffer
from provision.io.space import disk_full_error, is_disk_full

TMP_PREFIX = ".provision-tmp-"


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):  # no /proc or no Umask line (old kernels): ask os.umask
        pass
    old = os.umask(0o022)  # racy with other threads, only where /proc is missing
    os.umask(old)
    return old


def umask_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def fsync_path(path: os.PathLike[str] | str) -> None:
    """fsync one file by path (opened read-only for it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a folder so a rename in it survives a crash (best effort: some filesystems refuse it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder that cannot be opened (permissions, odd filesystems): the rename stands
        return
    try:
        os.fsync(fd)
    except OSError:  # EINVAL where a filesystem cannot fsync folders: the rename is done, only less durable
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def disk_full_is_exit_6(target: Path, kept: str = "nothing was written under that name") -> Iterator[None]:
    """Turn a full disk or quota (ENOSPC, EDQUOT) raised inside into the one-line DiskSpaceError (exit 6)."""
    try:
        yield
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(target, kept=kept) from e
        raise


@contextlib.contextmanager
def atomic_writer(target: Path, mode: str = "wb", *, perms: int | None = None, durable: bool = True) -> Iterator[IO[bytes]]:
    """Yield a file object; on clean exit it replaces ``target`` atomically (fsynced unless not ``durable``)."""
    target = Path(target)
    with disk_full_is_exit_6(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + target.name + ".", dir=target.parent)
        ok = False
        try:
            with os.fdopen(fd, mode) as fh:
                yield fh  # type: ignore[misc]
                fh.flush()
                if durable:
                    os.fsync(fh.fileno())
            os.chmod(tmp, umask_file_mode() if perms is None else perms)
            os.replace(tmp, target)
            if durable:
                fsync_dir(target.parent)
            ok = True
        finally:
            if not ok:
                with contextlib.suppress(OSError):  # already renamed or gone: the error on its way is the one to see
                    os.unlink(tmp)


def atomic_write_bytes(target: Path, data: bytes, *, perms: int | None = None, durable: bool = True) -> None:
    with atomic_writer(target, perms=perms, durable=durable) as fh:
        fh.write(data)


def atomic_write_text(target: Path, text: str, *, perms: int | None = None, durable: bool = True) -> None:
    atomic_write_bytes(target, text.encode("utf-8"), perms=perms, durable=durable)


COPY_BLOCK = 4 << 20
# copy_file_range refusals that mean "not between these two files": copy through memory instead
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF,
                   errno.EPERM}


def copy_fd(src: int, dst: int) -> int:
    """Copy what ``src`` holds from its offset to ``dst`` at its offset (both advance); the bytes copied.

    In the kernel (``copy_file_range``: no copy through this process, a reflink where the filesystem
    shares extents) where the pair allows it, else through a page-aligned buffer (a misaligned one
    is four times slower to fill on some CPUs: ``diskio.aligned_buffer``). A full disk raises."""
    total = 0
    if hasattr(os, "copy_file_range"):
        try:
            while k := os.copy_file_range(src, dst, 1 << 30):
                total += k
            return total
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
    buf = aligned_buffer(COPY_BLOCK)
    while n := os.readv(src, [buf]):
        view = buf[:n]
        while view:
            w = os.write(dst, view)
            view = view[w:]
        total += n
    return total


def atomic_copy(src: Path, target: Path, *, perms: int | None = None) -> None:
    """Copy ``src``'s bytes to ``target`` atomically and durably (e.g. across filesystems)."""
    with open(src, "rb") as fi, atomic_writer(target, perms=perms) as fo:
        fo.flush()
        copy_fd(fi.fileno(), fo.fileno())
