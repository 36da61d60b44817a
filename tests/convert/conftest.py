"""Fixtures for the convert tests.

* ``tiny128_src``: a tiny Pixtral whose decoder Linears all have in_features divisible by 128, so
  every one of them is quantized by the int schemes (the default tiny has dim 64); written once per
  session, read-only.

The tiny Mistral checkpoints (``tiny_7b``, ``tiny_7b_pickle``) come from tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

TINY128_PARAMS: dict[str, Any] = {
    "dim": 128,
    "n_layers": 2,
    "head_dim": 32,
    "hidden_dim": 256,
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
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "image_token_id": 10,
    },
}


@pytest.fixture(scope="session")
def tiny128_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from provision.testing.tiny import write_tiny

    out = tmp_path_factory.mktemp("tiny128") / "tiny128"
    write_tiny(out, seed=1, params=TINY128_PARAMS)
    return out
