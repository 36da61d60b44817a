"""Removing a model, or one converted profile of it, from the store (the library behind ``provision rm``).

``remove_model(home, name, profile=None)`` takes the model's lock first (without waiting), so it
refuses a model a live run holds (``LockTimeoutError``, exit 6) and no run can start while it
deletes; a dead lock is taken over. Symlinks are removed as links: nothing outside the home is
ever followed or deleted. Removing a profile also removes its signature (``<profile>_signature.sig``
beside its folder, written by ``sign``, ``seed`` and ``run --profile-from``) and drops its
``convert`` and ``smoke`` records from the state file. It does not remove resume data in
``torrents/`` (``store.garbage`` does, once no model refers to it) nor manifests under
``manifests/``. It asks nothing and prints nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from provision.errors import LockTimeoutError, UsageError
from provision.layout import LOCK_FILE, ORIGINAL, STATE_FILE, Layout, ModelPaths, model_dirname
from provision.store.inventory import model_names, profile_names, tree_bytes
from provision.store.lock import ModelLock, breaker_path, lock_status
from provision.store.state import load_state, save_state, split_stage

RemovedKind = Literal["symlink", "dead-lock", "profile", "signature", "original", "file", "staging"]
# a profile's signature sits beside its folder: models/<model>/<profile>_signature.sig (stages.profile_share)
PROFILE_SIGNATURE_SUFFIX = "_signature.sig"


def profile_signature(folder: Path) -> Path:
    """Where the signature of the profile in ``folder`` is kept: ``<folder>_signature.sig`` beside it."""
    folder = Path(folder)
    return folder.with_name(folder.name + PROFILE_SIGNATURE_SUFFIX)


@dataclass
class Removed:
    path: str
    kind: RemovedKind
    bytes: int


@dataclass
class RemoveResult:
    model: str
    profile: str | None
    removed: list[Removed] = field(default_factory=list)
    bytes_freed: int = 0
    dropped_stages: list[str] = field(default_factory=list)

    def add(self, path: Path, kind: RemovedKind, nbytes: int) -> None:
        self.removed.append(Removed(str(path), kind, nbytes))
        self.bytes_freed += nbytes

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "profile": self.profile, "removed": [asdict(r) for r in self.removed],
                "bytes_freed": self.bytes_freed, "dropped_stages": self.dropped_stages}


def remove_path(path: Path) -> int:
    """Delete ``path`` without following symlinks (a link is unlinked, never its target); bytes freed."""
    freed = tree_bytes(path, disk=True)
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):  # already gone: nothing left to free
            os.unlink(path)
    else:
        shutil.rmtree(path)  # never follows symlinks inside the tree (fd-based on Linux)
    return freed


def missing_model(home: Path, name: str) -> UsageError:
    """The error for a model name the store does not hold, listing the ones it does."""
    known = model_names(home)
    listing = ", ".join(known) if known else "none"
    return UsageError(f"No model named {name!r} in {home} (models: {listing}); `provision ls` lists them.")


def removal_target(home: Path, name: str, profile: str | None = None) -> Path:
    """The folder ``remove_model`` removes: the model's, or its ``profile``'s."""
    m = Layout(Path(home)).model(name)
    return m.root if profile is None else m.profile(profile)


def removal_size(home: Path, name: str, profile: str | None = None) -> int:
    """Apparent bytes ``remove_model`` would remove (staging included for a whole model);
    ``UsageError`` when the store holds no such model."""
    m = Layout(Path(home)).model(name)
    target = removal_target(home, name, profile)
    if not (target.exists() or m.staging.exists()):
        raise missing_model(Path(home), name)
    sig = profile_signature(target) if profile is not None else None
    return (tree_bytes(target) + (tree_bytes(m.staging) if profile is None else 0)
            + (tree_bytes(sig) if sig is not None and (sig.is_file() or sig.is_symlink()) else 0))


def _in_use(dirname: str, holder: str, **context: Any) -> LockTimeoutError:
    return LockTimeoutError(f"Model {dirname} is in use by a provision run ({holder}); not removing it.",
                            hint="Wait for that run to finish, then run `provision rm` again.", **context)


def _check_profile(m: ModelPaths, profile: str) -> str:
    pname = model_dirname(profile)
    if pname == ORIGINAL:
        raise UsageError(f"Refusing to remove the original of {m.dirname} alone: converted profiles are checked "
                         "against it; remove the whole model with `provision rm NAME`, or use "
                         "`provision run --drop-original`.")
    target = m.profile(profile)
    if not (target.exists() or target.is_symlink()):
        profs = profile_names(m.root)
        raise UsageError(f"Model {m.dirname} has no profile {profile!r} (profiles: {', '.join(profs) or 'none'}).")
    return pname


def _remove_symlinked(m: ModelPaths, res: RemoveResult) -> RemoveResult:
    """A model folder that is a symlink out of the store: unlink it unless a live run holds it."""
    st = lock_status(m.lock_file)
    if st.state == "live":
        raise _in_use(m.dirname, st.info.describe() if st.info else "unknown holder", lock=str(st.path))
    res.bytes_freed += remove_path(m.root)
    res.removed.append(Removed(str(m.root), "symlink", 0))
    return res


def remove_model(home: Path, name: str, *, profile: str | None = None) -> RemoveResult:
    """Remove model ``name`` (or its ``profile``) from ``home``; see the module docstring."""
    m = Layout(Path(home)).model(name)
    if not (m.root.exists() or m.root.is_symlink() or m.staging.exists()):
        raise missing_model(Path(home), name)
    res = RemoveResult(model=m.dirname, profile=None)
    if profile is not None:
        res.profile = _check_profile(m, profile)
    if m.root.is_symlink():
        if profile is not None:
            raise UsageError(f"{m.root} is a symlink out of the store; remove the profile where it lives.")
        return _remove_symlinked(m, res)

    created_dir = not m.root.exists()
    lock = ModelLock(m.lock_file, timeout=0, heartbeat=None, what=f"Model {m.dirname}", command="rm")
    try:
        lock.acquire()
    except LockTimeoutError as e:
        host, pid, since = e.context.get("holder_host"), e.context.get("holder_pid"), e.context.get("holder_since")
        who = f"host {host}, pid {pid}, since {since}" if host else "unknown holder"
        raise _in_use(m.dirname, who, **e.context) from None
    try:
        for st in lock.took_over:
            res.add(st.path, "dead-lock", 0)
        if profile is not None:
            target = m.profile(profile)
            res.add(target, "profile", remove_path(target))
            sig = profile_signature(target)
            if sig.is_symlink() or sig.is_file():  # vouches for files no longer there: it goes with them
                res.add(sig, "signature", remove_path(sig))
            res.dropped_stages = _drop_profile_stages(m.state_file, target.name, profile)
            return res
        _remove_contents(m, res)
    finally:
        lock.release()
    if profile is None or created_dir:
        with contextlib.suppress(OSError):  # a run that started meanwhile keeps its folder
            m.root.rmdir()
    return res


def _remove_contents(m: ModelPaths, res: RemoveResult) -> None:
    """Everything in the model folder but its lock, then its staging folder."""
    keep = {LOCK_FILE, breaker_path(m.lock_file).name}
    # the state file first: a removal cut short never leaves a record vouching for files
    for entry in sorted(m.root.iterdir(), key=lambda p: (p.name != STATE_FILE, p.name)):
        if entry.name in keep:
            continue
        kind: RemovedKind = "original" if entry.name == ORIGINAL else ("profile" if entry.is_dir() else "file")
        if kind == "file" and entry.name.endswith(PROFILE_SIGNATURE_SUFFIX):
            kind = "signature"
        res.add(entry, kind, remove_path(entry))
    if m.staging.exists() or m.staging.is_symlink():
        res.add(m.staging, "staging", remove_path(m.staging))


def _drop_profile_stages(state_file: Path, pname: str, profile: str) -> list[str]:
    state = load_state(state_file)
    if state.warnings:
        return []
    dropped: list[str] = []
    for stage, rec in list(state.stages.items()):
        if stage not in state.stages:
            continue
        base, qual = split_stage(stage)
        if base not in ("convert", "smoke"):
            continue
        if qual in (pname, profile) or (qual is None and rec.facts.get("profile") in (pname, profile)):
            dropped += state.invalidate(stage)
    if dropped:
        save_state(state, state_file)
    return dropped
