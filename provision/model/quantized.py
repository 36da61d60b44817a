"""Run compressed-tensors checkpoints in our model: quantized Linear layers.

``apply_quantization`` reads a ``quantization_config`` and replaces every ``nn.Linear`` whose
quantized parts are in the given tensors (keyed by our Mistral names or by the file's
transformers names) by a ``QuantLinear`` that keeps the stored form as buffers named as the
checkpoint names them, so a later strict ``load_state_dict`` matches.

Two kernels. FP8_DYNAMIC layers (fp8 E4M3 weights with per-channel scales, activations
quantized per token at run time) on a GPU of compute capability >= 8.9 (Ada, Hopper) run
``torch._scaled_mm``: the activations are quantized per token to fp8 (``quantize_fp8_per_token``),
multiplied with the fp8 weight on the fp8 tensor cores with fp32 accumulation, and the result is
rescaled by both scales in the kernel's epilogue (``fp8_scaled_mm``). Everywhere else (older
GPUs, the CPU, int schemes, float32 activations on a GPU) each forward dequantizes the weight
(one layer at a time) and calls ``F.linear`` on the same fake-quantized activations. Both compute
the same products of fp8 values; they differ by the order of the fp32 sums and the output's
rounding. No weight loading here.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from provision import quant
from provision.errors import ConvertError
from provision.model import hf_names

_PARTS = {"float": ("weight", "weight_scale"), "int": ("weight_packed", "weight_scale", "weight_shape")}
Fp8Kernel = Literal["auto", "scaled_mm", "dequant"]
FP8_KERNELS: tuple[str, ...] = ("auto", "scaled_mm", "dequant")
SCALED_MM_MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (8.9) and Hopper (9.0) onwards


def _dynamic_token_fp8(config: Mapping[str, Any]) -> bool:
    qc = config.get("quantization_config", config)
    groups = qc.get("config_groups") or {} if isinstance(qc, Mapping) else {}
    for g in groups.values():
        a = g.get("input_activations") if isinstance(g, Mapping) else None
        if isinstance(a, Mapping) and a.get("type") == "float" and a.get("num_bits") == 8 and a.get("dynamic") \
                and a.get("strategy") == "token":
            return True
    return False


_SCALE_MIN = float(torch.finfo(torch.float32).tiny)  # an all-zero token still gets a usable scale


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as float8 E4M3 with one float32 scale per token (last dim): ``(q, scale)``, ``scale`` with a
    trailing dimension of 1, ``q * scale`` approximating ``x``. Both kernels use it. Four kernels on a
    GPU (max, scale, divide, cast): the scale is at least amax / 448 up to one rounding, so
    ``|x / scale|`` stays below 464, which E4M3's cast rounds to 448: no clamp is needed."""
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    scale = amax.div_(quant.FP8_MAX).clamp_(min=_SCALE_MIN)
    q = (x / scale).to(torch.float8_e4m3fn)
    return q, scale


def fake_quant_fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize ``x`` to float8 E4M3 with one scale per token (last dim), in ``x``'s dtype."""
    q, scale = quantize_fp8_per_token(x)
    return (q.float() * scale).to(x.dtype)


# The last activation quantized for the fp8 kernel. wk/wv read the very tensor wq just read (and w3
# the one w1 read), so ``apply_quantization`` marks them ``reuse_input`` and they take its fp8 form
# instead of quantizing it again. Holding ``x`` keeps its id unique; an in-place change bumps its
# version (inference tensors have none: the model never changes an input between those siblings).
_last_input: list[tuple[torch.Tensor, int | None, int, torch.Tensor, torch.Tensor] | None] = [None]


def _version(x: torch.Tensor) -> int | None:
    return None if x.is_inference() else int(x._version)


