"""A private fleet network for the fleet test and benchmark: network namespaces, a bridge,
opentracker, one origin and N members, each a separate `provision` process.

What it does:

* ``fleet_network(names)``: one network namespace per host plus one for the switch, each held
  by a ``unshare -n sleep`` process we start (and kill, by PID); veth pairs join the hosts to a
  bridge that lives in the switch namespace, so nothing is created in the namespace the test
  runs in (it works the same inside ``/work/shared/tools/offline``). Every host has loopback and
  one private address on ``10.77.0.0/24``, IPv6 off: the hosts' own addresses, nothing else is
  reachable, no traffic leaves the machine. ``Host.popen`` runs a command inside a host's
  namespace (``nsenter -n``: the command is exec'd, so its PID is the one we stop).
* ``require_netns()``: creating a namespace fails -> test failure in CI, skip elsewhere.
* ``Fleet``: opentracker (whitelist reloaded with SIGHUP once the origin wrote its line), the
  origin (``provision seed`` with an upload cap), members (``provision fetch``/``run`` in closed
  mode listening on their own address), a member whose disk rotted (``liar``: it serves a
  corrupted copy it claims is verified), and ``pieces_held`` (the union of the members' pieces,
  read from their resume files on disk: no network probe).
* ``wait_verified`` / ``member_report`` / ``reported_sha256``: what the test and
  ``benchmarks/fleet.py`` share to time members (a member counts as done once its final files
  are in place: they are moved there only after verification) and read their reports.

It does not assert anything (the tests and the benchmark do) and never reaches an address
outside the namespaces it created. One responsibility, the fleet scenario's processes and network;
it is long because namespaces, tracker, origin, members and the lying member must be started,
watched and stopped together (splitting them would only spread one lifecycle over files).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from provision.testing.ci import IN_CI
from provision.testing.torrent_fixtures import stop_process, wait_for

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
SUBNET = "10.77.0"
TRACKER_PORT = 6969
BT_PORT = 6881
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Children get SIGKILL if the test process dies, so nothing outlives a killed test run."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# ---------------------------------------------------------------------------------------
# namespaces


def _netns_id(pid: int | str) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def _sh(argv: Sequence[str], timeout: float = 10.0) -> None:
    cp = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if cp.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({cp.returncode}): {cp.stderr.strip()}")


@dataclass
class Host:
    """One network namespace, held by a ``sleep`` we started; ``addr`` is its only address."""

    name: str
    addr: str
    holder: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.holder.pid

    def nsenter(self) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-n", "--"]

    def ip(self, *args: str) -> None:
        _sh([*self.nsenter(), "ip", *args])

    def popen(self, argv: Sequence[str], *, stdout: IO[Any] | int | None = None, stderr: IO[Any] | int | None = None,
              env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Run ``argv`` inside this host's namespace (nsenter execs it: the PID is the command's)."""
        return subprocess.Popen([*self.nsenter(), *argv], stdout=stdout, stderr=stderr, env=env,
                                cwd=cwd or REPO, preexec_fn=_die_with_parent)

    def listening(self, port: int, *, udp: bool = False) -> bool:
        """Whether something in this namespace listens on ``port`` (read from /proc, no probe)."""
        table = f"/proc/{self.pid}/net/{'udp' if udp else 'tcp'}"
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            return False
        for ln in lines:
            parts = ln.split()
            if len(parts) > 3 and int(parts[1].rsplit(":", 1)[1], 16) == port and (udp or parts[3] == "0A"):
                return True
        return False


