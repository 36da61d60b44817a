"""The provenance record, ``provenance.json``: what a folder of weights is and how it was made.

A record (schema ``provision/data/provenance.schema.json``, version 1) names the source (the
manifest's name and sha256, the BitTorrent infohash, the Hub repository and commit, each source
file's size and sha256), the recipe (scheme, layout, target, profile, tool and library versions),
every file of the folder with its size and sha256 (the record itself excluded) and, once the
files passed a smoke test, its result. ``build`` hashes a folder into a record, ``write``
stores one atomically (``add_smoke`` rewrites it with the smoke result), ``read`` loads and
validates one, and ``check`` compares a folder with its record: a changed byte, a missing or
extra file, or a recorded path that leaves the folder is a one-line ``VerifyError`` (exit 5).
It does not sign anything (``provision.stages.sign``) and does not decide when a record is written.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from provision.errors import HashMismatchError, HostileContentError, SizeMismatchError, StructureError
from provision.io.atomic import TMP_PREFIX, atomic_write_text
from provision.io.hashing import sha256_file
from provision.io.opening import read_regular
from provision.io.paths import safe_join, safe_relpath
from provision.version import __version__

PROVENANCE_NAME = "provenance.json"
SCHEMA_VERSION = 1
SCHEMA_RESOURCE = "provenance.schema.json"
KIND = "provision-provenance"
MAX_RECORD_BYTES = 64 << 20
PACKAGES = ("torch", "safetensors", "compressed-tensors")
HASH_WORKERS = 4


@dataclass(frozen=True)
class SourceIdentity:
    """Who the source is, as far as it is known: manifest, torrent infohash, Hub repository and commit."""

    manifest_name: str | None = None
    manifest_sha256: str | None = None
    btih: str | None = None
    hf_repo: str | None = None
    hf_commit: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest": ({"name": self.manifest_name, "sha256": self.manifest_sha256}
                         if self.manifest_name else None),
            "btih": self.btih.lower() if self.btih else None,
            "hf": {"repo": self.hf_repo, "commit": self.hf_commit} if self.hf_repo else None,
        }


@dataclass(frozen=True)
class CheckResult:
    """A folder that matched its record: the record's path and sha256, the files and bytes checked, and
    the inert files (documentation, signatures) the folder also holds that the record does not list."""

    folder: Path
    record_path: Path
    record_sha256: str
    files: int
    bytes: int
    not_in_record: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"record": str(self.record_path), "record_sha256": self.record_sha256, "files": self.files,
                "bytes": self.bytes, "not_in_record": list(self.not_in_record)}


# files no model loader reads (vLLM, transformers, mistral-inference): a user's notes or licence next to a
# profile (``convert --force`` adds a conversion to such a folder), or a signature; anything else not in the
# record could change what a server loads (a shard, a config, a tokenizer, code), so it fails a check
INERT_SUFFIXES = (".md", ".txt", ".rst", ".pdf", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".sig", ".sigstore")
INERT_NAMES = ("README", "LICENSE", "LICENCE", "NOTICE", "COPYING", "AUTHORS", "CHANGELOG")


def is_inert(rel: str) -> bool:
    """True for a file a model loader never reads (see ``INERT_SUFFIXES``): documentation, images,
    signatures, a git dotfile; never for an interrupted writer's temporary."""
    name = Path(rel).name
    if name.startswith(TMP_PREFIX):
        return False
    return (name.lower().endswith(INERT_SUFFIXES) or name.split(".", 1)[0].upper() in INERT_NAMES
            or name in (".gitattributes", ".gitignore"))


@cache
def schema() -> dict[str, Any]:
    """The shipped JSON Schema of a record."""
    doc = json.loads(resources.files("provision").joinpath("data", SCHEMA_RESOURCE).read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def validate(record: Mapping[str, Any], *, where: str = PROVENANCE_NAME) -> None:
    """Raise ``StructureError`` (exit 5) naming the first place ``record`` breaks the schema."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    err = best_match(Draft202012Validator(schema()).iter_errors(record))
    if err is not None:
        at = "/".join(str(p) for p in err.absolute_path) or "(top)"
        raise StructureError(f"{where} is not a valid provenance record: at {at}: {err.message[:200]}", path=where)


def package_versions() -> dict[str, str | None]:
    """The installed versions of the libraries a conversion uses (None: not installed); imports none of them."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def recipe(*, scheme: str, layout: str, target: Mapping[str, Any], profile: str,
           context: int | None = None) -> dict[str, Any]:
    """The record's ``recipe``: how the files were made, with this tool's and the libraries' versions."""
    d: dict[str, Any] = {"scheme": scheme, "layout": layout, "target": dict(target), "profile": profile,
                         "tool": "provision", "tool_version": __version__, "packages": package_versions()}
    if context is not None:
        d["context"] = context
    return d


