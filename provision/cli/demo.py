"""`make demo` / `python -m provision.cli.demo`: the main job on the built-in tiny model, offline.

1. build the tiny Pixtral-architecture checkpoint (`provision tiny`);
2. seed it with BitTorrent on 127.0.0.1 in the closed network mode (no DHT, LSD, UPnP,
   NAT-PMP or uTP; a background thread of this process, stopped at the end);
3. `provision run` a manifest whose source is that magnet, into a fresh PROVISION_HOME:
   fetch through BitTorrent, verify, convert with a real quantized scheme (fp8, as for an L4),
   smoke-test the converted model, print the report.

Nothing leaves loopback. Exits with `provision run`'s exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from provision.cli.main import run_cli


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m provision.cli.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary folder)")
    ap.add_argument("--json", action="store_true", help="print provision run's JSON report on stdout")
    ap.add_argument("--target", default="l4", help="target GPU profile to convert for (default l4: fp8)")
    ns = ap.parse_args(argv)
    t0 = time.monotonic()
    if ns.keep:
        ns.keep.mkdir(parents=True, exist_ok=True)
        return _demo(ns.keep, ns.json, ns.target, t0)
    with tempfile.TemporaryDirectory(prefix="provision-demo-") as tmp:
        return _demo(Path(tmp), ns.json, ns.target, t0)


def _say(msg: str) -> None:
    print(f"demo: {msg}", file=sys.stderr, flush=True)


def _demo(root: Path, json_out: bool, target: str, t0: float) -> int:
    from provision.formats.manifest import Source, load_manifest, write_manifest
    from provision.stages.fetch.torrent import SeedInfo, seed

    tiny = root / "tiny-pixtral"
    _say(f"1/3 building the tiny checkpoint in {tiny}")
    # tiny's file list is its result, not the demo's: stdout stays for run's result (or --json report)
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        rc = run_cli(["--quiet", "tiny", str(tiny)])
    if rc:
        return rc
    manifest = load_manifest(tiny / "manifest.toml")

    _say("2/3 seeding it over BitTorrent on 127.0.0.1 (closed network: no DHT/LSD/UPnP/NAT-PMP/uTP)")
    ready = threading.Event()
    stop = threading.Event()
    box: dict[str, object] = {}

    def on_ready(info: SeedInfo) -> None:
        box["info"] = info
        ready.set()

    def serve() -> None:
        try:
            seed(tiny, manifest=manifest, network="closed", listen="127.0.0.1:0", stop=stop, on_ready=on_ready)
        except BaseException as e:  # reported by the main thread
            box["error"] = e
            ready.set()

    th = threading.Thread(target=serve, name="demo-seeder", daemon=True)
    th.start()
    try:
        if not ready.wait(60) or "error" in box:
            _say(f"the seeder did not start: {box.get('error', 'timeout')}")
            return 1
        info = box["info"]
        assert isinstance(info, SeedInfo)
        _say(f"   magnet: {info.magnet}")
        demo_manifest = dataclasses.replace(
            manifest,
            name="tiny-pixtral-demo",
            sources=(Source(type="torrent", magnet=info.magnet, prefix=f"{info.name}/"),),
        )
        mpath = write_manifest(demo_manifest, root / "demo-manifest.toml").path
        home = root / "home"
        _say(f"3/3 provision run {mpath} --home {home} --network closed --target {target}")
        argv = ["run", str(mpath), "--home", str(home), "--network", "closed", "--listen", "127.0.0.1:0",
                "--target", target, "--no-hf-cache", "--stall-timeout", "30"]
        rc = run_cli([*argv, "--json"] if json_out else argv)
    finally:
        stop.set()
        th.join(timeout=30)
    _say(f"finished with exit code {rc} in {time.monotonic() - t0:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
