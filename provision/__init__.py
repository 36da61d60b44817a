"""provision: take a bare GPU host to a verified, GPU-ready, smoke-tested copy of a model.

Importing the package is cheap: the stages (and torch, libtorrent, huggingface_hub) load only
when they are called.
"""

from __future__ import annotations

__version__ = "0.1.0"
JSON_SCHEMA_VERSION = 1

__all__ = ["JSON_SCHEMA_VERSION", "__version__"]
