"""Fixtures for the convert, hardware and profile tests.

* ``PIXTRAL_12B_PARAMS_JSON``: Pixtral 12B's released ``params.json``, byte for byte as
  Mistral released it (453 bytes);
* ``TINY128_PARAMS``: a tiny Pixtral whose decoder Linears all have in_features divisible by
  128, so every one of them is quantized by the int schemes (the default tiny has dim 64);
* ``make_tiny128``: that checkpoint, written once per session (read-only);
* ``FakeNVML``: a stand-in for the ``pynvml`` module serving a recorded card's answers from
  ``tests/fixtures/nvml/<card>.nvml.json``;
* ``load_st(path)``: every tensor of a safetensors file (test-only, small files).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

NVML_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "nvml"
CARDS = ("t4", "a10g", "l4", "a100-40gb", "a100-80gb", "h100")

PIXTRAL_12B_PARAMS_JSON = """{
  "dim": 5120,
  "n_layers": 40,
  "head_dim": 128,
  "hidden_dim": 14336,
  "n_heads": 32,
  "n_kv_heads": 8,
  "rope_theta": 1000000000.0,
  "norm_eps": 1e-05,
  "vocab_size": 131072,
  "vision_encoder": {
    "hidden_size": 1024,
    "num_channels": 3,
    "image_size": 1024,
    "patch_size": 16,
    "rope_theta": 10000.0,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_token_id": 10
  }
}
"""

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


def pixtral_args() -> Any:
    from provision.formats.params import ModelArgs

    return ModelArgs.from_dict(json.loads(PIXTRAL_12B_PARAMS_JSON))


_TINY128: dict[str, Path] = {}


def make_tiny128(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny128 checkpoint, written once per session (test modules wrap this in a fixture)."""
    from provision.testing.tiny import write_tiny

    if "dir" not in _TINY128:
        out = tmp_path_factory.mktemp("tiny128") / "tiny128"
        write_tiny(out, seed=1, params=TINY128_PARAMS)
        _TINY128["dir"] = out
    return _TINY128["dir"]


class FakeNVML:
    """The subset of ``pynvml`` that ``hardware.detect_nvml`` calls, answering from a recording."""

    def __init__(self, recording: dict[str, Any], *, fail_init: bool = False) -> None:
        self.devices = recording["devices"]
        self.fail_init = fail_init
        self.shutdown_called = False

    @classmethod
    def card(cls, key: str, count: int = 1) -> FakeNVML:
        rec = json.loads((NVML_DIR / f"{key}.nvml.json").read_text(encoding="utf-8"))
        rec["devices"] = rec["devices"] * count
        return cls(rec)

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdown_called = True

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return str(self.devices[h]["name"]).encode()  # older pynvml returns bytes

    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:
        major, minor = self.devices[h]["cuda_compute_capability"]
        return int(major), int(minor)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        m = self.devices[h]["memory"]
        return SimpleNamespace(total=m["total"], free=m["free"], used=m["used"])


def smi_text(key: str) -> str:
    return (NVML_DIR / f"{key}.nvidia-smi-q.txt").read_text(encoding="utf-8")


def load_st(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return dict(load_file(str(path)))


def require_compressed_tensors() -> Any:
    """compressed-tensors (a test-only dependency): missing fails in CI, skips elsewhere."""
    from provision.testing.ci import IN_CI

    try:
        import compressed_tensors
    except ImportError:
        if IN_CI:
            pytest.fail("compressed-tensors is not installed (the parity tests need it)")
        pytest.skip("compressed-tensors is not installed")
    return compressed_tensors
