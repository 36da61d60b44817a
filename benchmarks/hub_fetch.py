"""Benchmark: fetch throughput of one large file from a loopback Hugging Face Hub.

Serves a random file (default 2 GiB) as an LFS file of repo ``bench/blob`` from the loopback
hub in tests/hub_server.py, in its own process (bodies go out with ``sendfile``; the resolve
URL answers a 302 to a second "CDN" port, as the Hub does) and times, in the same run,
interleaved, best of ``--runs``, with the CPU seconds per GB each client used:

* provision's Hub fetch (``provision.stages.fetch.fetch(make_plan("hf://bench/blob"), source="hf")``):
  listing, ranged download with hashing, ``provision.stages.verify``, fsync and rename, all included;
* plain ``huggingface_hub.hf_hub_download`` of the same file (which verifies nothing);
* ``curl -L`` of the same resolve URL.

It prints the server's raw rate (``curl -L`` of the resolve URL to /dev/null) so one can see the
server is not the bottleneck, and exits non-zero when provision is below ``--min-ratio``
(0.9) of either peer. By default every file lives on tmpfs (/dev/shm) so the shared disk's
write speed does not decide the result; ``--workdir`` puts them elsewhere. Everything it
writes is removed at the end. Nothing leaves 127.0.0.1.

Usage: .venv/bin/python benchmarks/hub_fetch.py [--size-gib 2] [--runs 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.pop("HF_TOKEN", None)
ROOT = Path(__file__).resolve().parent.parent

REPO = "bench/blob"
NAME = "blob.dat"
BLOCK = 64 << 20


def pick_workdir(arg: str | None, need: int) -> Path:
    if arg:
        base = Path(arg)
    else:
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() and shutil.disk_usage(shm).free > need else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="provision-hub-bench-", dir=base))


def make_blob(path: Path, size: int) -> str:
    h = hashlib.sha256()
    left = size
    with open(path, "wb") as f:
        while left > 0:
            b = os.urandom(min(BLOCK, left))
            f.write(b)
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def timed(fn: Callable[[], Path], size: int) -> float:
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    got = out.stat().st_size
    if got != size:
        raise SystemExit(f"a run produced {got} bytes instead of {size}")
    return size / dt


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=2.0, help="size of the file (GiB), default 2")
    ap.add_argument("--runs", type=int, default=3, help="runs of each client (best counts), default 3")
    ap.add_argument("--min-ratio", type=float, default=0.9, help="provision / peer throughput required")
    ap.add_argument("--workdir", help="where the served file and the downloads go (default /dev/shm)")
    args = ap.parse_args()
    size = int(args.size_gib * (1 << 30))
    curl = shutil.which("curl")
    if curl is None:
        print("curl is not installed", file=sys.stderr)
        return 2
    work = pick_workdir(args.workdir, 2 * size + (256 << 20))
    print(f"cpus {os.cpu_count()}, load {load()}, workdir {work}, file {size / (1 << 30):.2f} GiB", flush=True)
    server: subprocess.Popen[str] | None = None
    best: dict[str, float] = {}
    cpu: dict[str, float] = {}
    try:
        (work / "served").mkdir()
        sha = make_blob(work / "served" / NAME, size)
        # the hub runs in its own process so it neither shares the GIL with the clients nor
        # counts in their CPU time; it lives at most an hour and is stopped below
        server = subprocess.Popen([sys.executable, "-m", "provision.testing.hub_server", str(work / "served"), REPO,
                                   "--seconds", "3600"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None
        info = json.loads(server.stdout.readline())
        if info["files"][NAME] != sha:
            raise SystemExit("the hub does not serve the file that was written")
        endpoint, commit = info["endpoint"], info["commit"]
        os.environ["HF_ENDPOINT"] = endpoint
        resolve = f"{endpoint}/{REPO}/resolve/{commit}/{NAME}"

        t0 = time.perf_counter()
        subprocess.run([curl, "-sS", "-L", "-o", "/dev/null", resolve], check=True)
        raw = size / (time.perf_counter() - t0)
        print(f"server raw rate (curl -L of the resolve URL to /dev/null): {raw / 1e6:8.0f} MB/s", flush=True)

        def run_curl() -> Path:
            out = work / "curl.out"
            subprocess.run([curl, "-sS", "-L", "-o", str(out), resolve], check=True)
            return out

        def run_hf() -> Path:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(REPO, NAME, revision=commit, cache_dir=work / "hf-cache",
                                        endpoint=endpoint, token=False))

        def run_provision() -> Path:
            from provision.stages.fetch import HubOptions, fetch
            from provision.stages.plan import make_plan

            plan = make_plan(f"hf://{REPO}", home=work / "home", dest=work / "out", check_disk=False)
            res = fetch(plan, source="hf", hub=HubOptions())
            if res.files[0].sha256 != sha or res.files[0].reused:
                raise SystemExit("provision's fetch did not download and verify the file")
            return work / "out" / NAME

        def clean() -> None:
            for p in ("curl.out", "hf-cache", "home", "out"):
                q = work / p
                if q.is_dir():
                    shutil.rmtree(q)
                elif q.exists():
                    q.unlink()

        # imports and hardware detection happen once, before any timing, for both in-process clients
        import huggingface_hub.file_download  # noqa: F401

        import provision.stages.fetch.hub  # noqa: F401
        from provision.hardware import detect

        detect()
        clients: list[tuple[str, Callable[[], Path]]] = [
            ("provision", run_provision), ("hf_hub_download", run_hf), ("curl", run_curl)]
        for r in range(args.runs):
            order = clients[r % 3:] + clients[:r % 3]
            for name, fn in order:
                clean()
                c0 = cpu_children() if name == "curl" else cpu_self()
                rate = timed(fn, size)
                used = (cpu_children() if name == "curl" else cpu_self()) - c0
                if rate > best.get(name, 0.0):
                    best[name], cpu[name] = rate, used
                print(f"run {r + 1} {name:16s} {rate / 1e6:8.0f} MB/s  {used / (size / 1e9):5.2f} CPU-s/GB"
                      f"   (load {load()})", flush=True)
            clean()
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(work, ignore_errors=True)

    ok = True
    print(f"\nbest of {args.runs}: " + ", ".join(
        f"{k} {v / 1e6:.0f} MB/s ({cpu[k] / (size / 1e9):.2f} CPU-s/GB)" for k, v in best.items()))
    for peer in ("hf_hub_download", "curl"):
        ratio = best["provision"] / best[peer]
        good = ratio >= args.min_ratio
        ok &= good
        print(f"provision / {peer}: {ratio:.2f}x (need >= {args.min_ratio}) {'ok' if good else 'MISSED'}")
    print(f"server raw rate {raw / 1e6:.0f} MB/s = {raw / best['provision']:.1f}x provision's rate; load {load()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
