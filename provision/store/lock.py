"""One run per model at a time: a lock file that works where ``flock`` lies (NFS, Lustre).

``ModelLock`` creates the file with ``O_CREAT|O_EXCL``, writes who holds it (host, PID, start
time, token, boot id, PID namespace) and refreshes its mtime on a heartbeat. A lock is stale when
its holder on this machine is dead (or the machine rebooted), or when a lock from another machine
has not moved for ``stale_after`` seconds; a visibly held ``flock`` is an extra guard, never the
only one. Breaking a stale lock goes through a short-lived ``<lock>.break`` file so two waiters
cannot both break it. A waiter polls, then raises ``LockTimeoutError`` (exit 6) naming the
holder. It knows nothing of models or stages. The module stays large because judging staleness
and taking the lock must agree on every rule and are read together.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provision.errors import LockTimeoutError, ResourceError
from provision.settings import Settings
from provision.store.state import shared_file_mode
from provision.version import __version__

LOCK_KIND = "provision-lock"
DEFAULT_HEARTBEAT = 10.0
WAIT_REPORT_EVERY = 5.0  # seconds between a waiter's "still waiting" reports
BREAK_SUFFIX = ".break"
BREAKER_STALE_AFTER = 30.0  # a breaker holds its file for milliseconds; older means it died


def default_timeout() -> float:
    """Seconds a waiter waits: ``Settings.lock_timeout`` (``PROVISION_LOCK_TIMEOUT``, default 60)."""
    return Settings.load().lock_timeout


def default_stale_after() -> float:
    """Seconds without a heartbeat before a lock from another machine is stale: ``Settings.lock_stale_after``
    (``PROVISION_LOCK_STALE_AFTER``, default 120)."""
    return Settings.load().lock_stale_after


def breaker_path(lock: Path) -> Path:
    """The short-lived file that serializes taking over the stale lock ``lock``."""
    return lock.with_name(lock.name + BREAK_SUFFIX)


# -- who and where we are -------------------------------------------------------------------
def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read().strip()
    except OSError:  # no /proc (not Linux) or no such process: unknown
        return None


def boot_id() -> str | None:
    return _read_text("/proc/sys/kernel/random/boot_id")


def pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # no /proc or no namespaces: unknown
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of ``pid``, from /proc."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    rest = text.rsplit(")", 1)[1].split()
    try:
        return rest[0], int(rest[19])
    except (IndexError, ValueError):  # not the stat line we know: unknown
        return None


def pid_start_time(pid: int) -> int | None:
    st = _proc_stat(pid)
    return st[1] if st else None


def pid_alive(pid: int, start: int | None = None) -> bool:
    """Whether ``pid`` runs here (not a zombie) and, when ``start`` is given, is that same process."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:  # no such process: that is the answer
        return False
    except PermissionError:
        pass  # another user's process: it exists
    st = _proc_stat(pid)
    if st is None:
        return True  # no /proc: the kill probe is all we have
    state, started = st
    if state in ("Z", "X"):
        return False
    return start is None or started == start


# -- the lock file --------------------------------------------------------------------------
@dataclass(frozen=True)
class LockInfo:
    host: str
    pid: int
    started: float
    token: str
    boot_id: str | None = None
    pid_start: int | None = None
    pidns: int | None = None
    heartbeat_s: float | None = None
    tool_version: str | None = None
    command: str | None = None

    @property
    def since(self) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started))

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, since {self.since}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": LOCK_KIND, "host": self.host, "pid": self.pid, "started": self.started,
                "since": self.since, "token": self.token, "boot_id": self.boot_id, "pid_start": self.pid_start,
                "pidns": self.pidns, "heartbeat_s": self.heartbeat_s, "tool_version": self.tool_version,
                "command": self.command}

    @classmethod
    def from_dict(cls, d: Any) -> LockInfo | None:
        if not isinstance(d, dict) or d.get("kind") != LOCK_KIND:
            return None
        try:
            host, pid, started, token = d["host"], d["pid"], d["started"], d["token"]
        except KeyError:  # not a lock this tool wrote: callers treat it as unreadable
            return None
        if not (isinstance(host, str) and isinstance(pid, int) and isinstance(started, (int, float))
                and isinstance(token, str)):
            return None

        def opt(k: str, t: type | tuple[type, ...]) -> Any:
            v = d.get(k)
            return v if isinstance(v, t) and not isinstance(v, bool) else None

        return cls(host=host, pid=pid, started=float(started), token=token, boot_id=opt("boot_id", str),
                   pid_start=opt("pid_start", int), pidns=opt("pidns", int),
                   heartbeat_s=opt("heartbeat_s", (int, float)), tool_version=opt("tool_version", str),
                   command=opt("command", str))


