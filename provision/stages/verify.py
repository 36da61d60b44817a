"""Verify a model folder: content hashes against an authority, safetensors structure, hostile files.

Every fetcher calls this before it trusts a file, and ``provision verify`` / ``manifest lock``
call it on a finished folder. It never imports torch, never mmaps, never holds a whole file in
memory and never writes anything: it reads and reports.

Library API (names are stable; fetchers, ``run``, and ``convert`` use them)::

    Authority(kind, size=None, sha256=None, git_sha1=None, piece_length=None, piece_hashes=(),
              merkle_root=None)
        what vouches for one file's content. ``kind`` is the name the report gives it:
        "manifest-sha256" | "hub-lfs-sha256" | "git-blob-sha1" | "torrent-v2-merkle" |
        "torrent-v1-pieces" | "manifest-md5" | "none". Every field that is set is checked, whatever the kind:
        size first (a wrong size skips hashing), then the whole-file sha256, the git blob SHA-1,
        the torrent v1 piece SHA-1s (``piece_hashes`` cover exactly this file, the file starting
        on a piece boundary; the last piece is accepted short or zero-padded to ``piece_length``,
        the latter only when ``size`` is known), the torrent v2 ``merkle_root`` (BEP 52 pieces
        root: SHA-256 merkle tree over 16 KiB blocks, leaves zero-padded to a power of two).
    authorities_from_manifest(manifest) -> dict[path, Authority]
    sha256_file(path, *, progress=None, block_size=1 MiB) -> hex       (readinto one reused buffer)
    git_blob_sha1(path) -> hex                                         (the Hub's id of a non-LFS file)
    merkle_root_file(path) -> bytes | None                             (BEP 52 pieces root, one thread)
    check_safetensors(path) -> SafetensorsInfo                          (from provision.formats.safetensors)
    verify_files(root, expected, *, known_sha256=None, structure=True, check_params=True,
                 progress=None, workers=None) -> VerifyReport
    verify_dir(root, manifest=None, *, progress=None, workers=None) -> VerifyReport
    VerifyReport.ok / .files / .checks / .failures / .to_dict() / .raise_for_failure()

``verify_files`` never raises for bad content: it returns a report whose ``checks`` list every
check (name, file, ok, authority, expected, actual, message) and ``raise_for_failure()`` raises
the first failure as its typed error (HostileContentError, SizeMismatchError,
HashMismatchError, StructureError, VerifyError for a missing file: exit 5; ParamsError: exit 3).
Check order (so which error is "first"): hostile files, then each expected file in path order
(present, size, sha256, git-sha1, torrent pieces, safetensors structure), then indexes, then
params.json against the tensors.

* Hashing: different files are hashed in parallel on ``workers`` threads (default: the CPU
  count; hashlib and readinto release the GIL), largest first, each file read once with all
  the hashes it needs. Only a torrent authority lets one file be split into independent piece
  ranges hashed in parallel. ``known_sha256[path]`` (a fetcher that hashed while downloading)
  replaces reading the file for its whole-file sha256, which is still compared with the
  authority's; other hashes the authority names (git blob, pieces) still read the file.
* Hostile content: files in ``root`` that ``expected`` does not list are reported ("unlisted",
  not opened, not failed), except pickles (.bin .pt .pth .ckpt .pkl .pickle: refused, never
  opened), symlinks that resolve outside ``root`` and special files (FIFOs, devices): refused.
* Structure: every expected ``.safetensors`` is checked (``check_safetensors``), every
  ``*.safetensors.index.json`` against its shards, and, when ``check_params`` and both
  ``params.json`` and Mistral-format weights (``consolidated*.safetensors``, else every top-level
  ``.safetensors`` unless a ``config.json`` or an index marks an HF checkpoint) are among the
  expected files, ``params.json`` is parsed by
  ``ModelArgs.from_file`` (missing key / wrong type: ParamsError, exit 3) and the tensors must
  equal ``tensor_spec(args)`` (names and shapes; nothing missing, nothing extra).
* ``verify_dir(root, None)`` (no manifest) verifies every regular file in the folder with
  authority "none": structure and params checks, and the sha256 of each file reported.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provision.errors import (
    HashMismatchError,
    HostileContentError,
    ParamsError,
    ProvisionError,
    SizeMismatchError,
    StructureError,
    UsageError,
    VerifyError,
)
from provision.formats.safetensors import SafetensorsInfo, check_index, check_safetensors
from provision.progress import ProgressEvent, ProgressFn

if TYPE_CHECKING:
    from provision.formats.manifest import Manifest

__all__ = [
    "AUTHORITY_KINDS",
    "PICKLE_SUFFIXES",
    "Authority",
    "Check",
    "FileReport",
    "SafetensorsInfo",
    "VerifyReport",
    "authorities_from_manifest",
    "check_safetensors",
    "git_blob_sha1",
    "merkle_root_file",
    "sha256_file",
    "verify_dir",
    "verify_files",
]

AUTHORITY_KINDS = ("manifest-sha256", "hub-lfs-sha256", "git-blob-sha1", "torrent-v2-merkle",
                   "torrent-v1-pieces", "manifest-md5", "none")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
BLOCK_SIZE = 1 << 20  # 64 KiB..1 MiB measured fastest; 1 MiB keeps syscalls rare
V2_BLOCK = 16 * 1024  # BEP 52 leaf block
V2_CHUNK_LEAVES = 256  # a worker reduces 256 leaves (4 MiB) to one subtree root
SPLIT_UNIT_BYTES = 64 << 20  # torrent files are split into ranges of about this size
FILE_PROGRESS_MIN = 256 << 20  # files at least this large get their own progress task
PROGRESS_INTERVAL_S = 0.25


@dataclass(frozen=True)
class Authority:
    """What vouches for one file's content (see the module docstring)."""

    kind: str
    size: int | None = None
    sha256: str | None = None
    git_sha1: str | None = None
    piece_length: int | None = None  # torrent v1: bytes per piece (v2: informational)
    piece_hashes: tuple[bytes, ...] = ()  # torrent v1 piece SHA-1s covering exactly this file
    merkle_root: bytes | None = None  # torrent v2 pieces root
    md5: str | None = None  # a release's published md5 sum (Mixtral 8x7B), checked when set

    def __post_init__(self) -> None:
        if self.kind not in AUTHORITY_KINDS:
            raise ValueError(f"unknown authority kind {self.kind!r}")
        if self.piece_hashes and not self.piece_length:
            raise ValueError("piece_hashes need piece_length")

    @property
    def has_content_hash(self) -> bool:
        return bool(self.sha256 or self.git_sha1 or self.piece_hashes or self.merkle_root or self.md5)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind}
        if self.size is not None:
            d["size"] = self.size
        if self.sha256:
            d["sha256"] = self.sha256
        if self.git_sha1:
            d["git_sha1"] = self.git_sha1
        if self.piece_hashes:
            d["piece_length"] = self.piece_length
            d["pieces"] = len(self.piece_hashes)
        if self.merkle_root is not None:
            d["merkle_root"] = self.merkle_root.hex()
        if self.md5:
            d["md5"] = self.md5
        return d


