"""transformers as the independent reference: checkpoints rewritten in its layouts, and its outputs.

Writers rewrite a Mistral-layout checkpoint (``params.json`` + ``consolidated.safetensors``) into a
transformers layout through ``provision.model.hf_names`` / ``provision.model.moe`` (config.json +
model.safetensors): ``write_hf_copy`` (Llava, the tiny Pixtral, with tekken.json),
``write_hf_llava_copy`` (Pixtral-Large-like, weights and config only), ``write_hf_mixtral_copy``
(``MixtralForCausalLM``) and ``write_hf_text_copy`` (``MistralForCausalLM``, with the tokenizer).
Runners load those with transformers (a test-only dependency; ``require_transformers`` skips or
fails without it) and compute logits or greedy ids. ``GOLDEN`` holds the ids transformers generates
for the tiny checkpoint (seed 0), written by ``tests/golden/make_golden.py``.
``require_compressed_tensors`` does the same for compressed-tensors, the reference reader of the
quantized checkpoints convert writes. No pytest fixtures here.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from provision.testing.ci import require_module

if TYPE_CHECKING:
    from provision.formats.params import ModelArgs

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "tiny_seed0.json"


def load_golden() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(GOLDEN.read_text(encoding="utf-8"))
    return data


def require_transformers() -> ModuleType:
    """transformers (a test-only dependency): missing fails in CI, skips elsewhere."""
    return require_module("transformers", why="the parity tests need it")


def require_compressed_tensors() -> ModuleType:
    """compressed-tensors (a test-only dependency): missing fails in CI, skips elsewhere."""
    return require_module("compressed_tensors", why="the parity tests need it")


def _write_hf(src: Path, dst: Path, rename: Callable[..., tuple[str, Any]], config: Callable[..., dict[str, Any]],
              *, dtype: str = "float32") -> dict[str, Any]:
    """``src``'s weights renamed by ``rename(name, tensor, args)`` into ``dst/model.safetensors`` (in
    ``dtype``); returns ``config(args, dtype=dtype)`` for the caller to adjust and write."""
    import torch
    from safetensors.torch import load_file, save_file

    from provision.formats.params import ModelArgs

    args: ModelArgs = ModelArgs.from_file(src / "params.json")
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    sd = load_file(str(src / "consolidated.safetensors"))
    out = dict(rename(k, v.to(tdt), args) for k, v in sd.items())
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return config(args, dtype=dtype)


def _write_config(dst: Path, cfg: dict[str, Any]) -> None:
    (dst / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")


def write_hf_copy(src: Path, dst: Path, *, dtype: str = "float32") -> Path:
    """The tiny Pixtral in ``src`` rewritten in the Llava layout in ``dst`` (with its tekken.json)."""
    from provision.model.hf_names import hf_config, mistral_to_hf

    _write_config(dst, _write_hf(src, dst, mistral_to_hf, hf_config, dtype=dtype))
    shutil.copy(src / "tekken.json", dst / "tekken.json")
    return dst


def write_hf_llava_copy(src: Path, dst: Path) -> Path:
    """A Pixtral-Large-like checkpoint rewritten for ``LlavaForConditionalGeneration`` (no tokenizer)."""
    from provision.model.hf_names import hf_config, mistral_to_hf

    _write_config(dst, _write_hf(src, dst, mistral_to_hf, hf_config))
    return dst


def write_hf_mixtral_copy(src: Path, dst: Path) -> Path:
    """A Mixtral-like checkpoint rewritten for ``MixtralForCausalLM`` (the on-disk names of
    ``mistralai/Mixtral-8x7B-v0.1``: ``block_sparse_moe``)."""
    from provision.model.moe import hf_mixtral_config, mistral_to_hf_mixtral

    _write_config(dst, _write_hf(src, dst, mistral_to_hf_mixtral, hf_mixtral_config))
    return dst


def write_hf_text_copy(src: Path, dst: Path, *, rope_theta: float | None = None,
                       sliding_window: int | str | None = "same") -> Path:
    """``src`` (Mistral layout) rewritten for ``MistralForCausalLM`` in ``dst``; ``rope_theta`` /
    ``sliding_window`` override the config (to show what a wrong value changes)."""
    from provision.model.hf_names import hf_text_config, mistral_to_hf_text

    cfg = _write_hf(src, dst, mistral_to_hf_text, hf_text_config)
    if rope_theta is not None:
        cfg["rope_theta"] = rope_theta
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
    if sliding_window != "same":
        cfg["sliding_window"] = sliding_window
    _write_config(dst, cfg)
    for tok in ("tokenizer.model", "tekken.json"):
        if (src / tok).is_file():
            shutil.copy(src / tok, dst / tok)
    return dst


def hf_model(hf_dir: Path) -> Any:
    import torch
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


def hf_mixtral_model(hf_dir: Path) -> Any:
    import torch
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


def hf_text_model(hf_dir: Path) -> Any:
    import torch
    from transformers import MistralForCausalLM

    return MistralForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="sdpa").eval()


def hf_inputs(images: Sequence[Any]) -> dict[str, Any]:
    """pixel_values padded to the largest image (transformers' batching) and image_sizes."""
    import torch

    hmax = max(int(im.shape[1]) for im in images)
    wmax = max(int(im.shape[2]) for im in images)
    pv = torch.zeros(len(images), 3, hmax, wmax)
    for i, im in enumerate(images):
        pv[i, :, : im.shape[1], : im.shape[2]] = im
    sizes = torch.tensor([[int(im.shape[1]), int(im.shape[2])] for im in images])
    return {"pixel_values": pv, "image_sizes": sizes}


def hf_logits(model: Any, tokens: Sequence[int], images: Sequence[Any]) -> Any:
    import torch

    with torch.no_grad():
        ids = torch.tensor([list(tokens)])
        return model(input_ids=ids, **hf_inputs(images)).logits.float()


def hf_greedy(model: Any, tokens: Sequence[int], images: Sequence[Any], max_tokens: int, eos_id: int = 2) -> list[int]:
    """Greedy decoding by full recomputation with transformers (no cache: the simplest reference)."""
    seq = list(tokens)
    out: list[int] = []
    for _ in range(max_tokens):
        nxt = int(hf_logits(model, seq, images)[0, -1].argmax())
        out.append(nxt)
        if nxt == eos_id:
            break
        seq.append(nxt)
    return out


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
