"""The ``vllm serve`` command line that runs a converted folder, for the record and the CLI to show.

It only builds a string from the profile and the context length; nothing here starts vLLM.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from provision.stages.convert.items import output_dtype
from provision.stages.profiles import QUANTIZED, Profile


def vllm_command(out_dir: Path, profile: Profile, context: int, *, hf_tokenizer: bool = True) -> str:
    """The exact ``vllm serve`` line for a converted folder, shell-quoted (``shlex.join``) so it pastes."""
    parts = ["vllm", "serve", str(out_dir)]
    if profile.layout == "mistral":
        parts += ["--tokenizer-mode", "mistral", "--config-format", "mistral", "--load-format", "mistral"]
    else:
        if profile.scheme in QUANTIZED:
            parts += ["--quantization", "compressed-tensors"]
        if not hf_tokenizer:
            parts += ["--tokenizer-mode", "mistral"]
    parts += ["--dtype", output_dtype(profile), "--max-model-len", str(context)]
    if profile.gpus > 1:
        parts += ["--tensor-parallel-size", str(profile.gpus)]
    parts += ["--limit-mm-per-prompt", '{"image": 4}']
    return shlex.join(parts)