@dataclass
class Check:
    """One check's outcome; ``error`` is the typed error a failure raises."""

    name: str  # hostile | present | size | sha256 | git-sha1 | torrent-v1-pieces | torrent-v2-merkle |
    #             safetensors | index | params | tensors
    file: str | None
    ok: bool
    authority: str | None = None
    expected: Any = None
    actual: Any = None
    message: str = ""
    error: ProvisionError | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"check": self.name, "file": self.file, "ok": self.ok}
        if self.authority is not None:
            d["authority"] = self.authority
        if self.expected is not None:
            d["expected"] = self.expected
        if self.actual is not None:
            d["actual"] = self.actual
        if self.message:
            d["message"] = self.message
        if self.error is not None:
            d["kind"] = self.error.kind
            d["exit_code"] = self.error.exit_code
        return d


@dataclass
class FileReport:
    path: str
    status: str  # ok | failed | missing | unlisted | refused
    authority: str | None = None
    size: int | None = None
    sha256: str | None = None
    sha256_source: str | None = None  # "read" | "fetcher" (known_sha256)
    git_sha1: str | None = None
    checks: list[Check] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "status": self.status, "authority": self.authority,
                             "size": self.size}
        if self.sha256:
            d["sha256"] = self.sha256
            d["sha256_source"] = self.sha256_source
        if self.git_sha1:
            d["git_sha1"] = self.git_sha1
        return d


@dataclass
class VerifyReport:
    root: Path
    files: list[FileReport] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    bytes_hashed: int = 0
    seconds: float = 0.0
    workers: int = 1

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def file(self, path: str) -> FileReport | None:
        return next((f for f in self.files if f.path == path), None)

    @property
    def facts(self) -> dict[str, tuple[int, str]]:
        """``{path: (size, sha256)}`` of every verified file (what ``manifest lock`` records)."""
        return {f.path: (f.size, f.sha256) for f in self.files
                if f.status == "ok" and f.size is not None and f.sha256}

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "ok": self.ok,
            "files": [f.to_dict() for f in self.files],
            "checks": [c.to_dict() for c in self.checks],
            "failures": len(self.failures),
            "bytes_hashed": self.bytes_hashed,
            "seconds": round(self.seconds, 3),
            "workers": self.workers,
        }

    def raise_for_failure(self) -> None:
        """Raise the first failed check's typed error; do nothing when everything passed."""
        for c in self.checks:
            if not c.ok:
                raise c.error or VerifyError(c.message or f"{c.file}: {c.name} check failed.", file=c.file)


# ---------------------------------------------------------------------------------------
# hashing primitives


