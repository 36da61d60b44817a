"""The safetensors format, read side: the dtype table, the bounded header reader and its checks.

``DTYPES`` is the one table of safetensors dtypes (bits per element, the matching ``torch`` dtype
named as a string). The header reader is bounded (``MAX_HEADER_BYTES``) and proves a header well
formed: no duplicate keys, known dtypes, sizes that match shapes, offsets that tile the data
section exactly; its memory is bounded by ``MAX_HEADER_ITEMS`` as well as by the byte limit; ``check_index`` checks an index against its shards. Written by hand rather than
through the ``safetensors`` library, which mmaps, needs a tensor framework and reports failures
we cannot map to a one-line error. It never imports torch, reads tensor data or writes.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.errors import HostileContentError, StructureError
from provision.io.diskio import read_full
from provision.io.opening import open_regular, read_regular
from provision.io.paths import safe_relpath

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit is 100 MB
# At most this many JSON values (keys, objects, arrays, strings, numbers) in one header, bounded by
# counting ``,``/``[``/``{`` before parsing. A tensor entry takes about 16, so this is ~156,000 tensors
# per file (Mistral Large 2 has 795 in all). With it, parsing a header peaks at about twice its bytes
# (the raw buffer and its decoded text) plus at most ~300 MB of parsed values.
MAX_HEADER_ITEMS = 2_500_000
MAX_INDEX_BYTES = 100_000_000


@dataclass(frozen=True)
class Dtype:
    """One safetensors dtype: its name in headers, its size, and torch's name for it (if mapped)."""

    name: str  # e.g. "BF16"
    bits: int
    torch: str | None = None  # e.g. "bfloat16" (``torch.bfloat16``); None where provision maps none


