"""The sparse MoE feed-forward (Mixtral): routing, the experts a token runs, tensor names, parity.

Parity is against transformers' ``MixtralForCausalLM`` on the CPU in float32, loading the tiny
checkpoint converted to the on-disk names of ``mistralai/Mixtral-8x7B-v0.1`` (``block_sparse_moe``).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from provision.errors import ParamsError, StructureError
from provision.formats.params import ModelArgs, parameter_count, tensor_spec
from provision.model.loader import load_model
from provision.model.moe import MoeFeedForward, hf_mixtral_name_to_mistral, mistral_name_to_hf_mixtral, route
from provision.model.pixtral import greedy_generate
from tests.support.hf_reference import hf_mixtral_model, require_transformers, write_hf_mixtral_copy
from tests.support.params import MIXTRAL_8X7B, MIXTRAL_8X22B


def _moe(seed: int = 0, dim: int = 16, hidden: int = 24, experts: int = 4, k: int = 2) -> MoeFeedForward:
    torch.manual_seed(seed)
    m = MoeFeedForward(dim, hidden, experts, k)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m.eval()


def _reference_moe(m: MoeFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Token by token, as mistral-inference's MoeLayer describes it (reference §4)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        logits = m.gate(flat[t])
        top, idx = torch.topk(logits, m.k)
        w = torch.softmax(top.float(), dim=-1).to(x.dtype)
        for j in range(m.k):
            out[t] += w[j] * m.experts[int(idx[j])](flat[t : t + 1])[0]
    return out.view(x.shape)


def test_routing_takes_the_top_k_logits_and_a_float32_softmax_over_those_k_only() -> None:
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0], [4.0, 0.0, 1.0, 1.5]], dtype=torch.bfloat16)
    w, chosen = route(logits, 2)
    assert chosen.tolist() == [[1, 3], [0, 3]]
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.sum(-1), torch.ones(2))
    e = math.exp(1.0)
    assert w[0].tolist() == pytest.approx([e / (e + 1), 1 / (e + 1)], rel=1e-6)
    # not the softmax over all experts (which would not sum to 1 over the chosen two)
    assert torch.softmax(logits.float(), -1).gather(1, chosen).sum(-1).max() < 0.99


def test_the_moe_layer_equals_the_per_token_reference() -> None:
    m = _moe()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(m(x), _reference_moe(m, x), atol=1e-5, rtol=1e-5)


def test_an_expert_no_token_chose_never_runs() -> None:
    m = _moe()
    with torch.no_grad():
        m.gate.weight[3] = 0.0
        m.gate.weight[3, 0] = -1e4  # expert 3 loses every vote for inputs with x[0] > 0
        for p in m.experts[3].parameters():
            p.fill_(float("nan"))
        x = torch.randn(7, 16, generator=torch.Generator().manual_seed(2)).abs() + 0.1
        out = m(x)
    assert torch.isfinite(out).all()


def test_the_dense_meta_path_computes_the_same_function_as_the_sparse_path() -> None:
    m = _moe(experts=8, k=2)
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        w, chosen = route(m.gate(x), m.k)
        torch.testing.assert_close(m._dense(x, w, chosen), m(x), atol=1e-5, rtol=1e-5)
    meta = MoeFeedForward(16, 24, 8, 2).to("meta")
    assert meta(torch.empty(3, 4, 16, device="meta")).shape == (3, 4, 16)


def test_more_experts_per_token_than_experts_is_a_params_error() -> None:
    with pytest.raises(ParamsError) as e:
        MoeFeedForward(8, 8, 2, 3)
    assert e.value.exit_code == 3


def test_moe_tensor_names_are_the_mixtral_release_names_and_sizes_match_the_reference() -> None:
    a7 = ModelArgs.from_dict(MIXTRAL_8X7B)
    spec = tensor_spec(a7)
    assert spec["layers.0.feed_forward.gate.weight"] == (8, 4096)
    assert spec["layers.31.feed_forward.experts.7.w1.weight"] == (14336, 4096)
    assert spec["layers.31.feed_forward.experts.7.w2.weight"] == (4096, 14336)
    assert spec["layers.31.feed_forward.experts.7.w3.weight"] == (14336, 4096)
    assert not any(k.startswith("layers.0.feed_forward.w1") for k in spec)
    assert parameter_count(a7) == 46_702_792_704  # reference §2: 93.41 GB in bf16
    assert parameter_count(ModelArgs.from_dict(MIXTRAL_8X22B)) == 140_620_634_112  # 281.24 GB


def test_the_model_tree_equals_the_tensor_spec_for_a_moe_model() -> None:
    from provision.model.pixtral import build_model

    a = ModelArgs.from_dict(MIXTRAL_8X7B)
    model = build_model(a)  # meta: no memory
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == tensor_spec(a)


def test_transformers_names_round_trip_for_every_moe_tensor(tiny_mixtral: Path) -> None:
    args = ModelArgs.from_file(tiny_mixtral / "params.json")
    for name in tensor_spec(args):
        hf = mistral_name_to_hf_mixtral(name)
        assert hf_mixtral_name_to_mistral(hf) == name
    assert mistral_name_to_hf_mixtral("layers.2.feed_forward.experts.7.w2.weight") == \
        "model.layers.2.block_sparse_moe.experts.7.w2.weight"
    assert mistral_name_to_hf_mixtral("layers.0.feed_forward.gate.weight") == "model.layers.0.block_sparse_moe.gate.weight"


def test_the_tiny_mixtral_checkpoint_loads_strictly_and_decodes_with_and_without_cache(tiny_mixtral: Path) -> None:
    model, args = load_model(tiny_mixtral, device="cpu", dtype=torch.float32)
    assert args.moe is not None and args.moe.num_experts == 8
    toks = list(range(1, 40, 3))
    a = greedy_generate(model, toks, max_tokens=6, eos_id=None, use_cache=True)
    b = greedy_generate(model, toks, max_tokens=6, eos_id=None, use_cache=False)
    assert a.tokens == b.tokens and a.all_finite


def test_a_moe_checkpoint_missing_an_expert_is_a_structure_error(tiny_mixtral: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    dst = tmp_path / "broken"
    shutil.copytree(tiny_mixtral, dst)
    sd = load_file(str(dst / "consolidated.safetensors"))
    del sd["layers.1.feed_forward.experts.5.w3.weight"]
    save_file(sd, str(dst / "consolidated.safetensors"))
    with pytest.raises(StructureError) as e:
        load_model(dst, device="cpu")
    assert e.value.exit_code == 5 and "experts.5.w3" in e.value.message


def test_the_smoke_test_passes_on_the_tiny_mixtral_checkpoint(tiny_mixtral: Path) -> None:
    from provision.stages.smoke import smoke

    rep = smoke(tiny_mixtral, device="cpu", dtype="float32")
    assert rep.passed and rep.tokens_generated == 8 and not rep.images


# ---------------------------------------------------------------------------------------
# parity with transformers


@pytest.fixture(scope="module")
def mixtral_ref(tiny_mixtral: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    require_transformers()
    return hf_mixtral_model(write_hf_mixtral_copy(tiny_mixtral, tmp_path_factory.mktemp("hf") / "mixtral"))


def _tokens(path: Path) -> list[int]:
    from provision.model.inputs import encode_chat, load_tokenizer

    return encode_chat(load_tokenizer(path, require_image=False), "What is the capital of France? Answer in one word.").tokens


@pytest.mark.parity
def test_every_converted_tensor_is_one_transformers_expects(tiny_mixtral: Path, tmp_path: Path) -> None:
    require_transformers()
    from transformers import MixtralForCausalLM

    hf = write_hf_mixtral_copy(tiny_mixtral, tmp_path / "hf")
    loaded: Any = MixtralForCausalLM.from_pretrained(str(hf), dtype=torch.float32, output_loading_info=True)
    info = loaded[1]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert json.loads((hf / "config.json").read_text())["num_local_experts"] == 8


@pytest.mark.parity
def test_mixtral_like_logits_match_transformers(tiny_mixtral: Path, mixtral_ref: Any) -> None:
    model, _ = load_model(tiny_mixtral, device="cpu", dtype=torch.float32)
    toks = _tokens(tiny_mixtral)
    with torch.no_grad():
        ours = model(torch.tensor([toks]))
        theirs = mixtral_ref(input_ids=torch.tensor([toks])).logits.float()
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-4, f"max abs logit difference {diff}"


@pytest.mark.parity
def test_mixtral_like_greedy_tokens_with_kv_cache_match_transformers(tiny_mixtral: Path, mixtral_ref: Any) -> None:
    model, _ = load_model(tiny_mixtral, device="cpu", dtype=torch.float32)
    toks = _tokens(tiny_mixtral)
    ours = greedy_generate(model, toks, max_tokens=8, eos_id=2).tokens
    seq, theirs = list(toks), []
    with torch.no_grad():
        for _ in range(8):
            nxt = int(mixtral_ref(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            theirs.append(nxt)
            if nxt == 2:
                break
            seq.append(nxt)
    assert ours == theirs


def test_a_moe_params_json_without_rope_theta_means_1e6_and_import_writes_it() -> None:
    from provision.model.mistral import explicit_params

    assert ModelArgs.from_dict(MIXTRAL_8X7B).rope_theta_value == 1e6  # the 8x7B torrent's params.json
    dense = {k: v for k, v in MIXTRAL_8X7B.items() if k != "moe"}
    assert ModelArgs.from_dict({**dense, "sliding_window": 4096}).rope_theta_value == 10000.0  # 7B v0.1
    out, added = explicit_params(MIXTRAL_8X7B)
    assert added and out["rope_theta"] == 1e6 and list(out).index("rope_theta") == list(out).index("n_kv_heads") + 1


def test_the_loader_reads_the_transformers_layout_of_a_moe_model(tiny_mixtral: Path, tmp_path: Path) -> None:
    hf = write_hf_mixtral_copy(tiny_mixtral, tmp_path / "hf")
    ours, a = load_model(tiny_mixtral, device="cpu", dtype=torch.float32)
    theirs, b = load_model(hf, device="cpu", dtype=torch.float32)
    assert b.moe == a.moe and b.rope_theta_value == a.rope_theta_value
    toks = torch.tensor([list(range(3, 40, 3))])
    with torch.no_grad():
        torch.testing.assert_close(theirs(toks), ours(toks), atol=0, rtol=0)
