"""What lies in a model folder, and which of it is hostile.

``scan(root)`` lists every non-directory entry under ``root`` without following symlinks and
classifies it: a regular file, a symlink to a file inside the folder, a pickle (by name, never
opened), a symlink leaving the folder, a symlink to a folder inside, or a special file (FIFO,
device, socket, dangling link). ``hostile_check`` turns the refused kinds into failed checks.
It reads directory entries and ``stat`` results only, never file content.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from provision.errors import HostileContentError
from provision.formats.pickles import is_pickle_name
from provision.stages.verify.report import Check

EntryKind = Literal["file", "symlink-in", "symlink-out", "pickle", "special", "dir-link"]


@dataclass
class Entry:
    rel: str
    path: Path
    kind: EntryKind
    size: int | None = None
    target: str | None = None

    @property
    def readable(self) -> bool:
        """A regular file, directly or through a symlink that stays inside the folder."""
        return self.kind in ("file", "symlink-in")


def _symlink_entry(rel: str, p: Path, root_real: Path) -> Entry:
    target = os.path.realpath(p)
    inside = target == str(root_real) or target.startswith(str(root_real) + os.sep)
    if not inside:
        return Entry(rel, p, "symlink-out", target=target)
    if is_pickle_name(rel) or is_pickle_name(target):
        return Entry(rel, p, "pickle", target=target)
    if os.path.isdir(target):
        return Entry(rel, p, "dir-link", target=target)
    if os.path.isfile(target):
        return Entry(rel, p, "symlink-in", size=os.stat(target).st_size, target=target)
    return Entry(rel, p, "special", target=target)


def scan(root: Path) -> list[Entry]:
    """Every non-directory entry under ``root`` (symlinks are not followed), classified, by path."""
    root_real = root.resolve()
    out: list[Entry] = []
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue  # a folder that vanished or cannot be listed holds nothing to verify
        for e in entries:
            p = Path(e.path)
            rel = p.relative_to(root).as_posix()
            if e.is_symlink():
                out.append(_symlink_entry(rel, p, root_real))
            elif e.is_dir(follow_symlinks=False):
                stack.append(p)
            elif is_pickle_name(rel):
                out.append(Entry(rel, p, "pickle"))
            else:
                st = e.stat(follow_symlinks=False)
                kind: EntryKind = "file" if stat.S_ISREG(st.st_mode) else "special"
                out.append(Entry(rel, p, kind, size=st.st_size if kind == "file" else None))
    out.sort(key=lambda x: x.rel)
    return out


def hostile_check(e: Entry) -> Check | None:
    """The failed "hostile" check of a pickle, an escaping symlink or a special file; else None."""
    if e.kind == "pickle":
        err = HostileContentError(
            f"Refusing {e.rel}: it is a pickle format ({Path(e.rel).suffix}), which can run code when loaded; "
            "provision reads safetensors only and never opens it.",
            hint="Delete it, or fetch the safetensors release instead.",
            path=e.rel,
        )
        return Check("hostile", e.rel, False, message=err.message, actual="pickle", error=err)
    if e.kind == "symlink-out":
        err = HostileContentError(
            f"Refusing {e.rel}: it is a symlink that leaves the model folder (to {e.target}).",
            hint="Replace it with the real file, or fetch the folder again.",
            path=e.rel, target=e.target,
        )
        return Check("hostile", e.rel, False, message=err.message, actual=f"symlink -> {e.target}", error=err)
    if e.kind == "special":
        err = HostileContentError(f"Refusing {e.rel}: not a regular file (a FIFO, device, socket or dangling "
                                  "link).", hint="Remove it.", path=e.rel)
        return Check("hostile", e.rel, False, message=err.message, actual="special", error=err)
    return None
