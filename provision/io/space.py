"""Free disk space: of the filesystem that would hold a path, a preflight that refuses a shortfall, and
the ``DiskSpaceError`` (exit 6) for a write the disk refused. It writes nothing."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from pathlib import Path

from provision.errors import DiskSpaceError
from provision.units import human_bytes


def nearest_existing(path: Path) -> Path:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(nearest_existing(path)).free


def staged_bytes(staging: Path, dest: Path) -> int:
    """Disk bytes a stopped download left in ``staging`` (sparse regions not counted), counted only
    when ``staging`` shares ``dest``'s filesystem (a verified file then moves into place by rename,
    taking no new space); symlinks are not followed."""
    try:
        same = os.stat(nearest_existing(staging)).st_dev == os.stat(nearest_existing(dest)).st_dev
    except OSError:  # gone meanwhile: nothing staged to count
        return 0
    if not same or not staging.is_dir() or staging.is_symlink():
        return 0
    total = 0
    for root, _dirs, files in os.walk(staging, followlinks=False):
        for name in files:
            with contextlib.suppress(OSError):  # removed while we walked: it takes no space
                st = os.lstat(os.path.join(root, name))
                if stat.S_ISREG(st.st_mode):
                    total += min(st.st_blocks * 512, st.st_size)
    return total


def check_free_space(path: Path, needed: int, *, what: str = "the download") -> None:
    free = free_bytes(path)
    if needed > free:
        raise DiskSpaceError(
            f"Not enough disk space for {what} in {nearest_existing(path)}: "
            f"need {human_bytes(needed)}, {human_bytes(free)} free.",
            hint="Free some space or pass another --home/--dest.",
            needed=needed,
            free=free,
            path=str(path),
        )


def check_run_space(path: Path, fetch_bytes: int, convert_bytes: int, *, drop_original: bool = False) -> None:
    """``DiskSpaceError`` (exit 6) unless the download and the conversion fit in ``path``'s filesystem at once,
    naming both numbers (the original is dropped only after the conversion, so the peak is their sum)."""
    free = free_bytes(path)
    need = fetch_bytes + convert_bytes
    if need <= free:
        return
    when = "; --drop-original frees the original only after the conversion passed" if drop_original else ""
    raise DiskSpaceError(
        f"Not enough disk space in {nearest_existing(path)}: the download needs {human_bytes(fetch_bytes)} and the "
        f"conversion {human_bytes(convert_bytes)}, {human_bytes(need)} at once{when}; {human_bytes(free)} free.",
        hint="Free some space or choose another --home.",
        needed=need, fetch_bytes=fetch_bytes, convert_bytes=convert_bytes, free=free, path=str(path))


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` is a write the filesystem refused for lack of space or quota."""
    return isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS


def disk_full_error(path: Path, *, kept: str = "the bytes written so far are kept") -> DiskSpaceError:
    """The one-line error for a write to ``path`` that ran out of space; ``kept`` says what stays."""
    free = free_bytes(path)
    return DiskSpaceError(f"No space left on the device while writing {path} ({human_bytes(free)} free); {kept}.",
                          hint="Free some space and run the same command again to resume.",
                          path=str(path), free=free)
