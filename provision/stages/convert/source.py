"""The convert stage's source: the ``consolidated*.safetensors`` files of a Mistral-format folder.

``find_sources`` picks the weight files of a source folder (refusing symlinks out of it and
pickle-only releases); ``SafetensorsSource`` opens one of them (``provision.io.opening``), checks its header with the one
reader of ``provision.formats.safetensors`` (so the tensors tile the data section exactly, no key
is duplicated and the recorded hash of header plus tensors is the file's) plus
the dtypes convert can read, and reads byte ranges by offset, never mapping the file, dropping
what it read from the page cache. It does not cast, hash or write.
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

    def __init__(self, path: Path, *, root: Path | None = None) -> None:
        self.path = Path(path)
        self.read_end = 0
        try:  # a FIFO, a device or a symlink out of ``root`` is refused without blocking (exit 5)
            self.fd = open_regular(self.path, root=root, what="weights file")
        except OSError as e:
            raise StructureError(f"Cannot open {self.path}: {e.strerror}.", path=str(path)) from None
        try:
            self.size = os.fstat(self.fd).st_size
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
        got = 0
        while got < n:
            k = os.preadv(self.fd, [mv[got:]], start + got)
            if k == 0:
                raise StructureError(f"{self.path.name} ended early at byte {start + got}.", path=str(self.path))
            got += k
        self.read_end = start + n  # how far the conversion has read (the source hasher keeps pages just ahead of it)

    def drop_cache(self, start: int, n: int) -> None:
        # advice only (and missing on macOS): pages left cached cost memory, not correctness
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(self.fd, start, n, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        # closing a read-only descriptor cannot lose data; a second close is harmless
        with contextlib.suppress(OSError):
            os.close(self.fd)


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
