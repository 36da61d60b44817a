"""The quantizers: round-trip error bounds, packing layout, chunk independence, parity."""

from __future__ import annotations

import pytest
import torch

from provision import quant
from tests.support.hf_reference import require_compressed_tensors
from tests.support.quant_bounds import format_error_bound, smallest_scale

SCHEMES = ("fp8", "w8a16", "w4a16")


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 512, generator=g) * 0.02
    outl = w.clone()
    outl[3, 7] = 4.0  # one outlier per group/row
    outl[50, 300] = -9.0
    tiny = torch.randn(32, 256, generator=g) * 1e-6
    zeros = torch.zeros(16, 256)
    mixed = torch.cat([torch.zeros(8, 256), torch.randn(8, 256, generator=g)])
    return {"normal": w, "outliers": outl, "tiny": tiny, "zeros": zeros, "mixed": mixed}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", list(_weights()))
def test_round_trip_error_is_within_half_a_code_step_of_the_stored_scale(scheme: str, dtype: torch.dtype,
                                                                         kind: str) -> None:
    w = _weights()[kind].to(dtype)
    parts = quant.quantize(w, scheme, scale_dtype=dtype)
    scale = parts["weight_scale"]
    assert scale.dtype == dtype
    assert bool((scale.float() >= smallest_scale(w, scheme)).all())  # nothing clipped
    deq = quant.dequantize(parts, scheme)
    bound = format_error_bound(w, scale, scheme)  # derived in tests/support/quant_bounds.py
    err = (w.float() - deq).abs()
    assert bool((err <= bound).all()), float((err - bound).max())
    assert torch.isfinite(deq).all()


@pytest.mark.parametrize("scheme,limit", [("fp8", 0.04), ("w8a16", 0.01), ("w4a16", 0.15)])
def test_relative_error_of_gaussian_weights_is_small(scheme: str, limit: float) -> None:
    w = _weights()["normal"].bfloat16()
    rel = quant.relative_error(w, quant.dequantize(quant.quantize(w, scheme), scheme))
    assert 0 < rel < limit


def test_stored_shapes_and_dtypes_follow_compressed_tensors() -> None:
    w = torch.randn(64, 256).bfloat16()
    fp8 = quant.quantize(w, "fp8")
    assert fp8["weight"].dtype == torch.float8_e4m3fn and tuple(fp8["weight_scale"].shape) == (64, 1)
    i4 = quant.quantize(w, "w4a16")
    assert i4["weight_packed"].dtype == torch.int32 and tuple(i4["weight_packed"].shape) == (64, 32)
    assert tuple(i4["weight_scale"].shape) == (64, 2) and i4["weight_shape"].tolist() == [64, 256]
    i8 = quant.quantize(w, "w8a16")
    assert tuple(i8["weight_packed"].shape) == (64, 64)


def test_int4_packing_puts_element_i_at_bits_4i_offset_by_8() -> None:
    q = torch.tensor([[-8, -1, 0, 1, 2, 3, 4, 7]], dtype=torch.int8)
    word = int(quant.pack_int32(q, 4)[0, 0]) & 0xFFFFFFFF
    expect = sum(((v + 8) & 0xF) << (4 * i) for i, v in enumerate(q[0].tolist()))
    assert word == expect


def test_int8_packing_puts_element_i_at_bits_8i_offset_by_128() -> None:
    q = torch.tensor([[-128, -1, 0, 127]], dtype=torch.int8)
    word = int(quant.pack_int32(q, 8)[0, 0]) & 0xFFFFFFFF
    assert word == sum(((v + 128) & 0xFF) << (8 * i) for i, v in enumerate(q[0].tolist()))


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trip(bits: int) -> None:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.randint(lo, hi + 1, (7, 256), dtype=torch.int8)
    assert torch.equal(quant.unpack_int32(quant.pack_int32(q, bits), bits, 256), q)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantizing_row_chunks_equals_quantizing_the_whole(scheme: str) -> None:
    w = torch.randn(100, 256).bfloat16()
    whole = quant.quantize(w, scheme)
    parts = [quant.quantize(w[i:i + 30], scheme) for i in range(0, 100, 30)]
    for k in whole:
        if k == "weight_shape":
            continue
        joined = torch.cat([p[k] for p in parts], 0)
        assert torch.equal(whole[k].view(torch.uint8) if whole[k].dtype == torch.float8_e4m3fn else whole[k],
                           joined.view(torch.uint8) if joined.dtype == torch.float8_e4m3fn else joined)


