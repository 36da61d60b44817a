"""What the host has: GPUs (through NVML, or ``nvidia-smi -q`` when NVML cannot load; never
importing torch), CPU count, memory; and the conversion ``Target`` a ``--target`` names.

``detect()`` returns a ``Hardware`` record and never fails (no NVML or no GPU means a CPU host).
``parse_target`` turns ``auto``, ``cpu``, a card name (``t4`` ... ``b200``, see ``CARDS``; case,
spaces and dashes do not matter, so ``"RTX 4090"`` works) or ``sm_XY:MEMGB[xCOUNT]`` into a
``Target`` (compute capability, memory per device, device count). ``CARDS`` is the one table of
named targets that every command's help and error message lists (``card_summary``); its figures are
the makers' specifications (memory in MiB, as NVML reports it).
The profile table built on targets lives in ``stages.profiles``.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
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


def ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 0


def mem_available() -> int:
    """Memory the kernel could give now without swapping (MemAvailable: free pages plus the
    reclaimable page cache), or the free pages where there is no /proc."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # no /proc (not Linux): the free pages below are the next best estimate
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 0


def detect_nvml(nvml: Any = None) -> tuple[GPU, ...] | None:
    """GPUs through NVML; None when NVML is unavailable (no driver).

    ``nvml`` replaces the ``pynvml`` module (tests pass recorded answers of real cards).
    """
    pynvml: Any = nvml
    if pynvml is None:
        try:
            pynvml = importlib.import_module("pynvml")
        except ImportError:  # pynvml not installed: detect() asks nvidia-smi instead
            return None
    try:
        pynvml.nvmlInit()
    except Exception:  # any NVML failure (NVMLError, a driver library that will not load): no NVML GPUs
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
        except Exception:  # the GPUs are read (or the read's error is on its way): shutdown changes neither
            pass


def detect(nvml: Any = None, *, smi_text: str | None = None, use_smi: bool = True) -> Hardware:
    """GPUs through NVML, else through ``nvidia-smi -q`` (when installed), else none."""
    gpus = detect_nvml(nvml)
    source = "nvml" if gpus else "none"
    if not gpus and (smi_text is not None or use_smi):
        text = smi_text if smi_text is not None else _run_nvidia_smi()
        if text:
            gpus = parse_nvidia_smi_q(text)
            source = "nvidia-smi" if gpus else "none"
    return Hardware(gpus=gpus or (), cpu_count=os.cpu_count() or 1, ram_bytes=ram_bytes(), source=source)


def _run_nvidia_smi() -> str | None:
    import shutil

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-q"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):  # cannot run or hangs: no GPUs seen through nvidia-smi
        return None
    return out.stdout if out.returncode == 0 else None


_MIB = 1 << 20
_GIB = 1 << 30


def parse_nvidia_smi_q(text: str) -> tuple[GPU, ...]:
    """GPUs from the text of ``nvidia-smi -q``: name, FB memory total/free; compute capability from
    the ``Compute Capability`` line where the driver prints one, else from the card name."""
    gpus: list[GPU] = []
    blocks = re.split(r"^GPU [0-9A-Fa-f:.]+\s*$", text, flags=re.M)[1:]
    for i, block in enumerate(blocks):
        name_m = re.search(r"^\s*Product Name\s*:\s*(.+?)\s*$", block, flags=re.M)
        fb = re.search(r"^\s*FB Memory Usage\s*$(.*?)(?=^\s*\S[^:]*$)", block, flags=re.M | re.S)
        if name_m is None or fb is None:
            continue
        total_m = re.search(r"Total\s*:\s*(\d+)\s*MiB", fb.group(1))
        free_m = re.search(r"Free\s*:\s*(\d+)\s*MiB", fb.group(1))
        if total_m is None:
            continue
        name = name_m.group(1)
        cc_m = re.search(r"Compute Capability\s*:\s*(\d+)\.(\d+)", block)
        cc = (int(cc_m.group(1)), int(cc_m.group(2))) if cc_m else compute_capability_from_name(name)
        if cc is None:
            continue
        total = int(total_m.group(1)) * _MIB
        free = int(free_m.group(1)) * _MIB if free_m else total
        gpus.append(GPU(index=i, name=name, compute_capability=cc, total_bytes=total, free_bytes=free))
    return tuple(gpus)


