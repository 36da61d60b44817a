"""The profile table: which (scheme, layout, GPU count) a target can run, what it needs, what fits.

A profile is a ``scheme`` (bf16, fp16, fp8, w8a16, w4a16), a ``layout`` (mistral, hf) and a GPU
count; it needs, per device, (weights + KV cache for ``context`` tokens) x 1.1, split evenly. The
rules follow vLLM's kernels: 16-bit activations are bf16 from compute capability 8.0 (fp16
below, where ``bf16`` cannot run); ``fp8`` (FP8_DYNAMIC) runs W8A8 from 8.9 and weight-only from
8.0; the ``mistral`` layout takes only casts, ``hf`` every scheme. ``auto`` takes the first scheme
of the target's preference list that fits, on the fewest GPUs. Only the decoder's Linear weights
are quantized (``quantized_tensor``). Pure: no torch, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

from provision.errors import GPUMemoryError, ManifestError, UsageError
from provision.formats.params import ModelArgs, tensor_spec
from provision.hardware import Target

Scheme = Literal["bf16", "fp16", "fp8", "w8a16", "w4a16"]
LayoutName = Literal["mistral", "hf"]
SCHEMES: tuple[Scheme, ...] = get_args(Scheme)
CASTS: tuple[Scheme, ...] = ("bf16", "fp16")
QUANTIZED: tuple[Scheme, ...] = ("fp8", "w8a16", "w4a16")
LAYOUTS: tuple[LayoutName, ...] = get_args(LayoutName)
DEFAULT_CONTEXT = 32768
OVERHEAD = 1.10
GROUP_SIZE = 128

_DECODER_LINEAR = (".attention.wq.weight", ".attention.wk.weight", ".attention.wv.weight",
                   ".attention.wo.weight", ".w1.weight", ".w2.weight", ".w3.weight")


def quantized_tensor(name: str, shape: tuple[int, ...], scheme: str = "w4a16") -> bool:
    """Whether a Mistral-named tensor is quantized under ``scheme`` (decoder Linears only; the int
    schemes also need in_features divisible by the group size, fp8 by 16 as vLLM's kernels do)."""
    if scheme not in QUANTIZED or not name.startswith("layers.") or len(shape) != 2:
        return False
    need = 16 if scheme == "fp8" else GROUP_SIZE
    return name.endswith(_DECODER_LINEAR) and shape[1] % need == 0 and shape[0] % 16 == 0


def activation_dtype(target: Target) -> str:
    """``bfloat16`` on the CPU and compute capability >= 8.0, ``float16`` below."""
    if target.compute_capability is None or target.compute_capability >= (8, 0):
        return "bfloat16"
    return "float16"


def default_layout(scheme: str) -> str:
    return "mistral" if scheme in CASTS else "hf"


def parse_scheme(name: str) -> Scheme:
    """``name`` as a ``Scheme``; ``UsageError`` (exit 2) naming the choices otherwise."""
    for s in SCHEMES:
        if s == name:
            return s
    raise UsageError(f"Unknown scheme {name!r}: use one of auto, {', '.join(SCHEMES)}.", scheme=name)


def parse_layout(name: str) -> LayoutName:
    """``name`` as a ``LayoutName``; ``UsageError`` (exit 2) naming the choices otherwise."""
    for lay in LAYOUTS:
        if lay == name:
            return lay
    raise UsageError(f"Unknown layout {name!r}: use one of {', '.join(LAYOUTS)}.", layout=name)


def support(scheme: str, target: Target) -> tuple[bool, str]:
    """(can the target run the scheme, how or why not)."""
    cc = target.compute_capability
    parse_scheme(scheme)
    if cc is None:
        return True, "CPU: our runtime dequantizes on the fly" if scheme in QUANTIZED else "CPU"
    if scheme == "bf16":
        return (True, "bf16") if cc >= (8, 0) else (False, f"bf16 needs compute capability 8.0; {target.sm} runs fp16")
    if scheme == "fp16":
        return True, "fp16"
    if scheme == "fp8":
        if cc >= (8, 9):
            return True, "FP8_DYNAMIC: fp8 weights and per-token fp8 activations"
        if cc >= (8, 0):
            return True, f"fp8 weights, 16-bit activations (weight-only fp8 kernel on {target.sm})"
        return False, f"fp8 needs compute capability 8.0 (weight-only) or 8.9 (W8A8); {target.sm} has neither"
    if cc < (7, 0):
        return False, f"vLLM needs compute capability 7.0; {target.sm} is older"
    return True, f"weight-only int{8 if scheme == 'w8a16' else 4}, group {GROUP_SIZE}"


def preference(target: Target) -> tuple[str, ...]:
    """Schemes ``auto`` tries, best first."""
    cc = target.compute_capability
    if cc is None:
        return ("bf16", "w8a16", "w4a16")
    if cc >= (8, 9):
        return ("fp8", "bf16", "w8a16", "w4a16")
    if cc >= (8, 0):
        return ("bf16", "w8a16", "w4a16")
    return ("fp16", "w8a16", "w4a16")


def _dtype_bytes(dtype: str) -> int:
    return 2 if dtype in ("bfloat16", "float16") else 4


def tensor_bytes(name: str, shape: tuple[int, ...], scheme: str, act_bytes: int = 2) -> int:
    """Bytes one Mistral-named tensor takes on disk and in GPU memory under ``scheme``."""
    n = math.prod(shape)
    if scheme in CASTS or not quantized_tensor(name, shape, scheme):
        return n * act_bytes
    rows, cols = shape
    if scheme == "fp8":
        return n + rows * act_bytes  # float8 weight + one scale per row
    bits = 8 if scheme == "w8a16" else 4
    return n * bits // 8 + rows * (cols // GROUP_SIZE) * act_bytes + 16  # packed + group scales + shape


def weight_bytes(args: ModelArgs, scheme: str, act_bytes: int = 2) -> int:
    return sum(tensor_bytes(k, s, scheme, act_bytes) for k, s in tensor_spec(args).items())


def kv_cache_bytes(args: ModelArgs, context: int, act_bytes: int = 2) -> int:
    """K and V for every decoder layer, ``context`` tokens, batch 1."""
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * context * act_bytes


@dataclass(frozen=True)
class Profile:
    scheme: Scheme
    layout: LayoutName
    gpus: int
    activation_dtype: str
    weight_bytes: int
    kv_bytes: int
    need_bytes: int  # per device, with the overhead
    available_bytes: int  # per device
    runnable: bool
    fits: bool
    how: str  # how the target runs it, or why it cannot

    @property
    def ok(self) -> bool:
        return self.runnable and self.fits

    @property
    def name(self) -> str:
        """Folder name of the conversion, e.g. ``fp8-hf`` or ``bf16-mistral`` (``-tp2`` when split)."""
        return f"{self.scheme}-{self.layout}" + (f"-tp{self.gpus}" if self.gpus > 1 else "")

    @property
    def why_not(self) -> str | None:
        if not self.runnable:
            return self.how
        if not self.fits:
            return (f"needs {self.need_bytes / 2**30:.1f} GiB per device, "
                    f"{self.available_bytes / 2**30:.1f} GiB available")
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "scheme": self.scheme, "layout": self.layout, "gpus": self.gpus,
                "activation_dtype": self.activation_dtype, "weight_bytes": self.weight_bytes,
                "kv_bytes": self.kv_bytes, "need_bytes": self.need_bytes,
                "available_bytes": self.available_bytes, "runnable": self.runnable, "fits": self.fits,
                "ok": self.ok, "how": self.how, "why_not": self.why_not}


