"""The JSON Schemas of every command's ``--json`` report, and a validator for them.

The schemas (JSON Schema draft 2020-12) ship in ``provision/data/``: ``envelope.schema.json``
holds what every report carries (``schema_version``, ``tool``, ``version``, ``command``, ``ok``,
``exit_code``, ``manifest_sha256``, ``seconds``, ``error`` on failure: usage errors too) and the
shared ``$defs`` (plan, hardware, target, verification); ``<command>-report.schema.json`` adds a
command's own fields (``manifest-show-report.schema.json`` for ``manifest show``;
``run-report.schema.json`` is self-contained). ``bundled_schema(command)`` is a command's schema
with the envelope embedded, so it stands alone (``provision schema COMMAND`` prints it).
``validate_report(doc)`` picks the schema by the report's ``command`` (the envelope alone for a
usage error before any command) and raises ``ValueError`` naming the JSON path of the first
problem. CI can check a saved report with ``python -m provision.report_schema report.json`` (or
``-`` for stdin): exit 0 when valid, 1 with the error otherwise.

This module builds no report (the commands do) and imports ``jsonschema`` only to validate.
"""

from __future__ import annotations

import json
import sys
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

SCHEMA_RESOURCE = "run-report.schema.json"
ENVELOPE_RESOURCE = "envelope.schema.json"
ENVELOPE_COMMAND = "provision"  # the command a usage error before any command reports

# every command whose report has a schema -> its file in provision/data
REPORT_SCHEMAS: dict[str, str] = {
    "run": SCHEMA_RESOURCE,
    **{c: f"{c.replace(' ', '-')}-report.schema.json" for c in (
        "plan", "fetch", "verify", "convert", "smoke", "seed", "manifest lock", "manifest show", "tiny", "ls",
        "rm", "gc", "import-pickle", "doctor", "schema", "sign", "bundle export", "bundle import")},
    ENVELOPE_COMMAND: ENVELOPE_RESOURCE,
}


def schema_file_text(resource: str) -> str:
    """A shipped schema file's text."""
    return resources.files("provision").joinpath("data", resource).read_text(encoding="utf-8")


def schema_text() -> str:
    """The run report schema's text, as shipped in the package."""
    return schema_file_text(SCHEMA_RESOURCE)


@cache
def _file(resource: str) -> dict[str, Any]:
    doc = json.loads(schema_file_text(resource))
    assert isinstance(doc, dict)
    return doc


def _copy(doc: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(doc))  # type: ignore[no-any-return]


def load_schema(command: str = "run") -> dict[str, Any]:
    """A fresh copy of ``command``'s schema file as a dict (not bundled)."""
    return _copy(_file(schema_resource(command)))


def schema_resource(command: str) -> str:
    """The file of ``command``'s schema; ``KeyError`` naming the known commands otherwise."""
    try:
        return REPORT_SCHEMAS[command]
    except KeyError:
        raise KeyError(f"no report schema for {command!r}; known: {', '.join(REPORT_SCHEMAS)}") from None


def bundled_schema(command: str) -> dict[str, Any]:
    """``command``'s schema standing alone: the envelope it refers to is embedded under ``$defs``
    (by its ``$id``, so the references resolve to it without fetching anything)."""
    doc = load_schema(command)
    resource = schema_resource(command)
    if resource not in (SCHEMA_RESOURCE, ENVELOPE_RESOURCE):
        doc.setdefault("$defs", {})["envelope"] = _copy(_file(ENVELOPE_RESOURCE))
    return doc


@cache
def _validator(command: str) -> Any:
    from jsonschema import Draft202012Validator

    schema = bundled_schema(command)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def report_command(doc: Any) -> str:
    """The schema a report is checked against: its ``command`` when that has one, else the run
    schema for a document without a command (the older run-only callers) or the envelope alone."""
    if not isinstance(doc, dict) or "command" not in doc:
        return "run"
    cmd = doc["command"]
    return cmd if isinstance(cmd, str) and cmd in REPORT_SCHEMAS else ENVELOPE_COMMAND


def validate_report(doc: Any, command: str | None = None) -> None:
    """Raise ``ValueError("<command> report invalid at <json path>: <problem>")`` for the first problem
    in ``doc`` (checked against ``command``'s schema, by default the one its ``command`` names)."""
    from jsonschema.exceptions import best_match

    cmd = command or report_command(doc)
    err = best_match(_validator(cmd).iter_errors(doc))
    if err is None:
        return
    raise ValueError(f"{cmd} report invalid at {err.json_path}: {err.message}")


def report_errors(doc: Any, command: str | None = None) -> list[str]:
    """Every problem in ``doc``, one ``<json path>: <problem>`` line each (empty when valid)."""
    v = _validator(command or report_command(doc))
    errs = sorted(v.iter_errors(doc), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    return [f"{e.json_path}: {e.message}" for e in errs]


def main(argv: list[str] | None = None) -> int:
    """``python -m provision.formats.report_schema FILE|-``: validate a saved report of any command."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m provision.report_schema REPORT.json|-", file=sys.stderr)
        return 2
    try:
        text = sys.stdin.read() if args[0] == "-" else Path(args[0]).read_text(encoding="utf-8")
        doc = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        print(f"error: cannot read the report {args[0]}: {e}", file=sys.stderr)
        return 1
    try:
        validate_report(doc)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{report_command(doc)} report valid", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