def _open_read(path: Path) -> int:
    """Open a regular file for reading without following a final symlink into a FIFO or device."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise HostileContentError(f"Refusing {Path(path).name}: not a regular file.", path=str(path))
        os.set_blocking(fd, True)
        if hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except OSError:
                pass
    except BaseException:
        os.close(fd)
        raise
    return fd


def _stream(path: Path, consume: Callable[[memoryview], None], *, offset: int = 0, length: int | None = None,
            buf: bytearray | None = None, on_bytes: Callable[[int], None] | None = None) -> int:
    """Feed ``consume`` the bytes of ``path`` from ``offset`` (``length`` bytes or to EOF) through
    one reused buffer. Returns the number of bytes read."""
    if buf is None:
        buf = bytearray(BLOCK_SIZE)
    mv = memoryview(buf)
    fd = _open_read(path)
    total = 0
    try:
        with open(fd, "rb", buffering=0, closefd=False) as f:
            if offset:
                f.seek(offset)
            while length is None or total < length:
                want = len(buf) if length is None else min(len(buf), length - total)
                n = f.readinto(mv[:want])
                if not n:
                    break
                consume(mv[:n])
                total += n
                if on_bytes is not None:
                    on_bytes(n)
    finally:
        os.close(fd)
    return total


def sha256_file(path: Path, *, progress: ProgressFn | None = None, block_size: int = BLOCK_SIZE) -> str:
    """The whole-file SHA-256 (hex), streamed through one reused ``block_size`` buffer."""
    path = Path(path)
    h = hashlib.sha256()
    total = os.stat(path).st_size
    task = f"sha256:{path.name}"
    done = 0
    last = 0.0

    def tick(n: int) -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if progress is not None and now - last >= PROGRESS_INTERVAL_S:
            last = now
            progress(ProgressEvent(task=task, done=done, total=total, description=f"sha256 {path.name}"))

    _stream(path, h.update, buf=bytearray(block_size), on_bytes=tick if progress else None)
    if progress is not None:
        progress(ProgressEvent(task=task, done=done, total=total, description=f"sha256 {path.name}",
                               finished=True))
    return h.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """Git's blob id of a file: SHA-1 of ``b"blob <size>\\0" + content`` (the Hub's non-LFS oid)."""
    path = Path(path)
    size = os.stat(path).st_size
    h = hashlib.sha1(b"blob %d\x00" % size, usedforsecurity=False)
    n = _stream(path, h.update)
    if n != size:
        raise VerifyError(f"{path.name} changed size while it was hashed; run again.", path=str(path))
    return h.hexdigest()


_ZERO = bytes(32)


def _pad_hash(level: int) -> bytes:
    """Root of an all-zero merkle subtree with 2**level leaves (BEP 52 padding)."""
    h = _ZERO
    for _ in range(level):
        h = hashlib.sha256(h + h).digest()
    return h


def _merkle_reduce(nodes: list[bytes], width: int, pad: bytes) -> bytes:
    """Root of a tree whose bottom row is ``nodes`` padded with ``pad`` to ``width`` (a power of two)."""
    row = nodes + [pad] * (width - len(nodes))
    while len(row) > 1:
        row = [hashlib.sha256(row[i] + row[i + 1]).digest() for i in range(0, len(row), 2)]
    return row[0]


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def merkle_root_file(path: Path) -> bytes | None:
    """BEP 52 pieces root of a whole file (single thread); ``None`` for an empty file."""
    size = os.stat(path).st_size
    if size == 0:
        return None
    nblocks = -(-size // V2_BLOCK)
    leaves_total = _next_pow2(nblocks)
    chunk = min(V2_CHUNK_LEAVES, leaves_total)
    roots = [_v2_chunk_root(path, i, chunk, bytearray(BLOCK_SIZE)) for i in range(-(-nblocks // chunk))]
    return _merkle_reduce(roots, leaves_total // chunk, _pad_hash(chunk.bit_length() - 1))


def _v2_chunk_root(path: Path, index: int, chunk: int, buf: bytearray,
                   on_bytes: Callable[[int], None] | None = None) -> bytes:
    leaves: list[bytes] = []
    carry = bytearray()

    def consume(mv: memoryview) -> None:
        nonlocal carry
        data: memoryview | bytes = mv
        if carry:
            carry += mv
            data = bytes(carry)
            carry = bytearray()
        full = len(data) - len(data) % V2_BLOCK
        for i in range(0, full, V2_BLOCK):
            leaves.append(hashlib.sha256(data[i:i + V2_BLOCK]).digest())
        if full < len(data):
            carry = bytearray(data[full:])

    _stream(path, consume, offset=index * chunk * V2_BLOCK, length=chunk * V2_BLOCK, buf=buf, on_bytes=on_bytes)
    if carry:
        leaves.append(hashlib.sha256(carry).digest())
    return _merkle_reduce(leaves, chunk, _ZERO)


# ---------------------------------------------------------------------------------------
# work units: one file read (all its hashes), or a piece range of a torrent-vouched file


class _Progress:
    """Thread-safe byte counter that emits throttled ProgressEvents."""

    def __init__(self, progress: ProgressFn | None, total: int, big: Mapping[str, int]) -> None:
        self.fn = progress
        self.total = total
        self.done = 0
        self.per_file: dict[str, int] = {k: 0 for k in big}
        self.big = dict(big)
        self.lock = threading.Lock()
        self.last = 0.0
        self.last_file: dict[str, float] = {}

    def add(self, rel: str, n: int) -> None:
        events: list[ProgressEvent] = []
        with self.lock:
            self.done += n
            if self.fn is None:
                return
            now = time.monotonic()
            if now - self.last >= PROGRESS_INTERVAL_S:
                self.last = now
                events.append(ProgressEvent(task="verify", done=self.done, total=self.total,
                                            description="verify"))
            if rel in self.per_file:
                self.per_file[rel] += n
                if now - self.last_file.get(rel, 0.0) >= PROGRESS_INTERVAL_S:
                    self.last_file[rel] = now
                    events.append(ProgressEvent(task=f"verify:{rel}", done=self.per_file[rel],
                                                total=self.big[rel], description=f"verify {rel}"))
        for ev in events:
            self.fn(ev)

    def finish(self) -> None:
        if self.fn is None:
            return
        for rel, total in self.big.items():
            self.fn(ProgressEvent(task=f"verify:{rel}", done=self.per_file[rel], total=total,
                                  description=f"verify {rel}", finished=True))
        self.fn(ProgressEvent(task="verify", done=self.done, total=self.total, description="verify",
                              finished=True))


@dataclass
class _FileWork:
    rel: str
    path: Path
    size: int
    auth: Authority
    want_sha256: bool
    sha256: str | None = None
    git_sha1: str | None = None
    md5: str | None = None
    read_bytes: int | None = None  # bytes the whole-file pass read (to detect a changing file)
    v1_bad: list[int] = field(default_factory=list)
    v2_roots: dict[int, bytes] = field(default_factory=dict)
    error: ProvisionError | None = None


def _whole_unit(w: _FileWork, want_git: bool, buf: bytearray, prog: _Progress) -> None:
    hashers: list[Any] = []
    sha = hashlib.sha256() if w.want_sha256 else None
    git = hashlib.sha1(b"blob %d\x00" % w.size, usedforsecurity=False) if want_git else None
    md5 = hashlib.md5(usedforsecurity=False) if w.auth.md5 else None
    hashers = [h for h in (sha, git, md5) if h is not None]
    if len(hashers) == 1:
        consume = hashers[0].update
    else:
        def consume(mv: memoryview) -> None:
            for h in hashers:
                h.update(mv)
    n = _stream(w.path, consume, buf=buf, on_bytes=lambda k: prog.add(w.rel, k))
    w.read_bytes = n
    if sha is not None:
        w.sha256 = sha.hexdigest()
    if git is not None:
        w.git_sha1 = git.hexdigest() if n == w.size else "changed-while-reading"
    if md5 is not None:
        w.md5 = md5.hexdigest()


def _v1_unit(w: _FileWork, first: int, count: int, buf: bytearray, prog: _Progress) -> None:
    a = w.auth
    plen = a.piece_length or 0
    for i in range(first, first + count):
        h = hashlib.sha1(usedforsecurity=False)
        n = _stream(w.path, h.update, offset=i * plen, length=plen, buf=buf, on_bytes=lambda k: prog.add(w.rel, k))
        if h.digest() == a.piece_hashes[i]:
            continue
        # the last piece of a file followed by a pad file (BEP 47) is hashed zero-padded
        if a.size is not None and 0 < n < plen and i == len(a.piece_hashes) - 1:
            h.update(bytes(plen - n))
            if h.digest() == a.piece_hashes[i]:
                continue
        w.v1_bad.append(i)


def _v2_unit(w: _FileWork, first: int, count: int, chunk: int, buf: bytearray, prog: _Progress) -> None:
    for i in range(first, first + count):
        w.v2_roots[i] = _v2_chunk_root(w.path, i, chunk, buf, on_bytes=lambda k: prog.add(w.rel, k))


def _v2_geometry(size: int) -> tuple[int, int, int]:
    """(number of chunks, leaves per chunk, total leaves) of a file's BEP 52 tree."""
    nblocks = -(-size // V2_BLOCK)
    total = _next_pow2(nblocks)
    chunk = min(V2_CHUNK_LEAVES, total)
    return -(-nblocks // chunk), chunk, total


# ---------------------------------------------------------------------------------------
# folder scan


@dataclass
class _Entry:
    rel: str
    path: Path
    kind: str  # file | symlink-in | symlink-out | pickle | special | dir-link
    size: int | None = None
    target: str | None = None


def _scan(root: Path) -> list[_Entry]:
    """Every non-directory entry under ``root`` (symlinks are not followed), classified."""
    root_real = root.resolve()
    out: list[_Entry] = []
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            p = Path(e.path)
            rel = p.relative_to(root).as_posix()
            if e.is_symlink():
                target = os.path.realpath(p)
                inside = target == str(root_real) or target.startswith(str(root_real) + os.sep)
                if not inside:
                    out.append(_Entry(rel, p, "symlink-out", target=target))
                elif rel.lower().endswith(PICKLE_SUFFIXES) or target.lower().endswith(PICKLE_SUFFIXES):
                    out.append(_Entry(rel, p, "pickle", target=target))
                elif os.path.isdir(target):
                    out.append(_Entry(rel, p, "dir-link", target=target))
                elif os.path.isfile(target):
                    out.append(_Entry(rel, p, "symlink-in", size=os.stat(target).st_size, target=target))
                else:
                    out.append(_Entry(rel, p, "special", target=target))
                continue
            if e.is_dir(follow_symlinks=False):
                stack.append(p)
                continue
            if rel.lower().endswith(PICKLE_SUFFIXES):
                out.append(_Entry(rel, p, "pickle"))
                continue
            st = e.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                out.append(_Entry(rel, p, "file", size=st.st_size))
            else:
                out.append(_Entry(rel, p, "special"))
    out.sort(key=lambda x: x.rel)
    return out


def _hostile_check(e: _Entry) -> Check | None:
    if e.kind == "pickle":
        err = HostileContentError(
            f"Refusing {e.rel}: it is a pickle format ({Path(e.rel).suffix}), which can run code when loaded; "
            "provision reads safetensors only and never opens it.",
            hint="Delete it, or fetch the safetensors release instead.",
            path=e.rel,
        )
        return Check("hostile", e.rel, False, message=err.message, actual="pickle", error=err)
    if e.kind == "symlink-out":
        err = HostileContentError(
            f"Refusing {e.rel}: it is a symlink that leaves the model folder (to {e.target}).",
            hint="Replace it with the real file, or fetch the folder again.",
            path=e.rel, target=e.target,
        )
        return Check("hostile", e.rel, False, message=err.message, actual=f"symlink -> {e.target}", error=err)
    if e.kind == "special":
        err = HostileContentError(f"Refusing {e.rel}: not a regular file (a FIFO, device, socket or dangling "
                                  "link).", hint="Remove it.", path=e.rel)
        return Check("hostile", e.rel, False, message=err.message, actual="special", error=err)
    return None


# ---------------------------------------------------------------------------------------
# the verifier


def authorities_from_manifest(manifest: Manifest) -> dict[str, Authority]:
    """One Authority per manifest file: "manifest-sha256" when it pins a sha256, else
    "git-blob-sha1" when it pins the Hub's blob id, else "none" (its size, if any, is checked)."""
    out: dict[str, Authority] = {}
    for f in manifest.files:
        kind = ("manifest-sha256" if f.sha256 else "git-blob-sha1" if f.git_sha1 else
                "manifest-md5" if f.md5 else "none")
        out[f.path] = Authority(kind=kind, size=f.size, sha256=f.sha256, git_sha1=f.git_sha1, md5=f.md5)
    return out


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _mistral_weights(rels: list[str]) -> list[str]:
    """The Mistral-format weight files among ``rels``: ``consolidated*.safetensors`` at the top
    level; else every top-level ``.safetensors`` unless the folder looks like an HF checkpoint
    (a ``config.json`` or a ``*.safetensors.index.json`` beside them), whose names differ."""
    top = [r for r in rels if "/" not in r and r.endswith(".safetensors")]
    cons = [r for r in top if r.startswith("consolidated")]
    if cons:
        return cons
    if "config.json" in rels or any(r.endswith(".safetensors.index.json") for r in rels):
        return []
    return top


def _norm(rel: str) -> str:
    """``./a//b`` -> ``a/b``; a hostile path is kept as given (it fails its check later)."""
    from provision.io.paths import safe_relpath

    try:
        return str(safe_relpath(rel))
    except HostileContentError:
        return rel


def verify_files(
    root: Path,
    expected: Mapping[str, Authority],
    *,
    known_sha256: Mapping[str, str] | None = None,
    structure: bool = True,
    check_params: bool = True,
    progress: ProgressFn | None = None,
    workers: int | None = None,
) -> VerifyReport:
    """Verify the ``expected`` files under ``root`` (see the module docstring). Never raises for
    bad content; call ``raise_for_failure()`` on the report."""
    t0 = time.monotonic()
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder.", hint="Pass the folder that holds the model files.",
                         path=str(root))
    nworkers = max(1, workers or _default_workers())
    report = VerifyReport(root=root, workers=nworkers)
    known = {_norm(k): v.lower() for k, v in (known_sha256 or {}).items()}
    expected = {_norm(k): v for k, v in expected.items()}
    err: ProvisionError

    entries = {e.rel: e for e in _scan(root)}
    hostile: dict[str, Check] = {}
    for e in entries.values():
        c = _hostile_check(e)
        if c is not None:
            hostile[e.rel] = c
            report.checks.append(c)

    # expected files: resolve, classify
    from provision.io.paths import safe_join

    works: dict[str, _FileWork] = {}
    reports: dict[str, FileReport] = {}
    file_checks: dict[str, list[Check]] = {}
    for rel in sorted(expected):
        auth = expected[rel]
        fr = FileReport(path=rel, status="ok", authority=auth.kind)
        reports[rel] = fr
        checks: list[Check] = []
        file_checks[rel] = checks
        try:
            path = safe_join(root, rel, what="file path")
        except HostileContentError as exc:
            checks.append(Check("hostile", rel, False, auth.kind, message=exc.message, error=exc))
            continue
        if rel in hostile or rel.lower().endswith(PICKLE_SUFFIXES):
            if rel not in hostile:
                err = HostileContentError(f"Refusing {rel}: it is a pickle format; provision reads safetensors "
                                          "only and never opens it.", path=rel)
                checks.append(Check("hostile", rel, False, auth.kind, message=err.message, error=err))
            fr.status = "refused"
            continue
        ent = entries.get(rel)
        if ent is None or ent.kind not in ("file", "symlink-in"):
            what = "a folder" if path.is_dir() else "missing"
            err = VerifyError(f"{rel} is {what}; the {auth.kind} authority expects a file"
                              + (f" of {auth.size:,d} bytes." if auth.size is not None else "."),
                              hint="Fetch it again.", path=rel, authority=auth.kind)
            checks.append(Check("present", rel, False, auth.kind, expected="file", actual=what,
                                message=err.message, error=err))
            fr.status = "missing"
            continue
        size = ent.size or 0
        fr.size = size
        checks.append(Check("present", rel, True, auth.kind))
        if auth.size is not None:
            if auth.size != size:
                err = SizeMismatchError(
                    f"{rel} is {size:,d} bytes but the {auth.kind} authority says {auth.size:,d}.",
                    hint="The file is truncated or a different version; delete it and fetch it again.",
                    path=rel, expected=auth.size, actual=size, authority=auth.kind,
                )
                checks.append(Check("size", rel, False, auth.kind, auth.size, size, err.message, err))
                fr.status = "failed"
                continue
            checks.append(Check("size", rel, True, auth.kind, auth.size, size))
        works[rel] = _FileWork(rel=rel, path=path, size=size, auth=auth, want_sha256=rel not in known)

    # structure before hashing: headers only, so a hostile header is reported within milliseconds
    st_infos: dict[str, SafetensorsInfo] = {}
    st_checks: dict[str, Check] = {}
    if structure:
        for rel, w in works.items():
            if not rel.endswith(".safetensors"):
                continue
            try:
                st_infos[rel] = check_safetensors(w.path)
                n = len(st_infos[rel].tensors)
                st_checks[rel] = Check("safetensors", rel, True, w.auth.kind, actual=f"{n} tensors")
            except (StructureError, HostileContentError) as exc:
                st_checks[rel] = Check("safetensors", rel, False, w.auth.kind, message=exc.message, error=exc)

    _hash_all(works, nworkers, progress, report)

    for rel, w in works.items():
        fr = reports[rel]
        checks = file_checks[rel]
        auth = w.auth
        fr.git_sha1 = w.git_sha1
        if w.error is not None:
            checks.append(Check("read", rel, False, auth.kind, message=w.error.message, error=w.error))
        if rel in known:
            fr.sha256, fr.sha256_source = known[rel], "fetcher"
        elif w.sha256:
            fr.sha256, fr.sha256_source = w.sha256, "read"
        if w.read_bytes is not None and w.read_bytes != w.size:
            err = SizeMismatchError(f"{rel} changed size while it was verified ({w.size:,d} -> "
                                    f"{w.read_bytes:,d} bytes).", hint="Run verify again when nothing writes it.",
                                    path=rel, expected=w.size, actual=w.read_bytes)
            checks.append(Check("size", rel, False, auth.kind, w.size, w.read_bytes, err.message, err))
        if auth.sha256:
            checks.append(_hash_check("sha256", rel, auth, auth.sha256.lower(), fr.sha256))
        if auth.git_sha1:
            checks.append(_hash_check("git-sha1", rel, auth, auth.git_sha1.lower(), w.git_sha1))
        if auth.md5:
            checks.append(_hash_check("md5", rel, auth, auth.md5.lower(), w.md5))
        if auth.piece_hashes:
            checks.append(_v1_check(w))
        if auth.merkle_root is not None or (auth.kind == "torrent-v2-merkle" and w.size == 0):
            checks.append(_v2_check(w))
        if rel in st_checks:
            checks.append(st_checks[rel])

    for rel in sorted(expected):
        checks = file_checks[rel]
        report.checks.extend(checks)
        fr = reports[rel]
        fr.checks = checks
        if fr.status == "ok" and not all(c.ok for c in checks):
            fr.status = "failed"
        report.files.append(fr)

    # files nobody listed: reported, not failed (hostile ones already failed above)
    for rel, e in entries.items():
        if rel in expected:
            continue
        status = "refused" if rel in hostile else "unlisted"
        report.files.append(FileReport(path=rel, status=status, size=e.size))
    report.files.sort(key=lambda f: f.path)

    if structure:
        _index_checks(root, expected, works, st_infos, report)
        if check_params:
            _params_check(root, expected, works, st_infos, st_checks, report)
    report.seconds = time.monotonic() - t0
    return report


def _hash_check(name: str, rel: str, auth: Authority, expected: str, actual: str | None) -> Check:
    if actual == expected:
        return Check(name, rel, True, auth.kind, expected, actual)
    err = HashMismatchError(
        f"{rel}: {name} is {actual} but the {auth.kind} authority says {expected}.",
        hint="The file is damaged or a different version; delete it and fetch it again.",
        path=rel, expected=expected, actual=actual, authority=auth.kind, check=name,
    )
    return Check(name, rel, False, auth.kind, expected, actual, err.message, err)


def _v1_check(w: _FileWork) -> Check:
    a = w.auth
    plen = a.piece_length or 1
    npieces = -(-w.size // plen)
    name = "torrent-v1-pieces"
    if npieces != len(a.piece_hashes):
        err = HashMismatchError(
            f"{w.rel} spans {npieces} pieces of {plen:,d} bytes but the {a.kind} authority lists "
            f"{len(a.piece_hashes)}.", hint="Delete it and fetch it again.",
            path=w.rel, expected=len(a.piece_hashes), actual=npieces, authority=a.kind)
        return Check(name, w.rel, False, a.kind, len(a.piece_hashes), npieces, err.message, err)
    if w.v1_bad:
        bad = sorted(w.v1_bad)
        err = HashMismatchError(
            f"{w.rel}: {len(bad)} of {npieces} pieces fail their SHA-1 (first: piece {bad[0]}, bytes "
            f"{bad[0] * plen:,d}..{min((bad[0] + 1) * plen, w.size):,d}) under the {a.kind} authority.",
            hint="Delete it and fetch it again (a torrent client re-downloads only the bad pieces).",
            path=w.rel, bad_pieces=bad[:100], authority=a.kind)
        return Check(name, w.rel, False, a.kind, f"{npieces} pieces ok", f"{len(bad)} bad: {bad[:20]}",
                     err.message, err)
    return Check(name, w.rel, True, a.kind, f"{npieces} pieces", f"{npieces} pieces ok")


def _v2_check(w: _FileWork) -> Check:
    a = w.auth
    name = "torrent-v2-merkle"
    if w.size == 0:
        ok = a.merkle_root is None or a.merkle_root == _ZERO
        actual = None
    else:
        nchunks, chunk, total = _v2_geometry(w.size)
        roots = [w.v2_roots[i] for i in range(nchunks)] if len(w.v2_roots) == nchunks else []
        actual = _merkle_reduce(roots, total // chunk, _pad_hash(chunk.bit_length() - 1)).hex() if roots else None
        ok = a.merkle_root is not None and actual == a.merkle_root.hex()
    exp = a.merkle_root.hex() if a.merkle_root is not None else None
    if ok:
        return Check(name, w.rel, True, a.kind, exp, actual)
    err = HashMismatchError(f"{w.rel}: merkle root is {actual} but the {a.kind} authority says {exp}.",
                            hint="Delete it and fetch it again.", path=w.rel, expected=exp, actual=actual,
                            authority=a.kind)
    return Check(name, w.rel, False, a.kind, exp, actual, err.message, err)


def _hash_all(works: Mapping[str, _FileWork], nworkers: int, progress: ProgressFn | None,
              report: VerifyReport) -> None:
    """Build the work units, run them on a thread pool (largest first), fill in the results."""
    units: list[tuple[int, Callable[[bytearray, _Progress], None], _FileWork]] = []
    for w in works.values():
        a = w.auth
        want_git = bool(a.git_sha1)
        if w.want_sha256 or want_git or a.md5:
            units.append((w.size, partial(_whole_unit, w, want_git), w))
        if a.piece_hashes and a.piece_length and -(-w.size // a.piece_length) == len(a.piece_hashes):
            plen = a.piece_length
            per = max(1, SPLIT_UNIT_BYTES // plen)
            for first in range(0, len(a.piece_hashes), per):
                cnt = min(per, len(a.piece_hashes) - first)
                units.append((cnt * plen, partial(_v1_unit, w, first, cnt), w))
        if a.merkle_root is not None and w.size > 0:
            nchunks, chunk, _ = _v2_geometry(w.size)
            per = max(1, SPLIT_UNIT_BYTES // (chunk * V2_BLOCK))
            for first in range(0, nchunks, per):
                cnt = min(per, nchunks - first)
                units.append((cnt * chunk * V2_BLOCK, partial(_v2_unit, w, first, cnt, chunk), w))
    total = sum(u[0] for u in units)
    big = {w.rel: w.size for w in works.values() if w.size >= FILE_PROGRESS_MIN}
    prog = _Progress(progress, total, big)
    units.sort(key=lambda u: -u[0])
    local = threading.local()

    def run(unit: tuple[int, Callable[[bytearray, _Progress], None], _FileWork]) -> None:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = bytearray(BLOCK_SIZE)
        try:
            unit[1](buf, prog)
        except ProvisionError as exc:
            unit[2].error = exc
        except OSError as exc:
            unit[2].error = VerifyError(f"Cannot read {unit[2].rel}: {exc.strerror}.",
                                        hint="Check the file's permissions and the disk.", path=unit[2].rel)

    if len(units) <= 1 or nworkers == 1:
        for u in units:
            run(u)
    else:
        with ThreadPoolExecutor(max_workers=min(nworkers, len(units)), thread_name_prefix="verify") as ex:
            list(ex.map(run, units))
    prog.finish()
    report.bytes_hashed = prog.done


def _index_checks(root: Path, expected: Mapping[str, Authority], works: Mapping[str, _FileWork],
                  st_infos: Mapping[str, SafetensorsInfo], report: VerifyReport) -> None:
    for rel in sorted(expected):
        if not rel.endswith(".safetensors.index.json") or rel not in works:
            continue
        folder = rel.rpartition("/")[0]
        shards = {(k[len(folder) + 1:] if folder else k): v for k, v in st_infos.items()
                  if (k.rpartition("/")[0] == folder)}
        try:
            idx = check_index(works[rel].path, shards)
            report.checks.append(Check("index", rel, True, actual=f"{len(idx.weight_map)} tensors in "
                                                                  f"{len(idx.shards)} shards"))
        except (StructureError, HostileContentError) as exc:
            report.checks.append(Check("index", rel, False, message=exc.message, error=exc))


def _params_check(root: Path, expected: Mapping[str, Authority], works: Mapping[str, _FileWork],
                  st_infos: Mapping[str, SafetensorsInfo], st_checks: Mapping[str, Check],
                  report: VerifyReport) -> None:
    if "params.json" not in expected:
        return
    weights = _mistral_weights(sorted(expected))
    if not weights:
        return
    from provision.formats.params import ModelArgs, spec_diff, tensor_spec

    if "params.json" not in works:
        return  # missing or refused: already failed
    try:
        args = ModelArgs.from_file(works["params.json"].path)
    except ParamsError as exc:
        report.checks.append(Check("params", "params.json", False, message=exc.message, error=exc))
        return
    report.checks.append(Check("params", "params.json", True))
    if not all(w in st_infos for w in weights):
        return  # a weights file is missing or malformed: already failed
    have: dict[str, tuple[int, ...]] = {}
    dup: list[str] = []
    for w in weights:
        for name, t in st_infos[w].tensors.items():
            if name in have:
                dup.append(name)
            have[name] = t.shape
    spec = tensor_spec(args)
    missing, extra, wrong, parts = spec_diff(have, spec)
    where = ", ".join(weights)
    if not (missing or extra or wrong or dup):
        report.checks.append(Check("tensors", where, True, expected=f"{len(spec)} tensors",
                                   actual=f"{len(have)} tensors"))
        return
    if dup:
        parts.append(f"{len(dup)} stored twice (first {dup[0]!r})")
    err = StructureError(
        f"The tensors in {where} do not match params.json: " + "; ".join(parts) + ".",
        hint="The weights and params.json come from different models or revisions; fetch both again.",
        path=where, missing=missing[:50], extra=extra[:50], wrong_shape=wrong[:50], duplicated=dup[:50],
    )
    report.checks.append(Check("tensors", where, False, expected=f"{len(spec)} tensors",
                               actual=f"{len(have)} tensors", message=err.message, error=err))


def verify_dir(root: Path, manifest: Manifest | None = None, *, progress: ProgressFn | None = None,
               workers: int | None = None) -> VerifyReport:
    """Verify a model folder against ``manifest`` (its optional files may be absent), or, with no
    manifest, every regular file in it under authority "none" (structure, params, sha256 reported)."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder.", hint="Pass the folder that holds the model files.",
                         path=str(root))
    if manifest is None:
        expected = {e.rel: Authority(kind="none") for e in _scan(root) if e.kind in ("file", "symlink-in")}
        return verify_files(root, expected, progress=progress, workers=workers, check_params=True)
    auths = authorities_from_manifest(manifest)
    for f in manifest.files:
        if f.optional and not os.path.lexists(root / f.path):
            auths.pop(f.path, None)
    return verify_files(root, auths, progress=progress, workers=workers,
                        check_params=manifest.format == "mistral")
