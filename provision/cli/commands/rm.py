"""`provision rm NAME [--profile P]`: remove a model (or one converted profile) from the store.

A thin command over ``provision.store.remove``: it asks for confirmation on a TTY (``--yes``
otherwise), removes, and lists what went. Refused while a run holds the model (exit 6).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from provision.cli.app import get_app
from provision.cli.options import home_option, json_option
from provision.errors import UsageError
from provision.layout import model_dirname
from provision.store.remove import RemoveResult, removal_size, removal_target, remove_model


@click.command("rm")
@click.argument("name")
@click.option("--profile", help="Remove only this converted profile (e.g. fp8-hf), keeping the original.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@home_option
@json_option
def command(name: str, profile: str | None, yes: bool, home: Path | None, json_out: bool) -> None:
    """Remove model NAME (or one --profile of it) from the store; refused while a run holds it (exit 6)."""
    app = get_app(json_out, "rm")
    from provision.units import human_bytes

    root = Path(home) if home else app.settings.home
    target = removal_target(root, name, profile)
    if not yes:
        if json_out or not sys.stdin.isatty():
            raise UsageError(f"Refusing to remove {target} without confirmation: pass --yes.")
        size = removal_size(root, name, profile)
        if not click.confirm(f"Remove {target} ({human_bytes(size)})?", default=False, err=True):
            app.terminal.info("Nothing removed.")
            app.finish(RemoveResult(model=model_dirname(name), profile=profile).to_dict())
            return
    res = remove_model(root, name, profile=profile)
    for r in res.removed:
        app.result(f"removed {r.kind}: {r.path}")
    if res.dropped_stages:
        app.terminal.info(f"state: dropped {', '.join(res.dropped_stages)}")
    app.terminal.success(f"removed {target} ({human_bytes(res.bytes_freed)} freed)")
    app.finish(res.to_dict())
