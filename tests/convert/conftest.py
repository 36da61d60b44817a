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

from provision.testing.tiny import TINY_PARAMS

# the default tiny (tests' TINY_PARAMS) with the decoder widened to 128 and one vision layer
TINY128_PARAMS: dict[str, Any] = {
    **TINY_PARAMS, "dim": 128, "head_dim": 32, "hidden_dim": 256,
    "vision_encoder": {**TINY_PARAMS["vision_encoder"], "num_hidden_layers": 1},
}


@pytest.fixture(scope="session")
def tiny128_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from provision.testing.tiny import write_tiny

    out = tmp_path_factory.mktemp("tiny128") / "tiny128"
    write_tiny(out, seed=1, params=TINY128_PARAMS)
    return out
