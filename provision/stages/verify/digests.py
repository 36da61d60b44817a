"""The content digests other than a plain sha256: git's blob id and the BEP 52 merkle root.

``git_blob_sha1`` is the Hub's id of a non-LFS file; ``merkle_root_file`` the torrent v2
pieces root of a whole file. The v2 tree is also exposed in pieces (``v2_geometry``,
``v2_chunk_root``, ``merkle_reduce``, ``pad_hash``) so ``parallel`` can hash chunks of one
file on several threads and reduce them here. The whole-file sha256 is
``provision.io.hashing.sha256_file``. Nothing here compares a digest with an authority.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from provision.errors import VerifyError
from provision.io.diskio import aligned_buffer, read_full
from provision.io.hashing import BLOCK_SIZE, open_regular, stream_file

V2_BLOCK = 16 * 1024  # BEP 52 leaf block
V2_CHUNK_LEAVES = 256  # a worker reduces 256 leaves (4 MiB) to one subtree root
ZERO = bytes(32)


def git_blob_sha1(path: Path) -> str:
    """Git's blob id of a file: SHA-1 of ``b"blob <size>\\0" + content`` (the Hub's non-LFS oid)."""
    path = Path(path)
    size = os.stat(path).st_size
    h = hashlib.sha1(b"blob %d\x00" % size, usedforsecurity=False)
    n = stream_file(path, h.update)
    if n != size:
        raise VerifyError(f"{path.name} changed size while it was hashed; run again.", path=str(path))
    return h.hexdigest()


def pad_hash(level: int) -> bytes:
    """Root of an all-zero merkle subtree with 2**level leaves (BEP 52 padding)."""
    h = ZERO
    for _ in range(level):
        h = hashlib.sha256(h + h).digest()
    return h


def merkle_reduce(nodes: list[bytes], width: int, pad: bytes) -> bytes:
    """Root of a tree whose bottom row is ``nodes`` padded with ``pad`` to ``width`` (a power of two)."""
    row = nodes + [pad] * (width - len(nodes))
    while len(row) > 1:
        row = [hashlib.sha256(row[i] + row[i + 1]).digest() for i in range(0, len(row), 2)]
    return row[0]


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def v2_geometry(size: int) -> tuple[int, int, int]:
    """(number of chunks, leaves per chunk, total leaves) of a file's BEP 52 tree."""
    nblocks = -(-size // V2_BLOCK)
    total = _next_pow2(nblocks)
    chunk = min(V2_CHUNK_LEAVES, total)
    return -(-nblocks // chunk), chunk, total


def v2_root(chunk_roots: list[bytes], chunk: int, total: int) -> bytes:
    """The pieces root from every chunk's subtree root (``v2_geometry``'s chunk and total)."""
    return merkle_reduce(chunk_roots, total // chunk, pad_hash(chunk.bit_length() - 1))


def v2_chunk_roots(path: Path, first: int, count: int, chunk: int, buf: bytearray | memoryview | None = None,
                   on_bytes: Callable[[int], None] | None = None) -> list[bytes]:
    """Roots of the subtrees over chunks ``first`` .. ``first + count - 1`` (``chunk`` leaves of
    16 KiB each) of ``path`` (``v2_chunk_roots_fd`` on one open of it)."""
    fd = open_regular(path)
    try:
        return v2_chunk_roots_fd(fd, first, count, chunk, buf, on_bytes)
    finally:
        os.close(fd)


def v2_chunk_roots_fd(fd: int, first: int, count: int, chunk: int, buf: bytearray | memoryview | None = None,
                      on_bytes: Callable[[int], None] | None = None) -> list[bytes]:
    """``v2_chunk_roots`` of an open file: positioned reads into ``buf`` (whole leaves at a time;
    page-aligned by default, so an ``O_DIRECT`` descriptor works) and the leaves hashed straight
    from it. Leaves past the end of the file are zero (BEP 52); a short last block is hashed as it is."""
    span = chunk * V2_BLOCK
    if buf is None or len(buf) < V2_BLOCK:
        buf = aligned_buffer(span)
    step = min(span, len(buf) - len(buf) % V2_BLOCK)
    mv = memoryview(buf)
    sha256 = hashlib.sha256
    roots: list[bytes] = []
    for index in range(first, first + count):
        leaves: list[bytes] = []
        for off in range(index * span, (index + 1) * span, step):
            got = read_full(fd, mv[:step], off)
            full = got - got % V2_BLOCK
            leaves += [sha256(mv[k:k + V2_BLOCK]).digest() for k in range(0, full, V2_BLOCK)]
            if full < got:
                leaves.append(sha256(mv[full:got]).digest())
            if got and on_bytes is not None:
                on_bytes(got)
            if got < step:
                break
        roots.append(merkle_reduce(leaves, chunk, ZERO))
    return roots


def v2_chunk_root(path: Path, index: int, chunk: int, buf: bytearray | memoryview | None = None,
                  on_bytes: Callable[[int], None] | None = None) -> bytes:
    """Root of the subtree over chunk ``index`` (``chunk`` leaves of 16 KiB) of ``path``."""
    return v2_chunk_roots(path, index, 1, chunk, buf, on_bytes)[0]


def merkle_root_file(path: Path) -> bytes | None:
    """BEP 52 pieces root of a whole file (single thread); ``None`` for an empty file."""
    size = os.stat(path).st_size
    if size == 0:
        return None
    nchunks, chunk, total = v2_geometry(size)
    return v2_root(v2_chunk_roots(path, 0, nchunks, chunk, aligned_buffer(BLOCK_SIZE)), chunk, total)
