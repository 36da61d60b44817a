"""BitTorrent through libtorrent: the only module that imports it.

What it does:

* ``read_torrent_file`` / ``TorrentMeta``: read a ``.torrent`` offline (name, files, infohashes)
  for ``plan``; ``magnet_listing``: resolve a bare magnet's file list from peers.
* ``fetch_torrent(plan, dest=, options=, progress=)``: download only the plan's files
  (sequentially) into a staging folder under ``Layout(home).staging(name)`` with libtorrent's
  own piece checks; hash each file in order while its pieces are still in the page cache (a
  piece reaches the hasher once a ``flush_cache()`` fence says its writes are done) and fsync
  it as it completes; hand the hashes to ``provision.stages.verify`` (a stream hash is only trusted
  when a manifest sha256 confirms it) and only then rename the files under their final names
  in ``dest``. Resume data is saved every second and on SIGINT/SIGTERM
  (``torrents/<id>.resume``), a stall watchdog raises ``StallError`` ("No peers found" when
  nobody answered), hostile names are refused before anything is written, and free disk
  space is checked again once the metadata is known. ``--seed-for`` then serves the verified
  files from ``dest`` without re-hashing.
* ``create_torrent`` / ``seed``: make a torrent (hybrid v1+v2, v1 or v2; never private) of a
  verified folder and serve it in seed mode without re-hashing; ``seed`` writes the .torrent,
  the magnet (``btih`` + ``btmh`` + ``x.pe`` + trackers) and an opentracker whitelist line
  before serving, so a fleet script can hand them on.

Every session is built from ``session_settings(network, ...)`` so nothing starts before the
settings apply. ``closed`` mode turns DHT, LSD, UPnP, NAT-PMP and uTP off and listens on
127.0.0.1 unless told otherwise; it keeps PEX, which only passes on peers learnt from the given
trackers and peers (how fleet members find each other). ``public`` keeps libtorrent's defaults.

Fleets: a download switches from in-order to rarest-first pieces once another downloader is
connected (``_leave_sequential_in_a_swarm``); ``background_seeding()`` lets ``provision run
--seed-for`` serve the verified files from a thread while convert and smoke run
(``seed_verified`` does it for a model fetched by an earlier run); ``seed(upload_slots=2)``
makes an origin serve few members at once so they fetch different pieces.

What it does not do: decide which source to use (``provision.stages.fetch``), define what a valid
file is (``provision.stages.verify``), or print anything (events go through ``progress``).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fnmatch
import hashlib
import mmap
import os
import queue
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libtorrent as lt

from provision.errors import (
    DiskSpaceError,
    FetchError,
    HostileContentError,
    Interrupted,
    ManifestError,
    NotFoundError,
    StallError,
    UsageError,
)
from provision.formats.sources import Magnet, build_magnet, parse_magnet
from provision.io import atomic, space
from provision.io.paths import safe_join, safe_relpath
from provision.layout import Layout
from provision.progress import ProgressEvent, ProgressFn, note
from provision.version import __version__

if TYPE_CHECKING:
    from provision.stages.fetch.request import FetchedFile, FetchResult, PlannedFile, TorrentOptions
    from provision.stages.fetch.request import FetchRequest as Plan
    from provision.stages.verify import Authority

NETWORK_MODES = ("public", "closed")
TORRENT_VERSIONS = ("hybrid", "v1", "v2")
RESUME_INTERVAL_S = 1.0  # periodic resume data: what a SIGKILL can lose is about this long
POLL_S = 0.05
PROGRESS_INTERVAL_S = 0.5
HASH_READ_BYTES = 4 << 20
FENCE_INTERVAL_S = 0.25  # how often passed pieces are fenced (flush_cache) for the hasher
SYNC_CHUNK = 64 << 20  # the write-behind waits for and drops 64 MiB stretches
HASH_RANGE_BYTES = 64 << 20  # at most this much is hashed before writeback of the next stretch starts
ORDER_CHECK_S = 1.0  # how often a sequential download looks for other downloaders (a swarm)
REMOVE_TIMEOUT_S = 10.0
DISK_IO = "pread_disk_io_constructor"

_ALERTS = (lt.alert.category_t.error_notification | lt.alert.category_t.status_notification
           | lt.alert.category_t.storage_notification | lt.alert.category_t.piece_progress_notification
           | lt.alert.category_t.tracker_notification | lt.alert.category_t.connect_notification
           | lt.alert.category_t.peer_notification)


# ---------------------------------------------------------------------------------------
# reading .torrent files and checking names


@dataclass(frozen=True)
class TorrentMeta:
    name: str
    files: tuple[tuple[str, int], ...]  # (path relative to the torrent's root folder, size)
    btih: str | None
    btmh: str | None
    piece_length: int
    total_size: int

    def describe(self) -> str:
        ids = " ".join(x for x in (f"btih:{self.btih}" if self.btih else "", f"btmh:{self.btmh}" if self.btmh else "") if x)
        return f"{self.name}, {len(self.files)} files, {ids}"


def read_torrent_file(path: Path) -> TorrentMeta:
    """Parse a .torrent offline; refuse hostile file names (exit 5) and malformed files (exit 2)."""
    return _meta_from_info(_load_torrent_info(Path(path)))


def _load_torrent_info(path: Path) -> Any:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"Cannot read torrent file {path}: {e.strerror or e}.") from None
    try:
        ti = lt.torrent_info(data)
    except RuntimeError as e:
        raise UsageError(f"Cannot read torrent file {path}: {e}.", hint="Is it a complete .torrent file?") from None
    check_info_names(ti.info_section())
    return ti


def _str_part(raw: Any, what: str) -> str:
    if not isinstance(raw, bytes):
        raise HostileContentError(f"Refusing the torrent: a {what} is not a string.")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HostileContentError(f"Refusing the torrent: the {what} {raw!r} is not valid UTF-8.") from None


def _check_component(part: str, what: str) -> None:
    if part in ("", ".", "..") or "/" in part or "\\" in part or "\x00" in part or (len(part) > 1 and part[1] == ":"):
        raise HostileContentError(
            f"Refusing the torrent: the {what} {part!r} would leave the destination folder or is not a plain name.",
            hint="Do not use this torrent; ask its publisher for a clean one.", path=part)


def check_info_names(info_section: bytes) -> None:
    """Refuse a torrent whose raw info dictionary names a path with ``..``, ``/``, ``\\``, NUL
    or an absolute/empty component (libtorrent would silently rename it; we refuse instead)."""
    info: Any = lt.bdecode(bytes(info_section))
    if not isinstance(info, dict):
        raise HostileContentError("Refusing the torrent: its info dictionary is malformed.")
    for key in (b"name", b"name.utf-8"):
        if key in info:
            _check_component(_str_part(info[key], "torrent name"), "torrent name")
    for f in info.get(b"files") or []:
        if not isinstance(f, dict):
            raise HostileContentError("Refusing the torrent: a file entry is malformed.")
        for key in (b"path", b"path.utf-8"):
            if key in f:
                parts = f[key]
                if not isinstance(parts, list) or not parts:
                    raise HostileContentError("Refusing the torrent: a file path is empty or malformed.")
                for p in parts:
                    _check_component(_str_part(p, "file name"), "file name")

    def walk(tree: Any, depth: int) -> None:
        if depth > 64 or not isinstance(tree, dict) or not tree:
            raise HostileContentError("Refusing the torrent: its v2 file tree is malformed.")
        if b"" in tree:  # a file node: {"": {"length": ...}} and nothing else, never the root
            if depth == 0 or len(tree) != 1:
                raise HostileContentError("Refusing the torrent: its v2 file tree has an empty file name.")
            return
        for k, v in tree.items():
            _check_component(_str_part(k, "file name"), "file name")
            walk(v, depth + 1)

    if b"file tree" in info:
        walk(info[b"file tree"], 0)


def _files_of(ti: Any) -> Any:
    return ti.layout() if hasattr(ti, "layout") else ti.files()


def _root_prefix(ti: Any) -> str:
    """``name/`` for a multi-file torrent, ``""`` for a single-file one."""
    fs = _files_of(ti)
    name = ti.name()
    for i in range(fs.num_files()):
        if not _is_pad(fs, i):
            return name + "/" if fs.file_path(i).replace("\\", "/").startswith(name + "/") else ""
    return name + "/"


def _is_pad(fs: Any, i: int) -> bool:
    return bool(fs.file_flags(i) & fs.flag_pad_file)


def _meta_from_info(ti: Any) -> TorrentMeta:
    fs = _files_of(ti)
    root = _root_prefix(ti)
    files = []
    for i in range(fs.num_files()):
        if _is_pad(fs, i):
            continue
        p = fs.file_path(i).replace("\\", "/")
        rel = p[len(root):] if root and p.startswith(root) else p
        safe_relpath(rel, what="file name in the torrent")
        files.append((rel, int(fs.file_size(i))))
    btih, btmh = _hashes(ti.info_hashes())
    return TorrentMeta(name=ti.name(), files=tuple(files), btih=btih, btmh=btmh, piece_length=ti.piece_length(),
                       total_size=sum(s for _, s in files))


def _hashes(ih: Any) -> tuple[str | None, str | None]:
    return (str(ih.v1) if ih.has_v1() else None, str(ih.v2) if ih.has_v2() else None)


def whitelist_lines(btih: str | None, btmh: str | None) -> list[str]:
    """opentracker whitelist entries: 40 hex each; a v2 hash is truncated to its first 20 bytes."""
    out = [h for h in (btih, btmh[:40] if btmh else None) if h]
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------------------------------
# sessions


def _parse_listen(value: str) -> str:
    v = value.strip()
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) < 65536) or not host:
        raise UsageError(f"Malformed --listen {value!r} (expected HOST:PORT, e.g. 127.0.0.1:6881 or [::1]:0).")
    if host.startswith("[") != host.endswith("]"):
        raise UsageError(f"Malformed --listen {value!r}: unbalanced brackets around the IPv6 address.")
    bare = host.strip("[]")
    if ":" in bare:
        return f"[{bare}]:{int(port)}"
    return f"{bare}:{int(port)}"


def session_settings(network: str, *, listen: str | None = None, upload_rate: int = 0,
                     download_rate: int = 0) -> dict[str, Any]:
    """The settings every session starts from (``lt.session(settings)``: nothing runs before them).

    ``closed``: no DHT, LSD, UPnP, NAT-PMP or uTP (20 MB/s on loopback instead of ~500), listening
    on ``listen`` or 127.0.0.1 with a free port, several peers per address allowed (loopback
    tests). ``public``: libtorrent's defaults (DHT, LSD, UPnP, NAT-PMP, uTP), ``listen`` if given.
    """
    if network not in NETWORK_MODES:
        raise UsageError(f"--network must be one of {', '.join(NETWORK_MODES)}, got {network!r}.")
    s: dict[str, Any] = {
        "user_agent": f"provision/{__version__} libtorrent/{lt.__version__}",
        "alert_mask": _ALERTS,
        "alert_queue_size": 200_000,
        "upload_rate_limit": max(0, int(upload_rate)),
        "download_rate_limit": max(0, int(download_rate)),
        "stop_tracker_timeout": 1,
        "close_redundant_connections": False,  # keep the peer that sent the metadata while priorities apply
        # throughput on fast links: deeper send buffers than the defaults (500 kB / 10 kB), but
        # not so deep that the seeder's fill_send_buffer dominates its CPU (seen with 8 MiB)
        "send_buffer_watermark": 1 << 20,
        "send_buffer_low_watermark": 256 << 10,
        "max_queued_disk_bytes": 64 << 20,
        "max_out_request_queue": 3000,
        "max_allowed_in_request_queue": 6000,
        # few threads on few cores: 2 disk threads and 1 SHA-1 thread measured ~8% faster on 2
        # cores than 4 + 2 (less lock contention on the file being written, fewer switches)
        "aio_threads": 2,
        "hashing_threads": 1,
    }
    if upload_rate or download_rate:
        s["ignore_limits_on_local_network"] = False  # a limit the user asked for applies to LAN peers too
    if network == "closed":
        s.update({
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "enable_outgoing_utp": False,
            "enable_incoming_utp": False,
            "dht_bootstrap_nodes": "",
            "listen_interfaces": _parse_listen(listen or "127.0.0.1:0"),
            "allow_multiple_connections_per_ip": True,
        })
    elif listen:
        s["listen_interfaces"] = _parse_listen(listen)
    return s


def open_session(settings: dict[str, Any]) -> Any:
    """A libtorrent session started from ``settings`` (nothing runs before they apply).

    ``PROVISION_FORBID_PUBLIC_NETWORK=1`` (set by the test suite) refuses any session with DHT,
    LSD, UPnP or NAT-PMP on, or listening beyond loopback: a safety net for the network rule."""
    if os.environ.get("PROVISION_FORBID_PUBLIC_NETWORK") == "1":
        loud = [k for k in ("enable_dht", "enable_lsd", "enable_upnp", "enable_natpmp") if settings.get(k, True)]
        listen = str(settings.get("listen_interfaces", "0.0.0.0"))
        if loud or not all(part.strip().startswith(("127.", "[::1]", "10.77.")) for part in listen.split(",")):
            raise UsageError(f"refusing a public libtorrent session here ({', '.join(loud) or listen}): "
                             "PROVISION_FORBID_PUBLIC_NETWORK=1 allows only the closed network mode.")
    params = lt.session_params()
    params.settings = settings  # type: ignore[assignment]  # the bindings take a dict
    # pread()/pwrite() disk I/O instead of 2.1's default (mmap): less CPU per byte written, and
    # no mapping that would pin the pages the stream hasher drops once they are on disk
    params.disk_io_constructor = DISK_IO
    try:
        return lt.session(params)
    except RuntimeError as e:  # pragma: no cover - libtorrent rejects a settings value
        raise UsageError(f"libtorrent refused the session settings: {e}.") from None


def _closed_flags(network: str) -> int:
    if network == "closed":
        # PEX stays on: it only passes on peers that came from the given trackers and peers
        # (how fleet members find each other), never a DHT or LSD discovery
        return int(lt.torrent_flags.disable_dht | lt.torrent_flags.disable_lsd)
    return 0


def _peer_tuple(value: str) -> tuple[str, int]:
    from provision.formats.sources import parse_peer

    return parse_peer(value)


def _listen_endpoint(ses: Any, settings: dict[str, Any]) -> str:
    """HOST:PORT others can use to reach this session (for x.pe); wildcards become this host's address."""
    port = int(ses.listen_port())
    iface = str(settings.get("listen_interfaces") or "0.0.0.0:0").split(",")[0]
    host = iface.rpartition(":")[0].strip("[]")
    if host in ("0.0.0.0", "::", ""):
        host = _primary_address()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _primary_address() -> str:
    try:
        for fam, _, _, _, addr in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            ip = str(addr[0])
            if fam == socket.AF_INET and not ip.startswith("127."):
                return ip
    except OSError:
        pass
    return "127.0.0.1"


