"""Stage, verify, commit: files reach their final name only after they were checked.

A caller puts files under a staging folder (``private_stage`` makes a fresh one beside the
destination, removed afterwards whatever happens; a fetcher may keep its own, resumable,
staging folder instead), then ``verify_and_commit`` runs its check and moves each file into
the destination with ``commit_files``: a rename (a copy plus rename across filesystems),
with the file and its folder fsynced, so a crash leaves the old state or the new file, never
a half file under the final name. A rejected check (``VerifyError``) deletes the staged
files; any other interruption leaves them to the caller (a partial download is kept to
resume). A caller whose files are already verified in a staging folder calls
``commit_files`` directly. Nothing here downloads or decides what "verified" means.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from provision.errors import VerifyError
from provision.io.atomic import TMP_PREFIX, atomic_copy, fsync_dir, fsync_path
from provision.io.paths import safe_join


def commit_file(src: Path, target: Path, *, synced: bool = False) -> None:
    """Move ``src`` under ``target`` atomically and durably (copy + rename across filesystems);
    ``synced`` says the caller already fsynced ``src`` (a fetcher that syncs as files complete)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not synced:
        fsync_path(src)
    try:
        os.replace(src, target)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        atomic_copy(src, target)
        src.unlink()
    fsync_dir(target.parent)


def commit_files(stage: Path, dest: Path, rels: Iterable[str]) -> None:
    """Move each relative path of ``rels`` from ``stage`` to the same place under ``dest``."""
    for rel in rels:
        commit_file(safe_join(stage, rel), safe_join(dest, rel))


def prune_empty(root: Path) -> None:
    """Remove the empty folders under ``root`` (deepest first) and ``root`` itself when empty."""
    if not root.is_dir():
        return
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty: something else still lives there
            d.rmdir()
    with contextlib.suppress(OSError):  # same
        root.rmdir()


def verify_and_commit(stage: Path, dest: Path, rels: Iterable[str], check: Callable[[], None], *,
                      on_interrupted: Callable[[], None] | None = None) -> None:
    """Run ``check`` (which raises ``VerifyError`` to reject the staged files), then commit ``rels``.

    Rejected: the staged files are deleted. Interrupted by anything else: ``on_interrupted``
    runs (to keep the bytes somewhere) or, without one, the staged files are deleted. In every
    case the empty folders of ``stage`` are removed."""
    rels = list(rels)

    def drop() -> None:
        for rel in rels:
            with contextlib.suppress(FileNotFoundError):  # never staged, or already moved
                safe_join(stage, rel).unlink()

    try:
        try:
            check()
        except VerifyError:
            drop()
            raise
        except BaseException:
            (on_interrupted or drop)()
            raise
        commit_files(stage, dest, rels)
    finally:
        prune_empty(stage)


@contextlib.contextmanager
def private_stage(beside: Path, label: str) -> Iterator[Path]:
    """A fresh staging folder inside ``beside`` (on the destination's filesystem), removed on exit."""
    stage = beside / f"{TMP_PREFIX}{label}-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
