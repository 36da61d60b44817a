"""Files on disk for tests: raw safetensors bytes (no torch), header surgery, byte flips, a snapshot
that proves a failed command changed nothing, and reading a small safetensors file back.

Test-only helpers; no pytest fixtures here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from provision.formats.safetensors import DTYPE_BITS

Snapshot = dict[str, tuple[Any, ...]]


def snapshot(root: Path) -> Snapshot:
    """Every entry under ``root`` (not following symlinks): kind, size, mtime, mode and content hash."""
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            st = os.lstat(p)
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p), st.st_mtime_ns)
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode)
            elif p.is_file():
                out[rel] = ("file", st.st_size, st.st_mtime_ns, st.st_mode,
                            hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[rel] = ("special", st.st_mode, st.st_mtime_ns)
    return out


def safetensors_bytes(tensors: dict[str, tuple[str, list[int]]], *, metadata: dict[str, str] | None = None,
                      seed: int = 0) -> bytes:
    """A valid safetensors file holding ``{name: (dtype, shape)}`` with deterministic bytes."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    off = 0
    for name, (dtype, shape) in tensors.items():
        n = math.prod(shape) * DTYPE_BITS[dtype] // 8
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    data = hashlib.shake_256(f"data{seed}".encode()).digest(off) if off else b""
    return pack(header, data)


def pack(header: dict[str, Any], data: bytes, *, header_len: int | None = None) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    n = len(raw) if header_len is None else header_len
    return struct.pack("<Q", n) + raw + data


def read_parts(path: Path) -> tuple[dict[str, Any], bytes]:
    """(header dict, data section) of a safetensors file."""
    blob = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def rewrite_header(path: Path, header: dict[str, Any], data: bytes | None = None) -> None:
    """Write ``path`` again with a changed header (and the same data unless given)."""
    if data is None:
        _, data = read_parts(path)
    Path(path).write_bytes(pack(header, data))


def flip_byte(path: Path, offset: int) -> None:
    """Invert every bit of the byte at ``offset`` in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def data_offset(path: Path) -> int:
    """Where a safetensors file's data section starts (8 + header length)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


def load_st(path: Path) -> dict[str, Any]:
    """Every tensor of a safetensors file (small test files only)."""
    from safetensors.torch import load_file

    return dict(load_file(str(path)))
