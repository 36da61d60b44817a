"""Reuse before download: take in an existing, verified copy instead of fetching again.

``find_hf_snapshot`` looks for the manifest's pinned Hub commit in the user's Hugging Face cache
(``HF_HUB_CACHE``, ``HF_HOME/hub`` or ``~/.cache/huggingface/hub``; ``snapshots/<commit>/<path>``
links into ``blobs/``) without importing huggingface_hub. ``adopt`` verifies every planned file of
a folder or snapshot against its authority (a blob's name is the Hub's id of its content, so it
vouches when the manifest pins no hash), then hard-links or atomically copies it into the
destination; where the sources pin a torrent whose info dictionary is at hand (the plan's .torrent,
the manifest's, the store's copy), its pieces are the authority, checked on every core. ``fetch_local`` is a manifest's ``local`` source taken in the same way (a folder that
lacks a required file is a ``FetchError``, so ``--source auto`` moves on; a file that does not
match is a ``VerifyError``, exit 5). Symlinks are followed only inside the folder or the repo's
cache folder; nothing is created under the destination before its file verified. It downloads nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provision.errors import FetchError, HostileContentError, ProvisionError, VerifyError
from provision.io.atomic import atomic_copy
from provision.io.hashing import sha256_file
from provision.io.paths import safe_join
from provision.io.staging import private_stage, verify_and_commit
from provision.progress import ProgressFn
from provision.stages.fetch.request import FetchedFile, FetchRequest, FetchResult

if TYPE_CHECKING:
    from provision.stages.verify.torrent import TorrentRef

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")


def hf_cache_dir() -> Path:
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    hf_home = os.environ.get("HF_HOME")
    if hf_home:
        return Path(hf_home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def find_hf_snapshot(plan: FetchRequest) -> Path | None:
    """The cache snapshot of the manifest's pinned Hub commit holding every required file."""
    if plan.manifest is None:
        return None
    src = plan.manifest.source("hf")
    if src is None or not src.repo or not src.revision:
        return None
    repo_dir = hf_cache_dir() / ("models--" + src.repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / src.revision
    if not snap.is_dir():
        return None
    prefix = src.prefix or ""
    for f in plan.files:
        if f.optional or "hf" not in f.sources:
            continue
        if not (snap / (prefix + f.path)).exists():
            return None
    return snap / prefix if prefix else snap


@dataclass
class AdoptResult:
    source: Path
    dest: Path
    files: list[dict[str, Any]] = field(default_factory=list)
    linked: int = 0
    copied: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"source": str(self.source), "dest": str(self.dest), "files": self.files,
                "linked": self.linked, "copied": self.copied}


def _resolve_inside(src_root: Path, rel: str, allowed: Path) -> Path:
    p = src_root / rel
    real = p.resolve()
    allowed_real = allowed.resolve()
    if real != allowed_real and allowed_real not in real.parents:
        raise HostileContentError(f"Refusing to adopt {p}: it resolves outside {allowed}.", path=str(p))
    if not real.is_file():
        raise VerifyError(f"Cannot adopt {p}: it is missing or not a regular file.", path=str(p))
    return real


def _cache_blob_authority(real: Path) -> tuple[str | None, str | None]:
    """(sha256, git_sha1) named by a Hugging Face cache blob's file name, if it is one."""
    if real.parent.name != "blobs":
        return None, None
    name = real.name
    if _HEX64.match(name):
        return name, None
    if _HEX40.match(name):
        return None, name
    return None, None


def _torrent_ref(plan: FetchRequest) -> TorrentRef | None:
    """The torrent info dictionary ``plan``'s sources pin (see ``verify.torrent.find_torrent``), or None
    (then the manifest's or the cache blob's hashes are the authority; a mismatching torrent is ignored)."""
    from provision.stages.verify.torrent import find_torrent

    try:
        return find_torrent(plan.manifest, plan.home, magnet=plan.magnet, torrent_file=plan.torrent_file)
    except ProvisionError:
        return None


