"""Fixtures for the model tests (the Pixtral model, MoE, Pixtral Large, placement, parity).

* ``tiny_model`` / ``tiny_tok``: the tiny checkpoint loaded once per module in float32 on the CPU,
  and its mistral-common tokenizer;
* ``tiny_hf``: the tiny checkpoint rewritten in the transformers (Llava) layout, once per module;
* ``tiny_mixtral`` / ``tiny_pixtral_large``: tiny checkpoints from ``provision.testing.tiny_large``
  (session-scoped, read-only).

The transformers reference itself lives in ``tests.support.hf_reference``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.hf_reference import write_hf_copy


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
