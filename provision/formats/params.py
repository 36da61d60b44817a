"""``params.json`` -> dataclasses, and the tensor spec an architecture implies.

Pure Python (no torch): verify, plan and the tiny-checkpoint writer use it as well as the
model. Parsing is strict about the keys a model needs (missing or mistyped -> ``ParamsError``,
exit 3) and keeps unknown keys in ``extra`` so newer ``params.json`` files still load.
``tensor_spec`` lists every tensor name and shape in checkpoint order; the names are the
Mistral ("consolidated") names, equal to the model's module attribute paths.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from provision.errors import ParamsError

# Special token ids fixed by the tekken tokenizer.
IMG_TOKEN_ID = 10
IMG_BREAK_TOKEN_ID = 12
IMG_END_TOKEN_ID = 13


def _check(d: dict[str, Any], key: str, typ: type, where: str, *, required: bool, default: Any = None) -> Any:
    if key not in d:
        if required:
            raise ParamsError(f"params.json{where}: required key {key!r} is missing.", key=key)
        return default
    v = d[key]
    if typ is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        v = float(v) if ok else v
    elif typ is int:
        ok = isinstance(v, int) and not isinstance(v, bool)
    else:
        ok = isinstance(v, typ)
    if not ok:
        raise ParamsError(
            f"params.json{where}: key {key!r} must be {typ.__name__}, got {type(v).__name__} {v!r}.", key=key
        )
    if typ in (int, float) and v < 0:
        raise ParamsError(f"params.json{where}: key {key!r} must not be negative, got {v!r}.", key=key)
    return v


@dataclass(frozen=True)
class VisionArgs:
    hidden_size: int
    num_channels: int
    image_size: int
    patch_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    rope_theta: float = 1e4
    image_token_id: int = IMG_TOKEN_ID
    image_break_token_id: int = IMG_BREAK_TOKEN_ID
    image_end_token_id: int = IMG_END_TOKEN_ID
    adapter_bias: bool = True
    spatial_merge_size: int = 1
    add_pre_mm_projector_layer_norm: bool = False
    mm_projector_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, d: Any) -> VisionArgs:
        where = ".vision_encoder"
        if not isinstance(d, dict):
            raise ParamsError(f"params.json{where} must be an object.")
        req_int = ("hidden_size", "num_channels", "image_size", "patch_size", "intermediate_size",
                   "num_hidden_layers", "num_attention_heads")
        kw: dict[str, Any] = {k: _check(d, k, int, where, required=True) for k in req_int}
        kw["rope_theta"] = _check(d, "rope_theta", float, where, required=False, default=1e4)
        for k, dflt in (("image_token_id", IMG_TOKEN_ID), ("image_break_token_id", IMG_BREAK_TOKEN_ID),
                        ("image_end_token_id", IMG_END_TOKEN_ID), ("spatial_merge_size", 1)):
            kw[k] = _check(d, k, int, where, required=False, default=dflt)
        kw["adapter_bias"] = _check(d, "adapter_bias", bool, where, required=False, default=True)
        kw["add_pre_mm_projector_layer_norm"] = _check(d, "add_pre_mm_projector_layer_norm", bool, where,
                                                       required=False, default=False)
        kw["mm_projector_id"] = _check(d, "mm_projector_id", str, where, required=False, default="")
        known = {f.name for f in fields(cls)}
        kw["extra"] = {k: v for k, v in d.items() if k not in known}
        args = cls(**kw)
        if args.hidden_size % args.num_attention_heads:
            raise ParamsError("params.json.vision_encoder: hidden_size is not a multiple of num_attention_heads.")
        if args.head_dim % 4:
            raise ParamsError("params.json.vision_encoder: the 2D RoPE needs head_dim divisible by 4.")
        if args.image_size % args.patch_size:
            raise ParamsError("params.json.vision_encoder: image_size is not a multiple of patch_size.")
        return args

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        d.update(self.extra)
        return d


@dataclass(frozen=True)
class MoeArgs:
    num_experts: int
    num_experts_per_tok: int

    @classmethod
    def from_dict(cls, d: Any) -> MoeArgs:
        if not isinstance(d, dict):
            raise ParamsError("params.json.moe must be an object.")
        return cls(num_experts=_check(d, "num_experts", int, ".moe", required=True),
                   num_experts_per_tok=_check(d, "num_experts_per_tok", int, ".moe", required=True))


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    rope_theta: float | None = None  # absent in Mistral 7B v0.1 (means 10000) and Mixtral 8x7B (means 1e6)
    sliding_window: int | None = None
    max_seq_len: int | None = None
    max_position_embeddings: int | None = None
    moe: MoeArgs | None = None
    vision_encoder: VisionArgs | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def rope_theta_value(self) -> float:
        if self.rope_theta is not None:
            return self.rope_theta
        # Mixtral 8x7B's torrent params.json has none and means 1e6 (Mistral docs: "Rope Theta = 1e6")
        return 1000000.0 if self.moe is not None else 10000.0

    @classmethod
    def from_dict(cls, d: Any) -> ModelArgs:
        if not isinstance(d, dict):
            raise ParamsError("params.json must be a JSON object.")
        kw: dict[str, Any] = {}
        for k in ("dim", "n_layers", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size"):
            kw[k] = _check(d, k, int, "", required=True)
        kw["norm_eps"] = _check(d, "norm_eps", float, "", required=True)
        hd = _check(d, "head_dim", int, "", required=False)
        if hd is None:  # Mistral 7B's params.json derives it
            if kw["dim"] % kw["n_heads"]:
                raise ParamsError("params.json: 'head_dim' is missing and dim is not a multiple of n_heads.")
            hd = kw["dim"] // kw["n_heads"]
        kw["head_dim"] = hd
        kw["rope_theta"] = _check(d, "rope_theta", float, "", required=False)
        for k in ("sliding_window", "max_seq_len", "max_position_embeddings"):
            v = d.get(k)
            kw[k] = None if v is None else _check(d, k, int, "", required=False)
        if d.get("moe") is not None:
            kw["moe"] = MoeArgs.from_dict(d["moe"])
        if d.get("vision_encoder") is not None:
            kw["vision_encoder"] = VisionArgs.from_dict(d["vision_encoder"])
        known = {f.name for f in fields(cls)}
        kw["extra"] = {k: v for k, v in d.items() if k not in known}
        args = cls(**kw)
        if args.n_heads % args.n_kv_heads:
            raise ParamsError("params.json: n_heads must be a multiple of n_kv_heads.")
        if args.head_dim % 2:
            raise ParamsError("params.json: head_dim must be even (RoPE rotates pairs).")
        return args

    @classmethod
    def from_file(cls, path: Path) -> ModelArgs:
        try:
            raw = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ParamsError(f"params.json not found: {path}.", path=str(path)) from None
        except (OSError, UnicodeDecodeError) as e:
            raise ParamsError(f"Cannot read {path}: {e}.", path=str(path)) from None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ParamsError(f"{path} is not valid JSON: {e}.", path=str(path)) from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"dim": self.dim, "n_layers": self.n_layers, "head_dim": self.head_dim,
                             "hidden_dim": self.hidden_dim, "n_heads": self.n_heads,
                             "n_kv_heads": self.n_kv_heads}
        if self.rope_theta is not None:
            d["rope_theta"] = self.rope_theta
        d["norm_eps"] = self.norm_eps
        d["vocab_size"] = self.vocab_size
        for k in ("sliding_window", "max_seq_len", "max_position_embeddings"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.moe is not None:
            d["moe"] = {"num_experts": self.moe.num_experts, "num_experts_per_tok": self.moe.num_experts_per_tok}
        if self.vision_encoder is not None:
            d["vision_encoder"] = self.vision_encoder.to_dict()
        d.update(self.extra)
        return d


def tensor_spec(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape the architecture implies, in checkpoint order."""
    spec: dict[str, tuple[int, ...]] = {}
    d, hd = args.dim, args.head_dim
    spec["tok_embeddings.weight"] = (args.vocab_size, d)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        spec[p + "attention.wq.weight"] = (args.n_heads * hd, d)
        spec[p + "attention.wk.weight"] = (args.n_kv_heads * hd, d)
        spec[p + "attention.wv.weight"] = (args.n_kv_heads * hd, d)
        spec[p + "attention.wo.weight"] = (d, args.n_heads * hd)
        spec[p + "attention_norm.weight"] = (d,)
        spec[p + "ffn_norm.weight"] = (d,)
        if args.moe is None:
            spec[p + "feed_forward.w1.weight"] = (args.hidden_dim, d)
            spec[p + "feed_forward.w2.weight"] = (d, args.hidden_dim)
            spec[p + "feed_forward.w3.weight"] = (args.hidden_dim, d)
        else:
            spec[p + "feed_forward.gate.weight"] = (args.moe.num_experts, d)
            for e in range(args.moe.num_experts):
                q = f"{p}feed_forward.experts.{e}."
                spec[q + "w1.weight"] = (args.hidden_dim, d)
                spec[q + "w2.weight"] = (d, args.hidden_dim)
                spec[q + "w3.weight"] = (args.hidden_dim, d)
    spec["norm.weight"] = (d,)
    spec["output.weight"] = (args.vocab_size, d)
    v = args.vision_encoder
    if v is not None:
        h = v.hidden_size
        spec["vision_encoder.patch_conv.weight"] = (h, v.num_channels, v.patch_size, v.patch_size)
        spec["vision_encoder.ln_pre.weight"] = (h,)
        for j in range(v.num_hidden_layers):
            p = f"vision_encoder.transformer.layers.{j}."
            for w in ("wq", "wk", "wv", "wo"):
                spec[p + f"attention.{w}.weight"] = (h, h)
            spec[p + "attention_norm.weight"] = (h,)
            spec[p + "ffn_norm.weight"] = (h,)
            spec[p + "feed_forward.w1.weight"] = (v.intermediate_size, h)
            spec[p + "feed_forward.w2.weight"] = (h, v.intermediate_size)
            spec[p + "feed_forward.w3.weight"] = (v.intermediate_size, h)
        if v.add_pre_mm_projector_layer_norm:
            spec["pre_mm_projector_norm.weight"] = (h,)
        spec["vision_language_adapter.w_in.weight"] = (d, h)
        if v.adapter_bias:
            spec["vision_language_adapter.w_in.bias"] = (d,)
        spec["vision_language_adapter.w_out.weight"] = (d, d)
        if v.adapter_bias:
            spec["vision_language_adapter.w_out.bias"] = (d,)
    return spec


def parameter_count(args: ModelArgs) -> int:
    return sum(math.prod(s) for s in tensor_spec(args).values())


def spec_diff(have: dict[str, tuple[int, ...]], spec: dict[str, tuple[int, ...]]
              ) -> tuple[list[str], list[str], list[str], list[str]]:
    """Compare tensor names and shapes with a spec: (missing, extra, wrong_shape, human parts)."""
    missing = [n for n in spec if n not in have]
    extra = sorted(n for n in have if n not in spec)
    wrong = [n for n in spec if n in have and tuple(have[n]) != tuple(spec[n])]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing (first {missing[0]!r})")
    if extra:
        parts.append(f"{len(extra)} tensors not in the spec (first {extra[0]!r})")
    if wrong:
        n = wrong[0]
        parts.append(f"{len(wrong)} with the wrong shape (first {n!r}: {list(have[n])}, params.json implies "
                     f"{list(spec[n])})")
    return missing, extra, wrong, parts
