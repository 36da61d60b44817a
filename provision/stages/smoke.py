"""The smoke test: one image and one prompt through the whole multimodal model, checked.

``smoke`` tokenizes a chat request (by default the manifest's generated image and prompt) with
mistral-common, refuses a device too small before reading weights (exit 6), loads the model,
decodes greedily with the KV cache and checks that the logits stay finite, the ``[IMG]`` token
layout matches the image patches, the ids decode, and, when given, that the ids equal golden
ones or the answer names the manifest's expected word. It returns a ``SmokeReport`` (timings,
peak memory, tokens, text, checks) or raises ``SmokeError`` (exit 8) carrying it. It never
prints, fetches or converts.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provision.errors import SmokeError, UsageError
from provision.formats.manifest import Manifest, SmokeSpec, load_manifest
from provision.formats.params import IMG_BREAK_TOKEN_ID, IMG_END_TOKEN_ID, IMG_TOKEN_ID
from provision.progress import ProgressEvent, ProgressFn, note

if TYPE_CHECKING:
    import torch

MANIFEST_NAME = "manifest.toml"
ACTIVATION_RESERVE_BYTES = 256 * 2**20


@dataclass
class Check:
    name: str
    passed: bool
    detail: str = ""


@dataclass
class SmokeReport:
    model_dir: str
    layout: str
    device: str
    dtype: str
    prompt: str
    images: list[dict[str, Any]]
    prompt_tokens: int
    weights_bytes: int
    load_seconds: float
    prefill_seconds: float
    prefill_tokens_per_second: float
    per_token_seconds: float | None
    tokens_generated: int
    token_ids: list[int]
    text: str
    peak_ram_bytes: int
    peak_gpu_bytes: int | None
    checks: list[Check] = field(default_factory=list)
    manifest: str | None = None
    manifest_sha256: str | None = None
    placement: dict[str, Any] | None = None  # layers split over several devices (provision.model.placement)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def _peak_ram() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def image_layout_ok(tokens: Sequence[int], grids: Sequence[tuple[int, int]], *, img: int = IMG_TOKEN_ID,
                    brk: int = IMG_BREAK_TOKEN_ID, end: int = IMG_END_TOKEN_ID) -> tuple[bool, str]:
    """Whether ``tokens`` hold, in order, each image as ``rows x ([IMG]*cols + BREAK)`` with the last BREAK -> END."""
    n_img = sum(1 for t in tokens if t == img)
    n_patches = sum(r * c for r, c in grids)
    if n_img != n_patches:
        return False, f"{n_img} [IMG] tokens for {n_patches} image patches"
    expected: list[int] = []
    for r, c in grids:
        block = ([img] * c + [brk]) * r
        block[-1] = end
        expected += block
    got = [t for t in tokens if t in (img, brk, end)]
    if got != expected:
        return False, "image tokens are not laid out as rows of [IMG] closed by [IMG_BREAK]/[IMG_END]"
    return True, f"{n_img} [IMG] tokens = {n_patches} patches ({', '.join(f'{r}x{c}' for r, c in grids)})"


def _manifest_for(model_dir: Path, manifest: Manifest | Path | str | None) -> Manifest | None:
    if isinstance(manifest, Manifest):
        return manifest
    if manifest is not None:
        return load_manifest(manifest)
    cand = model_dir / MANIFEST_NAME
    return load_manifest(cand) if cand.is_file() else None


def _describe_source(spec: Any) -> str:
    if isinstance(spec, bytes):
        return f"{len(spec)} bytes"
    s = str(spec)
    if s.startswith("data:") or len(s) > 200:
        return f"base64 data ({len(s)} characters)"
    return s


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _placement(args: Any, dev: torch.device, dt: torch.dtype, devices: Sequence[str] | None, needed: int,
               context: int) -> Any:
    """The layer -> device map when the model runs on several devices: the ``devices`` asked for, or
    every visible GPU when ``dev`` is a GPU that cannot hold the model alone; None for one device."""
    import torch

    from provision.model.loader import free_device_bytes
    from provision.model.placement import plan_placement

    if not devices:
        n = torch.cuda.device_count() if dev.type == "cuda" else 0
        if n < 2 or needed <= free_device_bytes(dev):
            return None
        devices = [f"cuda:{i}" for i in range(n)]
    for d in devices:
        try:
            kind = torch.device(d).type
        except RuntimeError:
            kind = ""
        if kind not in ("cpu", "cuda", "meta"):
            raise UsageError(f"Device {d!r} is not supported; use cpu or cuda:N.", device=d)
        if kind == "cuda" and (torch.device(d).index or 0) >= torch.cuda.device_count():
            from provision.errors import ResourceError

            raise ResourceError(f"Device {d} was asked for but this host has {torch.cuda.device_count()} usable "
                                "GPU(s); name devices that exist.", device=d)
    free = [free_device_bytes(torch.device(d)) - ACTIVATION_RESERVE_BYTES for d in devices]
    return plan_placement(args, devices, dtype_bytes=dt.itemsize, context=context, capacity_bytes=free)


def smoke(model_dir: Path, *, device: str = "auto", dtype: str | None = None, images: Sequence[Any] = (),
          prompt: str | None = None, max_tokens: int | None = None, manifest: Manifest | Path | str | None = None,
          golden: Sequence[int] | None = None, progress: ProgressFn | None = None,
          raise_on_fail: bool = True, devices: Sequence[str] | None = None) -> SmokeReport:
    """Run the smoke test on the checkpoint in ``model_dir``; see the module docstring."""
    import torch

    from provision.model.inputs import encode_chat, load_tokenizer, square_image
    from provision.model.loader import (
        DTYPE_NAMES,
        check_fits,
        default_dtype,
        open_checkpoint,
        resolve_device,
        weights_bytes,
    )
    from provision.model.pixtral import greedy_generate

    model_dir = Path(model_dir)
    man = _manifest_for(model_dir, manifest)
    spec = man.smoke if man is not None else SmokeSpec()
    if max_tokens is not None and not 1 <= max_tokens <= 4096:
        raise UsageError(f"--max-tokens must be between 1 and 4096, got {max_tokens}.")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise UsageError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_NAMES)}.")
    n_new = max_tokens if max_tokens is not None else spec.max_tokens
    default_inputs = not images and prompt is None
    text_prompt = prompt if prompt is not None else spec.prompt

    dev = resolve_device(device)
    ckpt = open_checkpoint(model_dir)
    vision = ckpt.args.vision_encoder is not None
    if images and not vision:
        raise UsageError(f"{model_dir} is a text-only model (no vision_encoder); drop --image.")
    img_inputs: list[Any] = list(images) if images else ([square_image(spec.image)] if vision else [])
    img_desc: list[dict[str, Any]] = (
        [{"source": _describe_source(i)} for i in images] if images else
        [{"source": "generated", "kind": spec.image.kind, "width": spec.image.width, "height": spec.image.height,
          "color": spec.image.color, "background": spec.image.background}] if vision else [])
    dt = DTYPE_NAMES[dtype] if dtype else default_dtype(ckpt, dev)
    note(progress, "smoke", f"tokenizing the prompt and {len(img_inputs)} image(s)")
    tok = load_tokenizer(model_dir, require_image=vision)
    enc = encode_chat(tok, text_prompt, img_inputs)
    for d, g, t in zip(img_desc, enc.grids, enc.images, strict=True):
        d.update({"patches": [g[0], g[1]], "pixels": [int(t.shape[1]), int(t.shape[2])]})

    a = ckpt.args
    kv_bytes = 2 * a.n_layers * a.n_kv_heads * a.head_dim * (len(enc.tokens) + n_new) * dt.itemsize
    wbytes = weights_bytes(ckpt, dt)
    placement = _placement(ckpt.args, dev, dt, devices, wbytes + kv_bytes + ACTIVATION_RESERVE_BYTES,
                           len(enc.tokens) + n_new)
    if placement is None:
        check_fits(wbytes + kv_bytes + ACTIVATION_RESERVE_BYTES, dev)
    else:
        dev = torch.device(placement.first)
        note(progress, "smoke", f"placing {a.n_layers} layers on {placement.used} devices: {placement.describe()}")

    from provision.model.loader import load_model

    note(progress, "smoke", f"loading {wbytes / 2**30:.2f} GiB of weights onto {dev} as {_dtype_name(dt)}")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    model, _ = load_model(model_dir, device=str(dev), dtype=dt, placement=placement,
                          reserve_bytes=ACTIVATION_RESERVE_BYTES if placement is not None else 0)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    load_s = time.perf_counter() - t0

    def on_token(step: int, _tok: int) -> None:
        if progress is not None:
            progress(ProgressEvent(task="smoke:generate", done=step + 1, total=n_new, unit="tokens",
                                   description="generating", finished=step + 1 == n_new))

    eos = tok.instruct_tokenizer.tokenizer.eos_id
    try:
        gen = greedy_generate(model, enc.tokens, enc.images, max_tokens=n_new, eos_id=eos, on_token=on_token)
    except ValueError as e:  # [IMG] count vs patches, image size: the model refuses the inputs
        raise SmokeError(f"The model rejected the inputs: {e}.") from None
    except torch.OutOfMemoryError:
        raise SmokeError(f"Ran out of memory on {dev} during generation; use fewer or smaller images.") from None

    checks: list[Check] = []
    n_bad = sum(1 for f in gen.finite if not f)
    checks.append(Check("logits_finite", n_bad == 0,
                        f"{len(gen.finite)} steps, all finite" if n_bad == 0 else f"{n_bad} of {len(gen.finite)} "
                        "steps had NaN/inf logits"))
    if vision:
        v = a.vision_encoder  # Pixtral Large's params.json names its own [IMG_BREAK]/[IMG_END] ids (14/15)
        ok, detail = image_layout_ok(enc.tokens, enc.grids, img=v.image_token_id if v else IMG_TOKEN_ID,
                                     brk=v.image_break_token_id if v else IMG_BREAK_TOKEN_ID,
                                     end=v.image_end_token_id if v else IMG_END_TOKEN_ID)
        checks.append(Check("image_tokens", ok, detail))
    try:
        text = tok.decode(gen.tokens)
        checks.append(Check("decodes", bool(gen.tokens) and isinstance(text, str),
                            f"{len(gen.tokens)} tokens -> {len(text)} characters"))
    except Exception as e:  # mistral-common raises various errors on ids it cannot decode
        text = ""
        checks.append(Check("decodes", False, f"{type(e).__name__}: {e}"))
    if golden is not None:
        k = min(len(golden), len(gen.tokens))
        same = list(gen.tokens[:k]) == list(golden[:k]) and k > 0
        checks.append(Check("golden", same, f"first {k} ids equal the golden ids" if same else
                            f"ids {gen.tokens[:k]} differ from golden {list(golden[:k])}"))
    if spec.expected and default_inputs:
        hit = spec.expected.lower() in text.lower()
        checks.append(Check("expected", hit, f"{spec.expected!r} {'found' if hit else 'not found'} in the answer"))

    report = SmokeReport(
        model_dir=str(model_dir), layout=ckpt.layout,
        device=",".join(dict.fromkeys(placement.devices)) if placement is not None else str(dev), dtype=_dtype_name(dt), prompt=text_prompt,
        images=img_desc, prompt_tokens=len(enc.tokens), weights_bytes=wbytes, load_seconds=round(load_s, 4),
        prefill_seconds=round(gen.prefill_seconds, 4),
        prefill_tokens_per_second=round(len(enc.tokens) / gen.prefill_seconds, 1) if gen.prefill_seconds else 0.0,
        per_token_seconds=round(statistics.fmean(gen.step_seconds), 5) if gen.step_seconds else None,
        tokens_generated=len(gen.tokens), token_ids=list(gen.tokens), text=text, peak_ram_bytes=_peak_ram(),
        peak_gpu_bytes=int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None,
        checks=checks, manifest=str(man.path) if man is not None and man.path else None,
        manifest_sha256=man.sha256 if man is not None else None,
        placement=placement.to_dict() if placement is not None else None,
    )
    if raise_on_fail and not report.passed:
        names = ", ".join(f"{c.name} ({c.detail})" for c in report.failed)
        raise SmokeError(f"Smoke test failed: {names}.", report=report)
    return report
