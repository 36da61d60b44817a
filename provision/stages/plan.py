"""(source, options, detected hardware) -> a frozen ``Plan``: what would be fetched, where, and
whether it fits on disk.

Pure apart from reading the manifest or .torrent, looking at the destination folder and
asking the filesystem for free space; with ``offline=True`` it never touches the network.
A bare magnet or ``hf://`` source has its file listing resolved, when ``offline`` is False,
through the ``Listers`` it is given (by default the fetchers' own: peers for a magnet, the Hub
for ``hf://``, whose resolved snapshot the plan carries to the fetch); otherwise what is unknown
is shown as unknown. It downloads nothing, writes nothing and raises ``DiskSpaceError`` (exit 6)
when the destination cannot hold what must still be fetched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.errors import DiskSpaceError, NotFoundError
from provision.formats.manifest import FileSpec, Manifest, load_manifest
from provision.formats.sources import HFRef, Magnet, ParsedSource, parse_source
from provision.hardware import Hardware, detect
from provision.io.paths import safe_relpath
from provision.io.space import free_bytes, nearest_existing, staged_bytes
from provision.layout import Layout
from provision.settings import Settings
from provision.stages.fetch.request import (
    FileStatus,
    HubOptions,
    HubSnapshot,
    Listing,
    PlannedFile,
    SourceKind,
)


@dataclass(frozen=True)
class Plan:
    source: str
    kind: SourceKind
    name: str
    home: Path
    dest: Path
    files: tuple[PlannedFile, ...]
    sources: tuple[str, ...]  # human descriptions, in the order --source auto tries them
    hardware: Hardware
    free_bytes: int
    offline: bool
    manifest: Manifest | None = None
    magnet: Magnet | None = None
    hf: HFRef | None = None
    torrent_file: Path | None = None
    notes: tuple[str, ...] = field(default=())
    hub_snapshot: HubSnapshot | None = field(default=None, repr=False, compare=False)
    staged_bytes: int = 0  # bytes of this download already staged (a stopped fetch), on dest's filesystem

    @property
    def bytes_total(self) -> int:
        return sum(f.size or 0 for f in self.files)

    @property
    def bytes_to_fetch(self) -> int:
        return sum(f.size or 0 for f in self.files if f.to_fetch)

    @property
    def unknown_sizes(self) -> bool:
        return not self.files or any(f.size is None for f in self.files if f.to_fetch)

    @property
    def bytes_still_needed(self) -> int:
        """Disk space the fetch still needs: what is to fetch, less what a stopped fetch already staged."""
        return max(self.bytes_to_fetch - self.staged_bytes, 0)

    @property
    def disk_ok(self) -> bool:
        return self.bytes_still_needed <= self.free_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "name": self.name,
            "home": str(self.home),
            "dest": str(self.dest),
            "offline": self.offline,
            "sources": list(self.sources),
            "files": [
                {"path": f.path, "size": f.size, "sha256": f.sha256, "sources": list(f.sources),
                 "status": f.status, "optional": f.optional}
                for f in self.files
            ],
            "bytes_total": self.bytes_total,
            "bytes_to_fetch": self.bytes_to_fetch,
            "unknown_sizes": self.unknown_sizes,
            "free_bytes": self.free_bytes,
            "staged_bytes": self.staged_bytes,
            "disk_ok": self.disk_ok,
            "hardware": self.hardware.to_dict(),
            "notes": list(self.notes),
        }


MagnetLister = Callable[[Magnet, float, str], Listing]  # (magnet, timeout seconds, network mode)
HubLister = Callable[[HFRef, HubOptions], HubSnapshot | None]


def _magnet_listing(m: Magnet, timeout: float, network: str) -> Listing:
    from provision.stages.fetch.torrent import magnet_listing

    return magnet_listing(m, timeout=timeout, network=network)


def _hub_listing(ref: HFRef, options: HubOptions) -> HubSnapshot | None:
    from provision.stages.fetch.hub import hub_listing

    return hub_listing(ref, options)


@dataclass(frozen=True)
class Listers:
    """How the planner learns the files of a source that does not list them itself. The defaults
    are the fetchers' own (imported only when called: libtorrent and huggingface_hub stay unloaded)."""

    magnet: MagnetLister = _magnet_listing
    hub: HubLister = _hub_listing


