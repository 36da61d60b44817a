"""What one BitTorrent fetch of a plan means before any peer is contacted: the source (magnet,
.torrent or both, checked to name the same torrent), the paths its staging, resume data and kept
metadata use, the plan's files mapped to torrent file indexes, and what vouches for each.

Shared by the download and by ``seed_verified`` (which serves an earlier run's files). Nothing
here opens a session or touches file data.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provision.errors import ManifestError, NotFoundError, UsageError
from provision.formats.sources import Magnet, parse_magnet
from provision.io.paths import safe_relpath
from provision.layout import Layout
from provision.progress import ProgressFn
from provision.stages.fetch.torrent.meta import files_of, info_hashes, is_pad, load_torrent_info, root_prefix
from provision.stages.fetch.torrent.session import session_settings
from provision.stages.verify import Authority

if TYPE_CHECKING:
    from provision.stages.fetch.request import FetchRequest, PlannedFile, TorrentOptions


@dataclass(frozen=True)
class Source:
    magnet: Magnet | None
    torrent_path: Path | None
    prefix: str  # manifest: where its files sit inside the torrent ("" = under the root folder)
    key: str  # id the resume data is kept under (v1 hash when known, else v2)


@dataclass
class Selected:
    """One file of the plan inside the torrent."""

    rel: str  # path relative to the verified root and to dest (the plan's path)
    index: int  # file index in the torrent
    size: int
    offset: int
    staged: Path  # where libtorrent writes it
    spec: PlannedFile | None = None
    reused: bool = False


def resolve_source(plan: FetchRequest) -> Source:
    """The plan's torrent source; exit 2 for a source that is not BitTorrent or is inconsistent."""
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
        btih, btmh = info_hashes(load_torrent_info(tpath).info_hashes())
        key = btih or btmh or ""
        if magnet is not None and ((magnet.btih and btih and magnet.btih != btih)
                                   or (magnet.btmh and btmh and magnet.btmh != btmh)):
            raise ManifestError(f"The magnet and the torrent file {tpath} name different torrents.",
                                hint="Fix the manifest's torrent source.")
    elif magnet is not None:
        key = magnet.infohash
    if not key:
        raise ManifestError("The torrent source names neither a magnet nor a torrent file.")
    return Source(magnet=magnet, torrent_path=tpath, prefix=prefix, key=key)


class FetchJob:
    """A plan's fetch, resolved: source, options, staging and resume paths, session settings."""

    def __init__(self, plan: FetchRequest, dest: Path, options: TorrentOptions, progress: ProgressFn | None) -> None:
        self.plan = plan
        self.dest = Path(dest)
        self.options = options
        self.progress = progress
        self.pickles_as_data = False  # the caller imports the torrent's pickles: verify them as bytes
        self.src = resolve_source(plan)
        layout = Layout(plan.home)
        self.staging = layout.staging(plan.name) / f"bt-{self.src.key[:16]}"
        self.resume_path = layout.torrents / f"{self.src.key}.resume"
        self.torrent_copy = layout.torrents / f"{self.src.key}.torrent"  # metadata kept for seed_verified
        self.settings = session_settings(options.network, listen=options.listen,
                                         upload_rate=options.max_upload_rate,
                                         download_rate=options.max_download_rate)

    def trackers(self) -> list[str]:
        """The options' trackers, then the magnet's."""
        return list(dict.fromkeys(list(self.options.trackers)
                                  + (list(self.src.magnet.trackers) if self.src.magnet else [])))

    def staged_root(self, ti: Any) -> Path:
        """The folder the selected files sit in under the staging folder."""
        prefix = self.src.prefix
        return self.staging / (prefix.rstrip("/") if prefix else root_prefix(ti).rstrip("/"))

    def select(self, ti: Any) -> list[Selected]:
        """Map the plan's files to torrent file indexes (hostile names were refused already)."""
        by_rel = self._files_by_rel(ti)
        fs = files_of(ti)
        base = self.staged_root(ti)
        files: Sequence[PlannedFile] = self.plan.files
        if self.plan.kind == "manifest":
            files = [f for f in files if "torrent" in f.sources]
        if not files:
            return self._select_by_globs(ti, by_rel, base)
        out: list[Selected] = []
        for f in files:
            idx = by_rel.get(f.path)
            if idx is None:
                if f.optional:
                    continue
                shown = (self.src.prefix or root_prefix(ti)) + f.path
                raise NotFoundError(f"The torrent {ti.name()!r} has no file {shown!r}.",
                                    hint="Check the manifest's torrent prefix, or use --source hf.", path=f.path)
            size = int(fs.file_size(idx))
            if f.size is not None and f.size != size:
                raise NotFoundError(
                    f"The torrent's {f.path} is {size:,d} bytes but the plan expects {f.size:,d}; "
                    "it is not the same file.", hint="Use the torrent that matches the manifest, or --source hf.",
                    path=f.path, expected=f.size, actual=size)
            out.append(Selected(rel=f.path, index=idx, size=size, offset=int(fs.file_offset(idx)),
                                staged=base / f.path, spec=f))
        out.sort(key=lambda s: s.index)
        return out

    def _files_by_rel(self, ti: Any) -> dict[str, int]:
        fs = files_of(ti)
        root = root_prefix(ti)
        prefix = self.src.prefix
        by_rel: dict[str, int] = {}
        for i in range(fs.num_files()):
            if is_pad(fs, i):
                continue
            full = fs.file_path(i).replace("\\", "/")
            if prefix:
                if not full.startswith(prefix):
                    continue
                rel = full[len(prefix):]
            else:
                rel = full[len(root):] if root and full.startswith(root) else full
            by_rel[str(safe_relpath(rel, what="file name in the torrent"))] = i
        return by_rel

    def _select_by_globs(self, ti: Any, by_rel: dict[str, int], base: Path) -> list[Selected]:
        """A bare magnet or .torrent: every file, or those matching ``--include``."""
        fs = files_of(ti)
        globs = self.options.include
        out = [Selected(rel=rel, index=idx, size=int(fs.file_size(idx)), offset=int(fs.file_offset(idx)),
                        staged=base / rel)
               for rel, idx in sorted(by_rel.items(), key=lambda kv: kv[1])
               if not globs or any(fnmatch.fnmatch(rel, g) for g in globs)]
        if not out:
            raise NotFoundError(f"No file of the torrent {ti.name()!r} matches --include "
                                f"{' '.join(globs)}.", hint="Check the glob patterns.")
        return out


def authorities(ti: Any, sels: Sequence[Selected]) -> dict[str, Authority]:
    """What vouches for each selected file: the manifest's sha256, else the torrent's v2 merkle
    root, else its v1 piece hashes (or only the size, for a file sharing pieces with others)."""
    fs = files_of(ti)
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
            tail_ok = end % pl == 0 or nxt >= n or is_pad(fs, nxt) or end == ti.total_size()
            if s.size > 0 and s.offset % pl == 0 and tail_ok:
                first, last = s.offset // pl, (end - 1) // pl
                hashes = tuple(bytes(ti.hash_for_piece(p)) for p in range(first, last + 1))
                out[s.rel] = Authority(kind="torrent-v1-pieces", size=s.size, piece_length=pl,
                                       piece_hashes=hashes)
            else:  # shares pieces with its neighbours: libtorrent checked those pieces, we check the size
                out[s.rel] = Authority(kind="torrent-v1-pieces", size=s.size)
    return out
