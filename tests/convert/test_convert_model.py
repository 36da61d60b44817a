"""Converted outputs through the model: smoke test, logits vs 16-bit, transformers, compressed-tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from provision.stages.convert import compare_logits, convert
from tests.support.files import load_st
from tests.support.hf_reference import load_golden, require_compressed_tensors, require_transformers

# (cosine, top-1): random tiny weights give nearly flat logits, so top-1 is a weak signal here
THRESHOLDS = {"fp8": (0.99, 0.8), "w8a16": (0.999, 0.9), "w4a16": (0.95, 0.5)}


@pytest.fixture(scope="module")
def outputs(tiny_src: Path, tiny128_src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each scheme converted once per module (hf layout; bf16 also in the mistral layout)."""
    base = tmp_path_factory.mktemp("converted")
    out = {}
    out["bf16-mistral"] = convert(tiny_src, base / "bf16-mistral", target="h100", scheme="bf16").out_dir
    out["bf16-hf"] = convert(tiny_src, base / "bf16-hf", target="h100", scheme="bf16", layout="hf",
                             hf_tokenizer=False).out_dir
    for s in ("fp8", "w8a16", "w4a16"):
        out[s] = convert(tiny_src, base / s, target="h100", scheme=s, hf_tokenizer=False).out_dir
        out[s + "-128"] = convert(tiny128_src, base / (s + "-128"), target="h100", scheme=s,
                                  hf_tokenizer=False).out_dir
    return out


@pytest.mark.parametrize("name", ["bf16-mistral", "bf16-hf"])
def test_smoke_on_16_bit_output_gives_the_golden_ids(outputs: dict[str, Path], tiny_src: Path, name: str) -> None:
    from provision.stages.smoke import smoke

    rep = smoke(outputs[name], device="cpu", manifest=tiny_src / "manifest.toml",
                golden=load_golden()["token_ids"])
    assert rep.passed


@pytest.mark.parametrize("name", ["fp8", "w8a16", "w4a16", "w4a16-128"])
def test_smoke_runs_on_quantized_output(outputs: dict[str, Path], tiny_src: Path, name: str) -> None:
    from provision.model.loader import load_model
    from provision.model.quantized import quantized_modules
    from provision.stages.smoke import smoke

    rep = smoke(outputs[name], device="cpu", manifest=tiny_src / "manifest.toml")
    assert rep.passed and rep.layout == "hf" and rep.tokens_generated >= 1
    model, _ = load_model(outputs[name], device="cpu")
    n = len(quantized_modules(model))
    assert n == (14 if name in ("fp8", "w4a16-128") else 2)  # int on dim 64: only w2 has 128 columns


def test_16_bit_output_logits_equal_the_original(outputs: dict[str, Path], tiny_src: Path) -> None:
    q = compare_logits(tiny_src, outputs["bf16-hf"])
    assert q["top1_agreement"] == 1.0 and q["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("scheme", ["fp8", "w8a16", "w4a16"])
def test_quantized_logits_agree_with_16_bit(outputs: dict[str, Path], tiny128_src: Path, scheme: str) -> None:
    q = compare_logits(tiny128_src, outputs[scheme + "-128"])
    cos, top1 = THRESHOLDS[scheme]
    assert q["cosine"] >= cos and q["top1_agreement"] >= top1, q
    assert q["positions"] > 10


@pytest.mark.parity
@pytest.mark.parametrize("name", ["bf16-hf", "fp8", "w8a16-128", "w4a16-128"])
def test_hf_layout_loads_in_transformers_and_logits_match_ours(outputs: dict[str, Path], tiny_src: Path,
                                                                name: str) -> None:
    require_transformers()
    if name != "bf16-hf":
        require_compressed_tensors()
    from provision.formats.manifest import SmokeSpec
    from provision.model.inputs import encode_chat, load_tokenizer, square_image
    from provision.model.loader import load_model
    from tests.support.hf_reference import hf_logits, hf_model

    spec = SmokeSpec()
    enc = encode_chat(load_tokenizer(tiny_src), spec.prompt, [square_image(spec.image)])
    theirs = hf_logits(hf_model(outputs[name]), enc.tokens, enc.images)[0]
    model, _ = load_model(outputs[name], device="cpu", dtype=torch.float32)
    with torch.no_grad():
        ours = model(torch.tensor([enc.tokens]), enc.images)[0]
    if name == "fp8":
        # both quantize activations per token to fp8 (FP8_DYNAMIC) before the matmul; their
        # dynamic-scale arithmetic differs from ours in rounding, so only near-equality holds
        cos = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
        assert cos.min().item() > 0.999 and (ours - theirs).abs().max().item() < 0.1
        assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() > 0.9
    else:
        assert (ours - theirs).abs().max().item() < 1e-3
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parity
@pytest.mark.parametrize("scheme", ["fp8", "w8a16", "w4a16"])
def test_compressed_tensors_decompressor_matches_our_dequantization(outputs: dict[str, Path], scheme: str) -> None:
    require_compressed_tensors()
    import json

    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    from provision.model.loader import load_model
    from provision.model.quantized import QuantLinear, apply_quantization

    out = outputs[scheme + "-128"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    cfg = QuantizationConfig.model_validate(qc)  # their schema accepts our config
    group = cfg.config_groups["group_0"]
    sch = group if isinstance(group, QuantizationScheme) else QuantizationScheme.model_validate(group)
    comp = BaseCompressor.get_value_from_registry(qc["format"])
    ts = load_st(out / "model.safetensors")
    model, _ = load_model(out, device="cpu", dtype=torch.float32)
    del apply_quantization
    mods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(mods) == 14
    from provision.model import hf_names as keymap

    for name, mod in mods.items():
        hf = keymap.mistral_name_to_hf(name + ".weight")[: -len(".weight")]
        local = {k.rsplit(".", 1)[1]: v for k, v in ts.items() if k.startswith(hf + ".")}
        dense = comp.decompress(local, sch)["weight"]  # in the scale's dtype (bf16 here)
        _, dense_m = keymap.hf_to_mistral(hf + ".weight", dense, model.args)
        # q * scale is exact in float32; both sides then round it once to the scale's dtype
        assert torch.equal(dense_m, mod.dequantized_weight(torch.float32).to(dense.dtype)), name


def test_cli_compare_adds_the_logits_comparison_to_report_and_record(tiny_src: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from provision.cli.main import run_cli
    from provision.stages.convert import RECORD_NAME

    out = tmp_path / "o"
    assert run_cli(["convert", str(tiny_src), "--out", str(out), "--target", "l4", "--scheme", "fp8",
                    "--no-hf-tokenizer", "--compare", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)["convert"]
    cmp = doc["logits_comparison"]
    assert cmp["positions"] > 10 and 0.99 < cmp["cosine"] <= 1.0 + 1e-6 and 0.5 <= cmp["top1_agreement"] <= 1.0
    assert json.loads((out / RECORD_NAME).read_text())["logits_comparison"] == cmp
