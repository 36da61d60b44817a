"""A streaming safetensors writer: the header first, then the tensors one by one (in pieces if need
be), so a 25 GB checkpoint never sits in memory.

``plan_shards`` splits the entries into shards (a tensor is never split); a ``ShardWriter`` writes
one file under a ``.provision-tmp-`` name beside its target, keeping a reserve of header spaces so
metadata known only at the end (source hashes) is patched in place before fsync and rename; a
``CheckpointWriter`` adds the index, and nothing appears under a final name until ``commit()``
(``remove_stale_temporaries`` cleans up after a killed run). It does not read checkpoints,
convert tensors or choose names.

Written bytes go to the disk as they come: every ``WRITEBACK_BYTES`` a helper thread starts the
writeback of the newest range and, once the range before it is on disk and hashed, drops it from
the page cache (``_Writeback``), so dirty pages never pile up for one big fsync at the end (on a VM
disk measured 4-6x faster than write-then-fsync, and the page cache stays small). Ranges written
while the header is not final stay cached (clean) until the hasher has read them back. Each shard's sha256
(``ShardWriter.sha256``) is computed from the moment its header is final: at ``open`` when
nothing will be patched (``final_header``), else from ``finalize_header`` (metadata known
mid-stream) or ``finish``; a helper thread reads back what was written before (``_Follower``),
then the writer hashes the bytes it writes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import math
import os
import queue
import secrets
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.errors import ConvertError
from provision.formats.safetensors import DTYPE_BYTES
from provision.io.atomic import TMP_PREFIX, disk_full_is_exit_6, fsync_dir
from provision.io.diskio import read_at, reopen_direct
from provision.io.readahead import ReadAhead

DEFAULT_SHARD_BYTES = 5 * 10**9
WRITEBACK_BYTES = 32 << 20  # writeback is started per range of this size; the range before it is then dropped
FOLLOW_BYTES = 4 << 20  # the output hasher reads this much at a time behind the writer
FOLLOW_DEPTH = 4  # read-back buffers: the next blocks are read while one is hashed
WRITEBACK_QUEUE = 2  # ranges waiting for the helper thread: at most ~(2 + 2) x 32 MiB of dirty pages per shard
_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4  # <fcntl.h> sync_file_range flags


def _sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint], ctypes.c_int
    return fn


_SFR = _sync_file_range()


class _Follower:
    """Hashes a file from byte 0 behind its writer: reads back what was written before the header
    was final, then, once caught up, lets the writer hash what it writes (no reading back).

    The writer calls ``written(data, pos)`` after each write (``data`` ended at ``pos``) and
    ``result()`` after the last: the digest of the file, or None when reading it back failed
    (the caller then hashes the file itself).
    """

    def __init__(self, path: Path, pos: int) -> None:
        self.path, self.limit = path, pos
        self.pos = 0  # bytes hashed
        self.inline = False  # caught up: the writer hashes what it writes
        self.failed = False
        self.sha = hashlib.sha256()
        self.cond = threading.Condition()
        self.t = threading.Thread(target=self._run, daemon=True, name="hash-output")
        self.t.start()

    def written(self, data: memoryview, pos: int) -> None:
        with self.cond:
            inline = self.inline
            if not inline:
                self.limit = pos
                self.cond.notify_all()
        if inline:  # the catch-up thread is gone: only the writer's thread touches sha
            self.sha.update(data)  # hashlib releases the GIL
            self.pos = pos

    def wait_past(self, pos: int) -> None:
        """Wait until the bytes up to ``pos`` are hashed (or hashing stopped), so that they may
        be dropped from the page cache without being read from the disk again."""
        with self.cond:
            while self.pos < pos and not self.inline and self.t.is_alive():
                self.cond.wait(0.5)

    def _run(self) -> None:
        try:
            self._catch_up()
        except Exception:  # unreadable (or its reader failed): the caller hashes the file itself
            with self.cond:
                self.failed = True
        finally:
            with self.cond:
                self.cond.notify_all()

    def _catch_up(self) -> None:
        """Hash bytes 0..limit read back from the file, reading the next block (``ReadAhead``)
        while this thread hashes the last: the read-back of a shard whose header became final
        late (at ``finish``) costs the slower of the disk and sha256, not their sum."""
        fd = os.open(self.path, os.O_RDONLY)
        dfd = reopen_direct(fd)  # the very file just opened
        try:
            with ReadAhead(self._filler(fd, dfd), size=FOLLOW_BYTES, depth=FOLLOW_DEPTH,
                           name="hash-output-read") as ahead:
                pos = 0
                while True:
                    with self.cond:
                        self.pos = pos
                        self.cond.notify_all()
                        if pos >= self.limit:
                            self.inline = True
                            return
                    block = ahead.next()
                    self.sha.update(block)
                    pos += block.nbytes
        finally:
            with self.cond:
                self.cond.notify_all()
            os.close(fd)
            if dfd is not None:
                os.close(dfd)

    def _filler(self, fd: int, dfd: int | None) -> Callable[[memoryview, threading.Event], int]:
        """The reader of ``_catch_up``: the file from byte 0 up to ``limit`` (as it grows), in order."""
        pos = 0

        def fill(mv: memoryview, stop: threading.Event) -> int:
            nonlocal pos
            while True:
                with self.cond:
                    end = self.limit
                    if pos < end:
                        break
                    if stop.is_set():
                        return 0
                    self.cond.wait(0.1)  # wait for more bytes, or for the hasher to catch up and stop
            # a shard whose header became final late is still cached (clean, written back): from there
            n = read_at(fd, dfd, mv[:min(mv.nbytes, end - pos)], pos)
            if n == 0:
                raise OSError(f"{self.path.name} is shorter than written")
            pos += n
            return n

        return fill

    def result(self) -> str | None:
        self.t.join()
        return None if self.failed else self.sha.hexdigest()


class _Writeback:
    """A helper thread that writes a shard's finished ranges back and drops them from the page cache.

    Advice only: an error here loses nothing (``finish`` fsyncs the whole file and reports errors);
    where ``sync_file_range`` is missing it does nothing. ``add`` blocks while ``WRITEBACK_QUEUE``
    ranges wait, which bounds the dirty pages when the disk is slower than the converter.
    """

    def __init__(self, fd: int, follower: Callable[[], _Follower | None]) -> None:
        self.fd, self.follower = fd, follower
        self.q: queue.Queue[tuple[int, int] | None] = queue.Queue(maxsize=WRITEBACK_QUEUE)
        self.t = threading.Thread(target=self._run, daemon=True, name="writeback")
        self.t.start()

    def add(self, start: int, n: int) -> None:
        self.q.put((start, n))

    def _run(self) -> None:
        prev: tuple[int, int] | None = None
        while True:
            r = self.q.get()
            if r is None:
                return
            if _SFR is None:
                continue
            _SFR(self.fd, r[0], r[1], _SFR_WRITE)  # start writing the newest range
            if prev is not None:  # wait for the one before (usually done) and drop it once hashed
                _SFR(self.fd, prev[0], prev[1], _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER)
                f = self.follower()
                if f is not None:  # else the header is not final yet: the hasher that will read
                    f.wait_past(prev[0] + prev[1])  # these bytes finds them cached (``finish`` drops them)
                    with contextlib.suppress(OSError, AttributeError):
                        os.posix_fadvise(self.fd, prev[0], prev[1], os.POSIX_FADV_DONTNEED)
            prev = r

    def close(self) -> None:
        self.q.put(None)
        self.t.join()



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
                 *, reserve: int = 0, final_header: bool = True) -> None:
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
        self._wb: _Writeback | None = None
        self._pos = 0  # bytes of the file written
        self._wb_pos = 0  # bytes of the file handed to the writeback thread
        self._lock = threading.RLock()  # finalize_header may come from another thread
        self._final = final_header  # the header will not change: the output hasher may start
        self._follower: _Follower | None = None
        self.sha256: str | None = None  # after finish: the file's digest (None: hashing failed)
        self.finished = False

    @property
    def size(self) -> int:
        return len(self.header) + self.data_bytes

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:  # finalize_header waits until the header is written and the hash started
            self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask decides
            self._wb = _Writeback(self._fd, lambda: self._follower)
            self._write(self.header)
            if self._final:
                self._follower = _Follower(self.tmp, self._pos)

    def finalize_header(self, metadata_update: Mapping[str, str]) -> None:
        """Patch the header now (the metadata known mid-stream, within the reserve) and start
        hashing the file; ``finish`` with the same update then changes nothing."""
        with self._lock:
            if self._final or self.finished:
                return
            self.metadata.update({str(k): str(v) for k, v in metadata_update.items()})
            self.header = self._patched_header()
            if self._fd is not None:
                os.pwrite(self._fd, self.header, 0)
                self._follower = _Follower(self.tmp, self._pos)
            self._final = True

    def _patched_header(self) -> bytes:
        new = build_header(self.entries, self.metadata, 0)
        if len(new) > len(self.header):
            raise ConvertError(f"Metadata for {self.path.name} outgrew the space reserved in its header.")
        length = len(self.header) - 8
        return length.to_bytes(8, "little") + new[8:].rstrip(b" ").ljust(length, b" ")

    def _write(self, data: bytes | memoryview) -> None:
        assert self._fd is not None
        mv = memoryview(data).cast("B")
        # under the lock: finalize_header (another thread) starts the hash at a position that
        # either includes these bytes or is followed by their ``written``, never both
        with self._lock, disk_full_is_exit_6(self.path, kept="the conversion wrote nothing under its final name"):
            while mv:
                n = os.write(self._fd, mv)
                mv = mv[n:]
                self._pos += n
            if self._follower is not None:
                self._follower.written(memoryview(data).cast("B"), self._pos)
        if self._wb is not None and self._pos - self._wb_pos >= WRITEBACK_BYTES:
            self._wb.add(self._wb_pos, self._pos - self._wb_pos)
            self._wb_pos = self._pos

    def _stop_writeback(self) -> None:
        if self._wb is not None:
            self._wb.close()
            self._wb = None

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
        self._stop_writeback()  # the last ranges are left to this flush

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
        self._stop_writeback()
        if self._flusher is not None:
            self._flusher.join()
        if self._index != len(self.entries):
            cur = self.current
            raise ConvertError(f"{self.path.name} is incomplete: tensor {cur.name if cur else '?'} not written.")
        with self._lock:
            if metadata_update:
                self.metadata.update({str(k): str(v) for k, v in metadata_update.items()})
                patched = self._patched_header()
                if patched != self.header:
                    os.pwrite(self._fd, patched, 0)
                    self.header = patched
                    if self._follower is not None:  # it hashed the old header: start again
                        self._follower.result()
                        self._follower = None
            if self._follower is None:
                self._follower = _Follower(self.tmp, self._pos)
            self._final = True
        self.sha256 = self._follower.result()
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
        self._stop_writeback()
        if self._follower is not None:
            self._follower.result()
            self._follower = None
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
    final_header: bool = True  # False: metadata comes later (finalize_header or finish)
    writers: list[ShardWriter] = field(init=False)
    _owner: dict[str, int] = field(init=False)
    _cur: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if len(self.names) != len(self.shards):
            raise ConvertError("CheckpointWriter needs one file name per shard.")
        self.writers = [ShardWriter(Path(self.out_dir) / n, s, self.metadata, reserve=self.reserve,
                                    final_header=self.final_header)
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

    def finalize_header(self, metadata_update: Mapping[str, str]) -> None:
        """``ShardWriter.finalize_header`` for every shard (thread-safe)."""
        for w in self.writers:
            w.finalize_header(metadata_update)

    def digests(self) -> dict[str, str]:
        """After ``finish``: ``{file name: sha256}`` of every shard its output hasher could read."""
        return {w.path.name: w.sha256 for w in self.writers if w.sha256 is not None}

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