def list_files(folder: Path) -> list[str]:
    """The relative paths of every file under ``folder`` except the record (sorted). A symlink, FIFO,
    socket or device anywhere is refused (``HostileContentError``): a record vouches for bytes only."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            p = base / name
            st = os.lstat(p)
            rel = p.relative_to(folder).as_posix()
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise HostileContentError(f"Refusing {rel} in {folder}: it is not a regular file "
                                          "(a symlink, FIFO or device), which a provenance record cannot vouch for.",
                                          path=str(p))
            if rel != PROVENANCE_NAME:
                out.append(rel)
    return sorted(out)


def hash_files(folder: Path, rels: Sequence[str],
                known: Mapping[str, tuple[int, str]] | None = None) -> list[dict[str, Any]]:
    """``[{"path", "size", "sha256"}]`` for each relative path of ``rels`` under ``folder`` (hashed in
    parallel); ``known`` (``{path: (size, sha256)}`` the caller has just read, e.g. verify's facts of a
    folder only it writes) stands in for hashing a file whose size still matches."""
    def one(rel: str) -> dict[str, Any]:
        p = safe_join(folder, rel, what="recorded file")
        size = p.stat().st_size
        fact = (known or {}).get(rel)
        return {"path": rel, "size": size, "sha256": fact[1] if fact and fact[0] == size else sha256_file(p)}

    with ThreadPoolExecutor(max_workers=max(1, min(HASH_WORKERS, len(rels)))) as pool:
        return list(pool.map(one, rels))


def build(folder: Path, *, source: SourceIdentity, source_files: Sequence[Mapping[str, Any]],
          recipe: Mapping[str, Any] | None, smoke: Mapping[str, Any] | None = None,
          known: Mapping[str, tuple[int, str]] | None = None) -> dict[str, Any]:
    """The record of ``folder`` as it is now: every file (the record excluded) hashed (or taken from
    ``known``, see ``hash_files``), with ``source``, its ``source_files`` (``path``, ``size``,
    ``sha256`` each) and ``recipe``. Writes nothing."""
    folder = Path(folder)
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "kind": KIND,
        "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "source": {**source.to_dict(),
                   "files": [{"path": str(f["path"]), "size": int(f["size"]), "sha256": str(f["sha256"])}
                             for f in source_files]},
        "recipe": dict(recipe) if recipe is not None else None,
        "files": hash_files(folder, list_files(folder), known),
        "smoke": dict(smoke) if smoke is not None else None,
    }
    validate(record)
    return record


def write(folder: Path, record: Mapping[str, Any]) -> Path:
    """Store ``record`` as ``folder/provenance.json`` (validated first; atomic, fsynced)."""
    validate(record)
    path = Path(folder) / PROVENANCE_NAME
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path


def read(folder: Path) -> dict[str, Any]:
    """The validated record in ``folder``. A missing record is ``StructureError``, a FIFO or a symlink
    out of the folder ``HostileContentError``, malformed JSON or a schema violation ``StructureError``
    (all exit 5)."""
    folder = Path(folder)
    path = folder / PROVENANCE_NAME
    try:
        raw = read_regular(path, root=folder, what="provenance record", max_bytes=MAX_RECORD_BYTES)
    except FileNotFoundError:
        raise StructureError(f"{folder} has no {PROVENANCE_NAME}; nothing to verify it against.",
                             path=str(path)) from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise StructureError(f"{path} is not valid JSON ({str(e)[:120]}).", path=str(path)) from None
    if not isinstance(doc, dict):
        raise StructureError(f"{path} is not a JSON object.", path=str(path))
    validate(doc, where=str(path))
    return doc


def add_smoke(folder: Path, smoke: Mapping[str, Any]) -> dict[str, Any]:
    """Rewrite ``folder``'s record with the smoke result (atomically: the old record or the new one)."""
    record = read(folder)
    record["smoke"] = dict(smoke)
    write(folder, record)
    return record


