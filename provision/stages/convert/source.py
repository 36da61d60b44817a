"""The convert stage's source: the ``consolidated*.safetensors`` files of a Mistral-format folder.

``find_sources`` picks the weight files of a source folder (refusing symlinks out of it and
pickle-only releases); ``SafetensorsSource`` opens one of them (``provision.io.opening``), checks its header with the one
reader of ``provision.formats.safetensors`` (so the tensors tile the data section exactly, no key
is duplicated and the recorded hash of header plus tensors is the file's) plus
the dtypes convert can read, and reads byte ranges by offset, never mapping the file: with
``O_DIRECT`` where the filesystem takes it (``read_direct``), else through the page cache,
dropping what it read. It does not cast, hash or write.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from provision.errors import ConvertError, HostileContentError, StructureError, UsageError
from provision.formats.pickles import is_pickle_name
from provision.formats.safetensors import parse_header, read_header
from provision.io.diskio import DIRECT_ALIGN, read_full, reopen_direct
from provision.io.opening import open_regular

SOURCE_NAME = re.compile(r"consolidated(-\d{5}-of-\d{5})?\.safetensors")
SOURCE_DTYPES = ("BF16", "F16", "F32")  # the safetensors dtypes convert reads


@dataclass(frozen=True)
class SrcTensor:
    """One tensor of a source file; ``start``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsSource:
    """One safetensors file read by offsets: header parsed and checked, tensors read in pieces."""

    def __init__(self, path: Path, *, root: Path | None = None, size: int | None = None) -> None:
        """``size``: the file's length once complete, for a file still arriving (default: its length now)."""
        self.path = Path(path)
        self.read_end = 0
        self._dfd: int | None = None  # the O_DIRECT descriptor (-1/-2: none)
        try:  # a FIFO, a device or a symlink out of ``root`` is refused without blocking (exit 5)
            self.fd = open_regular(self.path, root=root, what="weights file")
        except OSError as e:
            raise StructureError(f"Cannot open {self.path}: {e.strerror}.", path=str(path)) from None
        try:
            self.size = os.fstat(self.fd).st_size if size is None else size
            self._read_header()
        except BaseException:
            os.close(self.fd)
            raise

    def _read_header(self) -> None:
        self.header_bytes = read_header(self.fd, self.path)
        info = parse_header(self.path, self.header_bytes, self.size)
        self.data_start = info.data_offset
        for name, t in info.tensors.items():
            if t.dtype not in SOURCE_DTYPES:
                raise ConvertError(f"{self.path.name}: tensor {name!r} has dtype {t.dtype}; only BF16, F16 and "
                                   "F32 sources can be converted.", tensor=name, dtype=t.dtype)
        self.tensors = sorted((SrcTensor(name, t.dtype, t.shape, self.data_start + t.begin, self.data_start + t.end)
                               for name, t in info.tensors.items()), key=lambda t: t.start)

    def read_into(self, mv: memoryview, start: int) -> None:
        n = mv.nbytes
        got = read_full(self.fd, mv, start)
        if got < n:
            raise StructureError(f"{self.path.name} ended early at byte {start + got}.", path=str(self.path))
        self.read_end = start + n  # how far the conversion has read (the source hasher keeps pages just ahead of it)

    def _direct(self) -> int | None:
        """A second descriptor of this open file reading past the page cache (``O_DIRECT``), opened
        on first use; None where the platform or filesystem has none."""
        if self._dfd is None:
            dfd = reopen_direct(self.fd)
            self._dfd = -1 if dfd is None else dfd
        return self._dfd if self._dfd >= 0 else None

    def read_direct(self, buf: memoryview, start: int, n: int) -> memoryview | None:
        """Read bytes ``start``..``start+n`` with ``O_DIRECT`` (the disk writes into ``buf``: no copy
        out of the page cache, which on a small VM costs more CPU than fp8 quantization) into
        ``buf`` (page-aligned, at least ``n + 2 * DIRECT_ALIGN`` bytes); the view of those bytes, or
        None where direct reads are unavailable or refused (then ``read_into`` reads them)."""
        dfd = self._direct()
        if dfd is None or buf.nbytes < n + 2 * DIRECT_ALIGN:
            return None
        a = start - start % DIRECT_ALIGN
        need = start + n - a
        want = -(-need // DIRECT_ALIGN) * DIRECT_ALIGN
        got = 0
        try:
            while got < need:
                k = os.preadv(dfd, [buf[got:want]], a + got)
                if k == 0 or (k % DIRECT_ALIGN and got + k < need):
                    raise StructureError(f"{self.path.name} ended early at byte {a + got + k}.", path=str(self.path))
                got += k
        except OSError:  # EINVAL: this filesystem or device does not take direct reads after all
            os.close(dfd)
            self._dfd = -2
            return None
        self.read_end = start + n
        return buf[start - a:start - a + n]

    def drop_cache(self, start: int, n: int) -> None:
        # advice only (and missing on macOS): pages left cached cost memory, not correctness
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(self.fd, start, n, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        # closing a read-only descriptor cannot lose data; a second close is harmless
        with contextlib.suppress(OSError):
            os.close(self.fd)
        if self._dfd is not None and self._dfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._dfd)
            self._dfd = -2


def find_sources(src_dir: Path) -> list[Path]:
    """The Mistral-format weight files of ``src_dir`` (``consolidated*.safetensors``)."""
    d = Path(src_dir)
    if not d.is_dir():
        raise UsageError(f"{d} is not a folder; pass the folder holding params.json and consolidated.safetensors.")
    files = sorted(p for p in d.iterdir() if SOURCE_NAME.fullmatch(p.name))
    for p in files:
        if p.is_symlink() and d.resolve() not in p.resolve().parents:
            raise HostileContentError(f"Refusing {p.name}: it is a symlink out of {d}.", path=str(p))
    if not files:
        pickles = [p.name for p in d.iterdir() if is_pickle_name(p.name)]
        if pickles:
            raise HostileContentError(f"{d} holds only pickle weights ({', '.join(pickles)}); provision never "
                                      "loads pickle files.", hint="Use a safetensors release.", files=pickles)
        raise StructureError(f"No consolidated*.safetensors in {d}; convert reads Mistral-format checkpoints.",
                             path=str(d))
    return files
