"""Fetch stage: bring a plan's files into its destination, verified.

``fetch(plan, ...)`` tries the plan's sources in order (``source="auto"``) or the one named,
moving to the next when one fails or stalls (a dead torrent falls back to the Hub). The
sources themselves live in ``torrent`` (the only importer of libtorrent) and ``hub`` (the
only importer of huggingface_hub); both download into a staging folder and move a file under
its final name only after ``verify`` passed. Nothing here prints.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provision.errors import FetchError, ManifestError, UsageError
from provision.progress import ProgressFn, note

if TYPE_CHECKING:
    from provision.plan import Plan

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


def source_order(plan: Plan, source: str) -> list[str]:
    """Which source types to try, in order."""
    if source not in SOURCE_CHOICES:
        raise UsageError(f"--source must be one of {', '.join(SOURCE_CHOICES)}, got {source!r}.")
    if plan.kind == "magnet" or plan.kind == "torrent":
        avail = ["torrent"]
    elif plan.kind == "hf":
        avail = ["hf"]
    else:
        assert plan.manifest is not None
        avail = [s.type for s in plan.manifest.sources]
    if source == "auto":
        return avail
    if source not in avail:
        raise ManifestError(f"--source {source}: {plan.name} has no {source} source (it has {', '.join(avail)}).")
    return [source]


def fetch(
    plan: Plan,
    *,
    source: str = "auto",
    dest: Path | None = None,
    torrent: TorrentOptions | None = None,
    hub: HubOptions | None = None,
    progress: ProgressFn | None = None,
) -> FetchResult:
    """Fetch every file of ``plan`` into ``dest`` (default ``plan.dest``), verified."""
    order = source_order(plan, source)
    target = Path(dest) if dest else plan.dest
    attempts: list[dict[str, Any]] = []
    last: FetchError | None = None
    for i, kind in enumerate(order):
        try:
            if kind == "torrent":
                from provision.fetch.torrent import fetch_torrent

                res = fetch_torrent(plan, dest=target, options=torrent or TorrentOptions(), progress=progress)
            else:
                from provision.fetch.hub import fetch_hub

                res = fetch_hub(plan, dest=target, options=hub or HubOptions(), progress=progress)
        except FetchError as e:
            attempts.append({"source": kind, "error": e.to_dict()})
            last = e
            if i + 1 < len(order):
                note(progress, "fetch", f"source {kind} failed ({e}); trying {order[i + 1]}")
                continue
            raise
        res.attempts = attempts + res.attempts
        return res
    assert last is not None  # pragma: no cover
    raise last
