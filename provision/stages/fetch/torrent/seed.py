"""Serving verified files: ``provision seed``, ``--seed-for`` after a fetch, and background seeding
while ``provision run`` converts and smoke-tests.

``seed`` makes a torrent of a folder (``create``), writes the .torrent, the magnet and an
opentracker whitelist line, and serves without re-hashing. ``background_seeding()`` is a scope in
which a fetch with ``seed_for > 0`` hands its session to a thread and returns; ``seed_verified``
does the same for a model fetched by an earlier run. Nothing here downloads or verifies content.
The module stays large because the three ways of seeding share the serving loop and the
seeding thread, kept in one place.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libtorrent as lt

from provision.errors import HostileContentError, Interrupted, ManifestError, NotFoundError, UsageError
from provision.formats.sources import build_magnet
from provision.io import atomic
from provision.progress import ProgressEvent, ProgressFn, note
from provision.stages.fetch.torrent.create import create_torrent
from provision.stages.fetch.torrent.job import FetchJob, Selected
from provision.stages.fetch.torrent.meta import (
    check_info_names,
    files_of,
    hash_of,
    is_pad,
    load_torrent_info,
    root_prefix,
    whitelist_lines,
)
from provision.stages.fetch.torrent.session import (
    NOT_STARTED,
    close_session,
    closed_flags,
    listen_endpoint,
    open_session,
    session_settings,
)

if TYPE_CHECKING:
    from provision.formats.manifest import Manifest
    from provision.stages.fetch.request import FetchRequest, TorrentOptions


# ---------------------------------------------------------------------------------------
# serving one torrent


def serve(ses: Any, h: Any, *, seconds: float | None, stop: threading.Event | None,
          progress: ProgressFn | None, task: str, settings: dict[str, Any],
          on_serving: Callable[[], None] | None = None) -> dict[str, Any]:
    """Serve until ``seconds`` pass, ``stop`` is set, or SIGINT/SIGTERM; return upload facts.
    ``on_serving`` runs first, where a signal already ends the serving normally."""
    start = time.monotonic()
    last_emit = 0.0
    peers_max = 0
    stopped_by = "timeout"
    try:
        if on_serving is not None:
            on_serving()
        while True:
            if stop is not None and stop.is_set():
                stopped_by = "stop"
                break
            now = time.monotonic()
            if seconds is not None and now - start >= seconds:
                break
            ses.wait_for_alert(200)
            ses.pop_alerts()
            st = h.status()
            peers_max = max(peers_max, int(st.num_peers))
            if progress is not None and now - last_emit >= 1.0:
                last_emit = now
                extra: dict[str, Any] = {"peers": int(st.num_peers), "rate": f"{st.upload_payload_rate / 1e6:.1f}MB/s"}
                if seconds is not None:  # --seed-for: a countdown (the renderer does not count it as a change)
                    extra["left"] = f"{max(seconds - (now - start), 0.0):.0f}s"
                progress(ProgressEvent(task=task, done=int(st.total_payload_upload), total=None,
                                       description="seeding (uploaded)", extra=extra))
    except (KeyboardInterrupt, Interrupted):
        stopped_by = "signal"
    st = h.status()
    return {"seconds": round(time.monotonic() - start, 3), "uploaded_bytes": int(st.total_payload_upload),
            "peers_max": peers_max, "stopped_by": stopped_by, "listen": listen_endpoint(ses, settings)}


def _pieces_within(ti: Any, selected: set[int]) -> list[bool]:
    """Pieces made only of the selected files (and pad files): what a partial copy can serve."""
    fs = files_of(ti)
    out = []
    for p in range(ti.num_pieces()):
        slices = ti.map_block(p, 0, ti.piece_size(p))
        out.append(all(sl.file_index in selected or is_pad(fs, sl.file_index) for sl in slices))
    return out


def add_seed_torrent(ses: Any, ti: Any, sels: Sequence[Selected], dest: Path, *, network: str,
                     trackers: Sequence[str]) -> Any:
    """Add the verified files in ``dest`` to ``ses`` as a seed (every piece they cover is marked
    had and checked: no re-hash) announcing to ``trackers``; return the handle."""
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(ti)
    atp.save_path = str(dest)
    selected = {s.index for s in sels}
    atp.renamed_files = {s.index: s.rel for s in sels}
    atp.file_priorities = [4 if i in selected else 0 for i in range(files_of(ti).num_files())]
    have = _pieces_within(ti, selected)
    atp.have_pieces = have
    atp.verified_pieces = have
    atp.flags = (int(atp.flags) & ~int(NOT_STARTED)) | closed_flags(network)
    atp.trackers = list(trackers)
    return ses.add_torrent(atp)


def serve_after_fetch(ses: Any, h: Any, settings: dict[str, Any], seconds: float, name: str,
                      progress: ProgressFn | None, *, on_serving: Callable[[], None] | None = None) -> dict[str, Any]:
    """Serve a fetch's verified files for ``--seed-for`` seconds, then take the torrent out."""
    note(progress, "fetch", f"seeding {name} for {seconds:.0f} s on {listen_endpoint(ses, settings)}")
    facts = serve(ses, h, seconds=seconds, stop=None, progress=progress, task="seed:" + name, settings=settings,
                  on_serving=on_serving)
    ses.remove_torrent(h)
    return facts


