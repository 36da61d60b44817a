"""Parity with an independent implementation: transformers' LlavaForConditionalGeneration + Pixtral.

The tiny checkpoint is converted with provision's key map to the transformers layout; both models
get the same token ids and the same mistral-common-preprocessed images, in float32 on the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from provision.formats.manifest import load_manifest
from provision.model.inputs import encode_chat, square_image
from provision.model.pixtral import greedy_generate
from tests.support.hf_reference import hf_greedy, hf_logits, hf_model, load_golden, require_transformers

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def reference(tiny_hf: Path) -> Any:
    require_transformers()
    return hf_model(tiny_hf)


def _random_image(w: int, h: int, seed: int) -> Any:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy(), "RGB")


def test_logits_match_transformers_for_text_and_two_images(tiny_model: Any, tiny_tok: Any, reference: Any) -> None:
    enc = encode_chat(tiny_tok, "Compare these two pictures, please.",
                      [_random_image(64, 48, 1), _random_image(200, 120, 2)])
    with torch.no_grad():
        ours = tiny_model(torch.tensor([enc.tokens]), enc.images)
    theirs = hf_logits(reference, enc.tokens, enc.images)
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-3, f"max abs logit difference {diff}"


def test_greedy_tokens_match_transformers(tiny_model: Any, tiny_tok: Any, reference: Any) -> None:
    enc = encode_chat(tiny_tok, "What is in this image?", [_random_image(96, 64, 3)])
    ours = greedy_generate(tiny_model, enc.tokens, enc.images, max_tokens=6, eos_id=2).tokens
    assert ours == hf_greedy(reference, enc.tokens, enc.images, 6)


def test_golden_ids_are_what_transformers_generates_for_the_smoke_inputs(
        tiny_src: Path, tiny_tok: Any, reference: Any) -> None:
    spec = load_manifest(tiny_src / "manifest.toml").smoke
    enc = encode_chat(tiny_tok, spec.prompt, [square_image(spec.image)])
    golden = load_golden()
    assert enc.tokens == golden["prompt_token_ids"]
    assert hf_greedy(reference, enc.tokens, enc.images, spec.max_tokens) == golden["token_ids"]
