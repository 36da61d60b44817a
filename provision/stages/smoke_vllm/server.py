"""One vLLM OpenAI server for a smoke test: started, waited for, asked, and always stopped.

``VllmServer`` starts the ``vllm serve`` argument list (``convert.serve.serve_args_for``) through
``launch`` in its own process group on 127.0.0.1, on a free port (bind-retry: a port lost to
another program between choosing and binding is retried on a new one), waits for ``/health`` and
``/v1/models`` within ``start_timeout`` and is stopped, the whole group, on ``close`` (also from
``with``, on errors and SIGINT). A state file per server (``server-<pgid>.json`` under
``state_dir``) names the group and its owner; ``cleanup_orphans`` (run before every start) stops
a group whose owner died (SIGKILL leaves no chance to clean up) and which is still our
launcher. The server's output goes to a log file whose last lines the errors carry. It does not
compare answers (``smoke_vllm`` does).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from provision.errors import SmokeError
from provision.io.atomic import atomic_write_text

LAUNCHER = "provision.stages.smoke_vllm.launch"
_ERROR_LINE = re.compile(r"\b\w*(Error|Exception): ")
BIND_TRIES = 3
STOP_GRACE_S = 10.0


def default_state_dir() -> Path:
    """Where server state files live: ``$PROVISION_HOME/run/vllm`` (the home of ``settings``)."""
    from provision.settings import default_home

    return Path(default_home()) / "run" / "vllm"


def _proc_start(pid: int) -> str | None:
    """The start time of ``pid`` (field 22 of /proc/PID/stat), to tell a reused pid apart; None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _is_our_server(state: dict[str, Any]) -> bool:
    pid = int(state.get("pgid", 0))
    return (pid > 1 and _proc_start(pid) == state.get("pgid_start") and LAUNCHER in _cmdline(pid)
            and os.getpgid(pid) == pid)


def _alive(pid: int, start: str | None) -> bool:
    return pid > 0 and _proc_start(pid) is not None and _proc_start(pid) == start


