"""Weight quantizers as pure functions ``w -> (q, scales)`` and their exact inverses.

Three schemes, in the formats compressed-tensors (and so vLLM and transformers) load: ``fp8``
(float8 E4M3, one scale per output channel, activations quantized per token by the engine) and
``w8a16`` / ``w4a16`` (symmetric int8 / int4, one scale per group of 128 input columns, packed
into int32 as ``pack-quantized``). Scales are rounded up to their storage dtype so the error
bounds the tests check hold with the stored scale. Every function works on any number of rows,
so callers may quantize a weight in row chunks. Nothing here reads or writes files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

GROUP_SIZE = 128
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


@dataclass(frozen=True)
class SchemeSpec:
    """What one quantization scheme stores per quantized Linear."""

    name: str
    kind: Literal["float", "int"]  # float: fp8
    num_bits: int
    strategy: Literal["channel", "group"]
    group_size: int | None
    dynamic_activations: bool

    def packed_cols(self, in_features: int) -> int:
        return in_features * self.num_bits // 32

    def scale_cols(self, in_features: int) -> int:
        return 1 if self.strategy == "channel" else in_features // (self.group_size or 1)

    def supports(self, shape: tuple[int, ...]) -> bool:
        """Whether a weight of this shape can be quantized (2-D, columns divisible as needed)."""
        if len(shape) != 2:
            return False
        cols = shape[1]
        if self.strategy == "group" and cols % (self.group_size or 1):
            return False
        return not (self.kind == "int" and (cols * self.num_bits) % 32)


SCHEMES: dict[str, SchemeSpec] = {
    "fp8": SchemeSpec("fp8", "float", 8, "channel", None, True),
    "w8a16": SchemeSpec("w8a16", "int", 8, "group", GROUP_SIZE, False),
    "w4a16": SchemeSpec("w4a16", "int", 4, "group", GROUP_SIZE, False),
}


_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_EXACT_IN_FLOAT32 = (torch.bfloat16, torch.float16, torch.float32)  # promoted to float32 without rounding


def _round_up_to(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` (float32, positive) cast to ``dtype`` and, wherever the cast rounded down, moved up to the
    next value ``dtype`` holds: the smallest ``dtype`` value >= ``scale``."""
    s = scale.to(dtype)
    low = s.float() < scale
    if bool(low.any()):
        # for positive finite floats the next representable value is the bit pattern plus one
        ints = _SAME_WIDTH_INT[s.element_size()]
        s = torch.where(low, (s.view(ints) + 1).view(dtype), s)
    return s


def _tiny(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).tiny)


