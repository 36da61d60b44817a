"""The facts a BitTorrent fetch reports (``FetchResult.extra``, shown by ``--json``): ids, peers,
failed and redundant bytes, and where the time went (start, download, close, hashing tail,
verify, move), from monotonic marks taken by the download.

``FetchTelemetry.to_dict()`` gives the report's keys in their published order; the numbers are
rounded here, not where they are measured. Nothing here measures anything itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, TypedDict


class PhaseSeconds(TypedDict):
    start_seconds: float
    download_seconds: float
    close_seconds: float
    rarest_first_after_seconds: float | None
    hash_tail_seconds: float
    verify_seconds: float
    post_download_check_seconds: float
    move_seconds: float


@dataclass
class Clock:
    """Monotonic marks of one fetch, set by the download as each phase ends."""

    start: float
    download_start: float = 0.0
    download_end: float = 0.0
    closed: float = 0.0  # the torrent is out of the session: the hashing tail starts
    hashed: float | None = None  # the stream hasher finished its last file
    joined: float = 0.0  # the hasher and its write-behind are done (every file fsynced)
    verified: float = 0.0
    moved: float = 0.0

    @property
    def download_seconds(self) -> float:
        return max(self.download_end - self.download_start, 1e-9)

    @property
    def hash_tail(self) -> float:
        """Hashing left after the last piece arrived."""
        return max(0.0, min(self.hashed or self.closed, self.joined) - self.closed)

    @property
    def tail_sync(self) -> float:
        """fsync of the last file(s)."""
        return self.joined - self.closed - self.hash_tail

    def phase_seconds(self, *, swarm_at: float | None) -> PhaseSeconds:
        """The report's timing fields (``swarm_at``: when rarest-first order began, if it did)."""
        return PhaseSeconds(
            start_seconds=round(self.download_start - self.start, 3),
            download_seconds=round(self.download_seconds, 3),
            close_seconds=round(self.closed - self.download_end, 3),
            rarest_first_after_seconds=round(swarm_at - self.download_start, 3) if swarm_at is not None else None,
            hash_tail_seconds=round(self.hash_tail, 3),
            verify_seconds=round(self.verified - self.joined, 3),
            post_download_check_seconds=round(self.hash_tail + (self.verified - self.joined), 3),
            move_seconds=round(self.tail_sync + (self.moved - self.verified), 3),
        )


def steady_rate(samples: Sequence[tuple[float, int, int]]) -> float | None:
    """Bytes/s between 10% and 90% of the download (start-up and tail left out), from
    (time, bytes done, bytes wanted) samples."""
    if len(samples) < 3:
        return None
    wanted = samples[-1][2] or 1
    mid = [(t, d) for t, d, _ in samples if 0.1 * wanted <= d <= 0.9 * wanted]
    if len(mid) < 2 or mid[-1][0] <= mid[0][0]:
        return None
    return round((mid[-1][1] - mid[0][1]) / (mid[-1][0] - mid[0][0]), 1)


@dataclass(frozen=True)
class FetchTelemetry:
    """One fetch's report; the field names are the ``--json`` keys, in order."""

    infohash: str
    btih: str | None
    btmh: str | None
    torrent_name: str
    network: str
    resumed: bool
    bytes_before_resume: int
    hash_failures: int
    failed_bytes: int
    redundant_bytes: int
    peers_seen: int
    peers_max: int
    start_seconds: float
    download_seconds: float
    close_seconds: float
    download_rate: float
    steady_rate: float | None
    piece_order: str
    rarest_first_after_seconds: float | None
    hashed_while_downloading_bytes: int
    read_back_while_downloading_bytes: int  # written stretches read back from the disk for their v1 pieces
    hash_tail_seconds: float
    verify_seconds: float
    post_download_check_seconds: float
    move_seconds: float
    reused: list[str]
    verify: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