def _holder(lifetime: float) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(["unshare", "-n", "--", "sleep", str(int(lifetime))], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
    mine = _netns_id("self")

    def moved() -> bool:
        if p.poll() is not None:
            err = p.stderr.read().decode(errors="replace") if p.stderr else ""
            raise RuntimeError(f"unshare -n exited {p.returncode}: {err.strip()}")
        try:
            return _netns_id(p.pid) != mine
        except OSError:
            return False

    try:
        wait_for(moved, 10, interval=0.01, what="a new network namespace")
    except BaseException:
        stop_process(p, signal.SIGKILL, timeout=15)
        raise
    return p


@dataclass
class FleetNet:
    switch: Host
    hosts: dict[str, Host] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def close(self) -> None:
        """Kill the holders (by PID); the namespaces, the bridge and the veths go with them."""
        for h in [*self.hosts.values(), self.switch]:
            stop_process(h.holder, signal.SIGKILL, timeout=5)


def _no_ipv6(host: Host) -> None:
    # /proc/sys/net is the namespace's own (sh, not sysctl: procps may be missing)
    _sh([*host.nsenter(), "sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && "
         "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6"])


@contextlib.contextmanager
def fleet_network(addrs: dict[str, str], *, lifetime: float = 900) -> Iterator[FleetNet]:
    """Namespaces named after ``addrs`` ({name: "10.77.0.X"}), bridged in a switch namespace.

    Everything is torn down on exit (holders killed by PID; the kernel removes the namespaces,
    the bridge and the veth pairs once nothing is left in them). ``lifetime`` bounds the
    holders even if this process is killed before its ``finally``.
    """
    switch = Host("switch", "", _holder(lifetime))
    net = FleetNet(switch=switch)
    try:
        _no_ipv6(switch)
        switch.ip("link", "add", "br0", "type", "bridge")
        switch.ip("link", "set", "br0", "up")
        for i, (name, addr) in enumerate(addrs.items()):
            host = Host(name, addr, _holder(lifetime))
            net.hosts[name] = host
            _no_ipv6(host)
            switch.ip("link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", str(host.pid))
            switch.ip("link", "set", f"v{i}", "master", "br0", "up")
            host.ip("link", "set", "lo", "up")
            host.ip("addr", "add", f"{addr}/24", "dev", "eth0")
            host.ip("link", "set", "eth0", "up")
        yield net
    finally:
        net.close()


def require_netns() -> None:
    """Root and namespaces are needed: in CI their absence fails the test, elsewhere it skips."""
    why = None
    if os.geteuid() != 0:
        why = "creating network namespaces needs root"
    elif not all(shutil.which(t) for t in ("unshare", "nsenter", "ip")):
        why = "unshare, nsenter and ip are needed (util-linux, iproute2)"
    else:
        try:
            with fleet_network({"probe": f"{SUBNET}.250"}, lifetime=30):
                pass
        except (RuntimeError, OSError, TimeoutError) as e:
            why = f"cannot create network namespaces here: {e}"
    if why:
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)


# ---------------------------------------------------------------------------------------
# payload


def write_payload(folder: Path, total: int, *, nfiles: int = 4, tiny: Path | None = None,
                  seed: int = 7) -> dict[str, tuple[int, str]]:
    """``nfiles`` random ``.dat`` files of ``total`` bytes in all (plus the tiny checkpoint's
    files when ``tiny`` is given, so a member can run the whole pipeline on it); returns
    {path: (size, sha256)}."""
    import random

    rnd = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[int, str]] = {}
    if tiny is not None:
        for name in ("params.json", "consolidated.safetensors", "tekken.json"):
            shutil.copyfile(tiny / name, folder / name)
            data = (folder / name).read_bytes()
            out[name] = (len(data), hashlib.sha256(data).hexdigest())
    per = total // nfiles
    for i in range(nfiles):
        size = per if i < nfiles - 1 else total - per * (nfiles - 1)
        name = f"blobs/blob-{i:02d}.dat"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with open(folder / name, "wb") as fh:
            left = size
            while left:
                b = rnd.randbytes(min(left, 8 << 20))
                h.update(b)
                fh.write(b)
                left -= len(b)
        out[name] = (size, h.hexdigest())
    return out


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while b := fh.read(8 << 20):
            h.update(b)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# the processes


def provision_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PROVISION_HOME"] = str(home)
    env["PROVISION_PROGRESS_INTERVAL"] = "1"
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # a dead loopback port: nothing reaches a hub
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    env["HF_HOME"] = str(home / "hf")
    env.pop("HF_TOKEN", None)
    return env


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    out: Path
    started: float

    def done(self) -> bool:
        return self.proc.poll() is not None

    def report(self) -> dict[str, Any]:
        text = self.out.read_text() if self.out.is_file() else ""
        if not text.strip():
            return {}
        try:
            return dict(json.loads(text))
        except ValueError:
            return {}

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.is_file() else ""


