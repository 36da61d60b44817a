"""Tiny pickled releases shaped like Mistral's torrents (7B v0.1, Mixtral 8x7B), and their safetensors twins.

``write_pickled_release(out_dir, kind, seed, shards=1)`` writes what the torrent of that release
holds, at tiny dims: ``params.json`` (7B: no ``rope_theta``, as the 7B torrent; Mixtral: the MoE
keys), ``tokenizer.model`` (mistral-common's v1 SentencePiece model, byte-identical to the one
both torrents ship) and the weights saved by ``torch.save``: one ``consolidated.00.pth``, or
with ``shards=N`` the Hub's Mistral layout ``consolidated.00.pt`` ... (layers split in order,
the embeddings in the first shard, the final norm and output in the last). Optionally
``legacy=True`` saves with torch's pre-zip format. ``write_safetensors_twin`` writes the same
weights as ``consolidated.safetensors`` beside the same ``params.json`` and tokenizer: the release
a pickled run must equal byte for byte after conversion. Both are deterministic for a seed.
It does not seed, fetch, import or convert anything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from provision.errors import UsageError
from provision.formats.params import ModelArgs
from provision.io.atomic import atomic_write_bytes
from provision.testing.tiny import tiny_state_dict
from provision.testing.tiny_large import TINY_MIXTRAL_PARAMS
from provision.testing.tiny_text import TINY_7B_PARAMS, tokenizer_for

PickledKind = Literal["7b", "mixtral"]
SINGLE_NAME = "consolidated.00.pth"


@dataclass(frozen=True)
class PickledRelease:
    """A written tiny release: its folder, its pickles in order, and every file's (size, sha256, md5)."""

    folder: Path
    pickles: tuple[str, ...]
    files: dict[str, tuple[int, str, str]]

    def sha256(self, name: str) -> str:
        return self.files[name][1]

    def md5(self, name: str) -> str:
        return self.files[name][2]


def release_params(kind: PickledKind) -> dict[str, Any]:
    """The tiny params.json of a kind (the 7B torrent's keys without rope_theta, or Mixtral's)."""
    if kind == "7b":
        return dict(TINY_7B_PARAMS)
    if kind == "mixtral":
        return json.loads(json.dumps(TINY_MIXTRAL_PARAMS))
    raise UsageError(f"Unknown pickled release kind {kind!r}; use 7b or mixtral.")


def shard_names(shards: int) -> tuple[str, ...]:
    """The weight file names: the torrent's one .pth, or the Hub layout's .pt shards."""
    if shards < 1:
        raise UsageError(f"shards must be at least 1, got {shards}.")
    return (SINGLE_NAME,) if shards == 1 else tuple(f"consolidated.{i:02d}.pt" for i in range(shards))


def split_state_dict(sd: dict[str, Any], n_layers: int, shards: int) -> list[dict[str, Any]]:
    """Split a state dict by layer into ``shards`` parts (embeddings first, norm and output last)."""
    parts: list[dict[str, Any]] = [{} for _ in range(shards)]
    for name, t in sd.items():
        if name.startswith("layers."):
            layer = int(name.split(".")[1])
            parts[min(shards - 1, layer * shards // n_layers)][name] = t
        elif name.startswith("tok_embeddings"):
            parts[0][name] = t
        else:
            parts[-1][name] = t
    return parts


def _facts(folder: Path, names: list[str]) -> dict[str, tuple[int, str, str]]:
    out = {}
    for n in names:
        data = (folder / n).read_bytes()
        out[n] = (len(data), hashlib.sha256(data).hexdigest(), hashlib.md5(data, usedforsecurity=False).hexdigest())
    return out


def _common(folder: Path, kind: PickledKind, params: dict[str, Any] | None) -> tuple[dict[str, Any], ModelArgs]:
    p = params if params is not None else release_params(kind)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / "params.json", (json.dumps(p, indent=4) + "\n").encode())
    atomic_write_bytes(folder / "tokenizer.model", tokenizer_for("7b")[1].read_bytes())
    return p, ModelArgs.from_dict(p)


def write_pickled_release(out_dir: Path, kind: PickledKind = "7b", seed: int = 0, *, shards: int = 1,
                          legacy: bool = False, params: dict[str, Any] | None = None) -> PickledRelease:
    """Write a tiny pickled release of ``kind`` into ``out_dir`` (see the module docstring)."""
    import torch

    folder = Path(out_dir)
    names = shard_names(shards)
    _p, args = _common(folder, kind, params)
    parts = split_state_dict(tiny_state_dict(args, seed), args.n_layers, shards)
    for name, part in zip(names, parts, strict=True):
        torch.save(part, folder / name, _use_new_zipfile_serialization=not legacy)
    return PickledRelease(folder, names, _facts(folder, [*names, "params.json", "tokenizer.model"]))


def write_safetensors_twin(out_dir: Path, kind: PickledKind = "7b", seed: int = 0, *,
                           params: dict[str, Any] | None = None) -> PickledRelease:
    """The same weights, params.json and tokenizer as ``write_pickled_release``, as safetensors."""
    from safetensors.torch import save

    folder = Path(out_dir)
    _p, args = _common(folder, kind, params)
    atomic_write_bytes(folder / "consolidated.safetensors", save(tiny_state_dict(args, seed),
                                                                 metadata={"format": "pt"}))
    return PickledRelease(folder, (), _facts(folder, ["consolidated.safetensors", "params.json", "tokenizer.model"]))
