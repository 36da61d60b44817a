"""The model lock: exclusion across processes, stale detection, heartbeat, flock as a guard only."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provision.errors import EXIT_RESOURCES, LockTimeoutError, ResourceError
from provision.store.lock import LockInfo, ModelLock, break_stale, lock_status, pid_start_time, read_lock
from provision.testing.torrent_fixtures import wait_for

HOLDER = r"""
import os, sys, pathlib
from provision.store.lock import ModelLock
path, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
lk = ModelLock(path, timeout=10, heartbeat=0.05, command="test-holder")
lk.acquire()
print("held", flush=True)
if mode == "die":
    os._exit(0)  # dies holding the lock, like SIGKILL
sys.stdin.read()  # hold until the test closes our stdin
lk.release()
"""

RACER = r"""
import sys, time, pathlib
from provision.store.lock import ModelLock
from provision.errors import LockTimeoutError
path, go, done = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
print("ready", flush=True)
deadline = time.monotonic() + 20
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.002)
try:
    with ModelLock(path, timeout=0, heartbeat=None):
        print("got", flush=True)
        deadline = time.monotonic() + 60  # hold until every racer has answered (the test says so)
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
except LockTimeoutError as e:
    print(f"timeout {e.exit_code}", flush=True)
"""

COUNTER = r"""
import sys, time, pathlib
from provision.store.lock import ModelLock
path, counter, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
deadline = time.monotonic() + 20
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.002)
for _ in range(10):
    with ModelLock(path, timeout=30, heartbeat=None):
        n = int(counter.read_text())
        time.sleep(0.002)
        counter.write_text(str(n + 1))