# ---------------------------------------------------------------------------------------
# Targets


@dataclass(frozen=True)
class Card:
    key: str
    name: str  # as NVML / nvidia-smi print it
    compute_capability: tuple[int, int]
    memory_mib: int  # total memory as NVML reports it


# NVIDIA's published figures (compute capability from the CUDA GPU table; memory as the
# driver reports it for the usual SKU). Not read off real cards in this project.
CARDS: dict[str, Card] = {c.key: c for c in (
    Card("t4", "Tesla T4", (7, 5), 15360),
    Card("v100", "Tesla V100-SXM2-16GB", (7, 0), 16384),
    Card("v100-32gb", "Tesla V100-SXM2-32GB", (7, 0), 32768),
    Card("a10g", "NVIDIA A10G", (8, 6), 23028),
    Card("l4", "NVIDIA L4", (8, 9), 23034),
    Card("a100-40gb", "NVIDIA A100-SXM4-40GB", (8, 0), 40960),
    Card("a100-80gb", "NVIDIA A100-SXM4-80GB", (8, 0), 81920),
    Card("h100", "NVIDIA H100 80GB HBM3", (9, 0), 81559),
    Card("h200", "NVIDIA H200", (9, 0), 143771),
    Card("gh200", "NVIDIA GH200 480GB", (9, 0), 97871),  # the 96 GB HBM3 Grace Hopper module
    Card("b200", "NVIDIA B200", (10, 0), 183359),
    Card("l40s", "NVIDIA L40S", (8, 9), 46068),
    Card("a6000", "NVIDIA RTX A6000", (8, 6), 49140),
    Card("rtx3090", "NVIDIA GeForce RTX 3090", (8, 6), 24576),
    Card("rtx4090", "NVIDIA GeForce RTX 4090", (8, 9), 24564),
)}


def _card_key(name: str) -> str:
    """A card name as typed (``"RTX 4090"``, ``a100_80gb``) in the form ``CARDS`` is searched by."""
    return re.sub(r"[\s_-]+", "", name.strip().lower())


def _spellings(c: Card) -> tuple[str, ...]:
    """The key and the product name, with and without the maker's prefix (``RTX A6000``)."""
    short = c.name.removeprefix("NVIDIA ").removeprefix("Tesla ")
    return c.key, c.name, short, short.removeprefix("GeForce ")


_BY_KEY: dict[str, Card] = {_card_key(n): c for c in CARDS.values() for n in _spellings(c)}


def find_card(name: str) -> Card | None:
    """The named card by key or product name (case, spaces, dashes and underscores ignored), or None."""
    return _BY_KEY.get(_card_key(name))


def card_summary() -> str:
    """Every named target with its compute capability and memory, for help texts and errors:
    ``t4 (sm_75, 15 GiB), ...``."""
    return ", ".join(f"{c.key} (sm_{c.compute_capability[0]}{c.compute_capability[1]}, "
                     f"{c.memory_mib / 1024:.0f} GiB)" for c in CARDS.values())

# substrings of product names -> compute capability (for nvidia-smi outputs without the field)
_NAME_CC: tuple[tuple[str, tuple[int, int]], ...] = (
    ("GH200", (9, 0)), ("H200", (9, 0)), ("H100", (9, 0)), ("L40", (8, 9)), ("L4", (8, 9)),
    ("RTX 40", (8, 9)), ("A100", (8, 0)), ("A800", (8, 0)), ("A30", (8, 0)), ("A10", (8, 6)),
    ("A40", (8, 6)), ("RTX 30", (8, 6)), ("A6000", (8, 6)), ("T4", (7, 5)), ("RTX 20", (7, 5)),
    ("V100", (7, 0)), ("P100", (6, 0)), ("B200", (10, 0)),
)


