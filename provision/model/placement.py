"""Which device holds which decoder layer: a pure layer -> device map for hosts with several GPUs.

``plan_placement`` splits the layers into consecutive runs, one per device, minimising the
largest per-device share of bytes (weights from ``tensor_spec``, plus the KV cache with a
context), respecting per-device capacities (``GPUMemoryError``, exit 6, when nothing fits).
Embeddings and the vision encoder stay with device 0, the norm and head with the last layers.
``place_model`` moves a built model's modules. Pure Python, no torch; pipeline placement, not
tensor parallelism (moving activations between devices is ``Pixtral.forward``'s job).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from provision.errors import GPUMemoryError, UsageError
from provision.formats.params import ModelArgs, tensor_spec

if TYPE_CHECKING:
    from torch import nn

_LAYER = re.compile(r"^layers\.(\d+)\.")
_POST = ("norm.", "output.")


@dataclass(frozen=True)
class ModelBytes:
    """Bytes of the model's parts: ``first`` (embeddings, vision), one per layer, ``last`` (norm, head)."""

    first: int
    layers: tuple[int, ...]
    last: int

    @property
    def total(self) -> int:
        return self.first + sum(self.layers) + self.last


def model_bytes(args: ModelArgs, *, dtype_bytes: int = 2, context: int = 0) -> ModelBytes:
    """Weights at ``dtype_bytes`` per element (plus ``context`` tokens of KV cache per layer)."""
    first, last = 0, 0
    layers = [0] * args.n_layers
    for name, shape in tensor_spec(args).items():
        n = dtype_bytes
        for s in shape:
            n *= s
        m = _LAYER.match(name)
        if m:
            layers[int(m.group(1))] += n
        elif name.startswith(_POST):
            last += n
        else:
            first += n
    kv = 2 * args.n_kv_heads * args.head_dim * context * dtype_bytes
    return ModelBytes(first=first, layers=tuple(x + kv for x in layers), last=last)


@dataclass(frozen=True)
class Placement:
    devices: tuple[str, ...]
    layer_devices: tuple[int, ...]  # index into ``devices`` for every decoder layer, non-decreasing
    bytes_per_device: tuple[int, ...]

    @property
    def first(self) -> str:
        return self.devices[self.layer_devices[0]] if self.layer_devices else self.devices[0]

    @property
    def last(self) -> str:
        return self.devices[self.layer_devices[-1]] if self.layer_devices else self.devices[0]

    @property
    def used(self) -> int:
        """How many devices hold something."""
        return sum(1 for b in self.bytes_per_device if b > 0)

    def layers_on(self, index: int) -> list[int]:
        return [i for i, d in enumerate(self.layer_devices) if d == index]

    def device_of(self, name: str) -> str:
        """The device of a Mistral-named tensor (``layers.N.*`` by the map, norm/output last, the rest first)."""
        m = _LAYER.match(name)
        if m:
            return self.devices[self.layer_devices[int(m.group(1))]]
        return self.last if name.startswith(_POST) else self.first

    def remap(self, mapping: Mapping[str, str]) -> Placement:
        """The same split with device names replaced (``{"cuda:0": "cpu", ...}``)."""
        return Placement(tuple(mapping.get(d, d) for d in self.devices), self.layer_devices, self.bytes_per_device)

    def describe(self) -> str:
        parts = []
        for i, d in enumerate(self.devices):
            ls = self.layers_on(i)
            if ls:
                parts.append(f"{d}: layers {ls[0]}-{ls[-1]} ({self.bytes_per_device[i] / 2**30:.2f} GiB)")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"devices": list(self.devices), "layer_devices": list(self.layer_devices),
                "bytes_per_device": list(self.bytes_per_device), "used": self.used}


def _pack(items: Sequence[int], budgets: Sequence[int]) -> list[int] | None:
    """Greedy consecutive packing: the device index of each item, or None when it does not fit."""
    out: list[int] = []
    dev, load = 0, 0
    for size in items:
        while dev < len(budgets) and load + size > budgets[dev]:
            if load == 0 and size > budgets[dev]:
                dev += 1  # too big for this device even alone: skip it (it stays empty)
                continue
            dev, load = dev + 1, 0
        if dev >= len(budgets):
            return None
        out.append(dev)
        load += size
    return out


def split(items: Sequence[int], n_devices: int, capacity_bytes: Sequence[int] | None = None) -> list[int] | None:
    """Device index per item, consecutive items on consecutive devices, minimizing the largest
    device's bytes (within ``capacity_bytes`` when given); None when no split fits."""
    if n_devices < 1:
        raise UsageError("A placement needs at least one device.")
    caps = list(capacity_bytes) if capacity_bytes is not None else [sum(items)] * n_devices
    if len(caps) != n_devices:
        raise UsageError(f"{len(caps)} capacities for {n_devices} devices.")
    if not items:
        return []
    lo, hi = max(items), max(sum(items), max(items))
    if _pack(items, [min(c, hi) for c in caps]) is None:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if _pack(items, [min(c, mid) for c in caps]) is None:
            lo = mid + 1
        else:
            hi = mid
    return _pack(items, [min(c, lo) for c in caps])


def plan_placement(args: ModelArgs, devices: Sequence[str], *, dtype_bytes: int = 2, context: int = 0,
                   capacity_bytes: Sequence[int] | None = None) -> Placement:
    """The layer -> device map of ``args`` over ``devices`` (see the module docstring)."""
    devs = tuple(devices)
    if not devs:
        raise UsageError("A placement needs at least one device.")
    mb = model_bytes(args, dtype_bytes=dtype_bytes, context=context)
    # the first part rides with layer 0 and the last with the final layer: they cannot be split off
    items = list(mb.layers)
    if items:
        items[0] += mb.first
        items[-1] += mb.last
    else:
        items = [mb.first + mb.last]
    where = split(items, len(devs), capacity_bytes)
    if where is None:
        assert capacity_bytes is not None
        gib = 2**30
        raise GPUMemoryError(
            f"The model needs {mb.total / gib:.1f} GiB but {len(devs)} device(s) with "
            f"{sum(capacity_bytes) / gib:.1f} GiB free in all cannot hold it layer by layer; use more or bigger "
            "GPUs or a quantized profile.",
            needed_bytes=mb.total, free_bytes=list(capacity_bytes), devices=list(devs))
    per = [0] * len(devs)
    for d, size in zip(where, items, strict=True):
        per[d] += size
    layer_devices = tuple(where[: args.n_layers]) if args.n_layers else ()
    return Placement(devices=devs, layer_devices=layer_devices, bytes_per_device=tuple(per))


def place_model(model: nn.Module, placement: Placement) -> nn.Module:
    """Move a built model's modules to their devices (in place); returns the model."""
    for name, child in model.named_children():
        if name == "layers":
            for i, layer in enumerate(child.children()):
                layer.to(placement.devices[placement.layer_devices[i]])
        elif name in ("norm", "output"):
            child.to(placement.last)
        else:
            child.to(placement.first)
    return model
