"""What a torrent contains: ``.torrent`` files read offline, a bare magnet's file list learnt
from peers, and the name checks that refuse hostile paths before anything is written.

``read_torrent_file`` / ``TorrentMeta`` serve ``plan``; ``check_info_names`` refuses a raw info
dictionary naming ``..``, ``/``, ``\\``, NUL or an empty/absolute component (libtorrent would
silently rename it; we refuse instead); the small helpers map libtorrent's file storage to
paths under the torrent's root folder. Nothing here downloads file data or decides which files
a fetch wants.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libtorrent as lt

from provision.errors import HostileContentError, StallError, UsageError
from provision.formats.sources import Magnet, parse_magnet, parse_peer
from provision.io.paths import safe_relpath
from provision.stages.fetch.torrent.session import (
    NOT_STARTED,
    close_session,
    closed_flags,
    open_session,
    session_settings,
)


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
    return meta_from_info(load_torrent_info(Path(path)))


def load_torrent_info(path: Path) -> Any:
    """The ``lt.torrent_info`` of a .torrent file, its names checked; exit 2 when unreadable."""
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


NAME_MAX = 255  # bytes in one path component (Linux filesystems)
PATH_MAX = 4096  # bytes in a whole path (Linux)
PATH_RESERVE = 512  # of PATH_MAX, kept for the destination or staging folder the torrent's paths go under
MAX_RELPATH = PATH_MAX - PATH_RESERVE  # the longest path inside a torrent we accept, in bytes


def check_component(part: str, what: str) -> None:
    """Refuse one path component that is empty, ``.``/``..``, has a separator or NUL, a drive, or is
    longer than ``NAME_MAX`` bytes (no filesystem could create it)."""
    if part in ("", ".", "..") or "/" in part or "\\" in part or "\x00" in part or (len(part) > 1 and part[1] == ":"):
        raise HostileContentError(
            f"Refusing the torrent: the {what} {part!r} would leave the destination folder or is not a plain name.",
            hint="Do not use this torrent; ask its publisher for a clean one.", path=part)
    if len(part.encode("utf-8")) > NAME_MAX:
        raise HostileContentError(
            f"Refusing the torrent: a {what} is {len(part.encode('utf-8'))} bytes long, over the {NAME_MAX}-byte "
            f"limit of a file name ({part[:40]!r}...).",
            hint="Do not use this torrent; ask its publisher for one with shorter names.", path=part[:200])


def check_path_length(parts: Sequence[str]) -> None:
    """Refuse a path inside the torrent longer than ``MAX_RELPATH`` bytes (with the folder it goes
    under it would pass ``PATH_MAX``, and no file could be created there)."""
    rel = "/".join(parts)
    if len(rel.encode("utf-8")) > MAX_RELPATH:
        raise HostileContentError(
            f"Refusing the torrent: a file path is {len(rel.encode('utf-8'))} bytes long, over the {MAX_RELPATH}-byte "
            f"limit ({PATH_MAX} for a whole path, {PATH_RESERVE} kept for the destination) ({rel[:40]!r}...).",
            hint="Do not use this torrent; ask its publisher for one with shorter paths.", path=rel[:200])


def check_info_names(info_section: bytes) -> None:
    """Refuse a torrent whose raw info dictionary names a path with ``..``, ``/``, ``\\``, NUL
    or an absolute/empty component (libtorrent would silently rename it; we refuse instead)."""
    info: Any = lt.bdecode(bytes(info_section))
    if not isinstance(info, dict):
        raise HostileContentError("Refusing the torrent: its info dictionary is malformed.")
    root = ""
    for key in (b"name", b"name.utf-8"):
        if key in info:
            root = _str_part(info[key], "torrent name")
            check_component(root, "torrent name")
    for f in info.get(b"files") or []:
        if not isinstance(f, dict):
            raise HostileContentError("Refusing the torrent: a file entry is malformed.")
        for key in (b"path", b"path.utf-8"):
            if key in f:
                parts = f[key]
                if not isinstance(parts, list) or not parts:
                    raise HostileContentError("Refusing the torrent: a file path is empty or malformed.")
                names = [_str_part(p, "file name") for p in parts]
                for n in names:
                    check_component(n, "file name")
                check_path_length([root, *names])
    if b"file tree" in info:
        _check_file_tree(info[b"file tree"], 0, (root,))


def _check_file_tree(tree: Any, depth: int, above: tuple[str, ...]) -> None:
    if depth > 64 or not isinstance(tree, dict) or not tree:
        raise HostileContentError("Refusing the torrent: its v2 file tree is malformed.")
    if b"" in tree:  # a file node: {"": {"length": ...}} and nothing else, never the root
        if depth == 0 or len(tree) != 1:
            raise HostileContentError("Refusing the torrent: its v2 file tree has an empty file name.")
        check_path_length(above)  # the file's whole path: its folders and its own name
        return
    for k, v in tree.items():
        name = _str_part(k, "file name")
        check_component(name, "file name")
        _check_file_tree(v, depth + 1, (*above, name))


def files_of(ti: Any) -> Any:
    """The torrent's file storage (``layout()`` where the bindings have it)."""
    return ti.layout() if hasattr(ti, "layout") else ti.files()


