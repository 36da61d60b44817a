"""What a fetch is asked for and what it returns: the request protocol, the source options, the results.

``FetchRequest`` is the part of a ``Plan`` the fetchers read (a protocol: ``stages.plan.Plan``
satisfies it, and the fetchers never import the planner). Nothing here does I/O.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from provision.formats.manifest import Manifest
from provision.formats.sources import HFRef, Magnet


@dataclass(frozen=True)
class PlannedFile:
    path: str
    size: int | None
    sha256: str | None
    sources: tuple[str, ...]
    status: str  # missing | present | size-mismatch
    optional: bool = False

    @property
    def to_fetch(self) -> bool:
        return self.status != "present"


class FetchRequest(Protocol):
    """What a fetcher needs to know: the source, the model's name and home, and the files wanted."""

    @property
    def source(self) -> str: ...
    @property
    def kind(self) -> str: ...  # manifest | magnet | torrent | hf
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


SOURCE_CHOICES = ("auto", "torrent", "hf")
NETWORK_CHOICES = ("public", "closed")


@dataclass(frozen=True)
class TorrentOptions:
    peers: tuple[str, ...] = ()  # HOST:PORT
    trackers: tuple[str, ...] = ()
    network: str = field(default_factory=lambda: os.environ.get("PROVISION_NETWORK", "public"))  # public | closed
    listen: str | None = None  # HOST:PORT; closed mode defaults to 127.0.0.1:0
    seed_for: float = 0.0
    max_upload_rate: int = 0  # bytes/s, 0 = unlimited
    max_download_rate: int = 0
    stall_timeout: float = 120.0
    metadata_timeout: float = 120.0
    include: tuple[str, ...] = ()  # globs, for sources whose file list is known only at fetch time (a bare magnet)


@dataclass(frozen=True)
class HubOptions:
    token: str | None = None
    max_workers: int = 4
    stall_timeout: float = 60.0
    retries: int = 5


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
