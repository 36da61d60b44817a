"""`provision ls`: the models under PROVISION_HOME, their sizes, profiles, stages and locks.

A thin command over ``provision.store.inventory.list_models``: it renders one table row per
model and, with ``--json``, reports every model. It never writes and never takes a lock.
"""

from __future__ import annotations

from pathlib import Path

import click

from provision.cli.app import get_app
from provision.cli.options import home_option, json_option
from provision.store.inventory import ModelInfo, list_models


def _size(n: int | None) -> str:
    from provision.units import human_bytes

    return "-" if n is None else human_bytes(n)


def _row(m: ModelInfo) -> tuple[str, str, str, str, str]:
    profs = ", ".join(f"{p} {_size(b)}" for p, b in sorted(m.profiles.items())) or "-"
    if m.staging_bytes is not None:
        profs += f" (staging {_size(m.staging_bytes)})"
    stages = " ".join(s.stage + ("" if s.valid else "(changed)") for s in m.stages) or "-"
    if m.lock.state == "live":
        lock = f"locked: {m.lock.info.describe()}" if m.lock.info else "locked"
    elif m.lock.state == "stale":
        lock = "dead lock (gc removes it)"
    else:
        lock = "-"
    return m.name + (" -> symlink" if m.symlink else ""), _size(m.original_bytes), profs, stages, lock


@click.command("ls")
@home_option
@json_option
def command(home: Path | None, json_out: bool) -> None:
    """List the models in the store: sizes, profiles, finished stages and whether a run holds them."""
    app = get_app(json_out, "ls")
    from rich.table import Table

    root = Path(home) if home else app.settings.home
    models = list_models(root)
    for m in models:
        for w in m.warnings:
            app.terminal.warn(w)
    if not models:
        app.result(f"No models in {root}.")
    else:
        t = Table(show_header=True, header_style="bold")
        for col in ("model", "original", "profiles", "stages", "lock"):
            t.add_column(col, justify="right" if col == "original" else "left")
        for m in models:
            t.add_row(*_row(m))
        app.result(t)
    app.finish({"home": str(root), "models": [m.to_dict() for m in models]})
