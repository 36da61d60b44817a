"""The model-level check of a conversion: logits of the converted model against the 16-bit source.

``compare_logits`` loads both folders with ``provision.model.loader`` in float32 and compares
their logits on the smoke prompt (``convert`` runs it on its staging folder, before the commit, and
keeps the result in the record); ``should_compare`` is the default decision (both models must fit
easily in RAM).
It does not convert anything and never runs on a GPU unless asked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from provision import hardware
from provision.formats.params import ModelArgs


def should_compare(source_bytes: int, *, ram_bytes: int | None = None) -> bool:
    """Whether the comparison runs by default: both models in float32 on the CPU take about 4x
    the 16-bit source bytes, and must fit in a quarter of the RAM."""
    return source_bytes * 4 < (ram_bytes if ram_bytes is not None else hardware.ram_bytes()) // 4


def compare_logits(reference_dir: Path, converted_dir: Path, *, prompt: str | None = None,
                   images: list[Any] | None = None, device: str = "cpu") -> dict[str, Any]:
    """Top-1 agreement and cosine similarity of logits, reference (16-bit) vs converted model.

    Both folders are loaded with ``provision.model.loader.load_model`` in float32 on ``device``;
    the input is the smoke prompt (the manifest's, else the default) with its generated image.
    ``top1_agreement`` is the fraction of positions whose arg-max agrees; ``cosine`` the mean
    over positions of the cosine similarity of the logit vectors; ``cosine_min`` the worst.
    """
    import torch

    from provision.formats.manifest import SmokeSpec
    from provision.model.inputs import encode_chat, load_tokenizer, square_image
    from provision.model.loader import load_model

    spec = SmokeSpec()
    params = Path(reference_dir) / "params.json"
    vision = params.is_file() and ModelArgs.from_file(params).vision_encoder is not None
    tok = load_tokenizer(Path(reference_dir), require_image=vision)  # text-only models: no image
    enc = encode_chat(tok, prompt if prompt is not None else spec.prompt,
                      images if images is not None else ([square_image(spec.image)] if vision else []))
    ids = torch.tensor([enc.tokens])
    out = []
    for d in (reference_dir, converted_dir):
        model, _ = load_model(Path(d), device=device, dtype=torch.float32)
        with torch.no_grad():
            out.append(model(ids.to(device), [im.to(device) for im in enc.images])[0].float().cpu())
        del model
    a, b = out
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    agree = (a.argmax(-1) == b.argmax(-1)).float()
    return {"positions": int(a.shape[0]), "top1_agreement": float(agree.mean()), "cosine": float(cos.mean()),
            "cosine_min": float(cos.min()), "max_abs_diff": float((a - b).abs().max())}
