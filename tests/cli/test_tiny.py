"""The tiny checkpoint: real names, scaled shapes, bf16, deterministic, real tokenizer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from provision.cli.main import run_cli
from provision.formats.manifest import load_manifest
from provision.formats.params import ModelArgs, tensor_spec
from provision.testing.tiny import TINY_PARAMS, write_tiny

REAL = Path(__file__).parents[1] / "data" / "pixtral-12b-params.json"


def test_tiny_params_have_the_same_keys_as_the_release() -> None:
    real = json.loads(REAL.read_text())
    assert set(TINY_PARAMS) == set(real)
    assert set(TINY_PARAMS["vision_encoder"]) == set(real["vision_encoder"])
    assert TINY_PARAMS["vocab_size"] == 131072
    assert TINY_PARAMS["vision_encoder"]["image_token_id"] == 10


def test_tiny_tensors_have_the_real_names_and_match_the_spec(tiny_src: Path) -> None:
    from safetensors import safe_open

    args = ModelArgs.from_file(tiny_src / "params.json")
    spec = tensor_spec(args)
    real_names = set(tensor_spec(ModelArgs.from_file(REAL)))
    with safe_open(str(tiny_src / "consolidated.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert keys == set(spec)
        for k in keys:
            t = f.get_slice(k)
            assert tuple(t.get_shape()) == spec[k], k
            assert t.get_dtype() == "BF16", k
    # same naming scheme as the 12B release: every tiny name exists there, modulo layer indices
    assert {k for k in keys if not k.startswith(("layers.", "vision_encoder.transformer.layers."))} <= real_names


def test_tiny_is_deterministic_for_a_seed_and_differs_across_seeds(tmp_path: Path, tiny_src: Path) -> None:
    a = write_tiny(tmp_path / "a", seed=0)
    b = write_tiny(tmp_path / "b", seed=1)
    ref = load_manifest(tiny_src / "manifest.toml")
    assert a.files["consolidated.safetensors"][1] == ref.file("consolidated.safetensors").sha256  # type: ignore[union-attr]
    assert a.files["consolidated.safetensors"][1] != b.files["consolidated.safetensors"][1]
    assert a.files["tekken.json"] == b.files["tekken.json"]


def test_tiny_manifest_lists_every_file_with_size_and_sha256(tiny_src: Path) -> None:
    m = load_manifest(tiny_src / "manifest.toml")
    assert m.complete and m.architecture == "pixtral"
    for f in m.files:
        data = (tiny_src / f.path).read_bytes()
        assert len(data) == f.size
        assert hashlib.sha256(data).hexdigest() == f.sha256


def test_tiny_tekken_uses_the_release_multimodal_key(tiny_src: Path) -> None:
    d = json.loads((tiny_src / "tekken.json").read_text())
    assert "multimodal" in d and "image" not in d
    assert d["multimodal"] == {"image_patch_size": 16, "max_image_size": 1024}


@pytest.mark.parametrize("key", ["multimodal", "image"])
def test_tokenizer_loads_with_either_image_section_key(tiny_src: Path, tmp_path: Path, key: str) -> None:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    d = json.loads((tiny_src / "tekken.json").read_text())
    d[key] = d.pop("multimodal")
    p = tmp_path / "tekken.json"
    p.write_text(json.dumps(d))
    tok = MistralTokenizer.from_file(str(p))
    inner = tok.instruct_tokenizer.tokenizer
    assert inner.get_special_token("[IMG]") == 10
    assert inner.get_special_token("[IMG_BREAK]") == 12
    assert inner.get_special_token("[IMG_END]") == 13
    assert tok.instruct_tokenizer.image_encoder is not None


def test_tiny_command_writes_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t"
    assert run_cli(["tiny", str(out), "--seed", "3", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["manifest_sha256"] and {f["path"] for f in doc["files"]} == {
        "consolidated.safetensors", "params.json", "tekken.json"}
    assert (out / "manifest.toml").is_file()