def _start(host: Host, name: str, argv: Sequence[str], work: Path, home: Path) -> Proc:
    work.mkdir(parents=True, exist_ok=True)
    log, out = work / f"{name}.log", work / f"{name}.json"
    with open(log, "wb") as lf, open(out, "wb") as of:
        p = host.popen([PYTHON, "-X", "faulthandler", "-m", "provision.cli.main", *argv], stdout=of, stderr=lf, env=provision_env(home))
    return Proc(name=name, proc=p, log=log, out=out, started=time.monotonic())


@dataclass
class Origin:
    proc: Proc
    magnet: str
    torrent: Path
    whitelist: list[str]


@dataclass
class Member:
    proc: Proc
    home: Path
    dest: Path
    mode: str  # fetch | run
    infohash: str
    seed_for: float = 0.0
    verified_at: float | None = None  # when every final file was in place (they appear only after verify)


# exit 0 when the tracker at argv[1] accepts announces of every infohash in argv[2:], 1 when it
# refuses one, 2 when it cannot be asked (run inside the tracker's namespace; stdlib only)
_WHITELIST_PROBE = r"""
import sys, urllib.parse, urllib.request
url, hashes = sys.argv[1], sys.argv[2:]
peer = "-PRPROBE-" + "0" * 11
def get(q):
    # quote, not urlencode's default quote_plus: opentracker reads "+" as itself, so an infohash
    # holding a 0x20 byte would be refused as another torrent's
    query = urllib.parse.urlencode(q, quote_via=urllib.parse.quote)
    return urllib.request.urlopen(url + "?" + query, timeout=5).read()
try:
    for h in hashes:
        q = {"info_hash": bytes.fromhex(h), "peer_id": peer, "port": "9", "uploaded": "0", "downloaded": "0",
             "left": "0", "compact": "1", "numwant": "0"}
        if b"failure reason" in get(q):
            sys.exit(1)
        q["event"] = "stopped"  # take the probe out of the swarm again
        get(q)
except OSError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
sys.exit(0)
"""


