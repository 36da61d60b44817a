"""The `provision run --json` report schema: it is valid 2020-12, accepts good reports, names bad paths."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from provision.cli.app import App
from provision.cli.console import Terminal
from provision.errors import LockTimeoutError
from provision.formats.report_schema import load_schema, main, report_errors, schema_text, validate_report
from provision.settings import Settings
from provision.version import JSON_SCHEMA_VERSION, __version__
from tests.support.cli import cli_json


@pytest.fixture()
def good_report(tiny_src: Path, tmp_path: Path) -> dict[str, Any]:
    """A successful run's report: the real envelope, a real plan of the tiny model, five stages."""
    from provision.stages.plan import make_plan

    plan = make_plan(str(tiny_src / "manifest.toml"), home=tmp_path / "home", offline=True)
    app = App(terminal=Terminal(), settings=Settings.load(), command="run")
    assert plan.manifest is not None
    app.manifest_sha256 = plan.manifest.sha256
    doc = app.envelope(True, 0)
    doc["plan"] = plan.to_dict()
    doc["stages"] = [
        {"stage": "plan", "result": "ok", "seconds": 0.01, "bytes": 0, "details": {}},
        {"stage": "fetch", "result": "ok", "seconds": 1.5, "bytes": plan.bytes_total,
         "details": {"source": "torrent", "peers": 1}},
        {"stage": "verify", "result": "skipped", "seconds": 0.0, "bytes": 0, "reason": "state matches",
         "details": {}},
        {"stage": "convert", "result": "ok", "seconds": 2.0, "bytes": 1234, "profile": "fp8-hf",
         "details": {"scheme": "fp8"}},
        {"stage": "smoke", "result": "ok", "seconds": 3.0, "bytes": 0, "profile": "fp8-hf",
         "details": {"checks": {"image_tokens": True}}},
    ]
    return json.loads(json.dumps(doc))


def test_schema_is_a_valid_draft_2020_12_schema_shipped_in_the_package() -> None:
    from jsonschema import Draft202012Validator

    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    assert json.loads(schema_text()) == schema
    assert schema["properties"]["schema_version"]["const"] == JSON_SCHEMA_VERSION


def test_a_successful_run_report_validates(good_report: dict[str, Any]) -> None:
    validate_report(good_report)
    assert report_errors(good_report) == []
    assert good_report["version"] == __version__


def test_failing_run_json_reports_from_the_cli_validate(tiny_copy: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Real `provision run --json` failures, each through its own error path, validate against the schema."""
    manifest = str(tiny_copy / "manifest.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("schema_version = 1\nname = 'x'\n")  # no architecture, format, sources or files
    rc, doc, _ = cli_json(capsys, "run", str(bad), "--home", str(tmp_path / "h1"))
    assert rc == 3 and doc["ok"] is False and doc["error"]["kind"] == "manifest"
    validate_report(doc)

    weights = tiny_copy / "consolidated.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF  # one flipped byte: the adopted original fails its sha256
    weights.write_bytes(bytes(raw))
    rc, doc, _ = cli_json(capsys, "run", manifest, "--home", str(tmp_path / "h2"), "--adopt", str(tiny_copy))
    assert rc == 5 and doc["ok"] is False and doc["exit_code"] == 5
    assert doc["error"]["kind"] == "hash_mismatch" and doc["error"]["context"]["path"] == "consolidated.safetensors"
    validate_report(doc)


def test_a_lock_timeout_error_report_validates() -> None:
    app = App(terminal=Terminal(), settings=Settings.load(), command="run")
    err = LockTimeoutError("Model x is locked.", holder_pid=12, holder_host="h")
    doc = app.envelope(False, err.exit_code)
    doc["error"] = err.to_dict()
    validate_report(json.loads(json.dumps(doc)))


def _mutate(doc: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    d = copy.deepcopy(doc)
    cur: Any = d
    for k in path[:-1]:
        cur = cur[k]
    if value is _DELETE:
        del cur[path[-1]]
    else:
        cur[path[-1]] = value
    return d


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "where"),
    [
        (["stages", 1, "result"], "maybe", "$.stages[1].result"),
        (["stages", 0, "stage"], "download", "$.stages[0].stage"),
        (["stages", 2, "bytes"], -1, "$.stages[2].bytes"),
        (["stages", 3, "details"], _DELETE, "$.stages[3]"),
        (["stages", 4, "seconds"], "3s", "$.stages[4].seconds"),
        (["plan"], _DELETE, "$"),
        (["plan", "files", 0, "sha256"], "XYZ", "$.plan.files[0].sha256"),
        (["plan", "hardware", "cpu_count"], 0, "$.plan.hardware.cpu_count"),
        (["manifest_sha256"], "not-a-hash", "$.manifest_sha256"),
        (["exit_code"], 3, "$.exit_code"),
        (["schema_version"], 2, "$.schema_version"),
        (["tool"], "other", "$.tool"),
        (["seconds"], _DELETE, "$"),
    ],
)
def test_a_bad_report_raises_value_error_naming_the_path(good_report: dict[str, Any], path: list[Any], value: Any,
                                                         where: str) -> None:
    bad = _mutate(good_report, path, value)
    with pytest.raises(ValueError, match="run report invalid at ") as ei:
        validate_report(bad)
    assert str(ei.value).startswith(f"run report invalid at {where}:"), str(ei.value)
    assert report_errors(bad)


def test_a_failed_report_must_carry_the_error(good_report: dict[str, Any]) -> None:
    bad = _mutate(_mutate(good_report, ["ok"], False), ["exit_code"], 4)
    with pytest.raises(ValueError, match="'error' is a required property"):
        validate_report(bad)
    ok_with_error = _mutate(good_report, ["error"], {"kind": "fetch", "exit_code": 4, "message": "x"})
    with pytest.raises(ValueError):
        validate_report(ok_with_error)


def test_not_an_object_is_invalid() -> None:
    with pytest.raises(ValueError, match=r"at \$:"):
        validate_report([1, 2])


def test_module_cli_validates_a_saved_report(good_report: dict[str, Any], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    good, bad, junk = tmp_path / "good.json", tmp_path / "bad.json", tmp_path / "junk.json"
    good.write_text(json.dumps(good_report))
    bad.write_text(json.dumps(_mutate(good_report, ["stages", 1, "result"], "maybe")))
    junk.write_text("{")
    assert main([str(good)]) == 0
    assert main([str(bad)]) == 1
    assert "$.stages[1].result" in capsys.readouterr().err
    assert main([str(junk)]) == 1
    assert main([str(tmp_path / "missing.json")]) == 1
    assert main([]) == 2
