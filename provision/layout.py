"""Where things live under ``PROVISION_HOME``: pure path arithmetic, nothing is read or created.

``Layout(home)`` gives every path below (the tree is the reference for the store's layout);
``Layout.model(name)`` those of one model (its name made a safe folder name) and
``Layout.model_at(dirname)`` those of a folder found by listing ``models/`` or ``staging/``::

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


ORIGINAL = "original"
STATE_FILE = "state.json"
LOCK_FILE = ".lock"


@dataclass(frozen=True)
class ModelPaths:
    """The paths of one model: ``root`` is ``models/<dirname>``, ``staging`` is ``staging/<dirname>``."""

    dirname: str
    root: Path
    staging: Path

    @property
    def original(self) -> Path:
        return self.root / ORIGINAL

    @property
    def state_file(self) -> Path:
        return self.root / STATE_FILE

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_FILE

    def profile(self, profile: str) -> Path:
        return self.root / model_dirname(profile)


@dataclass(frozen=True)
class Layout:
    home: Path

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def staging_root(self) -> Path:
        return self.home / "staging"

    @property
    def torrents(self) -> Path:
        return self.home / "torrents"

    @property
    def manifests(self) -> Path:
        return self.home / "manifests"

    def model_at(self, dirname: str) -> ModelPaths:
        """The paths of the model folder ``dirname`` exactly as listed under models/ or staging/."""
        return ModelPaths(dirname, self.models / dirname, self.staging_root / dirname)

    def model(self, name: str) -> ModelPaths:
        """The paths of the model called ``name`` (a manifest name, dn or org/repo)."""
        return self.model_at(model_dirname(name))

    def model_dir(self, name: str) -> Path:
        return self.model(name).root

    def original(self, name: str) -> Path:
        return self.model(name).original

    def profile(self, name: str, profile: str) -> Path:
        return self.model(name).profile(profile)

    def state_file(self, name: str) -> Path:
        return self.model(name).state_file

    def lock_file(self, name: str) -> Path:
        return self.model(name).lock_file

    def staging(self, name: str) -> Path:
        return self.model(name).staging

    def manifest_file(self, name: str) -> Path:
        """Where `provision run` records the manifest of a bare magnet or hf:// source."""
        return self.manifests / f"{name.replace('/', '--')}.toml"
