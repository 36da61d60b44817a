"""The torrent being downloaded, live in its session: one alert pump and the small records it
feeds (peers met, pieces on their way to the stream hasher, resume data on disk).

A piece reaches the hasher only once a ``flush_cache()`` fence issued after libtorrent passed it
has completed (its writes are then in the page cache). Resume data is written atomically: a
rename for the periodic saves, fsync + rename for the last one. This module decides nothing
about when the download ends or which files it wants (``download``).
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import libtorrent as lt

from provision.errors import DiskSpaceError, FetchError, StallError
from provision.io import atomic
from provision.io.space import disk_full_error, is_disk_full
from provision.stages.fetch.torrent.stream_hash import StreamHasher

FENCE_INTERVAL_S = 0.25  # how often passed pieces are fenced (flush_cache) for the hasher
REMOVE_TIMEOUT_S = 10.0


class SwarmLog:
    """Who the download met: peers, the most connected at once, tracker errors, bad pieces."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.endpoints: set[tuple[str, int]] = set()  # peers we connected to (reconnected after metadata)
        self.most = 0
        self.tracker_errors: list[str] = []
        self.hash_failures = 0

    def connected(self, alert: Any) -> None:
        try:
            endpoint = alert.endpoint
            self.seen.add(str(endpoint))
            self.endpoints.add((str(endpoint[0]), int(endpoint[1])))
        except (RuntimeError, TypeError, ValueError, IndexError):
            pass  # an endpoint the bindings could not convert: counting it matters less than the fetch

    def count(self, num_peers: int) -> None:
        self.most = max(self.most, int(num_peers))

    def stall_error(self, name: str, infohash: str, phase: str, seconds: float) -> StallError:
        peers = len(self.seen)
        if peers == 0:
            extra = f" (trackers: {self.tracker_errors[-1]})" if self.tracker_errors else ""
            return StallError(
                f"No peers found for {name} in {seconds:.0f} s while {phase}{extra}.",
                hint="Check the magnet's trackers and x.pe peers, pass --peer HOST:PORT or --tracker URL, "
                     "or use --network public.",
                phase=phase, peers=0, infohash=infohash, seconds=seconds)
        return StallError(
            f"The download of {name} stalled: no progress for {seconds:.0f} s while {phase} "
            f"({peers} peers seen).", hint="Run the same command again later to resume, or try another source.",
            phase=phase, peers=peers, infohash=infohash, seconds=seconds)


class PieceFence:
    """Pieces libtorrent passed, held until a ``flush_cache()`` fence issued after them completes."""

    def __init__(self) -> None:
        self.hasher: StreamHasher | None = None
        self.pending: list[int] = []
        self.fenced: list[int] | None = None
        self.last = 0.0

    @property
    def busy(self) -> bool:
        return bool(self.pending) or self.fenced is not None

    def fence(self, h: Any, now: float, *, force: bool = False) -> None:
        """Issue a flush_cache() fence for the pieces passed so far (at most every 0.25 s)."""
        if self.fenced is not None or not self.pending:
            return
        if not force and now - self.last < FENCE_INTERVAL_S:
            return
        self.fenced, self.pending = self.pending, []
        self.last = now
        h.flush_cache()

    def flushed(self) -> None:
        if self.fenced is not None and self.hasher is not None:
            for piece in self.fenced:
                self.hasher.mark(piece)
        self.fenced = None

    def sync(self, h: Any) -> None:
        """Queue every piece libtorrent has that the hasher has not been given yet."""
        if self.hasher is None:
            return
        bits = h.status(lt.torrent_handle.query_pieces).pieces
        known = set(self.pending) | set(self.fenced or ())
        self.pending += [i for i, b in enumerate(bits) if b and not self.hasher.have[i] and i not in known]