# safetensors' Dtype enum (0.8); the torch names are the ones provision converts between
DTYPES: dict[str, Dtype] = {d.name: d for d in (
    Dtype("BOOL", 8, "bool"),
    Dtype("F4", 4),
    Dtype("F6_E2M3", 6),
    Dtype("F6_E3M2", 6),
    Dtype("U8", 8, "uint8"),
    Dtype("I8", 8, "int8"),
    Dtype("F8_E5M2", 8, "float8_e5m2"),
    Dtype("F8_E4M3", 8, "float8_e4m3fn"),
    Dtype("F8_E8M0", 8),
    Dtype("I16", 16, "int16"),
    Dtype("U16", 16),
    Dtype("F16", 16, "float16"),
    Dtype("BF16", 16, "bfloat16"),
    Dtype("I32", 32, "int32"),
    Dtype("U32", 32),
    Dtype("F32", 32, "float32"),
    Dtype("C64", 64),
    Dtype("F64", 64, "float64"),
    Dtype("I64", 64, "int64"),
    Dtype("U64", 64),
)}
DTYPE_BITS: dict[str, int] = {n: d.bits for n, d in DTYPES.items()}
DTYPE_BYTES: dict[str, int] = {n: d.bits // 8 for n, d in DTYPES.items() if d.bits % 8 == 0}
TORCH_NAMES: dict[str, str] = {n: d.torch for n, d in DTYPES.items() if d.torch}  # "BF16" -> "bfloat16"
FROM_TORCH: dict[str, str] = {t: n for n, t in TORCH_NAMES.items()}  # "bfloat16" -> "BF16"


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset within the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsInfo:
    path: Path
    size: int  # file size in bytes
    header_len: int  # N, the little-endian u64 at offset 0
    metadata: dict[str, str] = field(default_factory=dict)  # the "__metadata__" table
    tensors: dict[str, TensorInfo] = field(default_factory=dict)  # name -> (dtype, shape, begin, end)

    @property
    def data_offset(self) -> int:
        """Where the data section starts in the file (8 + header_len)."""
        return 8 + self.header_len

    @property
    def data_bytes(self) -> int:
        return self.size - self.data_offset

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: t.shape for k, t in self.tensors.items()}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _bad(path: Path, what: str, **context: Any) -> StructureError:
    return StructureError(
        f"{path.name} is not a valid safetensors file: {what}.",
        hint="The file is damaged or truncated; delete it and fetch it again.",
        path=str(path),
        **context,
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _tensor(path: Path, name: str, entry: Any) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _bad(path, f"tensor {name!r} entry is not an object", tensor=name)
    extra = sorted(set(entry) - {"dtype", "shape", "data_offsets"})
    if extra:
        raise _bad(path, f"tensor {name!r} has unknown field {extra[0]!r}", tensor=name)
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _bad(path, f"tensor {name!r} has unknown dtype {dtype!r}", tensor=name, dtype=str(dtype))
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise _bad(path, f"tensor {name!r} has an invalid shape {shape!r}", tensor=name)
    offs = entry.get("data_offsets")
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) and o >= 0 for o in offs)):
        raise _bad(path, f"tensor {name!r} has invalid data_offsets {offs!r}", tensor=name)
    begin, end = offs
    if end < begin:
        raise _bad(path, f"tensor {name!r} ends before it begins ({begin} > {end})", tensor=name)
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != end - begin:
        raise _bad(
            path,
            f"tensor {name!r} is {dtype}{list(shape)} ({bits / 8:g} bytes) but its offsets span {end - begin} bytes",
            tensor=name,
            expected=bits / 8,
            actual=end - begin,
        )
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def read_header(fd: int, path: Path) -> bytearray:
    """The raw header of the open file ``fd``: the 8-byte length then the N JSON bytes.

    Raises ``HostileContentError`` for something other than a regular file or a header length
    over ``MAX_HEADER_BYTES`` (nothing that large is read), ``StructureError`` for a file too
    short for the length it claims. Reads 8 + N bytes into one buffer, never the data.
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise HostileContentError(f"Refusing {path.name}: not a regular file.", path=str(path))
    size = st.st_size
    if size < 8:
        raise _bad(path, f"the file is {size} bytes, shorter than the 8-byte header length", size=size)
    head = os.pread(fd, 8, 0)
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise HostileContentError(
            f"Refusing {path.name}: its header claims {n:,d} bytes (the limit is {MAX_HEADER_BYTES:,d}).",
            hint="This is not a genuine checkpoint; delete it and fetch it again from a trusted source.",
            path=str(path),
            header_len=n,
        )
    if 8 + n > size:
        raise _bad(path, f"the header length {n:,d} points past the end of the {size:,d}-byte file",
                   header_len=n, size=size)
    raw = bytearray(8 + n)
    raw[:8] = head
    if 8 + read_full(fd, memoryview(raw)[8:], 8) < 8 + n:
        raise _bad(path, "the file shrank while its header was read")
    return raw


def _items_bound(raw: bytes | bytearray, start: int) -> int:
    """An upper bound on the JSON values (keys included) in ``raw[start:]``, counted without
    parsing or copying: every value but the first follows a ``,`` or opens a container (an
    object's key and value count as two)."""
    return 1 + 2 * sum(raw.count(c, start) for c in (b",", b"[", b"{"))


def parse_header(path: Path, raw: bytes | bytearray, size: int) -> SafetensorsInfo:
    """Check the header ``raw`` (as ``read_header`` returns it) of the ``size``-byte file ``path``:
    at most ``MAX_HEADER_ITEMS`` JSON values (counted before parsing), JSON without duplicate keys,
    known dtypes, byte lengths that match shapes, offsets that do not overlap and cover the data
    section exactly. Raises ``HostileContentError`` for too many values, else ``StructureError``."""
    n = len(raw) - 8
    items = _items_bound(raw, 8)
    if items > MAX_HEADER_ITEMS:
        raise HostileContentError(
            f"Refusing {path.name}: its header holds up to {items:,d} JSON values (the limit is "
            f"{MAX_HEADER_ITEMS:,d}, about {MAX_HEADER_ITEMS // 16:,d} tensors).",
            hint="This is not a genuine checkpoint; delete it and fetch it again from a trusted source.",
            path=str(path), header_len=n)
    try:
        text = str(memoryview(raw)[8:], "utf-8")  # one copy, not a slice and then a decode
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(path, f"the header is not valid JSON ({e})", header_len=n) from None
    del text
    if not isinstance(header, dict):
        raise _bad(path, "the header is not a JSON object", header_len=n)
    meta_raw = header.pop("__metadata__", {})
    if meta_raw is None:
        meta_raw = {}
    if not isinstance(meta_raw, dict) or not all(isinstance(v, str) for v in meta_raw.values()):
        raise _bad(path, "__metadata__ must map strings to strings")
    tensors = {name: _tensor(path, name, entry) for name, entry in header.items()}
    data_len = size - 8 - n
    ordered = sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end))
    # overlaps first (the hostile case), then gaps and bounds
    for (prev, p), (name, t) in itertools.pairwise(ordered):
        if t.begin < p.end:
            raise _bad(path, f"tensors {prev!r} and {name!r} overlap (bytes {t.begin:,d}..{min(t.end, p.end):,d})",
                       tensor=name, other=prev)
    cursor = 0
    for name, t in ordered:
        if t.begin > cursor:
            raise _bad(path, f"{t.begin - cursor} bytes before tensor {name!r} belong to no tensor",
                       tensor=name)
        if t.end > data_len:
            raise _bad(path, f"tensor {name!r} ends at {t.end:,d}, past the {data_len:,d}-byte data section",
                       tensor=name, expected=data_len, actual=t.end)
        cursor = t.end
    if cursor != data_len:
        raise _bad(path, f"the tensors cover {cursor:,d} bytes but the data section holds {data_len:,d} "
                         f"(file size {size:,d})", expected=8 + n + cursor, actual=size)
    return SafetensorsInfo(path=path, size=size, header_len=n, metadata=dict(meta_raw), tensors=tensors)


