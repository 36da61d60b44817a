"""The convert stage's source: the ``consolidated*.safetensors`` files of a Mistral-format folder.

``find_sources`` picks the weight files of a source folder (refusing symlinks out of it and
pickle-only releases); ``SafetensorsSource`` opens one of them, checks its header (dtypes convert
can read, offsets that match shapes and the file size) and reads byte ranges by offset, never
mapping the file, dropping what it read from the page cache. It does not cast, hash or write.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from provision.errors import ConvertError, HostileContentError, StructureError, UsageError

MAX_HEADER = 100 * 10**6
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SOURCE_NAME = re.compile(r"consolidated(-\d{5}-of-\d{5})?\.safetensors")

# the source dtypes convert reads, by safetensors name
SOURCE_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


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

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise StructureError(f"Cannot open {self.path}: {e.strerror}.", path=str(path)) from None
        try:
            self.size = os.fstat(self.fd).st_size
            self._read_header()
        except BaseException:
            os.close(self.fd)
            raise

    def _read_header(self) -> None:
        path = self.path
        head = os.pread(self.fd, 8, 0)
        if len(head) < 8:
            raise StructureError(f"{path.name} is too short to be a safetensors file.", path=str(path))
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or 8 + n > self.size:
            raise StructureError(f"{path.name} claims a {n}-byte header; the file is {self.size} bytes.",
                                 path=str(path))
        self.header_bytes = head + os.pread(self.fd, n, 8)
        try:
            doc = json.loads(self.header_bytes[8:])
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StructureError(f"{path.name} has a header that is not JSON.", path=str(path)) from None
        if not isinstance(doc, dict):
            raise StructureError(f"{path.name} has a header that is not a JSON object.", path=str(path))
        self.data_start = 8 + n
        tensors = []
        for name, info in doc.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape = info["dtype"], tuple(int(x) for x in info["shape"])
                b, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise StructureError(f"{path.name}: tensor {name!r} has a malformed header entry.",
                                     path=str(path), tensor=name) from None
            if dtype not in SOURCE_DTYPES:
                raise ConvertError(f"{path.name}: tensor {name!r} has dtype {dtype}; only BF16, F16 and "
                                   "F32 sources can be converted.", tensor=name, dtype=dtype)
            item = 2 if dtype != "F32" else 4
            if end - b != math.prod(shape) * item or b < 0 or self.data_start + end > self.size:
                raise StructureError(f"{path.name}: tensor {name!r} has offsets that do not match its "
                                     "shape or the file size.", path=str(path), tensor=name)
            tensors.append(SrcTensor(name, dtype, shape, self.data_start + b, self.data_start + end))
        self.tensors = sorted(tensors, key=lambda t: t.start)

    def read(self, start: int, n: int) -> bytearray:
        buf = bytearray(n)
        self.read_into(memoryview(buf), start)
        return buf

    def read_into(self, mv: memoryview, start: int) -> None:
        n = mv.nbytes
        got = 0
        while got < n:
            k = os.preadv(self.fd, [mv[got:]], start + got)
            if k == 0:
                raise StructureError(f"{self.path.name} ended early at byte {start + got}.", path=str(self.path))
            got += k

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
        pickles = [p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise HostileContentError(f"{d} holds only pickle weights ({', '.join(pickles)}); provision never "
                                      "loads pickle files.", hint="Use a safetensors release.", files=pickles)
        raise StructureError(f"No consolidated*.safetensors in {d}; convert reads Mistral-format checkpoints.",
                             path=str(d))
    return files
