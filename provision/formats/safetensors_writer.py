"""A streaming safetensors writer: the header first, then the tensors one by one (in pieces if need
be), so a 25 GB checkpoint never sits in memory.

``plan_shards`` splits the entries into shards (a tensor is never split); a ``ShardWriter`` writes
one file under a ``.provision-tmp-`` name beside its target, keeping a reserve of header spaces so
metadata known only at the end (source hashes) is patched in place before fsync and rename; a
``CheckpointWriter`` adds the index, and nothing appears under a final name until ``commit()``
(``remove_stale_temporaries`` cleans up after a killed run). It does not read checkpoints,
convert tensors or choose names.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.errors import ConvertError
from provision.formats.safetensors import DTYPE_BYTES
from provision.io.atomic import TMP_PREFIX, disk_full_is_exit_6, fsync_dir

DEFAULT_SHARD_BYTES = 5 * 10**9



@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16", "F8_E4M3", "I32"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        if self.dtype not in DTYPE_BYTES:
            raise ConvertError(f"Unknown safetensors dtype {self.dtype!r} for tensor {self.name!r}.")
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


def plan_shards(entries: Iterable[TensorEntry], max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[list[TensorEntry]]:
    """Split entries, in order, into shards of at most ``max_shard_bytes`` (one oversize tensor gets its own)."""
    shards: list[list[TensorEntry]] = []
    cur: list[TensorEntry] = []
    size = 0
    for e in entries:
        if cur and size + e.nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += e.nbytes
    if cur:
        shards.append(cur)
    return shards


def build_header(entries: list[TensorEntry], metadata: Mapping[str, str] | None, reserve: int = 0) -> bytes:
    """The 8-byte length + JSON header for ``entries`` laid out back to back, padded to 8 bytes."""
    doc: dict[str, Any] = {}
    if metadata:
        doc["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    seen: set[str] = set()
    for e in entries:
        if e.name in seen:
            raise ConvertError(f"Tensor {e.name!r} appears twice in one shard.")
        seen.add(e.name)
        doc[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
        off += e.nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode()
    n = len(raw) + reserve
    n += (-n) % 8
    return n.to_bytes(8, "little") + raw.ljust(n, b" ")


class ShardWriter:
    """One safetensors file written tensor by tensor under a temporary name."""

    def __init__(self, path: Path, entries: list[TensorEntry], metadata: Mapping[str, str] | None = None,
                 *, reserve: int = 0) -> None:
        self.path = Path(path)
        self.entries = list(entries)
        self.metadata: dict[str, str] = dict(metadata or {})
        self.header = build_header(self.entries, self.metadata, reserve)
        self.data_bytes = sum(e.nbytes for e in self.entries)
        self.tmp = self.path.parent / f"{TMP_PREFIX}{self.path.name}.{secrets.token_hex(4)}"
        self._index = 0  # entry being written
        self._written = 0  # bytes of the current entry written so far
        self._fd: int | None = None
        self._flusher: Any = None  # threading.Thread flushing a complete shard early
        self.finished = False

    @property
    def size(self) -> int:
        return len(self.header) + self.data_bytes

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask decides, as for open()
        self._write(self.header)

    def _write(self, data: bytes | memoryview) -> None:
        assert self._fd is not None
        mv = memoryview(data).cast("B")
        with disk_full_is_exit_6(self.path, kept="the conversion wrote nothing under its final name"):
            while mv:
                n = os.write(self._fd, mv)
                mv = mv[n:]

    @property
    def current(self) -> TensorEntry | None:
        return self.entries[self._index] if self._index < len(self.entries) else None

    def write(self, name: str, data: bytes | memoryview) -> None:
        """Append bytes of tensor ``name``; tensors must come in entry order, pieces in byte order."""
        if self._fd is None:
            self.open()
        cur = self.current
        if cur is None or cur.name != name:
            want = cur.name if cur else "nothing more"
            raise ConvertError(f"Writer of {self.path.name} expected {want}, got {name!r}.")
        n = memoryview(data).nbytes
        if self._written + n > cur.nbytes:
            raise ConvertError(f"Tensor {name!r} is {cur.nbytes} bytes; {self._written + n} were written.")
        self._write(data)
        self._written += n
        if self._written == cur.nbytes:
            self._index += 1
            self._written = 0
            if self._index == len(self.entries):
                self._start_flush()

    def _start_flush(self) -> None:
        """Flush the finished data to disk on a helper thread while later shards are converted."""
        import threading

        fd = self._fd

        def run() -> None:
            if fd is not None:
                with contextlib.suppress(OSError):  # finish() fsyncs again and reports errors
                    os.fdatasync(fd)

        self._flusher = threading.Thread(target=run, daemon=True)
        self._flusher.start()

    def finish(self, metadata_update: Mapping[str, str] | None = None) -> None:
        """Check everything was written, patch the metadata (within the reserve), fsync and close."""
        if self._fd is None:
            self.open()
        assert self._fd is not None
        if self._flusher is not None:
            self._flusher.join()
        if self._index != len(self.entries):
            cur = self.current
            raise ConvertError(f"{self.path.name} is incomplete: tensor {cur.name if cur else '?'} not written.")
        if metadata_update:
            self.metadata.update({str(k): str(v) for k, v in metadata_update.items()})
            new = build_header(self.entries, self.metadata, 0)
            if len(new) > len(self.header):
                raise ConvertError(f"Metadata for {self.path.name} outgrew the space reserved in its header.")
            length = len(self.header) - 8
            body = new[8:].rstrip(b" ").ljust(length, b" ")
            os.pwrite(self._fd, length.to_bytes(8, "little") + body, 0)
        with disk_full_is_exit_6(self.path, kept="the conversion wrote nothing under its final name"):
            os.fsync(self._fd)
        # advice only (and missing on macOS): pages left cached cost memory, not correctness
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(self._fd)
        self._fd = None
        self.finished = True

    def commit(self) -> None:
        if not self.finished:
            raise ConvertError(f"{self.path.name} was committed before it was finished.")
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self._flusher is not None:
            self._flusher.join()
        if self._fd is not None:
            with contextlib.suppress(OSError):  # the file is being thrown away: a failed close loses nothing
                os.close(self._fd)
            self._fd = None
        with contextlib.suppress(OSError):  # never created, or already gone: nothing to clean up
            os.unlink(self.tmp)


@dataclass
class CheckpointWriter:
    """Shards (and, when there are several or ``index_name`` is forced, an index) under ``out_dir``.

    ``names`` gives each shard's final file name. Write tensors in entry order across shards
    with ``write``; ``finish(metadata_update)`` patches and fsyncs every shard; ``commit()``
    renames them into place and writes the index last.
    """

    out_dir: Path
    shards: list[list[TensorEntry]]
    names: list[str]
    metadata: dict[str, str] = field(default_factory=dict)
    reserve: int = 0
    index_name: str | None = None
    writers: list[ShardWriter] = field(init=False)
    _owner: dict[str, int] = field(init=False)
    _cur: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if len(self.names) != len(self.shards):
            raise ConvertError("CheckpointWriter needs one file name per shard.")
        self.writers = [ShardWriter(Path(self.out_dir) / n, s, self.metadata, reserve=self.reserve)
                        for n, s in zip(self.names, self.shards, strict=True)]
        self._owner = {e.name: i for i, s in enumerate(self.shards) for e in s}

    @property
    def total_size(self) -> int:
        return sum(w.size for w in self.writers)

    @property
    def data_bytes(self) -> int:
        return sum(w.data_bytes for w in self.writers)

    def write(self, name: str, data: bytes | memoryview) -> None:
        i = self._owner.get(name)
        if i is None:
            raise ConvertError(f"Tensor {name!r} is not part of this checkpoint.")
        if i < self._cur:
            raise ConvertError(f"Tensor {name!r} arrived after its shard was finished.")
        self._cur = i
        self.writers[i].write(name, data)

    def finish(self, metadata_update: Mapping[str, str] | None = None) -> None:
        for w in self.writers:
            w.finish(metadata_update)

    def index_doc(self) -> dict[str, Any]:
        return {"metadata": {"total_size": self.data_bytes, **self.metadata},
                "weight_map": {e.name: self.names[i] for i, s in enumerate(self.shards) for e in s}}

    def commit(self) -> list[Path]:
        """Rename every shard into place, then write the index; return the final paths."""
        from provision.io.atomic import atomic_write_text

        out = []
        for w in self.writers:
            w.commit()
            out.append(w.path)
        if self.index_name:
            idx = Path(self.out_dir) / self.index_name
            doc = self.index_doc()
            doc["metadata"] = {"total_size": self.data_bytes}
            atomic_write_text(idx, json.dumps(doc, indent=2) + "\n")
            out.append(idx)
        fsync_dir(Path(self.out_dir))
        return out

    def abort(self) -> None:
        for w in self.writers:
            w.abort()


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Delete ``.provision-tmp-*`` files a killed run left in ``out_dir``; return what was removed."""
    removed: list[Path] = []
    d = Path(out_dir)
    if not d.is_dir():
        return removed
    for p in d.iterdir():
        if p.name.startswith(TMP_PREFIX) and (p.is_file() or p.is_symlink()):
            with contextlib.suppress(OSError):  # gone meanwhile, or not ours to delete: not reported
                p.unlink()
                removed.append(p)
    return removed