def _kill_group(pgid: int, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM the group, wait up to ``grace`` seconds for its leader, then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def cleanup_orphans(state_dir: Path) -> list[int]:
    """Stop the servers left by runs that died (their owner is gone, the group is still our
    launcher); the process groups stopped. Servers of live runs are left alone."""
    stopped: list[int] = []
    if not state_dir.is_dir():
        return stopped
    for f in sorted(state_dir.glob("server-*.json")):
        try:
            st = json.loads(f.read_text(encoding="utf-8"))
            owner, pgid = int(st["owner"]), int(st["pgid"])
        except (OSError, ValueError, KeyError, TypeError):
            f.unlink(missing_ok=True)
            continue
        if _alive(owner, st.get("owner_start")):
            continue  # a live run's server
        try:
            ours = _is_our_server(st)
        except (ProcessLookupError, PermissionError):
            ours = False
        if ours:
            _kill_group(pgid)
            stopped.append(pgid)
        f.unlink(missing_ok=True)
    return stopped


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    """GET (or POST ``body``) ``url`` on loopback and decode the JSON answer."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="POST" if data is not None else "GET")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only: never a proxy
    with opener.open(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw.strip() else None


class VllmServer:
    """``with VllmServer(args) as srv: srv.chat(...)``; see the module docstring."""

    def __init__(self, serve_args: Sequence[str], *, start_timeout: float = 600.0, state_dir: Path | None = None,
                 env: dict[str, str] | None = None, log_lines: int = 200) -> None:
        if list(serve_args[:2]) != ["vllm", "serve"]:
            raise ValueError("serve_args must start with 'vllm serve'")
        self.serve_args = list(serve_args)
        self.start_timeout = start_timeout
        self.state_dir = state_dir or default_state_dir()
        self.env = env
        self.log_lines = log_lines
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path = Path()
        self._log_dir = ""
        self.state_file: Path | None = None
        self.load_seconds = 0.0
        self.model_id = ""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The argument list actually started: the ``vllm serve`` line plus host and port."""
        return [*self.serve_args, "--host", "127.0.0.1", "--port", str(self.port)]

    def last_log(self) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-self.log_lines:])

    def log_digest(self, keep: int = 6) -> list[str]:
        """The log lines that say what went wrong (errors, without traceback frames), else its last lines."""
        lines = [ln.strip() for ln in self.last_log().splitlines() if ln.strip()]
        errs = [ln for ln in lines if _ERROR_LINE.search(ln) and not ln.lstrip("( ").startswith("File ")]
        return list(dict.fromkeys(errs))[-keep:] or lines[-keep:]

    def _fail(self, msg: str) -> SmokeError:
        tail = self.last_log()
        digest = self.log_digest()
        return SmokeError(f"{msg} vLLM's log: " + " | ".join(digest) if digest else msg,
                          engine="vllm", command=" ".join(self.command()), log=tail)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ if self.env is None else self.env)
        env.update({"PROVISION_VLLM_PARENT": str(os.getpid()), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                    "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"})
        return env

    def _spawn(self) -> None:
        self.port = free_port()
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", LAUNCHER, *self.command()[1:]],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=self._env(), start_new_session=True, cwd=self._log_dir)
        finally:
            log.close()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_file = self.state_dir / f"server-{self.proc.pid}.json"
        atomic_write_text(self.state_file, json.dumps({
            "pgid": self.proc.pid, "pgid_start": _proc_start(self.proc.pid), "owner": os.getpid(),
            "owner_start": _proc_start(os.getpid()), "port": self.port, "command": self.command(),
            "log": str(self.log_path)}))

    def _abort(self, msg: str) -> SmokeError:
        """The error for ``msg`` with the log's last lines, after stopping the server and removing its log."""
        err = self._fail(msg)
        self.close()
        self.remove_log()
        return err

    def remove_log(self) -> None:
        if self._log_dir:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = ""

    def start(self) -> VllmServer:
        cleanup_orphans(self.state_dir)
        try:
            return self._start()
        except BaseException:  # SIGINT while waiting included: never leave the group running
            self.close()
            self.remove_log()
            raise

    def _start(self) -> VllmServer:
        self._log_dir = tempfile.mkdtemp(prefix="provision-vllm-")
        self.log_path = Path(self._log_dir) / "vllm.log"
        t0 = time.monotonic()
        for attempt in range(BIND_TRIES):
            self._spawn()
            if self._wait(t0):
                break
            if attempt + 1 == BIND_TRIES or "address already in use" not in self.last_log().lower():
                raise self._abort(f"vLLM exited before serving (exit status {self.proc and self.proc.returncode}).")
            self.close()  # the port was taken between choosing and binding: another one
        self.load_seconds = time.monotonic() - t0
        models = http_json(self.base + "/v1/models", timeout=30)
        ids = [m.get("id") for m in (models or {}).get("data", []) if isinstance(m, dict)]
        if not ids:
            raise self._abort("vLLM's /v1/models lists no model.")
        self.model_id = str(ids[0])
        return self

    def _wait(self, t0: float) -> bool:
        """True once /health answers 200; False when the server exited; SmokeError past the time limit."""
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                return False
            try:
                urllib.request.build_opener(urllib.request.ProxyHandler({})).open(self.base + "/health", timeout=5)
                return True
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() - t0 > self.start_timeout:
                raise self._abort(f"vLLM did not answer /health within {self.start_timeout:.0f} s.")
            time.sleep(0.5)

    def chat(self, body: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
        """POST an OpenAI chat completion; a server that died or answers an error is a SmokeError."""
        try:
            ans = http_json(self.base + "/v1/chat/completions", {"model": self.model_id, **body}, timeout=timeout)
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise self._fail(f"vLLM answered the smoke request with HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            state = "crashed" if self.proc is not None and self.proc.poll() is not None else "did not answer"
            raise self._fail(f"vLLM {state} during the smoke request ({e}).") from None
        if not isinstance(ans, dict):
            raise self._fail("vLLM's answer is not a JSON object.")
        return ans

    def close(self) -> None:
        """Stop the server's whole process group and forget its state file (idempotent)."""
        if self.proc is not None:
            _kill_group(self.proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        if self.state_file is not None:
            self.state_file.unlink(missing_ok=True)
            self.state_file = None

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
        self.remove_log()
