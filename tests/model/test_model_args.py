"""params.json -> ModelArgs and the tensor spec, checked against the reference's tensor table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from provision.errors import ParamsError
from provision.formats.params import ModelArgs, parameter_count, tensor_spec

REAL = Path(__file__).parents[1] / "data" / "pixtral-12b-params.json"


def test_real_params_imply_585_tensors_and_12_682_739_712_parameters() -> None:
    args = ModelArgs.from_file(REAL)
    spec = tensor_spec(args)
    assert len(spec) == 585
    assert parameter_count(args) == 12_682_739_712
    assert parameter_count(args) * 2 == 25_365_479_424  # bf16 bytes


def test_real_params_tensor_shapes_match_the_reference_table() -> None:
    spec = tensor_spec(ModelArgs.from_file(REAL))
    assert spec["tok_embeddings.weight"] == (131072, 5120)
    assert spec["layers.39.attention.wq.weight"] == (4096, 5120)
    assert spec["layers.0.attention.wk.weight"] == (1024, 5120)
    assert spec["layers.0.attention.wo.weight"] == (5120, 4096)
    assert spec["layers.0.feed_forward.w1.weight"] == (14336, 5120)
    assert spec["layers.0.feed_forward.w2.weight"] == (5120, 14336)
    assert spec["output.weight"] == (131072, 5120)
    assert spec["vision_encoder.patch_conv.weight"] == (1024, 3, 16, 16)
    assert spec["vision_encoder.transformer.layers.23.feed_forward.w2.weight"] == (1024, 4096)
    assert spec["vision_language_adapter.w_in.weight"] == (5120, 1024)
    assert spec["vision_language_adapter.w_out.bias"] == (5120,)
    assert "layers.40.attention.wq.weight" not in spec


def test_release_params_defaults_fill_missing_vision_keys() -> None:
    args = ModelArgs.from_file(REAL)
    v = args.vision_encoder
    assert v is not None
    assert (v.image_token_id, v.image_break_token_id, v.image_end_token_id) == (10, 12, 13)
    assert v.adapter_bias is True and v.head_dim == 64 and v.max_patches_per_side == 64
    assert args.rope_theta_value == 1e9


def test_missing_rope_theta_means_10000() -> None:
    d = json.loads(REAL.read_text())
    del d["rope_theta"]
    assert ModelArgs.from_dict(d).rope_theta_value == 10000.0


def test_params_round_trip_through_to_dict() -> None:
    d = json.loads(REAL.read_text())
    assert ModelArgs.from_dict(ModelArgs.from_dict(d).to_dict()) == ModelArgs.from_dict(d)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d.pop("dim"), "'dim' is missing"),
        (lambda d: d.update(n_layers="40"), "'n_layers' must be int"),
        (lambda d: d.update(norm_eps="tiny"), "'norm_eps' must be float"),
        (lambda d: d.update(n_heads=True), "'n_heads' must be int"),
        (lambda d: d["vision_encoder"].pop("patch_size"), "vision_encoder: required key 'patch_size'"),
        (lambda d: d["vision_encoder"].update(hidden_size=1.5), "'hidden_size' must be int"),
        (lambda d: d.update(n_kv_heads=7), "multiple of n_kv_heads"),
    ],
)
def test_bad_params_raise_params_error_with_exit_3(mutate, needle: str) -> None:  # type: ignore[no-untyped-def]
    d = json.loads(REAL.read_text())
    mutate(d)
    with pytest.raises(ParamsError) as ei:
        ModelArgs.from_dict(d)
    assert needle in str(ei.value)
    assert ei.value.exit_code == 3


def test_params_file_that_is_not_json_is_a_params_error(tmp_path: Path) -> None:
    p = tmp_path / "params.json"
    p.write_text("{not json")
    with pytest.raises(ParamsError, match="not valid JSON"):
        ModelArgs.from_file(p)


def test_unknown_keys_are_kept_not_rejected() -> None:
    d = json.loads(REAL.read_text())
    d["quantization"] = {"qformat_weight": "fp8_e4m3"}
    assert ModelArgs.from_dict(d).extra == {"quantization": {"qformat_weight": "fp8_e4m3"}}