# ---------------------------------------------------------------------------------------
# hashing while downloading


class _StreamHasher:
    """Follow the selected files in torrent order as their pieces arrive: hash those a sha256
    vouches for while the data is still in the page cache (so whole-file verification needs no
    second read), and start writing each completed stretch back to disk at once. A second
    thread (:class:`_WriteBehind`) waits for those stretches to reach the disk, drops them from
    the page cache and fsyncs each file once complete, so the hasher never waits for the disk
    and the fsync before the final rename is cheap. A piece counts once a ``flush_cache()``
    fence issued after libtorrent passed it has completed."""

    def __init__(self, items: Sequence[tuple[str, Path, int, int, bool]], piece_length: int,
                 num_pieces: int, *, drop_behind: bool = True) -> None:
        self.items = list(items)  # (rel, path, offset in the torrent, size, hash it)
        self.pl = piece_length
        self.have = bytearray(num_pieces)
        self.cond = threading.Condition()
        self.stopped = False
        self.results: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.bytes_hashed = 0
        self.hashed_at: float | None = None  # when the last file's hash was done
        self.writer = _WriteBehind(drop=drop_behind)
        self.thread = threading.Thread(target=self._run, name="provision-stream-hash", daemon=True)

    @property
    def synced(self) -> set[str]:
        """Files fsynced as they completed (the move need not fsync them again)."""
        return self.writer.synced

    @property
    def finished_at(self) -> float | None:
        return self.writer.finished_at

    def start(self) -> None:
        self.writer.start()
        self.thread.start()

    def mark(self, piece: int) -> None:
        with self.cond:
            if 0 <= piece < len(self.have):
                self.have[piece] = 1
            self.cond.notify_all()

    def mark_all(self) -> None:
        """Every piece is on disk (the download finished and its files are closed): release the
        hasher even for a piece whose alert never came (seen in swarms with rarest-first order;
        waiting for it would hang). A stream hash that disagrees is never trusted anyway."""
        with self.cond:
            self.have[:] = b"\x01" * len(self.have)
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.writer.stop()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the hashes, then for the write-behind (every file fsynced)."""
        if self.thread.is_alive():
            self.thread.join(timeout)
        self.writer.join(timeout)

    def _wait(self, piece: int) -> bool:
        with self.cond:
            while not self.have[piece] and not self.stopped:
                self.cond.wait(0.5)
            return not self.stopped

    def _run(self) -> None:
        buf = bytearray(HASH_READ_BYTES)
        mv = memoryview(buf)
        try:
            for rel, path, offset, size, want_hash in self.items:
                if not self._file(rel, path, offset, size, want_hash, mv):
                    return
        finally:
            self.writer.close()

    def _file(self, rel: str, path: Path, offset: int, size: int, want_hash: bool, mv: memoryview) -> bool:
        """Hash one file as its pieces arrive; False when stopped."""
        h = hashlib.sha256()
        pos = started_to = 0
        last = (offset + size - 1) // self.pl
        try:
            with contextlib.ExitStack() as stack:
                fd = -1
                while pos < size:
                    p = (offset + pos) // self.pl
                    if not self._wait(p):
                        return False
                    q = p
                    while q < last and self.have[q + 1] and (q + 1 - p) * self.pl < HASH_RANGE_BYTES:
                        q += 1
                    end = min(size, (q + 1) * self.pl - offset)
                    if fd < 0:
                        fd = os.open(path, os.O_RDONLY)
                        stack.callback(os.close, fd)
                    _start_writeback(fd, pos, end - pos)  # complete: to disk now, not after the hash
                    if want_hash:
                        if os.fstat(fd).st_size < end:
                            raise OSError(errno.EIO, f"{path} is shorter than expected")
                        _hash_range(h, fd, pos, end, mv)
                        self.bytes_hashed += end - pos
                    pos = end
                    if pos - started_to >= SYNC_CHUNK or pos >= size:  # hashed: the write-behind may drop it
                        self.writer.put(rel, path, started_to, pos)
                        started_to = pos
                if want_hash:
                    self.results[rel] = h.hexdigest()
                self.hashed_at = time.monotonic()
                if fd >= 0:
                    self.writer.put(rel, path, 0, size, final=True)
        except OSError as e:
            self.errors[rel] = str(e)  # verify reads the file itself instead; the move fsyncs it
        return True


class _WriteBehind:
    """The disk side of the stream hasher, in its own thread: wait until each completed stretch
    is on disk and drop it from the page cache (hashed and written, nothing reads it again during
    the fetch; the freed pages are reused for the next stretch instead of the cache growing by
    the model's size, which on a VM whose fresh pages are costly is most of a write's CPU), and
    fsync each file once its last stretch is queued."""

    def __init__(self, *, drop: bool) -> None:
        self.drop = drop
        self.queue: queue.SimpleQueue[tuple[str, Path, int, int, bool] | None] = queue.SimpleQueue()
        self.synced: set[str] = set()
        self.finished_at: float | None = None
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="provision-write-behind", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def put(self, rel: str, path: Path, start: int, end: int, *, final: bool = False) -> None:
        self.queue.put((rel, path, start, end, final))

    def close(self) -> None:
        """No more stretches: finish the queued ones, then end."""
        self.queue.put(None)

    def stop(self) -> None:
        self.stopped = True
        self.queue.put(None)

    def join(self, timeout: float | None = None) -> None:
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _run(self) -> None:
        fds: dict[str, int] = {}
        try:
            while not self.stopped:
                item = self.queue.get()
                if item is None:
                    break
                rel, path, start, end, final = item
                try:
                    fd = fds.get(rel)
                    if fd is None:
                        fd = fds[rel] = os.open(path, os.O_RDONLY)
                    if final:
                        os.fsync(fd)
                        self.synced.add(rel)
                        if self.drop:
                            _drop_cached(fd, start, end - start)
                        os.close(fds.pop(rel))
                    elif self.drop:
                        _write_back_and_drop(fd, start, end - start)
                except OSError:
                    pass  # the move fsyncs a file that is not in ``synced``
        finally:
            for fd in fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.finished_at = time.monotonic()


def _hash_range(h: Any, fd: int, start: int, end: int, buf: memoryview) -> None:
    """Feed bytes ``[start, end)`` of ``fd`` (complete, within the file) to ``h``: through a
    read-only mapping of the page cache (no copy: on this kind of VM a copy costs as much as
    the hash), or by ``preadv`` into ``buf`` where mapping fails."""
    base = start - start % mmap.ALLOCATIONGRANULARITY
    try:
        mm = mmap.mmap(fd, end - base, prot=mmap.PROT_READ, offset=base)
    except (OSError, ValueError):
        mm = None
    if mm is not None:
        with contextlib.suppress(AttributeError, OSError):
            mm.madvise(mmap.MADV_SEQUENTIAL)
        view = memoryview(mm)
        try:
            h.update(view[start - base:])
        finally:
            view.release()
            mm.close()
        return
    pos = start
    while pos < end:
        n = os.preadv(fd, [buf[:min(len(buf), end - pos)]], pos)
        if not n:
            raise OSError(errno.EIO, "the file is shorter than expected")
        h.update(buf[:n])
        pos += n


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_SYNC_FILE_RANGE = _libc_sync_file_range() if hasattr(os, "preadv") else None
SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a completed range back (does not wait; Linux only)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def _write_back_and_drop(fd: int, offset: int, length: int) -> None:
    """Wait until a range (whose writeback was started) is on disk, then drop it from the page cache."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE
                         | SYNC_FILE_RANGE_WAIT_AFTER)
        _drop_cached(fd, offset, length)


