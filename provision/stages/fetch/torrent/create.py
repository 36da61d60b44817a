"""Making a torrent of a verified folder: hybrid v1+v2, v1 or v2, never private (the private
flag turns PEX off), with trackers and BEP 19 web seeds, its pieces hashed by libtorrent.

It only builds the bencoded .torrent (``CreatedTorrent``); writing it out and serving it is
``seed``'s job.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args
from urllib.parse import urlsplit

import libtorrent as lt

from provision.errors import UsageError
from provision.io.paths import safe_join
from provision.progress import ProgressEvent, ProgressFn
from provision.stages.fetch.torrent.meta import check_component, info_hashes
from provision.version import __version__

TorrentVersion = Literal["hybrid", "v1", "v2"]
TORRENT_VERSIONS: tuple[TorrentVersion, ...] = get_args(TorrentVersion)
PROGRESS_INTERVAL_S = 0.5


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


def folder_files(folder: Path) -> list[tuple[str, int]]:
    """(relative path, size) of every regular file under ``folder``, hidden ones left out;
    a symlink is refused (exit 2)."""
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
    u = urlsplit(url)
    if u.scheme not in schemes or not u.netloc:
        raise UsageError(f"Malformed {what} {url!r} (expected {' or '.join(s + '://…' for s in schemes)}).")
    return url


def _check_listing(folder: Path, listing: Sequence[tuple[str, int]]) -> None:
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
    listing = list(files) if files is not None else folder_files(folder)
    _check_listing(folder, listing)
    tname = name or folder.resolve().name
    check_component(tname, "torrent name")
    flags = {"hybrid": 0, "v1": lt.create_torrent.v1_only, "v2": lt.create_torrent.v2_only}[
        cast(TorrentVersion, version)]
    ct = lt.create_torrent([lt.create_file_entry(f"{tname}/{rel}", size) for rel, size in listing],
                           piece_length, flags)
    ct.set_creator(f"provision {__version__}")
    for tier, t in enumerate(trackers):
        ct.add_tracker(t, tier)
    for w in web_seeds:
        ct.add_url_seed(w)
    _hash_pieces(ct, folder, tname, progress)
    data = bytes(lt.bencode(ct.generate()))
    ti = lt.torrent_info(data)
    btih, btmh = info_hashes(ti.info_hashes())
    return CreatedTorrent(data=data, name=tname, files=list(listing), btih=btih, btmh=btmh,
                          piece_length=int(ti.piece_length()), version=version, trackers=tuple(trackers),
                          web_seeds=tuple(web_seeds), seconds=time.monotonic() - t0)


def _hash_pieces(ct: Any, folder: Path, tname: str, progress: ProgressFn | None) -> None:
    total = ct.num_pieces()
    done = 0
    last = 0.0

    def tick(_piece: int) -> None:
        nonlocal done, last
        done += 1
        now = time.monotonic()
        if progress is not None and (now - last >= PROGRESS_INTERVAL_S or done == total):
            last = now
            progress(ProgressEvent(task="seed:hash", done=done, total=total, unit="pieces",
                                   description=f"hashing {tname}", finished=done == total))

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
