"""Fixtures of the vLLM smoke tests: tiny models vLLM's CPU attention can run, and the vLLM gate.

vLLM's CPU attention refuses some head sizes (24 was refused, 64 works), so the tiny 7B- and
NeMo-shaped models here use ``head_dim`` 64 (the release's own ``provision.testing.tiny_text``
models use 16). ``require_vllm`` skips a test where vLLM is not installed, and fails it in CI
(``CI=true``), where ``.ci/run`` installs it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from provision.testing.tiny_text import tiny_params, write_tiny_mistral

VLLM_HEAD_DIM = 64


def vllm_tiny_params(kind: str) -> dict[str, object]:
    """The tiny ``kind`` model's params.json with head sizes vLLM's CPU attention supports."""
    p = tiny_params(kind)
    p.update(dim=128, n_heads=2, n_kv_heads=1, head_dim=VLLM_HEAD_DIM, hidden_dim=256)
    return p


def write_vllm_tiny(out: Path, kind: str) -> Path:
    write_tiny_mistral(out, kind, params=vllm_tiny_params(kind), source="local")
    return out


@pytest.fixture
def require_vllm() -> None:
    from provision.stages.smoke_vllm import vllm_available

    ok, why = vllm_available()
    if not ok:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI runs the vLLM tests and {why}; .ci/run installs it.")
        pytest.skip(why)
