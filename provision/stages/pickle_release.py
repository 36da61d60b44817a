"""A pickled torrent release taken the whole way: the pickle fetched into staging, imported, dropped.

``pickles_to_import`` says which files of a run's torrent are PyTorch pickles to import (none
when the run takes another way: the Hub, or a torrent of safetensors). ``PickledRelease`` does
the two resumable steps the pipeline wraps as its ``fetch`` and ``import`` stages: ``fetch``
brings the torrent's files into a staging folder (every piece checked by libtorrent, every file
by verify, nothing placed in ``original/``); ``import_`` checks each pickle's sha256 (from that
verified download) and the release's md5 or sha256 where the manifest pins one, imports them in
the locked-down loader (``pickle_import``) into ``original/`` by one rename, pins the imported
files in a manifest so verify has an authority for them, and drops the pickles unless asked to
keep them. A pickle the import refuses for its content (the release's hash, a hostile or
mismatched pickle: exit 5) is dropped too unless kept (the same torrent brings the same bytes);
one stopped by a resource (memory, time: exit 6 or 7) stays for the rerun. An ``original/`` left by an import killed before it was recorded is taken over
when its ``import.json`` names the same pickles and its files still hash as recorded. Nothing
here prints, chooses a profile or runs the later stages.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from provision.errors import UsageError, VerifyError
from provision.formats.manifest import FileSpec, Manifest, Source, write_manifest
from provision.formats.pickles import is_pickle_name
from provision.io.atomic import TMP_PREFIX
from provision.io.hashing import hash_file
from provision.layout import Layout, model_dirname
from provision.progress import ProgressFn, note
from provision.stages.fetch import TorrentOptions, source_order
from provision.stages.fetch.request import FileStatus, PlannedFile
from provision.stages.pickle_import import RECORD_NAME, PickleSource, import_pickles
from provision.stages.plan import Plan

STAGING_NAME = "pickle-src"  # under the model's staging folder: where the torrent's files wait for the import


def pickles_to_import(plan: Plan, source: str, torrent: TorrentOptions) -> tuple[str, ...]:
    """The pickles this run imports: those of the torrent it fetches (a manifest's files marked
    ``pickle`` in its torrent source, or a bare magnet's or .torrent's pickle files). Empty when
    the first source tried is not the torrent or the torrent holds no pickle."""
    if plan.kind == "hf":
        return ()
    order = source_order(plan, source)
    if order[0] != "torrent":
        return ()
    if plan.kind == "manifest":
        assert plan.manifest is not None
        return tuple(f.path for f in plan.manifest.files if f.pickle and f.in_source("torrent"))
    if plan.kind == "torrent" or plan.files:
        paths = [f.path for f in plan.files]
    else:
        paths = _magnet_paths(plan, torrent)
    if torrent.include:
        paths = [p for p in paths if any(fnmatch.fnmatch(p, g) for g in torrent.include)]
    return tuple(p for p in paths if is_pickle_name(p))


def _magnet_paths(plan: Plan, torrent: TorrentOptions) -> list[str]:
    """A bare magnet's file paths: from the metadata an earlier fetch kept, else from its peers."""
    from provision.stages.fetch.torrent import magnet_listing, read_torrent_file

    assert plan.magnet is not None
    kept = Layout(plan.home).torrents / f"{plan.magnet.infohash}.torrent"
    if kept.is_file():
        with contextlib.suppress(UsageError):  # unreadable: ask the peers again
            return [p for p, _s in read_torrent_file(kept).files]
    listing = magnet_listing(plan.magnet, timeout=torrent.metadata_timeout, network=torrent.network,
                             peers=torrent.peers)
    return [p for p, _s, _h in listing]


def _status(folder: Path, size: int | None, rel: str) -> FileStatus:
    p = folder / rel
    if not p.is_file():
        return "missing"
    return "size-mismatch" if size is not None and p.stat().st_size != size else "present"


@dataclass(frozen=True)
class Fetched:
    """The torrent's files in the staging folder, verified: path -> (size, sha256), and where from."""

    folder: Path
    files: dict[str, tuple[int, str]]
    facts: dict[str, Any]
    bytes_downloaded: int
    details: dict[str, Any]


