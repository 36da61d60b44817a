"""Where things live under ``PROVISION_HOME`` (pure path arithmetic, nothing is created).

::

    $PROVISION_HOME/                      default ~/.cache/provision
    ├── models/
    │   └── <model>/                      one folder per model (manifest name, dn or repo)
    │       ├── original/                 the verified original files, as published
    │       ├── <profile>/                each conversion, e.g. fp8-hf or bf16-mistral
    │       ├── state.json                the stages finished, with the facts they relied on
    │       └── .lock                     held by a running `provision run` (host, pid, start)
    ├── staging/<model>/                  downloads in progress (never trusted, moved after verify)
    ├── torrents/<infohash>.torrent       torrent metadata and
    ├── torrents/<infohash>.resume        libtorrent resume data
    └── manifests/<model>.toml            manifests written for magnet/hf sources
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def model_dirname(name: str) -> str:
    """A filesystem-safe folder name for a model name, a dn or an org/repo."""
    s = _SAFE.sub("-", name.replace("/", "--")).strip(".-")
    return s[:120] or "model"


@dataclass(frozen=True)
class Layout:
    home: Path

    @property
    def models(self) -> Path:
        return self.home / "models"

    def model_dir(self, name: str) -> Path:
        return self.models / model_dirname(name)

    def original(self, name: str) -> Path:
        return self.model_dir(name) / "original"

    def profile(self, name: str, profile: str) -> Path:
        return self.model_dir(name) / model_dirname(profile)

    def state_file(self, name: str) -> Path:
        return self.model_dir(name) / "state.json"

    def lock_file(self, name: str) -> Path:
        return self.model_dir(name) / ".lock"

    def staging(self, name: str) -> Path:
        return self.home / "staging" / model_dirname(name)

    @property
    def torrents(self) -> Path:
        return self.home / "torrents"

    @property
    def manifests(self) -> Path:
        return self.home / "manifests"
