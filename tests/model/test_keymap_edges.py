"""The key map's config.json side and its refusals, against published configs.

``hf_config`` of Pixtral 12B's params.json is compared key by key with the ``config.json`` of
``mistral-community/pixtral-12b`` (../shared/reference/pixtral-12b.md §2.4, the 997-byte version),
``hf_text_config`` of Mistral 7B v0.1 with its Hub config's rope/window values
(../shared/reference/mistral-family.md §3); the readers' defaults and errors are checked with
dicts written here. Nothing is compared with the output of the function under test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from provision.errors import ConvertError, ParamsError
from provision.formats.params import ModelArgs
from provision.model import hf_names as keymap
from tests.support.params import MIXTRAL_8X7B, pixtral_args

DATA = Path(__file__).resolve().parents[1] / "data"

# mistral-community/pixtral-12b config.json (reference §2.4), the keys provision writes
PUBLISHED_PIXTRAL: dict[str, Any] = {
    "architectures": ["LlavaForConditionalGeneration"], "image_seq_length": 1, "image_token_index": 10,
    "model_type": "llava", "projector_hidden_act": "gelu", "torch_dtype": "bfloat16",
    "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
}
PUBLISHED_PIXTRAL_TEXT: dict[str, Any] = {
    "hidden_size": 5120, "head_dim": 128, "intermediate_size": 14336, "max_position_embeddings": 1024000,
    "model_type": "mistral", "num_hidden_layers": 40, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_theta": 1000000000.0, "sliding_window": None, "vocab_size": 131072,
    "num_attention_heads": 32,  # absent there: MistralConfig's default, = params.json n_heads
}
PUBLISHED_PIXTRAL_VISION: dict[str, Any] = {
    "head_dim": 64, "hidden_act": "silu", "image_size": 1024, "model_type": "pixtral", "patch_size": 16,
    "rope_theta": 10000.0,
    # absent there (PixtralVisionConfig defaults), = Pixtral 12B's params.json vision_encoder (§3)
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_channels": 3,
}


def test_hf_config_of_pixtral_12b_agrees_with_the_published_config_json() -> None:
    cfg = keymap.hf_config(pixtral_args())
    assert {k: cfg[k] for k in PUBLISHED_PIXTRAL} == PUBLISHED_PIXTRAL
    assert {k: cfg["text_config"][k] for k in PUBLISHED_PIXTRAL_TEXT} == PUBLISHED_PIXTRAL_TEXT
    assert {k: cfg["vision_config"][k] for k in PUBLISHED_PIXTRAL_VISION} == PUBLISHED_PIXTRAL_VISION
    t = cfg["text_config"]
    assert t["hidden_act"] == "silu" and t["tie_word_embeddings"] is False and cfg["tie_word_embeddings"] is False
    assert (t["bos_token_id"], t["eos_token_id"]) == (1, 2)  # <s>, </s> in Mistral's tokenizers
    assert t["rope_parameters"] == {"rope_type": "default", "rope_theta": 1000000000.0}
    assert cfg["vision_config"]["rope_parameters"] == {"rope_type": "axial", "rope_theta": 10000.0}
    assert cfg["multimodal_projector_bias"] is True
    assert keymap.hf_config(pixtral_args(), dtype="float16")["torch_dtype"] == "float16"


def test_hf_text_config_of_mistral_7b_writes_rope_1e4_and_the_4096_window() -> None:
    args = ModelArgs.from_dict(json.loads((DATA / "mistral-7b-v0.1-params.json").read_text()))
    cfg = keymap.hf_text_config(args)
    assert cfg["architectures"] == ["MistralForCausalLM"] and cfg["model_type"] == "mistral"
    assert (cfg["rope_theta"], cfg["sliding_window"]) == (10000.0, 4096)  # the Hub config's values
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"]) == (4096, 32, 32, 8, 32000)
    assert cfg["max_position_embeddings"] == 32768  # no max_seq_len in params.json
    assert cfg["torch_dtype"] == "bfloat16"


def test_hf_configs_refuse_the_wrong_kind_of_model() -> None:
    text_only = ModelArgs.from_dict(json.loads((DATA / "mistral-7b-v0.1-params.json").read_text()))
    with pytest.raises(ConvertError, match="no vision_encoder"):
        keymap.hf_config(text_only)
    with pytest.raises(ConvertError, match="has a vision_encoder"):
        keymap.hf_text_config(pixtral_args())
    with pytest.raises(ConvertError, match="mixture-of-experts"):
        keymap.hf_text_config(ModelArgs.from_dict(MIXTRAL_8X7B))


def _llava(**over: Any) -> dict[str, Any]:
    text = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2,
            "intermediate_size": 128, "rms_norm_eps": 1e-5, "vocab_size": 100}
    vision = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "num_hidden_layers": 1}
    cfg: dict[str, Any] = {"text_config": text, "vision_config": vision}
    cfg.update(over)
    return cfg


def test_reading_a_minimal_llava_config_fills_the_documented_defaults() -> None:
    a = keymap.args_from_hf_config(_llava())
    assert (a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.n_layers, a.hidden_dim) == (64, 4, 4, 16, 2, 128)
    assert a.rope_theta == 10000.0 and a.sliding_window is None and a.max_position_embeddings is None
    v = a.vision_encoder
    assert v is not None
    assert (v.num_channels, v.image_size, v.patch_size, v.rope_theta) == (3, 1024, 16, 10000.0)
    assert v.image_token_id == 10 and v.adapter_bias is True


def test_reading_takes_rope_parameters_over_rope_theta_and_copies_the_window() -> None:
    cfg = _llava(image_token_index=7, multimodal_projector_bias=False)
    cfg["text_config"].update(rope_theta=5.0, rope_parameters={"rope_theta": 7.0}, sliding_window=16,
                              max_position_embeddings=256, head_dim=8, num_key_value_heads=2)
    cfg["vision_config"].update(rope_theta=3.0, num_channels=1, image_size=64, patch_size=8)
    a = keymap.args_from_hf_config(cfg)
    assert a.rope_theta == 7.0 and a.sliding_window == 16 and a.max_position_embeddings == 256
    assert a.head_dim == 8 and a.n_kv_heads == 2
    v = a.vision_encoder
    assert v is not None and v.rope_theta == 3.0 and (v.num_channels, v.image_size, v.patch_size) == (1, 64, 8)
    assert v.image_token_id == 7 and v.adapter_bias is False
    cfg["text_config"].pop("rope_parameters")
    assert keymap.args_from_hf_config(cfg).rope_theta == 5.0


@pytest.mark.parametrize(("cfg", "needle"), [
    ([], "must be a JSON object"),
    ({"text_config": {}, "vision_config": []}, "text_config and vision_config must be objects"),
    ({"text_config": [], "vision_config": {}}, "text_config and vision_config must be objects"),
    ({"text_config": {}}, r"config.json: required key 'vision_config' is missing"),
])
def test_malformed_llava_configs_are_params_errors(cfg: Any, needle: str) -> None:
    with pytest.raises(ParamsError, match=needle) as ei:
        keymap.args_from_hf_config(cfg)
    assert ei.value.exit_code == 3


# transformers' defaults for keys a config.json leaves out (MistralConfig / PixtralVisionConfig /
# MixtralConfig __init__ signatures, transformers 4.x-5.x): the values written here, not read from provision
@pytest.mark.parametrize(("part", "key", "default", "field", "keep_valid"), [
    ("text_config", "hidden_size", 4096, "dim", {"head_dim": 16}),
    ("text_config", "vocab_size", 32000, "vocab_size", {}),
    ("text_config", "rms_norm_eps", 1e-6, "norm_eps", {}),
    ("text_config", "num_attention_heads", 32, "n_heads", {"head_dim": 16, "num_key_value_heads": 8}),
    ("text_config", "num_key_value_heads", 8, "n_kv_heads", {"num_attention_heads": 8}),
    ("vision_config", "hidden_size", 1024, "vision_encoder.hidden_size", {}),
    ("vision_config", "num_hidden_layers", 24, "vision_encoder.num_hidden_layers", {}),
    ("vision_config", "num_attention_heads", 16, "vision_encoder.num_attention_heads", {"hidden_size": 128}),
    ("vision_config", "intermediate_size", 4096, "vision_encoder.intermediate_size", {}),
])
def test_a_key_the_config_leaves_out_takes_the_transformers_default(part: str, key: str, default: Any, field: str,
                                                                    keep_valid: dict[str, Any]) -> None:
    cfg = _llava()
    del cfg[part][key]
    cfg[part].update(keep_valid)  # other sizes set so the default makes a valid model (heads divide, etc.)
    got: Any = keymap.args_from_hf_config(cfg)
    for attr in field.split("."):
        got = getattr(got, attr)
    assert got == default


def test_the_published_pixtral_12b_config_json_is_read_with_transformers_defaults() -> None:
    # mistral-community/pixtral-12b's config.json leaves out the decoder's head count and the vision
    # encoder's sizes (see PUBLISHED_PIXTRAL_TEXT / _VISION above): read, it is Pixtral 12B's architecture
    text = {k: v for k, v in PUBLISHED_PIXTRAL_TEXT.items() if k != "num_attention_heads"}
    vision = {k: v for k, v in PUBLISHED_PIXTRAL_VISION.items()
              if k not in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")}
    a = keymap.args_from_hf_config({**PUBLISHED_PIXTRAL, "text_config": text, "vision_config": vision})
    want = pixtral_args()
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.hidden_dim, a.vocab_size) == \
        (want.dim, want.n_layers, want.n_heads, want.n_kv_heads, want.head_dim, want.hidden_dim, want.vocab_size)
    assert a.vision_encoder == want.vision_encoder


def test_a_text_only_config_is_read_with_its_window_and_mixtral_experts() -> None:
    t = dict(_llava()["text_config"], model_type="mistral", sliding_window=4096, max_position_embeddings=32768)
    a = keymap.args_from_hf_config(t)  # no text_config/vision_config: the text-only reader
    assert a.vision_encoder is None and a.sliding_window == 4096 and a.max_position_embeddings == 32768
    assert a.moe is None
    m = keymap.args_from_hf_text_config(dict(t, model_type="mixtral", num_local_experts=8, num_experts_per_tok=2))
    assert m.moe is not None and (m.moe.num_experts, m.moe.num_experts_per_tok) == (8, 2)
    # MixtralConfig's defaults: 8 experts, 2 per token; MistralConfig's hidden_size 4096
    m = keymap.args_from_hf_text_config(dict(t, model_type="mixtral", num_experts_per_tok=2))
    assert m.moe is not None and m.moe.num_experts == 8
    m = keymap.args_from_hf_text_config(dict(t, model_type="mixtral", num_local_experts=8))
    assert m.moe is not None and m.moe.num_experts_per_tok == 2
    assert keymap.args_from_hf_text_config({k: v for k, v in t.items() if k != "hidden_size"}).dim == 4096
    no_type = {k: v for k, v in t.items() if k != "model_type"}
    assert keymap.args_from_hf_text_config(no_type).dim == 64


@pytest.mark.parametrize("bad", [[], "config"])
def test_a_text_config_that_is_not_an_object_is_a_params_error(bad: Any) -> None:
    with pytest.raises(ParamsError, match="must be a JSON object"):
        keymap.args_from_hf_text_config(bad)


def test_a_text_config_of_llama_is_refused_naming_its_model_type() -> None:
    with pytest.raises(ParamsError, match="model_type 'llama' is not a Mistral text model"):
        keymap.args_from_hf_text_config(dict(_llava()["text_config"], model_type="llama"))


def test_text_only_names_use_model_and_lm_head_and_refuse_vision_tensors() -> None:
    t = keymap.mistral_name_to_hf_text
    assert t("layers.2.attention.wq.weight") == "model.layers.2.self_attn.q_proj.weight"
    assert t("norm.weight") == "model.norm.weight"
    assert t("output.weight") == "lm_head.weight"
    assert t("tok_embeddings.weight") == "model.embed_tokens.weight"
    for vision in ("vision_encoder.ln_pre.weight", "vision_language_adapter.w_in.weight"):
        with pytest.raises(ConvertError, match="not a text-decoder tensor"):
            t(vision)


def test_text_only_tensors_are_renamed_and_q_k_permuted() -> None:
    args = ModelArgs.from_dict(json.loads((DATA / "mistral-7b-v0.1-params.json").read_text()))
    w = torch.arange(8 * 128 * 2, dtype=torch.float32).reshape(8 * 128, 2)  # wk: n_kv_heads * head_dim rows
    name, t = keymap.mistral_to_hf_text("layers.0.attention.wk.weight", w, args)
    ref = w.view(8, 64, 2, 2).transpose(1, 2).reshape(1024, 2)  # transformers' permute_for_rope
    assert name == "model.layers.0.self_attn.k_proj.weight" and torch.equal(t, ref)
    name, t = keymap.mistral_to_hf_text("layers.0.attention.wv.weight", w, args)
    assert name == "model.layers.0.self_attn.v_proj.weight" and t is w


def test_mixtral_expert_names_map_back_to_the_feed_forward_experts() -> None:
    h = keymap.hf_name_to_mistral
    assert h("model.layers.3.block_sparse_moe.experts.5.w2.weight") == "layers.3.feed_forward.experts.5.w2.weight"
    assert h("model.layers.0.block_sparse_moe.gate.weight") == "layers.0.feed_forward.gate.weight"
    assert h("model.layers.0.mlp.down_proj.weight") == "layers.0.feed_forward.w2.weight"


def test_newer_name_prefixes_normalise_to_the_legacy_ones_and_others_stay() -> None:
    n = keymap.normalize_hf_name
    assert n("model.layers.0.self_attn.q_proj.weight") == "language_model.model.layers.0.self_attn.q_proj.weight"
    assert n("model.language_model.norm.weight") == "language_model.model.norm.weight"
    assert n("model.vision_tower.ln_pre.weight") == "vision_tower.ln_pre.weight"
    assert n("lm_head.weight") == "language_model.lm_head.weight"
    assert n("vision_tower.ln_pre.weight") == "vision_tower.ln_pre.weight"


def test_a_vision_q_projection_without_a_vision_encoder_is_a_convert_error() -> None:
    text_only = ModelArgs.from_dict(json.loads((DATA / "mistral-7b-v0.1-params.json").read_text()))
    with pytest.raises(ConvertError, match="is a vision tensor but params has no vision_encoder"):
        keymap.rope_heads("vision_encoder.transformer.layers.0.attention.wk.weight", text_only)
    assert keymap.rope_heads("layers.0.attention.wq.weight", text_only) == 32
    assert keymap.rope_heads("layers.0.attention.wk.weight", text_only) == 8
    assert keymap.rope_heads("layers.0.attention.wo.weight", text_only) is None


@pytest.mark.parametrize("permute", [keymap.permute_to_hf, keymap.permute_to_mistral])
def test_rows_that_do_not_split_into_head_pairs_are_refused(permute: Any) -> None:
    with pytest.raises(ConvertError, match="Cannot permute a q/k tensor with 12 rows over 4 heads"):
        permute(torch.zeros(12, 3), 4)


def test_a_scale_with_other_rows_than_the_projection_is_left_alone() -> None:
    args = pixtral_args()
    per_group = torch.arange(40 * 3, dtype=torch.float32).reshape(40, 3)  # not n_heads * head_dim rows
    assert keymap.mistral_to_hf("layers.0.attention.wq.weight_scale", per_group, args)[1] is per_group
    one = torch.tensor([2.0])
    assert keymap.mistral_to_hf("layers.0.attention.wq.input_scale", one, args)[1] is one
    vision_rows = torch.arange(16 * 64, dtype=torch.float32).reshape(1024, 1)  # vision: 16 heads * 64
    _, t = keymap.mistral_to_hf("vision_encoder.transformer.layers.0.attention.wq.weight", vision_rows, args)
    assert torch.equal(t, vision_rows.view(16, 32, 2, 1).transpose(1, 2).reshape(1024, 1))


def test_a_1d_per_channel_scale_of_a_q_projection_is_permuted_like_its_rows() -> None:
    args = pixtral_args()  # wq: 32 heads * 128 = 4096 rows
    scale = torch.arange(4096, dtype=torch.float32)
    _, t = keymap.mistral_to_hf("layers.0.attention.wq.weight_scale", scale, args)
    assert torch.equal(t, scale.view(32, 64, 2).transpose(1, 2).reshape(4096))