def _file_status(dest: Path, spec_size: int | None, rel: str) -> FileStatus:
    p = dest / rel
    if not p.is_file():
        return "missing"
    if spec_size is not None and p.stat().st_size != spec_size:
        return "size-mismatch"
    return "present"


def _planned_from_specs(dest: Path, specs: list[FileSpec], source_types: tuple[str, ...]) -> tuple[PlannedFile, ...]:
    out = []
    for f in specs:
        srcs = tuple(t for t in source_types if f.in_source(t))
        out.append(PlannedFile(path=f.path, size=f.size, sha256=f.sha256, sources=srcs,
                               status=_file_status(dest, f.size, f.path), optional=f.optional))
    return tuple(out)


def _planned_from_listing(dest: Path, listing: Listing, src: str) -> tuple[PlannedFile, ...]:
    out = []
    for path, size, sha in listing:
        rel = str(safe_relpath(path, what="file name"))
        out.append(PlannedFile(path=rel, size=size, sha256=sha, sources=(src,), status=_file_status(dest, size, rel)))
    return tuple(out)


def _pickle_notes(manifest: Manifest) -> list[str]:
    """What happens to a manifest's pickles: a torrent's are fetched into staging and imported
    (the pickle and the safetensors side by side meanwhile: the disk that needs); the rest never."""
    from provision.units import human_bytes

    torrent = [f for f in manifest.files if f.pickle and f.in_source("torrent") and manifest.source("torrent")]
    hub_only = [f.path for f in manifest.files if f.pickle and f not in torrent]
    notes = [f"{', '.join(hub_only)}: PyTorch pickles only the Hub lists, never fetched or loaded (the Hub's "
             "safetensors are)"] if hub_only else []
    if torrent:
        size = sum(f.size or 0 for f in torrent) if all(f.size for f in torrent) else None
        if size is None and manifest.params is not None:
            from provision.formats.params import ModelArgs, parameter_count

            size = 2 * parameter_count(ModelArgs.from_dict(manifest.params))  # bf16 weights
        need = f"about {human_bytes(2 * size)} ({human_bytes(size)} each)" if size else "twice the weights"
        names = ", ".join(f.path for f in torrent)
        notes.append(f"{names} is a PyTorch pickle in the torrent: with --source torrent it is fetched into staging, "
                     "checked against the torrent and the release's hash, then an import step (import-pickle's "
                     "locked-down loader) writes consolidated.safetensors; pickle and safetensors coexist meanwhile: "
                     f"{need} of disk")
    return notes


def _listed_pickle_notes(files: tuple[PlannedFile, ...]) -> list[str]:
    """A torrent's listed pickles: what `provision run` does with them and the disk the import needs."""
    from provision.formats.pickles import is_pickle_name
    from provision.units import human_bytes

    pickles = [f for f in files if is_pickle_name(f.path)]
    if not pickles:
        return []
    size = sum(f.size or 0 for f in pickles)
    return [f"{', '.join(f.path for f in pickles)}: a PyTorch pickle; `provision run` fetches it into staging and an "
            "import step (import-pickle's locked-down loader) writes consolidated.safetensors; pickle and "
            f"safetensors coexist meanwhile: about {human_bytes(2 * size)} of disk"]


