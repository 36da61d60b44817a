"""Atomic writes: a unique temporary name beside the target, fsync, rename, fsync the folder.

A crash leaves the old file or the new one, never a half file under the final name. Temporary
names start with ``.provision-tmp-`` so ``gc`` can find them. Nothing here checks paths or space.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from provision.errors import DiskSpaceError

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
