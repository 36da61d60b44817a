"""Hostile-path checks for names that come from outside (torrents, manifests, hub listings).

A name must stay inside its destination: no absolute paths, no ``..``, no NUL, no backslashes,
no symlink on the way that leads out. Nothing here reads or writes files.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from provision.errors import HostileContentError


def safe_relpath(name: str, *, what: str = "path") -> PurePosixPath:
    """Validate a relative path that came from outside; return it normalised.

    Raises ``HostileContentError`` for absolute paths, ``..`` components, NUL bytes,
    backslashes, drive letters and empty names.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise HostileContentError(f"Refusing {what} {name!r}: empty or contains a NUL byte.", path=str(name))
    if "\\" in name:
        raise HostileContentError(f"Refusing {what} {name!r}: backslashes are not allowed.", path=name)
    p = PurePosixPath(name)
    if p.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise HostileContentError(f"Refusing {what} {name!r}: absolute paths are not allowed.", path=name)
    parts = [x for x in p.parts if x not in ("", ".")]
    if not parts or any(x == ".." for x in parts):
        raise HostileContentError(
            f"Refusing {what} {name!r}: it would leave the destination folder ('..').", path=name
        )
    return PurePosixPath(*parts)


def safe_join(root: Path, name: str, *, what: str = "path") -> Path:
    """Join a hostile relative path under ``root`` and check no symlink leads out."""
    rel = safe_relpath(name, what=what)
    target = Path(root) / Path(*rel.parts)
    root_real = Path(root).resolve()
    # resolve() follows symlinks on every existing component
    resolved = target.resolve()
    if resolved != root_real and root_real not in resolved.parents:
        raise HostileContentError(
            f"Refusing {what} {name!r}: it resolves outside {root} through a symlink.", path=name
        )
    return target
