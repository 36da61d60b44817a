"""What a Hub download shows ``provision run``'s overlapped conversion: the same face a torrent's
``StreamHasher`` shows it (``files``, ``pl``, ``have``, ``cond``, ``stopped``), over the partial files.

The Hub has no pieces, so ``HubStream`` makes them up: each file gets its own run of
``PIECE_BYTES`` pieces (a file starts on a piece boundary, at a "virtual offset"), and a piece is
``have`` once the download's written prefix covers it (the partial is flushed first, so a reader
of the file sees those bytes). Those bytes are not verified: the whole-file sha256, checked by
the fetch and the pipeline's verify, gates the commit of anything converted from them (``Gate``).

Each file's bytes are reached through a hard link in ``staging/<model>/overlap-hub-<pid>/``
(made when the download opens its partial, or to the verified copy already in place), because
the partial's name moves (to the verify folder, then into place) but its inode does not. A
download that starts a file over (the server refused the range, or a resumed file failed
verification and is fetched again) writes a new inode: the stream is ``stopped`` and the
conversion reading the old bytes is discarded (the pipeline converts after the fetch).
It never downloads, verifies or moves a file; ``fetch_hub`` drives it and removes the links when
it ends.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from provision.io.paths import safe_join

PIECE_BYTES = 4 << 20
MIRROR_PREFIX = "overlap-hub-"  # ``stages.overlap.clean_views`` removes what a killed run left ("overlap-")


@dataclass(frozen=True)
class HubStreamFile:
    """One file as the overlapped conversion sees it: its link and its place among the pieces."""

    rel: str
    path: Path
    offset: int  # virtual, piece-aligned
    size: int


class HubStream:
    """The Hub download's progress as verified-looking pieces (see the module docstring)."""

    def __init__(self, staging: Path, files: Sequence[tuple[str, int, Path | None]],
                 piece_length: int = PIECE_BYTES, sha256: Mapping[str, str] | None = None) -> None:
        """``files``: (path, size, the verified copy already in place or None) in any order;
        ``sha256``: the digests the fetch will hold each file to (a manifest's or the Hub's LFS sha256)."""
        self.pl = piece_length
        self.sha256 = dict(sha256 or {})  # the conversion writes them into its headers at once
        self.mirror = staging / f"{MIRROR_PREFIX}{os.getpid()}"
        self.cond = threading.Condition()
        self.stopped = False
        self.restarted: set[str] = set()  # files whose bytes started over: what was read is stale
        self.files: list[HubStreamFile] = []
        self._by_rel: dict[str, HubStreamFile] = {}
        self._inode: dict[str, int] = {}
        offset = 0
        for rel, size, _ in files:
            f = HubStreamFile(rel, safe_join(self.mirror, rel), offset, size)
            self.files.append(f)
            self._by_rel[rel] = f
            offset += max(1, -(-size // self.pl)) * self.pl
        self.have = bytearray(offset // self.pl)
        shutil.rmtree(self.mirror, ignore_errors=True)
        for rel, size, present in files:
            if present is not None:  # already in place and verified: every piece is there
                self.begin(rel, present, size)
        if self.stopped:
            raise OSError(f"cannot link the files in place into {self.mirror}")

    def _pieces(self, f: HubStreamFile, upto: int) -> range:
        """``f``'s pieces wholly inside its first ``upto`` bytes (all of them once it is complete)."""
        first = f.offset // self.pl
        n = max(1, -(-f.size // self.pl)) if upto >= f.size else upto // self.pl
        return range(first, first + n)

    def begin(self, rel: str, part: Path, offset: int) -> None:
        """The download opened ``rel``'s partial at ``part`` with ``offset`` bytes kept: link it, mark them.
        The same file opened again under another inode is a start-over (``restart``)."""
        f = self._by_rel.get(rel)
        if f is None:
            return
        with self.cond:
            try:
                ino = part.stat().st_ino
                if self._inode.get(rel, ino) != ino:
                    self._restart(rel)
                self._inode[rel] = ino
                f.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = f.path.with_name(f.path.name + ".link")
                tmp.unlink(missing_ok=True)
                os.link(part, tmp)
                tmp.replace(f.path)  # the reader never sees a missing name once it existed
            except OSError:  # no link here (the download goes on): the conversion waits for the fetch
                self.stopped = True
                self.cond.notify_all()
                return
            self._mark(f, offset)

    def advance(self, rel: str, written: int) -> None:
        """``rel``'s partial holds (flushed) its first ``written`` bytes."""
        f = self._by_rel.get(rel)
        if f is not None:
            with self.cond:
                self._mark(f, written)

    def restart(self, rel: str) -> None:
        """``rel`` is downloaded again from byte 0: bytes read from it so far may be replaced."""
        with self.cond:
            self._restart(rel)

    def _restart(self, rel: str) -> None:
        self.restarted.add(rel)
        self.stopped = True
        self.cond.notify_all()

    def _mark(self, f: HubStreamFile, upto: int) -> None:
        for p in self._pieces(f, upto):
            self.have[p] = 1
        self.cond.notify_all()

    def stop(self) -> None:
        """The fetch ended (done or failed): no more bytes come; the links go (readers hold their own)."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        shutil.rmtree(self.mirror, ignore_errors=True)


def open_stream(staging: Path, files: Sequence[tuple[str, int, Path | None]],
                sha256: Mapping[str, str] | None = None) -> HubStream | None:
    """A ``HubStream``, or None where hard links cannot be made (another filesystem, no support)."""
    try:
        return HubStream(staging, files, sha256=sha256)
    except OSError:
        shutil.rmtree(staging / f"{MIRROR_PREFIX}{os.getpid()}", ignore_errors=True)
        return None
