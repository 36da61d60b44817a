"""The locks on the pickle loader process: resource limits, no network, no writes outside its folder.

The parent side (``preexec``) runs between fork and exec of the loader: it dies with its parent
(``PR_SET_PDEATHSIG``, so a SIGKILLed run leaves no loader writing behind it), no core dumps, a memory
limit (``RLIMIT_DATA``: heap and private mappings, which is where unpickled storages live), a
CPU-time limit (``RLIMIT_CPU``: SIGXCPU at the soft limit, SIGKILL at the hard one) and, where
the host allows it, a fresh empty network namespace (``unshare(CLONE_NEWNET)`` as root, else
inside a new user namespace; the loader then has only a loopback device that is down) and, as
root, a mount namespace in which every mount is read-only but the loader's own folder. The
child side (``lock_down``) installs an audit hook before the pickle is opened, which cannot be
removed: creating or connecting a socket, starting a process, and opening for writing, renaming
or removing anything outside the loader's own output folder raise ``SandboxRefusal``. The hook
works everywhere, so "no sockets" and "no writes outside" hold even where no namespace could be
made; ``network_mode`` and ``filesystem_mode`` say what the loader ran under. This module does not load pickles or pick limits.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

PR_SET_PDEATHSIG = 1
CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
CLONE_NEWUSER = 0x10000000
NetworkMode = Literal["namespace", "no-sockets"]
FilesystemMode = Literal["read-only", "python-writes-refused"]

_DENIED_EVENTS = frozenset({
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto", "socket.sendmsg",
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "os.kill", "os.killpg", "pty.spawn", "ctypes.dlopen",
})
_PATH_EVENTS = frozenset({"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.symlink",
                          "os.link", "os.chmod", "os.chown", "os.utime"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class SandboxRefusal(PermissionError):
    """Something the loader process may not do (a socket, a process, a write outside its folder)."""


@dataclass(frozen=True)
class Limits:
    """What the loader process may use: bytes of data memory and seconds of CPU time."""

    memory_bytes: int
    cpu_seconds: int


def _mount_points() -> list[bytes]:
    """Every mount point of this process (``/proc/self/mountinfo``, octal escapes decoded)."""
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:
                out.append(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4]))
    return out


def _read_only_except(libc: Any, writable: bytes) -> None:
    """In a new mount namespace: ``writable`` bound onto itself, every other mount read-only. Each
    step may fail (no CAP_SYS_ADMIN): the loader then runs with the mounts as they were."""
    if libc.unshare(CLONE_NEWNS) != 0:
        return
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:  # nothing leaks back to the host
        return
    if libc.mount(writable, writable, None, MS_BIND, None) != 0:
        return
    for mp in _mount_points():
        if mp != writable:
            libc.mount(b"none", mp, None, MS_BIND | MS_REMOUNT | MS_RDONLY, None)


def preexec(limits: Limits, writable: str | None = None) -> Callable[[], None]:
    """The function ``subprocess.Popen(preexec_fn=...)`` runs in the forked child before exec;
    ``writable``: the one folder left writable where a mount namespace can be made."""
    import resource

    libc: Any = None
    with contextlib.suppress(OSError):  # no libc to call: the audit hook alone keeps sockets out
        libc = ctypes.CDLL(None, use_errno=True)  # resolved here, before the fork
    mem, cpu = int(limits.memory_bytes), max(1, int(limits.cpu_seconds))
    keep = os.fsencode(os.path.realpath(writable)) if writable is not None else None

    def run() -> None:
        for lim, value in ((resource.RLIMIT_CORE, (0, 0)), (resource.RLIMIT_DATA, (mem, mem)),
                           (resource.RLIMIT_CPU, (cpu, cpu + 5))):
            with contextlib.suppress(ValueError, OSError):  # a hard limit already lower: it stays
                resource.setrlimit(lim, value)
        if libc is not None:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # a parent killed by SIGKILL takes the loader along
            if keep is not None:
                with contextlib.suppress(OSError):  # no /proc: the mounts stay as they were
                    _read_only_except(libc, keep)
            if libc.unshare(CLONE_NEWNET) != 0:
                libc.unshare(CLONE_NEWUSER | CLONE_NEWNET)  # unprivileged hosts that allow user namespaces

    return run


def net_namespace() -> str:
    """This process's network namespace id (``net:[inode]``), or '' where /proc does not say."""
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return ""


def network_mode(parent_namespace: str) -> NetworkMode:
    """'namespace' when this process runs in another network namespace than ``parent_namespace``."""
    mine = net_namespace()
    return "namespace" if mine and parent_namespace and mine != parent_namespace else "no-sockets"


def filesystem_mode() -> FilesystemMode:
    """'read-only' when this process sees the root filesystem mounted read-only (its own mount namespace)."""
    try:
        return "read-only" if os.statvfs("/").f_flag & os.ST_RDONLY else "python-writes-refused"
    except OSError:
        return "python-writes-refused"


def _inside(path: Any, root: str) -> bool:
    if isinstance(path, int):  # an fd already open: its opening was checked
        return True
    try:
        p = os.path.abspath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return p == root or p.startswith(root + os.sep)


def lock_down(writable: str) -> None:
    """Install the audit hook (for the rest of this process's life) that refuses sockets, processes
    and any write outside the folder ``writable``."""
    root = os.path.abspath(writable)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event in _DENIED_EVENTS:
            raise SandboxRefusal(f"the loader may not use {event}")
        if event == "open" and len(args) >= 3:
            path, mode, flags = args[0], args[1], args[2]
            writes = bool(isinstance(flags, int) and flags & _WRITE_FLAGS) or \
                bool(isinstance(mode, str) and any(c in mode for c in "wax+"))
            if writes and not _inside(path, root):
                raise SandboxRefusal(f"the loader may not write {os.fsdecode(path)!s}")
        elif event in _PATH_EVENTS:
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
            if not all(_inside(p, root) for p in paths):
                raise SandboxRefusal(f"the loader may not use {event} outside its folder")

    sys.addaudithook(hook)
