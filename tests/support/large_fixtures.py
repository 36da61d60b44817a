"""Fixtures for the Mixtral (MoE), Pixtral Large and placement tests.

* ``tiny_mixtral`` / ``tiny_pixtral_large``: tiny checkpoints from ``provision.testing.tiny_large``
  (session-scoped, read-only);
* ``write_hf_mixtral_copy(src, dst)``: a Mixtral-like checkpoint rewritten for transformers'
  ``MixtralForCausalLM`` (the on-disk names of ``mistralai/Mixtral-8x7B-v0.1``: ``block_sparse_moe``);
* ``write_hf_llava_copy(src, dst)``: a Pixtral-Large-like checkpoint rewritten for
  ``LlavaForConditionalGeneration`` (``multimodal_projector_bias: false``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from provision.testing.tiny_large import write_tiny_mixtral

    out = tmp_path_factory.mktemp("tiny-mixtral") / "tiny-mixtral"
    write_tiny_mixtral(out, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_pixtral_large(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from provision.testing.tiny_large import write_tiny_pixtral_large

    out = tmp_path_factory.mktemp("tiny-pixtral-large") / "tiny-pixtral-large"
    write_tiny_pixtral_large(out, seed=0)
    return out


def write_hf_mixtral_copy(src: Path, dst: Path) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    from provision.formats.params import ModelArgs
    from provision.model.moe import hf_mixtral_config, mistral_to_hf_mixtral

    args = ModelArgs.from_file(src / "params.json")
    sd = load_file(str(src / "consolidated.safetensors"))
    out = dict(mistral_to_hf_mixtral(k, v.to(torch.float32), args) for k, v in sd.items())
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(hf_mixtral_config(args, dtype="float32"), indent=2), encoding="utf-8")
    return dst


def hf_mixtral_model(hf_dir: Path) -> Any:
    import torch
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


def write_hf_llava_copy(src: Path, dst: Path) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    from provision.formats.params import ModelArgs
    from provision.model.hf_names import hf_config, mistral_to_hf

    args = ModelArgs.from_file(src / "params.json")
    sd = load_file(str(src / "consolidated.safetensors"))
    out = dict(mistral_to_hf(k, v.to(torch.float32), args) for k, v in sd.items())
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(hf_config(args, dtype="float32"), indent=2), encoding="utf-8")
    return dst
