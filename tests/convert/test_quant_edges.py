"""The quantizers at their edges: scheme geometry, stored scales, code clamping, the int32 bit
layout, bad shapes, and the error helpers.

Expected values are written here with their derivation (bit patterns worked out by hand and
checked with ``int.from_bytes``), or come from ``tests/support/quant_bounds`` (the bounds derived
from the formats), never from ``provision.quant`` itself.
"""

from __future__ import annotations

import math

import pytest
import torch

from provision import quant
from tests.support.quant_bounds import FLOAT32_SLACK, format_error_bound


@pytest.mark.parametrize(("scheme", "in_features", "packed", "scales"), [
    ("fp8", 256, 64, 1),        # fp8 is not packed, but 8 bits -> 4 per int32 word; one scale per row
    ("w8a16", 512, 128, 4),     # 4 codes per word, 512 / 128 groups
    ("w4a16", 256, 32, 2),      # 8 codes per word, 256 / 128 groups
])
def test_scheme_geometry_counts_packed_words_and_scale_columns(scheme: str, in_features: int, packed: int,
                                                                scales: int) -> None:
    spec = quant.SCHEMES[scheme]
    assert spec.packed_cols(in_features) == packed
    assert spec.scale_cols(in_features) == scales


@pytest.mark.parametrize(("scheme", "shape", "ok"), [
    ("fp8", (4, 100), True), ("fp8", (400,), False), ("fp8", (2, 4, 8), False),
    ("w8a16", (4, 256), True), ("w8a16", (4, 130), False), ("w8a16", (4, 64), False),
    ("w4a16", (4, 128), True), ("w4a16", (4, 200), False), ("w4a16", (128,), False),
])
def test_supports_takes_only_2d_weights_whose_columns_fill_whole_groups(scheme: str, shape: tuple[int, ...],
                                                                        ok: bool) -> None:
    assert quant.SCHEMES[scheme].supports(shape) is ok


def test_the_scheme_table_matches_compressed_tensors_presets() -> None:
    fp8, w8, w4 = (quant.SCHEMES[s] for s in ("fp8", "w8a16", "w4a16"))
    assert (fp8.kind, fp8.num_bits, fp8.strategy, fp8.group_size, fp8.dynamic_activations) == \
        ("float", 8, "channel", None, True)
    assert (w8.kind, w8.num_bits, w8.strategy, w8.group_size, w8.dynamic_activations) == ("int", 8, "group", 128, False)
    assert (w4.kind, w4.num_bits, w4.strategy, w4.group_size, w4.dynamic_activations) == ("int", 4, "group", 128, False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_stored_fp8_scale_is_the_smallest_storable_value_not_below_the_exact_one(dtype: torch.dtype) -> None:
    # rows whose max/448 is not representable in dtype: the cast alone would round some down
    amax = torch.tensor([1.001, 3.3, 0.1234, 7.77, 100.0])  # / 448 stays above fp16's smallest normal
    w = torch.zeros(5, 16)
    w[:, 3] = amax
    w[:, 9] = -amax / 2
    exact = amax / 448
    scale = quant.quantize_fp8(w, dtype)[1].flatten()
    # the nearest dtype value, and the next one up (torch.nextafter in dtype): the answer is the
    # first of the two that is not below the exact scale
    near = exact.to(dtype)
    up = torch.nextafter(near, torch.full_like(near, math.inf))
    want = torch.where(near.float() >= exact, near, up)
    assert bool((scale.float() >= exact).all())  # never below: the largest weight is not clipped
    assert torch.equal(scale, want), (scale, want)


def test_an_exactly_representable_scale_is_stored_unchanged() -> None:
    w = torch.zeros(2, 8)
    w[0, 0], w[1, 5] = 224.0, -0.875  # / 448 = 0.5 and 2**-9: exact in bf16
    scale = quant.quantize_fp8(w)[1].float().flatten().tolist()
    assert scale == [0.5, 2.0**-9]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_all_zero_row_gets_the_smallest_normal_scale_and_zero_codes(dtype: torch.dtype) -> None:
    w = torch.zeros(3, 256)
    tiny = {torch.bfloat16: 2.0**-126, torch.float16: 2.0**-14}[dtype]  # smallest normal of each format
    q, s = quant.quantize_fp8(w, dtype)
    assert s.float().flatten().tolist() == [tiny] * 3 and not bool(q.float().any())
    qi, si = quant.quantize_int(w, 8, scale_dtype=dtype)
    assert si.float().flatten().tolist() == [tiny] * 6 and not bool(qi.any())


@pytest.mark.parametrize(("bits", "lo", "hi"), [(8, -128, 127), (4, -8, 7)])
def test_int_codes_reach_both_ends_of_the_range_and_never_beyond(bits: int, lo: int, hi: int) -> None:
    # max|w| = half the code range (127.5 / 7.5) makes the scale exactly 1.0: +-a / scale = +-127.5
    # (+-7.5); round half to even gives 128 (8), clamped to 127 (7), and -128 (-8).
    a = (hi - lo) / 2
    w = torch.zeros(1, 128)
    w[0, 0], w[0, 1], w[0, 2] = a, -a, a / 2
    q, s = quant.quantize_int(w, bits, scale_dtype=torch.float32)
    assert float(s) == 1.0
    assert int(q.min()) >= lo and int(q.max()) <= hi
    assert int(q[0, 0]) == hi
    assert int(q[0, 1]) == lo
    assert int(q[0, 2]) == {8: 64, 4: 4}[bits]  # 63.75 -> 64, 3.75 -> 4


def test_int4_codes_pack_two_per_byte_low_nibble_first_in_little_endian_words() -> None:
    q = torch.arange(-8, 8, dtype=torch.int8).reshape(1, 16)
    # stored value = code + 8 = 0..15; byte k = v[2k] | v[2k+1] << 4 = 0x10, 0x32, ..., 0xfe
    words = quant.pack_int32(q, 4)
    assert words.dtype == torch.int32 and tuple(words.shape) == (1, 2)
    assert words.flatten().tolist() == [int.from_bytes(bytes([0x10, 0x32, 0x54, 0x76]), "little", signed=True),
                                        int.from_bytes(bytes([0x98, 0xBA, 0xDC, 0xFE]), "little", signed=True)]
    assert words.flatten().tolist() == [1985229328, -19088744]
    back = quant.unpack_int32(words, 4, 16)
    assert back.dtype == torch.int8 and torch.equal(back, q)  # torch.equal alone ignores the dtype


def test_int8_codes_pack_four_per_little_endian_word_offset_by_128() -> None:
    q = torch.tensor([[-128, -1, 0, 127]], dtype=torch.int8)
    words = quant.pack_int32(q, 8)  # stored bytes 0x00, 0x7f, 0x80, 0xff
    assert words.flatten().tolist() == [int.from_bytes(bytes([0x00, 0x7F, 0x80, 0xFF]), "little", signed=True)]
    back = quant.unpack_int32(words, 8, 4)
    assert back.dtype == torch.int8 and torch.equal(back, q)


def test_unpack_keeps_only_the_asked_columns() -> None:
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, -8]], dtype=torch.int8)
    assert quant.unpack_int32(quant.pack_int32(q, 4), 4, 5).tolist() == [[1, 2, 3, 4, 5]]