def adopt(plan: FetchRequest, src: Path, *, dest: Path | None = None, progress: ProgressFn | None = None,
          gate: Callable[[Mapping[str, tuple[Path, str | None]]], None] | None = None) -> AdoptResult:
    """Verify ``plan``'s files in ``src`` and take them into ``dest`` by hard link or copy; ``gate``
    (a manifest's pinned signature) checks the staged files before any is committed."""
    from provision.stages.verify import Authority, authorities_from_manifest, verify_files
    from provision.stages.verify.torrent import with_torrent

    dest = Path(dest) if dest else plan.dest
    src = Path(src)
    if not src.is_dir():
        raise VerifyError(f"--adopt {src}: not a folder.", hint="Pass the folder that holds the model files.")
    allowed = src
    if src.parent.name == "snapshots":  # a Hugging Face cache snapshot: blobs live two levels up
        allowed = src.parent.parent
    auths = authorities_from_manifest(plan.manifest) if plan.manifest else {}
    wanted = [f for f in plan.files if not (f.optional and not (src / f.path).exists())]
    rels = [f.path for f in wanted]
    result = AdoptResult(source=src, dest=dest)
    # link (or copy) into a private staging folder, verify there, then commit into place
    with private_stage(dest.parent, "adopt") as stage:
        expected: dict[str, Authority] = {}
        for f in wanted:
            real = _resolve_inside(src, f.path, allowed)
            blob_sha, blob_git = _cache_blob_authority(real)
            a = auths.get(f.path) or Authority(kind="none", size=f.size, sha256=f.sha256)
            if not a.has_content_hash and (blob_sha or blob_git):
                a = Authority(kind="hub-lfs-sha256" if blob_sha else "git-blob-sha1", size=a.size,
                              sha256=blob_sha, git_sha1=blob_git)
            expected[f.path] = a
            target = safe_join(stage, f.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(real, target)
                result.linked += 1
            except OSError:
                atomic_copy(real, target)
                result.copied += 1
        ref = _torrent_ref(plan)
        expected = with_torrent(expected, ref)  # torrent pieces, checked on every core, where the sources pin them
        report = verify_files(stage, expected, progress=progress, whole_sha256=ref is None)

        def check() -> None:
            report.raise_for_failure()
            if gate is not None:
                gate({fr.path: (safe_join(stage, fr.path), fr.sha256) for fr in report.files if fr.path in expected})
            dest.mkdir(parents=True, exist_ok=True)

        verify_and_commit(stage, dest, rels, check)
    hashed = {fr.path: fr.sha256 for fr in report.files}
    for f in wanted:
        final = safe_join(dest, f.path)
        # a file torrent pieces vouched for has no sha256 here (no single-stream pass): the fetch record
        # lacks it and the conversion computes it while it reads the bytes anyway
        sha = hashed.get(f.path) or (None if expected[f.path].splittable else sha256_file(final))
        result.files.append({"path": f.path, "size": final.stat().st_size, "sha256": sha,
                             "authority": expected[f.path].kind})
    return result


def fetch_local(plan: FetchRequest, *, dest: Path | None = None, progress: ProgressFn | None = None,
                gate: Callable[[Mapping[str, tuple[Path, str | None]]], None] | None = None) -> FetchResult:
    """Take the files of the manifest's ``local`` source into ``dest`` (default ``plan.dest``), each
    verified against the manifest: ``FetchError`` (exit 4) when the folder or a required file is gone."""
    import time

    src = plan.manifest.source("local") if plan.manifest is not None else None
    if src is None or src.folder is None:
        raise FetchError(f"{plan.name} has no local source.")
    folder = src.folder
    if not folder.is_dir():
        raise FetchError(f"Local source {folder} is not a folder any more.", path=str(folder))
    missing = [f.path for f in plan.files if not f.optional and not os.path.lexists(folder / f.path)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise FetchError(f"Local source {folder} lacks {missing[0]}{more}.", path=str(folder), missing=missing)
    t = time.monotonic()
    res = adopt(plan, folder, dest=dest, progress=progress, gate=gate)
    files = [FetchedFile(path=f["path"], size=f["size"], sha256=f["sha256"], authority=f["authority"])
             for f in res.files]
    return FetchResult(dest=res.dest, source="local", files=files, seconds=time.monotonic() - t,
                       extra={"folder": str(folder), "linked": res.linked, "copied": res.copied})
