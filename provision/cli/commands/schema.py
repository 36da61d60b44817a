"""`provision schema COMMAND`: print the JSON Schema of COMMAND's ``--json`` report.

The schemas ship in the package (``provision/data/*.schema.json``); this prints one standing alone
(the shared envelope embedded) on stdout, or, with ``--list``, the commands that have one. A thin
command over ``provision.formats.report_schema``; it validates nothing.
"""

from __future__ import annotations

import json

import click

from provision.cli.app import get_app
from provision.cli.options import json_option


@click.command("schema")
@click.argument("name", nargs=-1, metavar="COMMAND")
@click.option("--list", "list_them", is_flag=True, help="List the commands that have a report schema.")
@json_option
def command(name: tuple[str, ...], list_them: bool, json_out: bool) -> None:
    """Print the JSON Schema (draft 2020-12) of COMMAND's --json report (`provision` for the envelope
    every report carries, usage errors included)."""
    app = get_app(json_out, "schema")
    from provision.errors import UsageError
    from provision.formats.report_schema import REPORT_SCHEMAS, bundled_schema

    known = ", ".join(REPORT_SCHEMAS)
    if list_them:
        if not app.json:
            for c in REPORT_SCHEMAS:
                app.result(c)
        app.finish({"for_command": None, "commands": list(REPORT_SCHEMAS)})
        return
    cmd = " ".join(name)
    if not cmd:
        raise UsageError(f"Name a command: provision schema COMMAND (one of {known}).")
    if cmd not in REPORT_SCHEMAS:
        raise UsageError(f"No report schema for {cmd!r}; known: {known}.", command=cmd)
    schema = bundled_schema(cmd)
    if not app.json:
        app.result(json.dumps(schema, indent=2))
    app.finish({"for_command": cmd, "schema": schema})
