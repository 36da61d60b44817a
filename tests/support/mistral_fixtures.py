"""Fixtures for the text-only Mistral (7B, NeMo) and pickle-import tests.

* ``tiny_7b`` / ``tiny_nemo``: tiny text-only checkpoints (session-scoped, read-only): the
  7B-like one has no rope_theta, a sliding window of 8 and the SentencePiece v1 tokenizer; the
  NeMo-like one rope_theta 1e6 and tekken;
* ``tiny_7b_pickle``: the 7B-like checkpoint with its weights as ``consolidated.00.pth`` (as the
  torrent ships them), read-only;
* ``write_hf_text_copy(src, dst)``: a checkpoint rewritten in the ``MistralForCausalLM`` layout
  through ``provision.model.hf_names`` (config.json + model.safetensors + the tokenizer);
* ``hf_text_model`` / ``hf_text_logits`` / ``hf_text_greedy``: transformers' ``MistralForCausalLM``
  as the independent reference (test-only dependency).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

PICKLE_NAME = "consolidated.00.pth"


def _write(tmp_path_factory: pytest.TempPathFactory, kind: str, weights: str = "safetensors") -> Path:
    from provision.testing.tiny_text import write_tiny_mistral

    out = tmp_path_factory.mktemp(f"tiny-{kind}-{weights}") / f"tiny-mistral-{kind}"
    write_tiny_mistral(out, kind, seed=0, weights=weights)
    return out


@pytest.fixture(scope="session")
def tiny_7b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory, "7b")


@pytest.fixture(scope="session")
def tiny_nemo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory, "nemo")


@pytest.fixture(scope="session")
def tiny_7b_pickle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory, "7b", "pickle")


def write_hf_text_copy(src: Path, dst: Path, *, rope_theta: float | None = None,
                       sliding_window: int | str | None = "same") -> Path:
    """``src`` (Mistral layout) rewritten for ``MistralForCausalLM`` in ``dst``; ``rope_theta`` /
    ``sliding_window`` override the config (to show what a wrong value changes)."""
    import torch
    from safetensors.torch import load_file, save_file

    from provision.formats.params import ModelArgs
    from provision.model.hf_names import hf_text_config, mistral_to_hf_text

    args = ModelArgs.from_file(src / "params.json")
    sd = load_file(str(src / "consolidated.safetensors"))
    out = dict(mistral_to_hf_text(k, v.to(torch.float32), args) for k, v in sd.items())
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = hf_text_config(args, dtype="float32")
    if rope_theta is not None:
        cfg["rope_theta"] = rope_theta
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
    if sliding_window != "same":
        cfg["sliding_window"] = sliding_window
    (dst / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    for tok in ("tokenizer.model", "tekken.json"):
        if (src / tok).is_file():
            shutil.copy(src / tok, dst / tok)
    return dst


def hf_text_model(hf_dir: Path) -> Any:
    import torch
    from transformers import MistralForCausalLM

    return MistralForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="sdpa").eval()


def hf_text_logits(model: Any, tokens: Sequence[int]) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([list(tokens)])).logits.float()


def hf_text_greedy(model: Any, tokens: Sequence[int], max_tokens: int, eos_id: int = 2) -> list[int]:
    """Greedy decoding with transformers' own KV cache (``past_key_values``), one token per step."""
    import torch

    out: list[int] = []
    with torch.no_grad():
        res = model(input_ids=torch.tensor([list(tokens)]), use_cache=True)
        past = res.past_key_values
        for _ in range(max_tokens):
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            if nxt == eos_id or len(out) == max_tokens:
                break
            res = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = res.past_key_values
    return out
