"""A stand-in for the ``pynvml`` module, serving a recorded card's answers.

``FakeNVML.card(key)`` answers from ``tests/fixtures/nvml/<key>.nvml.json``; ``smi_text(key)`` is
that card's recorded ``nvidia-smi -q`` text; ``CARDS`` names the recorded cards. Test-only; it
implements only the calls ``provision.hardware`` makes.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

NVML_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "nvml"
CARDS = ("t4", "a10g", "l4", "a100-40gb", "a100-80gb", "h100")


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
