"""Global options before or after the subcommand, JSON on usage errors, help texts, bare `provision`,
shell completion."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from provision.cli.main import cli
from provision.formats.report_schema import validate_report
from tests.support.cli import cli_output

ROOT = Path(__file__).resolve().parents[2]


def _command_paths() -> list[tuple[str, click.Command]]:
    """Every command as the CLI loads it, subcommands of a group by their full path."""
    ctx = click.Context(cli)
    out: list[tuple[str, click.Command]] = []
    for name in cli.list_commands(ctx):
        cmd = cli.get_command(ctx, name)
        assert cmd is not None
        if isinstance(cmd, click.Group):
            out += [(f"{name} {sub}", c) for sub, c in cmd.commands.items()]
        else:
            out.append((name, cmd))
    return out


def test_run_accepts_quiet_after_the_subcommand(tiny_src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli_output(capsys, "run", str(tiny_src / "manifest.toml"), "--dry-run", "--offline", "--quiet")
    assert rc == 0 and err == ""
    assert out.startswith("Plan for tiny-pixtral")  # the dry run's plan is the result: stdout


def test_json_before_the_subcommand_is_the_same_as_after(capsys: pytest.CaptureFixture[str]) -> None:
    rc1, out1, _ = cli_output(capsys, "--json", "ls")
    rc2, out2, _ = cli_output(capsys, "ls", "--json")
    d1, d2 = json.loads(out1), json.loads(out2)
    assert rc1 == rc2 == 0 and d1["command"] == d2["command"] == "ls" and d1["models"] == d2["models"] == []


def test_home_before_or_after_the_subcommand_names_the_store(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "elsewhere"
    for argv in (["--home", str(store), "ls", "--json"], ["ls", "--json", "--home", str(store)],
                 ["--home", str(store), "gc", "--json"]):
        rc, out, _ = cli_output(capsys, *argv)
        assert rc == 0 and json.loads(out)["home"] == str(store), argv


def test_home_after_a_command_without_its_own_home_option_reaches_the_settings(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "doctor-home"
    rc, out, _ = cli_output(capsys, "doctor", "--offline", "--json", "--home", str(store))
    disk = next(c for c in json.loads(out)["checks"] if c["name"] == "disk")
    assert rc == 0 and str(store) in disk["detail"]


def test_log_file_and_verbose_after_the_subcommand(tiny_src: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "after.log"
    rc, _, err = cli_output(capsys, "verify", str(tiny_src), "--log-file", str(log), "-v")
    assert rc == 0
    text = log.read_text()
    assert "DEBUG hashed" in text  # a debug line: --verbose took effect, and the log file got it
    assert "hashed" in err


def test_quiet_from_before_is_not_undone_by_the_subcommand(tiny_src: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli_output(capsys, "-q", "verify", str(tiny_src), "--json")
    assert rc == 0 and err == "" and json.loads(out)["ok"] is True


@pytest.mark.parametrize(("argv", "needle"), [
    (["ls", "--no-such-option"], "No such option"),
    (["run", "magnet:?xt=urn:btih:nothex", "--dry-run"], "magnet"),
    (["verify"], "Missing argument"),
    (["plan", "pixtral-12b-2409", "--target", "gtx1080"], "Unknown target"),
    (["no-such-command"], "No such command"),
], ids=["unknown-option", "bad-magnet", "missing-argument", "bad-target", "unknown-command"])
@pytest.mark.parametrize("where", ["after", "before"])
def test_usage_errors_with_json_print_one_error_object_and_exit_2(
        argv: list[str], needle: str, where: str, capsys: pytest.CaptureFixture[str]) -> None:
    full = [*argv, "--json"] if where == "after" else ["--json", *argv]
    rc, out, err = cli_output(capsys, *full)
    assert rc == 2
    doc = json.loads(out)  # exactly one JSON document: json.loads rejects trailing data
    assert doc["ok"] is False and doc["exit_code"] == 2
    assert doc["error"]["exit_code"] == 2 and needle.lower() in doc["error"]["message"].lower()
    validate_report(doc)
    assert needle.lower() in err.lower()  # the human line stays on stderr


def test_global_options_between_a_group_and_its_subcommand(tiny_src: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli_output(capsys, "manifest", "--json", "-q", "show", str(tiny_src / "manifest.toml"))
    assert rc == 0 and err == "" and json.loads(out)["command"] == "manifest show"


def test_usage_error_report_names_the_command_it_was_for(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli_output(capsys, "manifest", "show", "--bogus", "--json")
    assert rc == 2 and json.loads(out)["command"] == "manifest show"
    rc, out, _ = cli_output(capsys, "--bogus", "--json")
    assert rc == 2 and json.loads(out)["command"] == "provision"


def test_bare_provision_prints_the_help_on_stdout_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli_output(capsys)
    assert rc == 0 and err == ""
    assert out.startswith("Usage: provision") and "Commands:" in out and "doctor" in out


def test_bare_provision_with_json_lists_the_commands_in_one_object(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli_output(capsys, "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["ok"] is True and doc["command"] == "provision"
    assert {"run", "doctor", "schema", "manifest"} <= set(doc["commands"])
    validate_report(doc)


@pytest.mark.parametrize(("path", "cmd"), _command_paths(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_command_help_ends_with_examples_of_itself(path: str, cmd: click.Command,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli_output(capsys, *path.split(), "--help")
    assert rc == 0
    tail = out.rstrip().split("\n")
    idx = max(i for i, ln in enumerate(tail) if ln.strip() == "Examples:")
    examples = [ln.strip() for ln in tail[idx + 1:]]
    assert 1 <= len(examples) <= 2 and all(e.startswith(f"provision {path}") for e in examples), examples
    # every --option an example uses is one the command has
    opts = {o for p in cmd.params for o in getattr(p, "opts", ())}
    for e in examples:
        for used in re.findall(r"(?<=\s)(--?[a-z][a-z0-9-]*)", e):
            assert used in opts, f"{path}: example uses {used}, which the command does not have"


@pytest.mark.parametrize(("path", "cmd"), _command_paths(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_command_takes_every_global_option(path: str, cmd: click.Command) -> None:
    opts = {o for p in cmd.params for o in getattr(p, "opts", ())}
    assert {"--json", "--quiet", "-q", "--verbose", "-v", "--log-file", "--home"} <= opts, path


@pytest.mark.parametrize(("path", "cmd"), _command_paths(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_option_that_reads_an_environment_variable_shows_it(path: str, cmd: click.Command,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli_output(capsys, *path.split(), "--help")
    assert rc == 0
    flat = " ".join(out.split())
    for p in cmd.params:
        if isinstance(p, click.Option) and p.envvar:
            assert f"env var: {p.envvar}" in flat, f"{path} {p.opts}"
    if "--home" in {o for p in cmd.params for o in getattr(p, "opts", ())}:
        assert "PROVISION_HOME" in flat, path


def test_group_help_shows_the_environment_variables(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli_output(capsys, "--help")
    flat = " ".join(out.split())
    assert rc == 0
    for var in ("PROVISION_QUIET", "PROVISION_VERBOSE", "PROVISION_LOG_FILE", "PROVISION_HOME"):
        assert var in flat, var


def test_import_pickle_help_names_no_dir_it_has_no_option_for(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli_output(capsys, "import-pickle", "--help")
    assert rc == 0
    assert not re.search(r"\bDIR\b", out), out


def test_target_help_lists_the_cards_of_the_one_table(capsys: pytest.CaptureFixture[str]) -> None:
    from provision.hardware import CARDS

    for path in ("plan", "run", "convert"):
        rc, out, _ = cli_output(capsys, path, "--help")
        flat = " ".join(out.split())
        assert rc == 0 and all(f"{k} (sm_" in flat for k in CARDS), path
    assert {"rtx4090", "rtx3090", "l40s", "a6000", "h200", "gh200", "b200"} <= set(CARDS)


def test_bash_completion_script_is_produced() -> None:
    env = dict(os.environ, _PROVISION_COMPLETE="bash_source")
    r = subprocess.run([sys.executable, "-m", "provision.cli.main"], capture_output=True, text=True, timeout=60,
                       cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    assert "_provision_completion()" in r.stdout and "complete -o nosort -F _provision_completion provision" in r.stdout


def test_completion_offers_the_commands() -> None:
    env = dict(os.environ, _PROVISION_COMPLETE="bash_complete", COMP_WORDS="provision do", COMP_CWORD="1")
    r = subprocess.run([sys.executable, "-m", "provision.cli.main"], capture_output=True, text=True, timeout=60,
                       cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    assert "plain,doctor" in r.stdout.splitlines()
