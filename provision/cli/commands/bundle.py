"""`provision bundle export|import`: carry a model's verified files to a host without a network.

``export MODEL [--profile P] OUT [--archive]`` writes the bundle (a folder, or one tar);
``import PATH`` verifies a bundle folder or tar offline and lands it in the store, so a later
``provision run`` skips the fetch (and the conversion of a bundled profile). Thin commands over
``provision.stages.bundle``.
"""

from __future__ import annotations

from pathlib import Path

import click

from provision.cli.app import get_app
from provision.cli.options import home_option, json_option


@click.group("bundle")
def command() -> None:
    """Export a model to an air-gapped bundle, or import one into the store."""


@command.command("export")
@click.argument("model")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--profile", default=None, metavar="P", help="Also carry this converted profile (e.g. bf16-mistral).")
@click.option("--no-original", is_flag=True, help="Leave the original out (needs --profile).")
@click.option("--manifest", "manifest_ref", default=None, metavar="M",
              help="The model's manifest (default: the one the store recorded, or the built-in of that name).")
@click.option("--archive", is_flag=True, help="Write one tar file to OUT instead of a folder.")
@home_option
@json_option
def export(model: str, out: Path, profile: str | None, no_original: bool, manifest_ref: str | None, archive: bool,
           home: Path | None, json_out: bool) -> None:
    """Write MODEL's verified original (and --profile P) to the new bundle OUT; an existing OUT is exit 2."""
    app = get_app(json_out, "bundle export")
    from provision.stages.bundle import export_bundle
    from provision.units import human_bytes

    res = export_bundle(model, out, home=Path(home) if home else app.settings.home, profile=profile,
                        original=not no_original, manifest=manifest_ref, archive=archive,
                        progress=app.terminal.progress)
    app.manifest_sha256 = res.manifest_sha256
    app.result(f"{res.out}: {res.files} files, {human_bytes(res.bytes)}, btih {res.btih}")
    app.terminal.success(f"exported {res.model}" + (f" with {', '.join(res.profiles)}" if res.profiles else "")
                         + f" to {res.out}")
    app.finish({"bundle": res.to_dict()})


@command.command("import")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@home_option
@json_option
def import_(path: Path, home: Path | None, json_out: bool) -> None:
    """Verify the bundle PATH (folder or tar) offline and land it in the store; resumes an interrupted import."""
    app = get_app(json_out, "bundle import")
    from provision.stages.bundle import import_bundle
    from provision.units import human_bytes

    res = import_bundle(path, home=Path(home) if home else app.settings.home, progress=app.terminal.progress)
    app.result(f"{res.model_dir}: {res.files} files verified, {human_bytes(res.bytes_copied)} copied"
               + (f", {res.files_reused} already staged" if res.files_reused else ""))
    if res.authority:  # the two authorities: bundle.json's sha256 and the bundle torrent's pieces
        app.terminal.info(f"checked against {res.authority['sha256']} sha256 and {res.authority['torrent']} pieces "
                          f"({res.authority['pieces']}, {res.authority['piece_checked_files']} files)")
        sig = res.authority.get("signature")
        if sig:  # the manifest lock pins a publisher: the original's signature, or why it was not read
            app.terminal.info(f"signature {sig['signature']} of the original: "
                              + (f"verified ({sig['method']})" if sig["checked"] else f"not checked: {sig['why']}"))
    app.terminal.success(f"imported {res.model}" + (f" with {', '.join(res.profiles)}" if res.profiles else ""))
    app.finish({"bundle": res.to_dict()})