# ---------------------------------------------------------------------------------------
# seeding in the background while later stages run (`provision run --seed-for`)


class BackgroundSeed:
    """One verified download served from a thread for ``seconds`` (counted from its start),
    in the session that downloaded it (same listen address, rate limits and trackers)."""

    def __init__(self, ses: Any, h: Any, settings: dict[str, Any], seconds: float, name: str,
                 progress: ProgressFn | None) -> None:
        self.ses, self.h, self.settings = ses, h, settings
        self.seconds = float(seconds)
        self.name = name
        self.progress = progress
        self.listen = listen_endpoint(ses, settings)
        self.stop_event = threading.Event()
        self.facts: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="provision-seed", daemon=True)

    def _run(self) -> None:
        try:
            self.facts = serve(self.ses, self.h, seconds=self.seconds, stop=self.stop_event,
                               progress=self.progress, task="seed:" + self.name, settings=self.settings)
        except BaseException as e:  # reported by finish()
            self.error = e

    def finish(self, *, stop: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for the seed to end by itself (``stop=None``) or end it now, recording ``stop``
        (``signal``, ``error``) as what ended it; close the session; return the upload facts."""
        if stop is not None:
            self.stop_event.set()
        while self.thread.is_alive():  # short joins: SIGINT/SIGTERM still reach the main thread
            self.thread.join(0.2)
            if stop is not None and time.monotonic() - self.started > self.seconds + timeout:
                break  # pragma: no cover - serve() checks the event every 200 ms
        facts = dict(self.facts or {}) or self._facts_so_far()
        if stop is not None and facts.get("stopped_by") != "timeout":
            facts["stopped_by"] = stop
        if self.error is not None:
            facts["error"] = str(self.error)
        facts.setdefault("stopped_by", "error" if self.error is not None else "timeout")
        facts["seed_for"] = self.seconds
        facts["name"] = self.name
        self.close()
        return facts

    def _facts_so_far(self) -> dict[str, Any]:
        """Upload facts of a seed whose thread did not report (it failed or was cut short)."""
        try:
            uploaded = int(self.h.status().total_payload_upload)
        except RuntimeError:  # the handle is gone with a failed session: nothing more to report
            return {}
        return {"seconds": round(time.monotonic() - self.started, 3), "uploaded_bytes": uploaded, "peers_max": 0,
                "listen": self.listen}

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.stop_event.set()
            self.thread.join(5.0)
            close_session(self.ses)
            self.ses = None


class BackgroundSeeding:
    """The seeds started while a ``background_seeding()`` scope is active."""

    def __init__(self) -> None:
        self.seeds: list[BackgroundSeed] = []

    def start(self, ses: Any, h: Any, settings: dict[str, Any], seconds: float, name: str,
              progress: ProgressFn | None) -> dict[str, Any]:
        seed = BackgroundSeed(ses, h, settings, seconds, name, progress)
        self.seeds.append(seed)
        note(progress, "fetch", f"seeding {name} on {seed.listen} for {seconds:g} s while the next stages run")
        seed.thread.start()
        return {"background": True, "seed_for": seed.seconds, "listen": seed.listen}

    def wait(self) -> list[dict[str, Any]]:
        """Serve until every seed's ``seed_for`` has passed; SIGINT/SIGTERM end them early (a
        seed ended by a signal is a normal end: ``stopped_by="signal"``)."""
        out: list[dict[str, Any]] = []
        for seed in self.seeds:
            try:
                out.append(seed.finish())
            except (KeyboardInterrupt, Interrupted):
                out.append(seed.finish(stop="signal"))
                out += [s.finish(stop="signal") for s in self.seeds if not s.closed]
                break
        self.seeds = []
        return out

    def close(self) -> None:
        for seed in self.seeds:
            seed.close()
        self.seeds = []


_SCOPE: contextvars.ContextVar[BackgroundSeeding | None] = contextvars.ContextVar("provision_seeding",
                                                                                     default=None)


def current_scope() -> BackgroundSeeding | None:
    """The active ``background_seeding()`` scope, if any."""
    return _SCOPE.get()


@contextlib.contextmanager
def background_seeding() -> Iterator[BackgroundSeeding]:
    """While active, ``fetch_torrent`` with ``seed_for > 0`` returns as soon as the files are in
    place and keeps serving them from a thread; ``wait()`` serves out the rest of ``seed_for``.
    Leaving the scope (an error, a signal) stops whatever is still serving."""
    scope = BackgroundSeeding()
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)
        scope.close()


def _kept_metadata(job: FetchJob) -> Any:
    """The torrent's info from the manifest's .torrent or the copy a fetch kept, or None."""
    try:
        if job.src.torrent_path is not None:
            return load_torrent_info(job.src.torrent_path)
        if job.torrent_copy.is_file():
            ti = lt.torrent_info(job.torrent_copy.read_bytes())
            check_info_names(ti.info_section())
            return ti
    except (RuntimeError, UsageError, HostileContentError):  # unusable metadata: the caller builds it afresh
        pass
    return None


def seed_verified(plan: FetchRequest, dest: Path, options: TorrentOptions,
                  progress: ProgressFn | None = None) -> dict[str, Any] | None:
    """Serve a model fetched by an earlier run (its fetch stage skipped) in the active
    ``background_seeding()`` scope, so a restarted fleet member still feeds late hosts. Needs the
    torrent's metadata at hand (the manifest's .torrent, or the copy a fetch kept under
    ``torrents/``) and the plan's files in ``dest`` at their torrent sizes (their hashes were
    checked when fetched and are re-checked by ``verify``); otherwise it says why and returns None."""
    scope = current_scope()
    if scope is None or options.seed_for <= 0:
        return None
    try:
        job = FetchJob(plan, dest, options, progress)
    except (UsageError, ManifestError):
        return None  # not a BitTorrent source: nothing to seed
    ti = _kept_metadata(job)
    if ti is None or hash_of(ti) not in (job.src.key, ""):
        note(progress, "fetch", "not seeding: this host has no metadata for the torrent (fetch it again to seed)")
        return None
    try:
        sels = job.select(ti)
    except (NotFoundError, HostileContentError) as e:
        note(progress, "fetch", f"not seeding: {e}")
        return None
    for sel in sels:
        p = dest / sel.rel
        if not p.is_file() or p.stat().st_size != sel.size:
            note(progress, "fetch", f"not seeding: {sel.rel} is missing or not the torrent's size")
            return None
    ses = open_session(job.settings)
    try:
        h = add_seed_torrent(ses, ti, sels, dest, network=options.network, trackers=job.trackers())
    except BaseException:
        close_session(ses)
        raise
    return scope.start(ses, h, job.settings, options.seed_for, plan.name, progress)


# ---------------------------------------------------------------------------------------
# `provision seed`


@dataclass
class SeedInfo:
    """What a seed publishes at start (handed to ``on_ready`` before serving)."""

    magnet: str
    btih: str | None
    btmh: str | None
    name: str
    listen: str
    torrent_file: Path | None
    whitelist: list[str]


@dataclass
class SeedResult:
    info: SeedInfo
    files: list[tuple[str, int]]
    total_size: int
    piece_length: int
    version: str
    hash_seconds: float
    seconds: float
    uploaded_bytes: int
    peers_max: int
    stopped_by: str  # timeout | stop | signal | none (--seed-for 0)
    trackers: list[str] = field(default_factory=list)
    web_seeds: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "magnet": self.info.magnet, "btih": self.info.btih, "btmh": self.info.btmh, "name": self.info.name,
            "listen": self.info.listen,
            "torrent_file": str(self.info.torrent_file) if self.info.torrent_file else None,
            "whitelist": self.info.whitelist, "version": self.version, "piece_length": self.piece_length,
            "files": [{"path": p, "size": s} for p, s in self.files], "total_size": self.total_size,
            "trackers": self.trackers, "web_seeds": self.web_seeds, "hash_seconds": round(self.hash_seconds, 3),
            "seconds": round(self.seconds, 3), "uploaded_bytes": self.uploaded_bytes, "peers_max": self.peers_max,
            "stopped_by": self.stopped_by,
        }


def _manifest_files(folder: Path, manifest: Manifest) -> list[tuple[str, int]]:
    files: list[tuple[str, int]] = []
    for f in manifest.files:
        p = folder / f.path
        if not p.is_file():
            if f.optional:
                continue
            raise UsageError(f"Cannot seed {f.path}: the manifest lists it but {folder} lacks it.",
                             hint="Fetch the model first.", path=f.path)
        size = p.stat().st_size
        if f.size is not None and f.size != size:
            raise UsageError(f"Cannot seed {f.path}: it is {size:,d} bytes, the manifest says {f.size:,d}.",
                             hint="Verify the folder (provision verify) before seeding it.", path=f.path)
        files.append((f.path, size))
    return files


def _seed_name_and_files(folder: Path, manifest: Manifest | None,
                         web_seeds: Sequence[str]) -> tuple[str | None, list[tuple[str, int]] | None]:
    """Torrent name and file list from a manifest: named after the Hub commit when web-seeding
    (so web seed + name + path is the resolve URL), after the torrent prefix's root otherwise."""
    if manifest is None:
        return None, None
    files = _manifest_files(folder, manifest)
    name = None
    hf = manifest.source("hf")
    tsrc = manifest.source("torrent")
    if web_seeds and hf is not None and hf.revision:
        if hf.prefix:
            raise UsageError("Web-seeding a manifest whose Hub source has a prefix is not supported.",
                             hint="Seed without --web-seed or without --manifest.")
        name = hf.revision
    elif tsrc is not None and tsrc.prefix and tsrc.prefix.count("/") == 1:
        name = tsrc.prefix.rstrip("/")
    return name, files


