"""``fetch_torrent``: download only the plan's files (in order) into a staging folder, hash each
file while its pieces are still in the page cache, verify, then rename the files into ``dest``.

It resumes from saved resume data, learns the metadata, refuses hostile names before anything
is written, reuses verified files already in ``dest``, downloads with a stall watchdog, hands the
stream hashes to ``provision.stages.verify``, moves the files into place and reports; resume data
is saved every second and on SIGINT/SIGTERM. It switches from in-order to rarest-first pieces once
another downloader is connected. It does not choose the source, define a valid file or print.
The module stays large because it is the one sequence of steps of a torrent download, each a
short function, and splitting the sequence would scatter it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libtorrent as lt

from provision.errors import FetchError, Interrupted, VerifyError
from provision.formats.sources import parse_peer
from provision.io import atomic, space
from provision.io.paths import safe_join
from provision.io.staging import commit_file
from provision.progress import ProgressEvent, ProgressFn, note
from provision.stages import verify
from provision.stages.fetch.request import FetchedFile, FetchResult, check_existing
from provision.stages.fetch.torrent.job import FetchJob, Selected, authorities
from provision.stages.fetch.torrent.live import LiveTorrent, ResumeFile
from provision.stages.fetch.torrent.meta import (
    check_info_names,
    files_of,
    hash_of,
    info_hashes,
    load_torrent_info,
)
from provision.stages.fetch.torrent.place import DeferredSignals, remove_staging
from provision.stages.fetch.torrent.read_back import ReadBack
from provision.stages.fetch.torrent.seed import add_seed_torrent, current_scope, serve_after_fetch
from provision.stages.fetch.torrent.session import NOT_STARTED, close_session, closed_flags, open_session
from provision.stages.fetch.torrent.stream_hash import StreamFile, StreamHasher
from provision.stages.fetch.torrent.telemetry import Clock, FetchTelemetry, steady_rate
from provision.stages.verify import Authority, VerifyReport
from provision.stages.verify.digests import V2_BLOCK, v2_geometry

if TYPE_CHECKING:
    from provision.stages.fetch.request import FetchRequest, TorrentOptions

RESUME_INTERVAL_S = 1.0  # periodic resume data: what a SIGKILL can lose is about this long
POLL_S = 0.05
PROGRESS_INTERVAL_S = 0.5
ORDER_CHECK_S = 1.0  # how often a sequential download looks for other downloaders (a swarm)


class PieceOrder:
    """In-order pieces until a swarm shows up, then rarest-first (one way: no flapping)."""

    def __init__(self) -> None:
        self.name = "sequential"
        self.swarm_at: float | None = None  # when a downloading peer turned sequential order off
        self.last_check = 0.0

    def check(self, h: Any, now: float, progress: ProgressFn | None) -> None:
        """In-order pieces suit one source (files hash while still in the page cache) but starve
        a swarm: every member asks the origin for the same next piece, so its uplink carries each
        piece once per member. Once a peer that is itself downloading is connected (another fleet
        member, or any leecher of a public swarm), switch to rarest-first for the rest of the
        download, so members fetch different pieces and trade them."""
        if self.name != "sequential" or now - self.last_check < ORDER_CHECK_S:
            return
        self.last_check = now
        try:
            peers = h.get_peer_info()
        except RuntimeError:  # the handle is going away: keep the order, check again later
            return
        leechers = [p for p in peers if not (int(p.flags) & int(lt.peer_info.seed))
                    and int(p.connection_type) == int(lt.peer_info.standard_bittorrent)]
        if not leechers:
            return
        h.unset_flags(lt.torrent_flags.sequential_download)
        self.name = "rarest-first"
        self.swarm_at = now
        note(progress, "fetch", f"{len(leechers)} downloading peers connected: fetching rarest pieces first "
                                "so the swarm shares the work")


@dataclass
class DownloadLog:
    """What the download loop leaves for the report."""

    resumed: bool  # started from resume data
    order: PieceOrder = field(default_factory=PieceOrder)
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (time, bytes done, bytes wanted)
    already: int = 0  # bytes on disk before this run


def fetch_torrent(plan: FetchRequest, *, dest: Path, options: TorrentOptions,
                  progress: ProgressFn | None = None, pickles_as_data: bool = False,
                  on_placed: Callable[[], None] | None = None,
                  gate: Callable[[Mapping[str, tuple[Path, str | None]]], None] | None = None) -> FetchResult:
    """Download the plan's files from BitTorrent into ``dest``, verified (see the module docstring);
    ``pickles_as_data``: pickle files are verified as bytes for an import, not refused; ``on_placed``
    runs once the files are in place, before any seeding (the caller releases the model's lock)."""
    job = FetchJob(plan, dest, options, progress)
    job.pickles_as_data = pickles_as_data
    clock = Clock(start=time.monotonic())
    live = LiveTorrent(open_session(job.settings), job.staging, ResumeFile(job.resume_path))
    try:
        ti, resumed = _start(job, live)
        sels, auths = _prepare(job, live, ti)
        todo = [s for s in sels if not s.reused]
        # stream-hash every file while its pieces are in the page cache: a manifest sha256 is checked
        # against it; under a torrent authority verify checks the pieces (in ranges, on every core)
        # and records this hash, so no file is read once more for its whole-file sha256
        # where the torrent's pieces or merkle tree are a file's authority, each stretch is also read
        # back once it is on the disk and checked (``read_back``): verify then reads only the rest
        pl = int(ti.piece_length())
        hasher = live.pieces.hasher = StreamHasher(
            [StreamFile(s.rel, s.staged, s.offset, s.size, True, _read_back(auths[s.rel], s, pl))
             for s in todo], pl, int(ti.num_pieces()))
        if options.piece_watch is not None and todo:  # run converts what is verified while the rest arrives
            options.piece_watch(hasher, live.h)
        log = DownloadLog(resumed=resumed)
        if not options.in_order:  # nothing reads the files while they arrive: swarm order from the first piece
            log.order.name = "rarest-first"
        clock.download_start = time.monotonic()
        if todo:
            hasher.start()
            _download(job, live, log)
        clock.download_end = time.monotonic()
        st = live.h.status()
        # complete: no final resume data (a crash from here re-downloads at most the pieces since
        # the last periodic save, and waiting for libtorrent's flush cost up to 2 s)
        live.remove()
        if todo:
            hasher.mark_all()
        known, vreport = _verify(job, ti, todo, auths, hasher, clock)
        if gate is not None:  # a manifest's pinned signature: checked on the staged files, before any move
            _gate(job, gate, sels, known, vreport)
        # verified: from here a SIGINT/SIGTERM waits until the files are in place and then ends
        # the fetch's seeding normally (before, one landing between the moves and the seed made
        # a finished fetch exit 143)
        with DeferredSignals() as deferred:
            _place(job, todo, hasher.synced, clock)
            if on_placed is not None:
                on_placed()
            extra = _telemetry(job, ti, live, st, clock, log, hasher, sels, vreport).to_dict()
            if len(todo) < len(sels):
                note(progress, "fetch", f"{len(sels) - len(todo)} files already in place and verified")
            if options.seed_for > 0:
                extra["seed"] = _seed(job, live, ti, sels, on_serving=deferred.release)
            return FetchResult(dest=job.dest, source="torrent", files=_fetched(sels, auths, known, vreport),
                               bytes_downloaded=int(st.total_payload_download),
                               seconds=time.monotonic() - clock.start, extra=extra)
    except (KeyboardInterrupt, Interrupted):
        _save_on_interrupt(live)
        raise
    finally:
        if live.pieces.hasher is not None:
            live.pieces.hasher.stop()
        close_session(live.ses)


def _telemetry(job: FetchJob, ti: Any, live: LiveTorrent, st: Any, clock: Clock, log: DownloadLog,
               hasher: StreamHasher, sels: Sequence[Selected], vreport: VerifyReport | None) -> FetchTelemetry:
    btih, btmh = info_hashes(ti.info_hashes())
    todo = any(not s.reused for s in sels)
    return FetchTelemetry(
        infohash=job.src.key, btih=btih, btmh=btmh, torrent_name=ti.name(), network=job.options.network,
        resumed=log.resumed, bytes_before_resume=log.already, hash_failures=live.swarm.hash_failures,
        failed_bytes=int(st.total_failed_bytes), redundant_bytes=int(st.total_redundant_bytes),
        peers_seen=len(live.swarm.seen), peers_max=live.swarm.most,
        download_rate=round(int(st.total_payload_download) / clock.download_seconds, 1) if todo else 0.0,
        steady_rate=steady_rate(log.samples), piece_order=log.order.name,
        hashed_while_downloading_bytes=hasher.bytes_hashed,
        read_back_while_downloading_bytes=hasher.read_back.read_back_bytes, reused=[s.rel for s in sels if s.reused],
        verify=vreport.to_dict() if vreport is not None else None,
        **clock.phase_seconds(swarm_at=log.order.swarm_at),
    )


def _save_on_interrupt(live: LiveTorrent) -> None:
    """Pause and save resume data durably, so the same command resumes."""
    if live.h is None or live.removed:
        return
    try:
        live.h.pause()
        live.save_resume_now()
    except Exception:  # the interrupt is what the caller must see; resume data is a bonus
        pass


def _start(job: FetchJob, live: LiveTorrent) -> tuple[Any, bool]:
    """Add the torrent, learn its metadata (a magnet without resume data learns it from peers)
    and keep a copy of it; return the torrent info and whether resume data was used."""
    atp, resumed = _initial_params(job)
    if job.options.network == "closed" and not (atp.peers or atp.trackers or atp.url_seeds):
        # no DHT, no LSD and nobody named: no peer can ever be found, so say so now, not at the stall
        what = "torrent file" if job.src.torrent_path is not None else "magnet"
        raise FetchError(
            f"No peer to ask for {job.plan.name}: the network is closed (no DHT or LSD) and the {what} names "
            "no peer, tracker or web seed.",
            hint="Pass --peer HOST:PORT (the seeder's `seeding ... on HOST:PORT` line), --tracker URL, "
                 "or use --network public.", phase="connecting", peers=0, infohash=job.src.key)
    if not resumed:
        note(job.progress, "fetch", f"torrent {job.src.key}: connecting to peers ({job.options.network} network)")
    else:
        note(job.progress, "fetch", f"resuming torrent {job.src.key} from {job.resume_path}")
    live.h = live.ses.add_torrent(atp)
    for peer in job.options.peers:
        with contextlib.suppress(RuntimeError):  # a peer libtorrent cannot dial: the others may answer
            live.h.connect_peer(parse_peer(peer))
    ti = _wait_metadata(job, live)
    check_info_names(ti.info_section())
    if hash_of(ti) and not job.torrent_copy.exists():
        try:
            atomic.atomic_write_bytes(job.torrent_copy, b"d4:info" + bytes(ti.info_section()) + b"e")
        except OSError:
            pass  # only seed_verified reads the copy; the fetch does not need it
    return ti, resumed


def _read_resume(job: FetchJob) -> Any:
    """The resume data kept for this torrent, or None (absent, unreadable or another torrent's)."""
    if not job.resume_path.is_file():
        return None
    try:
        atp = lt.read_resume_data(job.resume_path.read_bytes())
        if job.src.key in info_hashes(atp.info_hashes):
            return atp
    except (RuntimeError, OSError):  # unreadable or corrupt: said below, and the download starts afresh
        pass
    note(job.progress, "fetch", f"ignoring unreadable resume data {job.resume_path}")
    return None


def _initial_params(job: FetchJob) -> tuple[Any, bool]:
    atp = _read_resume(job)
    resumed = atp is not None
    from_magnet = False
    if atp is None:
        if job.src.torrent_path is not None:
            atp = lt.add_torrent_params()
            atp.ti = load_torrent_info(job.src.torrent_path)
        else:
            assert job.src.magnet is not None
            atp = lt.parse_magnet_uri(job.src.magnet.uri)
            from_magnet = True
    if job.src.magnet is not None and not from_magnet:  # the magnet's own trackers, peers, web seeds
        m = lt.parse_magnet_uri(job.src.magnet.uri)
        atp.trackers = list(dict.fromkeys(list(atp.trackers) + list(m.trackers)))
        atp.url_seeds = list(dict.fromkeys(list(atp.url_seeds) + list(m.url_seeds)))
        atp.peers = list(atp.peers) + list(m.peers)
    atp.trackers = list(dict.fromkeys(list(atp.trackers) + list(job.options.trackers)))
    atp.peers = list(atp.peers) + [parse_peer(p) for p in job.options.peers]
    atp.save_path = str(job.staging)
    # the files' full size reserved up front (fallocate): a full disk fails at the start, and
    # writeback fills allocated blocks instead of allocating them page by page (less CPU)
    atp.storage_mode = lt.storage_mode_t.storage_mode_allocate
    flags = int(atp.flags)
    flags &= ~int(NOT_STARTED | lt.torrent_flags.seed_mode | lt.torrent_flags.upload_mode
                  | lt.torrent_flags.stop_when_ready)
    flags |= closed_flags(job.options.network)
    if job.options.in_order:
        flags |= int(lt.torrent_flags.sequential_download)
    if atp.ti is None:
        flags |= int(lt.torrent_flags.default_dont_download)  # nothing is written before names are checked
    else:
        check_info_names(atp.ti.info_section())
    atp.flags = flags
    return atp, resumed


def _wait_metadata(job: FetchJob, live: LiveTorrent) -> Any:
    h = live.h
    if h.status().has_metadata:
        return h.torrent_file()
    start = last_note = time.monotonic()
    while True:
        live.pump(100)
        st = h.status()
        live.swarm.count(st.num_peers)
        if st.has_metadata:
            note(job.progress, "fetch",
                 f"metadata received ({max(len(live.swarm.seen), int(st.num_peers))} peers)")
            return h.torrent_file()
        now = time.monotonic()
        if now - start > job.options.metadata_timeout:
            raise live.swarm.stall_error(job.plan.name, job.src.key, "downloading the torrent's metadata",
                                         now - start)
        if now - last_note >= 5:
            last_note = now
            if job.progress is not None:
                job.progress(ProgressEvent(task="fetch:metadata", done=int(st.num_peers), total=None, unit="peers",
                                           description="waiting for metadata"))  # the count is the peers


def _prepare(job: FetchJob, live: LiveTorrent, ti: Any) -> tuple[list[Selected], dict[str, Authority]]:
    """What to fetch, what is already in place, and room for it; then want those files."""
    sels = job.select(ti)
    auths = authorities(ti, sels)
    _reuse_present(job, sels, auths)
    todo = [s for s in sels if not s.reused]
    prios = [0] * files_of(ti).num_files()
    for s in todo:
        prios[s.index] = 4
    have_bytes = sum(min(s.staged.stat().st_blocks * 512, s.size) for s in todo if s.staged.is_file())
    need = sum(s.size for s in todo) - have_bytes
    if need > 0:
        job.staging.mkdir(parents=True, exist_ok=True)
        space.check_free_space(job.staging, need, what=f"the download of {job.plan.name}")
    live.h.prioritize_files(prios)
    live.h.unset_flags(lt.torrent_flags.default_dont_download)
    _reconnect(job, live)
    if job.options.in_order and live.prio_applied:
        # libtorrent (2.1) keeps the sequential picker's cursor where it was while every piece had
        # priority 0 (a magnet's default_dont_download, or files left out): with the files now
        # wanted it picked pieces in random order, so readers of the files (the stream hasher,
        # run's conversion) waited for the tail. Setting the flag again restarts the cursor.
        live.h.unset_flags(lt.torrent_flags.sequential_download)
        live.h.set_flags(lt.torrent_flags.sequential_download)
    live.ses.apply_settings({"close_redundant_connections": True})  # kept off only while priorities applied
    return sels, auths


def _reconnect(job: FetchJob, live: LiveTorrent) -> None:
    """Peers drop a metadata-only connection ("upload to upload") once we want nothing; now that
    we want files, call them back rather than wait for libtorrent's reconnect back-off (once the
    new priorities apply: until then the torrent counts as finished and skips seeds)."""
    end = time.monotonic() + 5.0
    while not live.prio_applied and time.monotonic() < end:
        live.pump(50)
    peers = set(live.swarm.endpoints) | {parse_peer(p) for p in job.options.peers}
    if job.src.magnet is not None:
        peers |= {parse_peer(p) for p in job.src.magnet.peers}
    # each call below may raise RuntimeError for a torrent or peer libtorrent refuses right now;
    # the download loop calls back again every 5 s while nobody is connected
    for ep in sorted(peers):
        with contextlib.suppress(RuntimeError):  # refused now: retried in 5 s (above)
            live.h.connect_peer(ep)
    if job.options.trackers or (job.src.magnet is not None and job.src.magnet.trackers):
        with contextlib.suppress(RuntimeError):  # same
            live.h.force_reannounce()
    if job.options.network == "public":
        with contextlib.suppress(RuntimeError):  # same
            live.h.force_dht_announce()


def _reuse_present(job: FetchJob, sels: list[Selected], auths: dict[str, Authority]) -> None:
    """Files the plan found in ``dest`` already: verify them in place and mark the good ones reused."""
    present = [s for s in sels if s.spec is not None and s.spec.status == "present"]
    if not present:
        present = [s for s in sels if s.spec is None and (job.dest / s.rel).is_file()
                   and (job.dest / s.rel).stat().st_size == s.size]
    if present:
        rep = verify.verify_files(job.dest, {s.rel: auths[s.rel] for s in present}, structure=False,
                                  progress=job.progress, pickles_as_data=job.pickles_as_data)
        good = {f.path for f in rep.files if f.status == "ok"}
        for s in present:
            s.reused = s.rel in good
    if job.options.existing != "replace":  # a user's --dest: what is there and not verified stays theirs
        differing = {s.rel: "not the verified file" for s in sels
                     if not s.reused and ((job.dest / s.rel).exists() or (job.dest / s.rel).is_symlink())}
        check_existing(job.dest, differing, job.options.existing, job.progress)


def _download(job: FetchJob, live: LiveTorrent, log: DownloadLog) -> None:
    """Run until every selected file is complete."""
    h = live.h
    # wait out libtorrent's check of existing data (resume) before the watchdog starts
    while True:
        live.pump(50)
        st = h.status()
        if st.state not in (lt.torrent_status.states.checking_files, lt.torrent_status.states.checking_resume_data):
            break
    already = log.already = max(0, int(st.total_wanted_done) - int(st.total_payload_download))
    if already and log.resumed:
        note(job.progress, "fetch", f"{already:,d} bytes already downloaded; fetching the rest")
    live.sync_pieces()  # what resume data or the check found on disk (fenced like the rest)
    last_done, last_progress = already, time.monotonic()
    last_sync = last_emit = 0.0
    last_recall = time.monotonic()
    while True:
        live.pump(int(POLL_S * 1000))
        now = time.monotonic()
        st = h.status()
        live.swarm.count(st.num_peers)
        if st.errc and st.errc.value():
            raise FetchError(f"libtorrent reported an error for {job.plan.name}: {st.errc.message()}.",
                             hint="Check the staging folder, then run the same command again to resume.")
        done, wanted = int(st.total_wanted_done), int(st.total_wanted)
        if done > last_done:
            last_done, last_progress = done, now
        if now - last_sync >= 1.0:  # in case an alert was dropped
            live.sync_pieces()
            last_sync = now
        live.fence(now)
        if st.num_peers == 0 and now - last_recall >= 5.0:  # nobody connected: call known peers back
            last_recall = now
            _reconnect(job, live)
        if now - live.resume.last_request >= RESUME_INTERVAL_S:
            live.request_resume(now)
        log.order.check(h, now, job.progress)
        if now - last_emit >= PROGRESS_INTERVAL_S or done >= wanted:
            last_emit = now
            log.samples.append((now, done, wanted))
            _emit_progress(job, st, done, wanted)
        if done >= wanted and st.state in (lt.torrent_status.states.finished, lt.torrent_status.states.seeding):
            live.drain_fences()
            return
        if now - last_progress > job.options.stall_timeout:
            raise live.swarm.stall_error(job.plan.name, job.src.key, "downloading", now - last_progress)


def _emit_progress(job: FetchJob, st: Any, done: int, wanted: int) -> None:
    if job.progress is None:
        return
    rate = float(st.download_payload_rate)
    eta = (wanted - done) / rate if rate > 0 else None
    job.progress(ProgressEvent(
        task="fetch:torrent", done=done, total=wanted, description=f"torrent {job.plan.name}",
        finished=done >= wanted,
        extra={"peers": int(st.num_peers), "rate": f"{rate / 1e6:.1f}MB/s",
               "eta": f"{eta:.0f}s" if eta is not None else "?"}))


def _read_back(a: Authority, s: Selected, pl: int) -> ReadBack | None:
    """What the read-back checks of ``s`` on the disk: the merkle chunks of a v2 authority, or
    the v1 piece hashes when they are the torrent's pieces of exactly this file (it starts on a
    piece boundary); else nothing (a manifest sha256: the stream hash is checked against it)."""
    if a.kind == "torrent-v2-merkle" and a.merkle_root is not None and s.size > 0:
        return ReadBack(merkle_size=s.size)
    if a.kind == "torrent-v1-pieces" and a.piece_length == pl and not s.offset % pl and a.piece_hashes:
        return ReadBack(pieces=a.piece_hashes)
    return None


def _read_back_results(todo: Sequence[Selected], hasher: StreamHasher) -> tuple[dict[str, set[int]],
                                                                                  dict[str, dict[int, bytes]]]:
    """The v1 pieces and v2 chunk roots the read-back computed, less any touching a piece whose
    alert never came (``mark_all`` released it: not trusted without a read after the download)."""
    pl, w = hasher.pl, hasher.read_back
    pieces: dict[str, set[int]] = {}
    roots: dict[str, dict[int, bytes]] = {}
    for s in todo:
        forced = [p for p in hasher.forced if p * pl < s.offset + s.size and (p + 1) * pl > s.offset]
        if s.rel in w.checked:
            pieces[s.rel] = {i for i in w.checked[s.rel] if s.offset // pl + i not in hasher.forced}
        if s.rel in w.roots:
            span = v2_geometry(s.size)[1] * V2_BLOCK
            bad: set[int] = set()
            for p in forced:
                a, b = max(p * pl - s.offset, 0), min((p + 1) * pl - s.offset, s.size)
                bad.update(range(a // span, (b - 1) // span + 1))
            roots[s.rel] = {i: r for i, r in w.roots[s.rel].items() if i not in bad}
    return pieces, roots


def _verify(job: FetchJob, ti: Any, todo: Sequence[Selected], auths: dict[str, Authority], hasher: StreamHasher,
            clock: Clock) -> tuple[dict[str, str], VerifyReport | None]:
    """Wait for the stream hashes, then verify the staged files; return the trusted hashes and
    the report. A stream hash stands in for reading the file for its sha256 unless it disagrees
    with the manifest's, or (under a torrent authority, where it is the sha256 recorded, not
    checked) its bytes were read after ``mark_all`` released a piece whose alert never came: such
    a file, like one the hasher could not read, is read again by verify for its sha256."""
    clock.closed = time.monotonic()
    hasher.join()
    clock.joined = time.monotonic()
    clock.hashed = hasher.hashed_at
    known = dict(hasher.results)
    forced = hasher.forced_files()
    for s in todo:
        a = auths[s.rel]
        if a.sha256 and known.get(s.rel) not in (None, a.sha256):
            known.pop(s.rel, None)
        elif not a.sha256 and s.rel in forced:
            known.pop(s.rel, None)
    checked, roots = _read_back_results(todo, hasher)
    for s in todo:
        if s.size == 0 and not s.staged.exists():
            s.staged.parent.mkdir(parents=True, exist_ok=True)
            s.staged.touch()
    vreport = None
    if todo:
        note(job.progress, "fetch", f"verifying {len(todo)} files")
        vreport = verify.verify_files(job.staged_root(ti), {s.rel: auths[s.rel] for s in todo}, known_sha256=known,
                               progress=job.progress, pickles_as_data=job.pickles_as_data,
                               checked_pieces=checked, chunk_roots=roots)
        vreport.raise_for_failure()
    clock.verified = time.monotonic()
    return known, vreport


def _gate(job: FetchJob, gate: Callable[[Mapping[str, tuple[Path, str | None]]], None], sels: Sequence[Selected],
          known: dict[str, str], vreport: VerifyReport | None) -> None:
    """Run ``gate`` on every selected file (staged, or reused in ``dest``); a refusal drops the staging."""
    vfiles = {f.path: f.sha256 for f in vreport.files} if vreport is not None else {}
    try:
        gate({s.rel: (job.dest / s.rel if s.reused else s.staged, vfiles.get(s.rel) or known.get(s.rel))
              for s in sels})
    except VerifyError:
        remove_staging(job.staging, job.resume_path)
        raise


def _place(job: FetchJob, todo: Sequence[Selected], synced: set[str], clock: Clock) -> None:
    """Move the verified files into ``dest`` and forget the staging folder and resume data."""
    for s in todo:
        commit_file(s.staged, safe_join(job.dest, s.rel, what="file path"), synced=s.rel in synced)
    if job.dest.exists():
        atomic.fsync_dir(job.dest)
    clock.moved = time.monotonic()
    remove_staging(job.staging, job.resume_path)


def _fetched(sels: Sequence[Selected], auths: dict[str, Authority], known: dict[str, str],
             vreport: VerifyReport | None) -> list[FetchedFile]:
    vfiles = {f.path: f for f in vreport.files} if vreport is not None else {}
    out = []
    for s in sels:
        a = auths[s.rel]
        sha = (vfiles[s.rel].sha256 if s.rel in vfiles else None) or known.get(s.rel) or a.sha256
        out.append(FetchedFile(path=s.rel, size=s.size, sha256=sha, authority=a.kind,
                               downloaded_bytes=0 if s.reused else s.size, reused=s.reused))
    return out


def _seed(job: FetchJob, live: LiveTorrent, ti: Any, sels: Sequence[Selected], *,
          on_serving: Any) -> dict[str, Any]:
    """Serve the verified files from ``dest``: in the background while ``provision run`` goes on
    (the scope then owns the session), or here for ``--seed-for`` seconds."""
    h = add_seed_torrent(live.ses, ti, sels, job.dest, network=job.options.network, trackers=job.trackers())
    scope = current_scope()
    if scope is not None:
        facts = scope.start(live.ses, h, job.settings, job.options.seed_for, job.plan.name, job.progress)
        live.ses = None  # the scope closes it
        return facts
    return serve_after_fetch(live.ses, h, job.settings, job.options.seed_for, job.plan.name, job.progress,
                             on_serving=on_serving)