class ResumeFile:
    """The torrent's resume data on disk (``torrents/<id>.resume``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.in_flight = False  # a periodic save was asked for and not answered yet
        self.last_request = 0.0

    def write(self, params: Any, *, durable: bool) -> None:
        data = bytes(lt.write_resume_data_buf(params))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if durable:
            atomic.atomic_write_bytes(self.path, data)
            return
        # periodic: a rename keeps it whole across a killed process; fsync is for the last save only
        tmp = self.path.with_name(f"{atomic.TMP_PREFIX}{self.path.name}.{os.getpid()}")
        try:
            tmp.write_bytes(data)
        except OSError as e:
            tmp.unlink(missing_ok=True)  # never a half-written file: the previous save stays
            if is_disk_full(e):
                raise disk_full_error(self.path, kept="the download so far and its last resume data are kept") \
                    from None
            raise
        os.replace(tmp, self.path)


class LiveTorrent:
    """The session, the torrent's handle and what its alerts tell."""

    def __init__(self, ses: Any, staging: Path, resume: ResumeFile) -> None:
        self.ses = ses
        self.h: Any = None
        self.staging = staging  # named in a write error
        self.resume = resume
        self.swarm = SwarmLog()
        self.pieces = PieceFence()
        self.removed = False
        self.prio_applied = False

    def pump(self, wait_ms: int = 0) -> list[Any]:
        if wait_ms:
            self.ses.wait_for_alert(wait_ms)
        alerts = self.ses.pop_alerts()
        for a in alerts:
            self._alert(a)
        return alerts

    def _alert(self, a: Any) -> None:
        if isinstance(a, lt.piece_finished_alert):
            self.pieces.pending.append(int(a.piece_index))
        elif isinstance(a, lt.cache_flushed_alert):
            self.pieces.flushed()
        elif isinstance(a, lt.hash_failed_alert):
            self.swarm.hash_failures += 1
        elif isinstance(a, lt.save_resume_data_alert):
            self.resume.write(a.params, durable=False)
            self.resume.in_flight = False
        elif isinstance(a, lt.save_resume_data_failed_alert):
            self.resume.in_flight = False
        elif isinstance(a, lt.peer_connect_alert):
            self.swarm.connected(a)
        elif isinstance(a, lt.tracker_error_alert):
            self.swarm.tracker_errors.append(a.message())
        elif isinstance(a, lt.file_error_alert):
            self._file_error(a)
        elif isinstance(a, lt.torrent_removed_alert):
            self.removed = True
        elif isinstance(a, lt.file_prio_alert):
            self.prio_applied = True

    def _file_error(self, a: Any) -> None:
        code = getattr(getattr(a, "error", None), "value", lambda: 0)()
        if code == errno.ENOSPC:
            raise DiskSpaceError(f"No space left on the device while writing {self.staging}.",
                                 hint="Free some space and run the same command again to resume.",
                                 path=str(self.staging))
        raise FetchError(f"libtorrent could not write the download: {a.message()}.",
                         hint="Check the staging folder's permissions and free space, then run again.",
                         path=str(self.staging))

    def fence(self, now: float, *, force: bool = False) -> None:
        if self.h is not None and not self.removed:
            self.pieces.fence(self.h, now, force=force)

    def sync_pieces(self) -> None:
        if self.h is not None:
            self.pieces.sync(self.h)

    def drain_fences(self, timeout: float = 30.0) -> None:
        """Fence until every passed piece has reached the hasher (end of the download)."""
        end = time.monotonic() + timeout
        while self.pieces.busy and time.monotonic() < end:
            self.fence(time.monotonic(), force=True)
            self.pump(50)

    def request_resume(self, now: float) -> None:
        """Ask for periodic resume data when something changed (answered through the pump)."""
        if self.h is None or self.resume.in_flight or not self.h.is_valid():
            return
        if self.h.need_save_resume_data() or not self.resume.path.exists():
            self.h.save_resume_data(lt.save_resume_flags_t.save_info_dict)
            self.resume.in_flight = True
        self.resume.last_request = now

    def save_resume_now(self, timeout: float = 5.0) -> bool:
        """Ask for resume data and write it durably (on interrupt)."""
        if self.h is None or self.removed or not self.h.is_valid():
            return False
        self.h.save_resume_data(lt.save_resume_flags_t.save_info_dict | lt.save_resume_flags_t.flush_disk_cache)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.ses.wait_for_alert(100)
            for a in self.ses.pop_alerts():
                if isinstance(a, lt.save_resume_data_alert):
                    self.resume.write(a.params, durable=True)
                    return True
                if isinstance(a, lt.save_resume_data_failed_alert):
                    return False
                if isinstance(a, lt.piece_finished_alert):
                    self.pieces.pending.append(int(a.piece_index))
                elif isinstance(a, lt.cache_flushed_alert):
                    self.pieces.flushed()
        return False

    def remove(self) -> None:
        """Take the torrent out of the session so its files are closed before they move."""
        if self.h is None or self.removed:
            return
        self.ses.remove_torrent(self.h)
        end = time.monotonic() + REMOVE_TIMEOUT_S
        while not self.removed and time.monotonic() < end:
            self.pump(100)
        self.removed = True
