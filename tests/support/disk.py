"""A real small filesystem for disk-full tests: a tmpfs of a given size (or inode count), and a
filler that writes until the filesystem refuses."""

from __future__ import annotations

import contextlib
import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from provision.testing.ci import IN_CI


@contextlib.contextmanager
def small_tmpfs(path: Path, size: int, *, inodes: int | None = None) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes (and at most ``inodes`` files) mounted at ``path`` (root only: in CI a
    failure to mount fails the test)."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size},mode=0755" + (f",nr_inodes={inodes}" if inodes else "")
    cp = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                        capture_output=True, text=True, check=False)
    if cp.returncode != 0:
        msg = f"cannot mount a {size}-byte tmpfs at {path} (needs root): {cp.stderr.strip()}"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Write ``path`` until the filesystem refuses (ENOSPC): the disk is then full."""
    with open(path, "wb") as fh:
        try:
            while True:
                fh.write(b"\xff" * (64 << 10))
                fh.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return path
