"""Free disk space: of the filesystem that would hold a path, and a preflight that refuses a shortfall."""

from __future__ import annotations

import shutil
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
