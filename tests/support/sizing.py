"""GPU memory a model needs, worked out from its parameter count and bytes per weight, independently
of ``provision.stages.profiles`` (the code under test): the expected GPU counts in the tests are
derived here, not read off the code.

The rule being checked (README, "Convert for your GPU": weights + KV cache for the context, batch 1,
+ 10%), split evenly over 1, 2, 4 or 8 GPUs (a count that divides the attention and KV heads). Only the decoder's Linear
weights (wq, wk, wv, wo, w1, w2, w3 of every layer and expert) are quantized; everything else
(embeddings, output, norms, MoE router, the vision encoder) stays 16-bit. Bytes per quantized weight:

* ``bf16`` / ``fp16``: 2.
* ``fp8``: 1, plus one 16-bit scale per output row: 2 / in_features more, at most 2 / dim here
  (every decoder Linear has at least ``dim`` input columns).
* ``w8a16``: 1 + 2/128 (one 16-bit scale per group of 128); ``w4a16``: 0.5 + 2/128; plus 16 bytes
  per tensor for its stored shape.

The small terms are bounded, not guessed: ``gpus_needed`` works the count out from the lowest and
the highest weight figure and insists both give the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass

OVERHEAD = 1.1
CONTEXT = 32768
KV_BYTES = 2  # K and V cached in 16 bits


@dataclass(frozen=True)
class Arch:
    """What the sizing needs from a released params.json, plus the model's total parameter count."""

    total_params: int
    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    experts: int = 1

    def quantized_params(self) -> int:
        """Weights of the decoder Linears: wq, wo are dim x (heads * head_dim), wk, wv dim x (kv heads *
        head_dim); w1, w2, w3 are dim x hidden_dim, once per expert."""
        attention = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = self.experts * 3 * self.dim * self.hidden_dim
        return self.n_layers * (attention + mlp)

    def tensors_quantized(self) -> int:
        return self.n_layers * (4 + 3 * self.experts)

    def kv_bytes(self, context: int = CONTEXT) -> int:
        """K and V, every layer, every KV head, ``context`` tokens, batch 1."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * context * KV_BYTES

    def weight_bytes_range(self, scheme: str) -> tuple[float, float]:
        """(lowest, highest) bytes the weights can take under ``scheme``."""
        q = self.quantized_params()
        rest = 2 * (self.total_params - q)
        if scheme in ("bf16", "fp16"):
            return 2 * self.total_params, 2 * self.total_params
        if scheme == "fp8":
            return q + rest, q * (1 + 2 / self.dim) + rest
        per = {"w8a16": 1 + 2 / 128, "w4a16": 0.5 + 2 / 128}[scheme]
        return q * per + rest, q * per + rest + 16 * self.tensors_quantized()

    def need_per_gpu(self, scheme: str, gpus: int, context: int = CONTEXT) -> tuple[float, float]:
        lo, hi = self.weight_bytes_range(scheme)
        kv = self.kv_bytes(context)
        return (lo + kv) * OVERHEAD / gpus, (hi + kv) * OVERHEAD / gpus

    def gpus_needed(self, scheme: str, per_gpu_bytes: int, max_gpus: int = 8,
                    context: int = CONTEXT) -> int | None:
        """The fewest of 1, 2, 4, 8 (dividing the heads) GPUs that hold the model; None if none do."""
        for n in (1, 2, 4, 8):
            if n > max_gpus or self.n_heads % n or self.n_kv_heads % n:
                continue
            lo, hi = self.need_per_gpu(scheme, n, context)
            assert (lo <= per_gpu_bytes) == (hi <= per_gpu_bytes), f"{scheme} on {n}: too close to call"
            if hi <= per_gpu_bytes:
                return n
        return None


# Released params.json figures; total parameter counts from the reference (Pixtral 12B: its
# 25,365,479,424-byte bf16 release / 2).
PIXTRAL_12B = Arch(12_682_739_712, dim=5120, n_layers=40, head_dim=128, hidden_dim=14336, n_heads=32,
                   n_kv_heads=8)
MIXTRAL_8X7B = Arch(46_702_792_704, dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32,
                    n_kv_heads=8, experts=8)
MIXTRAL_8X22B = Arch(140_620_634_112, dim=6144, n_layers=56, head_dim=128, hidden_dim=16384, n_heads=48,
                     n_kv_heads=8, experts=8)
MISTRAL_LARGE_2407 = Arch(122_610_069_504, dim=12288, n_layers=88, head_dim=128, hidden_dim=28672, n_heads=96,
                          n_kv_heads=8)
# Pixtral Large = Mistral Large 2407's decoder + a 1408-wide, 40-layer vision encoder (attention
# 4 * 1408^2, MLP 3 * 1408 * 6144, two norms per layer; a 16x16x3 patch conv; ln_pre) and a
# bias-free adapter 1408 -> 12288 -> 12288.
PIXTRAL_LARGE_VISION = (40 * (4 * 1408**2 + 3 * 1408 * 6144 + 2 * 1408) + 1408 * 3 * 16 * 16 + 1408
                        + 1408 * 12288 + 12288 * 12288)
PIXTRAL_LARGE_2411 = Arch(122_610_069_504 + PIXTRAL_LARGE_VISION, dim=12288, n_layers=88, head_dim=128,
                          hidden_dim=28672, n_heads=96, n_kv_heads=8)