def probe_whitelist(url: str, infohashes: Sequence[str], *, inside: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """Announce each of ``infohashes`` to the tracker at ``url`` (from a child process, run under the
    ``inside`` prefix, e.g. an nsenter); exit 0: all accepted, 1: one refused, 2: not reachable."""
    return subprocess.run([*inside, PYTHON, "-c", _WHITELIST_PROBE, url, *infohashes],
                          capture_output=True, text=True, timeout=30)


class Fleet:
    """Processes on a ``FleetNet``: tracker on ``tracker``, origin on ``origin``, members elsewhere."""

    def __init__(self, net: FleetNet, work: Path) -> None:
        self.net = net
        self.work = work
        self.procs: list[Proc] = []
        self.tracker: subprocess.Popen[bytes] | None = None
        self.tracker_dir = work / "opentracker"
        self._last_probe = "none yet"

    @property
    def tracker_url(self) -> str:
        return f"http://{self.net['tracker'].addr}:{TRACKER_PORT}/announce"

    def close(self) -> None:
        for p in reversed(self.procs):
            stop_process(p.proc, signal.SIGKILL, timeout=5)
        if self.tracker is not None:
            stop_process(self.tracker, signal.SIGKILL, timeout=5)

    # -- opentracker --------------------------------------------------------------
    def start_tracker(self, binary: str = "opentracker") -> None:
        d = self.tracker_dir
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)
        wl = d / "whitelist.txt"
        wl.write_text("")
        os.chmod(wl, 0o644)
        host = self.net["tracker"]
        args = [binary, "-i", host.addr, "-p", str(TRACKER_PORT), "-P", str(TRACKER_PORT), "-w", "whitelist.txt",
                "-d", str(d)]
        if os.geteuid() == 0:
            args += ["-u", "nobody"]  # it refuses to keep root; chroots into d first
        with open(d / "opentracker.log", "ab") as log:
            self.tracker = host.popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=d)

        def up() -> bool:
            assert self.tracker is not None
            if self.tracker.poll() is not None:
                raise RuntimeError(f"opentracker exited {self.tracker.returncode}: "
                                   f"{(d / 'opentracker.log').read_text()}")
            return host.listening(TRACKER_PORT)

        wait_for(up, 10, what="opentracker")

    def whitelist(self, lines: Sequence[str]) -> None:
        """Add infohashes to the tracker's whitelist and make it reload (SIGHUP)."""
        wl = self.tracker_dir / "whitelist.txt"
        have = set(wl.read_text().split())
        new = [x for x in lines if x not in have]
        if new:
            with open(wl, "a") as fh:
                fh.write("".join(x + "\n" for x in new))
        assert self.tracker is not None
        os.kill(self.tracker.pid, signal.SIGHUP)
        # the reload runs in opentracker's accesslist thread: wait until it accepts every line. A SIGHUP
        # that arrives before that thread waits for it is lost (seen when the origin hashes a small
        # payload fast), so it is sent again every 2 s while the lines are refused
        host, want = self.net["tracker"], list(dict.fromkeys(lines))
        sent = [time.monotonic()]

        def reloaded() -> bool:
            if self._tracker_accepts(host, want):
                return True
            if time.monotonic() - sent[0] >= 2.0 and self.tracker is not None:
                os.kill(self.tracker.pid, signal.SIGHUP)
                sent[0] = time.monotonic()
            return False

        try:
            wait_for(reloaded, 12, interval=0.1, what="opentracker to reload its whitelist")
        except TimeoutError as e:
            log = (self.tracker_dir / "opentracker.log").read_text(errors="replace")[-400:]
            raise TimeoutError(f"{e}: {len(want)} line(s) {want}; last probe: {self._last_probe}; whitelist file: "
                               f"{wl.read_text().split()}; opentracker log: {log!r}") from None

    def _tracker_accepts(self, host: Host, infohashes: Sequence[str]) -> bool:
        """Whether opentracker, asked from inside its namespace, accepts an announce of each of
        ``infohashes`` (a refused one is answered "not authorized"); each probe peer is removed
        again at once with event=stopped."""
        if not infohashes:
            return True
        cp = probe_whitelist(f"http://{host.addr}:{TRACKER_PORT}/announce", infohashes, inside=host.nsenter())
        if cp.returncode not in (0, 1):
            assert self.tracker is not None
            if self.tracker.poll() is not None:
                raise RuntimeError(f"opentracker exited {self.tracker.returncode}: "
                                   f"{(self.tracker_dir / 'opentracker.log').read_text()}")
        self._last_probe = f"exit {cp.returncode} {cp.stderr.strip()[-300:]!r}"
        return cp.returncode == 0

    # -- the origin ---------------------------------------------------------------
    def start_origin(self, payload: Path, *, cap: str, name: str = "origin", extra: Sequence[str] = ()) -> Origin:
        host = self.net["origin"]
        w = self.work / name
        if w.exists():
            shutil.rmtree(w)
        w.mkdir(parents=True)
        magnet, torrent, wl = w / "magnet.txt", w / "fleet.torrent", w / "whitelist.txt"
        argv = ["seed", str(payload), "--network", "closed", "--listen", f"{host.addr}:{BT_PORT}",
                "--tracker", self.tracker_url, "--max-upload-rate", cap, "--magnet-out", str(magnet),
                "--torrent-out", str(torrent), "--whitelist-out", str(wl), "--json", *extra]
        p = _start(host, name, argv, w, w / "home")
        self.procs.append(p)
        wait_for(lambda: magnet.is_file() or p.done(), 120, what="the origin's magnet")
        if not magnet.is_file():
            raise RuntimeError(f"provision seed exited {p.proc.returncode}: {p.tail()}")
        lines = wl.read_text().split()
        self.whitelist(lines)
        return Origin(proc=p, magnet=magnet.read_text().strip(), torrent=torrent, whitelist=lines)

    def stop_origin(self, origin: Origin) -> int:
        """SIGTERM ends the seed normally (exit 0 with its report): the bytes it uploaded."""
        rc = stop_process(origin.proc.proc, signal.SIGTERM, timeout=15)
        rep = origin.proc.report()
        if rc != 0 or not rep:
            raise AssertionError(f"the origin exited {rc}:\n{origin.proc.tail()}")
        return int(rep["seed"]["uploaded_bytes"])

    # -- members ------------------------------------------------------------------
    def start_member(self, name: str, magnet: str, infohash: str, *, mode: str = "fetch", seed_for: float = 0,
                     extra: Sequence[str] = ()) -> Member:
        host = self.net[name]
        w = self.work / name
        if w.exists():
            shutil.rmtree(w)
        home = w / "home"
        common = ["--home", str(home), "--network", "closed", "--listen", f"{host.addr}:{BT_PORT}",
                  "--seed-for", f"{seed_for:g}", "--stall-timeout", "60", "--json", *extra]
        if mode == "fetch":
            dest = w / "model"
            argv = ["fetch", magnet, "--dest", str(dest), *common]
        else:
            argv = ["run", magnet, "--target", "cpu", "--no-hf-cache", *common]
            dest = Path()  # known once the plan names the model: found by _run_dest
        p = _start(host, name, argv, w, home)
        self.procs.append(p)
        return Member(proc=p, home=home, dest=dest, mode=mode, infohash=infohash, seed_for=seed_for)

    def start_provision(self, name: str, argv: Sequence[str], *, home: Path) -> Proc:
        """Any ``provision ARGV`` on host ``name`` (log and stdout in its work folder, ``PROVISION_HOME``
        = ``home``), stopped with the fleet: e.g. a member's ``run SOURCE --profile-from MAGNET``."""
        p = _start(self.net[name], name, argv, self.work / name, home)
        self.procs.append(p)
        return p

    def start_liar(self, name: str, torrent: Path, good: Path) -> Proc:
        """A member whose disk rotted: it serves a copy with one byte flipped in every piece,
        claiming it verified (seed mode, every piece marked checked), and announces itself."""
        host = self.net[name]
        w = self.work / name
        if w.exists():
            shutil.rmtree(w)
        w.mkdir(parents=True)
        argv = [PYTHON, "-m", "provision.testing.fleet_fixtures", "liar", str(torrent), str(good), str(w / "bad"),
                f"{host.addr}:{BT_PORT}", self.tracker_url]
        log, out = w / f"{name}.log", w / f"{name}.json"
        with open(log, "wb") as lf, open(out, "wb") as of:
            p = host.popen(argv, stdout=of, stderr=lf, env=provision_env(w / "home"))
        proc = Proc(name=name, proc=p, log=log, out=out, started=time.monotonic())
        self.procs.append(proc)
        wait_for(lambda: host.listening(BT_PORT) or proc.done(), 120, what="the corrupted member to serve")
        if proc.done():
            raise RuntimeError(f"the corrupted member exited {p.returncode}: {proc.tail()}")
        return proc


