"""Fixtures and helpers for the model, smoke and parity tests.

* ``tiny_model``: the tiny checkpoint loaded once per module in float32 on the CPU;
* ``tiny_tok``: its mistral-common tokenizer;
* ``write_hf_copy(src, dst)``: the tiny checkpoint rewritten in the transformers (Llava) layout
  through ``provision.model.hf_names`` (config.json + model.safetensors), so the loader's hf path
  and transformers itself can read it;
* ``hf_greedy``: greedy decoding with transformers' ``LlavaForConditionalGeneration`` (parity
  tests and the golden-id generator only; transformers is a test-only dependency);
* ``GOLDEN``: the golden ids file for the tiny checkpoint (seed 0).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "tiny_seed0.json"


def load_golden() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(GOLDEN.read_text(encoding="utf-8"))
    return data


def write_hf_copy(src: Path, dst: Path, *, dtype: str = "float32") -> Path:
    """The Mistral-layout checkpoint in ``src`` rewritten in the transformers layout in ``dst``."""
    import torch
    from safetensors.torch import load_file, save_file

    from provision.formats.params import ModelArgs
    from provision.model.hf_names import hf_config, mistral_to_hf

    args = ModelArgs.from_file(src / "params.json")
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    sd = load_file(str(src / "consolidated.safetensors"))
    out = dict(mistral_to_hf(k, v.to(tdt), args) for k, v in sd.items())
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(hf_config(args, dtype=dtype), indent=2), encoding="utf-8")
    shutil.copy(src / "tekken.json", dst / "tekken.json")
    return dst


def hf_model(hf_dir: Path) -> Any:
    import torch
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


def hf_inputs(images: Sequence[Any]) -> dict[str, Any]:
    """pixel_values padded to the largest image (transformers' batching) and image_sizes."""
    import torch

    hmax = max(int(im.shape[1]) for im in images)
    wmax = max(int(im.shape[2]) for im in images)
    pv = torch.zeros(len(images), 3, hmax, wmax)
    for i, im in enumerate(images):
        pv[i, :, : im.shape[1], : im.shape[2]] = im
    sizes = torch.tensor([[int(im.shape[1]), int(im.shape[2])] for im in images])
    return {"pixel_values": pv, "image_sizes": sizes}


def hf_logits(model: Any, tokens: Sequence[int], images: Sequence[Any]) -> Any:
    import torch

    with torch.no_grad():
        ids = torch.tensor([list(tokens)])
        return model(input_ids=ids, **hf_inputs(images)).logits.float()


def hf_greedy(model: Any, tokens: Sequence[int], images: Sequence[Any], max_tokens: int, eos_id: int = 2) -> list[int]:
    """Greedy decoding by full recomputation with transformers (no cache: the simplest reference)."""
    seq = list(tokens)
    out: list[int] = []
    for _ in range(max_tokens):
        nxt = int(hf_logits(model, seq, images)[0, -1].argmax())
        out.append(nxt)
        if nxt == eos_id:
            break
        seq.append(nxt)
    return out


@pytest.fixture(scope="module")
def tiny_model(tiny_src: Path) -> Iterator[Any]:
    import torch

    from provision.model.loader import load_model

    model, _args = load_model(tiny_src, device="cpu", dtype=torch.float32)
    yield model


@pytest.fixture(scope="module")
def tiny_tok(tiny_src: Path) -> Any:
    from provision.model.inputs import load_tokenizer

    return load_tokenizer(tiny_src)


@pytest.fixture(scope="module")
def tiny_hf(tiny_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_copy(tiny_src, tmp_path_factory.mktemp("tiny-hf") / "tiny-pixtral-hf")


def require_transformers() -> Any:
    """transformers (a test-only dependency): missing fails in CI, skips elsewhere."""
    from provision.testing.ci import IN_CI

    try:
        import transformers
    except ImportError:
        if IN_CI:
            pytest.fail("transformers is not installed (the parity tests need it)")
        pytest.skip("transformers is not installed")
    return transformers
