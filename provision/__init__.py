"""provision: take a bare GPU host to a verified, GPU-ready, smoke-tested copy of a model.

Importing the package is cheap: the stages (and torch, libtorrent, huggingface_hub) load only
when they are called.
"""

from __future__ import annotations

from provision.version import JSON_SCHEMA_VERSION, __version__

__all__ = ["JSON_SCHEMA_VERSION", "__version__", "run"]


def __getattr__(name: str) -> object:
    """``provision.run`` loads on first use; every stage function is in ``provision.api``
    (``provision.stages.plan``, ``provision.stages.fetch``... are the stage modules themselves)."""
    if name == "run":
        from provision import api

        return getattr(api, name)
    raise AttributeError(f"module 'provision' has no attribute {name!r}")
