"""Finding and removing what the store no longer needs (the library behind ``provision gc``).

Per model, unless a live process (``provision run`` or ``provision fetch``) holds its lock,
``collect_garbage`` removes partial and temporary files in the model folder no state record
vouches for, a profile's signature (``<profile>_signature.sig``) whose profile folder is gone, a dead
lock, a leftover ``.lock.break`` and an empty staging folder; across the
store, resume data no model refers to and temporary files no run can still be writing. A staging
folder holding files is a resumable partial download (a stopped run or fetch continues from it)
and, with its resume data, is kept unless ``partials`` is asked for (``gc --partials``). Each model
is cleaned under its own lock (taken without waiting). A live lock, and anything of a model it
protects, is never touched; symlinks are never followed; every item carries the reason it goes
(or stays), and ``dry_run`` reports the same list and removes nothing. It prints nothing.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from provision.errors import LockTimeoutError
from provision.io.atomic import TMP_PREFIX
from provision.layout import LOCK_FILE, Layout, ModelPaths
from provision.store.inventory import model_names, tree_bytes
from provision.store.lock import BREAKER_STALE_AFTER, LockStatus, ModelLock, breaker_path, lock_status
from provision.store.remove import PROFILE_SIGNATURE_SUFFIX, remove_path
from provision.store.state import load_state

PARTIAL_SUFFIXES = (".incomplete", ".part", ".parts")
TMP_GRACE_S = 600.0  # a temporary file older than this cannot belong to a write in progress
_HEX_RUN = re.compile(r"[0-9a-fA-F]{40,}")
_B32_BTIH = re.compile(r"btih:([A-Za-z2-7]{32})\b")

GcKind = Literal["staging", "partial", "tmp", "dead-lock", "breaker", "resume", "lock", "signature"]
_BT_STAGING = re.compile(r"bt-([0-9a-f]{16})")  # a torrent fetch's staging folder: bt-<first 16 of its key>
RESUMABLE = ("resumable partial download: the same `provision run`/`fetch` continues it; "
             "`provision gc --partials` or `provision rm NAME` removes it")


@dataclass
class GcItem:
    path: str
    kind: GcKind
    bytes: int
    reason: str


@dataclass
class GcResult:
    home: str
    dry_run: bool
    removed: list[GcItem] = field(default_factory=list)
    kept: list[GcItem] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return sum(i.bytes for i in self.removed)

    def to_dict(self) -> dict[str, Any]:
        return {"home": self.home, "dry_run": self.dry_run, "bytes_freed": self.bytes_freed,
                "removed": [asdict(i) for i in self.removed], "kept": [asdict(i) for i in self.kept]}


def _is_partial(name: str) -> bool:
    return name.startswith(TMP_PREFIX) or name.endswith(PARTIAL_SUFFIXES)


def _has_files(root: Path) -> bool:
    """Whether the tree ``root`` holds anything but folders (a symlink counts), without following links."""
    if root.is_symlink() or not root.is_dir():
        return root.is_symlink() or root.exists()
    return any(files or any(os.path.islink(os.path.join(d, x)) for x in dirs)
               for d, dirs, files in os.walk(root, followlinks=False))


def _orphan_signature(mroot: Path, name: str) -> bool:
    """Whether ``name`` in the model folder ``mroot`` is a profile's signature whose profile folder is gone
    (a signature beside its profile stays with it: ``provision rm --profile`` removes both)."""
    if not name.endswith(PROFILE_SIGNATURE_SUFFIX) or name == PROFILE_SIGNATURE_SUFFIX:
        return False
    prof = mroot / name[:-len(PROFILE_SIGNATURE_SUFFIX)]
    return not (prof.is_dir() or prof.is_symlink())


def _model_candidates(m: ModelPaths, now: float, partials: bool) -> tuple[list[GcItem], list[GcItem]]:
    """What of one (unlocked) model is garbage, and what stays with its reason, found without
    following symlinks: (to remove, to keep)."""
    out: list[GcItem] = []
    keep: list[GcItem] = []
    if m.staging.is_symlink() or m.staging.is_dir():
        size = tree_bytes(m.staging, disk=True)
        if not _has_files(m.staging):
            out.append(GcItem(str(m.staging), "staging", size, "empty staging folder: nothing to resume"))
        elif partials:
            out.append(GcItem(str(m.staging), "staging", size, "resumable partial download, and --partials asked "
                                                               "for partials to go"))
        else:
            keep.append(GcItem(str(m.staging), "staging", size, RESUMABLE))
    if m.root.is_dir() and not m.root.is_symlink():
        state = load_state(m.state_file)
        vouched = {str(f.path) for rec in state.stages.values() for f in rec.files.values()}
        for root, _dirs, files in os.walk(m.root, followlinks=False):
            for name in files:
                p = Path(root) / name
                if Path(root) == m.root and name.startswith(LOCK_FILE):
                    continue
                if Path(root) == m.root and _orphan_signature(m.root, name):
                    out.append(GcItem(str(p), "signature", tree_bytes(p, disk=True),
                                      f"signature of the profile {name[:-len(PROFILE_SIGNATURE_SUFFIX)]}, whose "
                                      "folder is no longer there: it vouches for nothing"))
                    continue
                if _is_partial(name) and str(p.absolute()) not in vouched:
                    if name.startswith(TMP_PREFIX):
                        out.append(GcItem(str(p), "tmp", tree_bytes(p, disk=True),
                                          "temporary file of a write that no live run is doing"))
                    else:
                        out.append(GcItem(str(p), "partial", tree_bytes(p, disk=True),
                                          "partial file in the model folder: no stage record vouches for it "
                                          "and nothing resumes from it"))
        breaker = breaker_path(m.lock_file)
        with contextlib.suppress(OSError):  # no breaker (or none we can stat): nothing to collect
            if now - breaker.lstat().st_mtime > BREAKER_STALE_AFTER:
                out.append(GcItem(str(breaker), "breaker", 0, "left by a process that died breaking a lock"))
    return out, keep


def _hashes_in(text: str) -> set[str]:
    """Every infohash (v1 or v2, hex or base32, bare or as a btmh multihash) named in ``text``."""
    found: set[str] = set()
    for m in _HEX_RUN.finditer(text):
        h = m.group(0).lower()
        if len(h) in (40, 64):
            found.add(h)
        elif len(h) == 68 and h.startswith("1220"):  # btmh multihash
            found.add(h[4:])
    for m in _B32_BTIH.finditer(text):
        with contextlib.suppress(ValueError):  # not valid base32 after all: not a hash
            found.add(base64.b32decode(m.group(1).upper()).hex())
    return found


def _read_texts(files: list[Path]) -> list[str]:
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue  # absent or not text: it names no torrent
    return texts


def _known_hashes(home: Path, names: list[str]) -> set[str]:
    """Infohashes some existing model refers to: in its state file, manifests or staging folder."""
    lay = Layout(home)
    texts: list[str] = []
    for d in names:
        m = lay.model_at(d)
        files = [m.state_file, lay.manifest_file(d)]
        with contextlib.suppress(OSError):  # no model folder: only its manifest and staging can name hashes
            files += list(m.root.glob("*.toml"))
        texts += _read_texts(files)
        with contextlib.suppress(OSError):  # no staging folder: nothing to list
            texts.append(" ".join(os.listdir(m.staging)))
    return _hashes_in("\n".join(texts))


def _staged_prefixes(home: Path, names: list[str]) -> set[str]:
    """The key prefixes of the torrent fetches whose staging folders (``bt-<16 hex>``) still exist:
    their resume data is what resumes them."""
    lay = Layout(home)
    out: set[str] = set()
    for d in names:
        with contextlib.suppress(OSError):  # no staging folder: no torrent fetch to resume
            out |= {m.group(1) for e in os.listdir(lay.model_at(d).staging) if (m := _BT_STAGING.fullmatch(e))}
    return out


def _resume_candidates(home: Path, names: list[str], live: list[LockStatus]) -> tuple[list[GcItem], list[GcItem]]:
    tdir = Layout(home).torrents
    if not tdir.is_dir():
        return [], []
    known = _known_hashes(home, names)
    staged = _staged_prefixes(home, names)
    oldest_live = min((s.info.started for s in live if s.info), default=None) if live else None
    rm: list[GcItem] = []
    keep: list[GcItem] = []
    for entry in sorted(tdir.iterdir()):
        if entry.name.startswith(TMP_PREFIX) or not (entry.is_file() or entry.is_symlink()):
            continue
        stem = entry.name.split(".", 1)[0].lower()
        if len(stem) not in (40, 64) or not re.fullmatch(r"[0-9a-f]+", stem):
            continue  # not ours to judge
        if stem in known or any(k.startswith(stem) for k in known):
            continue
        if stem[:16] in staged:
            keep.append(GcItem(str(entry), "resume", tree_bytes(entry, disk=True),
                               "resume data of a " + RESUMABLE))
            continue
        item = GcItem(str(entry), "resume", tree_bytes(entry, disk=True),
                      "no model, manifest or staged download refers to this torrent")
        mtime = entry.lstat().st_mtime
        if live and (oldest_live is None or mtime >= oldest_live - 1):
            item.reason = "may belong to a running fetch"
            keep.append(item)
        else:
            rm.append(item)
    return rm, keep


def _tmp_candidates(home: Path, live: bool, now: float) -> list[GcItem]:
    lay = Layout(home)
    out = []
    for d in (home, lay.manifests, lay.torrents):
        try:
            entries = list(os.scandir(d))
        except OSError:  # no such folder yet: nothing to collect there
            continue
        for e in entries:
            if not e.name.startswith(TMP_PREFIX):
                continue
            age = now - e.stat(follow_symlinks=False).st_mtime
            if not live or age > TMP_GRACE_S:
                out.append(GcItem(e.path, "tmp", tree_bytes(Path(e.path), disk=True), "temporary file of a write no live run is doing"))
    return out


def collect_garbage(home: Path, *, dry_run: bool = False, stale_after: float | None = None,
                    partials: bool = False) -> GcResult:
    """Remove (or with ``dry_run`` list) what the store no longer needs; ``partials`` removes resumable
    partial downloads too. See the module docstring."""
    home = Path(home)
    lay = Layout(home)
    now = time.time()
    res = GcResult(home=str(home), dry_run=dry_run)
    live: list[LockStatus] = []
    for d in model_names(home):
        m = lay.model_at(d)
        st = lock_status(m.lock_file, stale_after=stale_after)
        if st.state == "live":
            live.append(st)
            who = st.info.describe() if st.info else "a run"
            res.kept.append(GcItem(str(st.path), "lock", 0, f"live: held by {who}"))
            rm, keep = _model_candidates(m, now, partials)
            for it in rm + keep:
                it.reason = f"model in use by {who}"
                res.kept.append(it)
            continue
        rm, keep = _model_candidates(m, now, partials)
        res.kept += keep
        if dry_run:
            if st.state == "stale":
                res.removed.append(GcItem(str(st.path), "dead-lock", 0, f"dead lock: {st.reason}"))
            res.removed += rm
            continue
        if st.state == "stale" or rm:
            _clean_model(res, m, stale_after, now, partials)
    _remove_all(res, _tmp_candidates(home, bool(live), now))
    rm, keep = _resume_candidates(home, model_names(home), live)
    _remove_all(res, rm)
    res.kept += keep
    return res


def _remove_all(res: GcResult, items: list[GcItem]) -> None:
    for it in items:
        if not res.dry_run:
            it.bytes = remove_path(Path(it.path))
        res.removed.append(it)


def _clean_model(res: GcResult, m: ModelPaths, stale_after: float | None, now: float, partials: bool) -> None:
    created = not m.root.exists()
    lock = ModelLock(m.lock_file, timeout=0, heartbeat=None, stale_after=stale_after, command="gc",
                     what=f"Model {m.dirname}")
    try:
        lock.acquire()
    except LockTimeoutError as e:
        res.kept.append(GcItem(str(m.lock_file), "lock", 0, f"live: {e.message}"))
        return
    try:
        for st in lock.took_over:
            res.removed.append(GcItem(str(st.path), "dead-lock", 0, f"dead lock: {st.reason}"))
        for it in _model_candidates(m, now, partials)[0]:
            it.bytes = remove_path(Path(it.path))
            res.removed.append(it)
    finally:
        lock.release()
    if created:
        with contextlib.suppress(OSError):  # a run that started meanwhile keeps its folder
            m.root.rmdir()
