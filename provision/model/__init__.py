"""Pixtral in plain PyTorch: ``args`` (params.json, no torch), ``layers``, ``vision``, ``pixtral``
(the module tree, equal to the checkpoint keys) and ``loader`` (``load_model``).

Importing this package imports nothing heavy; ``provision.model.load_model`` is resolved lazily.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("load_model", "open_checkpoint"):
        from provision.model import loader

        return getattr(loader, name)
    raise AttributeError(name)
