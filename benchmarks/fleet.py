"""Benchmark: a fleet provisioned over BitTorrent from one capped origin, on a private network.

The scenario of tests/fetch/test_fleet.py at a larger scale: network namespaces bridged on
10.77.0.0/24 (root needed; nothing outside those namespaces is reachable), opentracker with a
whitelist, one origin (`provision seed --max-upload-rate CAP --upload-slots SLOTS`), then:

1. one member alone (`provision fetch MAGNET`, closed network mode) from the origin: T1;
2. N members started together (`provision fetch MAGNET --seed-for ...`): T_all, until every
   member has its verified files in place; the origin's uploaded bytes U (from its report).

Prints the figures and the ratios against the targets of issue 9 — T_all / T1 <= 2 and
U / model size <= 1.5 — plus the load average seen, and exits 1 when a target is missed.
Measured with 4 members: the origin uploaded 1.08-1.10x the model with ``--upload-slots 2``
and 1.21-1.36x with libtorrent's default 8 (why ``seed(upload_slots=2)`` suits an origin).

    sudo .venv/bin/python benchmarks/fleet.py [--size-gib 1] [--members 6] [--cap 25M] [--slots 2]
                                              [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from provision.testing.fleet_fixtures import (
    Fleet,
    fleet_network,
    member_report,
    reported_sha256,
    wait_verified,
    write_payload,
)

TARGET_TIME_RATIO = 2.0
TARGET_ORIGIN_RATIO = 1.5


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=1.0, help="payload size (random blobs)")
    ap.add_argument("--members", type=int, default=6, help="fleet members started together (max 100)")
    ap.add_argument("--cap", default="25M", help="the origin's upload cap")
    ap.add_argument("--slots", default="2", help="the origin's upload slots (--upload-slots)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the work folder goes (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("benchmarks/fleet.py needs root (network namespaces)", file=sys.stderr)
        return 2
    if not 1 <= args.members <= 100:
        print("--members must be 1..100", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="provision-fleet-bench-", dir=args.workdir))  # removed at the end
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    try:
        payload = work / "payload" / "fleet-model"
        t = time.monotonic()
        facts = write_payload(payload, int(args.size_gib * (1 << 30)), nfiles=4)
        size = sum(s for s, _ in facts.values())
        files = sorted(facts)
        print(f"payload: {size / 1e9:.2f} GB in {len(files)} files ({time.monotonic() - t:.1f} s to write)")
        names = [f"m{i}" for i in range(1, args.members + 1)]
        addrs = {"tracker": "10.77.0.1", "origin": "10.77.0.2", **{n: f"10.77.0.{10 + i}" for i, n in
                                                                   enumerate(names, 1)}}
        with fleet_network(addrs, lifetime=3600) as net:
            fl = Fleet(net, work / "run")
            try:
                fl.start_tracker()
                origin = fl.start_origin(payload, cap=args.cap, extra=["--upload-slots", args.slots])
                from provision.formats.sources import parse_magnet

                ih = parse_magnet(origin.magnet).infohash
                solo = fl.start_member(names[0], origin.magnet, ih)
                t1 = wait_verified([solo], files, timeout=3000)
                ok_solo = reported_sha256(member_report(solo, timeout=300)) == {p: h for p, (_, h) in facts.items()}
                solo_up = fl.stop_origin(origin)
                shutil.rmtree(work / "run" / names[0], ignore_errors=True)
                print(f"one member alone: {t1:.1f} s ({size / t1 / 1e6:.1f} MB/s), origin uploaded "
                      f"{solo_up / size:.2f}x")

                origin = fl.start_origin(payload, cap=args.cap, extra=["--upload-slots", args.slots])
                members = [fl.start_member(n, origin.magnet, ih, seed_for=600) for n in names]
                t_all = wait_verified(members, files, timeout=3000)
                reps = [member_report(m, timeout=300) for m in members]
                up = fl.stop_origin(origin)
            finally:
                fl.close()
        want = {p: h for p, (_, h) in facts.items()}
        bad = [m for m, r in zip(names, reps, strict=True) if reported_sha256(r) != want]
        times = sorted(round((m.verified_at or 0) - m.proc.started, 1) for m in members)
        time_ratio = t_all / t1
        origin_ratio = up / size
        load1 = os.getloadavg()
        print(f"{args.members} members together: all verified in {t_all:.1f} s (each: {times})")
        print(f"origin: cap {args.cap}B/s, {args.slots} upload slots, uploaded {up / 1e6:.0f} MB")
        print(f"ratio total time / one member alone: {time_ratio:.2f} (target <= {TARGET_TIME_RATIO})")
        print(f"ratio origin upload / model size:    {origin_ratio:.2f} (target <= {TARGET_ORIGIN_RATIO})")
        print(f"load average (1, 5, 15 min) before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; "
              f"after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} on {os.cpu_count()} cores")
        missed = []
        if time_ratio > TARGET_TIME_RATIO:
            missed.append("total time")
        if origin_ratio > TARGET_ORIGIN_RATIO:
            missed.append("origin upload")
        if bad or not ok_solo:
            missed.append(f"verified files ({', '.join(bad) or 'the lone member'})")
        if missed:
            print(f"MISSED: {', '.join(missed)}")
            return 1
        print("all targets met")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