"""


def _spawn(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)


def _hold(path: Path) -> subprocess.Popen[str]:
    proc = _spawn(HOLDER, str(path), "hold")
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.stdin:
        proc.stdin.close()
    proc.wait(timeout=20)


def test_lock_file_names_host_pid_start_and_token_and_goes_away_on_release(tmp_path: Path) -> None:
    path = tmp_path / "m" / ".lock"
    with ModelLock(path, timeout=1, command="run tiny") as lk:
        info, st = read_lock(path)
        assert info is not None and st is not None
        assert info.host == socket.gethostname() and info.pid == os.getpid()
        assert abs(info.started - time.time()) < 60 and len(info.token) == 32
        assert info.command == "run tiny" and info == lk.info
        assert stat.S_IMODE(st.st_mode) & 0o040  # group-readable for a shared home
        assert lock_status(path).state == "live"
    assert not path.exists()
    assert lock_status(path).state == "free"


def test_second_process_times_out_with_exit_6_naming_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "m" / ".lock"
    holder = _hold(path)
    try:
        with pytest.raises(LockTimeoutError) as ei:
            ModelLock(path, timeout=0.3).acquire()
        e = ei.value
        assert e.exit_code == EXIT_RESOURCES == 6
        assert f"pid {holder.pid}" in str(e) and socket.gethostname() in str(e) and "since" in str(e)
        assert e.context["holder_pid"] == holder.pid and e.context["holder_command"] == "test-holder"
        assert "\n" not in str(e)
        assert path.exists()  # the holder's lock is untouched
    finally:
        _stop(holder)
    assert not path.exists()


def test_waiter_gets_the_lock_once_the_holder_releases(tmp_path: Path) -> None:
    path = tmp_path / "m" / ".lock"
    holder = _hold(path)
    assert holder.stdin is not None
    holder.stdin.close()  # the holder releases while we wait
    with ModelLock(path, timeout=20) as lk:
        assert lk.held and lk.took_over == []
    holder.wait(timeout=20)


def test_only_one_of_several_simultaneous_processes_gets_the_lock(tmp_path: Path) -> None:
    path, go, done = tmp_path / "m" / ".lock", tmp_path / "go", tmp_path / "done"
    procs = [_spawn(RACER, str(path), str(go), str(done)) for _ in range(4)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        go.touch()
        # each racer tries once (timeout 0) and answers; a winner holds until all have answered,
        # so a second "got" can only mean two holders at once, never a late try after a release
        answers = [p.stdout.readline().strip() for p in procs if p.stdout is not None]
    finally:
        done.touch()
        for p in procs:
            p.communicate(timeout=30)
    assert sorted(answers) == ["got", "timeout 6", "timeout 6", "timeout 6"]


def test_lock_gives_mutual_exclusion_across_processes(tmp_path: Path) -> None:
    path, counter, go = tmp_path / "m" / ".lock", tmp_path / "counter", tmp_path / "go"
    counter.write_text("0")
    procs = [_spawn(COUNTER, str(path), str(counter), str(go)) for _ in range(3)]
    go.touch()
    for p in procs:
        p.communicate(timeout=60)
        assert p.returncode == 0
    assert counter.read_text() == "30"  # no lost update: the read-modify-write never interleaved


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "m" / ".lock"
    proc = _spawn(HOLDER, str(path), "die")
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    proc.wait(timeout=20)
    st = lock_status(path)
    assert st.state == "stale" and f"process {proc.pid} is no longer running" in st.reason
    with ModelLock(path, timeout=2) as lk:
        assert len(lk.took_over) == 1 and lk.took_over[0].info is not None
        assert lk.took_over[0].info.pid == proc.pid
        info, _ = read_lock(path)
        assert info is not None and info.pid == os.getpid()


def test_lock_of_an_unreaped_zombie_is_stale(tmp_path: Path) -> None:
    path = tmp_path / "m" / ".lock"
    proc = _spawn(HOLDER, str(path), "die")
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        # the process exits right after printing; we have not reaped it
        wait_for(lambda: lock_status(path).state == "stale", 10, interval=0.02, what="the zombie's lock to be stale")
    finally:
        proc.wait(timeout=20)


def _write_lock(path: Path, **over: object) -> LockInfo:
    me = os.getpid()
    d = {"kind": "provision-lock", "host": socket.gethostname(), "pid": me, "started": time.time(),
         "token": "f" * 32, "pid_start": pid_start_time(me), "boot_id": None, "pidns": None}
    d.update(over)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(d))
    info = LockInfo.from_dict(d)
    assert info is not None
    return info


def _unavailable_off_linux(what: str) -> None:
    """Linux always has /proc/PID/stat and a boot id: there a None is the bug under test."""
    if sys.platform.startswith("linux"):
        pytest.fail(f"{what} on Linux")
    pytest.skip(f"{what} on {sys.platform}")


def test_reused_pid_is_not_mistaken_for_the_holder(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    start = pid_start_time(os.getpid())
    if start is None:
        _unavailable_off_linux("pid_start_time() found no /proc start time")
        return
    _write_lock(path, pid_start=start - 1)  # our PID, but a process that started at another time
    assert lock_status(path).state == "stale"
    _write_lock(path, pid_start=start)
    assert lock_status(path).state == "live"


def test_lock_from_before_a_reboot_is_stale(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    from provision.store.lock import boot_id

    if boot_id() is None:
        _unavailable_off_linux("boot_id() found no boot id")
        return
    _write_lock(path, boot_id="00000000-0000-0000-0000-000000000000")
    st = lock_status(path)
    assert st.state == "stale" and "rebooted" in st.reason


def test_heartbeat_keeps_a_lock_from_another_host_live(tmp_path: Path) -> None:
    path = tmp_path / "m" / ".lock"
    with ModelLock(path, host="node-a", heartbeat=0.05, use_flock=False) as lk:
        # age the lock by an hour: without a heartbeat node-b would find it stale (60 s limit)
        hour_ago = time.time() - 3600
        os.utime(path, (hour_ago, hour_ago))
        # the heartbeat brings the mtime back to now; no timing decides, only the deadline bounds it
        wait_for(lambda: path.stat().st_mtime > hour_ago + 3000, 30, interval=0.01, what="a heartbeat")
        st = lock_status(path, host="node-b", stale_after=60, use_flock=False)
        assert st.state == "live" and "heartbeat from node-a" in st.reason
        with pytest.raises(LockTimeoutError, match="host node-a"):
            ModelLock(path, host="node-b", stale_after=60, timeout=0, use_flock=False).acquire()
        assert not lk.lost


def test_lock_from_another_host_without_heartbeat_goes_stale_and_holder_sees_it_lost(tmp_path: Path) -> None:
    path = tmp_path / "m" / ".lock"
    a = ModelLock(path, host="node-a", heartbeat=None, use_flock=False).acquire()
    b = ModelLock(path, host="node-b", stale_after=0.3, timeout=10, use_flock=False).acquire()
    assert b.took_over and "no heartbeat from node-a" in b.took_over[0].reason
    a.release()  # must not delete b's lock
    assert a.lost
    info, _ = read_lock(path)
    assert info is not None and b.info is not None and info.token == b.info.token
    b.release()
    assert not path.exists()


def test_heartbeat_notices_a_broken_lock(tmp_path: Path) -> None:
    path = tmp_path / "m" / ".lock"
    with ModelLock(path, heartbeat=0.02) as lk:
        path.unlink()
        wait_for(lambda: lk.lost, 10, interval=0.01, what="the heartbeat to notice")


def test_visibly_held_flock_keeps_an_old_lock_from_being_broken(tmp_path: Path) -> None:
    path = tmp_path / "m" / ".lock"
    with ModelLock(path, host="node-a", heartbeat=None, use_flock=True):
        old = time.time() - 3600
        os.utime(path, (old, old))
        st = lock_status(path, host="node-b", stale_after=1)
        assert st.state == "live" and "flock" in st.reason
        with pytest.raises(LockTimeoutError):
            ModelLock(path, host="node-b", stale_after=1, timeout=0.2).acquire()
        assert lock_status(path, host="node-b", stale_after=1, use_flock=False).state == "stale"


def test_unreadable_lock_file_is_live_while_young_and_stale_when_old(tmp_path: Path) -> None:
    path = tmp_path / "m" / ".lock"
    path.parent.mkdir()
    path.write_bytes(b"")  # a holder between O_EXCL create and write
    with pytest.raises(LockTimeoutError, match="cannot be read"):
        ModelLock(path, timeout=0.1, stale_after=60).acquire()
    old = time.time() - 600
    os.utime(path, (old, old))
    with ModelLock(path, timeout=1, stale_after=60) as lk:
        assert lk.took_over and lk.took_over[0].info is None


def test_break_stale_does_nothing_when_the_lock_changed_since_it_was_judged(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    _write_lock(path, host="node-a", started=time.time() - 600)
    old = time.time() - 600
    os.utime(path, (old, old))
    st = lock_status(path, host="node-b", stale_after=60)
    assert st.state == "stale"
    os.utime(path)  # a heartbeat arrives in between
    assert not break_stale(st)
    assert path.exists()
    assert break_stale(lock_status(path, host="node-b", stale_after=0))
    assert not path.exists()
    assert not (tmp_path / ".lock.break").exists()


def test_timeout_zero_tries_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import provision.store.lock as lock_mod

    path = tmp_path / ".lock"
    with ModelLock(path):
        waits: list[float] = []
        monkeypatch.setattr(lock_mod.time, "sleep", waits.append)  # the retry loop's only pause
        with pytest.raises(LockTimeoutError):
            ModelLock(path, timeout=0).acquire()
        monkeypatch.undo()
        assert waits == []  # it looked once and gave up, without waiting for a retry


def test_lock_timeout_env_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROVISION_LOCK_TIMEOUT", "0.25")
    monkeypatch.setenv("PROVISION_LOCK_STALE_AFTER", "33")
    lk = ModelLock(tmp_path / ".lock")
    assert lk.timeout == 0.25 and lk.stale_after == 33


def test_unwritable_home_is_a_resource_error_not_a_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "ro"
    d.mkdir()
    real_open = os.open

    def denied(path: object, flags: int, mode: int = 0o777, **kw: object) -> int:
        if str(path).endswith(".lock") and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, mode)  # type: ignore[arg-type]

    if os.geteuid() == 0:  # root ignores directory permissions: simulate what another user sees
        monkeypatch.setattr(os, "open", denied)
    else:
        d.chmod(0o555)
    try:
        with pytest.raises(ResourceError, match="permission denied") as ei:
            ModelLock(d / ".lock", timeout=0).acquire()
        assert ei.value.exit_code == 6 and "group" in str(ei.value)
    finally:
        d.chmod(0o755)
