"""What a fetch is asked for and what it returns: the request protocol, the source options, the results.

``FetchRequest`` is the part of a ``Plan`` the fetchers read (a protocol: ``stages.plan.Plan``
satisfies it, and the fetchers never import the planner). ``HubSnapshot`` is a Hub repo's file
list at one commit, as the planner's listing resolved it, so the fetch downloads exactly what
was planned. ``ExistingPolicy`` and ``check_existing`` say what happens to a file already in the
destination under a name the fetch would write, when it is not the verified file: in the store
(provision's own folder) it is replaced, in a user's ``--dest`` refused unless ``--force``, and
then named. Nothing here does I/O beyond reading ``PROVISION_NETWORK`` for a default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from provision.errors import UsageError
from provision.formats.manifest import Manifest
from provision.formats.sources import HFRef, Magnet, SourceKind
from provision.progress import ProgressFn, note
from provision.settings import network_mode

SourceChoice = Literal["auto", "torrent", "hf", "local"]  # what --source accepts
NetworkMode = Literal["public", "closed"]
FileStatus = Literal["missing", "present", "size-mismatch"]
# a file already in dest under a name the fetch writes, that is not the verified file: "replace" it (a
# folder of the store's), "refuse" (a user's --dest: exit 2) or "force" (replace it, naming each)
ExistingPolicy = Literal["replace", "refuse", "force"]
Listing = Sequence[tuple[str, int | None, str | None]]  # (path, size or None, sha256 or None)


@dataclass(frozen=True)
class PlannedFile:
    path: str
    size: int | None
    sha256: str | None
    sources: tuple[str, ...]
    status: FileStatus
    optional: bool = False

    @property
    def to_fetch(self) -> bool:
        return self.status != "present"


class FetchRequest(Protocol):
    """What a fetcher needs to know: the source, the model's name and home, and the files wanted."""

    @property
    def source(self) -> str: ...
    @property
    def kind(self) -> SourceKind: ...
    @property
    def name(self) -> str: ...
    @property
    def home(self) -> Path: ...
    @property
    def dest(self) -> Path: ...
    @property
    def files(self) -> Sequence[PlannedFile]: ...
    @property
    def manifest(self) -> Manifest | None: ...
    @property
    def magnet(self) -> Magnet | None: ...
    @property
    def hf(self) -> HFRef | None: ...
    @property
    def torrent_file(self) -> Path | None: ...
    @property
    def hub_snapshot(self) -> HubSnapshot | None: ...  # the Hub listing the plan was made from


SOURCE_CHOICES: tuple[SourceChoice, ...] = ("auto", "torrent", "hf", "local")
NETWORK_CHOICES: tuple[NetworkMode, ...] = ("public", "closed")


@dataclass(frozen=True)
class RemoteFile:
    path: str  # path in the repo
    size: int
    blob_id: str | None  # git blob SHA-1 (of the content, or of the LFS pointer for LFS files)
    lfs_sha256: str | None  # None for files kept in git (Xet-backed files have it too)


@dataclass(frozen=True)
class HubSnapshot:
    """A Hub repo's files at one commit, and the endpoint and revision that resolved to it."""

    endpoint: str
    repo: str
    revision: str  # what was asked for
    commit: str  # what it resolved to
    files: dict[str, RemoteFile]

    def listing(self) -> Listing:
        return [(f.path, f.size, f.lfs_sha256) for f in sorted(self.files.values(), key=lambda f: f.path)]


@dataclass(frozen=True)
class TorrentOptions:
    peers: tuple[str, ...] = ()  # HOST:PORT
    trackers: tuple[str, ...] = ()
    network: str = field(default_factory=network_mode)  # a NetworkMode, validated by the torrent fetcher
    listen: str | None = None  # HOST:PORT; closed mode defaults to 127.0.0.1:0
    seed_for: float = 0.0
    max_upload_rate: int = 0  # bytes/s, 0 = unlimited
    max_download_rate: int = 0
    stall_timeout: float = 120.0
    metadata_timeout: float = 120.0
    include: tuple[str, ...] = ()  # globs, for sources whose file list is known only at fetch time (a bare magnet)
    in_order: bool = True  # pieces in order until a swarm shows up; False: rarest-first from the start (a profile)
    existing: ExistingPolicy = "replace"  # set by ``stages.fetch.fetch`` from where dest is
    # called as piece_watch(stream_hasher, torrent_handle) once the download's files are known:
    # ``provision run`` converts the pieces libtorrent verified while the rest arrives (stages.overlap)
    piece_watch: Callable[[Any, Any], None] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class HubOptions:
    token: str | None = None
    max_workers: int = 4
    stall_timeout: float = 60.0
    retries: int = 5
    existing: ExistingPolicy = "replace"  # set by ``stages.fetch.fetch`` from where dest is
    # called as piece_watch(hub_stream, None) once the files to download are known: ``provision run``
    # converts the written prefix of each file while the rest arrives (stages.fetch.hub.stream)
    piece_watch: Callable[[Any, Any], None] | None = field(default=None, compare=False, repr=False)


@dataclass
class FetchedFile:
    path: str
    size: int
    sha256: str | None
    authority: str  # what vouched for it: manifest-sha256, hub-lfs-sha256, git-blob-sha1, torrent-v2, ...
    downloaded_bytes: int = 0
    reused: bool = False  # already present and verified


@dataclass
class FetchResult:
    dest: Path
    source: str  # the source that delivered, e.g. "torrent" or "hf"
    files: list[FetchedFile] = field(default_factory=list)
    bytes_downloaded: int = 0
    seconds: float = 0.0
    attempts: list[dict[str, Any]] = field(default_factory=list)  # failed sources before this one
    extra: dict[str, Any] = field(default_factory=dict)  # revision, infohash, peers, hash failures...

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dest"] = str(self.dest)
        return d


def check_existing(dest: Path, differing: Mapping[str, str], policy: ExistingPolicy,
                   progress: ProgressFn | None) -> list[str]:
    """Apply ``policy`` to ``differing`` ({path under dest: how it differs}), files the fetch would
    replace: ``UsageError`` (exit 2) naming them for "refuse", else a note for each; the paths replaced."""
    if not differing:
        return []
    if policy == "refuse":
        first, why = next(iter(differing.items()))
        more = f" and {len(differing) - 1} more" if len(differing) > 1 else ""
        raise UsageError(
            f"{dest} already holds {first} ({why}){more}, which this fetch did not write; refusing to replace it.",
            hint="Move it away, choose another --dest, or pass --force to replace it (each replaced file is named).",
            dest=str(dest), files=dict(differing))
    for rel, why in differing.items():
        note(progress, "fetch", f"replacing {dest / rel} ({why})")
    return list(differing)
