"""Pixtral's vision encoder and vision-language adapter, in plain PyTorch.

``VisionEncoder``: a 16x16 patch convolution without bias applied to each image on its own,
row-major flattening, RMSNorm ``ln_pre``, then bidirectional transformer blocks with 2D RoPE
over (row, column) patch positions and a block-diagonal mask, so that a patch attends only to
patches of its own image: two images in one call give each the same features as alone.
``VisionLanguageAdapter``: Linear-GELU-Linear with bias. Attribute names equal the checkpoint
keys under ``vision_encoder.`` / ``vision_language_adapter.``. No preprocessing happens here:
images arrive normalized, (C, H, W), H and W multiples of the patch size (mistral-common's job).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from provision.formats.params import VisionArgs
from provision.model.layers import RMSNorm, TransformerBlock, inv_freq

VISION_NORM_EPS = 1e-5  # fixed in Pixtral (not in params.json)


def rope_2d(grid_sizes: list[tuple[int, int]], head_dim: int, theta: float,
            device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (N_patches, head_dim/2) for every patch of every image, images in order.

    Angles for patch (r, c): ``[r * f[0::2] | c * f[1::2]]`` with ``f = inv_freq(head_dim, theta)``
    (mistral-inference ``precompute_freqs_cis_2d``).
    """
    f = inv_freq(head_dim, theta, device).double()
    fh, fw = f[0::2], f[1::2]
    parts = []
    for h, w in grid_sizes:
        rows = torch.arange(h, device=device, dtype=torch.float64)
        cols = torch.arange(w, device=device, dtype=torch.float64)
        ah = (rows[:, None] * fh[None, :])[:, None, :].expand(h, w, fh.numel())
        aw = (cols[:, None] * fw[None, :])[None, :, :].expand(h, w, fw.numel())
        parts.append(torch.cat((ah, aw), dim=-1).reshape(h * w, -1))
    ang = torch.cat(parts, dim=0)
    return ang.cos().float(), ang.sin().float()


def block_diagonal_mask(seqlens: list[int], device: torch.device | str) -> torch.Tensor:
    """Boolean (N, N) mask, True where query and key patches belong to the same image."""
    ids = torch.repeat_interleave(torch.arange(len(seqlens), device=device),
                                  torch.tensor(seqlens, device=device))
    return ids[:, None] == ids[None, :]


class VisionTransformer(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerBlock(args.hidden_size, args.intermediate_size, args.num_attention_heads,
                             args.num_attention_heads, args.head_dim, VISION_NORM_EPS)
            for _ in range(args.num_hidden_layers)
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, cos, sin, mask=mask)
        return x


class VisionEncoder(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.args = args
        self.patch_conv = nn.Conv2d(args.num_channels, args.hidden_size, kernel_size=args.patch_size,
                                    stride=args.patch_size, bias=False)
        self.ln_pre = RMSNorm(args.hidden_size, VISION_NORM_EPS)
        self.transformer = VisionTransformer(args)

    def grid(self, image: torch.Tensor) -> tuple[int, int]:
        """(rows, cols) of patches for one (C, H, W) image."""
        p = self.args.patch_size
        _, h, w = image.shape
        if h % p or w % p:
            raise ValueError(f"image of {h}x{w} pixels is not a multiple of the {p}-pixel patch")
        if h // p > self.args.max_patches_per_side or w // p > self.args.max_patches_per_side:
            raise ValueError(f"image of {h}x{w} pixels exceeds the encoder's {self.args.image_size} pixels")
        return h // p, w // p

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Images (C, H, W) -> features (sum of H/16 * W/16, hidden_size), raster order per image."""
        if not images:
            raise ValueError("the vision encoder needs at least one image")
        dtype = self.patch_conv.weight.dtype
        grids = [self.grid(img) for img in images]
        patches = [self.patch_conv(img.to(dtype).unsqueeze(0)).squeeze(0).flatten(1).T for img in images]
        x = self.ln_pre(torch.cat(patches, dim=0)).unsqueeze(0)  # (1, N, D)
        cos, sin = rope_2d(grids, self.args.head_dim, self.args.rope_theta, x.device)
        seqlens = [h * w for h, w in grids]
        mask = block_diagonal_mask(seqlens, x.device) if len(seqlens) > 1 else None
        return self.transformer(x, cos, sin, mask).squeeze(0)


class VisionLanguageAdapter(nn.Module):
    """``w_out(gelu(w_in(x)))``, both with bias (Pixtral 12B)."""

    def __init__(self, in_dim: int, dim: int, bias: bool = True) -> None:
        super().__init__()
        self.w_in = nn.Linear(in_dim, dim, bias=bias)
        self.w_out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(F.gelu(self.w_in(x)))
