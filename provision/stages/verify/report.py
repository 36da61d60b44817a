"""What a verification found: one ``Check`` per check, a ``FileReport`` per file, the ``VerifyReport``.

The report never raises by itself: ``VerifyReport.raise_for_failure()`` raises the first failed
check's typed error (HostileContentError, SizeMismatchError, HashMismatchError, StructureError,
VerifyError for a missing file: exit 5; ParamsError: exit 3), and ``to_dict()`` is the JSON the
CLI prints. This module holds results only; ``verifier`` fills them in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from provision.errors import ProvisionError, VerifyError

CheckName = Literal["hostile", "present", "size", "read", "sha256", "git-sha1", "md5", "torrent-v1-pieces",
                    "torrent-v2-merkle", "safetensors", "index", "params", "tensors"]
FileStatus = Literal["ok", "failed", "missing", "unlisted", "refused"]


@dataclass
class Check:
    """One check's outcome; ``error`` is the typed error a failure raises."""

    name: CheckName
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
    status: FileStatus
    authority: str | None = None
    size: int | None = None
    sha256: str | None = None
    sha256_source: Literal["read", "fetcher"] | None = None  # "fetcher": known_sha256 stood in for a read
    git_sha1: str | None = None
    checks: list[Check] = field(default_factory=list)
    hash_units: int = 0  # hashing units read (a whole-file pass, torrent piece ranges)
    hash_ranges: int = 0  # of those, independent piece / merkle-chunk ranges (only a torrent authority splits)
    hash_threads: int = 0  # distinct workers that ran them
    read_back: int = 0  # v1 pieces (matched) or v2 merkle chunks (roots) the fetcher read back from the disk

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "status": self.status, "authority": self.authority,
                             "size": self.size}
        if self.sha256:
            d["sha256"] = self.sha256
            d["sha256_source"] = self.sha256_source
        if self.git_sha1:
            d["git_sha1"] = self.git_sha1
        if self.hash_units or self.read_back:
            d["hash"] = {"units": self.hash_units, "ranges": self.hash_ranges, "workers": self.hash_threads}
            if self.read_back:
                d["hash"]["read_back_by_fetcher"] = self.read_back
        return d


@dataclass
class VerifyReport:
    root: Path
    files: list[FileReport] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    bytes_hashed: int = 0
    seconds: float = 0.0
    workers: int = 1
    torrent: dict[str, Any] | None = None  # the torrent info dictionary used as an authority, and its chain

    @property
    def authorities(self) -> dict[str, int]:
        """``{authority kind: files}`` over the files that were expected (not the unlisted ones)."""
        out: dict[str, int] = {}
        for f in self.files:
            if f.authority is not None and f.status != "unlisted":
                out[f.authority] = out.get(f.authority, 0) + 1
        return dict(sorted(out.items()))

    @property
    def authority(self) -> str | None:
        """The one authority every expected file was checked against, "mixed", or None (no file)."""
        kinds = self.authorities
        return None if not kinds else next(iter(kinds)) if len(kinds) == 1 else "mixed"

    def describe_authorities(self) -> str:
        """``torrent-v2-merkle (1 file, 96 ranges on 2 workers), manifest-sha256 (3 files)``."""
        parts = []
        for kind, n in self.authorities.items():
            ranged = [f for f in self.files if f.authority == kind and f.hash_ranges > 1]
            extra = ""
            if ranged:
                extra = (f", {sum(f.hash_ranges for f in ranged)} ranges on "
                         f"{max(f.hash_threads for f in ranged)} workers")
            parts.append(f"{kind} ({n} file{'s' if n != 1 else ''}{extra})")
        return ", ".join(parts)

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
            "authority": self.authority,
            "authorities": self.authorities,
            **({"torrent": self.torrent} if self.torrent is not None else {}),
        }

    def raise_for_failure(self) -> None:
        """Raise the first failed check's typed error; do nothing when everything passed."""
        for c in self.checks:
            if not c.ok:
                raise c.error or VerifyError(c.message or f"{c.file}: {c.name} check failed.", file=c.file)
