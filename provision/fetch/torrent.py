"""BitTorrent through libtorrent: the only module that imports it.

Today: reading a .torrent file offline (name, files, infohashes) for ``plan``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from provision.errors import ManifestError, UsageError
from provision.fsutil import safe_relpath


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
    import libtorrent as lt

    try:
        ti = lt.torrent_info(str(path))
    except RuntimeError as e:
        raise UsageError(f"Cannot read torrent file {path}: {e}.") from None
    except OSError as e:  # pragma: no cover
        raise ManifestError(f"Cannot read torrent file {path}: {e}.") from None
    return _meta_from_info(ti)


def _meta_from_info(ti: object) -> TorrentMeta:
    import libtorrent as lt

    assert isinstance(ti, lt.torrent_info)
    fs = ti.files()
    name = ti.name()
    files = []
    for i in range(fs.num_files()):
        if fs.file_flags(i) & lt.file_storage.flag_pad_file:
            continue
        p = fs.file_path(i).replace("\\", "/")
        # strip the torrent's root folder (multi-file torrents put everything under `name/`)
        rel = p[len(name) + 1:] if fs.num_files() > 1 and p.startswith(name + "/") else p
        safe_relpath(rel, what="file name in the torrent")
        files.append((rel, int(fs.file_size(i))))
    ih = ti.info_hashes()
    v1 = str(ih.v1) if ih.has_v1() else None
    v2 = str(ih.v2) if ih.has_v2() else None
    return TorrentMeta(name=name, files=tuple(files), btih=v1, btmh=v2, piece_length=ti.piece_length(),
                       total_size=ti.total_size())
