"""The side files of the ``hf`` layout: what transformers, vLLM and compressed-tensors read next to the shards.

``write_hf_side_files`` writes ``config.json`` (``LlavaForConditionalGeneration`` for Pixtral,
``MistralForCausalLM`` / ``MixtralForCausalLM`` for text-only models, built by
``provision.model.hf_names``, with a compressed-tensors ``quantization_config`` for quantized
schemes), the Pixtral processor files (text-only models: ``generation_config.json``), the
tokenizer (``tekken.json`` or Mistral 7B's ``tokenizer.model*``) and, from ``tekken.json``
through transformers when installed, ``tokenizer.json`` and its companions. ``quantization_config`` is the compressed-tensors block on
its own. Tensor names and the q/k permutation live in ``hf_names``; the shards are written elsewhere.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.formats.params import ModelArgs
from provision.io.atomic import TMP_PREFIX, atomic_write_text
from provision.model import hf_layout
from provision.stages.convert.items import Item, output_dtype
from provision.stages.convert.output import OUR_FILES, copy_side_file
from provision.stages.profiles import QUANTIZED, Profile

TOKENIZER_TIMEOUT_S = 600.0  # the tokenizer build (about 9 s of one core for Pixtral's tekken.json), bounded
TOKENIZER_CHILD_MIN_BYTES = 1 << 30  # from this much source on, the tokenizer is built in a child process


def quantization_config(scheme: str, *, ratio: float | None = None, ignore: list[str] | None = None) -> dict[str, Any]:
    """compressed-tensors' ``quantization_config`` for a scheme (the FP8-dynamic / W4A16 recipes).

    ``ignore`` adds the (transformers) module names of decoder Linears left in 16-bit because
    their shapes do not suit the scheme; the vision tower, projector and lm_head are always ignored.
    """
    from provision.quant import SCHEMES

    spec = SCHEMES[scheme]
    weights: dict[str, Any] = {"num_bits": spec.num_bits, "type": spec.kind, "symmetric": True, "group_size": spec.group_size,
               "strategy": spec.strategy, "dynamic": False, "actorder": None, "block_structure": None,
               "observer": "minmax", "observer_kwargs": {}}
    acts = None
    if spec.dynamic_activations:
        acts = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "token",
                "dynamic": True, "actorder": None, "block_structure": None, "observer": None,
                "observer_kwargs": {}}
    fmt = "float-quantized" if spec.kind == "float" else "pack-quantized"
    cfg: dict[str, Any] = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                      "output_activations": None, "format": fmt}},
        "ignore": ["re:.*lm_head", "re:.*multi_modal_projector.*", "re:.*vision_tower.*", *(ignore or [])],
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }
    if ratio is not None:
        cfg["global_compression_ratio"] = ratio
    return cfg


def _left_in_16_bit(items: list[Item]) -> list[str]:
    """Decoder Linears the scheme could not take, as regexes that match both the on-disk names
    (``language_model.model.layers...``) and transformers' in-memory ones (``model.language_model.layers...``);
    for text-only models (``model.layers...``) the module path after ``model.``."""
    def rx(out: str) -> str:
        mod = out[: -len(".weight")]
        if "language_model.model." in mod:
            return "re:.*language_model.*" + re.escape(mod.split("language_model.model.", 1)[-1]) + "$"
        return "re:.*" + re.escape(mod.removeprefix("model.")) + "$"
    return [rx(i.out_name) for i in items
            if i.action != "quantize" and i.src.name.startswith("layers.") and len(i.src.shape) == 2]


def _processor_files(args: ModelArgs) -> dict[str, dict[str, Any]]:
    v = args.vision_encoder
    assert v is not None
    pre = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
           "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
           "image_processor_type": "PixtralImageProcessor",
           "patch_size": {"height": v.patch_size, "width": v.patch_size}, "resample": 3,
           "rescale_factor": 0.00392156862745098, "size": {"longest_edge": v.image_size}}
    proc = {"image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]", "image_token": "[IMG]",
            "patch_size": v.patch_size, "processor_class": "PixtralProcessor"}
    gen = {"bos_token_id": 1, "eos_token_id": 2}
    return {"preprocessor_config.json": pre, "processor_config.json": proc, "generation_config.json": gen}


def _text_files() -> dict[str, dict[str, Any]]:
    """``generation_config.json`` of a text-only model (Mistral's bos/eos ids)."""
    return {"generation_config.json": {"bos_token_id": 1, "eos_token_id": 2}}


def _build_in_child(tekken: Path, tmp: Path) -> bool:
    """Run ``hf_tokenizer`` in a child process (bounded by ``TOKENIZER_TIMEOUT_S``); whether it wrote."""
    import subprocess
    import sys

    pkg_root = str(Path(__file__).resolve().parents[3])  # the folder holding ``provision``
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [pkg_root, os.environ.get("PYTHONPATH")])))
    try:
        r = subprocess.run([sys.executable, "-m", "provision.stages.convert.hf_tokenizer", str(tekken), str(tmp)],
                           capture_output=True, text=True, timeout=TOKENIZER_TIMEOUT_S, env=env, check=False)
    except subprocess.TimeoutExpired:  # run() killed it
        return False
    return r.returncode == 0