def make_plan(
    source: str,
    *,
    settings: Settings | None = None,
    home: Path | None = None,
    dest: Path | None = None,
    offline: bool = False,
    include: tuple[str, ...] = (),
    hardware: Hardware | None = None,
    check_disk: bool = True,
    metadata_timeout: float = 30.0,
    hub_options: HubOptions | None = None,
    listers: Listers | None = None,
    network: str | None = None,
    list_magnet: bool = True,
) -> Plan:
    """Build the plan for SOURCE; raise ``DiskSpaceError`` when it cannot fit (``check_disk``).
    ``hub_options`` (token, stall timeout) are used to list an ``hf://`` repo; ``network`` (default
    the settings') is the BitTorrent mode a bare magnet is listed in; ``list_magnet=False`` leaves a
    bare magnet's files to the fetch (which gets them with the metadata) without claiming offline."""
    import fnmatch

    st = settings or Settings.load()
    home = Path(home) if home else st.home
    layout = Layout(home)
    parsed: ParsedSource = parse_source(source)
    hw = hardware or detect()
    notes: list[str] = []
    manifest: Manifest | None = None
    files: tuple[PlannedFile, ...] = ()
    descs: tuple[str, ...]
    hub_snapshot: HubSnapshot | None = None
    list_with = listers or Listers()

    if parsed.kind == "manifest":
        assert parsed.manifest is not None
        manifest = load_manifest(parsed.manifest.ref)
        name = manifest.name
        d = Path(dest) if dest else layout.original(name)
        types = tuple(s.type for s in manifest.sources_in_order())
        files = _planned_from_specs(d, [f for f in manifest.files if not f.pickle], types)
        notes += _pickle_notes(manifest)
        descs = tuple(s.describe() for s in manifest.sources_in_order())
        unknown = [f.path for f in manifest.files if (f.size is None or not f.sha256) and not f.pickle]
        if unknown:
            notes.append("size or sha256 not pinned yet for " + ", ".join(unknown)
                         + " (checked against the source; `provision manifest lock` records them)")
    elif parsed.kind == "torrent":
        assert parsed.torrent is not None
        from provision.stages.fetch.torrent import read_torrent_file

        meta = read_torrent_file(parsed.torrent.path)
        name = meta.name
        d = Path(dest) if dest else layout.original(name)
        files = _planned_from_listing(d, [(p, s, None) for p, s in meta.files], "torrent")
        descs = (f"torrent file {parsed.torrent.path} ({meta.describe()})",)
    elif parsed.kind == "magnet":
        assert parsed.magnet is not None
        m = parsed.magnet
        name = m.name or m.infohash
        d = Path(dest) if dest else layout.original(name)
        descs = (m.describe(),)
        if offline or not list_magnet:
            notes.append(("offline: " if offline else "")
                         + "the file list of a bare magnet comes from peers; it is unknown until fetched")
        else:
            files = _planned_from_listing(d, list_with.magnet(m, metadata_timeout, network or st.network), "torrent")
    else:
        assert parsed.hf is not None
        ref = parsed.hf
        name = ref.repo
        d = Path(dest) if dest else layout.original(name)
        descs = (ref.uri,)
        if offline:
            notes.append("offline: the Hub's file listing is unknown without the network")
        else:
            hub_snapshot = list_with.hub(ref, hub_options or HubOptions())
            files = _planned_from_listing(d, hub_snapshot.listing() if hub_snapshot else [], "hf")

    if include:
        listed = files
        files = tuple(f for f in files if any(fnmatch.fnmatch(f.path, g) for g in include))
        if listed and not files:
            raise NotFoundError(f"No file of {source} matches --include {' '.join(include)} "
                                f"({len(listed)} files listed, e.g. {listed[0].path}).",
                                hint="Check the glob patterns (they match paths inside the model).")
    if parsed.kind in ("torrent", "magnet"):
        notes += _listed_pickle_notes(files)
    plan = Plan(source=source, kind=parsed.kind, name=name, home=home, dest=d, files=files, sources=descs,
                hardware=hw, free_bytes=free_bytes(d), offline=offline, manifest=manifest,
                magnet=parsed.magnet, hf=parsed.hf,
                torrent_file=parsed.torrent.path if parsed.torrent else None, notes=tuple(notes),
                hub_snapshot=hub_snapshot, staged_bytes=staged_bytes(layout.staging(name), d))
    if check_disk and not plan.disk_ok:
        from provision.units import human_bytes

        staged = f" ({human_bytes(plan.staged_bytes)} of it already staged)" if plan.staged_bytes else ""
        raise DiskSpaceError(
            f"Not enough disk space in {nearest_existing(d)}: {plan.name} needs "
            f"{human_bytes(plan.bytes_still_needed)} more{staged}, {human_bytes(plan.free_bytes)} free.",
            hint="Free some space or choose another --home/--dest.",
            needed=plan.bytes_still_needed, staged=plan.staged_bytes, free=plan.free_bytes, path=str(d),
        )
    return plan
