"""What the README promises about output: the Hub token is never printed or logged (``--verbose``,
``--log-file``), progress without a TTY is plain lines at ``PROVISION_PROGRESS_INTERVAL``,
``NO_COLOR`` means no colours, and the Python API prints nothing."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provision.cli.main import run_cli
from provision.testing.hub_server import TOKENS, LoopbackHub
from provision.testing.tiny import TINY_REPO
from provision.testing.torrent_fixtures import PROVISION, REPO, provision_env, run_provision, stop_process

ALICE = next(t for t, user in TOKENS.items() if user == "alice")


# -- the token ------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["--token", "HF_TOKEN"])
def test_the_hub_token_is_never_printed_or_logged_under_verbose_and_log_file(
    hub: LoopbackHub, tmp_path: Path, how: str
) -> None:
    log = tmp_path / "provision.log"
    args = ["--verbose", "--log-file", str(log), "fetch", f"hf://{TINY_REPO}", "--dest", str(tmp_path / "out"),
            "--json"]
    env = provision_env()
    if how == "--token":
        args += ["--token", ALICE]
    else:
        env["HF_TOKEN"] = ALICE
    cp = run_provision(args, env=env, timeout=120)
    assert cp.returncode == 0, cp.stderr[-3000:]
    # the token was really in play: the Hub endpoint received it
    assert f"Bearer {ALICE}" in hub.authorizations("hub")
    logged = log.read_text()
    assert f"hf://{TINY_REPO}" in logged  # the log file did receive the run's messages
    for where, text in (("stdout", cp.stdout), ("stderr", cp.stderr), ("log file", logged)):
        assert ALICE not in text, f"the token appears in {where}"
        assert ALICE[-10:] not in text, f"a piece of the token appears in {where}"


def test_a_rejected_token_is_not_echoed_in_the_error_or_the_log(hub: LoopbackHub, tmp_path: Path) -> None:
    bogus = "hf_not_a_known_token_9876543210"  # not in TOKENS: the hub answers 401 for a gated repo
    gated = tmp_path / "gated"
    gated.mkdir()
    (gated / "config.json").write_text("{}\n")
    hub.add_folder("org/gated", gated, gated=True)
    log = tmp_path / "provision.log"
    cp = run_provision(["--verbose", "--log-file", str(log), "fetch", "hf://org/gated", "--dest",
                        str(tmp_path / "out"), "--token", bogus, "--json"], timeout=120)
    assert cp.returncode == 4, cp.stderr[-3000:]
    assert f"Bearer {bogus}" in hub.authorizations("hub")
    for where, text in (("stdout", cp.stdout), ("stderr", cp.stderr), ("log file", log.read_text())):
        assert bogus not in text, f"the token appears in {where}"


# -- progress without a TTY -------------------------------------------------------------------
def _smoke_stderr(tiny_src: Path, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert run_cli(["smoke", str(tiny_src), "--device", "cpu", "--max-tokens", "6"]) == 0
    return capsys.readouterr().err


def test_progress_without_a_tty_is_plain_lines_at_the_interval_the_environment_sets(
    tiny_src: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # interval 0: every token event after the first (which starts the clock) prints a line; 6 tokens give
    # 2/6 .. 5/6 and the final one: 2/6 = 33%, 3/6 = 50%, 4/6 = 67%, 5/6 = 83%, 6/6 = 100%
    monkeypatch.setenv("PROVISION_PROGRESS_INTERVAL", "0")
    err = _smoke_stderr(tiny_src, capsys)
    assert "\r" not in err and "\x1b" not in err  # no carriage-return redraws, no terminal escapes
    # tokens are counted as tokens (not bytes), with one rate per line; the end is one summary line
    gen = [_SECONDS.sub("", _RATE.sub("R", ln)) for ln in err.splitlines() if ln.startswith("generating:")]
    assert gen == ["generating: 2/6 tokens (33%) R tokens/s", "generating: 3/6 tokens (50%) R tokens/s",
                   "generating: 4/6 tokens (67%) R tokens/s", "generating: 5/6 tokens (83%) R tokens/s",
                   "generating: done, 6 tokens (R tokens/s)"]
    # an interval longer than the run: only the final line of the task
    monkeypatch.setenv("PROVISION_PROGRESS_INTERVAL", "1000")
    err = _smoke_stderr(tiny_src, capsys)
    assert "\r" not in err and "\x1b" not in err
    assert [_SECONDS.sub("", _RATE.sub("R", ln)) for ln in err.splitlines()
            if ln.startswith("generating:")] == [
        "generating: done, 6 tokens (R tokens/s)"]


_RATE = re.compile(r"\b\d+\.\d(?= tokens/s)")  # a measured rate: its value depends on the machine
_SECONDS = re.compile(r" in \d+\.\d s")  # a measured duration (left out under 0.05 s: a fast machine)


# -- NO_COLOR ---------------------------------------------------------------------------------
_SGR = re.compile(r"\x1b\[([0-9;]*)m")


def _colour_params(text: str) -> list[str]:
    """SGR parameters that set a colour: 30-38 / 40-48 (foreground / background, 38/48 extended),
    90-97 / 100-107 (bright). Bold (1), dim (2) and reset (0) are not colours."""
    out = []
    for m in _SGR.finditer(text):
        for p in (m.group(1) or "0").split(";"):
            n = int(p) if p.isdigit() else -1
            if 30 <= n <= 38 or 40 <= n <= 48 or 90 <= n <= 97 or 100 <= n <= 107:
                out.append(p)
    return out


def _on_a_tty(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``provision ARGV`` with stdin, stdout and stderr on a pseudo-terminal; its exit code and output."""
    master, slave = pty.openpty()
    p = subprocess.Popen([*PROVISION, *argv], stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO,
                         close_fds=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        stop_process(p, signal.SIGKILL)
    return rc, out.decode("utf-8", "replace")


def test_no_color_turns_colours_off_on_a_terminal() -> None:
    argv = ["plan", "no-such-model-for-no-color"]  # exit 3: the red "error:" line
    env = provision_env()
    env.pop("NO_COLOR", None)
    env.pop("FORCE_COLOR", None)
    env["TERM"] = "xterm-256color"
    rc, coloured = _on_a_tty(argv, env)
    assert rc == 3 and "no-such-model-for-no-color" in coloured
    assert _colour_params(coloured), f"a terminal without NO_COLOR should get colours: {coloured!r}"
    rc, plain = _on_a_tty(argv, {**env, "NO_COLOR": "1"})
    assert rc == 3 and "no-such-model-for-no-color" in plain
    assert _colour_params(plain) == [], repr(plain)


# -- the Python API prints nothing ------------------------------------------------------------
_API_SCRIPT = """
import sys
from pathlib import Path
import provision
from provision import api
src, work, manifest = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[1] + "/manifest.toml"
p = api.plan(manifest, home=work / "home", offline=True)
f = api.fetch(manifest, home=work / "home", dest=work / "fetched")  # auto: the manifest has only hf
v = api.verify(work / "fetched", manifest)
v.raise_for_failure()
c = api.convert(work / "fetched", work / "converted", target="cpu", scheme="bf16")
s = api.smoke(work / "converted", device="cpu", max_tokens=2)
r = provision.run(manifest, home=work / "home2", adopt=work / "fetched", skip_smoke=True, target="cpu")
assert s.passed and [x["result"] for x in r.stages] == ["ok"] * 4, r.stages
assert len(p.files) == 3 and len(f.files) == 3
"""


@pytest.mark.slow
def test_the_python_api_prints_nothing_on_stdout_or_stderr(hub: LoopbackHub, tiny_src: Path, tmp_path: Path) -> None:
    script = tmp_path / "api_calls.py"
    script.write_text(_API_SCRIPT)
    cp = subprocess.run([sys.executable, str(script), str(tiny_src), str(tmp_path / "work")], capture_output=True,
                        text=True, timeout=300, cwd=REPO, env=provision_env())
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert (tmp_path / "work" / "converted").is_dir()  # the calls really ran
    assert cp.stdout == ""
    assert cp.stderr == ""