def compute_capability_from_name(name: str) -> tuple[int, int] | None:
    for key, cc in _NAME_CC:
        if key in name:
            return cc
    return None


@dataclass(frozen=True)
class Target:
    """What a conversion is for: a GPU kind (or the CPU), memory per device and device count."""

    name: str  # "t4", "cpu", "sm_89:24GiB", or the detected card's name
    compute_capability: tuple[int, int] | None  # None for the CPU
    memory_bytes: int  # per device: GPU memory, or RAM for the CPU
    count: int = 1
    source: str = "named"  # named | spec | detected

    @property
    def is_cpu(self) -> bool:
        return self.compute_capability is None

    @property
    def sm(self) -> str:
        if self.compute_capability is None:
            return "cpu"
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"

    def describe(self) -> str:
        if self.is_cpu:
            return f"CPU ({self.memory_bytes / _GIB:.0f} GiB RAM)"
        n = f"{self.count} x " if self.count > 1 else ""
        return f"{n}{self.name} ({self.sm}, {self.memory_bytes / _GIB:.1f} GiB)"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "compute_capability": list(self.compute_capability or ()) or None,
                "sm": self.sm, "memory_bytes": self.memory_bytes, "count": self.count, "source": self.source}


_SPEC = re.compile(r"^sm_?(\d{1,2}?)(\d):(\d+(?:\.\d+)?)\s*(?:gib|gb|g)?(?:x(\d+))?$", re.I)


def target_from_hardware(hw: Hardware) -> Target:
    """The detected GPUs as a target (the smallest card when they differ; its total memory), or the CPU."""
    if not hw.gpus:
        return Target("cpu", None, hw.ram_bytes, 1, "detected")
    cc = min(g.compute_capability for g in hw.gpus)
    # total memory, as vLLM budgets it (a share of the total); the 10% overhead covers the driver
    mem = min(g.total_bytes for g in hw.gpus)
    return Target(hw.gpus[0].name, cc, mem, len(hw.gpus), "detected")


def parse_target(spec: str | None, *, hardware: Hardware | None = None) -> Target:
    """``auto`` (detect), ``cpu``, a card name or ``sm_XY:MEMGB[xCOUNT]`` -> ``Target``.

    MEMGB counts GiB (2**30 bytes), as GPU memory sizes are marketed. Anything else raises
    ``UsageError`` (exit 2).
    """
    from provision.errors import UsageError

    s = (spec or "auto").strip().lower()
    if s == "auto":
        return target_from_hardware(hardware or detect())
    if s == "cpu":
        hw = hardware or detect(use_smi=False)
        return Target("cpu", None, hw.ram_bytes or ram_bytes(), 1, "named")
    count = 1
    m = re.match(r"^(.*?)x(\d+)$", s)
    if m and find_card(m.group(1)) is not None:
        s, count = m.group(1), int(m.group(2))
    card = find_card(s)
    if card is not None:
        c = card
        if count < 1:
            raise UsageError(f"Target {spec!r} asks for {count} GPUs; use at least 1.")
        return Target(c.key, c.compute_capability, c.memory_mib * _MIB, count, "named")
    m = _SPEC.match(s)
    if m:
        major, minor, mem, n = int(m.group(1)), int(m.group(2)), float(m.group(3)), int(m.group(4) or 1)
        if mem <= 0 or n < 1:
            raise UsageError(f"Target {spec!r} needs a positive memory size and GPU count.")
        return Target(f"sm_{major}{minor}:{m.group(3)}GiB", (major, minor), int(mem * _GIB), n, "spec")
    raise UsageError(
        f"Unknown target {spec!r}: use auto, cpu, a card ({card_summary()}; NAMExCOUNT for several) "
        "or sm_XY:MEMGB[xCOUNT] such as sm_89:24x2.",
        target=spec,
    )
