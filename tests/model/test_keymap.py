"""The Mistral <-> transformers key map: renames, q/k RoPE permutation, config.json."""

from __future__ import annotations

import pytest
import torch

from provision.errors import ConvertError, ParamsError
from provision.formats.params import ModelArgs, tensor_spec
from provision.model import hf_names as keymap
from provision.testing.tiny import TINY_PARAMS
from tests.support.hf_reference import require_transformers

ARGS = ModelArgs.from_dict(TINY_PARAMS)


def _reference_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' convert_pixtral_weights_to_hf.permute_for_rope, verbatim maths."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def test_every_tensor_round_trips_through_hf_names_and_layout() -> None:
    g = torch.Generator().manual_seed(0)
    seen = set()
    for name, shape in tensor_spec(ARGS).items():
        t = torch.randn(shape, generator=g)
        hf_name, hf_t = keymap.mistral_to_hf(name, t, ARGS)
        assert hf_name not in seen
        seen.add(hf_name)
        back, back_t = keymap.hf_to_mistral(hf_name, hf_t, ARGS)
        assert back == name
        assert torch.equal(back_t, t)


def test_names_match_the_published_transformers_checkpoint() -> None:
    m = keymap.mistral_name_to_hf
    assert m("tok_embeddings.weight") == "language_model.model.embed_tokens.weight"
    assert m("output.weight") == "language_model.lm_head.weight"
    assert m("norm.weight") == "language_model.model.norm.weight"
    assert m("layers.3.attention.wk.weight") == "language_model.model.layers.3.self_attn.k_proj.weight"
    assert m("layers.3.feed_forward.w2.weight") == "language_model.model.layers.3.mlp.down_proj.weight"
    assert m("layers.3.attention_norm.weight") == "language_model.model.layers.3.input_layernorm.weight"
    assert m("layers.3.ffn_norm.weight") == "language_model.model.layers.3.post_attention_layernorm.weight"
    assert m("vision_encoder.patch_conv.weight") == "vision_tower.patch_conv.weight"
    assert m("vision_encoder.ln_pre.weight") == "vision_tower.ln_pre.weight"
    assert (m("vision_encoder.transformer.layers.23.feed_forward.w1.weight")
            == "vision_tower.transformer.layers.23.feed_forward.gate_proj.weight")
    assert (m("vision_encoder.transformer.layers.0.attention_norm.weight")
            == "vision_tower.transformer.layers.0.attention_norm.weight")
    assert m("vision_language_adapter.w_in.bias") == "multi_modal_projector.linear_1.bias"
    assert m("vision_language_adapter.w_out.weight") == "multi_modal_projector.linear_2.weight"


def test_newer_transformers_names_map_back_to_mistral() -> None:
    h = keymap.hf_name_to_mistral
    assert h("model.language_model.layers.1.self_attn.q_proj.weight") == "layers.1.attention.wq.weight"
    assert h("lm_head.weight") == "output.weight"
    assert h("model.vision_tower.ln_pre.weight") == "vision_encoder.ln_pre.weight"
    assert h("model.multi_modal_projector.linear_1.weight") == "vision_language_adapter.w_in.weight"


def test_qk_permutation_equals_the_transformers_formula_and_inverts() -> None:
    w = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64)
    for heads in (4, 2):
        rows = heads * 16
        ref = _reference_permute(w[:rows], heads)
        assert torch.equal(keymap.permute_to_hf(w[:rows], heads), ref)
        assert torch.equal(keymap.permute_to_mistral(ref, heads), w[:rows])
    _, t = keymap.mistral_to_hf("layers.0.attention.wq.weight", w, ARGS)
    assert torch.equal(t, _reference_permute(w, ARGS.n_heads))
    _, t = keymap.mistral_to_hf("layers.0.attention.wk.weight", w[:32], ARGS)
    assert torch.equal(t, _reference_permute(w[:32], ARGS.n_kv_heads))
    _, t = keymap.mistral_to_hf("vision_encoder.transformer.layers.1.attention.wq.weight", w, ARGS)
    assert torch.equal(t, _reference_permute(w, 4))


def test_only_q_and_k_projections_are_permuted() -> None:
    w = torch.randn(64, 64)
    for name in ("layers.0.attention.wv.weight", "layers.0.attention.wo.weight",
                 "vision_encoder.transformer.layers.0.attention.wv.weight"):
        assert torch.equal(keymap.mistral_to_hf(name, w, ARGS)[1], w)


def test_per_channel_scales_are_permuted_with_their_rows_and_scalars_are_not() -> None:
    scale = torch.arange(64, dtype=torch.float32).reshape(64, 1)
    name, t = keymap.mistral_to_hf("layers.0.attention.wq.weight_scale", scale, ARGS)
    assert name == "language_model.model.layers.0.self_attn.q_proj.weight_scale"
    assert torch.equal(t, _reference_permute(scale.expand(64, 2), 4)[:, :1])
    scalar = torch.tensor(0.5)
    assert torch.equal(keymap.mistral_to_hf("layers.0.attention.wq.input_scale", scalar, ARGS)[1], scalar)


def test_unknown_names_are_refused_with_a_convert_error() -> None:
    with pytest.raises(ConvertError, match="No Mistral->transformers key mapping"):
        keymap.mistral_name_to_hf("layers.0.attention.wz.weight")
    with pytest.raises(ConvertError, match="No transformers->Mistral key mapping"):
        keymap.hf_name_to_mistral("model.visual.blocks.0.weight")
    with pytest.raises(ConvertError, match="no parameter suffix"):
        keymap.mistral_name_to_hf("output")


def test_hf_config_round_trips_to_the_same_architecture() -> None:
    cfg = keymap.hf_config(ARGS)
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert cfg["image_token_index"] == 10
    assert cfg["vision_config"]["hidden_act"] == "silu"
    assert cfg["projector_hidden_act"] == "gelu"
    back = keymap.args_from_hf_config(cfg)
    assert tensor_spec(back) == tensor_spec(ARGS)
    assert back.rope_theta == ARGS.rope_theta
    assert back.vision_encoder is not None and back.vision_encoder.rope_theta == 10000.0


def test_a_config_without_text_config_is_a_params_error() -> None:
    with pytest.raises(ParamsError, match="text_config"):
        keymap.args_from_hf_config({"vision_config": {}})


@pytest.mark.parametrize(("section", "key", "value"), [
    ("text_config", "num_attention_heads", 0), ("text_config", "num_attention_heads", True),
    ("text_config", "hidden_size", "4096"), ("vision_config", "num_attention_heads", 0),
    ("text_config", "rope_theta", 10**400), ("text_config", "rope_theta", float("nan")),
    ("vision_config", "rope_theta", "ten thousand"),
])
def test_an_hf_config_divisor_or_theta_that_cannot_be_is_a_params_error_naming_the_key(
    section: str, key: str, value: object
) -> None:
    cfg = keymap.hf_config(ARGS)
    cfg[section].pop("head_dim", None)  # so hidden_size / num_attention_heads is computed
    cfg[section].pop("rope_parameters", None)  # read before rope_theta
    cfg[section][key] = value
    with pytest.raises(ParamsError) as e:
        keymap.args_from_hf_config(cfg)
    assert e.value.exit_code == 3 and repr(key) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parity
def test_hf_config_is_accepted_by_transformers_llava_config() -> None:
    transformers = require_transformers()
    cfg = transformers.LlavaConfig(**keymap.hf_config(ARGS))
    assert cfg.vision_config.hidden_act == "silu"
    assert cfg.text_config.head_dim == ARGS.head_dim
    assert cfg.vision_feature_layer == -1
