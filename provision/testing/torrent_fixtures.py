"""Loopback BitTorrent helpers for the torrent and seed tests (and the benchmark).

Every process here is started by PID on 127.0.0.1, bounded in time and always stopped:
``Opentracker`` (Debian's, with a whitelist), ``aria2c`` as a downloader or a seeder,
``mktorrent``/``transmission-create`` for torrents made by independent tools, ``provision
seed``/``provision fetch`` subprocesses, and an in-process libtorrent peer that serves
corrupted data (built from ``session_settings("closed")`` like every session). Nothing here
talks to anything but loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PROVISION = [sys.executable, "-m", "provision.cli.main"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (also free for UDP, checked)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port on loopback")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free right now: candidates for a tool that tries each in turn
    (``aria2c --listen-port=A,B,C``), so one taken meanwhile by someone else costs nothing."""
    out: list[int] = []
    while len(out) < n:
        port = free_port(host)
        if port not in out:
            out.append(port)
    return out


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` itself listens on: its socket inodes (``/proc/PID/fd``)
    matched in its namespace's ``/proc/PID/net/tcp*``. Unlike a connect probe, a port someone
    else took meanwhile never counts. Empty once the process is gone."""
    inodes: set[str] = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    except OSError:
        return set()
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            parts = ln.split()
            if len(parts) > 9 and parts[3] == "0A" and parts[9] in inodes:  # 0A: LISTEN
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def wait_for(pred: Any, timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _all_threads_stopped(pid: int) -> bool:
    """Every thread of ``pid`` is in the stopped state (``T``): a SIGSTOP has taken effect."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return True  # gone
    for t in tasks:
        try:
            stat = (t / "stat").read_text()
        except OSError:
            continue  # a thread that exited
        if stat[stat.rindex(")") + 2] not in "Tt":
            return False
    return True


def freeze_when(p: subprocess.Popen[Any], pred: Callable[[], bool], timeout: float, run_for: float = 0.02,
                what: str = "condition") -> bool:
    """Run ``p`` in slices of ``run_for`` seconds and look at ``pred`` only while ``p`` is stopped
    (SIGSTOP, every thread confirmed stopped), so what ``pred`` saw is still true when this returns
    with ``p`` stopped: the caller's next signal lands in exactly that state (resume ``p`` with
    ``os.kill(p.pid, signal.SIGCONT)``). False when ``p`` exits first; ``TimeoutError`` after
    ``timeout`` (``p`` is left running). A plain poll races the process it watches; this cannot."""
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            if p.poll() is not None:
                return False
            os.kill(p.pid, signal.SIGSTOP)
            wait_for(lambda: p.poll() is not None or _all_threads_stopped(p.pid), 10, interval=0.001,
                     what="the SIGSTOP to take effect")
            if p.poll() is not None:
                return False
            if pred():
                return True
            os.kill(p.pid, signal.SIGCONT)
            time.sleep(run_for)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGCONT)
        raise
    with contextlib.suppress(ProcessLookupError):
        os.kill(p.pid, signal.SIGCONT)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_listening(p: subprocess.Popen[Any], port: int, timeout: float, what: str, died: Callable[[], str]) -> None:
    """Wait until ``p`` itself listens on ``port``; ``RuntimeError(died())`` once ``p`` exits."""
    def up() -> bool:
        if p.poll() is not None:
            raise RuntimeError(died())
        return port in listening_ports(p.pid)

    wait_for(up, timeout, what=what)


class PortTaken(RuntimeError):
    """The process we started exited before listening: its port was taken meanwhile (or it failed)."""


def stop_process(p: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
    """Stop one process we started, by its PID: ``sig``, then SIGKILL after ``timeout``; its exit
    status (negative: the signal that ended it), or ``None`` when even SIGKILL has not ended it
    within another ``timeout`` (a process stuck in the kernel). The one way tests stop a process."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout)
    return p.returncode


def start_fetch(magnet: str, dest: Path, *extra: str, log: Path) -> subprocess.Popen[str]:
    """``provision fetch MAGNET --dest DEST --network closed --json`` in the background: the report
    on its stdout, stderr into ``log``."""
    with open(log, "w") as fh:
        return subprocess.Popen([*PROVISION, "fetch", magnet, "--dest", str(dest), "--network", "closed",
                                 "--stall-timeout", "30", "--json", *extra],
                                stdout=subprocess.PIPE, stderr=fh, text=True, env=provision_env())


def sigkill_fetch_midway(magnet: str, dest: Path, resume: Path, fraction: float, log: Path) -> None:
    """Start a fetch capped at 4 MB/s, SIGKILL it once its resume data at ``resume`` holds at least
    ``fraction`` of the pieces (it must still be running then), and wait for it to be gone."""
    p = start_fetch(magnet, dest, "--max-download-rate", "4M", log=log)
    try:
        wait_for(lambda: resume_fraction(resume) >= fraction or p.poll() is not None, 60,
                 what=f"{fraction:.0%} of the download in the resume data")
        assert p.poll() is None, log.read_text()
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
    finally:
        stop_process(p)


def resume_fraction(path: Path) -> float:
    """The share of pieces libtorrent's resume data at ``path`` says are downloaded and checked
    (0.0 while the file is missing or unreadable): real progress, unlike the size of files the
    fetch preallocates. A rerun resumes from exactly this."""
    import libtorrent as lt

    try:
        atp = lt.read_resume_data(path.read_bytes())
    except (OSError, RuntimeError):
        return 0.0
    have = list(atp.have_pieces)
    return sum(have) / len(have) if have else 0.0


def make_payload(folder: Path, sizes: dict[str, int], seed: int = 1) -> dict[str, int]:
    """Write deterministic pseudo-random files (``.dat``: not a pickle suffix)."""
    import random

    rnd = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for rel, size in sizes.items():
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as fh:
            left = size
            while left:
                n = min(left, 1 << 20)
                fh.write(rnd.randbytes(n))
                left -= n
    return dict(sizes)


def same_tree(a: Path, b: Path, rels: Sequence[str]) -> bool:
    import filecmp

    return all(filecmp.cmp(a / r, b / r, shallow=False) for r in rels)


# ---------------------------------------------------------------------------------------
# provision subprocesses


def provision_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PROVISION_PROGRESS_INTERVAL", "0.2")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def seeding_endpoint(log: str) -> str | None:
    """HOST:PORT from the "seeding NAME ... on HOST:PORT" line ``provision fetch|run --seed-for``
    writes to stderr: with ``--listen 127.0.0.1:0`` the port is the one it really bound."""
    import re

    m = re.search(r"seeding \S+ .*?\bon (\d+\.\d+\.\d+\.\d+:\d+)", log)
    return m.group(1) if m else None


def run_provision(args: Sequence[str], *, timeout: float = 120, env: dict[str, str] | None = None,
                  ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PROVISION, *args], capture_output=True, text=True, timeout=timeout,
                          env=env or provision_env(), cwd=REPO)


def json_report(cp: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    out = cp.stdout.strip()
    assert out, f"no JSON on stdout; stderr: {cp.stderr[-2000:]}"
    return dict(json.loads(out))


@dataclass
class SeedProc:
    proc: subprocess.Popen[str]
    magnet: str
    torrent: Path
    whitelist: list[str]
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        return stop_process(self.proc, sig)

    def report(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        return dict(json.loads(self.proc.stdout.read()))


@contextlib.contextmanager
def provision_seed(folder: Path, work: Path, *extra: str, version: str = "hybrid",
                   timeout: float = 60) -> Iterator[SeedProc]:
    """``provision seed FOLDER --network closed`` in the background, stopped on exit."""
    work.mkdir(parents=True, exist_ok=True)
    magnet_out, torrent_out, wl = work / "magnet.txt", work / "seed.torrent", work / "whitelist.txt"
    log = work / "seed.log"
    for stale in (magnet_out, torrent_out, wl):  # the magnet appearing is the signal the seed is up
        stale.unlink(missing_ok=True)
    args = [*PROVISION, "seed", str(folder), "--network", "closed", "--torrent-version", version,
            "--magnet-out", str(magnet_out), "--torrent-out", str(torrent_out), "--whitelist-out", str(wl),
            "--json", *extra]
    with open(log, "w") as logf:
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=logf, text=True, env=provision_env(), cwd=REPO)
    try:
        wait_for(lambda: magnet_out.is_file() or p.poll() is not None, timeout, what="the seed's magnet")
        if p.poll() is not None and not magnet_out.is_file():
            raise RuntimeError(f"provision seed exited {p.returncode}: {log.read_text()[-2000:]}")
        yield SeedProc(proc=p, magnet=magnet_out.read_text().strip(), torrent=torrent_out,
                       whitelist=wl.read_text().split(), log=log)
    finally:
        stop_process(p)


# ---------------------------------------------------------------------------------------
# opentracker


@dataclass
class Tracker:
    proc: subprocess.Popen[bytes]
    port: int
    whitelist: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/announce"


def _start_on_a_free_port(start: Callable[[int], subprocess.Popen[Any]], what: str, log: Callable[[], str],
                          attempts: int = 5) -> tuple[int, subprocess.Popen[Any]]:
    """Start a tool that must be told its port: on a port that was free a moment ago, again on
    another when it exits before listening (someone took the port in between)."""
    last = ""
    for _ in range(attempts):
        port = free_port()
        p = start(port)

        def died(p: subprocess.Popen[Any] = p) -> str:
            return f"{what} exited {p.returncode}: {log()[-2000:]}"

        try:
            wait_listening(p, port, 20, what, died)
            return port, p
        except RuntimeError as e:
            last = str(e)
        except BaseException:
            stop_process(p)
            raise
    raise PortTaken(f"{what} did not listen after {attempts} ports: {last}")


@contextlib.contextmanager
def opentracker(workdir: Path, infohashes: Sequence[str], *, binary: str = "opentracker") -> Iterator[Tracker]:
    """Debian's opentracker on 127.0.0.1, serving only ``infohashes`` (40 hex each)."""
    d = workdir / "opentracker"
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o755)
    wl = d / "whitelist.txt"
    wl.write_text("".join(h + "\n" for h in infohashes))
    os.chmod(wl, 0o644)
    logpath = d / "opentracker.log"

    def start(port: int) -> subprocess.Popen[bytes]:
        args = [binary, "-i", "127.0.0.1", "-p", str(port), "-P", str(port), "-w", "whitelist.txt", "-d", str(d)]
        if os.geteuid() == 0:
            args += ["-u", "nobody"]  # it refuses to keep root; chroots into d first
        with open(logpath, "wb") as log:
            return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=d)

    port, p = _start_on_a_free_port(start, "opentracker", lambda: logpath.read_text())
    try:
        yield Tracker(proc=p, port=port, whitelist=wl)
    finally:
        stop_process(p)


# ---------------------------------------------------------------------------------------
# aria2c and torrent makers

ARIA2_COMMON = ["--enable-dht=false", "--enable-dht6=false", "--bt-enable-lpd=false", "--enable-peer-exchange=false",
                "--interface=127.0.0.1", "--disable-ipv6=true", "--file-allocation=none", "--console-log-level=warn",
                "--summary-interval=0", "--check-certificate=false", "--bt-tracker-connect-timeout=5",
                "--bt-tracker-timeout=5"]


def aria2c_download(torrent: Path, out_dir: Path, *, timeout: float = 120,
                    binary: str = "aria2c") -> subprocess.CompletedProcess[str]:
    """aria2c downloads ``torrent`` (it finds peers through the torrent's tracker) and exits."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ports = ",".join(map(str, free_ports(8)))  # it binds the first it can: one taken meanwhile costs nothing
    args = [binary, *ARIA2_COMMON, f"--listen-port={ports}", "--seed-time=0", "--bt-stop-timeout=60",
            "-d", str(out_dir), str(torrent)]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def aria2c_seed(torrent: Path, data_dir: Path, *, binary: str = "aria2c") -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """aria2c seeds ``torrent`` from ``data_dir`` on 127.0.0.1:PORT until the block ends."""
    candidates = free_ports(8)  # it binds the first it can; the port is read from the process
    args = [binary, *ARIA2_COMMON, f"--listen-port={','.join(map(str, candidates))}", "--seed-ratio=0.0",
            "--bt-seed-unverified=true", "--check-integrity=false", "-d", str(data_dir), str(torrent)]
    logpath = data_dir.parent / f"aria2c-seed-{candidates[0]}.log"
    with open(logpath, "w") as log:
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        def bound() -> set[int]:
            if p.poll() is not None:
                raise RuntimeError(f"aria2c exited {p.returncode}: {logpath.read_text()[-2000:]}")
            return listening_ports(p.pid) & set(candidates)

        port = min(wait_for(bound, 20, what="aria2c to listen"))
        yield port, p
    finally:
        stop_process(p)


def make_v1_torrent(target: Path, out: Path, *, tool: str, trackers: Sequence[str] = ()) -> Path:
    """A v1 torrent of ``target`` made by an independent tool (``mktorrent`` or ``transmission-create``)."""
    if tool == "mktorrent":
        args = ["mktorrent", "-o", str(out), "-l", "16"]
        for t in trackers:
            args += ["-a", t]
        args.append(str(target))
    else:
        args = ["transmission-create", "-o", str(out), "-s", "64"]
        for t in trackers:
            args += ["-t", t]
        args.append(str(target))
    subprocess.run(args, check=True, capture_output=True, timeout=60)
    return out


# ---------------------------------------------------------------------------------------
# an in-process peer that serves corrupted data


@contextlib.contextmanager
def corrupt_peer(torrent: Path, good_dir: Path, work: Path, *, host: str = "127.0.0.2",
                 corrupt_every: int = 1) -> Iterator[str]:
    """Seed ``torrent`` from a copy of ``good_dir`` whose pieces are damaged, without checking it
    (seed mode with every piece marked verified), on HOST:PORT; yields "HOST:PORT"."""
    import shutil

    import libtorrent as lt

    from provision.stages.fetch.torrent import open_session, session_settings

    bad = work / "bad-copy"
    if bad.exists():
        shutil.rmtree(bad)
    shutil.copytree(good_dir, bad / good_dir.name)
    ti = lt.torrent_info(str(torrent))
    fs = ti.layout()
    pl = ti.piece_length()
    for i in range(fs.num_files()):  # flip one byte in every corrupt_every-th piece of every file
        if fs.file_flags(i) & fs.flag_pad_file:
            continue
        p = bad / fs.file_path(i)
        size = p.stat().st_size
        with open(p, "r+b") as fh:
            for k, off in enumerate(range(0, size, pl)):
                if k % corrupt_every:
                    continue
                fh.seek(off)
                b = fh.read(1)
                fh.seek(off)
                fh.write(bytes([b[0] ^ 0xFF]))
    settings = session_settings("closed", listen=f"{host}:0")
    # the network rule: no DHT, LSD, UPnP or NAT-PMP in any session a test starts
    assert not (settings["enable_dht"] or settings["enable_lsd"] or settings["enable_upnp"]
                or settings["enable_natpmp"])
    ses = open_session(settings)
    try:
        atp = lt.add_torrent_params()
        atp.ti = ti
        atp.save_path = str(bad)
        atp.verified_pieces = [True] * ti.num_pieces()
        atp.flags = (atp.flags & ~lt.torrent_flags.paused & ~lt.torrent_flags.auto_managed) | lt.torrent_flags.seed_mode
        ses.add_torrent(atp)
        wait_for(lambda: ses.listen_port() > 0, 10, what="the corrupt peer to listen")
        yield f"{host}:{ses.listen_port()}"
    finally:
        ses.pause()


# ---------------------------------------------------------------------------------------
# the library seed in a background thread


@contextlib.contextmanager
def seed_thread(folder: Path, *, version: str = "hybrid", max_upload_rate: int = 0, listen: str | None = None,
                trackers: Sequence[str] = (), torrent_out: Path | None = None,
                manifest: Any = None, seed_for: float | None = None) -> Iterator[Any]:
    """``provision.stages.fetch.torrent.seed`` on loopback (closed mode) in a thread; yields its SeedInfo.
    The one background seeder of the tests: an exception the seed raises while starting is raised
    here; the seed stops when the block ends (or after ``seed_for`` seconds)."""
    import threading

    from provision.stages.fetch.torrent import SeedInfo, seed

    stop = threading.Event()
    ready: list[SeedInfo] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            seed(folder, version=version, network="closed", listen=listen, trackers=trackers, stop=stop,
                 max_upload_rate=max_upload_rate, torrent_out=torrent_out, manifest=manifest,
                 seed_for=seed_for, on_ready=ready.append)
        except BaseException as e:  # reported to the test below
            errors.append(e)

    t = threading.Thread(target=target, name="test-seed", daemon=True)
    t.start()
    try:
        wait_for(lambda: ready or errors, 60, what="the seed to start")
        if errors:
            raise errors[0]
        yield ready[0]
    finally:
        stop.set()
        t.join(30)
    if errors:  # the seed failed while the block ran: the test does not pass over it
        raise errors[0]
    if t.is_alive():
        raise RuntimeError("the seed thread did not stop within 30 s of being told to")
