"""Every ``PROVISION_*`` environment variable, read in one place, and the default home.

``Settings.load()`` only reads the environment (never the disk); other modules call it (or take
a ``Settings``) instead of reading ``os.environ``. The table is the reference for the variables::

    PROVISION_HOME                   where models, state, locks and resume data live (default ~/.cache/provision)
    PROVISION_DEBUG                  1 to show tracebacks for expected errors
    PROVISION_LOG_FILE               append every message (and debug lines) to this file
    PROVISION_NETWORK                default network mode for BitTorrent: public (default) or closed
    PROVISION_MANIFESTS              extra folders (os.pathsep-separated) searched for manifest names first
    PROVISION_PROGRESS_INTERVAL      seconds between plain progress lines without a TTY (default 5)
    PROVISION_LOCK_TIMEOUT           seconds to wait for a model lock (default 60)
    PROVISION_LOCK_STALE_AFTER       seconds without a heartbeat before a lock counts as stale (default 120)
    PROVISION_FORBID_PUBLIC_NETWORK  1 to refuse any libtorrent session in the public network mode (tests set it)
    PROVISION_CONVERT_WORKERS        threads converting tensors (default: the usable CPUs, at most 8; --workers wins)
    PROVISION_SMOKE_ENGINE           default of smoke --engine / run --smoke-engine: provision, vllm or both
                                     (unset: both where vLLM can judge the model here, else provision)
    PROVISION_QUIET, PROVISION_VERBOSE  the -q / -v flags (read by click in the CLI)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

NetworkMode = Literal["public", "closed"]
NETWORK_MODES: tuple[NetworkMode, ...] = ("public", "closed")

_TRUE = {"1", "true", "yes", "on"}

DEFAULT_PROGRESS_INTERVAL = 5.0
DEFAULT_LOCK_TIMEOUT = 60.0
DEFAULT_LOCK_STALE_AFTER = 120.0


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, "") or default)
    except ValueError:
        return default


def default_home() -> Path:
    env = os.environ.get("PROVISION_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "provision"


def smoke_engine() -> str | None:
    """``PROVISION_SMOKE_ENGINE`` lower-cased (validated where it is used), None when unset."""
    v = os.environ.get("PROVISION_SMOKE_ENGINE", "").strip().lower()
    return v or None


def network_mode() -> str:
    """``PROVISION_NETWORK`` as given (lower-cased; validated where it is used), default ``public``."""
    return os.environ.get("PROVISION_NETWORK", "public").strip().lower() or "public"


@dataclass(frozen=True)
class Settings:
    home: Path
    debug: bool
    log_file: Path | None
    network: str
    manifest_dirs: tuple[Path, ...] = ()
    progress_interval: float = DEFAULT_PROGRESS_INTERVAL
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    lock_stale_after: float = DEFAULT_LOCK_STALE_AFTER
    forbid_public_network: bool = False
    convert_workers: str | None = None  # validated where it is used (provision.stages.convert.parallel)

    @classmethod
    def load(cls) -> Settings:
        log = os.environ.get("PROVISION_LOG_FILE")
        manifests = os.environ.get("PROVISION_MANIFESTS", "")
        return cls(
            home=default_home(),
            debug=_flag("PROVISION_DEBUG"),
            log_file=Path(log).expanduser() if log else None,
            network=network_mode(),
            manifest_dirs=tuple(Path(p) for p in manifests.split(os.pathsep) if p),
            progress_interval=_float("PROVISION_PROGRESS_INTERVAL", DEFAULT_PROGRESS_INTERVAL),
            lock_timeout=_float("PROVISION_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT),
            lock_stale_after=_float("PROVISION_LOCK_STALE_AFTER", DEFAULT_LOCK_STALE_AFTER),
            forbid_public_network=os.environ.get("PROVISION_FORBID_PUBLIC_NETWORK") == "1",
            convert_workers=os.environ.get("PROVISION_CONVERT_WORKERS", "").strip() or None,
        )
