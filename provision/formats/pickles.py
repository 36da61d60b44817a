"""Which file names are pickles: the one list of suffixes provision refuses to load.

Pickle formats (``torch.save``'s ``.pt``/``.pth``, ``.bin``, ``.ckpt``, ``.pkl``) can run code
when loaded, so manifests only list them for ``provision import-pickle``, verify refuses them
unopened, and the loader and convert never read them. This module only names them; it never
opens a file.
"""

from __future__ import annotations

PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def is_pickle_name(name: str) -> bool:
    """True when the file name (or path) ``name`` ends in a pickle suffix, in any letter case."""
    return name.lower().endswith(PICKLE_SUFFIXES)
