"""`provision tiny OUT_DIR`: write the built-in tiny Pixtral-architecture checkpoint, with a manifest whose
only source is the folder itself (a ``local`` source), so `provision run OUT_DIR/manifest.toml` needs no network."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from provision.cli.app import get_app
from provision.cli.options import json_option


@click.command("tiny")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed of the weights.")
@click.option("--kind", type=click.Choice(["pixtral", "mistral-7b", "mistral-nemo", "mixtral", "pixtral-large"]),
              default="pixtral", show_default=True,
              help="Architecture: Pixtral, a text-only Mistral 7B v0.1-like / NeMo-like model, a Mixtral-like MoE "
                   "or a Pixtral-Large-like model.")
@click.option("--pickle", "as_pickle", is_flag=True,
              help="Text-only kinds: write the weights as consolidated.00.pth, as the 7B torrent ships them.")
@json_option
def command(out_dir: Path, seed: int, kind: str, as_pickle: bool, json_out: bool) -> None:
    """Write a tiny Pixtral-architecture (or text-only Mistral) checkpoint and its manifest to OUT_DIR."""
    app = get_app(json_out, "tiny")
    from provision.errors import UsageError
    from provision.testing.tiny import write_tiny

    if kind == "pixtral" and as_pickle:
        raise UsageError("--pickle is for the text-only kinds (mistral-7b, mistral-nemo).")
    if kind in ("mixtral", "pixtral-large"):
        if as_pickle:
            raise UsageError("--pickle is for the text-only kinds (mistral-7b, mistral-nemo).")
        from provision.testing.tiny_large import write_tiny_mixtral, write_tiny_pixtral_large

        res = (write_tiny_mixtral if kind == "mixtral" else write_tiny_pixtral_large)(out_dir, seed=seed,
                                                                                       source="local")
    elif kind != "pixtral":
        from provision.testing.tiny_text import write_tiny_mistral

        res = write_tiny_mistral(out_dir, kind.removeprefix("mistral-"), seed=seed,
                                 weights="pickle" if as_pickle else "safetensors", source="local")
    else:
        res = write_tiny(out_dir, seed=seed, source="local")
    app.manifest_sha256 = res.manifest.sha256
    for name, (size, sha) in sorted(res.files.items()):
        app.result(f"{name:28s} {size:>12,d} B  sha256 {sha}")
    app.terminal.success(f"tiny checkpoint written to {out_dir} (manifest: {out_dir / 'manifest.toml'})")
    # its manifest's one source is this folder (type "local"): the run takes the files in, verified
    app.terminal.info(f"run it without a network: provision run {shlex.quote(str(res.manifest.path))}")
    app.finish({"out_dir": str(out_dir), "seed": seed, "kind": kind, "manifest": str(res.manifest.path),
                "files": [{"path": n, "size": s, "sha256": h} for n, (s, h) in sorted(res.files.items())]})