def member_files(m: Member, files: Sequence[str]) -> Path | None:
    """The member's model folder once every final file is in place (``None`` before)."""
    dest = m.dest
    if m.mode == "run":
        models = m.home / "models"
        found = [d / "original" for d in models.iterdir() if (d / "original").is_dir()] if models.is_dir() else []
        if not found:
            return None
        dest = found[0]
    return dest if all((dest / f).is_file() for f in files) else None


def pieces_held(members: Sequence[Member], files: Sequence[str], num_pieces: int) -> tuple[int, int]:
    """(pieces the members hold together, members already complete), from their resume files
    (saved every second while they download; a complete member holds every piece)."""
    import libtorrent as lt

    union = [False] * num_pieces
    complete = 0
    for m in members:
        if member_files(m, files) is not None:
            complete += 1
            return num_pieces, complete
        path = m.home / "torrents" / f"{m.infohash}.resume"
        try:
            atp = lt.read_resume_data(path.read_bytes())
        except (OSError, RuntimeError):
            continue
        for i, b in enumerate(atp.have_pieces):
            if b and i < num_pieces:
                union[i] = True
    return sum(union), complete


def wait_verified(members: Sequence[Member], files: Sequence[str], *, timeout: float,
                  on_tick: Any = None) -> float:
    """Wait until every member has its verified files in place (or one exits without them);
    set each ``verified_at``; return the seconds from the earliest start to the last one."""
    t0 = min(m.proc.started for m in members)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        pending = 0
        for m in members:
            if m.verified_at is None:
                if member_files(m, files) is not None:
                    m.verified_at = time.monotonic()
                elif m.proc.done():
                    raise AssertionError(f"{m.proc.name} exited {m.proc.proc.returncode} without a verified "
                                         f"model:\n{m.proc.tail()}")
                else:
                    pending += 1
        if not pending:
            return max(m.verified_at or 0.0 for m in members) - t0
        if on_tick is not None:
            on_tick()
        time.sleep(0.1)
    late = [m.proc.name for m in members if m.verified_at is None]
    raise AssertionError(f"{', '.join(late)} had no verified model after {timeout:.0f} s:\n"
                         + "\n".join(m.proc.tail(800) for m in members if m.verified_at is None))


