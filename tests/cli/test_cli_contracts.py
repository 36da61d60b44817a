"""CLI contracts: cheap --help, --version, the --json envelope, exit codes, SIGTERM -> 143."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provision.cli.main import cli, run_cli
from provision.errors import EXIT_CODES
from provision.testing.torrent_fixtures import stop_process
from provision.version import JSON_SCHEMA_VERSION, __version__

ROOT = Path(__file__).resolve().parents[2]


def _py(code: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT, **kw)  # type: ignore[call-overload]


def test_help_imports_neither_torch_nor_libtorrent_nor_huggingface_hub() -> None:
    code = (
        "import sys\n"
        "from provision.cli.main import run_cli\n"
        "rc = run_cli(['--help'])\n"
        "heavy = [m for m in ('torch', 'libtorrent', 'huggingface_hub', 'mistral_common', 'safetensors') if m in sys.modules]\n"
        "print(rc, heavy)\n"
    )
    r = _py(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("0 []"), r.stdout


def test_every_command_help_is_cheap_too() -> None:
    names = cli.list_commands(None)  # type: ignore[arg-type]
    code = (
        "import sys\nfrom provision.cli.main import run_cli\n"
        f"for n in {names!r}: assert run_cli([n, '--help']) == 0, n\n"
        "print([m for m in ('torch', 'libtorrent', 'huggingface_hub') if m in sys.modules])\n"
    )
    r = _py(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("[]"), r.stdout


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_every_command_accepts_json() -> None:
    for name in cli.list_commands(None):  # type: ignore[arg-type]
        cmd = cli.get_command(None, name)  # type: ignore[arg-type]
        assert cmd is not None
        params = {p.name for p in cmd.params}
        if hasattr(cmd, "commands"):  # a group: every subcommand
            for sub in cmd.commands.values():  # type: ignore[attr-defined]
                assert "json_out" in {p.name for p in sub.params}, f"{name} {sub.name}"
        else:
            assert "json_out" in params, name


def test_json_envelope_carries_schema_version_tool_version_and_manifest_hash(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_cli(["plan", "pixtral-12b-2409", "--offline", "--json"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["schema_version"] == JSON_SCHEMA_VERSION
    assert doc["version"] == __version__ and doc["tool"] == "provision" and doc["command"] == "plan"
    raw = (ROOT / "manifests" / "pixtral-12b-2409.toml").read_bytes()
    import hashlib

    assert doc["manifest_sha256"] == hashlib.sha256(raw).hexdigest()
    assert doc["ok"] is True and doc["exit_code"] == 0
    assert "Plan for pixtral-12b-2409" in captured.err  # humans read stderr, machines stdout


def test_unknown_option_is_a_usage_error_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["plan", "pixtral-12b-2409", "--no-such-flag"]) == 2
    assert "No such option" in capsys.readouterr().err


def test_exit_code_table_matches_the_design() -> None:
    assert sorted(EXIT_CODES) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 130, 143]


def test_readme_documents_every_exit_code() -> None:
    readme = (ROOT / "README.md").read_text()
    for code in EXIT_CODES:
        assert f"| {code} " in readme, code


def _sleeper_script(tmp_path: Path) -> Path:
    script = tmp_path / "sleeper.py"
    script.write_text(
        "import sys, time, click\n"
        "from provision.cli.main import cli, run_cli\n"
        "from provision.errors import Interrupted\n"
        "@cli.command('sleep')\n"
        "def sleep():\n"
        "    try:\n"
        "        print('ready', flush=True)\n"
        "        time.sleep(30)\n"
        "    except (Interrupted, KeyboardInterrupt):\n"
        "        open(sys.argv[1], 'w').write('saved')\n"
        "        raise\n"
        "sys.exit(run_cli(['sleep']))\n"
    )
    return script


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_exit_143_and_130_after_cleanup_runs(tmp_path: Path, sig: int, code: int) -> None:
    marker = tmp_path / "saved"
    p = subprocess.Popen([sys.executable, str(_sleeper_script(tmp_path)), str(marker)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ))
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        p.send_signal(sig)
        _, err = p.communicate(timeout=20)
    finally:
        stop_process(p, signal.SIGKILL)
    assert p.returncode == code, err
    assert marker.read_text() == "saved"
    assert "Traceback" not in err


def test_unexpected_errors_exit_1_without_traceback_unless_debug(tmp_path: Path) -> None:
    script = tmp_path / "boom.py"
    script.write_text(
        "import sys\nfrom provision.cli.main import cli, run_cli\n"
        "@cli.command('boom')\ndef boom():\n    raise RuntimeError('kaput')\n"
        "sys.exit(run_cli(['boom']))\n"
    )
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 1 and "kaput" in r.stderr and "Traceback" not in r.stderr
    env = dict(os.environ, PROVISION_DEBUG="1")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_quiet_prints_nothing_but_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["--quiet", "plan", "pixtral-12b-2409", "--offline"]) == 0
    assert capsys.readouterr().err == ""


def test_quiet_failure_keeps_only_the_one_line_error_and_the_exit_code(
        tiny_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support.files import data_offset, flip_byte

    model = tiny_copy
    weights = model / "consolidated.safetensors"
    flip_byte(weights, data_offset(weights) + 1000)  # one tensor byte: its sha256 is no longer the manifest's
    argv = ["verify", str(model), "--manifest", str(model / "manifest.toml")]
    assert run_cli(argv) == 5  # 5: verification failed (the README's table)
    loud = capsys.readouterr()
    loud_lines = loud.err.splitlines()
    errors = [ln for ln in loud_lines if ln.startswith("error: ")]
    assert len(errors) == 1 and "consolidated.safetensors" in errors[0]
    assert len(loud_lines) > 1  # without --quiet there is more than the error to suppress
    assert run_cli(["--quiet", *argv]) == 5
    quiet = capsys.readouterr()
    # --quiet silences stderr only: the per-file result lines stay on stdout (the output contract)
    assert quiet.out.startswith("failed   consolidated.safetensors")
    assert quiet.err.splitlines() == errors  # the same one line, nothing else


def test_quiet_usage_error_still_says_what_is_wrong_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["--quiet", "plan", "pixtral-12b-2409", "--offline", "--target", "gtx1080"]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    lines = cap.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Unknown target 'gtx1080'")


def test_log_file_receives_every_message(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    assert run_cli(["--log-file", str(log), "--quiet", "plan", "pixtral-12b-2409", "--offline"]) == 0
    assert "Plan for pixtral-12b-2409" in log.read_text()