def quantize_fp8(w: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 E4M3 with per-output-channel scales: ``(q [out, in] float8_e4m3fn, scale [out, 1])``."""
    if w.ndim != 2:
        raise ValueError(f"fp8 quantization needs a 2-D weight, got shape {tuple(w.shape)}")
    if w.dtype not in _EXACT_IN_FLOAT32:
        w = w.float()
    # |w| and its row maximum are exact in w's own dtype: no float32 copy of the whole piece
    amax = w.abs().amax(dim=1, keepdim=True).float()
    scale = _round_up_to(torch.clamp(amax / FP8_MAX, min=_tiny(scale_dtype)), scale_dtype)
    # scale >= amax / 448, so |w / scale| <= 448 up to one rounding, which the cast rounds to 448:
    # no clamp pass needed (this is the hot loop of a 25 GB conversion). The division runs in
    # float32 (w promoted element by element) and is cast to E4M3 in the same pass.
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    torch.div(w, scale.float(), out=q)
    return q, scale


_FP8_CODES = torch.arange(256, dtype=torch.uint8)
_FP8_TO_FLOAT32 = _FP8_CODES.view(torch.float8_e4m3fn).float()  # the 256 values of E4M3, by bit pattern


def fp8_to_float32(q: torch.Tensor) -> torch.Tensor:
    """``q.float()`` for a float8 E4M3 tensor, bit for bit (NaN patterns included), by table lookup:
    torch's element-wise float8 cast is about twice as slow on CPU (a conversion's error sample
    dequantizes every piece)."""
    return torch.take(_FP8_TO_FLOAT32, q.view(torch.uint8).long())


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (fp8_to_float32(q) * scale.float()).to(dtype)


def _int_range(num_bits: int) -> tuple[int, int]:
    return -(1 << (num_bits - 1)), (1 << (num_bits - 1)) - 1


def quantize_int(w: torch.Tensor, num_bits: int, group_size: int = GROUP_SIZE,
                 scale_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-group int quantization: ``(q [out, in] int8 values in range, scale [out, in/group])``."""
    if w.ndim != 2:
        raise ValueError(f"int quantization needs a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    if cols % group_size:
        raise ValueError(f"in_features {cols} is not a multiple of the group size {group_size}")
    qmin, qmax = _int_range(num_bits)
    x = w.float().reshape(rows, cols // group_size, group_size)
    amax = x.abs().amax(dim=2)
    scale = _round_up_to(torch.clamp(amax / ((qmax - qmin) / 2), min=_tiny(scale_dtype)), scale_dtype)
    q = torch.round(x / scale.float().unsqueeze(2)).clamp(qmin, qmax).to(torch.int8)
    return q.reshape(rows, cols), scale


def dequantize_int(q: torch.Tensor, scale: torch.Tensor, group_size: int = GROUP_SIZE,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, cols = q.shape
    x = q.float().reshape(rows, cols // group_size, group_size) * scale.float().unsqueeze(2)
    return x.reshape(rows, cols).to(dtype)


def pack_int32(q: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Pack int values (int8 tensor in range) into int32 words like compressed-tensors' ``pack_to_int32``.

    Element i of a row sits at bits ``i*num_bits`` counted across consecutive little-endian
    words, stored as ``value + 2**(num_bits-1)``. Only 4 and 8 bits are needed here.
    """
    if q.dtype != torch.int8 or q.ndim != 2:
        raise ValueError("pack_int32 needs a 2-D int8 tensor")
    rows, cols = q.shape
    offset = 1 << (num_bits - 1)
    u = (q.to(torch.int16) + offset).to(torch.uint8)
    if num_bits == 8:
        if cols % 4:
            raise ValueError("int8 packing needs a multiple of 4 columns")
        b = u
    elif num_bits == 4:
        if cols % 8:
            raise ValueError("int4 packing needs a multiple of 8 columns")
        pairs = u.reshape(rows, cols // 2, 2)
        b = (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()
    else:
        raise ValueError(f"unsupported bit width {num_bits}")
    words = b.contiguous().view(torch.int32)  # little-endian hosts (x86, arm64)
    return words.reshape(rows, cols * num_bits // 32)


def unpack_int32(packed: torch.Tensor, num_bits: int, cols: int) -> torch.Tensor:
    """Inverse of ``pack_int32``: int8 values of shape ``[rows, cols]``."""
    if packed.dtype != torch.int32 or packed.ndim != 2:
        raise ValueError("unpack_int32 needs a 2-D int32 tensor")
    rows = packed.shape[0]
    b = packed.contiguous().view(torch.uint8).reshape(rows, -1)
    offset = 1 << (num_bits - 1)
    if num_bits == 8:
        u = b
    elif num_bits == 4:
        u = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(rows, -1)
    else:
        raise ValueError(f"unsupported bit width {num_bits}")
    return (u[:, :cols].to(torch.int16) - offset).to(torch.int8)


def quantize(w: torch.Tensor, scheme: str, scale_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The tensors a compressed-tensors checkpoint stores for one Linear weight, by suffix.

    ``fp8`` -> ``{"weight": float8, "weight_scale": [out, 1]}``;
    ``w8a16``/``w4a16`` -> ``{"weight_packed": int32, "weight_scale": [out, in/128], "weight_shape": int64[2]}``.
    """
    spec = SCHEMES[scheme]
    if spec.kind == "float":
        q, s = quantize_fp8(w, scale_dtype)
        return {"weight": q, "weight_scale": s}
    q, s = quantize_int(w, spec.num_bits, spec.group_size or GROUP_SIZE, scale_dtype)
    return {"weight_packed": pack_int32(q, spec.num_bits), "weight_scale": s,
            "weight_shape": torch.tensor(list(w.shape), dtype=torch.int64)}


def dequantize(parts: dict[str, torch.Tensor], scheme: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``quantize``: the dense weight from its stored parts."""
    spec = SCHEMES[scheme]
    if spec.kind == "float":
        return dequantize_fp8(parts["weight"], parts["weight_scale"], dtype)
    shape = [int(x) for x in parts["weight_shape"].tolist()]
    q = unpack_int32(parts["weight_packed"], spec.num_bits, shape[1])
    return dequantize_int(q, parts["weight_scale"], spec.group_size or GROUP_SIZE, dtype)


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """``||w - w_hat|| / ||w||`` in float64 (0 for an all-zero ``w`` reproduced exactly)."""
    a, b = w.double(), w_hat.double()
    num = torch.linalg.vector_norm(a - b).item()
    den = torch.linalg.vector_norm(a).item()
    return num / den if den else (0.0 if num == 0 else math.inf)


def error_bound(w: torch.Tensor, parts: dict[str, torch.Tensor], scheme: str) -> torch.Tensor:
    """The documented element-wise bound on ``|w - dequantize(quantize(w))|``."""
    spec = SCHEMES[scheme]
    s = parts["weight_scale"].float()
    if spec.kind == "float":
        return torch.maximum(w.float().abs() / 16, s.expand_as(w) / 1024)
    g = spec.group_size or GROUP_SIZE
    return (s / 2).repeat_interleave(g, dim=1)
