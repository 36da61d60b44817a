"""Pixtral and the Mistral text models in plain PyTorch: layers, vision encoder, decoder, loader.

Module attribute names equal the checkpoint keys, so weights load with no renames. The package
imports nothing heavy; ``provision.model.load_model`` is resolved lazily. Nothing here fetches,
converts or verifies files.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("load_model", "open_checkpoint"):
        from provision.model import loader

        return getattr(loader, name)
    raise AttributeError(name)
