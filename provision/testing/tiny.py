"""The built-in tiny Pixtral-architecture checkpoint that tests and the demo use.

``write_tiny(out_dir, seed)`` writes, in Mistral format:

* ``params.json`` with the same keys as the real release's (small dims, same token ids,
  vocab 131072 so the real tokenizer works);
* ``consolidated.safetensors`` with exactly the real tensor names (shapes scaled), bf16,
  deterministic for a seed;
* ``tekken.json``: mistral-common's ``tekken_240911.json`` with its image section under the
  release's key ``multimodal`` (mistral-common >= 1.13 renamed it ``image``; both load);
* ``manifest.toml`` describing those files with sizes and sha256; its one source is, with
  ``source="hf"`` (the tests' default), the repo ``provision/tiny-pixtral`` that only the tests'
  loopback hub serves, or with ``source="local"`` the folder it is written in (``path = "."``),
  which ``provision run`` takes in without any network.

Nothing in the project downloads weights; this is what everything is tested on.
It does not seed, serve or verify the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from provision.formats.manifest import FileSpec, Manifest, SmokeImage, SmokeSpec, Source, write_manifest
from provision.formats.params import ModelArgs, tensor_spec
from provision.io.atomic import atomic_write_bytes
from provision.io.hashing import sha256_file

TINY_NAME = "tiny-pixtral"
TINY_REPO = "provision/tiny-pixtral"
MANIFEST_NAME = "manifest.toml"
FILES = ("consolidated.safetensors", "params.json", "tekken.json")
TinySource = Literal["hf", "local"]  # what a tiny checkpoint's manifest names as its source

TINY_PARAMS: dict[str, Any] = {
    "dim": 64,
    "n_layers": 2,
    "head_dim": 16,
    "hidden_dim": 128,
    "n_heads": 4,
    "n_kv_heads": 2,
    "rope_theta": 1000000000.0,
    "norm_eps": 1e-05,
    "vocab_size": 131072,
    "vision_encoder": {
        "hidden_size": 64,
        "num_channels": 3,
        "image_size": 1024,
        "patch_size": 16,
        "rope_theta": 10000.0,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_token_id": 10,
    },
}


@dataclass(frozen=True)
class TinyResult:
    out_dir: Path
    manifest: Manifest
    files: dict[str, tuple[int, str]]  # path -> (size, sha256)


def tiny_manifest_source(source: TinySource, repo: str, facts: dict[str, tuple[int, str]]) -> Source:
    """The one source of a tiny manifest: the folder it sits in ("local", path "."), or ``repo`` on the
    tests' loopback hub ("hf") at a revision derived from the files' sizes and hashes."""
    if source == "local":
        return Source(type="local", path=".")
    revision = hashlib.sha1("".join(f"{n}:{s}:{h}\n" for n, (s, h) in sorted(facts.items())).encode()).hexdigest()
    return Source(type="hf", repo=repo, revision=revision)


def tekken_source_path() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).resolve().parent / "data" / "tekken_240911.json"


def release_tekken_bytes() -> bytes:
    """mistral-common's tekken_240911.json with the image section keyed ``multimodal``, as released."""
    raw = tekken_source_path().read_bytes()
    if b'"multimodal":' in raw:
        return raw
    if raw.count(b'"image": {') != 1:  # pragma: no cover - a future mistral-common layout
        return raw
    return raw.replace(b'"image": {', b'"multimodal": {')


def tiny_state_dict(args: ModelArgs, seed: int = 0) -> dict[str, Any]:
    """Deterministic bf16 tensors for every name in the spec (each seeded by seed and name)."""
    import torch

    sd: dict[str, Any] = {}
    for name, shape in tensor_spec(args).items():
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        if name.endswith("norm.weight") or name.endswith("ln_pre.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        elif name in ("tok_embeddings.weight",):
            t = torch.randn(shape, generator=g)
        else:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            t = torch.randn(shape, generator=g) / fan_in**0.5
        sd[name] = t.to(torch.bfloat16).contiguous()
    return sd


def write_tiny(out_dir: Path, seed: int = 0, *, params: dict[str, Any] | None = None,
               source: TinySource = "hf") -> TinyResult:
    """Write the tiny checkpoint and its manifest (naming ``source``) into ``out_dir`` (created if missing)."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    p = params or TINY_PARAMS
    args = ModelArgs.from_dict(p)
    atomic_write_bytes(out_dir / "params.json", (json.dumps(p, indent=2) + "\n").encode())
    blob = save(tiny_state_dict(args, seed), metadata={"format": "pt"})
    atomic_write_bytes(out_dir / "consolidated.safetensors", blob)
    atomic_write_bytes(out_dir / "tekken.json", release_tekken_bytes())
    facts = {name: ((out_dir / name).stat().st_size, sha256_file(out_dir / name)) for name in FILES}
    manifest = Manifest(
        name=TINY_NAME,
        architecture="pixtral",
        format="mistral",
        description=f"Tiny Pixtral-architecture checkpoint for tests and the demo (seed {seed}).",
        sources=(tiny_manifest_source(source, TINY_REPO, facts),),
        files=tuple(FileSpec(path=n, size=s, sha256=h) for n, (s, h) in sorted(facts.items())),
        smoke=SmokeSpec(
            prompt="What colour is the square in this image? Answer in one word.",
            expected=None,
            max_tokens=8,
            image=SmokeImage(kind="square", width=64, height=48, color="red", background="white"),
        ),
    )
    manifest = write_manifest(manifest, out_dir / MANIFEST_NAME)
    return TinyResult(out_dir=out_dir, manifest=manifest, files=facts)
