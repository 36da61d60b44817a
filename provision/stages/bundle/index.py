"""The bundle index, ``bundle.json``: every file of an air-gapped bundle with its size and sha256.

The index (schema ``provision/data/bundle.schema.json``, version 1) names the model (its store
folder name), the manifest lock, the ``.torrent`` of the payload (its infohashes), whether the
verified original is carried and which converted profiles are, and lists every other file of
the bundle. ``parse_index`` validates untrusted bytes against the schema and then the rules a
schema cannot say: every path is relative, stays inside the bundle (no ``..``, no absolute
path), appears once and lives under ``original/``, a listed profile's folder, or is the
manifest lock or the torrent. A bundle without the original carries the original's
``params.json`` (``original_params``) when the exporting store had it. Every failure is a one-line ``VerifyError`` (exit 5).
It reads and writes no files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from typing import Any

from provision.errors import HostileContentError, StructureError
from provision.io.paths import safe_relpath
from provision.layout import ORIGINAL, model_dirname

INDEX_NAME = "bundle.json"
MANIFEST_NAME = "manifest.lock.toml"
BUNDLE_SCHEMA_VERSION = 1
BUNDLE_KIND = "provision-bundle"
MAX_INDEX_BYTES = 16 << 20  # a bundle of thousands of files lists them in well under 1 MiB
PROFILE_DIR = "{profile_dir}"  # the profile folder inside a bundle's serve command


@dataclass(frozen=True)
class BundleFile:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class BundleProfile:
    name: str
    scheme: str | None
    layout: str | None
    serve_command: str | None  # with the profile folder written as PROFILE_DIR


@dataclass(frozen=True)
class BundleTorrent:
    path: str
    name: str
    btih: str | None
    btmh: str | None


@dataclass(frozen=True)
class BundleIndex:
    model: str
    manifest: str
    torrent: BundleTorrent
    original: bool
    profiles: tuple[BundleProfile, ...]
    files: tuple[BundleFile, ...]
    created: str = ""
    tool_version: str = ""
    original_params: dict[str, Any] | None = None  # without the original: its params.json

    def file(self, path: str) -> BundleFile | None:
        return next((f for f in self.files if f.path == path), None)

    @property
    def payload(self) -> tuple[BundleFile, ...]:
        """Every file the torrent covers: all but the torrent itself."""
        return tuple(f for f in self.files if f.path != self.torrent.path)

    def folder_files(self, folder: str) -> tuple[BundleFile, ...]:
        """The files under ``folder/`` (``original`` or a profile name)."""
        return tuple(f for f in self.files if f.path.startswith(folder + "/"))

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": BUNDLE_SCHEMA_VERSION, "kind": BUNDLE_KIND, "tool": "provision",
                "tool_version": self.tool_version, "created": self.created, "model": self.model,
                "manifest": self.manifest, "torrent": asdict(self.torrent), "original": self.original,
                "profiles": [asdict(p) for p in self.profiles], "files": [asdict(f) for f in self.files],
                "original_params": self.original_params}

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2) + "\n").encode()


@cache
def bundle_schema() -> dict[str, Any]:
    text = resources.files("provision").joinpath("data", "bundle.schema.json").read_text(encoding="utf-8")
    doc: dict[str, Any] = json.loads(text)
    return doc


def _schema_error(doc: Any) -> str | None:
    from jsonschema import Draft202012Validator

    err = next(iter(sorted(Draft202012Validator(bundle_schema()).iter_errors(doc), key=lambda e: list(e.path))),
               None)
    if err is None:
        return None
    return f"at {err.json_path}: {err.message[:200]}"


def _check_path(name: str) -> str:
    rel = safe_relpath(name, what="bundle path")
    if rel.as_posix() != name:
        raise HostileContentError(f"Refusing bundle path {name!r}: it is not in normal form ({rel.as_posix()!r}).",
                                  path=name)
    if rel.name == INDEX_NAME and len(rel.parts) == 1:
        raise StructureError(f"bundle.json lists {INDEX_NAME} itself.", path=name)
    return name


def parse_index(raw: bytes) -> BundleIndex:
    """Validate untrusted ``bundle.json`` bytes into a ``BundleIndex`` (exit 5 on anything wrong)."""
    if len(raw) > MAX_INDEX_BYTES:
        raise StructureError(f"bundle.json is {len(raw):,d} bytes, over the {MAX_INDEX_BYTES:,d} limit.")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StructureError(f"bundle.json is not JSON ({e}).") from None
    if isinstance(doc, dict) and isinstance(doc.get("schema_version"), int) and \
            doc["schema_version"] > BUNDLE_SCHEMA_VERSION:
        raise StructureError(f"bundle.json has schema {doc['schema_version']}, newer than this provision reads "
                             f"({BUNDLE_SCHEMA_VERSION}).", hint="Import it with a newer provision.")
    problem = _schema_error(doc)
    if problem is not None:
        raise StructureError(f"bundle.json is malformed {problem}.")
    if model_dirname(doc["model"]) != doc["model"]:
        raise HostileContentError(f"Refusing bundle model name {doc['model']!r}: not a store folder name.")
    profiles = tuple(BundleProfile(**p) for p in doc["profiles"])
    names = [p.name for p in profiles]
    if len(set(names)) != len(names) or ORIGINAL in names or any(model_dirname(n) != n for n in names):
        raise StructureError(f"bundle.json lists a bad or repeated profile name among {names}.")
    files = tuple(BundleFile(_check_path(f["path"]), f["size"], f["sha256"]) for f in doc["files"])
    t = doc["torrent"]
    torrent = BundleTorrent(_check_path(t["path"]), t["name"], t["btih"], t["btmh"])
    manifest = _check_path(doc["manifest"])
    folders = {*names, *([ORIGINAL] if doc["original"] else [])}
    seen: set[str] = set()
    for f in files:
        if f.path in seen:
            raise StructureError(f"bundle.json lists {f.path} twice.", path=f.path)
        seen.add(f.path)
        top = f.path.split("/", 1)[0]
        if f.path not in (manifest, torrent.path) and not (top in folders and "/" in f.path):
            raise StructureError(f"bundle.json lists {f.path}, outside original/ and the bundled profiles.",
                                 path=f.path)
    for need in (manifest, torrent.path):
        if need not in seen:
            raise StructureError(f"bundle.json does not list {need}.", path=need)
    for folder in folders:
        if not any(f.path.startswith(folder + "/") for f in files):
            raise StructureError(f"bundle.json lists no file of {folder}/.", path=folder)
    return BundleIndex(model=doc["model"], manifest=manifest, torrent=torrent, original=doc["original"],
                       profiles=profiles, files=files, created=doc["created"], tool_version=doc["tool_version"],
                       original_params=None if doc["original"] else doc.get("original_params"))
