"""Pixtral Large's differences from Pixtral 12B: no adapter bias, [IMG_BREAK]/[IMG_END] ids from
params.json (14/15 with the v7m1 SentencePiece tokenizer), vocab 32768; parity with transformers'
``LlavaForConditionalGeneration`` (Pixtral vision) on a tiny Pixtral-Large-like checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from provision.formats.manifest import SmokeImage
from provision.formats.params import ModelArgs, parameter_count, tensor_spec
from provision.model.inputs import encode_chat, load_tokenizer, square_image
from provision.model.loader import load_model
from provision.model.pixtral import greedy_generate
from provision.stages.smoke import image_layout_ok
from tests.support.hf_reference import (
    hf_greedy,
    hf_logits,
    hf_model,
    require_transformers,
    write_hf_llava_copy,
)

# reference §3: the params.json values of Pixtral Large 2411 (third-party copies, consistent with the HF config)
PIXTRAL_LARGE = {
    "dim": 12288, "n_layers": 88, "head_dim": 128, "hidden_dim": 28672, "n_heads": 96, "n_kv_heads": 8,
    "rope_theta": 1000000000.0, "norm_eps": 1e-05, "vocab_size": 32768,
    "vision_encoder": {"hidden_size": 1408, "num_channels": 3, "image_size": 1024, "patch_size": 16,
                       "rope_theta": 10000.0, "intermediate_size": 6144, "num_hidden_layers": 40,
                       "num_attention_heads": 16, "image_token_id": 10, "image_break_token_id": 14,
                       "image_end_token_id": 15, "adapter_bias": False},
}


def _image(w: int, h: int, seed: int) -> Any:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy(), "RGB")


def test_pixtral_large_params_have_no_adapter_bias_and_break_end_ids_14_15() -> None:
    a = ModelArgs.from_dict(PIXTRAL_LARGE)
    v = a.vision_encoder
    assert v is not None and not v.adapter_bias and v.head_dim == 88
    assert (v.image_token_id, v.image_break_token_id, v.image_end_token_id) == (10, 14, 15)
    spec = tensor_spec(a)
    assert "vision_language_adapter.w_in.weight" in spec and "vision_language_adapter.w_in.bias" not in spec
    assert "vision_language_adapter.w_out.bias" not in spec
    decoder = sum(math_prod(s) for k, s in spec.items() if not k.startswith("vision"))
    assert decoder == 122_610_069_504  # reference §3: the Mistral Large 2 decoder ("123B")
    assert parameter_count(a) > 124_000_000_000  # with the vision encoder: "124B"


def math_prod(s: tuple[int, ...]) -> int:
    n = 1
    for x in s:
        n *= x
    return n


def test_the_model_builds_no_adapter_bias_for_pixtral_large() -> None:
    from provision.model.pixtral import build_model

    m = build_model(ModelArgs.from_dict(PIXTRAL_LARGE))  # meta device: no memory
    assert m.vision_language_adapter.w_in.bias is None and m.vision_language_adapter.w_out.bias is None
    assert {k: tuple(t.shape) for k, t in m.state_dict().items()} == tensor_spec(m.args)


def test_the_v7m1_tokenizer_lays_images_out_with_the_ids_params_json_names(tiny_pixtral_large: Path) -> None:
    args = ModelArgs.from_file(tiny_pixtral_large / "params.json")
    v = args.vision_encoder
    assert v is not None
    tok = load_tokenizer(tiny_pixtral_large)
    enc = encode_chat(tok, "Describe.", [_image(64, 48, 0)])
    ok, detail = image_layout_ok(enc.tokens, enc.grids, img=v.image_token_id, brk=v.image_break_token_id,
                                 end=v.image_end_token_id)
    assert ok, detail
    assert 14 in enc.tokens and 15 in enc.tokens and 12 not in enc.tokens
    # Pixtral 12B's ids (12/13) do not describe this layout
    assert not image_layout_ok(enc.tokens, enc.grids)[0]


def test_a_pixtral_large_checkpoint_with_adapter_bias_tensors_is_refused(tiny_pixtral_large: Path,
                                                                          tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from provision.errors import StructureError

    dst = tmp_path / "extra-bias"
    shutil.copytree(tiny_pixtral_large, dst)
    sd = load_file(str(dst / "consolidated.safetensors"))
    sd["vision_language_adapter.w_in.bias"] = torch.zeros(64, dtype=torch.bfloat16)
    save_file(sd, str(dst / "consolidated.safetensors"))
    with pytest.raises(StructureError) as e:
        load_model(dst, device="cpu")
    assert e.value.exit_code == 5


def test_the_smoke_test_passes_on_the_tiny_pixtral_large_checkpoint(tiny_pixtral_large: Path) -> None:
    from provision.stages.smoke import smoke

    rep = smoke(tiny_pixtral_large, device="cpu", dtype="float32")
    assert rep.passed
    assert next(c for c in rep.checks if c.name == "image_tokens").passed


@pytest.fixture(scope="module")
def large_ref(tiny_pixtral_large: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    require_transformers()
    hf = write_hf_llava_copy(tiny_pixtral_large, tmp_path_factory.mktemp("hf") / "pixtral-large")
    assert json.loads((hf / "config.json").read_text())["multimodal_projector_bias"] is False
    return hf_model(hf)


@pytest.mark.parity
def test_pixtral_large_like_logits_match_transformers_for_two_images(tiny_pixtral_large: Path,
                                                                      large_ref: Any) -> None:
    assert large_ref.model.multi_modal_projector.linear_1.bias is None
    model, _ = load_model(tiny_pixtral_large, device="cpu", dtype=torch.float32)
    enc = encode_chat(load_tokenizer(tiny_pixtral_large), "Compare these two pictures.",
                      [_image(64, 48, 1), _image(160, 96, 2)])
    with torch.no_grad():
        ours = model(torch.tensor([enc.tokens]), enc.images)
    theirs = hf_logits(large_ref, enc.tokens, enc.images)
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-3, f"max abs logit difference {diff}"


@pytest.mark.parity
def test_pixtral_large_like_greedy_tokens_match_transformers(tiny_pixtral_large: Path, large_ref: Any) -> None:
    model, _ = load_model(tiny_pixtral_large, device="cpu", dtype=torch.float32)
    enc = encode_chat(load_tokenizer(tiny_pixtral_large), "What colour is the square?",
                      [square_image(SmokeImage(width=64, height=48))])
    ours = greedy_generate(model, enc.tokens, enc.images, max_tokens=6, eos_id=2).tokens
    assert ours == hf_greedy(large_ref, enc.tokens, enc.images, 6)


def test_the_tiny_command_writes_the_large_kinds_and_refuses_pickling_them(tmp_path: Path) -> None:
    from provision.cli.main import run_cli

    assert run_cli(["tiny", str(tmp_path / "pl"), "--kind", "pixtral-large"]) == 0
    params = json.loads((tmp_path / "pl" / "params.json").read_text())
    assert params["vision_encoder"]["adapter_bias"] is False and (tmp_path / "pl" / "tokenizer.model.v7m1").is_file()
    assert run_cli(["tiny", str(tmp_path / "mx"), "--kind", "mixtral"]) == 0
    assert json.loads((tmp_path / "mx" / "params.json").read_text())["moe"] == {"num_experts": 8,
                                                                               "num_experts_per_tok": 2}
    assert run_cli(["tiny", str(tmp_path / "bad"), "--kind", "mixtral", "--pickle"]) == 2
    assert not (tmp_path / "bad").exists()
