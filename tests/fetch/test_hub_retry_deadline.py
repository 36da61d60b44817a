"""One retry layer for the Hub: a host name that does not resolve is one error line and exit 4 with
no retry; a refused connection is retried a bounded number of times within --stall-timeout, one
note per retry, then one error line and exit 4; huggingface_hub's own log lines never reach the
terminal unless --verbose asks, and always reach --log-file."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from provision.cli.console import Terminal
from provision.stages.fetch.hub.env import route_hub_logging
from provision.stages.fetch.hub.errors import RetryPolicy, unresolved_host
from provision.testing.torrent_fixtures import provision_env

ROOT = Path(__file__).resolve().parents[2]
RETRIES = 5  # HubOptions.retries: at most this many retries of one request


def _provision(*argv: str, endpoint: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**provision_env(), "HF_ENDPOINT": endpoint, "PROVISION_HOME": str(home)}
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, "-m", "provision.cli.main", *argv], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=300)


@pytest.fixture()
def refusing_port() -> Iterator[int]:
    """A loopback port that is bound but never listens: every connection to it is refused."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


@pytest.mark.parametrize("source", ["hf://org/repo", "manifest"])
def test_an_unresolvable_hub_host_is_one_error_line_and_exit_4_without_retries(
    source: str, tiny_src: Path, tmp_path: Path
) -> None:
    # .invalid never resolves (RFC 6761); "manifest": a pinned commit, listed without model_info
    src = str(tiny_src / "manifest.toml") if source == "manifest" else source
    cp = _provision("fetch", src, "--source", "hf", "--stall-timeout", "60", endpoint="http://hub.example.invalid",
                    home=tmp_path / "home")
    assert cp.returncode == 4, cp.stderr
    lines = cp.stderr.splitlines()
    assert len(lines) == 1, cp.stderr  # no retry notes, no library lines
    assert lines[0].startswith("error: Cannot resolve the host name hub.example.invalid of http://hub.example.invalid")


@pytest.mark.slow
def test_a_refused_hub_connection_ends_in_one_error_line_and_exit_4_with_no_library_lines(
    refusing_port: int, tmp_path: Path
) -> None:
    cp = _provision("fetch", "hf://org/repo", "--stall-timeout", "3", endpoint=f"http://127.0.0.1:{refusing_port}",
                    home=tmp_path / "home")
    assert cp.returncode == 4, cp.stderr
    lines = cp.stderr.splitlines()
    retries = [ln for ln in lines if ln.startswith("the Hub answered ConnectError; retrying in ")]
    assert len(retries) <= RETRIES  # (the plan's listing retries without notes: it has no progress callback)
    assert lines == [*retries, lines[-1]]  # nothing else: huggingface_hub printed no line of its own
    assert lines[-1].startswith(f"error: Cannot reach http://127.0.0.1:{refusing_port} for hf://org/repo@main: "
                                "the connection was refused.")


def test_the_retry_policy_cuts_every_wait_to_the_deadline_and_gives_up_past_it() -> None:
    class Refused(Exception):
        pass

    p = RetryPolicy(retries=5, deadline_s=2.0)
    waits = []
    for attempt in range(5):
        w = p.wait_before_retry(Refused("connection refused"), None, attempt)
        assert w is not None
        waits.append(w)
    assert all(0 <= w <= 2.0 for w in waits)  # none waits past the 2 s deadline
    assert p.wait_before_retry(Refused("x"), None, 5) is None  # the sixth try: more than 5 retries
    assert RetryPolicy(retries=5, deadline_s=0.0).wait_before_retry(Refused("x"), None, 0) is None
    assert RetryPolicy(retries=5, deadline_s=60).wait_before_retry(Refused("x"), 404, 0) is None  # not transient
    assert RetryPolicy(retries=5, deadline_s=60).wait_before_retry(Refused("x"), 503, 0) is not None


def test_a_name_lookup_failure_is_recognised_through_the_exception_chain() -> None:
    try:
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except socket.gaierror as inner:
            raise ConnectionError("connect failed") from inner
    except ConnectionError as outer:
        assert unresolved_host(outer)
    assert not unresolved_host(ConnectionRefusedError(111, "Connection refused"))


def test_huggingface_hub_log_lines_go_to_verbose_and_the_log_file_not_to_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    route_hub_logging()
    hub_logger = logging.getLogger("huggingface_hub.utils._http")
    log = tmp_path / "provision.log"
    t = Terminal(log_file=log)
    capsys.readouterr()
    hub_logger.warning("Retrying in 1s [Retry 1/5].")
    out, err = capsys.readouterr()
    assert (out, err) == ("", "")
    t.close()
    assert "huggingface_hub.utils._http: Retrying in 1s [Retry 1/5]." in log.read_text()
    Terminal(verbose=True)
    hub_logger.warning("Retrying in 2s [Retry 2/5].")
    out, err = capsys.readouterr()
    assert out == "" and "huggingface_hub.utils._http: Retrying in 2s [Retry 2/5]." in err
