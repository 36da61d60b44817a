"""`provision plan SOURCE`: show what would be fetched, where, and whether it fits."""

from __future__ import annotations

from pathlib import Path

import click

from provision.app import App, get_app, json_option


def render_plan(app: App, plan: object) -> None:
    from rich.table import Table

    from provision.console import human_bytes
    from provision.plan import Plan

    assert isinstance(plan, Plan)
    t = app.terminal
    t.info(f"Plan for {plan.name} ({plan.kind})")
    for i, s in enumerate(plan.sources, 1):
        t.info(f"  source {i}: {s}")
    t.info(f"  destination: {plan.dest}")
    if plan.files:
        table = Table(show_header=True, header_style="bold")
        table.add_column("file")
        table.add_column("size", justify="right")
        table.add_column("sha256")
        table.add_column("sources")
        table.add_column("status")
        for f in plan.files:
            table.add_row(f.path, f"{f.size:,d}" if f.size is not None else "unknown",
                          (f.sha256[:16] + "…") if f.sha256 else "unknown", ",".join(f.sources),
                          f.status + (" (optional)" if f.optional else ""))
        t.print(table)
    else:
        t.info("  files: unknown until the metadata is fetched")
    unk = " + unknown" if plan.unknown_sizes else ""
    t.info(f"  to fetch: {human_bytes(plan.bytes_to_fetch)}{unk}; free: {human_bytes(plan.free_bytes)}"
           f" -> {'fits' if plan.disk_ok else 'DOES NOT FIT'}")
    t.info(f"  hardware: {plan.hardware.describe()}")
    for n in plan.notes:
        t.info(f"  note: {n}")


@click.command("plan")
@click.argument("source")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), envvar="PROVISION_HOME",
              help="Model store (default ~/.cache/provision).")
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), help="Where the original files go.")
@click.option("--include", multiple=True, help="Only files matching this glob (repeatable).")
@click.option("--offline", is_flag=True, help="Never touch the network; show what is unknown instead.")
@json_option
def command(source: str, home: Path | None, dest: Path | None, include: tuple[str, ...], offline: bool,
            json_out: bool) -> None:
    """Show what SOURCE would fetch, its sizes, sources, what is present, hardware and disk."""
    app = get_app(json_out, "plan")
    from provision.plan import make_plan

    plan = make_plan(source, settings=app.settings, home=home, dest=dest, offline=offline, include=include)
    if plan.manifest is not None:
        app.manifest_sha256 = plan.manifest.sha256
    render_plan(app, plan)
    app.finish({"plan": plan.to_dict()})