def smoke_entry(report: Mapping[str, Any]) -> dict[str, Any]:
    """The record's ``smoke`` from a smoke report's dict (device, dtype, prompt, generated ids, checks)."""
    return {"device": str(report["device"]), "dtype": str(report["dtype"]), "prompt": str(report["prompt"]),
            "token_ids": [int(t) for t in report["token_ids"]], "text": str(report.get("text", "")),
            "passed": bool(report["passed"]),
            "checks": [{"name": str(c["name"]), "passed": bool(c["passed"]), "detail": str(c.get("detail", ""))}
                       for c in report.get("checks", [])]}


def record_sha256(folder: Path) -> str:
    """The sha256 of ``folder``'s record file (what a report links to)."""
    return sha256_file(Path(folder) / PROVENANCE_NAME)


def check(folder: Path, record: Mapping[str, Any] | None = None, *, inert_extra_ok: bool = False) -> CheckResult:
    """Check every file of ``folder`` against ``record`` (default: its ``provenance.json``).

    Raises, with one line and exit 5: ``HostileContentError`` for a recorded path that leaves the
    folder (absolute, ``..``, through a symlink) or a non-regular file, ``StructureError`` for a
    missing or an extra file, ``SizeMismatchError`` / ``HashMismatchError`` for changed bytes.
    Temporaries of an interrupted writer (``.provision-tmp-*``) count as extra files too. With
    ``inert_extra_ok`` (``provision verify``, ``sign``) an extra file no model loader reads
    (``is_inert``: a README, a licence, a signature) is listed in ``not_in_record`` instead; any
    other extra file still fails, naming every such file."""
    folder = Path(folder)
    if record is None:
        record = read(folder)
    else:
        validate(record)
    recorded: dict[str, Mapping[str, Any]] = {}
    for f in record["files"]:
        rel = safe_relpath(str(f["path"]), what="recorded path").as_posix()
        if rel == PROVENANCE_NAME or rel in recorded:
            raise StructureError(f"{PROVENANCE_NAME} lists {rel} twice or lists itself.", path=rel)
        safe_join(folder, rel, what="recorded path")
        recorded[rel] = f
    present = set(list_files(folder))
    missing = sorted(set(recorded) - present)
    if missing:
        raise StructureError(f"{folder / missing[0]} is missing: {PROVENANCE_NAME} records it "
                             f"({len(missing)} file(s) missing).", path=str(folder / missing[0]))
    extra = sorted(present - set(recorded))
    inert = tuple(rel for rel in extra if inert_extra_ok and is_inert(rel))
    extra = [rel for rel in extra if rel not in inert]
    if extra:
        tmp = " (an interrupted writer's temporary)" if Path(extra[0]).name.startswith(TMP_PREFIX) else ""
        more = f" (and {len(extra) - 1} more: {', '.join(extra[1:4])}{', ...' if len(extra) > 4 else ''})" \
            if len(extra) > 1 else ""
        raise StructureError(f"{folder / extra[0]} is not in {PROVENANCE_NAME}{tmp}{more}: the folder holds a file "
                             "the record does not vouch for, which a server loading the folder could read.",
                             path=str(folder / extra[0]), not_in_record=extra)
    for rel in sorted(recorded):
        size = (folder / rel).stat().st_size
        if size != int(recorded[rel]["size"]):
            raise SizeMismatchError(f"{folder / rel} is {size:,d} bytes; {PROVENANCE_NAME} records "
                                    f"{int(recorded[rel]['size']):,d}.", path=str(folder / rel))
    got = {f["path"]: f["sha256"] for f in hash_files(folder, sorted(recorded))}
    for rel in sorted(recorded):
        if got[rel] != recorded[rel]["sha256"]:
            raise HashMismatchError(f"{folder / rel} does not match {PROVENANCE_NAME}: sha256 {got[rel][:16]}…, "
                                    f"recorded {str(recorded[rel]['sha256'])[:16]}….", path=str(folder / rel))
    return CheckResult(folder=folder, record_path=folder / PROVENANCE_NAME,
                       record_sha256=record_sha256(folder) if (folder / PROVENANCE_NAME).is_file() else "",
                       files=len(recorded), bytes=sum(int(f["size"]) for f in recorded.values()), not_in_record=inert)


__all__ = ["KIND", "PROVENANCE_NAME", "SCHEMA_VERSION", "CheckResult", "SourceIdentity", "add_smoke",
           "build", "check", "hash_files", "is_inert", "list_files", "package_versions", "read", "recipe", "record_sha256", "smoke_entry",
           "validate", "write"]
