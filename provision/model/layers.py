"""Building blocks shared by the Pixtral decoder and vision encoder, in plain PyTorch.

RMSNorm, interleaved-pair rotary embedding (Mistral's layout), gated SiLU feed-forward and a
pre-norm transformer block, with attribute names equal to the checkpoint keys. Every
``nn.Linear`` is a plain attribute (a quantizer can swap it) and rotary angles are computed on the
fly (no buffers to initialise after a meta-device build). It does not load weights or tokenize.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * out.to(x.dtype)


def inv_freq(dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    """``1 / theta ** (2i / dim)`` for i in [0, dim/2), float32 (computed in float64 for accuracy)."""
    exps = torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim
    return (1.0 / (theta**exps)).to(torch.float32)


def rope_1d(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape ``(len(positions), head_dim // 2)`` for 1D positions."""
    ang = positions.to(torch.float64)[:, None] * inv_freq(head_dim, theta, positions.device).double()[None, :]
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` (..., T, H, D) by angles (T, D/2); returns x's dtype."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c = cos[:, None, :]
    s = sin[:, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).to(x.dtype)


@dataclass
class KVCache:
    """Pre-allocated keys and values of one attention layer: (B, n_kv_heads, max_len, head_dim)."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, batch: int, n_kv_heads: int, max_len: int, head_dim: int, *,
              dtype: torch.dtype, device: torch.device | str) -> KVCache:
        shape = (batch, n_kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def max_len(self) -> int:
        return int(self.k.shape[2])


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads and no biases."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                mask: torch.Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            end = start_pos + t
            if end > cache.max_len:
                raise ValueError(f"sequence of {end} tokens exceeds the KV cache of {cache.max_len}")
            cache.k[:, :, start_pos:end] = k
            cache.v[:, :, start_pos:end] = v
            k, v = cache.k[:, :, :end], cache.v[:, :, :end]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                             enable_gqa=self.n_heads != self.n_kv_heads)
        return self.wo(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """Gated SiLU MLP: ``w2(silu(w1(x)) * w3(x))``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attention(attention_norm(x))``, then ``h + feed_forward(ffn_norm(h))``."""

    def __init__(self, dim: int, hidden_dim: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 norm_eps: float) -> None:
        super().__init__()
        self.attention = Attention(dim, n_heads, n_kv_heads, head_dim)
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.feed_forward: nn.Module = FeedForward(dim, hidden_dim)  # MoE: provision.model.moe
        self.ffn_norm = RMSNorm(dim, norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                mask: torch.Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask=mask, is_causal=is_causal,
                               cache=cache, start_pos=start_pos)
        return h + self.feed_forward(self.ffn_norm(h))
