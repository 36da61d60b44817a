"""The output contract: a command's result on stdout, notes on stderr, --quiet silences stderr only,
--json puts exactly one JSON object on stdout and nothing else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from provision.cli.main import run_cli
from tests.support.cli import cli_output, provision_home

ROOT = Path(__file__).resolve().parents[2]


def _one_json_object(out: str) -> dict[str, Any]:
    """stdout parsed as exactly one JSON object, nothing before or after it but whitespace."""
    dec = json.JSONDecoder()
    text = out.strip()
    doc, end = dec.raw_decode(text)
    assert end == len(text), f"more than one JSON document on stdout: {text[end:end + 80]!r}"
    assert isinstance(doc, dict)
    return doc


def _store_with_tiny(tiny_src: Path) -> None:
    """Adopt the tiny checkpoint into this test's store, so ls has a row to print."""
    assert run_cli(["run", str(tiny_src / "manifest.toml"), "--adopt", str(tiny_src), "--skip-convert",
                    "--skip-smoke", "--quiet"]) == 0


def _shell(cmd: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, **env)
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120, cwd=ROOT, env=full)


def _provision() -> str:
    return f"{sys.executable} -m provision.cli.main"


@pytest.mark.slow
def test_ls_prints_its_table_with_stderr_closed_or_discarded(tiny_src: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    _store_with_tiny(tiny_src)
    closed = _shell(f"exec 2>&-; {_provision()} ls")
    assert closed.returncode == 0
    assert "tiny-pixtral" in closed.stdout and "model" in closed.stdout  # the header and the row
    discarded = _shell(f"{_provision()} ls 2>/dev/null")
    assert discarded.returncode == 0 and discarded.stdout == closed.stdout


def test_quiet_ls_still_prints_the_table_and_nothing_on_stderr(tiny_src: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    _store_with_tiny(tiny_src)
    for argv in (["-q", "ls"], ["ls", "-q"], ["ls", "--quiet"]):
        rc, out, err = cli_output(capsys, *argv)
        assert rc == 0 and err == "", argv
        assert "tiny-pixtral" in out, argv


def test_ls_json_prints_one_object_and_the_table_moves_to_stderr(tiny_src: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    _store_with_tiny(tiny_src)
    rc, out, err = cli_output(capsys, "ls", "--json")
    assert rc == 0
    doc = _one_json_object(out)
    assert [m["name"] for m in doc["models"]] == ["tiny-pixtral"]
    assert "tiny-pixtral" in err  # the human table is still shown, on stderr
    rc, out, err = cli_output(capsys, "ls", "--json", "--quiet")
    assert rc == 0 and err == "" and _one_json_object(out)["command"] == "ls"


def test_empty_store_ls_says_so_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli_output(capsys, "ls")
    assert rc == 0 and out == f"No models in {provision_home()}.\n" and err == ""


def test_plan_table_goes_to_stdout_and_notes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli_output(capsys, "plan", "pixtral-12b-2409", "--offline", "--target", "h100")
    assert rc == 0
    assert out.startswith("Plan for pixtral-12b-2409 (manifest)\n")
    assert "consolidated.safetensors" in out and "Conversion profiles for" in out
    assert "Plan for" not in err
    rc, qout, qerr = cli_output(capsys, "plan", "pixtral-12b-2409", "--offline", "--target", "h100", "--quiet")
    assert rc == 0 and qerr == ""
    assert qout.splitlines()[0] == out.splitlines()[0]


def test_manifest_show_goes_to_stdout(tiny_src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli_output(capsys, "manifest", "show", str(tiny_src / "manifest.toml"), "-q")
    assert rc == 0 and err == ""
    assert out.startswith("tiny-pixtral (pixtral, mistral format) from ")
    assert "  complete: yes" in out


def test_verify_per_file_lines_go_to_stdout_and_the_summary_to_stderr(tiny_src: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli_output(capsys, "verify", str(tiny_src), "--manifest", str(tiny_src / "manifest.toml"))
    assert rc == 0
    lines = out.splitlines()
    assert any(ln.startswith("ok       consolidated.safetensors") for ln in lines)
    assert any(ln.startswith("ok       params.json") for ln in lines)
    assert "files verified" in err and "files verified" not in out


def test_tiny_file_list_is_the_result_on_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli_output(capsys, "tiny", str(tmp_path / "t"), "--quiet")
    assert rc == 0 and err == ""
    names = [ln.split()[0] for ln in out.splitlines()]
    assert names == sorted(p.name for p in (tmp_path / "t").iterdir() if p.name != "manifest.toml")


def test_log_file_records_the_result_lines_too(tiny_src: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "log.txt"
    rc, out, _ = cli_output(capsys, "manifest", "show", str(tiny_src / "manifest.toml"), "--log-file", str(log))
    assert rc == 0
    logged = log.read_text()
    assert all(ln.rstrip() in logged for ln in out.splitlines() if ln.strip())


_JSON_COMMANDS: list[list[str]] = [
    ["ls"], ["gc", "--dry-run"], ["plan", "pixtral-12b-2409", "--offline"], ["manifest", "show", "pixtral-12b-2409"],
    ["schema", "ls"], ["schema", "--list"], ["doctor", "--offline"], ["rm", "nothing-here", "--yes"],
]


@pytest.mark.parametrize("argv", _JSON_COMMANDS, ids=lambda a: " ".join(a))
def test_json_prints_exactly_one_object_on_stdout(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli_output(capsys, *argv, "--json")
    doc = _one_json_object(out)
    assert doc["exit_code"] == rc
    assert doc["command"] == (" ".join(argv[:2]) if argv[0] == "manifest" else argv[0])


def test_rm_lists_what_it_removed_on_stdout(tiny_src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _store_with_tiny(tiny_src)
    rc, out, err = cli_output(capsys, "rm", "tiny-pixtral", "--yes", "--quiet")
    assert rc == 0 and err == ""
    assert out.splitlines() and all(ln.startswith("removed ") for ln in out.splitlines())
    assert str(provision_home() / "models" / "tiny-pixtral") in out


def _success_cases() -> list[Any]:
    from tests.cli.test_every_report_schema import CASES, SLOW

    return [pytest.param(c, build, id=c, marks=[pytest.mark.slow] if (c, case) in SLOW else [])
            for c, case, build, code in CASES if code == 0]


@pytest.mark.parametrize(("command", "build"), _success_cases())
def test_quiet_leaves_stderr_empty_for_every_command(command: str, build: Any, request: pytest.FixtureRequest,
                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = build(request, tmp_path)
    rc, out, err = cli_output(capsys, *argv, "--quiet")
    assert rc == 0 and err == "", f"{command}: {err[:300]}"
    if command in ("ls", "plan", "manifest show", "manifest lock", "verify", "tiny", "seed", "rm", "doctor",
                   "schema", "run", "convert"):
        assert out.strip(), f"{command} printed no result on stdout"


def test_fetch_prints_where_the_verified_files_are_on_stdout_and_nothing_else(
    hub: object, tiny_src: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = cli_output(capsys, "fetch", str(tiny_src / "manifest.toml"), "-q")
    assert rc == 0 and err == "", err
    dest = provision_home() / "models" / "tiny-pixtral" / "original"  # the store's layout: models/<name>/original
    assert out == f"{dest}\n"
    assert (dest / "consolidated.safetensors").is_file()
