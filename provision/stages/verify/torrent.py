"""Torrent authorities for files already on disk: find the info dictionary that vouches for them.

A torrent's info dictionary authenticates each of its files by piece: v1 SHA-1 piece hashes (its
infohash, the btih, is the SHA-1 of the dictionary) and v2 SHA-256 merkle roots (the btmh, its
SHA-256). Unlike a whole-file sha256, pieces can be checked on every core, a single 25 GB file
included. ``find_torrent`` looks for the dictionary a model's sources name, in this order: the
``.torrent`` the caller passed, the one a manifest's torrent source names beside the manifest,
and the copy a fetch kept in the store (``torrents/<infohash>.torrent``); it is used only when its
infohash is the one the manifest or magnet pins (a store copy that does not match is skipped, an
the one the caller passed that does not match is a ``VerifyError``). ``with_torrent`` then turns each file's
authority into the torrent's (v2 merkle root when the torrent has one, else the v1 pieces when
the file starts on a piece boundary and owns its pieces), keeping a pinned sha256 to compare
when a fetcher already knows the file's digest. It reads only ``.torrent`` files; the hashing is
``parallel``'s.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provision.errors import ProvisionError, VerifyError
from provision.stages.verify.authority import Authority

if TYPE_CHECKING:
    from provision.formats.manifest import Manifest
    from provision.formats.sources import Magnet


@dataclass
class TorrentRef:
    """A torrent info dictionary trusted for a verification, and why it is trusted."""

    path: Path
    info: Any  # libtorrent.torrent_info, its file names already checked
    chain: str  # what pins it: "btih <hex>", "btmh <hex>", "the torrent file given", "manifest torrent file"
    prefix: str = ""  # the files' folder inside the torrent ("" = the torrent's root folder)
    btih: str | None = None
    btmh: str | None = None
    notes: list[str] = field(default_factory=list)  # store copies skipped, and why

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"torrent": str(self.path), "chain": self.chain, "btih": self.btih, "btmh": self.btmh}
        if self.notes:
            d["notes"] = list(self.notes)
        return d


def _load(path: Path) -> tuple[Any, str | None, str | None]:
    from provision.stages.fetch.torrent.meta import info_hashes, load_torrent_info

    ti = load_torrent_info(path)
    btih, btmh = info_hashes(ti.info_hashes())
    return ti, btih, btmh


def _pins(manifest: Manifest | None, magnet: Magnet | None) -> tuple[str | None, str | None, str, str | None]:
    """(btih, btmh, prefix, the manifest's torrent file name) the sources pin; a contradiction is a VerifyError."""
    from provision.formats.sources import parse_magnet

    magnets = [magnet] if magnet is not None else []
    prefix, tname = "", None
    src = manifest.source("torrent") if manifest is not None else None
    if src is not None:
        prefix, tname = src.prefix or "", src.torrent
        if src.magnet:
            try:
                magnets.append(parse_magnet(src.magnet))
            except ProvisionError:
                pass  # a malformed magnet pins nothing (the manifest loader reports it)
    btih: str | None = None
    btmh: str | None = None
    for m in magnets:
        for want, have in ((m.btih, btih), (m.btmh, btmh)):
            if want and have and want != have:
                raise VerifyError("The manifest and the source name different torrents "
                                  f"({have} and {want}).", hint="Fix the manifest's torrent source.")
        btih, btmh = btih or m.btih, btmh or m.btmh
    return btih, btmh, prefix, tname


def find_torrent(manifest: Manifest | None = None, home: Path | None = None, *, magnet: Magnet | None = None,
                 torrent_file: Path | None = None) -> TorrentRef | None:
    """The info dictionary that vouches for a model's files (see the module docstring), or None."""
    btih, btmh, prefix, tname = _pins(manifest, magnet)
    candidates: list[tuple[Path, str, bool]] = []  # (path, chain when nothing pins it, explicit)
    if torrent_file is not None:
        candidates.append((Path(torrent_file), "the torrent file given", True))
    if tname and manifest is not None and manifest.path is not None:
        candidates.append((manifest.path.parent / tname, "manifest torrent file", False))
    if home is not None:
        for key in (btih, btmh):
            if key:
                candidates.append((Path(home) / "torrents" / f"{key}.torrent", "", False))
    notes: list[str] = []
    for path, chain, explicit in candidates:
        if not explicit and not path.is_file():
            continue
        try:
            ti, ih1, ih2 = _load(path)
        except ProvisionError as e:
            if explicit:
                raise VerifyError(f"Cannot use torrent {path} as the authority: {e.message}", path=str(path)) from None
            notes.append(f"{path}: unreadable, skipped")
            continue
        bad = (btih and ih1 != btih) or (btmh and ih2 != btmh)
        if bad:
            what = f"btih {btih}" if btih and ih1 != btih else f"btmh {btmh}"
            if explicit:
                raise VerifyError(f"Torrent {path} is not the one the sources pin ({what}).",
                                  hint="Pass the .torrent of the manifest's magnet.", path=str(path))
            notes.append(f"{path}: not the pinned {what}, skipped")
            continue
        if btih and ih1 == btih:
            chain = f"btih {btih}"
        elif btmh and ih2 == btmh:
            chain = f"btmh {btmh}"
        return TorrentRef(path=path, info=ti, chain=chain, prefix=prefix, btih=ih1, btmh=ih2, notes=notes)
    return None


def torrent_files(ref: TorrentRef) -> dict[str, tuple[int, int]]:
    """``{path relative to the model folder: (file index, size)}`` of the torrent's files under its prefix."""
    from provision.io.paths import safe_relpath
    from provision.stages.fetch.torrent.meta import files_of, is_pad, root_prefix

    ti = ref.info
    fs = files_of(ti)
    strip = ref.prefix or root_prefix(ti)
    out: dict[str, tuple[int, int]] = {}
    for i in range(fs.num_files()):
        if is_pad(fs, i):
            continue
        full = fs.file_path(i).replace("\\", "/")
        if strip and not full.startswith(strip):
            continue
        out[str(safe_relpath(full[len(strip):], what="file name in the torrent"))] = (i, int(fs.file_size(i)))
    return out


def torrent_authority(ref: TorrentRef, index: int, size: int, sha256: str | None = None) -> Authority | None:
    """The torrent's authority over file ``index``: the v2 merkle root, else the v1 pieces when the
    file starts on a piece boundary and no other file shares its pieces; None when neither holds."""
    from provision.stages.fetch.torrent.meta import files_of, is_pad

    ti = ref.info
    fs = files_of(ti)
    if size <= 0:
        return None
    if ti.info_hashes().has_v2():
        return Authority(kind="torrent-v2-merkle", size=size, sha256=sha256,
                         merkle_root=bytes(fs.root(index).to_bytes()))
    pl = int(ti.piece_length())
    off = int(fs.file_offset(index))
    end = off + size
    nxt = index + 1
    owns_tail = end % pl == 0 or nxt >= fs.num_files() or is_pad(fs, nxt) or end == ti.total_size()
    if off % pl or not owns_tail:
        return None
    pieces = tuple(bytes(ti.hash_for_piece(p)) for p in range(off // pl, (end - 1) // pl + 1))
    return Authority(kind="torrent-v1-pieces", size=size, sha256=sha256, piece_length=pl, piece_hashes=pieces)


def with_torrent(base: Mapping[str, Authority], ref: TorrentRef | None, *, skip: Collection[str] = (),
                 add_missing: bool = False) -> dict[str, Authority]:
    """``base`` with each file the torrent holds under the torrent's authority (its size must agree
    with ``base``'s; a pinned sha256 is kept, compared only when a fetcher knows the digest). Files
    in ``skip`` (digest already known: nothing to read) keep their authority; ``add_missing`` adds
    the torrent's files ``base`` lacks (the torrent is the listing)."""
    out = dict(base)
    if ref is None:
        return out
    files = torrent_files(ref)
    for rel, (idx, size) in files.items():
        a = base.get(rel)
        if rel in skip or (a is None and not add_missing) or (a is not None and a.size not in (None, size)):
            continue
        t = torrent_authority(ref, idx, size, a.sha256 if a is not None else None)
        if t is not None:
            out[rel] = t
        elif a is None:
            out[rel] = Authority(kind="torrent-v1-pieces", size=size)  # shares pieces: its size is checked
    return out
