"""The dequantize-on-the-fly runtime: config parsing, layer swap by either naming, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from provision import quant
from provision.errors import ConvertError
from provision.model.quantized import (
    QuantLinear,
    apply_quantization,
    fake_quant_fp8_per_token,
    quantized_modules,
    scheme_from_config,
)
from provision.stages.convert import convert, quantization_config
from tests.support.files import load_st


@pytest.mark.parametrize("scheme", ["fp8", "w8a16", "w4a16"])
def test_scheme_is_read_back_from_our_config(scheme: str) -> None:
    assert scheme_from_config({"quantization_config": quantization_config(scheme)}) == scheme
    assert scheme_from_config(quantization_config(scheme)) == scheme


@pytest.mark.parametrize("bad", [
    {"quant_method": "gptq", "bits": 4},
    {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {}},
    {"quant_method": "compressed-tensors", "format": "pack-quantized",
     "config_groups": {"g": {"weights": {"type": "int", "num_bits": 3, "strategy": "group", "group_size": 128}}}},
])
def test_unknown_quantization_configs_are_conversion_errors(bad: dict[str, object]) -> None:
    with pytest.raises(ConvertError) as e:
        scheme_from_config({"quantization_config": bad})
    assert e.value.exit_code == 7


@pytest.mark.parametrize("scheme", ["fp8", "w4a16"])
def test_layers_swap_with_tensors_keyed_by_transformers_names(tiny128_src: Path, tmp_path: Path, scheme: str) -> None:
    from provision.formats.params import ModelArgs
    from provision.model.pixtral import build_model

    out = tmp_path / scheme
    convert(tiny128_src, out, target="h100", scheme=scheme, hf_tokenizer=False)
    cfg = json.loads((out / "config.json").read_text())
    hf_tensors = load_st(out / "model.safetensors")  # transformers names, q/k in rotate_half layout
    args = ModelArgs.from_file(tiny128_src / "params.json")
    model = build_model(args, device="meta")
    apply_quantization(model, cfg, hf_tensors)
    names = quantized_modules(model)
    assert len(names) == 14 and all(n.startswith("layers.") for n in names)
    src = load_st(tiny128_src / "consolidated.safetensors")
    for n in names:
        mod = model.get_submodule(n)
        assert isinstance(mod, QuantLinear)
        w = src[n + ".weight"]
        parts = quant.quantize(w, scheme)  # Mistral layout: the runtime must have undone the q/k permutation
        assert torch.equal(mod.dequantized_weight(), quant.dequantize(parts, scheme)), n


def test_a_config_without_quantized_tensors_is_refused(tiny128_src: Path) -> None:
    from provision.formats.params import ModelArgs
    from provision.model.pixtral import build_model

    model = build_model(ModelArgs.from_file(tiny128_src / "params.json"), device="meta")
    with pytest.raises(ConvertError):
        apply_quantization(model, {"quantization_config": quantization_config("w8a16")}, {})
    with pytest.raises(ConvertError):
        apply_quantization(model, None, {})


def test_quant_linear_matches_a_dense_linear_on_the_dequantized_weight() -> None:
    w = torch.randn(64, 256)
    parts = quant.quantize(w, "w8a16", scale_dtype=torch.float32)
    layer = QuantLinear(256, 64, "w8a16", parts)
    x = torch.randn(3, 5, 256)
    assert torch.allclose(layer(x), x @ quant.dequantize(parts, "w8a16").T, atol=1e-5)
    with pytest.raises(ConvertError):
        QuantLinear(128, 64, "w8a16", parts)  # wrong in_features for the stored tensors


def test_fp8_activation_fake_quant_is_per_token_and_bounded() -> None:
    x = torch.randn(2, 7, 256) * torch.logspace(-3, 2, 7).reshape(1, 7, 1)
    y = fake_quant_fp8_per_token(x)
    rel = ((x - y).abs() / x.abs().amax(-1, keepdim=True)).max()
    assert rel.item() <= 1 / 16 + 1e-6  # 3 mantissa bits, each token scaled to its own max