def test_scales_are_rounded_up_to_the_storage_dtype() -> None:
    w = torch.randn(64, 128) * 0.037
    for scheme in SCHEMES:
        parts = quant.quantize(w, scheme, scale_dtype=torch.bfloat16)
        s = parts["weight_scale"].float()
        amax = w.abs().amax(1, keepdim=True) if scheme == "fp8" else w.abs().reshape(64, 1, 128).amax(2)
        div = {"fp8": 448.0, "w8a16": 127.5, "w4a16": 7.5}[scheme]
        assert bool((s >= amax / div).all())


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_a_scale_between_two_storage_values_is_rounded_up_by_exactly_one_step(scale_dtype: torch.dtype) -> None:
    # amax 448 * 1.001 wants a scale of 1.001: the next value above 1.0 is 1 + 2**-7 = 1.0078125 in bfloat16
    # (7 mantissa bits) and 1 + 2**-10 = 1.0009765625 in float16 (10 bits); 1.001 lies above both, so
    # bfloat16 stores 1.0078125 and float16 the step after 1.0009765625: 1 + 2 * 2**-10 = 1.001953125.
    want = {torch.bfloat16: 1.0078125, torch.float16: 1.001953125}[scale_dtype]
    w = torch.tensor([[448.0 * 1.001, 1.0], [448.0, -1.0]])
    _, scale = quant.quantize_fp8(w, scale_dtype=scale_dtype)
    assert scale.dtype == scale_dtype
    assert scale.float().flatten().tolist() == [want, 1.0]  # 448 / 448 = 1.0 exactly: no step up


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError):
        quant.quantize_fp8(torch.randn(4))
    with pytest.raises(ValueError):
        quant.quantize_int(torch.randn(4, 100), 4)  # 100 columns: not a multiple of 128
    with pytest.raises(ValueError):
        quant.pack_int32(torch.zeros(2, 6, dtype=torch.int8), 4)
    with pytest.raises(ValueError):
        quant.pack_int32(torch.zeros(2, 8, dtype=torch.int8), 3)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cols", [128, 256, 640])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parity
def test_packing_matches_compressed_tensors(bits: int, cols: int, seed: int) -> None:
    require_compressed_tensors()
    from compressed_tensors.compressors.pack_quantized import helpers
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.randint(lo, hi + 1, (9, cols), dtype=torch.int8, generator=g)
    ours = quant.pack_int32(q, bits)
    assert torch.equal(ours, helpers.pack_to_int32(q, bits))
    assert torch.equal(helpers.unpack_from_int32(ours, bits, torch.Size([9, cols])), q)


def _ct_args(scheme: str) -> object:
    from compressed_tensors.quantization import QuantizationArgs

    if scheme == "fp8":
        return QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True)
    return QuantizationArgs(num_bits=8 if scheme == "w8a16" else 4, type="int", strategy="group",
                            group_size=128, symmetric=True)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("kind", list(_weights()))
@pytest.mark.parity
def test_codes_and_dequantized_weights_match_compressed_tensors_given_our_scales(scheme: str, kind: str) -> None:
    """compressed-tensors (the reference reader and writer of the format) rounds ``w`` to codes with
    our stored scale exactly as we do, dequantizes them to the same values, and never asks for a
    larger scale than we store (so we clip nothing it would keep)."""
    require_compressed_tensors()
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w = _weights()[kind].bfloat16()
    parts = quant.quantize(w, scheme)
    s = parts["weight_scale"].float()
    zero = torch.zeros_like(s)
    args = _ct_args(scheme)
    if scheme == "fp8":
        ours = parts["weight"]
        theirs = quantize(w.float(), s, zero, args, dtype=torch.float8_e4m3fn)  # type: ignore[arg-type]
        assert torch.equal(theirs.view(torch.uint8), ours.view(torch.uint8))
        x = w.float()
        ideal, _ = calculate_qparams(x.amin(1, keepdim=True), x.amax(1, keepdim=True), args)  # type: ignore[arg-type]
    else:
        bits = 8 if scheme == "w8a16" else 4
        ours = quant.unpack_int32(parts["weight_packed"], bits, w.shape[1])
        theirs = quantize(w.float(), s, zero, args, dtype=torch.int8)  # type: ignore[arg-type]
        assert torch.equal(theirs, ours)
        x = w.float().reshape(w.shape[0], -1, 128)
        ideal, _ = calculate_qparams(x.amin(2), x.amax(2), args)  # type: ignore[arg-type]
    deq = dequantize(theirs, s, zero, args, dtype=torch.float32)  # type: ignore[arg-type]
    assert torch.equal(deq, quant.dequantize(parts, scheme))
    # an all-zero row/group is coded 0 by any positive scale: compressed-tensors floors its scale at
    # float32's eps there, we at the storage dtype's smallest normal; compare the others
    live = smallest_scale(w, scheme) > 0
    assert bool((s[live] >= ideal[live]).all())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_leaves_a_float32_input_untouched(scheme: str) -> None:
    w = torch.randn(16, 256)
    before = w.clone()
    quant.quantize(w, scheme)
    assert torch.equal(w, before)