def _drop_cached(fd: int, offset: int, length: int) -> None:
    """Drop clean cached pages of a range (after fsync or a waited writeback; dirty pages stay)."""
    if length > 0 and hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


# ---------------------------------------------------------------------------------------
# fetch


@dataclass
class _Sel:
    rel: str  # path relative to the verified root and to dest (the plan's path)
    index: int  # file index in the torrent
    size: int
    offset: int
    staged: Path  # where libtorrent writes it
    spec: PlannedFile | None = None
    reused: bool = False


@dataclass
class _Source:
    magnet: Magnet | None
    torrent_path: Path | None
    prefix: str  # manifest: where its files sit inside the torrent ("" = under the root folder)
    key: str  # id the resume data is kept under (v1 hash when known, else v2)


def _resolve_source(plan: Plan) -> _Source:
    magnet: Magnet | None = None
    tpath: Path | None = None
    prefix = ""
    if plan.kind == "magnet":
        magnet = plan.magnet
    elif plan.kind == "torrent":
        tpath = plan.torrent_file
    elif plan.kind == "manifest" and plan.manifest is not None:
        src = plan.manifest.source("torrent")
        if src is None:
            raise ManifestError(f"Manifest {plan.manifest.name} has no torrent source.")
        magnet = parse_magnet(src.magnet) if src.magnet else None
        if src.torrent:
            base = plan.manifest.path.parent if plan.manifest.path is not None else Path.cwd()
            tpath = base / src.torrent
            if not tpath.is_file():
                raise ManifestError(f"Manifest {plan.manifest.name}: torrent file {tpath} not found.",
                                    hint="Put the .torrent beside the manifest or fix sources.torrent.")
        prefix = src.prefix
    else:
        raise UsageError(f"{plan.source} is not a BitTorrent source.")
    key = ""
    if tpath is not None:
        ti = _load_torrent_info(tpath)
        btih, btmh = _hashes(ti.info_hashes())
        key = btih or btmh or ""
        if magnet is not None and ((magnet.btih and btih and magnet.btih != btih)
                                   or (magnet.btmh and btmh and magnet.btmh != btmh)):
            raise ManifestError(f"The magnet and the torrent file {tpath} name different torrents.",
                                hint="Fix the manifest's torrent source.")
    elif magnet is not None:
        key = magnet.infohash
    if not key:
        raise ManifestError("The torrent source names neither a magnet nor a torrent file.")
    return _Source(magnet=magnet, torrent_path=tpath, prefix=prefix, key=key)


def _emit(progress: ProgressFn | None, ev: ProgressEvent) -> None:
    if progress is not None:
        progress(ev)


