"""What the host has: GPUs (through NVML, never importing torch), CPU count, memory.

``detect()`` returns a ``Hardware`` record; it never fails (no NVML or no GPU means a CPU
host). The profile table and ``--target`` parsing build on it in the convert stage.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    compute_capability: tuple[int, int]
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class Hardware:
    gpus: tuple[GPU, ...] = ()
    cpu_count: int = 1
    ram_bytes: int = 0
    source: str = "none"  # nvml | torch | none
    notes: tuple[str, ...] = field(default=())

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    def describe(self) -> str:
        if not self.gpus:
            return f"no GPU detected ({self.cpu_count} CPU cores)"
        g = self.gpus[0]
        cc = f"sm_{g.compute_capability[0]}{g.compute_capability[1]}"
        return f"{len(self.gpus)} x {g.name} ({cc}, {g.total_bytes / 2**30:.0f} GiB)"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gpus"] = [asdict(g) for g in self.gpus]
        return d


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 0


def detect_nvml() -> tuple[GPU, ...] | None:
    """GPUs through NVML; None when NVML is unavailable (no driver)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            if isinstance(name, bytes):
                name = name.decode()
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append(GPU(index=i, name=str(name), compute_capability=(int(major), int(minor)),
                            total_bytes=int(mem.total), free_bytes=int(mem.free)))
        return tuple(gpus)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def detect() -> Hardware:
    gpus = detect_nvml()
    return Hardware(gpus=gpus or (), cpu_count=os.cpu_count() or 1, ram_bytes=_ram_bytes(),
                    source="nvml" if gpus else "none")