def _tp_sizes(args: ModelArgs, count: int) -> list[int]:
    return [n for n in (1, 2, 4, 8) if n <= max(count, 1) and args.n_kv_heads % n == 0 and args.n_heads % n == 0]


def profile(args: ModelArgs, target: Target, scheme: str, layout: str | None = None, *, gpus: int = 1,
            context: int = DEFAULT_CONTEXT) -> Profile:
    """The memory figure and verdict of one (scheme, layout, gpus) on ``target``."""
    lay = layout or default_layout(scheme)
    act = {"bf16": "bfloat16", "fp16": "float16"}.get(scheme) or activation_dtype(target)
    ab = _dtype_bytes(act)
    runnable, how = support(scheme, target)
    if lay == "mistral" and scheme in QUANTIZED:
        runnable, how = False, "the mistral layout carries only casts (bf16, fp16); quantized schemes need --layout hf"
    elif lay == "hf" and args.moe is not None and scheme in QUANTIZED:
        # MixtralForCausalLM is written in 16 bits; our runtime does not load quantized experts yet
        runnable, how = False, "a mixture of experts converts to the hf layout in bf16/fp16 only; quantized experts are not supported yet"
    if scheme == "fp16" and act == "bfloat16" and target.compute_capability is not None:
        how = "fp16 (bf16 is native here)"
    w = weight_bytes(args, scheme, ab)
    kv = kv_cache_bytes(args, context, ab)
    need = math.ceil((w + kv) * OVERHEAD / gpus)
    return Profile(scheme=parse_scheme(scheme), layout=parse_layout(lay), gpus=gpus, activation_dtype=act, weight_bytes=w, kv_bytes=kv,
                   need_bytes=need, available_bytes=target.memory_bytes, runnable=runnable,
                   fits=need <= target.memory_bytes, how=how)


def candidates(args: ModelArgs, target: Target, *, context: int = DEFAULT_CONTEXT) -> list[Profile]:
    """Every (scheme, layout, gpus) combination worth showing, in a stable order."""
    out = []
    for n in _tp_sizes(args, target.count):
        for scheme in SCHEMES:
            for lay in (("mistral", "hf") if scheme in CASTS else ("hf",)):
                out.append(profile(args, target, scheme, lay, gpus=n, context=context))
    return out


