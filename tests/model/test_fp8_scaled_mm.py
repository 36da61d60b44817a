"""FP8_DYNAMIC layers through ``torch._scaled_mm`` against the dequantized reference, on the CPU.

torch 2.13's CPU build has ``torch._scaled_mm`` for float8_e4m3fn with row-wise (per-token x
per-channel) float32 scales, so the GPU path is forced here and runs the very kernel call the GPU
makes; only the kernel's implementation differs (CPU vs CUDA fp8 tensor cores).

The tolerance comes from the E4M3 format, not from the code: 3 mantissa bits make the relative
rounding error of a normal value at most 2**-4 (round to nearest), and below the smallest normal
(2**-6) the spacing of subnormals is 2**-9, so the absolute error is at most 2**-10 (in units of the
token's scale). The weights are the dequantized reference's own (no weight error), so for output j:
|y_j - ref_j| <= 2**-4 * sum_k |x_k| |w_jk| + 2**-10 * s * sum_k |w_jk| + the fp32 sums' and the
output dtype's rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from provision import quant
from provision.model.quantized import (
    QuantLinear,
    fake_quant_fp8_per_token,
    fp8_scaled_mm,
    kernels_used,
    quantize_fp8_per_token,
    scaled_mm_supported,
    set_fp8_kernel,
)

E4M3_MANTISSA_BITS = 3
U_NORMAL = 2.0 ** -(E4M3_MANTISSA_BITS + 1)  # half an ulp, relative: 1/16
E4M3_MIN_NORMAL_EXP = -6
SUBNORMAL_HALF_SPACING = 2.0 ** (E4M3_MIN_NORMAL_EXP - E4M3_MANTISSA_BITS - 1)  # 2**-10
FP32_U = 2.0**-24
OUT_U = {torch.float32: FP32_U, torch.bfloat16: 2.0**-8}  # bf16: 7 stored mantissa bits


def _layer(out_f: int, in_f: int, *, bias: bool = False, kernel: str = "auto", seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * torch.logspace(-2, 0, out_f).reshape(-1, 1)
    q, scale = quant.quantize_fp8(w)
    b = torch.randn(out_f, generator=g) if bias else None
    return QuantLinear(in_f, out_f, "fp8", {"weight": q, "weight_scale": scale}, b, quantize_inputs=True,
                       fp8_kernel=kernel)  # type: ignore[arg-type]


def _inputs(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[..., 0] *= 30.0  # an outlier channel, as real activations have: most values fall far below the max
    return x * torch.logspace(-4, 1, shape[-2]).reshape(*([1] * (len(shape) - 2)), -1, 1)


def _bound(x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The per-output error bound derived from E4M3 (module docstring), in float64."""
    xa, wa = x.double().abs(), w.double().abs()
    k = x.shape[-1]
    s = xa.amax(-1, keepdim=True) / 448.0  # the token's scale (448 = E4M3's largest finite value)
    quant_err = U_NORMAL * (xa @ wa.T) + SUBNORMAL_HALF_SPACING * s * wa.sum(-1)
    sums = (k + 2) * FP32_U * (((1 + U_NORMAL) * xa) @ wa.T)  # fp32 products and sums, scale multiplies
    return quant_err + sums + OUT_U[out_dtype] * (ref.double().abs() + quant_err + sums) + 1e-30


def test_torch_on_this_cpu_runs_scaled_mm_with_e4m3_and_rowwise_scales() -> None:
    a = torch.tensor([[1.0, 2.0], [3.0, -4.0]]).to(torch.float8_e4m3fn)
    b = torch.tensor([[0.5, 1.0], [-2.0, 1.5]]).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(a, b.t(), scale_a=torch.tensor([[2.0], [1.0]]), scale_b=torch.tensor([[1.0, 0.5]]),
                           out_dtype=torch.float32)
    # rows scaled by 2 and 1, columns by 1 and 0.5: [[2*(0.5+2), 0.5*2*(-2+3)], [3*0.5-4, 0.5*(-6-6)]]
    assert out.tolist() == [[5.0, 1.0], [-2.5, -6.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shape", "out_f", "bias"), [((1, 1, 256), 64, False), ((2, 7, 128), 48, True),
                                                       ((9, 320), 80, False)])
