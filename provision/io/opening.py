"""Opening a file that came from outside: only a regular file, never blocking, never out of its folder.

``open_regular`` is the one way provision opens a file it did not write itself (a source folder's
weights and side files, verify's inputs, a manifest, a pickle to import): it refuses, with a
one-line ``HostileContentError`` (exit 5), a symlink that resolves outside ``root``, and a FIFO,
socket or device. The type is checked with ``stat`` before the open and again with ``fstat`` on
the descriptor (which must be the same file), and the open itself uses ``O_NONBLOCK``, so a FIFO
swapped in between the two checks cannot block either. ``read_regular`` reads a whole small
file that way, with a size cap. Nothing here writes, and a missing file is the caller's
``FileNotFoundError``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from pathlib import Path

from provision.errors import HostileContentError

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _inside(path: Path, root: Path) -> bool:
    real, base = path.resolve(), root.resolve()
    return real == base or base in real.parents


def check_regular(path: Path, *, root: Path | None = None, what: str = "file") -> os.stat_result:
    """The ``stat`` of ``path`` after checking it is a regular file that stays inside ``root``.

    ``root`` (the folder the file came in) makes a symlink that resolves outside it a refusal;
    without ``root`` symlinks are followed. Raises ``HostileContentError``, or ``OSError`` (e.g.
    ``FileNotFoundError``) when the file cannot be looked at. Opens nothing.
    """
    path = Path(path)
    lst = os.lstat(path)
    if stat.S_ISLNK(lst.st_mode) and root is not None and not _inside(path, Path(root)):
        raise HostileContentError(f"Refusing {what} {path.name}: it is a symlink out of {root}.", path=str(path))
    if root is not None and not _inside(path.parent, Path(root)):
        raise HostileContentError(f"Refusing {what} {path.name}: its folder resolves outside {root}.",
                                  path=str(path))
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise HostileContentError(f"Refusing {what} {path.name}: it is {_kind(st.st_mode)}, not a regular file.",
                                  path=str(path))
    return st


def open_regular(path: Path, *, root: Path | None = None, what: str = "file") -> int:
    """A read-only descriptor of the regular file ``path`` (checks of ``check_regular``), opened
    without blocking; the caller closes it. The descriptor is left in blocking mode."""
    path = Path(path)
    before = check_regular(path, root=root, what=what)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            raise HostileContentError(f"Refusing {what} {path.name}: it was replaced while being opened "
                                      f"({_kind(st.st_mode)}).", path=str(path))
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    except BaseException:
        with contextlib.suppress(OSError):  # closing a read-only descriptor cannot lose data
            os.close(fd)
        raise
    return fd


def read_regular(path: Path, *, root: Path | None = None, what: str = "file", max_bytes: int) -> bytes:
    """The bytes of the regular file ``path`` (``open_regular``'s checks); a file over ``max_bytes``
    is refused (``HostileContentError``) before it is read."""
    fd = open_regular(path, root=root, what=what)
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise HostileContentError(f"Refusing {what} {Path(path).name}: {size:,d} bytes is over the "
                                      f"{max_bytes:,d}-byte limit for it.", path=str(path), size=size)
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise HostileContentError(f"Refusing {what} {Path(path).name}: it grew past the {max_bytes:,d}-byte limit "
                                  "while being read.", path=str(path))
    return data