def _write_hf_tokenizer(tekken: Path, out_dir: Path, *, in_child: bool = False) -> list[str]:
    """tokenizer.json & co. from tekken.json through transformers (when installed); the names
    written. ``in_child``: built in a child process (``hf_tokenizer``: seconds of pure Python kept
    off the conversion's interpreter, worth its start-up when the conversion is big), else here.
    Nothing (the caller notes that vLLM reads tekken.json instead) when transformers is missing
    or cannot convert it, or a child's build outlives ``TOKENIZER_TIMEOUT_S``."""
    from provision.stages.convert.hf_tokenizer import build

    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "tok-", dir=out_dir))
    try:
        if not (_build_in_child(tekken, tmp) if in_child else build(str(tekken), str(tmp))[0] == 0):
            return []
        names = []
        for p in sorted(tmp.iterdir()):
            if OUR_FILES.match(p.name):
                os.replace(p, out_dir / p.name)
                names.append(p.name)
        return names
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class HfSideFiles:
    """What ``write_hf_side_files`` wrote: file names, whether ``tokenizer.json`` is among them, notes."""

    files: list[str] = field(default_factory=list)
    hf_tokenizer: bool = False
    notes: list[str] = field(default_factory=list)


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")


def write_hf_side_files(src_dir: Path, out_dir: Path, args: ModelArgs, profile: Profile, items: list[Item],
                        data_bytes: int, *, hf_tokenizer: bool, tokenizer_in_child: bool = False) -> HfSideFiles:
    """config.json, processor and tokenizer files for an ``hf`` conversion of ``src_dir`` in ``out_dir``.

    ``data_bytes`` is the tensor data written (for the compression ratio of quantized schemes);
    ``hf_tokenizer`` asks for ``tokenizer.json`` to be built from ``tekken.json``.
    """
    out = HfSideFiles()
    cfg = hf_layout.hf_config_for(args, dtype=output_dtype(profile))
    if profile.scheme in QUANTIZED:
        dense = sum(math.prod(i.src.shape) * 2 for i in items)
        cfg["quantization_config"] = quantization_config(profile.scheme, ratio=dense / max(data_bytes, 1),
                                                         ignore=_left_in_16_bit(items))
    _write_json(out_dir / "config.json", cfg)
    out.files.append("config.json")
    for name, doc in (_processor_files(args) if args.vision_encoder is not None else _text_files()).items():
        _write_json(out_dir / name, doc)
        out.files.append(name)
    tekken = src_dir / "tekken.json"
    sentencepiece = sorted(src_dir.glob("tokenizer.model*"))
    if not tekken.is_file() and sentencepiece and args.vision_encoder is None:
        # Mistral 7B's SentencePiece tokenizer: vLLM and our smoke test read it with mistral-common
        out.files.append(copy_side_file(sentencepiece[-1], src_dir, out_dir))
        out.notes.append(f"{sentencepiece[-1].name} copied; vLLM reads it with --tokenizer-mode mistral")
        return out
    if not tekken.is_file():
        out.notes.append("no tekken.json in the source: copy the tokenizer files into the output by hand")
        return out
    out.files.append(copy_side_file(tekken, src_dir, out_dir))
    # the copy, not the source: it was read once, through the checks of ``copy_side_file``
    tok_files = _write_hf_tokenizer(out_dir / "tekken.json", out_dir, in_child=tokenizer_in_child) \
        if hf_tokenizer else []
    out.files += tok_files
    out.hf_tokenizer = "tokenizer.json" in tok_files
    if not out.hf_tokenizer:
        out.notes.append("tokenizer.json not written (transformers is not installed or it was not asked "
                         "for); vLLM reads tekken.json with --tokenizer-mode mistral")
    return out
