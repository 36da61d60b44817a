"""The ``vllm serve`` command line that runs a model folder: one source of truth for what convert
prints, what the record keeps and what ``smoke --engine vllm`` starts.

``vllm_command`` builds the line from a profile and the context length; ``serve_args_for`` finds
the profile of a folder (its conversion record, else its files: ``params.json`` is the mistral
layout, ``config.json`` the hf one) and returns the same line as an argument list. Nothing here
starts vLLM (``provision.stages.smoke_vllm`` does).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from provision.stages.convert.items import output_dtype
from provision.stages.profiles import QUANTIZED, Profile


def vllm_command(out_dir: Path, profile: Profile, context: int, *, hf_tokenizer: bool = True,
                 multimodal: bool = True) -> str:
    """The exact ``vllm serve`` line for a converted folder, shell-quoted (``shlex.join``) so it pastes.

    Text-only models (``multimodal=False``) get no ``--limit-mm-per-prompt``; in the ``hf`` layout
    they keep mistral-common's tokenizer (``--tokenizer-mode mistral``), the one our smoke test
    and the release's chat format use."""
    return shlex.join(_args(out_dir, profile.layout, profile.scheme, output_dtype(profile), context, profile.gpus,
                            hf_tokenizer=hf_tokenizer, multimodal=multimodal))


def _args(out_dir: Path, layout: str, scheme: str, dtype: str, context: int, gpus: int, *, hf_tokenizer: bool,
          multimodal: bool) -> list[str]:
    parts = ["vllm", "serve", str(out_dir)]
    if layout == "mistral":
        parts += ["--tokenizer-mode", "mistral", "--config-format", "mistral", "--load-format", "mistral"]
    else:
        if scheme in QUANTIZED:
            parts += ["--quantization", "compressed-tensors"]
        if not hf_tokenizer or not multimodal:
            parts += ["--tokenizer-mode", "mistral"]
    parts += ["--dtype", dtype, "--max-model-len", str(context)]
    if gpus > 1:
        parts += ["--tensor-parallel-size", str(gpus)]
    if multimodal:
        parts += ["--limit-mm-per-prompt", '{"image": 4}']
    return parts


def serve_args_for(model_dir: Path, *, context: int = 32768) -> list[str]:
    """The ``vllm serve`` argument list for ``model_dir`` (``["vllm", "serve", DIR, ...]``).

    A conversion's record names its scheme, layout, GPU count and context (the folder it was
    written to may have moved: ``model_dir`` is used); another folder (an original release) is
    served as it lies: the mistral layout when it has ``params.json``, else hf, in bf16."""
    from provision.stages.convert.record import RECORD_NAME, read_record

    model_dir = Path(model_dir)
    mm = multimodal(model_dir)
    if (model_dir / RECORD_NAME).is_file():
        rec = read_record(model_dir)
        prof = rec.get("profile") or {}
        cmd = str(rec.get("vllm_command") or "")
        return _args(model_dir, str(rec.get("layout") or prof.get("layout") or "mistral"),
                     str(rec.get("scheme") or prof.get("scheme") or "bf16"),
                     str(prof.get("activation_dtype") or "bfloat16"), int(rec.get("context") or context),
                     int(prof.get("gpus") or 1), hf_tokenizer="--tokenizer-mode" not in cmd, multimodal=mm)
    layout = "mistral" if (model_dir / "params.json").is_file() else "hf"
    return _args(model_dir, layout, "bf16", "bfloat16", context, 1, hf_tokenizer=(model_dir / "tokenizer.json").is_file(),
                 multimodal=mm)


def multimodal(model_dir: Path) -> bool:
    """Whether the folder's model has a vision encoder (params.json's ``vision_encoder`` or a Llava config.json)."""
    for name, key in (("params.json", "vision_encoder"), ("config.json", "vision_config")):
        p = model_dir / name
        if p.is_file():
            try:
                doc = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return False
            return isinstance(doc, dict) and doc.get(key) is not None
    return False
