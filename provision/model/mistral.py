"""What text-only Mistral models (7B, NeMo) add to the Pixtral decoder: sliding-window masks and
the ``params.json`` RoPE default.

A text-only checkpoint is the Pixtral decoder without ``vision_encoder``, so ``Pixtral(args)``,
the loader and ``greedy_generate`` serve both. ``attention_mask`` limits causal attention to a
sliding window (query ``i`` sees keys ``i - window < j <= i``, as transformers does);
``explicit_params`` writes the RoPE base a ``params.json`` means (Mistral 7B v0.1: 10000) so other
tools read the same value. It does not load weights, tokenize or implement MoE; torch is imported
only when a mask is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

V01_ROPE_THETA = 10000.0  # Mistral 7B v0.1 (reference: "Rope Theta = 1e4 - With sliding window")
MOE_ROPE_THETA = 1000000.0  # Mixtral 8x7B's params.json has no rope_theta either; docs: "Rope Theta = 1e6"


def attention_mask(start_pos: int, t: int, window: int | None,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor | None, bool]:
    """``(mask, is_causal)`` for ``t`` queries at positions ``start_pos..start_pos+t-1`` over keys
    ``0..start_pos+t-1``: a boolean (t, start_pos+t) mask (True = attend) or ``is_causal``."""
    import torch

    end = start_pos + t
    if window is not None and window < 1:
        raise ValueError(f"sliding window must be positive, got {window}")
    windowed = window is not None and end > window
    if t == 1 and not windowed:
        return None, False  # one query sees every cached key
    if start_pos == 0 and not windowed:
        return None, True
    pos = torch.arange(start_pos, end, device=device)
    keys = torch.arange(end, device=device)
    mask = keys[None, :] <= pos[:, None]
    if windowed:
        assert window is not None
        mask = mask & (keys[None, :] > pos[:, None] - window)
    return mask, False


def explicit_params(params: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A copy of a decoded params.json with ``rope_theta`` written out (10000 when absent).

    Returns ``(params, added)``; key order is kept and ``rope_theta`` goes after ``n_kv_heads``
    (where the newer releases put it)."""
    if "rope_theta" in params:
        return dict(params), False
    theta = MOE_ROPE_THETA if params.get("moe") is not None else V01_ROPE_THETA  # Mixtral 8x7B: 1e6
    out: dict[str, Any] = {}
    for k, v in params.items():
        out[k] = v
        if k == "n_kv_heads":
            out["rope_theta"] = theta
    out.setdefault("rope_theta", theta)
    return out, True