def test_scaled_mm_path_matches_the_dequantized_reference_within_e4m3_rounding(
        dtype: torch.dtype, shape: tuple[int, ...], out_f: int, bias: bool) -> None:
    layer = _layer(out_f, shape[-1], bias=bias, kernel="scaled_mm")
    x = _inputs(shape).to(dtype)
    w = layer.dequantized_weight(torch.float32)
    b = layer.bias.float() if layer.bias is not None else None
    ref = F.linear(x.float(), w, b)  # unquantized activations, the stored (dequantized) weight
    y = layer(x)
    assert layer.last_kernel == "scaled_mm" and y.dtype == dtype and y.shape == (*shape[:-1], out_f)
    err = (y.double() - ref.double()).abs()
    bound = _bound(x.float(), w, ref, dtype)
    assert bool((err <= bound).all()), f"worst error/bound {(err / bound).max().item():.3f}"
    assert err.max().item() > 0  # the activations really were rounded to fp8


def test_the_bound_catches_an_activation_scale_applied_per_tensor_instead_of_per_token() -> None:
    x = _inputs((6, 256))
    layer = _layer(32, 256, kernel="dequant")
    w = layer.dequantized_weight()
    ref = F.linear(x, w)
    s = x.abs().amax() / 448.0  # one scale for all tokens: small tokens lose most of their bits
    wrong = F.linear((x / s).to(torch.float8_e4m3fn).float() * s, w)
    assert not bool(((wrong - ref).abs() <= _bound(x, w, ref, torch.float32)).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_mm_and_dequant_kernels_agree_to_the_rounding_of_their_sums(dtype: torch.dtype) -> None:
    x = _inputs((3, 5, 256)).to(dtype)
    fast, slow = _layer(64, 256, bias=True, kernel="scaled_mm"), _layer(64, 256, bias=True, kernel="dequant")
    a, b = fast(x), slow(x)
    assert (fast.last_kernel, slow.last_kernel) == ("scaled_mm", "dequant")
    # the same fp8 products: only the order of the sums and the output rounding differ
    xq = fake_quant_fp8_per_token(x).double().abs()
    w = slow.dequantized_weight().double().abs()
    tol = (256 + 4) * FP32_U * (xq @ w.T) + 2 * OUT_U[dtype] * (b.double().abs() + 1.0)
    if dtype == torch.bfloat16:  # the dequant path also rounds the weight and each product's inputs to bf16
        tol = tol + 2 * OUT_U[dtype] * (xq @ w.T)
    assert bool(((a.double() - b.double()).abs() <= tol).all())


def test_quantize_per_token_returns_the_scale_the_fake_quant_applies() -> None:
    x = _inputs((4, 96))
    q, s = quantize_fp8_per_token(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (4, 1)
    assert torch.equal(q.float() * s, fake_quant_fp8_per_token(x))
    assert torch.equal(s, x.abs().amax(-1, keepdim=True) / 448.0)


def test_fp8_scaled_mm_keeps_leading_dimensions() -> None:
    layer = _layer(16, 32, kernel="scaled_mm")
    x = _inputs((2, 3, 4, 32))
    y = fp8_scaled_mm(x, layer.get_buffer("weight"), layer.scale_row())
    assert y.shape == (2, 3, 4, 16)
    assert torch.allclose(y, layer(x))


def test_auto_runs_the_dequant_kernel_on_the_cpu() -> None:
    layer = _layer(32, 64)
    layer(torch.randn(2, 64))
    assert layer.last_kernel == "dequant"


@pytest.mark.parametrize(("capability", "dtype", "dims", "expected"), [
    ((9, 0), torch.bfloat16, (5120, 14336), True),   # H100 / H200
    ((8, 9), torch.bfloat16, (5120, 1024), True),    # L4 / L40S (Ada)
    ((8, 6), torch.bfloat16, (5120, 1024), False),   # A10: no fp8 tensor cores
    ((8, 0), torch.bfloat16, (5120, 1024), False),   # A100
    ((9, 0), torch.float32, (5120, 1024), False),    # row-wise fp8 GEMMs write bf16
    ((9, 0), torch.bfloat16, (5120, 1000), False),   # a dimension not a multiple of 16
])
def test_auto_picks_scaled_mm_only_on_fp8_tensor_core_gpus(monkeypatch: pytest.MonkeyPatch,
                                                           capability: tuple[int, int], dtype: torch.dtype,
                                                           dims: tuple[int, int], expected: bool) -> None:
    from provision.model import quantized

    monkeypatch.setattr(quantized, "_cuda_capability", lambda index: capability)
    assert scaled_mm_supported(torch.device("cuda", 0), dtype, *dims) is expected
    assert scaled_mm_supported(torch.device("cpu"), dtype, *dims) is False


def test_weight_only_and_int_layers_never_take_the_fp8_kernel() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=g)
    q, s = quant.quantize_fp8(w)
    weight_only = QuantLinear(128, 32, "fp8", {"weight": q, "weight_scale": s}, quantize_inputs=False,
                              fp8_kernel="scaled_mm")
    int8 = QuantLinear(128, 32, "w8a16", quant.quantize(w, "w8a16"), fp8_kernel="scaled_mm")
    x = torch.randn(2, 128)
    for layer in (weight_only, int8):
        layer(x)
        assert layer.last_kernel == "dequant"


def test_an_unknown_kernel_name_is_refused() -> None:
    with pytest.raises(ValueError, match="fp8_kernel"):
        _layer(16, 16, kernel="cutlass")
    with pytest.raises(ValueError, match="fp8 kernel"):
        set_fp8_kernel(torch.nn.Sequential(), "cutlass")  # type: ignore[arg-type]


def test_a_whole_fp8_model_gives_the_same_logits_with_either_kernel(tiny_src: Path, tmp_path: Path) -> None:
    from provision.model.loader import load_model
    from provision.stages.convert import convert

    out = tmp_path / "fp8"
    convert(tiny_src, out, target="h100", scheme="fp8", layout="hf", hf_tokenizer=False)
    assert json.loads((out / "config.json").read_text())["quantization_config"]
    model, _args = load_model(out, device="cpu", dtype=torch.float32)
    reusing = sorted({n.rsplit(".", 1)[1] for n, m in model.named_modules()
                      if isinstance(m, QuantLinear) and m.reuse_input})
    assert reusing == ["w3", "wk", "wv"]
    tokens = torch.tensor([[1, 5, 9, 200, 17, 3]])
    with torch.inference_mode():  # as greedy_generate runs it
        assert set_fp8_kernel(model, "dequant") > 0
        slow = model(tokens)
        assert set(kernels_used(model)) == {"dequant"}
        set_fp8_kernel(model, "scaled_mm")
        fast = model(tokens)
        assert set(kernels_used(model)) == {"scaled_mm"}
    assert torch.isfinite(fast).all()
    assert torch.allclose(fast, slow, rtol=1e-4, atol=1e-4 * slow.abs().max().item())


@pytest.mark.parametrize("inference", [False, True])
def test_a_sibling_reading_the_same_input_reuses_its_quantization(monkeypatch: pytest.MonkeyPatch,
                                                                   inference: bool) -> None:
    from provision.model import quantized

    calls: list[tuple[int, ...]] = []
    real = quantized.quantize_fp8_per_token

    def counting(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(tuple(x.shape))
        return real(x)

    monkeypatch.setattr(quantized, "quantize_fp8_per_token", counting)
    wq, wk = _layer(32, 64, kernel="scaled_mm", seed=1), _layer(16, 64, kernel="scaled_mm", seed=2)
    wk.reuse_input = True  # what apply_quantization sets on wk/wv/w3
    with torch.inference_mode(inference):
        x = _inputs((2, 3, 64))
        a1, b1 = wq(x), wk(x)  # as Attention calls wq(x), wk(x), wv(x)
        assert len(calls) == 1
        wq(x)  # wq never reuses: each layer input is quantized afresh by the first reader
        assert len(calls) == 2
        y = x.clone()  # equal values, another tensor: quantized anew
        assert torch.equal(wk(y), b1) and len(calls) == 3
        if not inference:  # a version-counted tensor changed in place is quantized again, even by wk
            wq(x)
            x.mul_(2.0)
            b2 = wk(x)
            assert len(calls) == 5 and torch.allclose(b2, 2 * b1, rtol=0.07)
    x = _inputs((2, 3, 64))
    ref = F.linear(x, wk.dequantized_weight())
    assert bool(((b1 - ref).abs() <= _bound(x, wk.dequantized_weight(), ref, torch.float32)).all())
    del a1


def test_auto_falls_back_to_dequant_when_torch_refuses_the_fp8_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    from provision.model import quantized

    def refuse(*_a: object, **_k: object) -> torch.Tensor:
        raise RuntimeError("row-wise scaling is not supported on this device")

    monkeypatch.setattr(quantized, "SCALED_MM_REFUSED", {})
    monkeypatch.setattr(quantized, "scaled_mm_supported", lambda *a: 0 not in quantized.SCALED_MM_REFUSED)
    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    layer = _layer(32, 64)
    x = _inputs((3, 64))
    y = layer(x)
    assert layer.last_kernel == "dequant" and "not supported" in quantized.SCALED_MM_REFUSED[0]
    assert torch.equal(y, _layer(32, 64, kernel="dequant")(x))
    forced = _layer(32, 64, kernel="scaled_mm")
    with pytest.raises(RuntimeError, match="not supported"):
        forced(x)  # asked for by name: the error is the caller's to see