def _first_fit(args: ModelArgs, target: Target, schemes: tuple[str, ...], layout: str | None,
               context: int) -> Profile | None:
    for scheme in schemes:
        if layout == "mistral" and scheme in QUANTIZED:
            continue
        for n in _tp_sizes(args, target.count):
            p = profile(args, target, scheme, layout, gpus=n, context=context)
            if p.ok:
                return p
    return None


def choose(args: ModelArgs, target: Target, scheme: str = "auto", layout: str | None = None, *,
           context: int = DEFAULT_CONTEXT) -> Profile:
    """The profile to convert to, or a typed error before any work.

    Unknown scheme or layout -> ``UsageError`` (2); quantized scheme with the mistral layout,
    or a scheme the target cannot run -> ``ManifestError`` (3) naming one that works;
    nothing fits -> ``GPUMemoryError`` (6) with the numbers.
    """
    if context < 1:
        raise UsageError(f"--context must be at least 1 token, got {context}.")
    if layout is not None and layout not in LAYOUTS:
        raise UsageError(f"Unknown layout {layout!r}: use mistral or hf.", layout=layout)
    if scheme != "auto" and scheme not in SCHEMES:
        raise UsageError(f"Unknown scheme {scheme!r}: use one of auto, {', '.join(SCHEMES)}.", scheme=scheme)
    if scheme in QUANTIZED and layout == "mistral":
        raise ManifestError(
            f"The mistral layout carries only casts (bf16, fp16), not {scheme}; use --layout hf for {scheme}.",
            scheme=scheme, layout=layout)
    best = _first_fit(args, target, preference(target), layout, context)
    if scheme == "auto":
        if best is None:
            tried = [profile(args, target, s, layout, context=context, gpus=max(_tp_sizes(args, target.count)))
                     for s in preference(target) if not (layout == "mistral" and s in QUANTIZED)]
            smallest = min([p for p in tried if p.runnable] or tried, key=lambda p: p.need_bytes)
            raise GPUMemoryError(
                f"Nothing fits on {target.describe()}: the smallest profile, {smallest.name}, needs "
                f"{smallest.need_bytes / 2**30:.1f} GiB per device for a {context}-token context.",
                hint="Use a bigger GPU, more GPUs (--target NAMExCOUNT) or a shorter --context.",
                needed=smallest.need_bytes, available=target.memory_bytes, profile=smallest.name,
                target=target.describe(), context=context)
        return best
    runnable, how = support(scheme, target)
    if not runnable:
        alt = best.scheme if best else next((s for s in preference(target) if support(s, target)[0]), "fp16")
        raise ManifestError(f"{target.describe()} cannot run {scheme}: {how}; use --scheme {alt}.",
                            scheme=scheme, target=target.describe(), works=alt)
    for n in _tp_sizes(args, target.count):
        p = profile(args, target, scheme, layout, gpus=n, context=context)
        if p.fits:
            return p
    p = profile(args, target, scheme, layout, gpus=max(_tp_sizes(args, target.count)), context=context)
    alt_txt = f"; --scheme {best.scheme} fits" if best else ""
    raise GPUMemoryError(
        f"{scheme} does not fit on {target.describe()}: it needs {p.need_bytes / 2**30:.1f} GiB per device "
        f"for a {context}-token context{alt_txt}.",
        hint="Pick a smaller scheme, a shorter --context or a bigger target.",
        needed=p.need_bytes, available=target.memory_bytes, profile=p.name, context=context,
        works=best.scheme if best else None)


def gpu_needs(args: ModelArgs, target: Target, *, context: int = DEFAULT_CONTEXT,
              max_gpus: int = 8) -> list[dict[str, Any]]:
    """Per scheme (default layout): the fewest GPUs of ``target``'s card (1, 2, 4 or 8) that hold the
    model, None when not even ``max_gpus`` do; ``fits_host`` says whether the target has that many."""
    from dataclasses import replace

    wide = replace(target, count=max_gpus)
    out: list[dict[str, Any]] = []
    for scheme in SCHEMES:
        lay = default_layout(scheme)
        runnable, how = support(scheme, target)
        need: int | None = None
        p: Profile | None = None
        if runnable:
            for n in _tp_sizes(args, max_gpus):
                p = profile(args, wide, scheme, lay, gpus=n, context=context)
                if p.fits:
                    need = n
                    break
            if p is not None and not p.runnable:  # memory says N GPUs, but convert cannot write it yet
                runnable, how = False, p.how
        out.append({"scheme": scheme, "layout": lay, "runnable": runnable, "how": how, "gpus_needed": need,
                    "need_bytes_per_gpu": p.need_bytes if p is not None else None,
                    "fits_host": runnable and need is not None and need <= target.count})
    return out