@dataclass(frozen=True)
class Imported:
    """The imported ``original/``: its files (path -> (size, sha256)), the provenance, the manifest."""

    files: dict[str, tuple[int, str]]
    facts: dict[str, Any]
    details: dict[str, Any]
    manifest: Manifest


class PickledRelease:
    """The fetch and import of one pickled torrent release (see the module docstring)."""

    def __init__(self, plan: Plan, pickles: tuple[str, ...], *, torrent: TorrentOptions, keep_pickle: bool = False,
                 progress: ProgressFn | None = None) -> None:
        self.plan, self.pickles, self.torrent = plan, pickles, torrent
        self.keep_pickle, self.progress = keep_pickle, progress
        self.layout = Layout(plan.home)
        self.folder = self.layout.staging(plan.name) / STAGING_NAME
        self.original = plan.dest

    # -- fetch ---------------------------------------------------------------------------------
    def _request(self) -> Plan:
        """The plan's torrent files (pickles included), to be fetched into the staging folder."""
        plan = self.plan
        files: tuple[PlannedFile, ...] = ()
        if plan.kind == "manifest":
            assert plan.manifest is not None
            files = tuple(PlannedFile(path=f.path, size=f.size, sha256=f.sha256, sources=("torrent",),
                                      status=_status(self.folder, f.size, f.path), optional=f.optional)
                          for f in plan.manifest.files if f.in_source("torrent"))
        elif plan.files:
            files = tuple(replace(f, status=_status(self.folder, f.size, f.path)) for f in plan.files)
        return replace(plan, dest=self.folder, files=files)

    def fetch(self) -> Fetched:
        """Download the torrent's files into the staging folder (verified; resumable)."""
        from provision.stages.fetch import fetch

        note(self.progress, "fetch", f"{', '.join(self.pickles)}: a PyTorch pickle; fetched into staging, "
                                     "then imported in a locked-down process")
        if self.torrent.seed_for > 0:
            note(self.progress, "fetch", "--seed-for: a pickle is not seeded; after the import, "
                                         f"`provision seed {self.original}` serves the safetensors")
        self.folder.mkdir(parents=True, exist_ok=True)
        res = fetch(self._request(), source="torrent", dest=self.folder, torrent=replace(self.torrent, seed_for=0.0),
                    progress=self.progress, lock=False,  # the run holds the model's lock
                    pickles_as_data=True)
        files = {f.path: (f.size, f.sha256) for f in res.files if f.sha256}
        missing = [p for p in self.pickles if p not in files]
        if missing:
            raise UsageError(f"The torrent delivered no {missing[0]}; nothing to import.", path=missing[0])
        extra = {k: v for k, v in res.extra.items() if isinstance(v, (str, int, float)) and k != "torrent_name"}
        facts = {"source": "torrent", "staging": str(self.folder), "pickles": list(self.pickles),
                 "authorities": {f.path: f.authority for f in res.files}, **extra}
        return Fetched(self.folder, files, facts, res.bytes_downloaded, {"how": "torrent", **res.to_dict()})

    # -- import --------------------------------------------------------------------------------
    def _sources(self, known_sha256: dict[str, str], authorities: dict[str, str]) -> list[PickleSource]:
        release = self.plan.manifest
        out = []
        for rel in self.pickles:
            spec = release.file(rel) if release is not None else None
            sha = (spec.sha256 if spec is not None and spec.sha256 else None) or known_sha256.get(rel)
            out.append(PickleSource(self.folder / rel, sha256=sha, md5=spec.md5 if spec is not None else None,
                                    authority=authorities.get(rel, "torrent")))
        return out

    def published(self, known_sha256: dict[str, str]) -> bool:
        """True when ``original/import.json`` records an import of exactly these pickles (by the
        sha256 their verified download had): a run killed after publishing it need not fetch again."""
        try:
            record = json.loads((self.original / RECORD_NAME).read_text(encoding="utf-8"))
            shards = {s["name"]: s["sha256"] for s in record["shards"]}
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return shards == {Path(rel).name: known_sha256.get(rel) for rel in self.pickles}

    def _taken_over(self, sources: list[PickleSource]) -> dict[str, tuple[int, str]] | None:
        """The files of an ``original/`` an earlier import of these same pickles published, when
        they still hash as its ``import.json`` recorded; else None."""
        try:
            record = json.loads((self.original / RECORD_NAME).read_text(encoding="utf-8"))
            shards = {s["name"]: s["sha256"] for s in record["shards"]}
            files = {k: (int(v["size"]), str(v["sha256"])) for k, v in record["files"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if shards != {s.path.name: s.sha256 for s in sources}:
            return None
        for rel, (size, sha) in files.items():
            p = self.original / rel
            if not p.is_file() or p.stat().st_size != size or hash_file(p)[0] != sha:
                return None
        return files

    def import_(self, known_sha256: dict[str, str], authorities: dict[str, str]) -> Imported:
        """Import the staged pickles into ``original/`` and pin what was written (see the module docstring)."""
        sources = self._sources(known_sha256, authorities)
        files = self._taken_over(sources) if self.original.is_dir() else None
        details: dict[str, Any]
        if files is not None:
            note(self.progress, "import", f"{self.original} already holds this import; its files still match")
            details = {"how": "taken over", "files": sorted(files)}
        else:
            if self.original.exists():
                if not (self.original / RECORD_NAME).is_file():
                    raise UsageError(f"{self.original} exists and does not hold an import of "
                                     f"{', '.join(self.pickles)}; remove it to import again.",
                                     path=str(self.original))
                shutil.rmtree(self.original)  # an earlier import of other bytes: redone from the verified pickle
            for stale in self.original.parent.glob(f"{TMP_PREFIX}import-{self.original.name}.*"):
                shutil.rmtree(stale, ignore_errors=True)  # a killed import's folder (the run holds the model lock)
            try:
                # params.json byte for byte: the import changes the container, nothing the model means
                res = import_pickles(sources, self.original, explicit_rope=False, progress=self.progress)
            except VerifyError:  # not the release, hostile or not this model: the same torrent brings the same bytes
                if not self.keep_pickle:
                    self._drop_pickles()
                raise
            files = {k: v for k, v in res.files.items() if k != RECORD_NAME}
            details = {"how": "import-pickle", **res.to_dict()}
        record = json.loads((self.original / RECORD_NAME).read_text(encoding="utf-8"))
        facts = {"pickles": list(self.pickles), "shards": record.get("shards", []),
                 "sandbox": record.get("sandbox", {}), "kept_pickle": self.keep_pickle}
        manifest = write_manifest(self._manifest(files), self.layout.manifest_file(self.plan.name))
        if not self.keep_pickle:
            self._drop_pickles()
        return Imported(files=files, facts=facts, details=details, manifest=manifest)

    def _drop_pickles(self) -> None:
        for rel in self.pickles:
            with contextlib.suppress(FileNotFoundError):
                (self.folder / rel).unlink()
        if not any(p.is_file() and is_pickle_name(p.name) for p in self.folder.rglob("*")):
            shutil.rmtree(self.folder, ignore_errors=True)
            with contextlib.suppress(OSError):  # not empty: another download of this model stages there
                self.folder.parent.rmdir()

    def _manifest(self, files: dict[str, tuple[int, str]]) -> Manifest:
        """The manifest verify checks ``original/`` against: the imported files with their hashes,
        the release's sources, smoke test and params (a bare magnet's: the magnet)."""
        plan, release = self.plan, self.plan.manifest
        specs = tuple(FileSpec(path=p, size=s, sha256=h) for p, (s, h) in sorted(files.items()))
        if release is not None:
            return replace(release, format="mistral", files=specs, path=None, sha256=None,
                           description=f"{release.description} Imported from {', '.join(self.pickles)}."[:400])
        params = json.loads((self.original / "params.json").read_text(encoding="utf-8"))
        if plan.magnet is not None:
            src = Source(type="torrent", magnet=plan.magnet.uri, prefix="")
        else:
            assert plan.torrent_file is not None
            src = Source(type="torrent", torrent=plan.torrent_file.name)
        return Manifest(name=model_dirname(plan.name).lower(), architecture="mixtral" if "moe" in params else "mistral",
                        format="mistral", sources=(src,), files=specs,  # smoke: as for any bare magnet
                        description=f"Imported by provision run from {', '.join(self.pickles)} of {plan.source[:120]}")