def _quantized_input(x: torch.Tensor, reuse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    hit = _last_input[0]
    if reuse and hit is not None and hit[0] is x and hit[1] == _version(x) and hit[2] == x.data_ptr():
        return hit[3], hit[4]
    q, s = quantize_fp8_per_token(x.reshape(-1, x.shape[-1]))
    _last_input[0] = (x, _version(x), x.data_ptr(), q, s)
    return q, s


def fp8_scaled_mm(x: torch.Tensor, weight: torch.Tensor, scale_row: torch.Tensor,
                  bias: torch.Tensor | None = None, *, reuse_input: bool = False) -> torch.Tensor:
    """``F.linear`` of fp8-quantized-per-token ``x`` with the fp8 ``weight`` [out, in] through
    ``torch._scaled_mm``: fp8 x fp8 products summed in fp32, scaled by the token scales and
    ``scale_row`` (float32, [1, out], the per-channel weight scales), returned in ``x``'s dtype.
    ``reuse_input``: take the fp8 form of ``x`` the previous call made when it was this same tensor."""
    shape = x.shape
    q, s = _quantized_input(x, reuse_input)
    w = weight if weight.is_contiguous() else weight.contiguous()  # .t() must be column-major
    out = torch._scaled_mm(q, w.t(), scale_a=s, scale_b=scale_row, out_dtype=x.dtype)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*shape[:-1], weight.shape[0])


@functools.lru_cache(maxsize=16)
def _cuda_capability(index: int) -> tuple[int, int]:
    major, minor = torch.cuda.get_device_capability(index)
    return int(major), int(minor)


# GPUs (by index) whose torch refused the row-wise scaled fp8 GEMM at run time: ``auto`` falls back there
SCALED_MM_REFUSED: dict[int, str] = {}


def scaled_mm_supported(device: torch.device, dtype: torch.dtype, in_features: int, out_features: int) -> bool:
    """Whether ``auto`` picks ``torch._scaled_mm`` for an fp8 layer on ``device`` with ``dtype`` activations:
    a CUDA GPU of compute capability >= 8.9, bf16 activations (the dtype row-wise scaled fp8 GEMMs
    write), both dimensions multiples of 16 (the kernels' requirement), and no earlier refusal there."""
    if device.type != "cuda" or dtype != torch.bfloat16 or in_features % 16 or out_features % 16:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return index not in SCALED_MM_REFUSED and _cuda_capability(index) >= SCALED_MM_MIN_CAPABILITY


def scheme_from_config(config: Mapping[str, Any]) -> str:
    """``fp8`` / ``w8a16`` / ``w4a16`` from a compressed-tensors ``quantization_config``."""
    qc = config.get("quantization_config", config)
    if not isinstance(qc, Mapping) or qc.get("quant_method") not in (None, "compressed-tensors"):
        raise ConvertError("config.json has a quantization_config this runtime does not know "
                           f"(quant_method {qc.get('quant_method') if isinstance(qc, Mapping) else None!r}); "
                           "only compressed-tensors fp8/int8/int4 checkpoints are supported.")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise ConvertError(f"quantization_config has {len(groups)} config groups; exactly one is supported.")
    w = next(iter(groups.values())).get("weights") or {}
    kind, bits = w.get("type"), w.get("num_bits")
    fmt = qc.get("format")
    if kind == "float" and bits == 8 and w.get("strategy") == "channel" and fmt == "float-quantized":
        return "fp8"
    if kind == "int" and w.get("symmetric", True) and w.get("strategy") == "group" and \
            w.get("group_size") == quant.GROUP_SIZE and fmt == "pack-quantized" and bits in (4, 8):
        return "w8a16" if bits == 8 else "w4a16"
    raise ConvertError(f"Unsupported compressed-tensors scheme (format {fmt!r}, weights {kind} {bits}-bit "
                       f"{w.get('strategy')}); supported: fp8 channel, int8/int4 group 128 symmetric.")


