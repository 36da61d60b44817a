"""`provision manifest lock|show`: record a verified folder's sizes and sha256, or show a manifest.

``lock DIR --manifest M [--out FILE]`` verifies DIR against M (structure, hostile files and
every size or hash M already pins) and only then writes every listed file's size and sha256
into M (or FILE), atomically; a failed verification writes nothing. ``show M`` prints a
manifest and whether it is complete. Neither fetches anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from provision.cli.app import get_app
from provision.cli.options import json_option


@click.group("manifest")
def command() -> None:
    """Inspect manifests and lock them to a verified folder."""


@command.command("lock")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--manifest", "manifest_ref", required=True, metavar="M", help="Manifest name or .toml path to lock.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the locked manifest here instead of over M.")
@click.option("--workers", type=click.IntRange(min=1, max=256), default=None,
              help="Files hashed in parallel (default: the number of CPU cores).")
@json_option
def lock(folder: Path, manifest_ref: str, out: Path | None, workers: int | None, json_out: bool) -> None:
    """Verify FOLDER against M, then record every listed file's size and sha256 in M."""
    app = get_app(json_out, "manifest lock")
    from provision.cli.commands.verify import render_report
    from provision.errors import ManifestError
    from provision.formats.manifest import load_manifest, with_file_facts, write_manifest
    from provision.stages.verify import verify_dir

    m = load_manifest(manifest_ref)
    app.manifest_sha256 = m.sha256
    report = verify_dir(folder, m, progress=app.terminal.progress, workers=workers)
    render_report(app, report)
    if not report.ok:
        err = report.failures[0].error
        if err is not None:
            app.fail(err, {"verify": report.to_dict(), "error": None, "written": None})
        report.raise_for_failure()
    facts = report.facts
    listed = {f.path for f in m.files}
    absent = sorted(f.path for f in m.files if f.path not in facts and not f.optional)
    if absent:  # verify_dir fails a missing required file; this guards the invariant
        raise ManifestError(f"Cannot lock: {absent[0]} was not verified.", path=absent[0])
    target = out or m.path
    if target is None:  # pragma: no cover - load_manifest always sets a path
        raise ManifestError("Cannot lock a manifest that has no path; pass --out.")
    locked = write_manifest(with_file_facts(m, {k: v for k, v in facts.items() if k in listed}), target)
    changed = [f.path for f in locked.files if (old := m.file(f.path)) is not None
               and (old.size, old.sha256) != (f.size, f.sha256)]
    app.manifest_sha256 = locked.sha256
    for f in locked.files:
        state = "recorded" if f.path in changed else "unchanged" if f.sha256 else "absent (optional)"
        app.result(f"{f.path:40s} {state}")
    app.terminal.success(f"locked {len(facts)} files into {target} (sha256 {locked.sha256}).")
    app.finish({"verify": report.to_dict(), "written": str(target), "manifest_sha256_after": locked.sha256,
                "recorded": changed, "complete": locked.complete})


@command.command("show")
@click.argument("manifest_ref", metavar="M")
@json_option
def show(manifest_ref: str, json_out: bool) -> None:
    """Show manifest M: sources, files, sizes, hashes and whether it is complete."""
    app = get_app(json_out, "manifest show")
    from provision.formats.manifest import load_manifest, manifest_to_dict

    m = load_manifest(manifest_ref)
    app.manifest_sha256 = m.sha256
    out = app.result
    out(f"{m.name} ({m.architecture}, {m.format} format) from {m.path}")
    if m.description:
        out(f"  {m.description}")
    for i, s in enumerate(m.sources, 1):
        out(f"  source {i}: {s.describe()}")
    for f in m.files:
        size = f"{f.size:,d} B" if f.size is not None else "size unknown"
        sha = f"sha256 {f.sha256}" if f.sha256 else "sha256 unknown"
        opt = " (optional)" if f.optional else ""
        out(f"  {f.path}{opt}: {size}, {sha}")
    if m.signing is not None:  # fingerprints only: no key text in output or reports
        sg = manifest_to_dict(m, key_text=False)["signing"]
        key = f"public key sha256 {sg['public_key_sha256'][:16]}…" if sg["public_key_sha256"] else ""
        chain = f"{len(sg['certificate_sha256'])} pinned certificate(s)" if sg["certificate_sha256"] else ""
        out(f"  signing: signature {m.signing.signature}; {', '.join(x for x in (key, chain) if x)}")
    out(f"  complete: {'yes' if m.complete else 'no (run provision manifest lock after a verified fetch)'}")
    doc: dict[str, Any] = {"path": str(m.path), "complete": m.complete,
                           "manifest": manifest_to_dict(m, key_text=False)}
    app.finish(doc)
