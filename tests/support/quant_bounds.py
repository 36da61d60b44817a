"""Round-trip error bounds of the stored quantization formats, derived here from the formats
themselves (never from ``provision.quant.error_bound``, the code under test).

A compressed-tensors checkpoint stores codes ``q`` and scales ``s``; a reader computes ``q * s``.
Whatever the quantizer did, if it rounded ``w / s`` to the nearest code the error per element is
at most half a code step times ``s``:

* ``fp8`` (float8 E4M3, one scale per output row): 3 mantissa bits, so between 2**e and 2**(e+1)
  the codes are 2**(e-3) apart; half a step is 2**(e-4) <= 2**-4 * |w / s|. Below the smallest
  normal (2**-6) the subnormal codes are 2**-9 apart: half a step is 2**-10. In ``w``'s units:
  ``|w - q*s| <= max(|w| / 16, s / 1024)``.
* ``w8a16`` / ``w4a16`` (symmetric int8 / int4, one scale per group of 128 input columns): the codes
  are integers, so ``|w - q*s| <= s / 2`` as long as ``|w / s|`` stays inside the code range, which
  a scale of at least max|w| / 127.5 (int8) or / 7.5 (int4) ensures (compressed-tensors' symmetric
  scale: max|w| over half the integer range, (127 - (-128)) / 2 and (7 - (-8)) / 2).

``FLOAT32_SLACK`` covers the float32 division and product around the rounding (2**-24 each).
"""

from __future__ import annotations

import torch

GROUP = 128
FLOAT32_SLACK = 1 + 2**-20
# the smallest scale that keeps max|w| inside the code range: max|w| / HALF_RANGE[scheme]
HALF_RANGE = {"fp8": 448.0, "w8a16": (127 - (-128)) / 2, "w4a16": (7 - (-8)) / 2}


def format_error_bound(w: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    """Element-wise bound on ``|w - dequantized|`` for weights stored with ``scale`` under ``scheme``."""
    s = scale.float()
    if scheme == "fp8":
        return torch.maximum(w.float().abs() * 2**-4, s.expand_as(w) * 2**-10) * FLOAT32_SLACK
    if scheme in ("w8a16", "w4a16"):
        return (s / 2).repeat_interleave(GROUP, dim=1) * FLOAT32_SLACK
    raise ValueError(f"no bound for {scheme}")


def smallest_scale(w: torch.Tensor, scheme: str) -> torch.Tensor:
    """max|w| per row (fp8) or per group of 128 (int) over half the code range: any smaller scale
    would clip the largest weight."""
    x = w.float()
    if scheme == "fp8":
        amax = x.abs().amax(dim=1, keepdim=True)
    else:
        amax = x.abs().reshape(x.shape[0], -1, GROUP).amax(dim=2)
    return amax / HALF_RANGE[scheme]