class QuantLinear(nn.Module):
    """A Linear whose weight lives in compressed-tensors form and is dequantized at each call."""

    def __init__(self, in_features: int, out_features: int, scheme: str, parts: Mapping[str, torch.Tensor],
                 bias: torch.Tensor | None = None, *, quantize_inputs: bool = False,
                 fp8_kernel: Fp8Kernel = "auto") -> None:
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.quantize_inputs = quantize_inputs
        if fp8_kernel not in FP8_KERNELS:
            raise ValueError(f"fp8_kernel must be one of {', '.join(FP8_KERNELS)}, got {fp8_kernel!r}")
        self.fp8_kernel: Fp8Kernel = fp8_kernel
        self.last_kernel: str | None = None  # which kernel the last forward ran ("scaled_mm" / "dequant")
        self.reuse_input = False  # set by apply_quantization on wk/wv/w3 (see _last_input)
        self._scale_row: tuple[torch.Tensor, torch.Tensor] | None = None  # (weight_scale, its float32 [1, out])
        self.spec = quant.SCHEMES[scheme]
        for k in _PARTS[self.spec.kind]:
            if k not in parts:
                raise ConvertError(f"Quantized layer is missing its {k!r} tensor.")
            self.register_buffer(k, parts[k])
        self.bias: torch.Tensor | None
        if bias is not None:
            self.bias = nn.Parameter(bias, requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._check()

    def _check(self) -> None:
        scale = self.get_buffer("weight_scale")
        if self.spec.kind == "float":
            w = self.get_buffer("weight")
            ok = tuple(w.shape) == (self.out_features, self.in_features) and tuple(scale.shape) == (self.out_features, 1)
        else:
            p = self.get_buffer("weight_packed")
            ok = (tuple(p.shape) == (self.out_features, self.spec.packed_cols(self.in_features))
                  and tuple(scale.shape) == (self.out_features, self.spec.scale_cols(self.in_features)))
        if not ok:
            raise ConvertError(f"Quantized tensors do not fit a {self.in_features}->{self.out_features} Linear "
                               f"({self.scheme}).")

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale = self.get_buffer("weight_scale")
        if self.spec.kind == "float":
            return quant.dequantize_fp8(self.get_buffer("weight"), scale, dtype)
        q = quant.unpack_int32(self.get_buffer("weight_packed"), self.spec.num_bits, self.in_features)
        return quant.dequantize_int(q, scale, self.spec.group_size or quant.GROUP_SIZE, dtype)

    def uses_scaled_mm(self, x: torch.Tensor) -> bool:
        """Whether a forward on ``x`` runs ``torch._scaled_mm`` (FP8_DYNAMIC layers only; ``scaled_mm``
        forces it on any device whose torch has the kernel, ``dequant`` never, ``auto`` where supported)."""
        if self.spec.kind != "float" or not self.quantize_inputs or self.fp8_kernel == "dequant":
            return False
        if self.fp8_kernel == "scaled_mm":
            return True
        return scaled_mm_supported(x.device, x.dtype, self.in_features, self.out_features)

    def scale_row(self) -> torch.Tensor:
        """The per-channel weight scales as float32 [1, out] (what ``_scaled_mm`` takes), cached per buffer."""
        scale = self.get_buffer("weight_scale")
        if self._scale_row is None or self._scale_row[0] is not scale:
            self._scale_row = (scale, scale.float().reshape(1, -1).contiguous())
        return self._scale_row[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_scaled_mm(x):
            try:
                out = fp8_scaled_mm(x, self.get_buffer("weight"), self.scale_row(), self.bias,
                                    reuse_input=self.reuse_input)
            except RuntimeError as e:  # a torch build without the row-wise kernel for this GPU
                if self.fp8_kernel != "auto" or isinstance(e, torch.OutOfMemoryError):
                    raise
                SCALED_MM_REFUSED[x.device.index or 0] = f"{type(e).__name__}: {str(e)[:300]}"
            else:
                self.last_kernel = "scaled_mm"
                return out
        self.last_kernel = "dequant"
        w = self.dequantized_weight(x.dtype)
        if self.quantize_inputs:
            x = fake_quant_fp8_per_token(x)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, "
                f"quantize_inputs={self.quantize_inputs}, fp8_kernel={self.fp8_kernel}")


def _parts_for(module_name: str, tensors: Mapping[str, torch.Tensor], names: tuple[str, ...],
               args: Any) -> dict[str, torch.Tensor] | None:
    """The quantized parts of one module, by our name or (mapped and un-permuted) by its transformers name."""
    if all(f"{module_name}.{k}" in tensors for k in names):
        return {k: tensors[f"{module_name}.{k}"] for k in names}
    try:
        hf = hf_names.mistral_name_to_hf(module_name + ".weight")[: -len(".weight")]
    except ConvertError:  # a module transformers has no name for: it has no quantized parts either
        return None
    cands = [hf] + [new + hf[len(old):] for new, old in hf_names.HF_NEW_TO_LEGACY_PREFIXES if hf.startswith(old)]
    for base in cands:
        if all(f"{base}.{k}" in tensors for k in names):
            if args is None:
                raise ConvertError("Quantized tensors keyed by transformers names need the model's args "
                                   "(model.args) to undo the q/k permutation.")
            out = {}
            for k in names:
                _, t = hf_names.hf_to_mistral(f"{base}.{k}", tensors[f"{base}.{k}"], args)
                out[k] = t
            return out
    return None


def apply_quantization(model: nn.Module, config: Mapping[str, Any] | None,
                       tensors: Mapping[str, torch.Tensor], *, fp8_kernel: Fp8Kernel = "auto") -> None:
    """Swap every quantized ``nn.Linear`` of ``model`` for a ``QuantLinear`` holding its stored parts.

    Modules without quantized parts in ``tensors`` (the ignore list: vision tower, projector,
    lm_head, odd shapes) stay as they are. ``fp8_kernel`` picks the FP8_DYNAMIC kernel (module
    docstring; ``set_fp8_kernel`` changes it later). Raises ``ConvertError`` (exit 7) for an unknown
    scheme or when the config says quantized but no layer has quantized tensors.
    """
    if not config:
        raise ConvertError("apply_quantization needs the checkpoint's config.json (its quantization_config).")
    scheme = scheme_from_config(config)
    act_q = scheme == "fp8" and _dynamic_token_fp8(config)
    names = _PARTS[quant.SCHEMES[scheme].kind]
    args = getattr(model, "args", None)
    swaps: list[tuple[str, nn.Linear, dict[str, torch.Tensor]]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            parts = _parts_for(name, tensors, names, args)
            if parts is not None:
                swaps.append((name, mod, parts))
    if not swaps:
        raise ConvertError("config.json declares a quantization_config but no layer has quantized tensors.")
    for name, mod, parts in swaps:
        bias = tensors.get(f"{name}.bias") if mod.bias is not None else None
        if mod.bias is not None and bias is None:
            bias = mod.bias if mod.bias.device.type != "meta" else torch.zeros(mod.out_features)
        new = QuantLinear(mod.in_features, mod.out_features, scheme, parts, bias, quantize_inputs=act_q,
                          fp8_kernel=fp8_kernel)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    for name, _mod, _parts in swaps:  # siblings called right after one that read the same input
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        first = _FIRST_READER.get(child)
        if first is not None and isinstance(getattr(parent, first, None), QuantLinear):
            new = getattr(parent, child)
            assert isinstance(new, QuantLinear)
            new.reuse_input = True


# Attention: wq(x), wk(x), wv(x); FeedForward: w2(silu(w1(x)) * w3(x)) (provision.model.layers)
_FIRST_READER = {"wk": "wq", "wv": "wq", "w3": "w1"}


def quantized_modules(model: nn.Module) -> list[str]:
    """Names of the ``QuantLinear`` layers in ``model``."""
    return [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def set_fp8_kernel(model: nn.Module, kernel: Fp8Kernel) -> int:
    """Set the fp8 kernel (``auto`` / ``scaled_mm`` / ``dequant``) of every ``QuantLinear``; how many."""
    if kernel not in FP8_KERNELS:
        raise ValueError(f"fp8 kernel must be one of {', '.join(FP8_KERNELS)}, got {kernel!r}")
    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.fp8_kernel = kernel
            n += 1
    return n


def kernels_used(model: nn.Module) -> dict[str, int]:
    """How many ``QuantLinear`` layers ran each kernel in their last forward (``{"scaled_mm": 280}``)."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.last_kernel is not None:
            out[m.last_kernel] = out.get(m.last_kernel, 0) + 1
    return out
