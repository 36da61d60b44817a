"""Tiny text-only Mistral checkpoints (7B-like and NeMo-like) for tests and demos.

``write_tiny_mistral(out_dir, kind="7b"|"nemo", seed=0)`` writes, in Mistral format:

* ``params.json`` with the release's keys and quirks at small dims: the 7B-like one has no
  ``rope_theta`` (it means 10000) and a ``sliding_window`` of 8 tokens, shorter than the smoke
  prompt; the NeMo-like one has ``rope_theta`` 1e6 and no window;
* the weights: ``consolidated.safetensors`` (bf16, the real tensor names, deterministic for a
  seed), or with ``weights="pickle"`` a ``consolidated.00.pth`` written by ``torch.save`` as the
  7B torrent ships it (for the pickle-import tests; provision itself never loads it);
* the tokenizer mistral-common bundles for that release: ``tokenizer.model`` (the v1
  SentencePiece model, 32000 ids, byte-identical to Mistral 7B's) or ``tekken.json``
  (``tekken_240718.json``, 131072 ids, NeMo's);
* ``manifest.toml`` with sizes and sha256 (source: hf repo ``provision/tiny-mistral-<kind>`` at a
  deterministic revision, or with ``source="local"`` the folder itself; the pickle, when written,
  is listed as ``pickle = true``).

It does not download anything, convert, or verify.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from provision.errors import UsageError
from provision.formats.manifest import FileSpec, Manifest, SmokeSpec, write_manifest
from provision.formats.params import ModelArgs
from provision.io.atomic import atomic_write_bytes
from provision.io.hashing import sha256_file
from provision.testing.tiny import (
    MANIFEST_NAME,
    TinyResult,
    TinySource,
    tiny_manifest_source,
    tiny_state_dict,
)

KINDS = ("7b", "nemo")
PICKLE_NAME = "consolidated.00.pth"

TINY_7B_PARAMS: dict[str, Any] = {  # the 7B v0.1 torrent's keys, in its order; no rope_theta
    "dim": 64,
    "n_layers": 2,
    "head_dim": 16,
    "hidden_dim": 128,
    "n_heads": 4,
    "n_kv_heads": 2,
    "norm_eps": 1e-05,
    "sliding_window": 8,
    "vocab_size": 32000,
}

TINY_NEMO_PARAMS: dict[str, Any] = {  # NeMo 2407's keys, in its order
    "dim": 64,
    "n_layers": 2,
    "head_dim": 16,
    "hidden_dim": 128,
    "n_heads": 4,
    "n_kv_heads": 2,
    "norm_eps": 1e-05,
    "vocab_size": 131072,
    "rope_theta": 1000000.0,
}

SMOKE_PROMPT = "What is the capital of France? Answer in one word."


def _mc_data(name: str) -> Path:
    import mistral_common

    return Path(mistral_common.__file__).resolve().parent / "data" / name


def tokenizer_for(kind: str) -> tuple[str, Path]:
    """(file name in the checkpoint, mistral-common's bundled source file) for a kind."""
    if kind == "7b":
        return "tokenizer.model", _mc_data("tokenizer.model.v1")
    if kind == "nemo":
        return "tekken.json", _mc_data("tekken_240718.json")
    raise UsageError(f"Unknown tiny model kind {kind!r}; use one of {', '.join(KINDS)}.")


def tiny_params(kind: str) -> dict[str, Any]:
    tokenizer_for(kind)  # validates kind
    return dict(TINY_7B_PARAMS if kind == "7b" else TINY_NEMO_PARAMS)


def _pickle_bytes(sd: dict[str, Any]) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def write_tiny_mistral(out_dir: Path, kind: str = "7b", seed: int = 0, *, weights: str = "safetensors",
                       params: dict[str, Any] | None = None, source: TinySource = "hf") -> TinyResult:
    """Write a tiny text-only checkpoint of ``kind`` into ``out_dir`` (created if missing)."""
    from safetensors.torch import save

    if weights not in ("safetensors", "pickle"):
        raise UsageError(f"weights must be 'safetensors' or 'pickle', got {weights!r}.")
    tok_name, tok_src = tokenizer_for(kind)
    p = params if params is not None else tiny_params(kind)
    args = ModelArgs.from_dict(p)
    if args.vision_encoder is not None:
        raise UsageError("write_tiny_mistral writes text-only checkpoints; drop vision_encoder from params.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = tiny_state_dict(args, seed)
    atomic_write_bytes(out_dir / "params.json", (json.dumps(p, indent=4) + "\n").encode())
    weights_name = "consolidated.safetensors" if weights == "safetensors" else PICKLE_NAME
    blob = save(sd, metadata={"format": "pt"}) if weights == "safetensors" else _pickle_bytes(sd)
    atomic_write_bytes(out_dir / weights_name, blob)
    atomic_write_bytes(out_dir / tok_name, tok_src.read_bytes())
    names = (weights_name, "params.json", tok_name)
    facts = {n: ((out_dir / n).stat().st_size, sha256_file(out_dir / n)) for n in names}
    specs = []
    for n, (s, h) in sorted(facts.items()):
        spec = FileSpec(path=n, size=s, sha256=h)
        if n == PICKLE_NAME:
            spec = replace(spec, pickle=True, optional=True)
        specs.append(spec)
    manifest = Manifest(
        name=f"tiny-mistral-{kind}",
        architecture="mistral",
        format="mistral",
        description=f"Tiny text-only {'Mistral 7B v0.1' if kind == '7b' else 'Mistral NeMo 12B'}-like "
                    f"checkpoint for tests (seed {seed}).",
        sources=(tiny_manifest_source(source, f"provision/tiny-mistral-{kind}", facts),),
        files=tuple(specs),
        smoke=SmokeSpec(prompt=SMOKE_PROMPT, expected=None, max_tokens=8),
    )
    manifest = write_manifest(manifest, out_dir / MANIFEST_NAME)
    return TinyResult(out_dir=out_dir, manifest=manifest, files=facts)
