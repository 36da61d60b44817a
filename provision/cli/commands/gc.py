"""`provision gc [--dry-run] [--partials]`: reclaim space the store no longer needs.

A thin command over ``provision.store.garbage.collect_garbage`` (its docstring says what counts
as garbage and what is never touched): it lists what was (or, with ``--dry-run``, would be)
removed and kept, each with its reason, and the bytes freed. Resumable partial downloads stay
unless ``--partials`` is given.
"""

from __future__ import annotations

from pathlib import Path

import click

from provision.cli.app import get_app
from provision.cli.options import home_option, json_option
from provision.store.garbage import collect_garbage


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="List what would be removed, and why; remove nothing.")
@click.option("--partials", is_flag=True,
              help="Also remove resumable partial downloads (staging folders and their resume data).")
@home_option
@json_option
def command(dry_run: bool, partials: bool, home: Path | None, json_out: bool) -> None:
    """Remove stale staging folders, partial downloads, orphaned resume data and dead locks."""
    app = get_app(json_out, "gc")
    from provision.units import human_bytes

    root = Path(home) if home else app.settings.home
    res = collect_garbage(root, dry_run=dry_run, partials=partials)
    verb = "would remove" if dry_run else "removed"
    for it in res.removed:
        app.result(f"{verb} {it.kind}: {it.path} ({human_bytes(it.bytes)}; {it.reason})")
    for it in res.kept:
        app.result(f"kept {it.kind}: {it.path} ({it.reason})")
    total = human_bytes(res.bytes_freed)
    app.terminal.success(f"{'would free' if dry_run else 'freed'} {total} in {root}"
                         + (" (dry run: nothing removed)" if dry_run else ""))
    app.finish(res.to_dict())
