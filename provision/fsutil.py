"""Filesystem helpers every stage shares: atomic writes, hostile-path checks, free space.

* ``atomic_writer``/``atomic_write_bytes``: write to a unique temporary name beside the
  target, fsync, rename, fsync the folder. A crash leaves the old file or the new one,
  never a half file under the final name. Temporary names start with ``.provision-tmp-``
  so ``gc`` can find them.
* ``safe_relpath``/``safe_join``: paths that come from outside (torrents, manifests, hub
  listings) must stay inside their destination: no absolute paths, no ``..``, no NUL, no
  backslashes, no symlink on the way that leads out.
* ``free_bytes``: free space of the filesystem that would hold a path (walking up to the
  nearest existing parent).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from provision.errors import DiskSpaceError, HostileContentError

TMP_PREFIX = ".provision-tmp-"


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(target: Path, mode: str = "wb", *, perms: int = 0o644) -> Iterator[IO[bytes]]:
    """Yield a file object; on clean exit it replaces ``target`` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + target.name + ".", dir=target.parent)
    ok = False
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh  # type: ignore[misc]
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, perms)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        ok = True
    except OSError as e:
        if e.errno == 28:  # ENOSPC
            raise DiskSpaceError(
                f"No space left on the device while writing {target}.",
                hint="Free some space or choose another destination, then run again.",
                path=str(target),
            ) from e
        raise
    finally:
        if not ok:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_write_bytes(target: Path, data: bytes, *, perms: int = 0o644) -> None:
    with atomic_writer(target, perms=perms) as fh:
        fh.write(data)


def atomic_write_text(target: Path, text: str, *, perms: int = 0o644) -> None:
    atomic_write_bytes(target, text.encode("utf-8"), perms=perms)


def safe_relpath(name: str, *, what: str = "path") -> PurePosixPath:
    """Validate a relative path that came from outside; return it normalised.

    Raises ``HostileContentError`` for absolute paths, ``..`` components, NUL bytes,
    backslashes, drive letters and empty names.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise HostileContentError(f"Refusing {what} {name!r}: empty or contains a NUL byte.", path=str(name))
    if "\\" in name:
        raise HostileContentError(f"Refusing {what} {name!r}: backslashes are not allowed.", path=name)
    p = PurePosixPath(name)
    if p.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise HostileContentError(f"Refusing {what} {name!r}: absolute paths are not allowed.", path=name)
    parts = [x for x in p.parts if x not in ("", ".")]
    if not parts or any(x == ".." for x in parts):
        raise HostileContentError(
            f"Refusing {what} {name!r}: it would leave the destination folder ('..').", path=name
        )
    return PurePosixPath(*parts)


def safe_join(root: Path, name: str, *, what: str = "path") -> Path:
    """Join a hostile relative path under ``root`` and check no symlink leads out."""
    rel = safe_relpath(name, what=what)
    target = Path(root) / Path(*rel.parts)
    root_real = Path(root).resolve()
    # resolve() follows symlinks on every existing component
    resolved = target.resolve()
    if resolved != root_real and root_real not in resolved.parents:
        raise HostileContentError(
            f"Refusing {what} {name!r}: it resolves outside {root} through a symlink.", path=name
        )
    return target


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
        from provision.console import human_bytes

        raise DiskSpaceError(
            f"Not enough disk space for {what} in {nearest_existing(path)}: "
            f"need {human_bytes(needed)}, {human_bytes(free)} free.",
            hint="Free some space or pass another --home/--dest.",
            needed=needed,
            free=free,
            path=str(path),
        )
