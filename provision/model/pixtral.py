"""Pixtral: the Mistral decoder with image features merged at the ``[IMG]`` token positions.

``Pixtral(args)`` has the module tree of Mistral's ``consolidated.safetensors`` (so a state dict
loads with ``strict=True``): RMSNorm, grouped-query attention with interleaved 1D RoPE, gated SiLU
MLP, an optional KV cache, and, when ``params.json`` says so, the vision encoder and adapter
(image features replace the ``[IMG]`` positions in raster order), a sliding window or MoE blocks.
``greedy_generate`` decodes greedily and reports per-step timing and finiteness. Loading weights
is ``loader.py``'s job; tokenization and image preprocessing are ``provision.model.inputs``'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from provision.errors import ParamsError
from provision.formats.params import ModelArgs
from provision.model.layers import KVCache, RMSNorm, TransformerBlock, rope_1d
from provision.model.mistral import attention_mask
from provision.model.moe import feed_forward_for
from provision.model.vision import VISION_NORM_EPS, VisionEncoder, VisionLanguageAdapter


def _check_supported(args: ModelArgs) -> None:
    v = args.vision_encoder
    if v is not None and (v.spatial_merge_size != 1 or v.mm_projector_id):
        raise ParamsError("params.json asks for a patch-merging projector; Pixtral 12B has none and it is not "
                          "implemented.")


def _layer_device(layer: nn.Module) -> torch.device:
    """Where a decoder block lives (blocks may sit on different devices: provision.model.placement)."""
    return layer.get_parameter("attention_norm.weight").device


class Pixtral(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        _check_supported(args)
        self.args = args
        # An explicit (uninitialised) weight skips normal_(), whose first call on the meta device
        # costs ~1.5 s of lazy imports; every weight is assigned from the checkpoint anyway.
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim))
        self.layers = nn.ModuleList(
            TransformerBlock(args.dim, args.hidden_dim, args.n_heads, args.n_kv_heads, args.head_dim, args.norm_eps)
            for _ in range(args.n_layers)
        )
        if args.moe is not None:  # Mixtral: the sparse MoE feed-forward (provision.model.moe)
            for layer in self.layers:
                layer.feed_forward = feed_forward_for(args)
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        v = args.vision_encoder
        if v is not None:
            self.vision_encoder = VisionEncoder(v)
            if v.add_pre_mm_projector_layer_norm:
                self.pre_mm_projector_norm = RMSNorm(v.hidden_size, VISION_NORM_EPS)
            self.vision_language_adapter = VisionLanguageAdapter(v.hidden_size, args.dim, bias=v.adapter_bias)

    @property
    def image_token_id(self) -> int | None:
        return self.args.vision_encoder.image_token_id if self.args.vision_encoder else None

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    def image_features(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Images (C, H, W) -> decoder-space features, one row per patch, images in order."""
        if self.args.vision_encoder is None:
            raise ValueError("this model has no vision encoder")
        feats = self.vision_encoder(list(images))
        if self.args.vision_encoder.add_pre_mm_projector_layer_norm:
            feats = self.pre_mm_projector_norm(feats)
        out: torch.Tensor = self.vision_language_adapter(feats)
        return out

    def embed(self, tokens: torch.Tensor, images: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        h: torch.Tensor = self.tok_embeddings(tokens)
        if images:
            img_id = self.image_token_id
            where = torch.eq(tokens, -1 if img_id is None else img_id)
            feats = self.image_features(images)
            n_tok, n_feat = int(where.sum()), int(feats.shape[0])
            if n_tok != n_feat:
                raise ValueError(f"{n_tok} [IMG] tokens but the images have {n_feat} patches")
            h = h.masked_scatter(where.unsqueeze(-1), feats.to(h.dtype))
        return h

    def new_cache(self, batch: int, max_len: int) -> list[KVCache]:
        a = self.args
        return [KVCache.empty(batch, a.n_kv_heads, max_len, a.head_dim, dtype=self.dtype,
                              device=_layer_device(layer)) for layer in self.layers]

    def forward(self, tokens: torch.Tensor, images: Sequence[torch.Tensor] | None = None, *,
                cache: list[KVCache] | None = None, start_pos: int = 0, last_only: bool = False) -> torch.Tensor:
        """Tokens (B, T) -> float32 logits (B, T, vocab) (or (B, 1, vocab) with ``last_only``)."""
        t = tokens.shape[1]
        h = self.embed(tokens, images)
        pos = torch.arange(start_pos, start_pos + t, device=tokens.device)
        cos, sin = rope_1d(pos, self.args.head_dim, self.args.rope_theta_value)
        # query i sees keys 0 .. start_pos + i (within the sliding window, when there is one)
        mask, is_causal = attention_mask(start_pos, t, self.args.sliding_window, tokens.device)
        for i, layer in enumerate(self.layers):
            dev = _layer_device(layer)
            if h.device != dev:  # consecutive layers on consecutive devices (provision.model.placement)
                h, cos, sin = h.to(dev), cos.to(dev), sin.to(dev)
                mask = mask.to(dev) if mask is not None else None
            h = layer(h, cos, sin, mask=mask, is_causal=is_causal,
                      cache=cache[i] if cache is not None else None, start_pos=start_pos)
        if last_only:
            h = h[:, -1:]
        h = h.to(self.norm.weight.device)
        logits: torch.Tensor = self.output(self.norm(h))
        return logits.float()


def build_model(args: ModelArgs, *, device: str | torch.device = "meta", dtype: torch.dtype | None = None) -> Pixtral:
    """The module tree on ``device`` (``meta`` by default: no memory until weights are assigned)."""
    with torch.device(device):
        model = Pixtral(args)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


@dataclass
class GenerateResult:
    tokens: list[int]  # generated ids (the prompt excluded)
    prefill_seconds: float
    step_seconds: list[float] = field(default_factory=list)  # one per token after the first
    finite: list[bool] = field(default_factory=list)  # logits finite, one per step (prefill included)

    @property
    def all_finite(self) -> bool:
        return all(self.finite)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def greedy_generate(model: Pixtral, prompt: Sequence[int], images: Sequence[torch.Tensor] = (), *,
                    max_tokens: int, eos_id: int | None = 2, use_cache: bool = True,
                    on_token: Callable[[int, int], None] | None = None) -> GenerateResult:
    """Greedy decoding of up to ``max_tokens`` tokens (stops after ``eos_id``).

    With ``use_cache=False`` every step recomputes the whole sequence (tests compare the two).
    A step whose logits are not all finite is recorded and decoding continues with argmax.
    """
    dev = model.device
    imgs = [im.to(dev) for im in images]
    seq = torch.tensor([list(prompt)], dtype=torch.long, device=dev)
    cache = model.new_cache(1, len(prompt) + max_tokens) if use_cache else None
    res = GenerateResult(tokens=[], prefill_seconds=0.0)
    t0 = time.perf_counter()
    logits = model(seq, imgs or None, cache=cache, start_pos=0, last_only=True)[0, -1]
    _sync(dev)
    res.prefill_seconds = time.perf_counter() - t0
    for step in range(max_tokens):
        res.finite.append(bool(torch.isfinite(logits).all()))
        nxt = int(torch.argmax(logits))
        res.tokens.append(nxt)
        if on_token is not None:
            on_token(step, nxt)
        if eos_id is not None and nxt == eos_id:
            break
        if step == max_tokens - 1:
            break
        t1 = time.perf_counter()
        if cache is not None:
            pos = len(prompt) + step
            logits = model(torch.tensor([[nxt]], device=dev), cache=cache, start_pos=pos, last_only=True)[0, -1]
        else:
            seq = torch.cat((seq, torch.tensor([[nxt]], device=dev)), dim=1)
            logits = model(seq, imgs or None, last_only=True)[0, -1]
        _sync(dev)
        res.step_seconds.append(time.perf_counter() - t1)
    return res
