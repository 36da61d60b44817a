"""`provision ls`: the models under PROVISION_HOME, their sizes, profiles, stages and locks.

``list_models(home)`` is the library call (``rm`` and ``gc`` share its helpers): it reads folder
sizes without following symlinks, each model's state file (checking every recorded stage's files
by size, mtime and inode) and its lock. It never writes and never takes a lock.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from provision.cli.app import get_app, json_option
from provision.layout import Layout
from provision.store.lock import LockStatus, lock_status
from provision.store.state import load_state

ORIGINAL = "original"


def tree_bytes(path: Path, *, disk: bool = False) -> int:
    """Bytes under ``path`` without following symlinks: apparent sizes, or (``disk``) the blocks
    that removing the tree would free (files with other hard links elsewhere count 0)."""
    try:
        st = os.lstat(path)
    except OSError:
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
                pass
    return total


def model_names(home: Path) -> list[str]:
    """Folder names of every model under ``home``: those in models/ and those only in staging/."""
    lay = Layout(home)
    names: set[str] = set()
    for parent in (lay.models, home / "staging"):
        try:
            with os.scandir(parent) as it:
                for e in it:
                    if not e.name.startswith(".") and e.is_dir():
                        names.add(e.name)
        except OSError:
            continue
    return sorted(names)


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
    lay = Layout(home)
    mdir = lay.models / dirname
    staging = home / "staging" / dirname
    state = load_state(mdir / "state.json")
    profiles: dict[str, int] = {}
    original: int | None = None
    if mdir.is_dir():
        with os.scandir(mdir) as it:
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
        dirname=dirname, name=state.model or dirname, path=mdir, original_bytes=original, profiles=profiles,
        staging_bytes=tree_bytes(staging) if staging.is_dir() else None, stages=stages,
        lock=lock_status(mdir / ".lock"), symlink=mdir.is_symlink(), warnings=list(state.warnings))


def list_models(home: Path) -> list[ModelInfo]:
    """Every model under ``home`` (read only)."""
    return [model_info(home, d) for d in model_names(home)]


def _size(n: int | None) -> str:
    from provision.units import human_bytes

    return "-" if n is None else human_bytes(n)


@click.command("ls")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), envvar="PROVISION_HOME",
              help="Model store (default ~/.cache/provision).")
@json_option
def command(home: Path | None, json_out: bool) -> None:
    """List the models in the store: sizes, profiles, finished stages and whether a run holds them."""
    app = get_app(json_out, "ls")
    from rich.table import Table

    root = Path(home) if home else app.settings.home
    models = list_models(root)
    for m in models:
        for w in m.warnings:
            app.terminal.warn(w)
    if not models:
        app.terminal.info(f"No models in {root}.")
    else:
        t = Table(show_header=True, header_style="bold")
        for col in ("model", "original", "profiles", "stages", "lock"):
            t.add_column(col, justify="right" if col == "original" else "left")
        for m in models:
            profs = ", ".join(f"{p} {_size(b)}" for p, b in sorted(m.profiles.items())) or "-"
            if m.staging_bytes is not None:
                profs += f" (staging {_size(m.staging_bytes)})"
            stages = " ".join(s.stage + ("" if s.valid else "(changed)") for s in m.stages) or "-"
            if m.lock.state == "live":
                lock = f"locked: {m.lock.info.describe()}" if m.lock.info else "locked"
            elif m.lock.state == "stale":
                lock = "dead lock (gc removes it)"
            else:
                lock = "-"
            t.add_row(m.name + (" -> symlink" if m.symlink else ""), _size(m.original_bytes), profs, stages, lock)
        app.terminal.print(t)
    app.finish({"home": str(root), "models": [m.to_dict() for m in models]})
