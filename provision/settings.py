"""PROVISION_* environment variables, read once, and the default paths.

Nothing here touches the disk; ``Settings.load()`` only reads the environment.

Variables::

    PROVISION_HOME      where models, state, locks and resume data live (default ~/.cache/provision)
    PROVISION_DEBUG     1 to show tracebacks for expected errors
    PROVISION_LOG_FILE  append every message (and debug lines) to this file
    PROVISION_NETWORK   default network mode for BitTorrent: public (default) or closed
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def default_home() -> Path:
    env = os.environ.get("PROVISION_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "provision"


@dataclass(frozen=True)
class Settings:
    home: Path
    debug: bool
    log_file: Path | None
    network: str

    @classmethod
    def load(cls) -> Settings:
        log = os.environ.get("PROVISION_LOG_FILE")
        network = os.environ.get("PROVISION_NETWORK", "public").strip().lower() or "public"
        return cls(
            home=default_home(),
            debug=_flag("PROVISION_DEBUG"),
            log_file=Path(log).expanduser() if log else None,
            network=network,
        )

    @property
    def models_dir(self) -> Path:
        return self.home / "models"


def settings() -> Settings:
    return Settings.load()
