"""The sparse mixture-of-experts feed-forward of Mixtral 8x7B / 8x22B, in plain PyTorch.

``MoeFeedForward`` replaces a block's dense ``feed_forward`` when ``params.json`` has ``moe``;
its attributes are the Mistral checkpoint keys (``feed_forward.gate``, ``feed_forward.experts.E.w1``...).
The router softmaxes the top-k logits in float32 (mistral-inference's ``MoeLayer``, the same function
as transformers' Mixtral), and only the chosen experts run on a token; on the meta device every expert
runs with zero weight for the rest, shapes only. Also the Mixtral <-> transformers names and
``MixtralConfig`` used by the parity tests. It does not load weights or place layers on devices.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from provision.errors import ConvertError, ParamsError
from provision.formats.params import ModelArgs
from provision.model.layers import FeedForward


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, experts) of shape (N, k): top-k of the router logits, softmax over those k in float32."""
    top, chosen = torch.topk(logits, k, dim=-1)
    return F.softmax(top, dim=-1, dtype=torch.float32), chosen


class MoeFeedForward(nn.Module):
    """Router + ``num_experts`` gated SiLU experts; each token is sent to its top ``k`` experts."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, num_experts_per_tok: int) -> None:
        super().__init__()
        if not 1 <= num_experts_per_tok <= num_experts:
            raise ParamsError(f"params.json.moe: num_experts_per_tok must be between 1 and num_experts "
                              f"({num_experts}), got {num_experts_per_tok}.")
        self.num_experts, self.k = num_experts, num_experts_per_tok
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(dim, hidden_dim) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = route(self.gate(flat), self.k)
        w = weights.to(x.dtype)
        if flat.device.type == "meta":
            return self._dense(flat, w, chosen).view(x.shape)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == e)
            if rows.numel() == 0:
                continue
            out.index_add_(0, rows, w[rows, slot, None] * expert(flat[rows]))
        return out.view(x.shape)

    def _dense(self, flat: torch.Tensor, w: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        combine = torch.zeros(flat.shape[0], self.num_experts, dtype=flat.dtype, device=flat.device)
        combine = combine.scatter(1, chosen, w)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            out = out + combine[:, e, None] * expert(flat)
        return out


def feed_forward_for(args: ModelArgs) -> nn.Module:
    """The decoder's feed-forward for ``args``: dense ``FeedForward``, or ``MoeFeedForward`` with ``moe``."""
    if args.moe is None:
        return FeedForward(args.dim, args.hidden_dim)
    return MoeFeedForward(args.dim, args.hidden_dim, args.moe.num_experts, args.moe.num_experts_per_tok)


# ---------------------------------------------------------------------------------------
# transformers (MixtralForCausalLM) names and config

_MOE_TO_HF = (
    (re.compile(r"^layers\.(\d+)\.feed_forward\.gate\.weight$"), r"model.layers.\1.block_sparse_moe.gate.weight"),
    (re.compile(r"^layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(w[123])\.weight$"),
     r"model.layers.\1.block_sparse_moe.experts.\2.\3.weight"),
)
_HF_TO_MOE = (
    (re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight$"), r"layers.\1.feed_forward.gate.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$"),
     r"layers.\1.feed_forward.experts.\2.\3.weight"),
)


def mistral_name_to_hf_mixtral(name: str) -> str:
    """``layers.0.feed_forward.experts.3.w1.weight`` -> ``model.layers.0.block_sparse_moe.experts.3.w1.weight``
    (the on-disk names of ``mistralai/Mixtral-8x7B-v0.1``); other decoder tensors as MistralForCausalLM."""
    from provision.model.hf_names import mistral_name_to_hf_text

    for rx, repl in _MOE_TO_HF:
        if rx.match(name):
            return rx.sub(repl, name)
    return mistral_name_to_hf_text(name)


def hf_mixtral_name_to_mistral(name: str) -> str:
    """The inverse of ``mistral_name_to_hf_mixtral``."""
    from provision.model.hf_names import hf_name_to_mistral

    for rx, repl in _HF_TO_MOE:
        if rx.match(name):
            return rx.sub(repl, name)
    return hf_name_to_mistral(name)


def mistral_to_hf_mixtral(name: str, tensor: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    """One Mistral tensor -> its ``MixtralForCausalLM`` name and layout (q/k permuted to rotate_half)."""
    from provision.model.hf_names import mistral_to_hf_text

    for rx, repl in _MOE_TO_HF:
        if rx.match(name):
            return rx.sub(repl, name), tensor
    return mistral_to_hf_text(name, tensor, args)


def hf_mixtral_config(args: ModelArgs, *, dtype: str = "bfloat16") -> dict[str, Any]:
    """transformers' ``MixtralConfig`` as a ``config.json`` dict (text-only MoE models)."""
    from provision.model.hf_names import hf_text_config

    if args.moe is None:
        raise ConvertError("params.json has no moe section: use hf_text_config for a dense Mistral model.")
    dense = ModelArgs.from_dict({k: v for k, v in args.to_dict().items() if k != "moe"})
    cfg = hf_text_config(dense, dtype=dtype)
    cfg.update({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                "num_local_experts": args.moe.num_experts, "num_experts_per_tok": args.moe.num_experts_per_tok,
                "router_jitter_noise": 0.0, "router_aux_loss_coef": 0.0, "output_router_logits": False})
    return cfg
