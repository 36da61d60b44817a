"""The JSON schema of the ``provision run --json`` report, and a validator for it.

The schema (JSON Schema draft 2020-12) ships as ``provision/data/run-report.schema.json``: the
envelope every command's report carries (``schema_version``, ``tool``, ``version``, ``command``,
``ok``, ``exit_code``, ``manifest_sha256``, ``seconds``, ``error`` on failure), the ``plan`` (as
``Plan.to_dict`` writes it) and ``stages``: one ``{stage, result, seconds, bytes, details}`` per
pipeline stage. ``validate_report(doc)`` raises ``ValueError`` naming the JSON path of the first
problem. CI can check a saved report with ``python -m provision.formats.report_schema report.json``
(or ``-`` for stdin): exit 0 when valid, 1 with the error otherwise.

This module builds no report (``provision run`` does) and imports ``jsonschema`` only when a
report is validated.
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

SCHEMA_RESOURCE = "run-report.schema.json"


def schema_text() -> str:
    """The schema file's text, as shipped in the package."""
    return resources.files("provision").joinpath("data", SCHEMA_RESOURCE).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    doc = json.loads(schema_text())
    assert isinstance(doc, dict)
    return doc


def load_schema() -> dict[str, Any]:
    """A fresh copy of the schema as a dict."""
    return json.loads(json.dumps(_schema()))  # type: ignore[no-any-return]


@lru_cache(maxsize=1)
def _validator() -> Any:
    from jsonschema import Draft202012Validator

    schema = _schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def validate_report(doc: Any) -> None:
    """Raise ``ValueError("<json path>: <problem>")`` for the first problem in ``doc``; None when valid."""
    from jsonschema.exceptions import best_match

    err = best_match(_validator().iter_errors(doc))
    if err is None:
        return
    raise ValueError(f"run report invalid at {err.json_path}: {err.message}")


def report_errors(doc: Any) -> list[str]:
    """Every problem in ``doc``, one ``<json path>: <problem>`` line each (empty when valid)."""
    errs = sorted(_validator().iter_errors(doc), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    return [f"{e.json_path}: {e.message}" for e in errs]


def main(argv: list[str] | None = None) -> int:
    """``python -m provision.formats.report_schema FILE|-``: validate a saved report."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m provision.formats.report_schema REPORT.json|-", file=sys.stderr)
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
    print("report valid", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
