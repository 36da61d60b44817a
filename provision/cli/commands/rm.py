"""`provision rm NAME [--profile P]`: remove a model (or one converted profile) from the store.

``remove_model(home, name, profile=None)`` is the library call. It takes the model's lock first
(without waiting), so it refuses a model a live run holds (``LockTimeoutError``, exit 6) and no
run can start while it deletes; a dead lock is taken over. Symlinks are removed as links: nothing
outside the home is ever followed or deleted. Removing a profile also drops its ``convert`` and
``smoke`` records from the state file. It does not remove resume data in ``torrents/`` (``gc``
does, once no model refers to it) nor manifests under ``manifests/``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from provision.cli.app import get_app, json_option
from provision.cli.commands.ls import ORIGINAL, model_names, tree_bytes
from provision.errors import LockTimeoutError, UsageError
from provision.layout import Layout, model_dirname
from provision.store.lock import ModelLock, lock_status
from provision.store.state import load_state, save_state, split_stage


@dataclass
class RemoveResult:
    model: str
    profile: str | None
    removed: list[dict[str, Any]] = field(default_factory=list)
    bytes_freed: int = 0
    dropped_stages: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "profile": self.profile, "removed": self.removed,
                "bytes_freed": self.bytes_freed, "dropped_stages": self.dropped_stages}


def remove_path(path: Path) -> int:
    """Delete ``path`` without following symlinks (a link is unlinked, never its target); bytes freed."""
    freed = tree_bytes(path, disk=True)
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        shutil.rmtree(path)  # never follows symlinks inside the tree (fd-based on Linux)
    return freed


def _missing(home: Path, name: str) -> UsageError:
    known = model_names(home)
    listing = ", ".join(known) if known else "none"
    return UsageError(f"No model named {name!r} in {home} (models: {listing}); `provision ls` lists them.")


def remove_model(home: Path, name: str, *, profile: str | None = None) -> RemoveResult:
    """Remove model ``name`` (or its ``profile``) from ``home``; see the module docstring."""
    lay = Layout(Path(home))
    dirname = model_dirname(name)
    mdir = lay.models / dirname
    staging = lay.home / "staging" / dirname
    if not (mdir.exists() or mdir.is_symlink() or staging.exists()):
        raise _missing(lay.home, name)
    res = RemoveResult(model=dirname, profile=None)
    if profile is not None:
        pname = model_dirname(profile)
        res.profile = pname
        if pname == ORIGINAL:
            raise UsageError(f"Refusing to remove the original of {dirname} alone: converted profiles are checked "
                             "against it; remove the whole model with `provision rm NAME`, or use "
                             "`provision run --drop-original`.")
        target = mdir / pname
        if not (target.exists() or target.is_symlink()):
            profs = sorted(p.name for p in mdir.iterdir() if p.is_dir() and p.name != ORIGINAL
                           and not p.name.startswith(".")) if mdir.is_dir() else []
            raise UsageError(f"Model {dirname} has no profile {profile!r} (profiles: {', '.join(profs) or 'none'}).")
    if mdir.is_symlink():
        if profile is not None:
            raise UsageError(f"{mdir} is a symlink out of the store; remove the profile where it lives.")
        st = lock_status(mdir / ".lock")
        if st.state == "live":
            who = st.info.describe() if st.info else "unknown holder"
            raise LockTimeoutError(f"Model {dirname} is in use by a provision run ({who}); not removing it.",
                                   hint="Wait for that run to finish, then run `provision rm` again.",
                                   lock=str(st.path))
        res.bytes_freed += remove_path(mdir)
        res.removed.append({"path": str(mdir), "kind": "symlink", "bytes": 0})
        return res

    created_dir = not mdir.exists()
    lock = ModelLock(lay.lock_file(dirname), timeout=0, heartbeat=None, what=f"Model {dirname}", command="rm")
    try:
        lock.acquire()
    except LockTimeoutError as e:
        holder = e.context.get("holder_host"), e.context.get("holder_pid"), e.context.get("holder_since")
        who = f"host {holder[0]}, pid {holder[1]}, since {holder[2]}" if holder[0] else "unknown holder"
        raise LockTimeoutError(f"Model {dirname} is in use by a provision run ({who}); not removing it.",
                               hint="Wait for that run to finish, then run `provision rm` again.",
                               **e.context) from None
    try:
        for st in lock.took_over:
            res.removed.append({"path": str(st.path), "kind": "dead-lock", "bytes": 0})
        if profile is not None:
            target = mdir / model_dirname(profile)
            b = remove_path(target)
            res.bytes_freed += b
            res.removed.append({"path": str(target), "kind": "profile", "bytes": b})
            res.dropped_stages = _drop_profile_stages(mdir / "state.json", target.name, profile)
            return res
        # the state file first: a removal cut short never leaves a record vouching for files
        for entry in sorted(mdir.iterdir(), key=lambda p: (p.name != "state.json", p.name)):
            if entry.name in (".lock", ".lock.break"):
                continue
            b = remove_path(entry)
            res.bytes_freed += b
            kind = "original" if entry.name == ORIGINAL else ("profile" if entry.is_dir() else "file")
            res.removed.append({"path": str(entry), "kind": kind, "bytes": b})
        if staging.exists() or staging.is_symlink():
            b = remove_path(staging)
            res.bytes_freed += b
            res.removed.append({"path": str(staging), "kind": "staging", "bytes": b})
    finally:
        lock.release()
    if profile is None or created_dir:
        with contextlib.suppress(OSError):  # a run that started meanwhile keeps its folder
            mdir.rmdir()
    return res


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


@click.command("rm")
@click.argument("name")
@click.option("--profile", help="Remove only this converted profile (e.g. fp8-hf), keeping the original.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), envvar="PROVISION_HOME",
              help="Model store (default ~/.cache/provision).")
@json_option
def command(name: str, profile: str | None, yes: bool, home: Path | None, json_out: bool) -> None:
    """Remove model NAME (or one --profile of it) from the store; refused while a run holds it (exit 6)."""
    app = get_app(json_out, "rm")
    from provision.units import human_bytes

    root = Path(home) if home else app.settings.home
    lay = Layout(root)
    dirname = model_dirname(name)
    target = lay.models / dirname if profile is None else lay.models / dirname / model_dirname(profile)
    if not yes:
        if json_out or not sys.stdin.isatty():
            raise UsageError(f"Refusing to remove {target} without confirmation: pass --yes.")
        if not (target.exists() or (lay.home / "staging" / dirname).exists()):
            raise _missing(root, name)
        size = tree_bytes(target) + (tree_bytes(lay.home / "staging" / dirname) if profile is None else 0)
        if not click.confirm(f"Remove {target} ({human_bytes(size)})?", default=False, err=True):
            app.terminal.info("Nothing removed.")
            app.finish(RemoveResult(model=dirname, profile=profile).to_dict())
            return
    res = remove_model(root, name, profile=profile)
    for r in res.removed:
        app.terminal.info(f"removed {r['kind']}: {r['path']}")
    if res.dropped_stages:
        app.terminal.info(f"state: dropped {', '.join(res.dropped_stages)}")
    app.terminal.success(f"removed {target} ({human_bytes(res.bytes_freed)} freed)")
    app.finish(res.to_dict())
