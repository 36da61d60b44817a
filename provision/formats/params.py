"""``params.json`` -> dataclasses, and the tensor spec an architecture implies.

Pure Python (no torch): verify, plan and the tiny-checkpoint writer use it as well as the
model. Parsing is strict about the keys a model needs (missing or mistyped -> ``ParamsError``,
exit 3) and keeps unknown keys in ``extra`` so newer ``params.json`` files still load. Every count
and size is checked against the sane maxima below (``TEXT_BOUNDS``...) and every divisor is at
least 1 before anything is allocated or looped over, so a hostile ``params.json`` of a few bytes
cannot cost memory or time.
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
from provision.io.opening import read_regular

# Special token ids fixed by the tekken tokenizer.
IMG_TOKEN_ID = 10
IMG_BREAK_TOKEN_ID = 12
IMG_END_TOKEN_ID = 13


# Sane maxima of every count and size in params.json (and a manifest's [params]), checked before
# anything is allocated or looped over. Each is several times the largest known Mistral model
# (Mistral Large 2 / Pixtral Large: 88 layers, dim 12288, hidden_dim 28672, 96 heads, 8 kv heads,
# head_dim 128, vocab 32768 (Pixtral 12B: 131072); vision 40 layers, hidden 1408, MLP 6144, 16 heads,
# image 1024, patch 16; Mixtral: 8 experts, 2 per token). Key -> (minimum, maximum).
TEXT_BOUNDS: dict[str, tuple[int, int]] = {
    "dim": (1, 65536), "n_layers": (1, 512), "head_dim": (2, 1024), "hidden_dim": (1, 262144),
    "n_heads": (1, 1024), "n_kv_heads": (1, 1024), "vocab_size": (1, 1 << 20),
    "sliding_window": (0, 1 << 24), "max_seq_len": (0, 1 << 24), "max_position_embeddings": (0, 1 << 24),
}
MOE_BOUNDS: dict[str, tuple[int, int]] = {"num_experts": (1, 512), "num_experts_per_tok": (1, 512)}
VISION_BOUNDS: dict[str, tuple[int, int]] = {
    "hidden_size": (1, 16384), "num_channels": (1, 16), "image_size": (1, 16384), "patch_size": (1, 1024),
    "intermediate_size": (1, 65536), "num_hidden_layers": (1, 256), "num_attention_heads": (1, 256),
    "spatial_merge_size": (1, 64), "image_token_id": (0, 1 << 20), "image_break_token_id": (0, 1 << 20),
    "image_end_token_id": (0, 1 << 20),
}
FLOAT_BOUNDS: dict[str, tuple[float, float]] = {"norm_eps": (0.0, 1.0), "rope_theta": (1.0, 1e12)}
MAX_PARAMS_BYTES = 1 << 20  # a real params.json is under 2 KB
# At most this many tensors in the spec (Mistral Large 2: 795; Mixtral 8x22B: 1,795), computed from the
# counts before ``tensor_spec`` builds anything.
MAX_TENSORS = 200_000


def _check(d: dict[str, Any], key: str, typ: type, where: str, *, required: bool, default: Any = None,
           bounds: tuple[float, float] | None = None) -> Any:
    if key not in d:
        if required:
            raise ParamsError(f"params.json{where}: required key {key!r} is missing.", key=key)
        return default
    v = d[key]
    if typ is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        if ok:
            try:
                v = float(v)
            except OverflowError:
                raise ParamsError(f"params.json{where}: key {key!r} is a number too large for a float.",
                                  key=key) from None
            if not math.isfinite(v):
                raise ParamsError(f"params.json{where}: key {key!r} must be a finite number, got {v!r}.", key=key)
    elif typ is int:
        ok = isinstance(v, int) and not isinstance(v, bool)
    else:
        ok = isinstance(v, typ)
    if not ok:
        raise ParamsError(
            f"params.json{where}: key {key!r} must be {typ.__name__}, got {type(v).__name__} {_short(v)}.", key=key
        )
    if typ in (int, float) and v < 0:
        raise ParamsError(f"params.json{where}: key {key!r} must not be negative, got {_short(v)}.", key=key)
    if bounds is not None and not bounds[0] <= v <= bounds[1]:
        raise ParamsError(f"params.json{where}: key {key!r} = {_short(v)} is outside the sane range "
                          f"{_num(bounds[0])}..{_num(bounds[1])}.", key=key, minimum=bounds[0], maximum=bounds[1])
    return v


def _num(x: float) -> str:
    return f"{x:,d}" if isinstance(x, int) else f"{x:g}"


def _short(v: Any) -> str:
    """``repr(v)`` cut to 40 characters (an enormous integer is not printed in full)."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 128:
        return f"<an integer of {v.bit_length()} bits>"
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


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
        kw: dict[str, Any] = {k: _check(d, k, int, where, required=True, bounds=VISION_BOUNDS[k]) for k in req_int}
        kw["rope_theta"] = _check(d, "rope_theta", float, where, required=False, default=1e4,
                                  bounds=FLOAT_BOUNDS["rope_theta"])
        for k, dflt in (("image_token_id", IMG_TOKEN_ID), ("image_break_token_id", IMG_BREAK_TOKEN_ID),
                        ("image_end_token_id", IMG_END_TOKEN_ID), ("spatial_merge_size", 1)):
            kw[k] = _check(d, k, int, where, required=False, default=dflt, bounds=VISION_BOUNDS[k])
        kw["adapter_bias"] = _check(d, "adapter_bias", bool, where, required=False, default=True)
        kw["add_pre_mm_projector_layer_norm"] = _check(d, "add_pre_mm_projector_layer_norm", bool, where,
                                                       required=False, default=False)
        kw["mm_projector_id"] = _check(d, "mm_projector_id", str, where, required=False, default="")
        known = {f.name for f in fields(cls)}
        kw["extra"] = {k: v for k, v in d.items() if k not in known}
        args = cls(**kw)
        if args.hidden_size % args.num_attention_heads:
            raise ParamsError("params.json.vision_encoder: hidden_size is not a multiple of num_attention_heads.",
                              key="num_attention_heads")
        if args.head_dim % 4:
            raise ParamsError("params.json.vision_encoder: the 2D RoPE needs head_dim divisible by 4.")
        if args.image_size % args.patch_size:
            raise ParamsError("params.json.vision_encoder: image_size is not a multiple of patch_size.",
                              key="patch_size")
        if args.max_patches_per_side % args.spatial_merge_size:
            raise ParamsError("params.json.vision_encoder: image_size / patch_size is not a multiple of "
                              "spatial_merge_size.", key="spatial_merge_size")
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
        moe = cls(**{k: _check(d, k, int, ".moe", required=True, bounds=b) for k, b in MOE_BOUNDS.items()})
        if moe.num_experts_per_tok > moe.num_experts:
            raise ParamsError("params.json.moe: num_experts_per_tok is larger than num_experts.",
                              key="num_experts_per_tok")
        return moe


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
            kw[k] = _check(d, k, int, "", required=True, bounds=TEXT_BOUNDS[k])
        kw["norm_eps"] = _check(d, "norm_eps", float, "", required=True, bounds=FLOAT_BOUNDS["norm_eps"])
        hd = _check(d, "head_dim", int, "", required=False, bounds=TEXT_BOUNDS["head_dim"])
        if hd is None:  # Mistral 7B's params.json derives it
            if kw["dim"] % kw["n_heads"]:
                raise ParamsError("params.json: 'head_dim' is missing and dim is not a multiple of n_heads.")
            hd = _check({"head_dim": kw["dim"] // kw["n_heads"]}, "head_dim", int, " (dim / n_heads)",
                        required=True, bounds=TEXT_BOUNDS["head_dim"])
        kw["head_dim"] = hd
        kw["rope_theta"] = _check(d, "rope_theta", float, "", required=False, bounds=FLOAT_BOUNDS["rope_theta"])
        for k in ("sliding_window", "max_seq_len", "max_position_embeddings"):
            v = d.get(k)
            kw[k] = None if v is None else _check(d, k, int, "", required=False, bounds=TEXT_BOUNDS[k])
        if d.get("moe") is not None:
            kw["moe"] = MoeArgs.from_dict(d["moe"])
        if d.get("vision_encoder") is not None:
            kw["vision_encoder"] = VisionArgs.from_dict(d["vision_encoder"])
        known = {f.name for f in fields(cls)}
        kw["extra"] = {k: v for k, v in d.items() if k not in known}
        args = cls(**kw)
        if args.n_heads % args.n_kv_heads:
            raise ParamsError("params.json: n_heads must be a multiple of n_kv_heads.", key="n_kv_heads")
        if args.head_dim % 2:
            raise ParamsError("params.json: head_dim must be even (RoPE rotates pairs).", key="head_dim")
        v = args.vision_encoder
        if v is not None:
            for k in ("image_token_id", "image_break_token_id", "image_end_token_id"):
                if getattr(v, k) >= args.vocab_size:
                    raise ParamsError(f"params.json.vision_encoder: {k} {getattr(v, k)} is not below vocab_size "
                                      f"{args.vocab_size}.", key=k)
        n = tensor_count(args)
        if n > MAX_TENSORS:
            raise ParamsError(f"params.json: n_layers, moe.num_experts and vision_encoder.num_hidden_layers imply "
                              f"{n:,d} tensors, over the sane maximum {MAX_TENSORS:,d}.", key="n_layers")
        return args

    @classmethod
    def from_file(cls, path: Path) -> ModelArgs:
        """Parse ``path``, opened with ``read_regular`` (a FIFO, a device or a symlink out of its
        folder is ``HostileContentError``, exit 5; a file over ``MAX_PARAMS_BYTES`` too)."""
        return cls.from_dict(read_params_file(path)[1])

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


def tensor_count(args: ModelArgs) -> int:
    """How many tensors ``tensor_spec`` lists, computed from the counts without building it."""
    per_layer = 6 + (3 if args.moe is None else 1 + 3 * args.moe.num_experts)
    n = 3 + args.n_layers * per_layer
    v = args.vision_encoder
    if v is not None:
        n += 2 + 9 * v.num_hidden_layers + int(v.add_pre_mm_projector_layer_norm) + 2 + 2 * int(v.adapter_bias)
    return n


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


def read_params_file(path: Path) -> tuple[bytes, dict[str, Any]]:
    """A ``params.json``'s bytes and its JSON object, read once with ``read_regular`` (a FIFO, a device
    or a symlink out of its folder is ``HostileContentError``, exit 5; a file over ``MAX_PARAMS_BYTES``
    too); a missing, unreadable or malformed file is a one-line ``ParamsError`` (exit 3)."""
    path = Path(path)
    try:
        raw = read_regular(path, root=path.parent, what="params file", max_bytes=MAX_PARAMS_BYTES)
    except FileNotFoundError:
        raise ParamsError(f"params.json not found: {path}.", path=str(path)) from None
    except OSError as e:
        raise ParamsError(f"Cannot read {path}: {e.strerror or e}.", path=str(path)) from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ParamsError(f"{path} is not UTF-8 text: {e}.", path=str(path)) from None
    except ValueError as e:  # JSONDecodeError, and integers of more than 4,300 digits
        raise ParamsError(f"{path} is not valid JSON: {e}.", path=str(path)) from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path} must hold a JSON object, not {type(data).__name__}.", path=str(path))
    return raw, data
