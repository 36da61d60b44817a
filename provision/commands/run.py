"""`provision run SOURCE`: the whole pipeline, resumable (plan today; later stages join it)."""

from __future__ import annotations

from pathlib import Path

import click

from provision.app import get_app, json_option


@click.command("run")
@click.argument("source")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), envvar="PROVISION_HOME",
              help="Model store (default ~/.cache/provision).")
@click.option("--offline", is_flag=True, help="Never touch the network while planning.")
@click.option("--dry-run", is_flag=True, help="Print the plan and stop.")
@json_option
def command(source: str, home: Path | None, offline: bool, dry_run: bool, json_out: bool) -> None:
    """Plan, fetch, verify, convert and smoke-test SOURCE."""
    app = get_app(json_out, "run")
    from provision.commands.plan import render_plan
    from provision.pipeline import run_pipeline

    result = run_pipeline(source, settings=app.settings, home=home, offline=offline, dry_run=dry_run,
                          progress=app.terminal.progress)
    if result.plan.manifest is not None:
        app.manifest_sha256 = result.plan.manifest.sha256
    render_plan(app, result.plan)
    for stage in result.stages:
        app.terminal.info(f"stage {stage['stage']}: {stage['result']}")
    app.finish(result.to_dict())