def _add_created(ses: Any, ti: Any, folder: Path, network: str, super_seed: bool = False) -> Any:
    """Add a torrent just created from ``folder`` in seed mode (hashed a moment ago: no re-hash);
    ``super_seed``: BEP 16 super seeding (each peer is offered pieces the others lack, one at a time)."""
    fs = files_of(ti)
    root = root_prefix(ti)
    atp = lt.add_torrent_params()
    atp.ti = ti
    atp.save_path = str(folder.resolve())
    atp.renamed_files = {i: fs.file_path(i).replace("\\", "/")[len(root):] for i in range(fs.num_files())
                         if not is_pad(fs, i)}
    atp.verified_pieces = [True] * ti.num_pieces()
    atp.flags = (int(atp.flags) & ~int(NOT_STARTED)) | int(lt.torrent_flags.seed_mode) | closed_flags(network)
    if super_seed:
        atp.flags = int(atp.flags) | int(lt.torrent_flags.super_seeding)
    return ses.add_torrent(atp)


def seed(
    folder: Path,
    *,
    manifest: Manifest | None = None,
    version: str = "hybrid",
    torrent_out: Path | None = None,
    magnet_out: Path | None = None,
    whitelist_out: Path | None = None,
    web_seeds: Sequence[str] = (),
    trackers: Sequence[str] = (),
    network: str = "public",
    listen: str | None = None,
    seed_for: float | None = None,
    max_upload_rate: int = 0,
    upload_slots: int = 0,
    super_seed: bool = False,
    progress: ProgressFn | None = None,
    stop: threading.Event | None = None,
    on_ready: Callable[[SeedInfo], None] | None = None,
) -> SeedResult:
    """Create a torrent of ``folder`` and serve it in seed mode (no re-hash) until ``seed_for``
    seconds pass (``None``: until ``stop`` is set or SIGINT/SIGTERM; ``0``: write the outputs and
    return without serving). The .torrent and whitelist are written, ``on_ready`` is called, and
    then the magnet file is written (so its appearing means all of it is published), before
    serving starts. SIGINT/SIGTERM end the seed normally (``stopped_by="signal"``).

    Usable from a background thread: pass ``stop`` and read the magnet in ``on_ready``.

    ``upload_slots``: how many peers are served at once (0: libtorrent's 8). A fleet's origin
    does best with 2: each member it serves gets a large share and fetches pieces the others
    lack, and the members trade the rest (see benchmarks/fleet.py). ``super_seed``: BEP 16 super
    seeding, for an origin whose upload must stay near one copy however the members start.
    """
    t0 = time.monotonic()
    folder = Path(folder)
    settings = session_settings(network, listen=listen, upload_rate=max_upload_rate)
    if upload_slots > 0:
        settings["unchoke_slots_limit"] = int(upload_slots)
    name, files = _seed_name_and_files(folder, manifest, web_seeds)
    made = create_torrent(folder, files=files, version=version, name=name, trackers=trackers,
                          web_seeds=web_seeds, progress=progress)
    ses = open_session(settings)
    try:
        h = _add_created(ses, made.info(), folder, network, super_seed)
        endpoint = listen_endpoint(ses, settings)
        magnet = build_magnet(btih=made.btih, btmh=made.btmh, name=made.name, trackers=tuple(trackers),
                              peers=(endpoint,), web_seeds=tuple(web_seeds))
        wl = whitelist_lines(made.btih, made.btmh)
        info = SeedInfo(magnet=magnet, btih=made.btih, btmh=made.btmh, name=made.name, listen=endpoint,
                        torrent_file=Path(torrent_out) if torrent_out else None, whitelist=wl)
        facts: dict[str, Any] = {"uploaded_bytes": 0, "peers_max": 0, "stopped_by": "none"}
        if torrent_out is not None:
            atomic.atomic_write_bytes(Path(torrent_out), made.data)
        if whitelist_out is not None:
            atomic.atomic_write_text(Path(whitelist_out), "".join(x + "\n" for x in wl))
        try:  # from here on, SIGINT/SIGTERM end the seed normally
            # on_ready (the CLI prints the magnet on stderr) before the magnet file: a script that
            # signals the seed once the file exists must find the magnet announced too
            if on_ready is not None:
                on_ready(info)
            if magnet_out is not None:  # last: a script waiting for it finds the others written
                atomic.atomic_write_text(Path(magnet_out), magnet + "\n")
            if seed_for is None or seed_for > 0:
                facts = serve(ses, h, seconds=seed_for, stop=stop, progress=progress, task="seed:" + made.name,
                              settings=settings)
        except (KeyboardInterrupt, Interrupted):
            facts = {"uploaded_bytes": int(h.status().total_payload_upload), "peers_max": 0, "stopped_by": "signal"}
        return SeedResult(info=info, files=made.files, total_size=made.total_size, piece_length=made.piece_length,
                          version=version, hash_seconds=made.seconds, seconds=time.monotonic() - t0,
                          uploaded_bytes=int(facts["uploaded_bytes"]), peers_max=int(facts["peers_max"]),
                          stopped_by=str(facts["stopped_by"]), trackers=list(trackers), web_seeds=list(web_seeds))
    finally:
        close_session(ses)
