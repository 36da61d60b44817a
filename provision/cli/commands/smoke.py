"""`provision smoke DIR`: run an image and a prompt through the whole model and check the answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from provision.cli.app import App, get_app
from provision.cli.options import json_option
from provision.errors import SmokeError, UsageError

if TYPE_CHECKING:
    from provision.stages.smoke import SmokeReport
    from provision.stages.smoke_vllm import VllmReport

ENGINE_HELP = ("Which engine judges the folder: provision (our PyTorch reference and its checks), vllm (the "
               "folder's `vllm serve` line must answer with our reference's greedy ids), both (both verdicts). "
               "Default: PROVISION_SMOKE_ENGINE, else both when vLLM is installed and can run the model here (a "
               "vision model also needs torchvision), else provision.")


def _read_golden(path: Path) -> list[int]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"Cannot read golden ids from {path}: {e}.") from None
    ids = data.get("token_ids") if isinstance(data, dict) else data
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise UsageError(f"{path} must hold a non-empty list of token ids (or an object with 'token_ids').")
    return ids


@click.command("smoke")
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to run: auto picks cuda when a GPU is usable.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Weights dtype: auto is bfloat16 on a GPU, float32 on the CPU.")
@click.option("--image", "images", multiple=True, metavar="FILE|URL|BASE64",
              help="An image (repeatable); default: the manifest's generated test image.")
@click.option("--prompt", help="The question; default: the manifest's smoke prompt.")
@click.option("--max-tokens", type=click.IntRange(1, 4096), help="Tokens to generate (default: the manifest's).")
@click.option("--manifest", metavar="NAME|FILE", help="Manifest with the smoke spec (default: DIR/manifest.toml).")
@click.option("--golden", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON file of the token ids the model must generate (tests' golden ids).")
@click.option("--devices", metavar="DEV,DEV,...", default=None,
              help="Split consecutive layers over these devices (e.g. cuda:0,cuda:1); default: every GPU when "
                   "one cannot hold the model.")
@click.option("--engine", type=click.Choice(["provision", "vllm", "both"]), default=None, help=ENGINE_HELP)
@click.option("--vllm-timeout", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="Seconds vLLM may take to load the folder and answer /health.")
@json_option
def command(model_dir: Path, device: str, dtype: str, images: tuple[str, ...], prompt: str | None,
            max_tokens: int | None, manifest: str | None, golden: Path | None, devices: str | None,
            engine: str | None, vllm_timeout: float, json_out: bool) -> None:
    """Smoke-test the model in MODEL_DIR: image + prompt through the full forward pass, greedy decode, checks."""
    app = get_app(json_out, "smoke")
    from provision.stages.smoke import SmokeReport, smoke
    from provision.stages.smoke_vllm import default_engine

    engine = engine or default_engine(model_dir)
    gold = _read_golden(golden) if golden is not None else None
    try:
        rep = smoke(model_dir, device=device, dtype=None if dtype == "auto" else dtype, images=images,
                    prompt=prompt, max_tokens=max_tokens, manifest=manifest, golden=gold,
                    progress=app.terminal.progress, raise_on_fail=engine != "vllm",
                    devices=[d.strip() for d in devices.split(",") if d.strip()] if devices else None)
    except SmokeError as e:
        if isinstance(e.report, SmokeReport):  # the model ran and a check failed: show what it did
            app.manifest_sha256 = e.report.manifest_sha256
            _render(app, e.report)
            app.fail(e, {"smoke": e.report.to_dict(), "engine": engine})
        raise
    app.manifest_sha256 = rep.manifest_sha256
    _render(app, rep)
    out: dict[str, object] = {"smoke": rep.to_dict(), "engine": engine}
    if engine != "provision":
        out["vllm"] = run_vllm_check(app, model_dir, rep, images, vllm_timeout, out).to_dict()
    app.finish(out)


def run_vllm_check(app: App, model_dir: Path, rep: SmokeReport, images: tuple[str, ...], timeout: float,
                   partial: dict[str, object]) -> VllmReport:
    """The vLLM half of ``--engine vllm|both``: rendered; a failure ends the command (exit 8) with
    both engines' verdicts in the JSON report."""
    from provision.stages.smoke_vllm import reference_images, smoke_vllm

    try:
        vrep = smoke_vllm(model_dir, rep, images=reference_images(model_dir, rep, list(images)),
                          start_timeout=timeout, progress=app.terminal.progress)
    except SmokeError as e:
        from provision.stages.smoke_vllm import VllmReport

        if isinstance(e.report, VllmReport):
            _render_vllm(app, e.report)
            app.fail(e, {**partial, "vllm": e.report.to_dict()})
        app.fail(e, dict(partial))
    _render_vllm(app, vrep)
    return vrep


def _render_vllm(app: App, v: VllmReport) -> None:
    t = app.terminal

    def fig(x: float | None, unit: str) -> str:
        return f"{x:.3f} {unit}" if x is not None else "n/a"

    for e in (v.vllm, v.provision):
        t.info(f"{e.engine:>9}: load {fig(e.load_seconds, 's')}, time to first token {fig(e.ttft_seconds, 's')}, "
               f"{fig(e.tokens_per_second, 'tokens/s')}")
    t.info(f"vLLM generated {len(v.token_ids)} tokens: {v.text!r}")
    (t.success if v.passed else t.error)(
        f"vllm: {'ok' if v.passed else 'FAILED'} - {v.rule}" +
        ("" if v.first_difference is None else f"; first difference at token {v.first_difference}"))


def _render(app: App, rep: SmokeReport) -> None:
    t = app.terminal
    per_tok = f"{rep.per_token_seconds * 1000:.1f} ms/token" if rep.per_token_seconds else "n/a"
    t.info(f"device {rep.device} ({rep.dtype}), weights {rep.weights_bytes / 2**30:.2f} GiB loaded in "
           f"{rep.load_seconds:.2f} s")
    if rep.placement:  # layers split over several devices
        pl = rep.placement
        t.info("layers per device: " + ", ".join(f"{d} {pl['layer_devices'].count(i)}" for i, d in
                                                  enumerate(pl["devices"]) if i in pl["layer_devices"]))
    t.info(f"prefill {rep.prompt_tokens} tokens in {rep.prefill_seconds * 1000:.1f} ms "
           f"({rep.prefill_tokens_per_second:,.0f} tok/s), decode {per_tok}")
    t.info(f"generated {rep.tokens_generated} tokens: {rep.text!r}")
    for c in rep.checks:
        (t.success if c.passed else t.error)(f"{c.name}: {'ok' if c.passed else 'FAILED'} - {c.detail}")
    if rep.passed:
        t.success(f"smoke test passed on {rep.device}")