class _Run:
    """One fetch: the session, its torrent handle, the alerts and the counters."""

    def __init__(self, plan: Plan, dest: Path, options: TorrentOptions, progress: ProgressFn | None) -> None:
        self.plan = plan
        self.dest = Path(dest)
        self.options = options
        self.progress = progress
        self.layout = Layout(plan.home)
        self.src = _resolve_source(plan)
        self.staging = self.layout.staging(plan.name) / f"bt-{self.src.key[:16]}"
        self.resume_path = self.layout.torrents / f"{self.src.key}.resume"
        self.torrent_path = self.layout.torrents / f"{self.src.key}.torrent"
        self.settings = session_settings(options.network, listen=options.listen,
                                         upload_rate=options.max_upload_rate,
                                         download_rate=options.max_download_rate)
        self.ses: Any = None
        self.h: Any = None
        self.hash_failures = 0
        self.peers_max = 0
        self.peers_ever: set[str] = set()
        self.endpoints: set[tuple[str, int]] = set()  # peers we connected to (reconnected after metadata)
        self.tracker_errors: list[str] = []
        self.resumed = False
        self.hasher: _StreamHasher | None = None
        self.sel: list[_Sel] = []
        self.last_resume_save = 0.0
        self.resume_pending = False
        self.removed = False
        self.prio_applied = False
        # pieces libtorrent has passed but whose writes may still be in flight: they reach the
        # hasher only after a flush_cache() fence issued after them completes
        self.pending: list[int] = []
        self.fenced: list[int] | None = None
        self.last_fence = 0.0
        self.samples: list[tuple[float, int, int]] = []  # (time, bytes done, bytes wanted)
        self.piece_order = "sequential"
        self.swarm_at: float | None = None  # when a downloading peer turned sequential order off
        self.last_order_check = 0.0
        self.t0 = time.monotonic()

    # -- alerts ---------------------------------------------------------------------
    def pump(self, wait_ms: int = 0) -> list[Any]:
        if wait_ms:
            self.ses.wait_for_alert(wait_ms)
        alerts = self.ses.pop_alerts()
        for a in alerts:
            if isinstance(a, lt.piece_finished_alert):
                self.pending.append(int(a.piece_index))
            elif isinstance(a, lt.cache_flushed_alert):
                self._flushed()
            elif isinstance(a, lt.hash_failed_alert):
                self.hash_failures += 1
            elif isinstance(a, lt.save_resume_data_alert):
                self._write_resume(a.params, durable=False)
                self.resume_pending = False
            elif isinstance(a, lt.save_resume_data_failed_alert):
                self.resume_pending = False
            elif isinstance(a, lt.peer_connect_alert):
                with contextlib.suppress(Exception):
                    self.peers_ever.add(str(a.endpoint))
                    self.endpoints.add((str(a.endpoint[0]), int(a.endpoint[1])))
            elif isinstance(a, lt.tracker_error_alert):
                self.tracker_errors.append(a.message())
            elif isinstance(a, lt.file_error_alert):
                self._file_error(a)
            elif isinstance(a, lt.torrent_removed_alert):
                self.removed = True
            elif isinstance(a, lt.file_prio_alert):
                self.prio_applied = True
        return alerts

    def fence(self, now: float, *, force: bool = False) -> None:
        """Issue a flush_cache() fence for the pieces passed so far (at most every 0.25 s)."""
        if self.fenced is not None or not self.pending or self.h is None or self.removed:
            return
        if not force and now - self.last_fence < FENCE_INTERVAL_S:
            return
        self.fenced, self.pending = self.pending, []
        self.last_fence = now
        self.h.flush_cache()

    def _flushed(self) -> None:
        if self.fenced is not None and self.hasher is not None:
            for piece in self.fenced:
                self.hasher.mark(piece)
        self.fenced = None

    def sync_pieces(self) -> None:
        """Queue every piece libtorrent has that the hasher has not been given yet."""
        if self.hasher is None or self.h is None:
            return
        bits = self.h.status(lt.torrent_handle.query_pieces).pieces
        known = set(self.pending) | set(self.fenced or ())
        self.pending += [i for i, b in enumerate(bits) if b and not self.hasher.have[i] and i not in known]

    def drain_fences(self, timeout: float = 30.0) -> None:
        """Fence until every passed piece has reached the hasher (end of the download)."""
        end = time.monotonic() + timeout
        while (self.pending or self.fenced is not None) and time.monotonic() < end:
            self.fence(time.monotonic(), force=True)
            self.pump(50)

    def _file_error(self, a: Any) -> None:
        code = getattr(getattr(a, "error", None), "value", lambda: 0)()
        if code == errno.ENOSPC:
            raise DiskSpaceError(f"No space left on the device while writing {self.staging}.",
                                 hint="Free some space and run the same command again to resume.",
                                 path=str(self.staging))
        raise FetchError(f"libtorrent could not write the download: {a.message()}.",
                         hint="Check the staging folder's permissions and free space, then run again.",
                         path=str(self.staging))

    def _write_resume(self, params: Any, *, durable: bool) -> None:
        data = bytes(lt.write_resume_data_buf(params))
        self.resume_path.parent.mkdir(parents=True, exist_ok=True)
        if durable:
            atomic.atomic_write_bytes(self.resume_path, data)
            return
        # periodic: a rename keeps it whole across a killed process; fsync is for the last save only
        tmp = self.resume_path.with_name(f"{atomic.TMP_PREFIX}{self.resume_path.name}.{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, self.resume_path)

    def request_resume(self, now: float) -> None:
        if self.h is None or self.resume_pending or not self.h.is_valid():
            return
        if self.h.need_save_resume_data() or not self.resume_path.exists():
            self.h.save_resume_data(lt.save_resume_flags_t.save_info_dict)
            self.resume_pending = True
        self.last_resume_save = now

    def save_resume_now(self, timeout: float = 5.0) -> bool:
        """Ask for resume data and write it durably (on interrupt and before verifying)."""
        if self.h is None or self.removed or not self.h.is_valid():
            return False
        self.h.save_resume_data(lt.save_resume_flags_t.save_info_dict | lt.save_resume_flags_t.flush_disk_cache)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.ses.wait_for_alert(100)
            for a in self.ses.pop_alerts():
                if isinstance(a, lt.save_resume_data_alert):
                    self._write_resume(a.params, durable=True)
                    return True
                if isinstance(a, lt.save_resume_data_failed_alert):
                    return False
                if isinstance(a, lt.piece_finished_alert):
                    self.pending.append(int(a.piece_index))
                elif isinstance(a, lt.cache_flushed_alert):
                    self._flushed()
        return False

    # -- setup ----------------------------------------------------------------------
    def initial_params(self) -> Any:
        atp = None
        from_magnet = False
        if self.resume_path.is_file():
            try:
                atp = lt.read_resume_data(self.resume_path.read_bytes())
                v1, v2 = _hashes(atp.info_hashes)
                if self.src.key not in (v1, v2):
                    atp = None
                else:
                    self.resumed = True
            except (RuntimeError, OSError):
                atp = None
            if atp is None:
                note(self.progress, "fetch", f"ignoring unreadable resume data {self.resume_path}")
        if atp is None:
            if self.src.torrent_path is not None:
                atp = lt.add_torrent_params()
                atp.ti = _load_torrent_info(self.src.torrent_path)
            else:
                assert self.src.magnet is not None
                atp = lt.parse_magnet_uri(self.src.magnet.uri)
                from_magnet = True
        if self.src.magnet is not None and not from_magnet:  # the magnet's own trackers, peers, web seeds
            m = lt.parse_magnet_uri(self.src.magnet.uri)
            atp.trackers = list(dict.fromkeys(list(atp.trackers) + list(m.trackers)))
            atp.url_seeds = list(dict.fromkeys(list(atp.url_seeds) + list(m.url_seeds)))
            atp.peers = list(atp.peers) + list(m.peers)
        atp.trackers = list(dict.fromkeys(list(atp.trackers) + list(self.options.trackers)))
        atp.peers = list(atp.peers) + [_peer_tuple(p) for p in self.options.peers]
        atp.save_path = str(self.staging)
        # the files' full size reserved up front (fallocate): a full disk fails at the start, and
        # writeback fills allocated blocks instead of allocating them page by page (less CPU)
        atp.storage_mode = lt.storage_mode_t.storage_mode_allocate
        flags = int(atp.flags)
        flags &= ~int(lt.torrent_flags.paused | lt.torrent_flags.auto_managed | lt.torrent_flags.seed_mode
                      | lt.torrent_flags.upload_mode | lt.torrent_flags.stop_when_ready)
        flags |= _closed_flags(self.options.network) | int(lt.torrent_flags.sequential_download)
        if atp.ti is None:
            flags |= int(lt.torrent_flags.default_dont_download)  # nothing is written before names are checked
        else:
            check_info_names(atp.ti.info_section())
        atp.flags = flags
        return atp

    def select(self, ti: Any) -> list[_Sel]:
        """Map the plan's files to torrent file indexes (hostile names were refused already)."""
        fs = _files_of(ti)
        root = _root_prefix(ti)
        prefix = self.src.prefix
        by_rel: dict[str, int] = {}
        for i in range(fs.num_files()):
            if _is_pad(fs, i):
                continue
            full = fs.file_path(i).replace("\\", "/")
            if prefix:
                if not full.startswith(prefix):
                    continue
                rel = full[len(prefix):]
            else:
                rel = full[len(root):] if root and full.startswith(root) else full
            by_rel[str(safe_relpath(rel, what="file name in the torrent"))] = i
        base = self.staging / (prefix.rstrip("/") if prefix else root.rstrip("/"))
        out: list[_Sel] = []
        files: Sequence[PlannedFile] = self.plan.files
        if self.plan.kind == "manifest":
            files = [f for f in files if "torrent" in f.sources]
        if files:
            for f in files:
                idx = by_rel.get(f.path)
                if idx is None:
                    if f.optional:
                        continue
                    raise NotFoundError(
                        f"The torrent {ti.name()!r} has no file {(prefix or root) + f.path!r}.",
                        hint="Check the manifest's torrent prefix, or use --source hf.", path=f.path)
                size = int(fs.file_size(idx))
                if f.size is not None and f.size != size:
                    raise NotFoundError(
                        f"The torrent's {f.path} is {size:,d} bytes but the plan expects {f.size:,d}; "
                        "it is not the same file.", hint="Use the torrent that matches the manifest, or --source hf.",
                        path=f.path, expected=f.size, actual=size)
                out.append(_Sel(rel=f.path, index=idx, size=size, offset=int(fs.file_offset(idx)),
                                staged=base / f.path, spec=f))
        else:
            globs = tuple(getattr(self.options, "include", ()) or ())
            for rel, idx in sorted(by_rel.items(), key=lambda kv: kv[1]):
                if globs and not any(fnmatch.fnmatch(rel, g) for g in globs):
                    continue
                out.append(_Sel(rel=rel, index=idx, size=int(fs.file_size(idx)), offset=int(fs.file_offset(idx)),
                                staged=base / rel))
            if not out:
                raise NotFoundError(f"No file of the torrent {ti.name()!r} matches --include "
                                    f"{' '.join(globs)}.", hint="Check the glob patterns.")
        out.sort(key=lambda s: s.index)
        return out

    def authorities(self, ti: Any, sels: Sequence[_Sel]) -> dict[str, Authority]:
        from provision.stages.verify import Authority

        fs = _files_of(ti)
        pl = int(ti.piece_length())
        n = fs.num_files()
        v2 = ti.info_hashes().has_v2()
        out: dict[str, Authority] = {}
        for s in sels:
            spec_sha = s.spec.sha256 if s.spec is not None else None
            if spec_sha:
                out[s.rel] = Authority(kind="manifest-sha256", size=s.size, sha256=spec_sha)
            elif v2 and s.size > 0:
                out[s.rel] = Authority(kind="torrent-v2-merkle", size=s.size,
                                       merkle_root=bytes(fs.root(s.index).to_bytes()))
            else:
                end = s.offset + s.size
                nxt = s.index + 1
                tail_ok = end % pl == 0 or nxt >= n or _is_pad(fs, nxt) or end == ti.total_size()
                if s.size > 0 and s.offset % pl == 0 and tail_ok:
                    first, last = s.offset // pl, (end - 1) // pl
                    hashes = tuple(bytes(ti.hash_for_piece(p)) for p in range(first, last + 1))
                    out[s.rel] = Authority(kind="torrent-v1-pieces", size=s.size, piece_length=pl,
                                           piece_hashes=hashes)
                else:  # shares pieces with its neighbours: libtorrent checked those pieces, we check the size
                    out[s.rel] = Authority(kind="torrent-v1-pieces", size=s.size)
        return out

    # -- the download -----------------------------------------------------------------
    def status(self) -> Any:
        return self.h.status()

    def stall_error(self, phase: str, seconds: float) -> StallError:
        name = self.plan.name
        peers = len(self.peers_ever)
        if peers == 0:
            extra = f" (trackers: {self.tracker_errors[-1]})" if self.tracker_errors else ""
            return StallError(
                f"No peers found for {name} in {seconds:.0f} s while {phase}{extra}.",
                hint="Check the magnet's trackers and x.pe peers, pass --peer HOST:PORT or --tracker URL, "
                     "or use --network public.",
                phase=phase, peers=0, infohash=self.src.key, seconds=seconds)
        return StallError(
            f"The download of {name} stalled: no progress for {seconds:.0f} s while {phase} "
            f"({peers} peers seen).", hint="Run the same command again later to resume, or try another source.",
            phase=phase, peers=peers, infohash=self.src.key, seconds=seconds)


def _hash_of(ti: Any) -> str:
    btih, btmh = _hashes(ti.info_hashes())
    return btih or btmh or ""


def fetch_torrent(plan: Plan, *, dest: Path, options: TorrentOptions,
                  progress: ProgressFn | None = None) -> FetchResult:
    """Download the plan's files from BitTorrent into ``dest``, verified (see the module docstring)."""
    from provision.stages.fetch.request import FetchedFile, FetchResult

    run = _Run(plan, dest, options, progress)
    t0 = run.t0
    dest = run.dest
    run.ses = open_session(run.settings)
    try:
        atp = run.initial_params()
        if not run.resumed:
            note(progress, "fetch", f"torrent {run.src.key}: connecting to peers ({options.network} network)")
        else:
            note(progress, "fetch", f"resuming torrent {run.src.key} from {run.resume_path}")
        run.h = run.ses.add_torrent(atp)
        for peer in options.peers:
            with contextlib.suppress(RuntimeError):
                run.h.connect_peer(_peer_tuple(peer))

        # 1. metadata (a magnet without resume data learns it from peers)
        ti = _wait_metadata(run)
        check_info_names(ti.info_section())
        if _hash_of(ti) and not run.torrent_path.exists():
            with contextlib.suppress(OSError):
                atomic.atomic_write_bytes(run.torrent_path, b"d4:info" + bytes(ti.info_section()) + b"e")

        # 2. what to fetch, what is already in place, and room for it
        sels = run.select(ti)
        auths = run.authorities(ti, sels)
        reused = _reuse_present(run, sels, auths)
        todo = [s for s in sels if not s.reused]
        fs = _files_of(ti)
        prios = [0] * fs.num_files()
        for s in todo:
            prios[s.index] = 4
        have_bytes = sum(min(s.staged.stat().st_blocks * 512, s.size) for s in todo if s.staged.is_file())
        need = sum(s.size for s in todo) - have_bytes
        if need > 0:
            run.staging.mkdir(parents=True, exist_ok=True)
            space.check_free_space(run.staging, need, what=f"the download of {plan.name}")
        run.h.prioritize_files(prios)
        run.h.unset_flags(lt.torrent_flags.default_dont_download)
        _reconnect(run)
        run.ses.apply_settings({"close_redundant_connections": True})  # kept off only while priorities applied

        # 3. download while hashing each file in order
        # stream-hash the files a sha256 vouches for (the hash is checked against it; a torrent
        # authority makes verify read the file anyway, computing the sha256 in the same pass)
        run.hasher = _StreamHasher([(s.rel, s.staged, s.offset, s.size, bool(auths[s.rel].sha256)) for s in todo],
                                   int(ti.piece_length()), int(ti.num_pieces()))
        t_dl0 = time.monotonic()
        downloaded0 = 0
        if todo:
            run.hasher.start()
            downloaded0 = _download(run, todo)
        t_dl1 = time.monotonic()
        st = run.h.status()
        bytes_down = int(st.total_payload_download)
        # complete: no final resume data (a crash from here re-downloads at most the pieces since
        # the last periodic save, and waiting for libtorrent's flush cost up to 2 s)
        _remove_torrent(run)
        if todo:
            run.hasher.mark_all()

        # 4. verify (hashes from the stream), then move into place
        t_v0 = time.monotonic()
        run.hasher.join()
        t_joined = time.monotonic()
        hashed_at = min(run.hasher.hashed_at or t_v0, t_joined)
        t_hash_tail = max(0.0, hashed_at - t_v0)  # hashing left after the last piece arrived
        t_tail_sync = t_joined - t_v0 - t_hash_tail  # fsync of the last file(s)
        known = dict(run.hasher.results)
        for s in todo:  # a stream hash that disagrees with the manifest is re-read, never trusted
            a = auths[s.rel]
            if a.sha256 and known.get(s.rel) not in (None, a.sha256):
                known.pop(s.rel, None)
        for s in todo:
            if s.size == 0 and not s.staged.exists():
                s.staged.parent.mkdir(parents=True, exist_ok=True)
                s.staged.touch()
        vreport = None
        if todo:
            from provision.stages.verify import verify_files

            root = run.staging / (run.src.prefix.rstrip("/") if run.src.prefix else _root_prefix(ti).rstrip("/"))
            note(progress, "fetch", f"verifying {len(todo)} files")
            vreport = verify_files(root, {s.rel: auths[s.rel] for s in todo}, known_sha256=known,
                                   progress=progress)
            vreport.raise_for_failure()
        t_v1 = time.monotonic()
        # verified: from here a SIGINT/SIGTERM waits until the files are in place and then ends
        # the fetch's seeding normally (before, one landing between the moves and the seed made
        # a finished fetch exit 143)
        with _DeferredSignals() as deferred:
            for s in todo:
                _move_into_place(s.staged, safe_join(dest, s.rel, what="file path"),
                                 synced=s.rel in run.hasher.synced)
            if dest.exists():
                atomic.fsync_dir(dest)
            t_mv = time.monotonic()
            with contextlib.suppress(OSError):
                run.resume_path.unlink()
            shutil.rmtree(run.staging, ignore_errors=True)
            with contextlib.suppress(OSError):
                run.staging.parent.rmdir()

            # 5. report (and keep serving for --seed-for)
            files: list[FetchedFile] = []
            vfiles = {f.path: f for f in vreport.files} if vreport is not None else {}
            for s in sels:
                a = auths[s.rel]
                sha = (vfiles[s.rel].sha256 if s.rel in vfiles else None) or known.get(s.rel) or a.sha256
                files.append(FetchedFile(path=s.rel, size=s.size, sha256=sha, authority=a.kind,
                                         downloaded_bytes=0 if s.reused else s.size, reused=s.reused))
            dl_seconds = max(t_dl1 - t_dl0, 1e-9)
            extra: dict[str, Any] = {
                "infohash": run.src.key,
                "btih": _hashes(ti.info_hashes())[0],
                "btmh": _hashes(ti.info_hashes())[1],
                "torrent_name": ti.name(),
                "network": options.network,
                "resumed": run.resumed,
                "bytes_before_resume": downloaded0,
                "hash_failures": run.hash_failures,
                "failed_bytes": int(st.total_failed_bytes),
                "redundant_bytes": int(st.total_redundant_bytes),
                "peers_seen": len(run.peers_ever),
                "peers_max": run.peers_max,
                "start_seconds": round(t_dl0 - t0, 3),
                "download_seconds": round(dl_seconds, 3),
                "close_seconds": round(t_v0 - t_dl1, 3),
                "download_rate": round(bytes_down / dl_seconds, 1) if todo else 0.0,
                "steady_rate": _steady_rate(run.samples),
                "piece_order": run.piece_order,
                "rarest_first_after_seconds": round(run.swarm_at - t_dl0, 3) if run.swarm_at is not None else None,
                "hashed_while_downloading_bytes": run.hasher.bytes_hashed,
                "hash_tail_seconds": round(t_hash_tail, 3),
                "verify_seconds": round(t_v1 - t_joined, 3),
                "post_download_check_seconds": round(t_hash_tail + (t_v1 - t_joined), 3),
                "move_seconds": round(t_tail_sync + (t_mv - t_v1), 3),
                "reused": [s.rel for s in sels if s.reused],
                "verify": vreport.to_dict() if vreport is not None else None,
            }
            if reused:
                note(progress, "fetch", f"{len(reused)} files already in place and verified")
            if options.seed_for > 0:
                scope = _SCOPE.get()
                if scope is not None:  # `provision run`: serve while the later stages run
                    extra["seed"] = scope.start(run.ses, _add_seed_torrent(run, ti, sels, dest), run.settings,
                                                options.seed_for, run.plan.name, progress)
                    run.ses = None  # the scope closes it
                else:
                    extra["seed"] = _seed_after_fetch(run, ti, sels, dest, on_serving=deferred.release)
            return FetchResult(dest=dest, source="torrent", files=files, bytes_downloaded=bytes_down,
                               seconds=time.monotonic() - t0, extra=extra)
    except (KeyboardInterrupt, Interrupted):
        with contextlib.suppress(Exception):
            if run.h is not None and not run.removed:
                run.h.pause()
                run.save_resume_now()
        raise
    finally:
        if run.hasher is not None:
            run.hasher.stop()
        _close_session(run.ses)


class _DeferredSignals:
    """Hold SIGINT/SIGTERM back for a short stretch that must not be cut (the moves into place
    and the start of seeding): the Python handlers are swapped for one that notes the signal,
    and :meth:`release` puts them back and raises a noted signal again, so it lands where the
    caller is ready for it. Python runs signal handlers in the main thread only, so this holds
    whichever thread the kernel delivered the signal to; elsewhere it does nothing."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self.saved: dict[int, Any] = {}

    def __enter__(self) -> _DeferredSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum: int, _frame: Any) -> None:
        if self.pending is None:
            self.pending = signum

    def release(self) -> None:
        saved, self.saved = self.saved, {}
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if saved and self.pending is not None:
            signal.raise_signal(self.pending)

    def __exit__(self, *_exc: object) -> None:
        self.release()


def _steady_rate(samples: Sequence[tuple[float, int, int]]) -> float | None:
    """Bytes/s between 10% and 90% of the download (start-up and tail left out)."""
    if len(samples) < 3:
        return None
    wanted = samples[-1][2] or 1
    mid = [(t, d) for t, d, _ in samples if 0.1 * wanted <= d <= 0.9 * wanted]
    if len(mid) < 2 or mid[-1][0] <= mid[0][0]:
        return None
    return round((mid[-1][1] - mid[0][1]) / (mid[-1][0] - mid[0][0]), 1)


def _close_session(ses: Any) -> None:
    if ses is None:
        return
    with contextlib.suppress(Exception):
        ses.pause()
    with contextlib.suppress(Exception):
        for h in ses.get_torrents():
            ses.remove_torrent(h)
    del ses


def _wait_metadata(run: _Run) -> Any:
    h = run.h
    if h.status().has_metadata:
        return h.torrent_file()
    start = time.monotonic()
    last_note = start
    while True:
        run.pump(100)
        st = h.status()
        run.peers_max = max(run.peers_max, int(st.num_peers))
        if st.has_metadata:
            note(run.progress, "fetch", f"metadata received ({max(len(run.peers_ever), int(st.num_peers))} peers)")
            return h.torrent_file()
        now = time.monotonic()
        if now - start > run.options.metadata_timeout:
            raise run.stall_error("downloading the torrent's metadata", now - start)
        if now - last_note >= 5:
            last_note = now
            _emit(run.progress, ProgressEvent(task="fetch:metadata", done=0, total=None, unit="peers",
                                              description="waiting for metadata",
                                              extra={"peers": int(st.num_peers)}))


def _reconnect(run: _Run) -> None:
    """Peers drop a metadata-only connection ("upload to upload") once we want nothing; now that
    we want files, call them back rather than wait for libtorrent's reconnect back-off (once the
    new priorities apply: until then the torrent counts as finished and skips seeds)."""
    end = time.monotonic() + 5.0
    while not run.prio_applied and time.monotonic() < end:
        run.pump(50)
    peers = set(run.endpoints) | {_peer_tuple(p) for p in run.options.peers}
    if run.src.magnet is not None:
        peers |= {_peer_tuple(p) for p in run.src.magnet.peers}
    for ep in sorted(peers):
        with contextlib.suppress(RuntimeError):
            run.h.connect_peer(ep)
    if run.options.trackers or (run.src.magnet is not None and run.src.magnet.trackers):
        with contextlib.suppress(RuntimeError):
            run.h.force_reannounce()
    if run.options.network == "public":
        with contextlib.suppress(RuntimeError):
            run.h.force_dht_announce()


def _reuse_present(run: _Run, sels: list[_Sel], auths: dict[str, Authority]) -> list[str]:
    """Files the plan found in ``dest`` already: verify them in place and skip the good ones."""
    present = [s for s in sels if s.spec is not None and s.spec.status == "present"]
    if not present:
        present = [s for s in sels if s.spec is None and (run.dest / s.rel).is_file()
                   and (run.dest / s.rel).stat().st_size == s.size]
    if not present:
        return []
    from provision.stages.verify import verify_files

    rep = verify_files(run.dest, {s.rel: auths[s.rel] for s in present}, structure=False,
                       progress=run.progress)
    good = {f.path for f in rep.files if f.status == "ok"}
    for s in present:
        if s.rel in good:
            s.reused = True
    return sorted(good & {s.rel for s in present})


def _download(run: _Run, todo: list[_Sel]) -> int:
    """Run until every selected file is complete; return the bytes that were already there."""
    h = run.h
    opts = run.options
    # wait out libtorrent's check of existing data (resume) before the watchdog starts
    while True:
        run.pump(50)
        st = h.status()
        if st.state not in (lt.torrent_status.states.checking_files, lt.torrent_status.states.checking_resume_data):
            break
    already = max(0, int(st.total_wanted_done) - int(st.total_payload_download))  # on disk before this run
    if already and run.resumed:
        note(run.progress, "fetch", f"{already:,d} bytes already downloaded; fetching the rest")
    run.sync_pieces()  # what resume data or the check found on disk (fenced like the rest)
    last_done = already
    last_progress = time.monotonic()
    last_sync = last_emit = 0.0
    last_recall = time.monotonic()
    while True:
        run.pump(int(POLL_S * 1000))
        now = time.monotonic()
        st = h.status()
        run.peers_max = max(run.peers_max, int(st.num_peers))
        if st.errc and st.errc.value():
            raise FetchError(f"libtorrent reported an error for {run.plan.name}: {st.errc.message()}.",
                             hint="Check the staging folder, then run the same command again to resume.")
        done, wanted = int(st.total_wanted_done), int(st.total_wanted)
        if done > last_done:
            last_done, last_progress = done, now
        if now - last_sync >= 1.0:  # in case an alert was dropped
            run.sync_pieces()
            last_sync = now
        run.fence(now)
        if st.num_peers == 0 and now - last_recall >= 5.0:  # nobody connected: call known peers back
            last_recall = now
            _reconnect(run)
        if now - run.last_resume_save >= RESUME_INTERVAL_S:
            run.request_resume(now)
        if run.piece_order == "sequential" and now - run.last_order_check >= ORDER_CHECK_S:
            run.last_order_check = now
            _leave_sequential_in_a_swarm(run, now)
        if now - last_emit >= PROGRESS_INTERVAL_S or done >= wanted:
            last_emit = now
            run.samples.append((now, done, wanted))
            rate = float(st.download_payload_rate)
            eta = (wanted - done) / rate if rate > 0 else None
            _emit(run.progress, ProgressEvent(
                task="fetch:torrent", done=done, total=wanted, description=f"torrent {run.plan.name}",
                finished=done >= wanted,
                extra={"peers": int(st.num_peers), "rate": f"{rate / 1e6:.1f}MB/s",
                       "eta": f"{eta:.0f}s" if eta is not None else "?"}))
        if done >= wanted and st.state in (lt.torrent_status.states.finished, lt.torrent_status.states.seeding):
            run.drain_fences()
            return already
        if now - last_progress > opts.stall_timeout:
            raise run.stall_error("downloading", now - last_progress)


def _leave_sequential_in_a_swarm(run: _Run, now: float) -> None:
    """In-order pieces suit one source (files hash while still in the page cache) but starve a
    swarm: every member asks the origin for the same next piece, so its uplink carries each
    piece once per member. Once a peer that is itself downloading is connected (another fleet
    member, or any leecher of a public swarm), switch to rarest-first for the rest of the
    download (one way: no flapping), so members fetch different pieces and trade them."""
    try:
        peers = run.h.get_peer_info()
    except RuntimeError:
        return
    leechers = [p for p in peers if not (int(p.flags) & int(lt.peer_info.seed))
                and int(p.connection_type) == int(lt.peer_info.standard_bittorrent)]
    if not leechers:
        return
    run.h.unset_flags(lt.torrent_flags.sequential_download)
    run.piece_order = "rarest-first"
    run.swarm_at = now
    note(run.progress, "fetch", f"{len(leechers)} downloading peers connected: fetching rarest pieces first "
                                "so the swarm shares the work")


def _remove_torrent(run: _Run) -> None:
    """Take the torrent out of the session so its files are closed before they move."""
    if run.h is None or run.removed:
        return
    run.ses.remove_torrent(run.h)
    end = time.monotonic() + REMOVE_TIMEOUT_S
    while not run.removed and time.monotonic() < end:
        run.pump(100)
    run.removed = True


def _move_into_place(src: Path, dst: Path, *, synced: bool = False) -> None:
    """fsync the verified file (unless that was done as it completed) and rename it under its
    final name (copy + rename across filesystems)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not synced:
        fd = os.open(src, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    try:
        os.replace(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        with atomic.atomic_writer(dst) as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 16 << 20)
        os.unlink(src)
    atomic.fsync_dir(dst.parent)


# ---------------------------------------------------------------------------------------
# seeding


def _pieces_within(ti: Any, selected: set[int]) -> list[bool]:
    """Pieces made only of the selected files (and pad files): what a partial copy can serve."""
    fs = _files_of(ti)
    out = []
    for p in range(ti.num_pieces()):
        slices = ti.map_block(p, 0, ti.piece_size(p))
        out.append(all(sl.file_index in selected or _is_pad(fs, sl.file_index) for sl in slices))
    return out


def _serve(ses: Any, h: Any, *, seconds: float | None, stop: threading.Event | None,
           progress: ProgressFn | None, task: str, settings: dict[str, Any],
           on_serving: Callable[[], None] | None = None) -> dict[str, Any]:
    """Serve until ``seconds`` pass, ``stop`` is set, or SIGINT/SIGTERM; return upload facts.
    ``on_serving`` runs first, where a signal already ends the serving normally."""
    start = time.monotonic()
    last_emit = 0.0
    peers_max = 0
    stopped_by = "timeout"
    hash_failures = 0
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
            for a in ses.pop_alerts():
                if isinstance(a, lt.hash_failed_alert):
                    hash_failures += 1
            st = h.status()
            peers_max = max(peers_max, int(st.num_peers))
            if now - last_emit >= 1.0:
                last_emit = now
                _emit(progress, ProgressEvent(
                    task=task, done=int(st.total_payload_upload), total=None,
                    description="seeding (uploaded)",
                    extra={"peers": int(st.num_peers), "rate": f"{st.upload_payload_rate / 1e6:.1f}MB/s"}))
    except (KeyboardInterrupt, Interrupted):
        stopped_by = "signal"
    st = h.status()
    return {"seconds": round(time.monotonic() - start, 3), "uploaded_bytes": int(st.total_payload_upload),
            "peers_max": peers_max, "stopped_by": stopped_by, "listen": _listen_endpoint(ses, settings)}


def _seed_after_fetch(run: _Run, ti: Any, sels: list[_Sel], dest: Path,
                      on_serving: Callable[[], None] | None = None) -> dict[str, Any]:
    """Serve the verified files from ``dest`` for ``--seed-for`` seconds (no re-hash)."""
    h = _add_seed_torrent(run, ti, sels, dest)
    note(run.progress, "fetch", f"seeding {run.plan.name} for {run.options.seed_for:.0f} s "
                                f"on {_listen_endpoint(run.ses, run.settings)}")
    facts = _serve(run.ses, h, seconds=run.options.seed_for, stop=None, progress=run.progress,
                   task="seed:" + run.plan.name, settings=run.settings, on_serving=on_serving)
    run.ses.remove_torrent(h)
    return facts


def _add_seed_torrent(run: _Run, ti: Any, sels: Sequence[_Sel], dest: Path) -> Any:
    """Add the verified files in ``dest`` to ``run.ses`` as a seed (every piece they cover is
    marked had and checked: no re-hash) announcing to the trackers; return the handle."""
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(ti)
    atp.save_path = str(dest)
    fs = _files_of(ti)
    selected = {s.index for s in sels}
    atp.renamed_files = {s.index: s.rel for s in sels}
    atp.file_priorities = [4 if i in selected else 0 for i in range(fs.num_files())]
    have = _pieces_within(ti, selected)
    atp.have_pieces = have
    atp.verified_pieces = have
    atp.flags = (int(atp.flags) & ~int(lt.torrent_flags.paused | lt.torrent_flags.auto_managed)) | _closed_flags(
        run.options.network)
    atp.trackers = list(dict.fromkeys(list(run.options.trackers)
                                      + (list(run.src.magnet.trackers) if run.src.magnet else [])))
    return run.ses.add_torrent(atp)


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
        self.listen = _listen_endpoint(ses, settings)
        self.stop_event = threading.Event()
        self.facts: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="provision-seed", daemon=True)

    def _run(self) -> None:
        try:
            self.facts = _serve(self.ses, self.h, seconds=self.seconds, stop=self.stop_event,
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
                break  # pragma: no cover - _serve checks the event every 200 ms
        facts = dict(self.facts or {})
        if not facts:
            with contextlib.suppress(Exception):
                facts = {"seconds": round(time.monotonic() - self.started, 3),
                         "uploaded_bytes": int(self.h.status().total_payload_upload), "peers_max": 0,
                         "listen": self.listen}
        if stop is not None and facts.get("stopped_by") != "timeout":
            facts["stopped_by"] = stop
        if self.error is not None:
            facts["error"] = str(self.error)
        facts.setdefault("stopped_by", "error" if self.error is not None else "timeout")
        facts["seed_for"] = self.seconds
        facts["name"] = self.name
        self.close()
        return facts

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.stop_event.set()
            self.thread.join(5.0)
            _close_session(self.ses)
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


def seed_verified(plan: Plan, dest: Path, options: TorrentOptions,
                  progress: ProgressFn | None = None) -> dict[str, Any] | None:
    """Serve a model fetched by an earlier run (its fetch stage skipped) in the active
    ``background_seeding()`` scope, so a restarted fleet member still feeds late hosts. Needs the
    torrent's metadata at hand (the manifest's .torrent, or the copy a fetch kept under
    ``torrents/``) and the plan's files in ``dest`` at their torrent sizes (their hashes were
    checked when fetched and are re-checked by ``verify``); otherwise it says why and returns None."""
    scope = _SCOPE.get()
    if scope is None or options.seed_for <= 0:
        return None
    try:
        run = _Run(plan, dest, options, progress)
    except (UsageError, ManifestError):
        return None  # not a BitTorrent source: nothing to seed
    ti = None
    try:
        if run.src.torrent_path is not None:
            ti = _load_torrent_info(run.src.torrent_path)
        elif run.torrent_path.is_file():
            ti = lt.torrent_info(run.torrent_path.read_bytes())
            check_info_names(ti.info_section())
    except (RuntimeError, UsageError, HostileContentError):
        ti = None
    if ti is None or _hash_of(ti) not in (run.src.key, ""):
        note(progress, "fetch", "not seeding: this host has no metadata for the torrent (fetch it again to seed)")
        return None
    try:
        sels = run.select(ti)
    except (NotFoundError, HostileContentError) as e:
        note(progress, "fetch", f"not seeding: {e}")
        return None
    for sel in sels:
        p = dest / sel.rel
        if not p.is_file() or p.stat().st_size != sel.size:
            note(progress, "fetch", f"not seeding: {sel.rel} is missing or not the torrent's size")
            return None
    ses = open_session(run.settings)
    run.ses = ses
    try:
        h = _add_seed_torrent(run, ti, sels, dest)
    except BaseException:
        _close_session(ses)
        raise
    return scope.start(ses, h, run.settings, options.seed_for, plan.name, progress)


_SCOPE: contextvars.ContextVar[BackgroundSeeding | None] = contextvars.ContextVar("provision_seeding",
                                                                                     default=None)


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


@dataclass
class CreatedTorrent:
    data: bytes  # the bencoded .torrent
    name: str
    files: list[tuple[str, int]]  # (path relative to the folder, size)
    btih: str | None
    btmh: str | None
    piece_length: int
    version: str
    trackers: tuple[str, ...]
    web_seeds: tuple[str, ...]
    seconds: float

    @property
    def total_size(self) -> int:
        return sum(s for _, s in self.files)

    def info(self) -> Any:
        return lt.torrent_info(self.data)


def _folder_files(folder: Path) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            p = Path(dirpath) / fn
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink():
                raise UsageError(f"Refusing to seed {rel}: it is a symlink.", hint="Seed a folder of regular files.",
                                 path=rel)
            if p.is_file():
                out.append((rel, p.stat().st_size))
    return sorted(out)


def _check_url(url: str, what: str, schemes: tuple[str, ...]) -> str:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    if u.scheme not in schemes or not u.netloc:
        raise UsageError(f"Malformed {what} {url!r} (expected {' or '.join(s + '://…' for s in schemes)}).")
    return url


def create_torrent(folder: Path, *, files: Sequence[tuple[str, int]] | None = None, version: str = "hybrid",
                   name: str | None = None, trackers: Sequence[str] = (), web_seeds: Sequence[str] = (),
                   piece_length: int = 0, progress: ProgressFn | None = None) -> CreatedTorrent:
    """Hash ``folder`` (or the listed ``files`` in it) into a torrent named ``name`` (default the
    folder's name). Never private (the private flag turns PEX off). BEP 19 web seeds: a client
    asks ``web_seed + name + "/" + path``, so for a Hub repo name the torrent after the commit
    and pass ``https://huggingface.co/REPO/resolve/``."""
    t0 = time.monotonic()
    folder = Path(folder)
    if version not in TORRENT_VERSIONS:
        raise UsageError(f"--torrent-version must be one of {', '.join(TORRENT_VERSIONS)}, got {version!r}.")
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder.", hint="Pass the verified model folder to seed.")
    for t in trackers:
        _check_url(t, "tracker URL", ("http", "https", "udp"))
    for w in web_seeds:
        _check_url(w, "web seed URL", ("http", "https"))
    listing = list(files) if files is not None else _folder_files(folder)
    if not listing:
        raise UsageError(f"{folder} has no files to seed.")
    for rel, size in listing:
        safe_join(folder, rel, what="file path")
        p = folder / rel
        if not p.is_file():
            raise UsageError(f"Cannot seed {rel}: not found in {folder}.", hint="Fetch and verify the model first.",
                             path=rel)
        if p.stat().st_size != size:
            raise UsageError(f"Cannot seed {rel}: it is {p.stat().st_size:,d} bytes, expected {size:,d}.",
                             hint="Verify the folder (provision verify) before seeding it.", path=rel)
    tname = name or folder.resolve().name
    _check_component(tname, "torrent name")
    flags = {"hybrid": 0, "v1": lt.create_torrent.v1_only, "v2": lt.create_torrent.v2_only}[version]
    entries = [lt.create_file_entry(f"{tname}/{rel}", size) for rel, size in listing]
    ct = lt.create_torrent(entries, piece_length, flags)
    ct.set_creator(f"provision {__version__}")
    for tier, t in enumerate(trackers):
        ct.add_tracker(t, tier)
    for w in web_seeds:
        ct.add_url_seed(w)
    total = ct.num_pieces()
    done = [0]
    last = [0.0]

    def tick(piece: int) -> None:
        done[0] += 1
        now = time.monotonic()
        if progress is not None and (now - last[0] >= PROGRESS_INTERVAL_S or done[0] == total):
            last[0] = now
            progress(ProgressEvent(task="seed:hash", done=done[0], total=total, unit="pieces",
                                   description=f"hashing {tname}", finished=done[0] == total))

    with tempfile.TemporaryDirectory(prefix="provision-seed-") as tmp:
        if tname == folder.resolve().name:
            base = str(folder.resolve().parent)
        else:  # hash through a link so the torrent's root folder name can differ from the folder's
            os.symlink(folder.resolve(), Path(tmp) / tname)
            base = tmp
        try:
            lt.set_piece_hashes(ct, base, tick)
        except RuntimeError as e:
            raise UsageError(f"Cannot hash {folder}: {e}.") from None
    data = bytes(lt.bencode(ct.generate()))
    ti = lt.torrent_info(data)
    btih, btmh = _hashes(ti.info_hashes())
    return CreatedTorrent(data=data, name=tname, files=[(r, s) for r, s in listing], btih=btih, btmh=btmh,
                          piece_length=int(ti.piece_length()), version=version, trackers=tuple(trackers),
                          web_seeds=tuple(web_seeds), seconds=time.monotonic() - t0)


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


def _seed_name_and_files(folder: Path, manifest: Any, web_seeds: Sequence[str]) -> tuple[str | None, list[tuple[str, int]] | None]:
    """Torrent name and file list from a manifest: named after the Hub commit when web-seeding
    (so web seed + name + path is the resolve URL), after the torrent prefix's root otherwise."""
    if manifest is None:
        return None, None
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


def seed(
    folder: Path,
    *,
    manifest: Any = None,
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
    progress: ProgressFn | None = None,
    stop: threading.Event | None = None,
    on_ready: Callable[[SeedInfo], None] | None = None,
) -> SeedResult:
    """Create a torrent of ``folder`` and serve it in seed mode (no re-hash) until ``seed_for``
    seconds pass (``None``: until ``stop`` is set or SIGINT/SIGTERM; ``0``: write the outputs and
    return without serving). The .torrent, magnet and whitelist are written, and ``on_ready`` is
    called, before serving starts. SIGINT/SIGTERM end the seed normally (``stopped_by="signal"``).

    Usable from a background thread: pass ``stop`` and read the magnet in ``on_ready``.

    ``upload_slots``: how many peers are served at once (0: libtorrent's 8). A fleet's origin
    does best with 2: each member it serves gets a large share and fetches pieces the others
    lack, and the members trade the rest (measured, 4 members: the origin uploaded 1.08-1.10x
    the model with 2 slots, 1.21-1.36x with 8).
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
        ti = made.info()
        fs = _files_of(ti)
        root = _root_prefix(ti)
        atp = lt.add_torrent_params()
        atp.ti = ti
        atp.save_path = str(folder.resolve())
        atp.renamed_files = {i: fs.file_path(i).replace("\\", "/")[len(root):] for i in range(fs.num_files())
                             if not _is_pad(fs, i)}
        n = ti.num_pieces()
        atp.verified_pieces = [True] * n  # hashed a moment ago: seed mode without lazy re-hashing
        atp.flags = ((int(atp.flags) & ~int(lt.torrent_flags.paused | lt.torrent_flags.auto_managed))
                     | int(lt.torrent_flags.seed_mode) | _closed_flags(network))
        h = ses.add_torrent(atp)
        endpoint = _listen_endpoint(ses, settings)
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
            if magnet_out is not None:  # last: a script waiting for it finds the others written
                atomic.atomic_write_text(Path(magnet_out), magnet + "\n")
            if on_ready is not None:
                on_ready(info)
            if seed_for is None or seed_for > 0:
                facts = _serve(ses, h, seconds=seed_for, stop=stop, progress=progress, task="seed:" + made.name,
                               settings=settings)
        except (KeyboardInterrupt, Interrupted):
            facts = {"uploaded_bytes": int(h.status().total_payload_upload), "peers_max": 0, "stopped_by": "signal"}
        return SeedResult(info=info, files=made.files, total_size=made.total_size, piece_length=made.piece_length,
                          version=version, hash_seconds=made.seconds, seconds=time.monotonic() - t0,
                          uploaded_bytes=int(facts["uploaded_bytes"]), peers_max=int(facts["peers_max"]),
                          stopped_by=str(facts["stopped_by"]), trackers=list(trackers), web_seeds=list(web_seeds))
    finally:
        _close_session(ses)


# ---------------------------------------------------------------------------------------
# metadata only


def magnet_listing(magnet: Magnet | str, *, timeout: float = 30.0, network: str = "public",
                   peers: Sequence[str] = (), listen: str | None = None) -> list[tuple[str, int, None]]:
    """The file list of a bare magnet, learnt from its peers (x.pe, trackers, DHT in public mode).

    Downloads nothing but the metadata (files are set to "don't download" before the torrent
    starts, in a throw-away folder). Hostile names: ``HostileContentError``; nobody answers in
    ``timeout`` seconds: ``StallError`` (exit 4).
    """
    m = parse_magnet(magnet) if isinstance(magnet, str) else magnet
    settings = session_settings(network, listen=listen)
    ses = open_session(settings)
    with tempfile.TemporaryDirectory(prefix="provision-meta-") as tmp:
        try:
            atp = lt.parse_magnet_uri(m.uri)
            atp.save_path = tmp
            atp.peers = list(atp.peers) + [_peer_tuple(p) for p in peers]
            atp.flags = ((int(atp.flags) & ~int(lt.torrent_flags.paused | lt.torrent_flags.auto_managed))
                         | int(lt.torrent_flags.default_dont_download) | int(lt.torrent_flags.upload_mode)
                         | _closed_flags(network))
            h = ses.add_torrent(atp)
            start = time.monotonic()
            seen = 0
            while True:
                ses.wait_for_alert(100)
                ses.pop_alerts()
                st = h.status()
                seen = max(seen, int(st.num_peers))
                if st.has_metadata:
                    break
                if time.monotonic() - start > timeout:
                    who = "No peers found" if seen == 0 else f"No metadata from {seen} peers"
                    raise StallError(f"{who} for {m.describe()} in {timeout:.0f} s.",
                                     hint="Check the magnet's trackers and x.pe peers, or use --network public.",
                                     infohash=m.infohash, peers=seen)
            check_info_names(h.torrent_file().info_section())
            meta = _meta_from_info(h.torrent_file())
            return [(p, s, None) for p, s in meta.files]
        finally:
            _close_session(ses)

