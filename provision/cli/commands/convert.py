"""`provision convert SRC_DIR --out DIR`: cast or quantize a checkpoint for a target GPU, streamed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from provision.cli.app import get_app
from provision.cli.options import json_option, layout_option, profile_options
from provision.units import human_bytes

if TYPE_CHECKING:
    from provision.cli.console import Terminal
    from provision.stages.convert import ConvertResult

F = TypeVar("F", bound=Callable[..., Any])


def workers_option(f: F) -> F:
    """``--workers N``: the threads converting tensors (``convert`` and ``run``)."""
    return click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N",
                        help="Threads converting tensors (default: PROVISION_CONVERT_WORKERS, else the usable "
                             "CPUs, at most 8); the output is byte for byte the same for any N.")(f)


@click.command("convert")
@click.argument("src_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write the converted checkpoint into (new, empty or an earlier conversion).")
@profile_options
@layout_option
@click.option("--no-hf-tokenizer", is_flag=True, help="Do not build tokenizer.json from tekken.json (hf layout).")
@click.option("--compare/--no-compare", default=None,
              help="Load the original and the converted model on the CPU and compare their logits on the smoke "
                   "prompt (top-1 agreement, cosine), before the output is committed. Default: only when both "
                   "fit easily in RAM.")
@click.option("--force", is_flag=True,
              help="Add the conversion to an --out folder that holds other files; a file convert did not write "
                   "is never overwritten or deleted (a name collision is refused, exit 2).")
@workers_option
@json_option
def command(src_dir: Path, out_dir: Path, target: str, scheme: str, context: int, layout: str | None,
            no_hf_tokenizer: bool, compare: bool | None, force: bool, workers: int | None, json_out: bool) -> None:
    """Convert the Mistral-format checkpoint in SRC_DIR for a GPU, streamed tensor by tensor.

    Exit codes: 2 unknown scheme/target, or an --out holding files convert did not write;
    3 a scheme the target (or the model) cannot run; 5 hostile source (symlink out, FIFO,
    malformed header); 6 nothing fits (GPU memory or disk); 7 conversion failed.
    """
    app = get_app(json_out, "convert")
    from provision.stages.convert import convert

    res = convert(src_dir, out_dir, target=target, scheme=scheme, layout=layout, context=context,
                  progress=app.terminal.progress, hf_tokenizer=not no_hf_tokenizer, force=force, compare=compare,
                  workers=workers)
    _show_result(app.terminal, res)
    logits = res.logits_comparison
    if logits is not None:
        app.terminal.info(f"  logits vs the original on the smoke prompt ({logits['positions']} positions): "
                          f"top-1 agreement {logits['top1_agreement']:.3f}, cosine {logits['cosine']:.5f} "
                          f"(min {logits['cosine_min']:.5f})")
    rate = res.bytes_read / res.seconds / 1e6 if res.seconds else 0.0
    app.terminal.success(f"converted {human_bytes(res.bytes_read)} in {res.seconds:.1f} s ({rate:.0f} MB/s) "
                         f"into {res.out_dir}")
    # one unbroken line; under --json the report carries vllm_command
    app.terminal.out(f"serve it with: {res.vllm_command}", commentary=app.json)
    app.finish({"convert": res.to_dict()})


def _show_result(t: Terminal, res: ConvertResult) -> None:
    """The profile, the files written, the quantization error and the notes of a conversion."""
    p = res.profile
    t.info(f"target: {res.target.describe()}; profile {p.name} ({p.how}); "
           f"needs {human_bytes(p.need_bytes)} per device of {human_bytes(p.available_bytes)}")
    for name, size in res.files:
        t.info(f"  {name:40s} {human_bytes(size):>10s}")
    q = res.quality()
    if q["quantized_tensors"]:
        worst = max((x for x in res.tensors if x.relative_error is not None), key=lambda x: x.relative_error or 0)
        t.info(f"  {q['quantized_tensors']} tensors quantized; relative error mean {q['relative_error_mean']:.4f}, "
               f"max {q['relative_error_max']:.4f} ({worst.name})")
    for n in res.notes:
        t.warn(n)