def check_safetensors(path: Path, *, root: Path | None = None) -> SafetensorsInfo:
    """Prove ``path`` is a well-formed safetensors file; return its header facts.

    Raises ``HostileContentError`` for a special file, a symlink out of ``root`` (when given), a
    header length over ``MAX_HEADER_BYTES`` or too many values, and ``StructureError`` for
    everything else. Reads 8 + N bytes, never the data.
    """
    path = Path(path)
    try:
        fd = open_regular(path, root=root, what="weights file")
    except OSError as e:
        raise StructureError(f"Cannot open {path.name}: {e.strerror}.", path=str(path)) from None
    try:
        raw = read_header(fd, path)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    return parse_header(path, raw, size)


@dataclass(frozen=True)
class IndexInfo:
    path: Path
    metadata: dict[str, Any]
    weight_map: dict[str, str]  # tensor -> shard path relative to the index's folder

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))


def read_index(path: Path) -> IndexInfo:
    """Parse a ``*.safetensors.index.json`` (``{"metadata": ..., "weight_map": {tensor: shard}}``)."""
    path = Path(path)
    try:
        raw = read_regular(path, root=path.parent, what="index", max_bytes=MAX_INDEX_BYTES)
        if _items_bound(raw, 0) > MAX_HEADER_ITEMS:
            raise HostileContentError(f"Refusing {path.name}: it holds far too many JSON values for an index.",
                                      path=str(path))
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except OSError as e:
        raise StructureError(f"Cannot read {path.name}: {e.strerror}.", path=str(path)) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise StructureError(f"{path.name} is not valid JSON ({e}).", hint="Fetch it again.",
                             path=str(path)) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise StructureError(f"{path.name} has no 'weight_map' object.", hint="Fetch it again.", path=str(path))
    wm = doc["weight_map"]
    for k, v in wm.items():
        if not isinstance(v, str):
            raise StructureError(f"{path.name}: tensor {k!r} maps to {v!r}, not a file name.", path=str(path))
        safe_relpath(v, what=f"shard named by {path.name}")  # HostileContentError for '..' and friends
    meta = doc.get("metadata") or {}
    return IndexInfo(path=path, metadata=meta if isinstance(meta, dict) else {}, weight_map=dict(wm))


def check_index(path: Path, shards: Mapping[str, SafetensorsInfo] | None = None) -> IndexInfo:
    """Check that an index maps every tensor to a shard that exists and holds it, and that the
    shards hold no tensor the index does not name. ``shards`` may pass already-checked headers."""
    idx = read_index(path)
    folder = Path(path).parent
    infos: dict[str, SafetensorsInfo] = {}
    for shard in idx.shards:
        info = (shards or {}).get(shard)
        if info is None:
            p = folder / shard
            if not p.is_file():
                raise StructureError(
                    f"{Path(path).name} names shard {shard!r}, which is missing.",
                    hint="Fetch the missing shard (or the whole folder) again.",
                    path=str(path), shard=shard,
                )
            info = check_safetensors(p)
        infos[shard] = info
    for tensor, shard in sorted(idx.weight_map.items()):
        if tensor not in infos[shard].tensors:
            raise StructureError(
                f"{Path(path).name} places tensor {tensor!r} in {shard!r}, which does not hold it.",
                hint="The index and its shards come from different revisions; fetch them again.",
                path=str(path), tensor=tensor, shard=shard,
            )
    for shard, info in sorted(infos.items()):
        for tensor in sorted(info.tensors):
            if idx.weight_map.get(tensor) != shard:
                raise StructureError(
                    f"Shard {shard!r} holds tensor {tensor!r}, which {Path(path).name} does not map to it.",
                    hint="The index and its shards come from different revisions; fetch them again.",
                    path=str(path), tensor=tensor, shard=shard,
                )
    return idx