def member_report(m: Member, timeout: float = 60.0) -> dict[str, Any]:
    """End a member (SIGTERM ends its seeding normally: exit 0 with its JSON report; one that does
    not seed exits by itself) and read its report."""
    if m.seed_for > 0:
        rc = stop_process(m.proc.proc, signal.SIGTERM, timeout=timeout)
    else:
        try:
            rc = m.proc.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = stop_process(m.proc.proc, signal.SIGKILL, timeout=15)
    rep = m.proc.report()
    if rc != 0 or not rep:
        raise AssertionError(f"{m.proc.name} exited {rc}:\n{m.proc.tail()}")
    return rep


def reported_sha256(rep: dict[str, Any]) -> dict[str, str]:
    """{path: sha256} a `fetch` or `run` report says it verified."""
    if "fetch" in rep:
        return {f["path"]: f["sha256"] for f in rep["fetch"]["files"]}
    for st in rep.get("stages", []):
        if st["stage"] == "fetch":
            return {f["path"]: f["sha256"] for f in st["details"]["files"]}
    return {}


# ---------------------------------------------------------------------------------------
# the corrupted member (run as `python -m provision.testing.fleet_fixtures liar ...` inside a namespace)


def _liar_main(torrent: str, good: str, bad: str, listen: str, tracker: str) -> int:
    import libtorrent as lt

    from provision.stages.fetch.torrent import open_session, session_settings

    ti = lt.torrent_info(torrent)
    fs = ti.layout()
    pl = ti.piece_length()
    src, dst = Path(good), Path(bad) / ti.name()
    for i in range(fs.num_files()):
        if fs.file_flags(i) & fs.flag_pad_file:
            continue
        rel = fs.file_path(i)
        p = Path(bad) / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / Path(rel).relative_to(ti.name()), p)
        size = p.stat().st_size
        start = fs.file_offset(i)
        with open(p, "r+b") as fh:  # flip one byte in every piece that starts in this file
            first = -(-start // pl) * pl - start
            for off in range(first, size, pl):
                fh.seek(off)
                b = fh.read(1)
                fh.seek(off)
                fh.write(bytes([b[0] ^ 0xFF]))
    assert dst.is_dir()
    settings = session_settings("closed", listen=listen)
    # the network rule: no DHT, LSD, UPnP or NAT-PMP in any session a test starts
    assert not (settings["enable_dht"] or settings["enable_lsd"] or settings["enable_upnp"]
                or settings["enable_natpmp"])
    ses = open_session(settings)
    atp = lt.add_torrent_params()
    atp.ti = ti
    atp.save_path = str(bad)
    atp.trackers = [tracker]
    atp.verified_pieces = [True] * ti.num_pieces()
    atp.flags = (atp.flags & ~lt.torrent_flags.paused & ~lt.torrent_flags.auto_managed) | lt.torrent_flags.seed_mode
    h = ses.add_torrent(atp)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    end = time.monotonic() + 600  # bounded even if nobody stops it
    while not stop and time.monotonic() < end:
        ses.wait_for_alert(500)
        ses.pop_alerts()
    st = h.status()
    print(json.dumps({"uploaded_bytes": int(st.total_payload_upload)}), flush=True)
    ses.pause()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "liar":
        sys.exit(_liar_main(*sys.argv[2:]))
    print("usage: python -m provision.testing.fleet_fixtures liar TORRENT GOOD_DIR BAD_DIR HOST:PORT TRACKER", file=sys.stderr)
    sys.exit(2)
