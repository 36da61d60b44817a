"""What the store holds: its models, their sizes, profiles, recorded stages and locks.

``list_models(home)`` describes every model under the home (the library behind ``provision ls``);
``tree_bytes`` and ``model_names`` are the measurements ``store.remove`` and ``store.garbage``
share. Folder sizes are read without following symlinks; each model's state file is checked
(every recorded stage's files by size, mtime and inode) and its lock read. Nothing here writes,
deletes or takes a lock.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.layout import ORIGINAL, Layout
from provision.store.lock import LockStatus, lock_status
from provision.store.state import load_state


def tree_bytes(path: Path, *, disk: bool = False) -> int:
    """Bytes under ``path`` without following symlinks: apparent sizes, or (``disk``) the blocks
    that removing the tree would free (files with other hard links elsewhere count 0)."""
    try:
        st = os.lstat(path)
    except OSError:  # nothing there (or removed meanwhile): it takes no space
        return 0

    def one(s: os.stat_result) -> int:
        if disk:
            return s.st_blocks * 512 if s.st_nlink <= 1 else 0
        return s.st_size

    if not os.path.isdir(path) or os.path.islink(path):
        return one(st)
    total = 0
    for root, dirs, files in os.walk(path, followlinks=False):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            try:
                total += one(os.lstat(os.path.join(root, name)))
            except OSError:
                pass  # removed while we walked: it no longer takes space
    return total


def model_names(home: Path) -> list[str]:
    """Folder names of every model under ``home``: those in models/ and those only in staging/."""
    lay = Layout(home)
    names: set[str] = set()
    for parent in (lay.models, lay.staging_root):
        try:
            with os.scandir(parent) as it:
                for e in it:
                    if not e.name.startswith(".") and e.is_dir():
                        names.add(e.name)
        except OSError:  # no models/ or staging/ yet: no names there
            continue
    return sorted(names)


def profile_names(mdir: Path) -> list[str]:
    """The converted profiles in the model folder ``mdir`` (every folder but the original)."""
    if not mdir.is_dir():
        return []
    return sorted(p.name for p in mdir.iterdir() if p.is_dir() and p.name != ORIGINAL and not p.name.startswith("."))


@dataclass
class StageInfo:
    stage: str
    valid: bool
    finished: str
    reasons: list[str] = field(default_factory=list)


@dataclass
class ModelInfo:
    dirname: str
    name: str
    path: Path
    original_bytes: int | None
    profiles: dict[str, int]
    staging_bytes: int | None
    stages: list[StageInfo]
    lock: LockStatus
    symlink: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def locked(self) -> bool:
        return self.lock.state == "live"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dir": self.dirname,
            "path": str(self.path),
            "symlink": self.symlink,
            "original_bytes": self.original_bytes,
            "profiles": [{"profile": p, "bytes": b} for p, b in sorted(self.profiles.items())],
            "staging_bytes": self.staging_bytes,
            "stages": [{"stage": s.stage, "valid": s.valid, "finished": s.finished, "reasons": s.reasons}
                       for s in self.stages],
            "locked": self.locked,
            "lock": self.lock.to_dict(),
            "warnings": self.warnings,
        }


def model_info(home: Path, dirname: str) -> ModelInfo:
    """One model folder (as listed under models/ or staging/) described, read only."""
    m = Layout(home).model_at(dirname)
    state = load_state(m.state_file)
    profiles: dict[str, int] = {}
    original: int | None = None
    if m.root.is_dir():
        with os.scandir(m.root) as it:
            for e in it:
                if e.name.startswith(".") or not e.is_dir():
                    continue
                if e.name == ORIGINAL:
                    original = tree_bytes(Path(e.path))
                else:
                    profiles[e.name] = tree_bytes(Path(e.path))
    stages = []
    for name, rec in state.stages.items():
        chk = state.check(name)
        stages.append(StageInfo(stage=name, valid=chk.ok, finished=rec.finished, reasons=list(chk.reasons)))
    return ModelInfo(
        dirname=dirname, name=state.model or dirname, path=m.root, original_bytes=original, profiles=profiles,
        staging_bytes=tree_bytes(m.staging) if m.staging.is_dir() else None, stages=stages,
        lock=lock_status(m.lock_file), symlink=m.root.is_symlink(), warnings=list(state.warnings))


def list_models(home: Path) -> list[ModelInfo]:
    """Every model under ``home`` (read only)."""
    return [model_info(home, d) for d in model_names(home)]