def read_lock(path: Path) -> tuple[LockInfo | None, os.stat_result | None]:
    """(holder, stat) of a lock file; (None, None) when absent; (None, stat) when unreadable/partial."""
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            raw = fh.read(64 * 1024)
    except FileNotFoundError:
        return None, None
    except OSError:
        try:
            return None, os.stat(path)
        except OSError:
            return None, None
    try:
        return LockInfo.from_dict(json.loads(raw.decode("utf-8"))), st
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, st


@dataclass(frozen=True)
class LockStatus:
    """``state``: free (no file), live (held), stale (dead holder: may be taken over)."""

    state: str
    info: LockInfo | None
    reason: str
    path: Path
    mtime_ns: int | None = None
    size: int | None = None

    @property
    def key(self) -> tuple[str | None, int | None, int | None]:
        return (self.info.token if self.info else None, self.mtime_ns, self.size)

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "reason": self.reason, "path": str(self.path),
                "holder": self.info.to_dict() if self.info else None}


def _flock_held(path: Path) -> bool:
    """True only when another open file visibly holds ``flock`` on ``path``; False is inconclusive."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # gone or unreadable: no information, as documented
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # someone holds LOCK_EX: that is the answer
        return True
    except OSError:
        return False  # ENOLCK on nolock mounts and the like: no information
    finally:
        os.close(fd)  # also drops the probe's shared lock
    return False


def lock_status(
    path: Path,
    *,
    stale_after: float | None = None,
    host: str | None = None,
    watched_unchanged_s: float = 0.0,
    use_flock: bool = True,
) -> LockStatus:
    """Judge the lock at ``path`` from here (``host`` overrides this machine's name, for tests)."""
    path = Path(path)
    stale_after = default_stale_after() if stale_after is None else stale_after
    info, st = read_lock(path)
    if st is None:
        return LockStatus("free", None, "no lock file", path)
    mt, size = st.st_mtime_ns, st.st_size
    age = max(time.time() - st.st_mtime, watched_unchanged_s)
    if use_flock and _flock_held(path):
        return LockStatus("live", info, "its flock is held", path, mt, size)
    if info is None:
        if age >= stale_after:
            return LockStatus("stale", None, f"unreadable lock file untouched for {age:.0f} s", path, mt, size)
        return LockStatus("live", None, "lock file is being written or unreadable", path, mt, size)
    me = host or socket.gethostname()
    same_machine = info.host == me and (info.pidns is None or pid_namespace() is None or info.pidns == pid_namespace())
    if same_machine:
        here_boot = boot_id()
        if info.boot_id and here_boot and info.boot_id != here_boot:
            return LockStatus("stale", info, "this host rebooted since the lock was taken", path, mt, size)
        if not pid_alive(info.pid, info.pid_start):
            return LockStatus("stale", info, f"process {info.pid} is no longer running", path, mt, size)
        return LockStatus("live", info, f"process {info.pid} is running", path, mt, size)
    limit = max(stale_after, 3 * (info.heartbeat_s or 0.0))
    if age >= limit:
        return LockStatus("stale", info, f"no heartbeat from {info.host} for {age:.0f} s", path, mt, size)
    return LockStatus("live", info, f"heartbeat from {info.host} {age:.0f} s ago", path, mt, size)


def break_stale(status: LockStatus) -> bool:
    """Remove the lock judged stale in ``status`` if it is still exactly that file; True if gone.

    Serialised through ``<lock>.break`` (O_EXCL) so two breakers cannot both act, and the lock is
    re-read under it: a heartbeat or a new holder in between makes this a no-op returning False.
    """
    path = status.path
    breaker = breaker_path(path)
    try:
        fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        # another breaker is at work; its file left by a killed breaker is removed once old. A breaker
        # file that vanished or cannot be removed meanwhile changes nothing: this call returns False
        with contextlib.suppress(OSError):
            if time.time() - os.stat(breaker).st_mtime > BREAKER_STALE_AFTER:
                os.unlink(breaker)
        return False
    os.close(fd)
    try:
        info, st = read_lock(path)
        if st is None:
            return True
        now_key = (info.token if info else None, st.st_mtime_ns, st.st_size)
        if now_key != status.key:
            return False
        try:
            os.unlink(path)
        except FileNotFoundError:  # its holder released it meanwhile: gone all the same
            pass
        return True
    finally:
        with contextlib.suppress(OSError):  # a leftover breaker file is removed by the next breaker once old
            os.unlink(breaker)


@dataclass(frozen=True)
class LockWait:
    """What a waiter knows while it waits: who holds the lock, for how long it has waited, its limit."""

    path: Path
    holder: LockInfo | None
    waited_s: float
    timeout_s: float

    def message(self, what: str) -> str:
        h = self.holder
        who = "another provision run"
        if h is not None:
            who = f"pid {h.pid} on {h.host}" + (f" (provision {h.command})" if h.command else "")
            who += f", holding it for {max(time.time() - h.started, 0.0):.0f} s"
        limit = "no limit" if self.timeout_s == float("inf") else f"giving up after {self.timeout_s:.0f} s"
        return f"{what} is locked by {who}; waited {self.waited_s:.0f} s, {limit} (--lock-timeout)."


class ModelLock:
    """Hold ``path`` while the ``with`` block runs; see the module docstring for the rules.

    ``timeout``: seconds to wait (0 = one try, ``math.inf`` = forever, None = ``PROVISION_LOCK_TIMEOUT``
    or 60). ``heartbeat``: seconds between
    mtime refreshes (0/None = none). ``stale_after``: how long a lock from another host may go
    without a heartbeat before it is taken over. ``host`` overrides this machine's name (tests).
    """

    def __init__(
        self,
        path: Path,
        *,
        timeout: float | None = None,
        heartbeat: float | None = DEFAULT_HEARTBEAT,
        stale_after: float | None = None,
        use_flock: bool = True,
        host: str | None = None,
        command: str | None = None,
        what: str | None = None,
        on_wait: Callable[[LockWait], None] | None = None,
        report_every: float = WAIT_REPORT_EVERY,
    ) -> None:
        self.path = Path(path)
        self.timeout = default_timeout() if timeout is None else timeout
        self.heartbeat = heartbeat or None
        self.stale_after = default_stale_after() if stale_after is None else stale_after
        self.use_flock = use_flock
        self.host = host or socket.gethostname()
        self.command = command
        self.what = what or f"Model {self.path.parent.name}"
        self.on_wait = on_wait  # told at once when the lock is held by another, then every report_every s
        self.report_every = report_every
        self.info: LockInfo | None = None
        self.took_over: list[LockStatus] = []  # stale locks this lock replaced
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost = threading.Event()

    # -- public -----------------------------------------------------------------------------
    @property
    def held(self) -> bool:
        return self.info is not None

    @property
    def lost(self) -> bool:
        """True when the heartbeat found the lock file gone or replaced (it was broken)."""
        return self._lost.is_set()

    def acquire(self) -> ModelLock:
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this ModelLock")
        start = time.monotonic()
        delay = 0.02
        quick = 0
        reported: float | None = None
        watched: tuple[tuple[str | None, int | None, int | None], float] | None = None
        while True:
            if self._try_create():
                return self
            now = time.monotonic()
            st0 = lock_status(self.path, stale_after=self.stale_after, host=self.host, use_flock=self.use_flock)
            if watched is None or watched[0] != st0.key:
                watched = (st0.key, now)
            status = st0
            if st0.state == "live" and now - watched[1] > 0:
                status = lock_status(self.path, stale_after=self.stale_after, host=self.host,
                                     watched_unchanged_s=now - watched[1], use_flock=self.use_flock)
            if status.state == "stale" and break_stale(status):
                self.took_over.append(status)
                status = lock_status(self.path, stale_after=self.stale_after, host=self.host,
                                     use_flock=self.use_flock)
            if status.state == "free" and quick < 3:  # gone meanwhile: try again at once, a few times
                quick += 1
                continue
            quick = 0
            elapsed = time.monotonic() - start
            if elapsed >= self.timeout:
                raise self._timeout_error(status, elapsed)
            if self.on_wait is not None and status.state != "free" and (
                    reported is None or time.monotonic() - reported >= self.report_every):
                reported = time.monotonic()
                self.on_wait(LockWait(self.path, status.info, elapsed, self.timeout))
            pause = min(delay * random.uniform(0.8, 1.2), max(self.timeout - elapsed, 0.0))
            time.sleep(pause)
            delay = min(delay * 1.5, 1.0)

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        assert self.info is not None
        info, _ = read_lock(self.path)
        if info is not None and info.token == self.info.token:
            with contextlib.suppress(FileNotFoundError):  # broken as stale meanwhile: released all the same
                os.unlink(self.path)
        else:
            self._lost.set()
        if self._fd is not None:
            with contextlib.suppress(OSError):  # the lock file is released: closing its descriptor loses nothing
                os.close(self._fd)
            self._fd = None
        self.info = None

    def __enter__(self) -> ModelLock:
        return self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()

    # -- internals --------------------------------------------------------------------------
    def _try_create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except FileExistsError:  # held by someone else: the caller waits or judges it
            return False
        except PermissionError as e:
            raise ResourceError(
                f"Cannot create the lock file {self.path}: permission denied.",
                hint="Check that your group can write to the provision home (see the README on shared homes).",
                path=str(self.path)) from e
        me = os.getpid()
        info = LockInfo(host=self.host, pid=me, started=time.time(), token=secrets.token_hex(16),
                        boot_id=boot_id(), pid_start=pid_start_time(me), pidns=pid_namespace(),
                        heartbeat_s=self.heartbeat, tool_version=__version__, command=self.command)
        try:
            os.fchmod(fd, shared_file_mode())
            os.write(fd, (json.dumps(info.to_dict()) + "\n").encode("utf-8"))
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            with contextlib.suppress(OSError):  # the ResourceError below is the error to report
                os.unlink(self.path)
            raise ResourceError(f"Cannot write the lock file {self.path}: {e.strerror}.",
                                hint="Free some space or fix the home's permissions, then run again.",
                                path=str(self.path)) from e
        back, _ = read_lock(self.path)  # O_EXCL was not atomic on old NFS: trust only what reads back
        if back is None or back.token != info.token:
            os.close(fd)
            return False
        if self.use_flock:
            for _ in range(5):  # a waiter's probe may hold LOCK_SH for an instant
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(0.01)
                except OSError:
                    break  # flock unsupported here: the file itself is the lock
        self._fd = fd
        self.info = info
        self._stop.clear()
        self._lost.clear()
        if self.heartbeat:
            self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat {self.path}", daemon=True)
            self._thread.start()
        return True

    def _beat(self) -> None:
        assert self.heartbeat is not None and self.info is not None
        token = self.info.token
        while not self._stop.wait(self.heartbeat):
            info, _ = read_lock(self.path)
            if info is None or info.token != token:
                self._lost.set()
                return
            # a missed beat (a full or flaky filesystem) only ages the lock; the next beat tries again
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def _timeout_error(self, status: LockStatus, waited: float) -> LockTimeoutError:
        h = status.info
        holder = h.describe() if h else "a holder whose lock file cannot be read"
        ctx: dict[str, Any] = {"lock": str(self.path), "waited_s": round(waited, 3)}
        if h:
            ctx.update(holder_host=h.host, holder_pid=h.pid, holder_since=h.since, holder_command=h.command)
        return LockTimeoutError(
            f"{self.what} is locked by another provision run ({holder}); gave up after {waited:.0f} s.",
            hint=(f"Wait for it to finish and run again; if that run is dead, `provision gc` removes its lock "
                  f"(a lock from another host counts as dead after {self.stale_after:.0f} s without a heartbeat)."),
            **ctx)
