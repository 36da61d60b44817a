#!/usr/bin/env python3
"""Benchmark: parallel sha256 of `provision verify` against `openssl dgst -sha256` on every core.

Generates N files totalling --size-gib (default 4 GiB) in a temporary folder, warms the page
cache, then measures (best of --repeat runs, alternating the two so load changes hit both):

* peer: ``xargs -P $(nproc) -n 1 openssl dgst -sha256`` over the same files;
* ours: ``provision.stages.verify.verify_dir(folder)``, the code path ``provision verify`` runs;
* optionally (``--cold``) both again after evicting the files' pages with
  ``posix_fadvise(DONTNEED)`` (only our files' pages; nothing system-wide is dropped);
* peak RSS of the ``provision verify FOLDER --json`` command (``/usr/bin/time -v``, else
  ``getrusage`` of the child);
* the single-file, single-core sha256 rate (``sha256_file``) and what one 25 GB file costs.

Targets (issue 3): ours >= 0.9x the openssl throughput, peak RSS < 150 MB. Exits 1 when one is
missed, 0 otherwise. Deletes its files afterwards (unless --keep). It uses no network.

The cores are often shared (CI runners, other jobs), so one side can land in a quiet window the
other missed: the throughput ratio is gated on the median of back-to-back pairs (openssl run,
then ours, --repeat times), which cancels load that changes slower than one pair. The
best-of-runs ratio and the CPU seconds each side spent (getrusage: openssl's children, our
process) are printed beside it; the CPU ratio does not depend on the load at all.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from provision.io.hashing import sha256_file
from provision.stages.verify import verify_dir

RATIO_TARGET = 0.9
RSS_LIMIT_MB = 150.0
GB = 1e9


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def make_files(folder: Path, total: int, n: int) -> list[Path]:
    block = bytearray(os.urandom(16 << 20))
    per = total // n
    paths = []
    for i in range(n):
        p = folder / f"shard-{i:03d}.dat"
        with open(p, "wb") as f:
            left = per
            k = 0
            while left > 0:
                block[:16] = f"{i:08d}{k:08d}".encode()  # every block differs
                w = min(left, len(block))
                f.write(memoryview(block)[:w])
                left -= w
                k += 1
        paths.append(p)
    return paths


def warm(paths: list[Path]) -> None:
    buf = bytearray(1 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def evict(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def run_openssl(folder: Path, paths: list[Path], procs: int) -> tuple[float, float, dict[str, str]]:
    listing = "\0".join(p.name for p in paths).encode()
    c0 = _cpu(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(["xargs", "-0", "-P", str(procs), "-n", "1", "openssl", "dgst", "-sha256", "-r"],
                         input=listing, cwd=folder, capture_output=True, check=True)
    dt = time.perf_counter() - t0
    cpu = _cpu(resource.RUSAGE_CHILDREN) - c0
    out: dict[str, str] = {}
    for line in res.stdout.decode().splitlines():
        digest, name = line.split(" ", 1)
        out[name.lstrip("*")] = digest
    return dt, cpu, out


def run_ours(folder: Path, procs: int) -> tuple[float, float, dict[str, str]]:
    c0 = _cpu(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    rep = verify_dir(folder, workers=procs)
    dt = time.perf_counter() - t0
    cpu = _cpu(resource.RUSAGE_SELF) - c0
    rep.raise_for_failure()
    return dt, cpu, {f.path: f.sha256 or "" for f in rep.files}


def peak_rss_mb(folder: Path) -> tuple[float, str]:
    exe = Path(sys.executable).with_name("provision")
    cmd = [str(exe), "verify", str(folder), "--json"] if exe.exists() else \
        [sys.executable, "-m", "provision.cli.main", "verify", str(folder), "--json"]
    timebin = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    if timebin:
        res = subprocess.run([timebin, "-v", *cmd], capture_output=True, text=True)
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
        if res.returncode == 0 and m:
            return int(m.group(1)) / 1024, "/usr/bin/time -v"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(cmd, capture_output=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(before, after) / 1024, "getrusage(RUSAGE_CHILDREN)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=4.0, help="total size of the files (default 4)")
    ap.add_argument("--files", type=int, default=8, help="number of files (default 8)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each side; the best counts (default 3)")
    ap.add_argument("--procs", type=int, default=cores(), help="openssl processes / our workers (default: nproc)")
    ap.add_argument("--cold", action="store_true", help="also measure with the files evicted from the page cache")
    ap.add_argument("--dir", type=Path, default=None, help="where to create the temporary folder")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = ap.parse_args()
    if not shutil.which("openssl"):
        print("openssl is not installed; it is the peer this benchmark compares against", file=sys.stderr)
        return 2
    total = int(a.size_gib * (1 << 30))
    tmp = Path(tempfile.mkdtemp(prefix="provision-bench-verify-", dir=a.dir))
    res: dict[str, Any] = {"size_bytes": total, "files": a.files, "procs": a.procs, "cores": cores(),
                           "load_before": os.getloadavg()}
    try:
        t0 = time.perf_counter()
        paths = make_files(tmp, total, a.files)
        total = sum(p.stat().st_size for p in paths)
        res["size_bytes"] = total
        res["generate_s"] = round(time.perf_counter() - t0, 2)
        warm(paths)
        peer_s, ours_s, peer_cpu, ours_cpu = [], [], [], []
        for _ in range(a.repeat):
            dt, cpu, peer = run_openssl(tmp, paths, a.procs)
            peer_s.append(dt)
            peer_cpu.append(cpu)
            dt, cpu, ours = run_ours(tmp, a.procs)
            ours_s.append(dt)
            ours_cpu.append(cpu)
            if peer != ours:
                print(f"digest mismatch between openssl and provision: {peer} vs {ours}", file=sys.stderr)
                return 1
        res["openssl_GBps"] = round(total / statistics.median(peer_s) / GB, 3)
        res["ours_GBps"] = round(total / statistics.median(ours_s) / GB, 3)
        res["openssl_runs_s"] = [round(x, 3) for x in peer_s]
        res["ours_runs_s"] = [round(x, 3) for x in ours_s]
        res["ratio"] = round(statistics.median(p / o for p, o in zip(peer_s, ours_s, strict=True)), 3)
        res["ratio_best_of"] = round(min(peer_s) / min(ours_s), 3)
        res["openssl_cpu_s"] = round(statistics.median(peer_cpu), 3)
        res["ours_cpu_s"] = round(statistics.median(ours_cpu), 3)
        res["cpu_ratio"] = round(res["openssl_cpu_s"] / res["ours_cpu_s"], 3)
        if a.cold:
            evict(paths)
            dt, _, _ = run_openssl(tmp, paths, a.procs)
            res["cold_openssl_GBps"] = round(total / dt / GB, 3)
            evict(paths)
            dt, _, _ = run_ours(tmp, a.procs)
            res["cold_ours_GBps"] = round(total / dt / GB, 3)
            res["cold_ratio"] = round(res["cold_ours_GBps"] / res["cold_openssl_GBps"], 3)
            warm(paths)
        rss, how = peak_rss_mb(tmp)
        res["verify_peak_rss_MB"] = round(rss, 1)
        res["rss_measured_with"] = how
        one = paths[0]
        t0 = time.perf_counter()
        sha256_file(one)
        dt = time.perf_counter() - t0
        res["single_core_sha256_GBps"] = round(one.stat().st_size / dt / GB, 3)
        res["est_25GB_single_file_s"] = round(25.37e9 / (one.stat().st_size / dt), 1)
        t0 = time.perf_counter()
        subprocess.run(["openssl", "dgst", "-sha256", str(one)], capture_output=True, check=True)
        res["single_core_openssl_GBps"] = round(one.stat().st_size / (time.perf_counter() - t0) / GB, 3)
        res["load_after"] = os.getloadavg()
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    ok_ratio = res["ratio"] >= RATIO_TARGET
    ok_rss = res["verify_peak_rss_MB"] < RSS_LIMIT_MB
    res["ok"] = ok_ratio and ok_rss
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        gib = total / (1 << 30)
        print(f"{a.files} files, {gib:.2f} GiB, {a.procs} processes/workers on {cores()} cores, page cache warm")
        print(f"load average before {res['load_before']}, after {res['load_after']}")
        print(f"openssl dgst -sha256 (xargs -P {a.procs}): median {res['openssl_GBps']:.3f} GB/s  "
              f"runs {res['openssl_runs_s']} s, {res['openssl_cpu_s']} CPU s")
        print(f"provision verify (parallel):         median {res['ours_GBps']:.3f} GB/s  "
              f"runs {res['ours_runs_s']} s, {res['ours_cpu_s']} CPU s")
        print(f"ratio ours/openssl (median of pairs): {res['ratio']:.3f}  (target >= {RATIO_TARGET}) "
              f"{'ok' if ok_ratio else 'MISSED'}; best-of {res['ratio_best_of']:.3f}; "
              f"CPU efficiency {res['cpu_ratio']:.3f}")
        if a.cold:
            print(f"cold cache: openssl {res['cold_openssl_GBps']:.3f} GB/s, ours {res['cold_ours_GBps']:.3f} GB/s, "
                  f"ratio {res['cold_ratio']:.3f}")
        print(f"peak RSS of `provision verify`: {res['verify_peak_rss_MB']:.1f} MB ({how}) "
              f"(limit < {RSS_LIMIT_MB:.0f}) {'ok' if ok_rss else 'MISSED'}")
        print(f"single file, one core: sha256_file {res['single_core_sha256_GBps']:.3f} GB/s, openssl "
              f"{res['single_core_openssl_GBps']:.3f} GB/s -> one 25.37 GB file ~{res['est_25GB_single_file_s']} s")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
