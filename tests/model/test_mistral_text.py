"""Text-only Mistral models: Mistral 7B v0.1 (sliding window, rope_theta 10000) and NeMo 12B.

Tiny checkpoints of both (``tests.support.mistral_fixtures``) run through provision's model, the key map,
the tokenizers mistral-common bundles, the loader's two layouts and the smoke test. The parity
tests compare with transformers' ``MistralForCausalLM`` on the CPU in float32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from provision.errors import ConvertError, StructureError
from provision.formats.params import ModelArgs, parameter_count, tensor_spec
from provision.model import hf_names as keymap
from provision.model.inputs import encode_chat, find_tokenizer, load_tokenizer
from provision.model.loader import load_model
from provision.model.mistral import attention_mask, explicit_params
from provision.model.pixtral import greedy_generate
from provision.stages.smoke import smoke
from tests.support.hf_reference import (
    hf_text_greedy,
    hf_text_logits,
    hf_text_model,
    require_transformers,
    write_hf_text_copy,
)

DATA = Path(__file__).resolve().parents[1] / "data"
PROMPT = "Tell me about the history of the city of Paris in a few words."


def _load(path: Path) -> Any:
    model, _ = load_model(path, device="cpu", dtype=torch.float32)
    return model


def _tokens(path: Path, prompt: str = PROMPT) -> list[int]:
    return encode_chat(load_tokenizer(path, require_image=False), prompt).tokens


# ---------------------------------------------------------------------------------------
# the real releases' params.json through the tensor spec


def test_mistral_7b_v01_params_give_7_241_732_096_parameters_rope_10000_and_window_4096() -> None:
    args = ModelArgs.from_file(DATA / "mistral-7b-v0.1-params.json")
    assert args.rope_theta is None and args.rope_theta_value == 10000.0
    assert args.sliding_window == 4096 and args.vision_encoder is None
    assert parameter_count(args) == 7_241_732_096
    spec = tensor_spec(args)
    assert len(spec) == 2 + 32 * 9 + 1 and spec["layers.31.attention.wk.weight"] == (1024, 4096)


def test_mistral_nemo_2407_params_give_12_247_782_400_parameters_and_rope_1e6() -> None:
    raw = (DATA / "mistral-nemo-2407-params.json").read_bytes()
    assert len(raw) == 204  # the release's params.json size
    args = ModelArgs.from_dict(json.loads(raw))
    assert args.rope_theta_value == 1e6 and args.sliding_window is None
    assert parameter_count(args) == 12_247_782_400
    assert tensor_spec(args)["tok_embeddings.weight"] == (131072, 5120)


def test_explicit_params_writes_rope_theta_10000_only_when_missing() -> None:
    raw = json.loads((DATA / "mistral-7b-v0.1-params.json").read_text())
    out, added = explicit_params(raw)
    assert added and out["rope_theta"] == 10000.0
    assert list(out)[:7] == ["dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "rope_theta"]
    same, added2 = explicit_params({**raw, "rope_theta": 1e6})
    assert not added2 and same["rope_theta"] == 1e6


# ---------------------------------------------------------------------------------------
# attention masks


def test_sliding_window_mask_lets_each_query_see_exactly_the_last_window_keys() -> None:
    mask, causal = attention_mask(0, 6, 3)
    assert not causal and mask is not None
    expected = torch.tensor([[j <= i and j > i - 3 for j in range(6)] for i in range(6)])
    assert torch.equal(mask, expected)
    # a decode step after the window: one query over 10 cached keys sees the last 3
    step, _ = attention_mask(9, 1, 3)
    assert step is not None and step.tolist() == [[False] * 7 + [True] * 3]


def test_no_window_or_a_short_sequence_uses_plain_causal_attention() -> None:
    assert attention_mask(0, 5, None) == (None, True)
    assert attention_mask(0, 5, 8) == (None, True)
    assert attention_mask(4, 1, None) == (None, False)
    chunk, causal = attention_mask(2, 2, None)
    assert not causal and chunk is not None and chunk.tolist() == [[True, True, True, False], [True] * 4]


def test_a_zero_sliding_window_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        attention_mask(0, 4, 0)


def test_the_7b_like_prompt_is_longer_than_its_sliding_window(tiny_7b: Path) -> None:
    args = ModelArgs.from_file(tiny_7b / "params.json")
    assert args.sliding_window == 8 and len(_tokens(tiny_7b)) > 2 * args.sliding_window


def test_kv_cache_decoding_past_the_window_equals_full_recomputation(tiny_7b: Path) -> None:
    model = _load(tiny_7b)
    toks = _tokens(tiny_7b)
    cached = greedy_generate(model, toks, max_tokens=12, eos_id=None, use_cache=True).tokens
    full = greedy_generate(model, toks, max_tokens=12, eos_id=None, use_cache=False).tokens
    assert cached == full


def test_chunked_prefill_after_cached_tokens_equals_one_prefill_with_a_window(tiny_7b: Path) -> None:
    model = _load(tiny_7b)
    toks = torch.tensor([_tokens(tiny_7b)])
    with torch.no_grad():
        whole = model(toks)
        cache = model.new_cache(1, toks.shape[1])
        first = model(toks[:, :11], cache=cache, start_pos=0)
        rest = model(toks[:, 11:], cache=cache, start_pos=11)
    assert torch.allclose(torch.cat((first, rest), 1), whole, atol=1e-5)


# ---------------------------------------------------------------------------------------
# tokenizers through mistral-common


def test_the_7b_like_checkpoint_uses_the_sentencepiece_v1_tokenizer(tiny_7b: Path) -> None:
    assert find_tokenizer(tiny_7b).name == "tokenizer.model"
    tok = load_tokenizer(tiny_7b, require_image=False)
    inner = tok.instruct_tokenizer.tokenizer
    assert inner.n_words == 32000 and inner.bos_id == 1 and inner.eos_id == 2
    enc = encode_chat(tok, "Hello world")
    assert enc.tokens == [1, 733, 16289, 28793, 22557, 1526, 733, 28748, 16289, 28793]  # <s> [INST] ... [/INST]
    assert tok.decode(enc.tokens[4:6]) == "Hello world"


def test_the_nemo_like_checkpoint_uses_the_tekken_tokenizer(tiny_nemo: Path) -> None:
    assert find_tokenizer(tiny_nemo).name == "tekken.json"
    tok = load_tokenizer(tiny_nemo, require_image=False)
    assert tok.instruct_tokenizer.tokenizer.n_words == 131072
    enc = encode_chat(tok, "Hello world")
    assert enc.tokens == [1, 3, 22177, 4304, 4]  # <s> [INST] Hello world [/INST]
    assert tok.decode(enc.tokens[2:4]) == "Hello world"


def test_a_versioned_sentencepiece_model_is_preferred_and_the_highest_version_wins(tmp_path: Path) -> None:
    for name in ("tokenizer.model", "tokenizer.model.v1", "tokenizer.model.v3", "tokenizer.model.v7m1"):
        (tmp_path / name).write_bytes(b"x")
    assert find_tokenizer(tmp_path).name == "tokenizer.model.v7m1"
    (tmp_path / "tekken.json").write_bytes(b"{}")
    assert find_tokenizer(tmp_path).name == "tekken.json"


def test_a_sentencepiece_tokenizer_that_is_not_one_is_a_structure_error(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(StructureError, match="mistral-common"):
        load_tokenizer(tmp_path, require_image=False)


def test_a_text_tokenizer_asked_for_images_is_a_structure_error(tiny_7b: Path) -> None:
    with pytest.raises(StructureError, match="no image section"):
        load_tokenizer(tiny_7b, require_image=True)


# ---------------------------------------------------------------------------------------
# key map and loader (transformers' MistralForCausalLM layout)


def test_text_key_map_round_trips_every_tensor(tiny_7b: Path) -> None:
    from safetensors.torch import load_file

    args = ModelArgs.from_file(tiny_7b / "params.json")
    sd = load_file(str(tiny_7b / "consolidated.safetensors"))
    for name, t in sd.items():
        hf_name, hf_t = keymap.mistral_to_hf_text(name, t, args)
        assert hf_name.startswith(("model.", "lm_head."))
        back, back_t = keymap.hf_to_mistral(hf_name, hf_t, args)
        assert back == name and torch.equal(back_t, t)
    assert keymap.mistral_name_to_hf_text("layers.3.feed_forward.w2.weight") == "model.layers.3.mlp.down_proj.weight"
    assert keymap.mistral_name_to_hf_text("output.weight") == "lm_head.weight"


def test_vision_tensors_have_no_text_only_name() -> None:
    with pytest.raises(ConvertError, match="not a text-decoder tensor"):
        keymap.mistral_name_to_hf_text("vision_encoder.ln_pre.weight")


def test_hf_text_config_round_trips_including_rope_10000_and_the_window(tiny_7b: Path) -> None:
    args = ModelArgs.from_file(tiny_7b / "params.json")
    cfg = keymap.hf_text_config(args)
    assert cfg["architectures"] == ["MistralForCausalLM"] and cfg["rope_theta"] == 10000.0
    back = keymap.args_from_hf_config(cfg)
    assert tensor_spec(back) == tensor_spec(args)
    assert back.rope_theta_value == 10000.0 and back.sliding_window == 8 and back.vision_encoder is None


def test_a_text_config_of_another_model_type_is_a_params_error() -> None:
    from provision.errors import ParamsError

    with pytest.raises(ParamsError, match="llama"):
        keymap.args_from_hf_config({"model_type": "llama", "hidden_size": 64})


def test_hf_text_config_refuses_a_pixtral_checkpoint(tiny_src: Path) -> None:
    with pytest.raises(ConvertError, match="vision_encoder"):
        keymap.hf_text_config(ModelArgs.from_file(tiny_src / "params.json"))


def test_the_loader_reads_the_transformers_layout_of_a_text_model(tiny_7b: Path, tmp_path: Path) -> None:
    hf = write_hf_text_copy(tiny_7b, tmp_path / "hf")
    toks = torch.tensor([_tokens(tiny_7b)])
    with torch.no_grad():
        a = _load(tiny_7b)(toks)
        b = _load(hf)(toks)
    assert torch.allclose(a, b, atol=1e-5)


def test_a_text_checkpoint_with_a_missing_tensor_is_a_structure_error(tiny_7b: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    d = tmp_path / "broken"
    shutil.copytree(tiny_7b, d)
    sd = load_file(str(d / "consolidated.safetensors"))
    sd.pop("layers.1.ffn_norm.weight")
    save_file(sd, str(d / "consolidated.safetensors"))
    with pytest.raises(StructureError, match="do not match"):
        load_model(d)


# ---------------------------------------------------------------------------------------
# smoke test (text prompt, no image)


@pytest.mark.parametrize("kind", ["7b", "nemo"])
def test_the_smoke_test_passes_on_a_tiny_text_only_checkpoint(kind: str, tiny_7b: Path, tiny_nemo: Path) -> None:
    path = tiny_7b if kind == "7b" else tiny_nemo
    rep = smoke(path, device="cpu", max_tokens=6)
    assert rep.passed and rep.images == [] and rep.tokens_generated == 6
    assert {c.name for c in rep.checks} == {"logits_finite", "decodes"}
    assert rep.prompt == "What is the capital of France? Answer in one word."


def test_an_image_for_a_text_only_model_is_a_usage_error(tiny_nemo: Path) -> None:
    from provision.errors import UsageError

    with pytest.raises(UsageError, match="text-only"):
        smoke(tiny_nemo, device="cpu", images=["x.png"])


def test_the_smoke_command_runs_a_text_only_checkpoint_with_json(tiny_7b: Path, capsys: Any) -> None:
    from provision.cli.main import run_cli

    assert run_cli(["smoke", str(tiny_7b), "--device", "cpu", "--max-tokens", "3", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True


# ---------------------------------------------------------------------------------------
# parity with transformers' MistralForCausalLM


@pytest.mark.parity
def test_key_map_produces_exactly_the_names_transformers_expects(tiny_7b: Path, tiny_nemo: Path) -> None:
    transformers = require_transformers()
    for path in (tiny_7b, tiny_nemo):
        args = ModelArgs.from_file(path / "params.json")
        cfg = transformers.MistralConfig(**keymap.hf_text_config(args, dtype="float32"))
        with torch.device("meta"):
            ref = transformers.MistralForCausalLM(cfg)
        expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        ours = {keymap.mistral_name_to_hf_text(k): s for k, s in tensor_spec(args).items()}
        assert ours == expected


@pytest.mark.parity
def test_7b_like_logits_match_transformers_past_the_sliding_window(tiny_7b: Path, tmp_path: Path) -> None:
    require_transformers()
    ref = hf_text_model(write_hf_text_copy(tiny_7b, tmp_path / "hf"))
    toks = _tokens(tiny_7b)
    with torch.no_grad():
        ours = _load(tiny_7b)(torch.tensor([toks]))
    theirs = hf_text_logits(ref, toks)
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-4, f"max abs logit difference {diff}"
    # the window matters here: transformers without it disagrees past position 8
    full = hf_text_model(write_hf_text_copy(tiny_7b, tmp_path / "hf-nowindow", sliding_window=None))
    assert (hf_text_logits(full, toks)[0, 8:] - ours[0, 8:]).abs().max().item() > 1e-2


@pytest.mark.parity
def test_7b_like_greedy_tokens_with_kv_cache_match_transformers(tiny_7b: Path, tmp_path: Path) -> None:
    require_transformers()
    ref = hf_text_model(write_hf_text_copy(tiny_7b, tmp_path / "hf"))
    toks = _tokens(tiny_7b)
    ours = greedy_generate(_load(tiny_7b), toks, max_tokens=10, eos_id=2).tokens
    assert ours == hf_text_greedy(ref, toks, 10)


@pytest.mark.parity
def test_7b_without_rope_theta_uses_10000_as_transformers_does_not_1e6(tiny_7b: Path, tmp_path: Path) -> None:
    require_transformers()
    assert "rope_theta" not in json.loads((tiny_7b / "params.json").read_text())
    toks = _tokens(tiny_7b)
    with torch.no_grad():
        ours = _load(tiny_7b)(torch.tensor([toks]))
    right = hf_text_logits(hf_text_model(write_hf_text_copy(tiny_7b, tmp_path / "e4", rope_theta=1e4)), toks)
    wrong = hf_text_logits(hf_text_model(write_hf_text_copy(tiny_7b, tmp_path / "e6", rope_theta=1e6)), toks)
    assert (ours - right).abs().max().item() < 1e-4
    assert (ours - wrong).abs().max().item() > 1e-2


@pytest.mark.parity
def test_nemo_like_logits_and_greedy_tokens_match_transformers(tiny_nemo: Path, tmp_path: Path) -> None:
    require_transformers()
    ref = hf_text_model(write_hf_text_copy(tiny_nemo, tmp_path / "hf"))
    assert ref.config.sliding_window is None
    toks = _tokens(tiny_nemo)
    model = _load(tiny_nemo)
    with torch.no_grad():
        ours = model(torch.tensor([toks]))
    diff = (ours - hf_text_logits(ref, toks)).abs().max().item()
    assert diff < 1e-4, f"max abs logit difference {diff}"
    assert greedy_generate(model, toks, max_tokens=8, eos_id=2).tokens == hf_text_greedy(ref, toks, 8)


# ---------------------------------------------------------------------------------------
# the whole pipeline and the tiny command


@pytest.mark.parametrize("kind", ["7b", "nemo"])
def test_run_adopts_verifies_converts_and_smoke_tests_a_text_only_model(
        kind: str, tiny_7b: Path, tiny_nemo: Path, tmp_path: Path, capsys: Any) -> None:
    from provision.cli.main import run_cli

    src = tiny_7b if kind == "7b" else tiny_nemo
    rc = run_cli(["run", str(src / "manifest.toml"), "--home", str(tmp_path / "home"), "--adopt", str(src),
                  "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    doc = json.loads(out.out)
    assert [(s["stage"], s["result"]) for s in doc["stages"]] == [
        ("plan", "ok"), ("fetch", "ok"), ("verify", "ok"), ("convert", "ok"), ("smoke", "ok")]
    smoke_details = doc["stages"][4]["details"]
    assert smoke_details["passed"] is True and smoke_details["images"] == []


def test_the_tiny_command_writes_text_only_kinds_and_refuses_a_pickled_pixtral(tmp_path: Path, capsys: Any) -> None:
    from provision.cli.main import run_cli

    assert run_cli(["tiny", str(tmp_path / "n"), "--kind", "mistral-nemo", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "mistral-nemo" and {f["path"] for f in doc["files"]} == {
        "consolidated.safetensors", "params.json", "tekken.json"}
    assert ModelArgs.from_file(tmp_path / "n" / "params.json").rope_theta_value == 1e6
    assert run_cli(["tiny", str(tmp_path / "p"), "--kind", "mistral-7b", "--pickle"]) == 0
    assert (tmp_path / "p" / "consolidated.00.pth").is_file() and not (tmp_path / "p" / "consolidated.safetensors").exists()
    assert run_cli(["tiny", str(tmp_path / "x"), "--pickle"]) == 2
