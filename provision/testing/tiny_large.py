"""Tiny checkpoints shaped like the big releases: a Mixtral-like MoE and a Pixtral-Large-like model.

* ``write_tiny_mixtral(out_dir, seed)``: text-only, ``params.json`` with the Mixtral torrent's keys
  (``moe: {num_experts: 8, num_experts_per_tok: 2}`` as in 8x7B/8x22B, no sliding window, rope
  1e6 as 8x22B writes it), tiny dims; ``consolidated.safetensors`` (bf16) with the real MoE tensor
  names (``layers.N.feed_forward.gate`` / ``experts.E.w1..w3``); ``tokenizer.model``, the v1
  SentencePiece model (32000 ids) both Mixtral torrents ship;
* ``write_tiny_pixtral_large(out_dir, seed)``: Pixtral Large 2411's ``params.json`` keys at tiny
  dims: rope 1e9, vocab 32768, ``vision_encoder`` with ``adapter_bias: false`` (no adapter bias
  tensors) and explicit ``image_break_token_id`` 14 / ``image_end_token_id`` 15; the tokenizer is mistral-common's ``mistral_instruct_tokenizer_241114.model.v7m1`` (the v7
  SentencePiece model with image support; its [IMG_BREAK]/[IMG_END] are 14/15), written as
  ``tokenizer.model.v7m1``.

Each also writes ``manifest.toml`` (sizes + sha256, hf source ``provision/tiny-<kind>`` at a
deterministic revision, or with ``source="local"`` the folder itself). Nothing is downloaded; this is what the MoE, Pixtral Large and
placement tests run on. It does not convert or verify.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from provision.formats.manifest import FileSpec, Manifest, SmokeImage, SmokeSpec, write_manifest
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

TINY_MIXTRAL_PARAMS: dict[str, Any] = {  # the 8x22B torrent's keys, in its order
    "dim": 64,
    "n_layers": 3,
    "head_dim": 16,
    "hidden_dim": 96,
    "n_heads": 4,
    "n_kv_heads": 2,
    "rope_theta": 1000000,
    "norm_eps": 1e-05,
    "vocab_size": 32000,
    "moe": {"num_experts": 8, "num_experts_per_tok": 2},
}

TINY_PIXTRAL_LARGE_PARAMS: dict[str, Any] = {  # Pixtral Large 2411's keys, tiny dims
    "dim": 64,
    "n_layers": 2,
    "head_dim": 16,
    "hidden_dim": 128,
    "n_heads": 4,
    "n_kv_heads": 2,
    "rope_theta": 1000000000.0,
    "norm_eps": 1e-05,
    "vocab_size": 32768,
    "vision_encoder": {
        "hidden_size": 48,
        "num_channels": 3,
        "image_size": 1024,
        "patch_size": 16,
        "rope_theta": 10000.0,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_token_id": 10,
        "image_break_token_id": 14,
        "image_end_token_id": 15,
        "adapter_bias": False,
    },
}

KINDS = {"mixtral": ("tokenizer.model", "tokenizer.model.v1"),
         "pixtral-large": ("tokenizer.model.v7m1", "mistral_instruct_tokenizer_241114.model.v7m1")}


def _mc_data(name: str) -> Path:
    import mistral_common

    return Path(mistral_common.__file__).resolve().parent / "data" / name


def _write(out_dir: Path, kind: str, params: dict[str, Any], seed: int, smoke: SmokeSpec,
           description: str, source: TinySource) -> TinyResult:
    from safetensors.torch import save

    tok_name, tok_src = KINDS[kind]
    args = ModelArgs.from_dict(params)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "params.json", (json.dumps(params, indent=2) + "\n").encode())
    atomic_write_bytes(out_dir / "consolidated.safetensors",
                       save(tiny_state_dict(args, seed), metadata={"format": "pt"}))
    atomic_write_bytes(out_dir / tok_name, _mc_data(tok_src).read_bytes())
    names = ("consolidated.safetensors", "params.json", tok_name)
    facts = {n: ((out_dir / n).stat().st_size, sha256_file(out_dir / n)) for n in names}
    manifest = Manifest(
        name=f"tiny-{kind}",
        architecture="mixtral" if kind == "mixtral" else "pixtral",
        format="mistral",
        description=f"{description} (seed {seed}).",
        sources=(tiny_manifest_source(source, f"provision/tiny-{kind}", facts),),
        files=tuple(FileSpec(path=n, size=s, sha256=h) for n, (s, h) in sorted(facts.items())),
        smoke=smoke,
    )
    manifest = write_manifest(manifest, out_dir / MANIFEST_NAME)
    return TinyResult(out_dir=out_dir, manifest=manifest, files=facts)


def write_tiny_mixtral(out_dir: Path, seed: int = 0, *, params: dict[str, Any] | None = None,
                       source: TinySource = "hf") -> TinyResult:
    """A tiny Mixtral-like (sparse MoE, 8 experts, top 2) text-only checkpoint in ``out_dir``."""
    return _write(out_dir, "mixtral", dict(params or TINY_MIXTRAL_PARAMS), seed,
                  SmokeSpec(prompt="What is the capital of France? Answer in one word.", max_tokens=8),
                  "Tiny Mixtral-like mixture-of-experts checkpoint for tests", source)


def write_tiny_pixtral_large(out_dir: Path, seed: int = 0, *, params: dict[str, Any] | None = None,
                             source: TinySource = "hf") -> TinyResult:
    """A tiny Pixtral-Large-like checkpoint (no adapter bias, break/end ids 14/15, v7m1 tokenizer)."""
    return _write(out_dir, "pixtral-large", dict(params or TINY_PIXTRAL_LARGE_PARAMS), seed,
                  SmokeSpec(prompt="What colour is the square in this image? Answer in one word.", max_tokens=8,
                            image=SmokeImage(kind="square", width=64, height=48, color="red",
                                             background="white")),
                  "Tiny Pixtral-Large-like checkpoint for tests", source)