@pytest.mark.parametrize(("q", "bits", "needle"), [
    (torch.zeros(2, 8, dtype=torch.int16), 4, "2-D int8"),
    (torch.zeros(8, dtype=torch.int8), 4, "2-D int8"),
    (torch.zeros(2, 6, dtype=torch.int8), 8, "multiple of 4 columns"),
    (torch.zeros(2, 12, dtype=torch.int8), 4, "multiple of 8 columns"),
    (torch.zeros(2, 16, dtype=torch.int8), 2, "unsupported bit width 2"),
])
def test_pack_refuses_what_it_cannot_lay_out(q: torch.Tensor, bits: int, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        quant.pack_int32(q, bits)


@pytest.mark.parametrize(("packed", "bits", "needle"), [
    (torch.zeros(2, 2, dtype=torch.int64), 4, "2-D int32"),
    (torch.zeros(4, dtype=torch.int32), 4, "2-D int32"),
    (torch.zeros(2, 2, dtype=torch.int32), 3, "unsupported bit width 3"),
])
def test_unpack_refuses_what_it_cannot_read(packed: torch.Tensor, bits: int, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        quant.unpack_int32(packed, bits, 8)


def test_quantizers_refuse_weights_that_are_not_2d_or_not_whole_groups() -> None:
    with pytest.raises(ValueError, match=r"fp8 quantization needs a 2-D weight, got shape \(8,\)"):
        quant.quantize_fp8(torch.zeros(8))
    with pytest.raises(ValueError, match=r"int quantization needs a 2-D weight, got shape \(1, 2, 128\)"):
        quant.quantize_int(torch.zeros(1, 2, 128), 8)
    with pytest.raises(ValueError, match="in_features 200 is not a multiple of the group size 128"):
        quant.quantize_int(torch.zeros(2, 200), 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", ["fp8", "w8a16", "w4a16"])
def test_dequantize_returns_the_asked_dtype(scheme: str, dtype: torch.dtype) -> None:
    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(1))
    parts = quant.quantize(w, scheme)
    out = quant.dequantize(parts, scheme, dtype)
    assert out.dtype == dtype and tuple(out.shape) == (4, 256)
    if scheme != "fp8":
        assert parts["weight_shape"].dtype == torch.int64


def test_relative_error_is_the_norm_ratio_and_handles_all_zero_weights() -> None:
    assert quant.relative_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 0.0])) == 4.0 / 5.0
    assert quant.relative_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert quant.relative_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert quant.relative_error(torch.zeros(3), torch.tensor([0.0, 1.0, 0.0])) == math.inf


@pytest.mark.parametrize("scheme", ["fp8", "w8a16", "w4a16"])
def test_error_bound_equals_the_bound_derived_from_the_format(scheme: str) -> None:
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(2)) * 0.1
    w[1, 5] = 0.0
    parts = quant.quantize(w, scheme)
    ours = quant.error_bound(w, parts, scheme)
    derived = format_error_bound(w, parts["weight_scale"], scheme) / FLOAT32_SLACK
    assert torch.allclose(ours, derived, rtol=1e-6, atol=0)
