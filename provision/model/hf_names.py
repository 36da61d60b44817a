"""The Mistral <-> transformers (Llava + Pixtral vision; MistralForCausalLM, MixtralForCausalLM) tensor
names, as data plus small functions.

Mistral ("consolidated") names are the module paths of ``provision.model``; the transformers
names are the legacy on-disk ones (``language_model.model.*``, ``vision_tower.*``...), and reading
also accepts the newer in-memory ones (``model.language_model.*``...). Besides renaming, every q/k
projection is permuted between Mistral's interleaved-pair rotary layout and transformers'
``rotate_half`` layout, on dim 0 only, so the same permutation applies to per-channel scales and
packed quantized rows. ``hf_config`` builds the Llava ``config.json`` and ``args_from_hf_config``
reads one back. No I/O, no quantization; torch only for type checking.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from provision.errors import ConvertError, ParamsError
from provision.formats.params import IMG_TOKEN_ID, ModelArgs

if TYPE_CHECKING:
    import torch

# Module-path renames, Mistral -> transformers (legacy on-disk names). Each pattern matches a
# whole module path (the parameter suffix, e.g. ``.weight`` or ``.weight_scale``, is kept).
MISTRAL_TO_HF_MODULES: tuple[tuple[str, str], ...] = (
    (r"tok_embeddings", r"language_model.model.embed_tokens"),
    (r"norm", r"language_model.model.norm"),
    (r"output", r"language_model.lm_head"),
    (r"layers\.(\d+)\.attention\.wq", r"language_model.model.layers.\1.self_attn.q_proj"),
    (r"layers\.(\d+)\.attention\.wk", r"language_model.model.layers.\1.self_attn.k_proj"),
    (r"layers\.(\d+)\.attention\.wv", r"language_model.model.layers.\1.self_attn.v_proj"),
    (r"layers\.(\d+)\.attention\.wo", r"language_model.model.layers.\1.self_attn.o_proj"),
    (r"layers\.(\d+)\.feed_forward\.w1", r"language_model.model.layers.\1.mlp.gate_proj"),
    (r"layers\.(\d+)\.feed_forward\.w2", r"language_model.model.layers.\1.mlp.down_proj"),
    (r"layers\.(\d+)\.feed_forward\.w3", r"language_model.model.layers.\1.mlp.up_proj"),
    (r"layers\.(\d+)\.attention_norm", r"language_model.model.layers.\1.input_layernorm"),
    (r"layers\.(\d+)\.ffn_norm", r"language_model.model.layers.\1.post_attention_layernorm"),
    (r"vision_encoder\.patch_conv", r"vision_tower.patch_conv"),
    (r"vision_encoder\.ln_pre", r"vision_tower.ln_pre"),
    (r"vision_encoder\.transformer\.layers\.(\d+)\.attention\.wq",
     r"vision_tower.transformer.layers.\1.attention.q_proj"),
    (r"vision_encoder\.transformer\.layers\.(\d+)\.attention\.wk",
     r"vision_tower.transformer.layers.\1.attention.k_proj"),
    (r"vision_encoder\.transformer\.layers\.(\d+)\.attention\.wv",
     r"vision_tower.transformer.layers.\1.attention.v_proj"),
    (r"vision_encoder\.transformer\.layers\.(\d+)\.attention\.wo",
     r"vision_tower.transformer.layers.\1.attention.o_proj"),
    (r"vision_encoder\.transformer\.layers\.(\d+)\.feed_forward\.w1",
     r"vision_tower.transformer.layers.\1.feed_forward.gate_proj"),
    (r"vision_encoder\.transformer\.layers\.(\d+)\.feed_forward\.w2",
     r"vision_tower.transformer.layers.\1.feed_forward.down_proj"),
    (r"vision_encoder\.transformer\.layers\.(\d+)\.feed_forward\.w3",
     r"vision_tower.transformer.layers.\1.feed_forward.up_proj"),
    (r"vision_encoder\.transformer\.layers\.(\d+)\.attention_norm",
     r"vision_tower.transformer.layers.\1.attention_norm"),
    (r"vision_encoder\.transformer\.layers\.(\d+)\.ffn_norm",
     r"vision_tower.transformer.layers.\1.ffn_norm"),
    (r"vision_language_adapter\.w_in", r"multi_modal_projector.linear_1"),
    (r"vision_language_adapter\.w_out", r"multi_modal_projector.linear_2"),
)

# The newer transformers save names (``save_pretrained`` since 4.52) -> the legacy on-disk names.
HF_NEW_TO_LEGACY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
    ("model.", "language_model.model."),  # text-only MistralForCausalLM (``model.layers.*``)
)

_PARAM_SUFFIX = re.compile(r"^(?P<module>.+?)\.(?P<param>[A-Za-z_][A-Za-z0-9_]*)$")


def _invert(pattern: str, repl: str) -> tuple[str, str]:
    """Turn one forward (regex, replacement) pair into its inverse (only ``(\\d+)`` groups)."""
    plain = repl.replace(".", r"\.").replace(r"\1", r"(\d+)")
    back = pattern.replace(r"\.", ".").replace(r"(\d+)", r"\1")
    return plain, back


HF_TO_MISTRAL_MODULES: tuple[tuple[str, str], ...] = tuple(_invert(p, r) for p, r in MISTRAL_TO_HF_MODULES)

_FWD = tuple((re.compile(rf"^{p}$"), r) for p, r in MISTRAL_TO_HF_MODULES)
_BWD = tuple((re.compile(rf"^{p}$"), r) for p, r in HF_TO_MISTRAL_MODULES)


def _split(name: str) -> tuple[str, str]:
    m = _PARAM_SUFFIX.match(name)
    if m is None:
        raise ConvertError(f"Tensor name {name!r} has no parameter suffix; it is not a checkpoint key.", name=name)
    return m.group("module"), m.group("param")


def _rename(name: str, rules: tuple[tuple[re.Pattern[str], str], ...], direction: str) -> str:
    module, param = _split(name)
    for rx, repl in rules:
        if rx.match(module):
            return f"{rx.sub(repl, module)}.{param}"
    raise ConvertError(f"No {direction} key mapping for tensor {name!r}; this is not a Pixtral checkpoint key.",
                       name=name)


def mistral_name_to_hf(name: str) -> str:
    """``layers.0.attention.wq.weight`` -> ``language_model.model.layers.0.self_attn.q_proj.weight``."""
    return _rename(name, _FWD, "Mistral->transformers")


def normalize_hf_name(name: str) -> str:
    """Map the newer transformers names (``model.language_model.*``, ``lm_head.*``) to the legacy ones."""
    for new, legacy in HF_NEW_TO_LEGACY_PREFIXES:
        if name.startswith(new):
            return legacy + name[len(new):]
    return name


_HF_MOE = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.(gate|experts\.\d+\.w[123])\.weight$")


def hf_name_to_mistral(name: str) -> str:
    """The inverse of ``mistral_name_to_hf``; accepts legacy and newer transformers names (and
    Mixtral's ``model.layers.N.block_sparse_moe.{gate,experts.E.wK}``, see provision.model.moe)."""
    m = _HF_MOE.match(name)
    if m:
        return f"layers.{m.group(1)}.feed_forward.{m.group(2)}.weight"
    return _rename(normalize_hf_name(name), _BWD, "transformers->Mistral")


def rope_heads(mistral_name: str, args: ModelArgs) -> int | None:
    """Number of heads to permute for a Mistral q/k projection tensor, None for every other tensor."""
    module, _ = _split(mistral_name)
    if re.fullmatch(r"layers\.\d+\.attention\.wq", module):
        return args.n_heads
    if re.fullmatch(r"layers\.\d+\.attention\.wk", module):
        return args.n_kv_heads
    if re.fullmatch(r"vision_encoder\.transformer\.layers\.\d+\.attention\.w[qk]", module):
        if args.vision_encoder is None:
            raise ConvertError(f"Tensor {mistral_name!r} is a vision tensor but params has no vision_encoder.")
        return args.vision_encoder.num_attention_heads
    return None


def _rows(args: ModelArgs, mistral_name: str, n_heads: int) -> int:
    if mistral_name.startswith("vision_encoder.") and args.vision_encoder is not None:
        return n_heads * args.vision_encoder.head_dim
    return n_heads * args.head_dim


def permute_to_hf(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved rotary pairs (Mistral) -> ``rotate_half`` halves (transformers), along dim 0."""
    rows = t.shape[0]
    if rows % (2 * n_heads):
        raise ConvertError(f"Cannot permute a q/k tensor with {rows} rows over {n_heads} heads.")
    rest = tuple(t.shape[1:])
    return t.reshape(n_heads, rows // n_heads // 2, 2, *rest).transpose(1, 2).reshape(t.shape).contiguous()


def permute_to_mistral(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``permute_to_hf``."""
    rows = t.shape[0]
    if rows % (2 * n_heads):
        raise ConvertError(f"Cannot permute a q/k tensor with {rows} rows over {n_heads} heads.")
    rest = tuple(t.shape[1:])
    return t.reshape(n_heads, 2, rows // n_heads // 2, *rest).transpose(1, 2).reshape(t.shape).contiguous()


def _needs_permute(t: torch.Tensor, mistral_name: str, args: ModelArgs) -> int | None:
    heads = rope_heads(mistral_name, args)
    if heads is None or t.ndim == 0 or t.numel() == 1:
        return None  # per-tensor scalars (scales) have no rows to permute
    if t.shape[0] != _rows(args, mistral_name, heads):
        return None  # e.g. a scale with one row per group of columns: not indexed by output row
    return heads


def mistral_to_hf(name: str, tensor: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    """One Mistral tensor -> its transformers (legacy on-disk) name and layout."""
    new = mistral_name_to_hf(name)
    heads = _needs_permute(tensor, name, args)
    return new, (permute_to_hf(tensor, heads) if heads is not None else tensor)


def hf_to_mistral(name: str, tensor: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    """One transformers tensor (legacy or newer name) -> its Mistral name and layout."""
    new = hf_name_to_mistral(name)
    heads = _needs_permute(tensor, new, args)
    return new, (permute_to_mistral(tensor, heads) if heads is not None else tensor)


# ---------------------------------------------------------------------------------------
# config.json


def _mistral_text_config(args: ModelArgs, *, default_positions: int) -> dict[str, Any]:
    """transformers' ``MistralConfig`` fields for the decoder (shared by Llava and text-only)."""
    theta = args.rope_theta_value
    return {
        "model_type": "mistral",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_position_embeddings or args.max_seq_len or default_positions,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "sliding_window": args.sliding_window,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def hf_config(args: ModelArgs, *, dtype: str = "bfloat16") -> dict[str, Any]:
    """transformers' ``LlavaConfig`` (Mistral text + Pixtral vision) as a ``config.json`` dict."""
    v = args.vision_encoder
    if v is None:
        raise ConvertError("params.json has no vision_encoder: this key map is for Pixtral (Llava) checkpoints.")
    text = _mistral_text_config(args, default_positions=1024000)
    vision: dict[str, Any] = {
        "model_type": "pixtral",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_hidden_layers,
        "num_attention_heads": v.num_attention_heads,
        "num_channels": v.num_channels,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "head_dim": v.head_dim,
        "hidden_act": "silu",
        "rope_theta": v.rope_theta,
        "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
    }
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": v.image_token_id,
        "image_seq_length": 1,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "multimodal_projector_bias": v.adapter_bias,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "text_config": text,
        "vision_config": vision,
    }


# What transformers' config classes fill in for a key a config.json leaves out (MistralConfig,
# MixtralConfig, PixtralVisionConfig): published configs rely on them (mistral-community/pixtral-12b
# omits the vision encoder's sizes and the decoder's head count), so a reader must too.
MISTRAL_DEFAULTS: dict[str, Any] = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 32000, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
}
MIXTRAL_DEFAULTS: dict[str, Any] = {**MISTRAL_DEFAULTS, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
                                    "num_local_experts": 8, "num_experts_per_tok": 2}
PIXTRAL_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_channels": 3, "image_size": 1024, "patch_size": 16, "rope_theta": 10000.0,
}


def _with_defaults(d: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``d`` with each key it leaves out taken from ``defaults`` (a key set to null stays null)."""
    return {**defaults, **d}


def _get(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ParamsError(f"config.json{where}: required key {key!r} is missing.", key=key)
    return d[key]


def _positive_int(d: dict[str, Any], key: str, where: str) -> int:
    """``d[key]`` when it is an int >= 1 (a divisor below): else a one-line ParamsError naming it."""
    v = _get(d, key, where)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ParamsError(f"config.json{where}: {key!r} must be a whole number >= 1, got {v!r}.", key=key)
    return v


def _finite(v: Any, key: str, where: str) -> float:
    """``v`` as a finite float: else a one-line ParamsError naming ``key`` (never OverflowError)."""
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        f = math.nan
    if isinstance(v, bool) or not math.isfinite(f):
        raise ParamsError(f"config.json{where}: {key!r} must be a finite number, got {v!r:.40}.", key=key)
    return f


def _theta(d: dict[str, Any], default: float, where: str = "") -> float:
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        return _finite(rp["rope_theta"], "rope_parameters.rope_theta", where)
    if "rope_theta" in d:
        return _finite(d["rope_theta"], "rope_theta", where)
    return default


def _decoder_params(t: dict[str, Any], where: str) -> dict[str, Any]:
    """params.json's decoder keys from a ``MistralConfig`` dict (``where`` names it in errors)."""
    hidden = _positive_int(t, "hidden_size", where)
    heads = _positive_int(t, "num_attention_heads", where)
    return {
        "dim": hidden,
        "n_layers": _get(t, "num_hidden_layers", where),
        "head_dim": t.get("head_dim") or hidden // heads,
        "hidden_dim": _get(t, "intermediate_size", where),
        "n_heads": heads,
        "n_kv_heads": _get(t, "num_key_value_heads", where) or heads,  # null: one kv head per head
        "rope_theta": _theta(t, 10000.0, where),
        "norm_eps": _get(t, "rms_norm_eps", where),
        "vocab_size": _get(t, "vocab_size", where),
    }


def args_from_hf_config(cfg: dict[str, Any]) -> ModelArgs:
    """A Llava (Mistral text + Pixtral vision) or text-only Mistral ``config.json`` dict -> ``ModelArgs``."""
    if not isinstance(cfg, dict):
        raise ParamsError("config.json must be a JSON object.")
    if "text_config" not in cfg and "vision_config" not in cfg:
        return args_from_hf_text_config(cfg)
    t = _get(cfg, "text_config", "")
    vc = _get(cfg, "vision_config", "")
    if not isinstance(t, dict) or not isinstance(vc, dict):
        raise ParamsError("config.json: text_config and vision_config must be objects.")
    t, vc = _with_defaults(t, MISTRAL_DEFAULTS), _with_defaults(vc, PIXTRAL_VISION_DEFAULTS)
    vh = _get(vc, "hidden_size", ".vision_config")
    vheads = _positive_int(vc, "num_attention_heads", ".vision_config")
    d: dict[str, Any] = {
        **_decoder_params(t, ".text_config"),
        "vision_encoder": {
            "hidden_size": vh,
            "num_channels": vc.get("num_channels", 3),
            "image_size": vc.get("image_size", 1024),
            "patch_size": vc.get("patch_size", 16),
            "rope_theta": _theta(vc, 10000.0, ".vision_config"),
            "intermediate_size": _get(vc, "intermediate_size", ".vision_config"),
            "num_hidden_layers": _get(vc, "num_hidden_layers", ".vision_config"),
            "num_attention_heads": vheads,
            "image_token_id": cfg.get("image_token_index", IMG_TOKEN_ID),
            "adapter_bias": bool(cfg.get("multimodal_projector_bias", True)),
        },
    }
    if t.get("sliding_window") is not None:
        d["sliding_window"] = t["sliding_window"]
    if t.get("max_position_embeddings") is not None:
        d["max_position_embeddings"] = t["max_position_embeddings"]
    return ModelArgs.from_dict(d)


# ---------------------------------------------------------------------------------------
# text-only Mistral (MistralForCausalLM: Mistral 7B, NeMo): ``model.*`` and ``lm_head`` names,
# the same q/k permutation. Reading goes through ``hf_to_mistral`` (``model.`` is normalized).


def mistral_name_to_hf_text(name: str) -> str:
    """``layers.0.attention.wq.weight`` -> ``model.layers.0.self_attn.q_proj.weight`` (MistralForCausalLM)."""
    legacy = mistral_name_to_hf(name)
    for head, repl in (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")):
        if legacy.startswith(head):
            return repl + legacy[len(head):]
    raise ConvertError(f"Tensor {name!r} is not a text-decoder tensor; MistralForCausalLM has no vision part.",
                       name=name)


def mistral_to_hf_text(name: str, tensor: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    """One Mistral decoder tensor -> its ``MistralForCausalLM`` name and layout."""
    new = mistral_name_to_hf_text(name)
    heads = _needs_permute(tensor, name, args)
    return new, (permute_to_hf(tensor, heads) if heads is not None else tensor)


def hf_text_config(args: ModelArgs, *, dtype: str = "bfloat16") -> dict[str, Any]:
    """transformers' ``MistralConfig`` for a text-only model as a ``config.json`` dict.

    ``rope_theta`` is written out (10000 for a params.json without it, as Mistral 7B v0.1 means);
    ``sliding_window`` is copied (None: full attention)."""
    if args.vision_encoder is not None:
        raise ConvertError("params.json has a vision_encoder: use hf_config (Llava) for Pixtral checkpoints.")
    if args.moe is not None:
        raise ConvertError("params.json describes a mixture-of-experts model; MistralForCausalLM is dense.")
    return {"architectures": ["MistralForCausalLM"], **_mistral_text_config(args, default_positions=32768),
            "torch_dtype": dtype}


def args_from_hf_text_config(t: dict[str, Any]) -> ModelArgs:
    """A text-only ``MistralForCausalLM`` ``config.json`` dict -> ``ModelArgs`` (no vision_encoder)."""
    if not isinstance(t, dict):
        raise ParamsError("config.json must be a JSON object.")
    mt = t.get("model_type")
    if mt is not None and mt not in ("mistral", "mixtral"):
        raise ParamsError(f"config.json: model_type {mt!r} is not a Mistral text model (expected 'mistral').")
    t = _with_defaults(t, MIXTRAL_DEFAULTS if mt == "mixtral" else MISTRAL_DEFAULTS)
    d: dict[str, Any] = _decoder_params(t, "")
    if t.get("sliding_window") is not None:
        d["sliding_window"] = t["sliding_window"]
    if t.get("max_position_embeddings") is not None:
        d["max_position_embeddings"] = t["max_position_embeddings"]
    if mt == "mixtral":  # MixtralForCausalLM (provision.model.moe)
        d["moe"] = {"num_experts": _get(t, "num_local_experts", ""),
                    "num_experts_per_tok": _get(t, "num_experts_per_tok", "")}
    return ModelArgs.from_dict(d)
