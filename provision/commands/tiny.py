"""`provision tiny OUT_DIR`: write the built-in tiny Pixtral-architecture checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from provision.app import get_app, json_option


@click.command("tiny")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed of the weights.")
@json_option
def command(out_dir: Path, seed: int, json_out: bool) -> None:
    """Write a tiny Pixtral-architecture checkpoint (Mistral format) and its manifest to OUT_DIR."""
    app = get_app(json_out, "tiny")
    from provision.tiny import write_tiny

    res = write_tiny(out_dir, seed=seed)
    app.manifest_sha256 = res.manifest.sha256
    for name, (size, sha) in sorted(res.files.items()):
        app.terminal.info(f"{name:28s} {size:>12,d} B  sha256 {sha}")
    app.terminal.success(f"tiny checkpoint written to {out_dir} (manifest: {out_dir / 'manifest.toml'})")
    app.finish({"out_dir": str(out_dir), "seed": seed, "manifest": str(res.manifest.path),
                "files": [{"path": n, "size": s, "sha256": h} for n, (s, h) in sorted(res.files.items())]})
