"""The result of a conversion and its record on disk, ``provision-convert.json``.

``ConvertResult`` is what ``convert`` returns (profile, files, source digests, per-tensor reports,
the ``vllm serve`` command); ``write_record`` stores it, with the context length, in a conversion's
staging folder, ``write_provenance`` then adds the folder's ``provenance.json`` (its last file);
``read_record`` reads the first back. Nothing here converts or reads tensors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.formats import provenance
from provision.formats.provenance import SourceIdentity
from provision.hardware import Target
from provision.io.atomic import atomic_write_text
from provision.io.hashing import sha256_file
from provision.stages.convert.items import Action
from provision.stages.profiles import Profile

RECORD_NAME = "provision-convert.json"


@dataclass
class TensorReport:
    """What became of one source tensor; the errors are set for quantized weights only."""

    name: str
    out_name: str
    action: Action
    relative_error: float | None = None
    max_abs_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "out_name": self.out_name, "action": self.action,
                "relative_error": self.relative_error, "max_abs_error": self.max_abs_error}


@dataclass
class ConvertResult:
    """What ``convert`` did: the profile, the files written, the source digests and per-tensor reports."""

    src_dir: Path
    out_dir: Path
    target: Target
    profile: Profile
    files: list[tuple[str, int]]
    source_files: list[dict[str, Any]]
    tensors: list[TensorReport]
    bytes_read: int
    bytes_written: int
    seconds: float
    vllm_command: str
    notes: list[str] = field(default_factory=list)
    logits_comparison: dict[str, Any] | None = None  # compare_logits' result, when it ran before the commit

    @property
    def scheme(self) -> str:
        return self.profile.scheme

    @property
    def layout(self) -> str:
        return self.profile.layout

    def quality(self) -> dict[str, Any]:
        errs = [t.relative_error for t in self.tensors if t.relative_error is not None]
        return {"quantized_tensors": len(errs),
                "relative_error_max": max(errs) if errs else 0.0,
                "relative_error_mean": (sum(errs) / len(errs)) if errs else 0.0}

    def to_dict(self) -> dict[str, Any]:
        return {
            "src_dir": str(self.src_dir), "out_dir": str(self.out_dir), "target": self.target.to_dict(),
            "profile": self.profile.to_dict(), "scheme": self.scheme, "layout": self.layout,
            "files": [{"path": n, "size": s} for n, s in self.files], "source_files": self.source_files,
            "bytes_read": self.bytes_read, "bytes_written": self.bytes_written, "seconds": round(self.seconds, 3),
            "throughput_bytes_per_s": round(self.bytes_read / self.seconds) if self.seconds else None,
            "quality": self.quality(), "tensors": [t.to_dict() for t in self.tensors],
            "vllm_command": self.vllm_command, "notes": self.notes, "logits_comparison": self.logits_comparison,
        }


def _write(out_dir: Path, record: dict[str, Any]) -> None:
    atomic_write_text(out_dir / RECORD_NAME, json.dumps(record, indent=2) + "\n")


def write_record(result: ConvertResult, *, context: int, folder: Path | None = None) -> None:
    """Write ``provision-convert.json`` for a finished conversion (its last file) into ``folder``
    (default: the result's ``out_dir``; convert passes its staging folder)."""
    record = result.to_dict()
    record["context"] = context
    _write(folder if folder is not None else result.out_dir, record)


def write_provenance(result: ConvertResult, folder: Path, *, context: int, source: SourceIdentity | None,
                     side: list[Path], source_sha256: Mapping[str, str],
                     output_facts: Mapping[str, tuple[int, str]] | None = None) -> None:
    """Write ``provenance.json`` into ``folder`` (convert's staging folder, after ``write_record``):
    the source (``source``'s identity, every weight file and side file with its size and sha256;
    a side file is hashed here unless ``source_sha256`` names it), the recipe and every file of
    ``folder`` hashed (``provision.formats.provenance``), or taken from ``output_facts`` (the pre-commit
    verify's ``{path: (size, sha256)}``, so the output is read once)."""
    files = [{"path": f["path"], "size": f["size"], "sha256": f["sha256"]} for f in result.source_files
             if "sha256" in f]
    for p in side:
        files.append({"path": p.name, "size": p.stat().st_size,
                      "sha256": source_sha256.get(p.name) or sha256_file(p)})
    prof = result.profile
    rec = provenance.build(folder, source=source or SourceIdentity(), source_files=files,
                           recipe=provenance.recipe(scheme=prof.scheme, layout=prof.layout,
                                                    target=result.target.to_dict(), profile=prof.name,
                                                    context=context),
                           known=output_facts)
    provenance.write(folder, rec)


def read_record(out_dir: Path) -> dict[str, Any]:
    """The record of the conversion in ``out_dir``."""
    doc: dict[str, Any] = json.loads((out_dir / RECORD_NAME).read_text(encoding="utf-8"))
    return doc
