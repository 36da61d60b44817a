"""A piece-hashing worker process: ``python .../provision/stages/verify/worker.py``.

``parallel`` runs one per worker when a big file's torrent pieces are checked, so the hashing
threads never wait for each other's GIL (on a busy host every GIL hand-off waits for the
scheduler, and threads then run one at a time). The protocol is JSON lines, one job per line on
stdin and one result per line on stdout, until stdin closes:

* ``{"v1": [path, offset, piece_length, count]}`` -> ``{"sha1": [hex, ...], "padded": hex | null,
  "n": bytes read}``: the SHA-1 of each of ``count`` pieces from ``offset`` (a short last piece is
  hashed as read, and ``padded`` is its SHA-1 zero-padded to the piece length: the caller judges);
* ``{"v2": [path, first_chunk, count, chunk_leaves]}`` -> ``{"roots": [hex, ...], "n": bytes read}``:
  the BEP 52 subtree roots of ``count`` chunks;
* a file that cannot be read -> ``{"error": "<strerror>"}``.

It reads the files it is told to and writes nothing; it compares nothing (``content`` does).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import stat
import sys
from collections.abc import Callable
from typing import Any

# stdlib only, and run by path (not ``-m``): importing the ``provision`` package would cost each
# worker a quarter of a CPU second. ``tests/stages/test_verify_parallel_torrent.py`` checks these
# digests against ``digests`` and libtorrent's.
BLOCK = 1 << 20
V2_BLOCK = 16 * 1024
ZERO = bytes(32)


def read_range(path: str, offset: int, length: int, buf: memoryview, consume: Callable[[memoryview], None]) -> int:
    """Feed ``consume`` up to ``length`` bytes of the regular file ``path`` from ``offset``; the bytes read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
        os.set_blocking(fd, True)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_SEQUENTIAL)
        mv = memoryview(buf)
        total = 0
        with open(fd, "rb", buffering=0, closefd=False) as f:
            f.seek(offset)
            while total < length:
                n = f.readinto(mv[:min(len(buf), length - total)])
                if not n:
                    break
                consume(mv[:n])
                total += n
        return total
    finally:
        os.close(fd)


def v1_digests(path: str, offset: int, plen: int, count: int,
               buf: memoryview) -> tuple[list[bytes], bytes | None, int]:
    """SHA-1 of ``count`` pieces of ``plen`` bytes from ``offset`` (fewer when the file ends first),
    the zero-padded SHA-1 of a short last piece (else None), and the bytes read."""
    out: list[bytes] = []
    h = hashlib.sha1(usedforsecurity=False)
    got = 0

    def consume(mv: memoryview) -> None:
        nonlocal h, got
        pos, n = 0, len(mv)
        while pos < n:
            take = min(plen - got, n - pos)
            h.update(mv[pos:pos + take])
            got += take
            pos += take
            if got == plen:
                out.append(h.digest())
                h, got = hashlib.sha1(usedforsecurity=False), 0

    n = read_range(path, offset, plen * count, buf, consume)
    padded = None
    if got:
        out.append(h.digest())
        h.update(bytes(plen - got))
        padded = h.digest()
    return out, padded, n


def v2_chunk_root(path: str, index: int, chunk: int, buf: memoryview) -> tuple[bytes, int]:
    """BEP 52 subtree root over chunk ``index`` (``chunk`` leaves of 16 KiB), leaves past the end of
    the file zero; and the bytes read."""
    leaves: list[bytes] = []
    tail = bytearray()

    def consume(mv: memoryview) -> None:
        data: memoryview | bytes = mv
        if tail:  # a short read left part of a block
            tail.extend(mv)
            data = bytes(tail)
            tail.clear()
        full = len(data) - len(data) % V2_BLOCK
        for i in range(0, full, V2_BLOCK):
            leaves.append(hashlib.sha256(data[i:i + V2_BLOCK]).digest())
        tail.extend(data[full:])

    n = read_range(path, index * chunk * V2_BLOCK, chunk * V2_BLOCK, buf, consume)
    if tail:
        leaves.append(hashlib.sha256(tail).digest())
    row = leaves + [ZERO] * (chunk - len(leaves))
    while len(row) > 1:
        row = [hashlib.sha256(row[i] + row[i + 1]).digest() for i in range(0, len(row), 2)]
    return row[0], n


def run_job(job: dict[str, Any], buf: memoryview) -> dict[str, Any]:
    try:
        if "v1" in job:
            path, offset, plen, count = job["v1"]
            digests, padded, n = v1_digests(str(path), int(offset), int(plen), int(count), buf)
            return {"sha1": [d.hex() for d in digests], "padded": padded.hex() if padded else None, "n": n}
        path, first, count, chunk = job["v2"]
        roots, total = [], 0
        for i in range(int(first), int(first) + int(count)):
            root, n = v2_chunk_root(str(path), i, int(chunk), buf)
            roots.append(root.hex())
            total += n
        return {"roots": roots, "n": total}
    except OSError as e:
        return {"error": e.strerror or str(e)}


def main() -> int:
    buf = memoryview(mmap.mmap(-1, BLOCK))  # page-aligned: see provision.io.diskio.aligned_buffer
    for line in sys.stdin:
        if line.strip():
            sys.stdout.write(json.dumps(run_job(json.loads(line), buf)) + "\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
