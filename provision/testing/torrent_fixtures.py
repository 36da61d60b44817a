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


def wait_for(pred: Any, timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_listening(p: subprocess.Popen[Any], port: int, timeout: float, what: str, died: Callable[[], str]) -> None:
    """Wait until something listens on 127.0.0.1:``port``; ``RuntimeError(died())`` once ``p`` exits."""
    def up() -> bool:
        if p.poll() is not None:
            raise RuntimeError(died())
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(up, timeout, what=what)


def stop_process(p: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
    """Stop one process we started, by its PID: ``sig``, then SIGKILL after ``timeout``."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout)
    return int(p.returncode)


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

    def stop(self, sig: int = signal.SIGTERM) -> int:
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


@contextlib.contextmanager
def opentracker(workdir: Path, infohashes: Sequence[str], *, binary: str = "opentracker") -> Iterator[Tracker]:
    """Debian's opentracker on 127.0.0.1, serving only ``infohashes`` (40 hex each)."""
    d = workdir / "opentracker"
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o755)
    wl = d / "whitelist.txt"
    wl.write_text("".join(h + "\n" for h in infohashes))
    os.chmod(wl, 0o644)
    port = free_port()
    args = [binary, "-i", "127.0.0.1", "-p", str(port), "-P", str(port), "-w", "whitelist.txt", "-d", str(d)]
    if os.geteuid() == 0:
        args += ["-u", "nobody"]  # it refuses to keep root; chroots into d first
    log = open(d / "opentracker.log", "wb")
    p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=d)
    try:
        wait_listening(p, port, 10, "opentracker",
                       lambda: f"opentracker exited {p.returncode}: {(d / 'opentracker.log').read_text()}")
        yield Tracker(proc=p, port=port, whitelist=wl)
    finally:
        stop_process(p)
        log.close()


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
    args = [binary, *ARIA2_COMMON, f"--listen-port={free_port()}", "--seed-time=0", "--bt-stop-timeout=60",
            "-d", str(out_dir), str(torrent)]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def aria2c_seed(torrent: Path, data_dir: Path, *, binary: str = "aria2c") -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """aria2c seeds ``torrent`` from ``data_dir`` on 127.0.0.1:PORT until the block ends."""
    port = free_port()
    args = [binary, *ARIA2_COMMON, f"--listen-port={port}", "--seed-ratio=0.0", "--bt-seed-unverified=true",
            "--check-integrity=false", "-d", str(data_dir), str(torrent)]
    log = open(data_dir.parent / f"aria2c-seed-{port}.log", "w")
    p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        wait_listening(p, port, 20, "aria2c to listen", lambda: f"aria2c exited {p.returncode}")
        yield port, p
    finally:
        stop_process(p)
        log.close()


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
                manifest: Any = None) -> Iterator[Any]:
    """``provision.stages.fetch.torrent.seed`` on loopback (closed mode) in a thread; yields its SeedInfo."""
    import threading

    from provision.stages.fetch.torrent import SeedInfo, seed

    stop = threading.Event()
    ready: list[SeedInfo] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            seed(folder, version=version, network="closed", listen=listen, trackers=trackers, stop=stop,
                 max_upload_rate=max_upload_rate, torrent_out=torrent_out, manifest=manifest,
                 on_ready=ready.append)
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
