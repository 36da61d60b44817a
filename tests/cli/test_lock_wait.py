"""A run that waits for the model's lock says so at once, and again every few seconds: who holds
it (pid, command), for how long, and the timeout; it never sits silent until it gives up."""

from __future__ import annotations

import itertools
import math
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from provision.layout import Layout
from provision.store.lock import LockWait, ModelLock
from provision.testing.torrent_fixtures import provision_env, stop_process

ROOT = Path(__file__).resolve().parents[2]
NAME = "tiny-pixtral"  # the tiny manifest's model name


def test_a_waiter_is_told_at_once_and_then_every_report_interval_until_the_holder_lets_go(tmp_path: Path) -> None:
    path = tmp_path / "models" / "m" / ".lock"
    holder = ModelLock(path, command="run holder-source", heartbeat=None).acquire()
    waits: list[tuple[float, LockWait]] = []

    def on_wait(w: LockWait) -> None:
        waits.append((time.monotonic(), w))
        if len(waits) == 3:  # the third report: the holder lets go, the waiter takes the lock
            holder.release()

    with ModelLock(path, timeout=math.inf, on_wait=on_wait, report_every=0.2, heartbeat=None) as waiter:
        assert waiter.held
    assert len(waits) == 3
    first = waits[0][1]
    assert first.holder is not None and first.holder.pid == os.getpid()
    assert first.holder.command == "run holder-source"
    for (t0, w0), (t1, w1) in itertools.pairwise(waits):
        assert t1 - t0 >= 0.2 and w1.waited_s > w0.waited_s  # one report per interval, not one per poll
    msg = first.message("Model m")
    assert msg.startswith(f"Model m is locked by pid {os.getpid()} on ")
    assert "(provision run holder-source)" in msg and "no limit" in msg


def test_the_wait_message_names_the_timeout_it_will_give_up_after(tmp_path: Path) -> None:
    w = LockWait(tmp_path / ".lock", None, 3.2, 60.0)
    assert w.message("Model x") == ("Model x is locked by another provision run; waited 3 s, giving up after 60 s "
                                    "(--lock-timeout).")


def _readline(stream: object, deadline: float) -> str | None:
    """One line of a child's stderr, or None once ``deadline`` passes (bounded, never blocks past it)."""
    fd = stream.fileno()  # type: ignore[attr-defined]
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        ch = os.read(fd, 1)
        if not ch:
            return buf.decode() if buf else None
        if ch == b"\n":
            return buf.decode()
        buf += ch
    return None


def test_provision_run_says_it_waits_for_the_lock_before_the_holder_releases_it(
    tiny_src: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    lock = Layout(home).lock_file(NAME)
    lock.parent.mkdir(parents=True)
    # the holder: takes the lock, says so, and keeps it until its stdin closes
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\nfrom provision.store.lock import ModelLock\n"
         f"with ModelLock({str(lock)!r}, timeout=5, command='run by-the-holder'):\n"
         "    print('held', flush=True)\n    sys.stdin.read()\n"],
        cwd=ROOT, env=provision_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    run = None
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        run = subprocess.Popen(
            [sys.executable, "-m", "provision.cli.main", "run", str(tiny_src / "manifest.toml"), "--home", str(home),
             "--adopt", str(tiny_src), "--no-hf-cache", "--skip-convert", "--skip-smoke", "--lock-timeout", "120"],
            cwd=ROOT, env=provision_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 90  # bounds the wait on a loaded machine; not a speed check
        line = None
        while (got := _readline(run.stderr, deadline)) is not None:
            if "is locked by" in got:
                line = got
                break
        assert line is not None, "the waiting run never said it was waiting"
        # said while the holder still held the lock: the run did not sit silent until it could proceed
        assert holder.poll() is None and lock.exists()
        assert f"is locked by pid {holder.pid} on " in line and "(provision run by-the-holder)" in line
        assert "giving up after 120 s" in line
        assert holder.stdin is not None
        holder.stdin.close()  # let go: the waiting run proceeds
        assert run.wait(timeout=120) == 0
    finally:
        for p in (holder, run):
            if p is not None:
                stop_process(p, signal.SIGKILL)
