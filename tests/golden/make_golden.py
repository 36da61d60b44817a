"""Regenerate ``tiny_seed0.json``: the ids transformers generates greedily for the tiny checkpoint.

Run once, by hand, from the repository root where transformers is installed:
``.venv/bin/python -m tests.golden.make_golden``.
The ids come from transformers' ``LlavaForConditionalGeneration`` (an independent implementation),
fed the weights converted with ``provision.model.hf_names``, the manifest's generated test image
and prompt tokenized by mistral-common, float32 on the CPU. The test suite then checks provision's
own model against these ids without needing transformers.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from provision.model.inputs import encode_chat, load_tokenizer, square_image
from provision.testing.tiny import write_tiny
from tests.support.hf_reference import GOLDEN, hf_greedy, hf_model, write_hf_copy


def main() -> None:
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "tiny"
        res = write_tiny(src, seed=0)
        spec = res.manifest.smoke
        tok = load_tokenizer(src)
        enc = encode_chat(tok, spec.prompt, [square_image(spec.image)])
        hf_dir = write_hf_copy(src, Path(tmp) / "hf")
        ids = hf_greedy(hf_model(hf_dir), enc.tokens, enc.images, spec.max_tokens,
                        eos_id=tok.instruct_tokenizer.tokenizer.eos_id)
        doc = {
            "about": "Greedy ids from transformers LlavaForConditionalGeneration for the tiny checkpoint "
                     "(seed 0), float32, default smoke image and prompt; regenerate with make_golden.py.",
            "seed": 0,
            "consolidated_sha256": res.files["consolidated.safetensors"][1],
            "prompt": spec.prompt,
            "image": {"kind": spec.image.kind, "width": spec.image.width, "height": spec.image.height,
                      "color": spec.image.color, "background": spec.image.background},
            "max_tokens": spec.max_tokens,
            "prompt_token_ids": enc.tokens,
            "prompt_sha256": hashlib.sha256(json.dumps(enc.tokens).encode()).hexdigest(),
            "token_ids": ids,
            "generated_by": {"transformers": transformers.__version__, "torch": torch.__version__},
        }
    GOLDEN.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN}: {ids}")


if __name__ == "__main__":
    main()