def is_pad(fs: Any, i: int) -> bool:
    return bool(fs.file_flags(i) & fs.flag_pad_file)


def root_prefix(ti: Any) -> str:
    """``name/`` for a multi-file torrent, ``""`` for a single-file one."""
    fs = files_of(ti)
    name = ti.name()
    for i in range(fs.num_files()):
        if not is_pad(fs, i):
            return name + "/" if fs.file_path(i).replace("\\", "/").startswith(name + "/") else ""
    return name + "/"


def meta_from_info(ti: Any) -> TorrentMeta:
    fs = files_of(ti)
    root = root_prefix(ti)
    files = []
    for i in range(fs.num_files()):
        if is_pad(fs, i):
            continue
        p = fs.file_path(i).replace("\\", "/")
        rel = p[len(root):] if root and p.startswith(root) else p
        safe_relpath(rel, what="file name in the torrent")
        files.append((rel, int(fs.file_size(i))))
    btih, btmh = info_hashes(ti.info_hashes())
    return TorrentMeta(name=ti.name(), files=tuple(files), btih=btih, btmh=btmh, piece_length=ti.piece_length(),
                       total_size=sum(s for _, s in files))


def info_hashes(ih: Any) -> tuple[str | None, str | None]:
    """(v1 btih, v2 btmh) of libtorrent's ``info_hash_t``, None for a version it lacks."""
    return (str(ih.v1) if ih.has_v1() else None, str(ih.v2) if ih.has_v2() else None)


def hash_of(ti: Any) -> str:
    """The id a torrent is kept under: its v1 hash when it has one, else its v2 hash."""
    btih, btmh = info_hashes(ti.info_hashes())
    return btih or btmh or ""


def whitelist_lines(btih: str | None, btmh: str | None) -> list[str]:
    """opentracker whitelist entries: 40 hex each; a v2 hash is truncated to its first 20 bytes."""
    out = [h for h in (btih, btmh[:40] if btmh else None) if h]
    return list(dict.fromkeys(out))


def magnet_listing(magnet: Magnet | str, *, timeout: float = 30.0, network: str = "public",
                   peers: Sequence[str] = (), listen: str | None = None) -> list[tuple[str, int, None]]:
    """The file list of a bare magnet, learnt from its peers (x.pe, trackers, DHT in public mode).

    Downloads nothing but the metadata (files are set to "don't download" before the torrent
    starts, in a throw-away folder). Hostile names: ``HostileContentError``; nobody answers in
    ``timeout`` seconds: ``StallError`` (exit 4).
    """
    m = parse_magnet(magnet) if isinstance(magnet, str) else magnet
    ses = open_session(session_settings(network, listen=listen))
    with tempfile.TemporaryDirectory(prefix="provision-meta-") as tmp:
        try:
            atp = lt.parse_magnet_uri(m.uri)
            atp.save_path = tmp
            atp.peers = list(atp.peers) + [parse_peer(p) for p in peers]
            atp.flags = ((int(atp.flags) & ~int(NOT_STARTED)) | int(lt.torrent_flags.default_dont_download)
                         | int(lt.torrent_flags.upload_mode) | closed_flags(network))
            h = ses.add_torrent(atp)
            _wait_for_metadata(ses, h, m, timeout)
            check_info_names(h.torrent_file().info_section())
            meta = meta_from_info(h.torrent_file())
            return [(p, s, None) for p, s in meta.files]
        finally:
            close_session(ses)


def _wait_for_metadata(ses: Any, h: Any, m: Magnet, timeout: float) -> None:
    start = time.monotonic()
    seen = 0
    while True:
        ses.wait_for_alert(100)
        ses.pop_alerts()
        st = h.status()
        seen = max(seen, int(st.num_peers))
        if st.has_metadata:
            return
        if time.monotonic() - start > timeout:
            who = "No peers found" if seen == 0 else f"No metadata from {seen} peers"
            raise StallError(f"{who} for {m.describe()} in {timeout:.0f} s.",
                             hint="Check the magnet's trackers and x.pe peers, or use --network public.",
                             infohash=m.infohash, peers=seen)
