"""Benchmark: `provision smoke` on the tiny checkpoint, as a fresh process, under 5 s of wall time.

Writes the tiny checkpoint to a temporary folder, then runs ``provision smoke DIR --device cpu
--json`` as a subprocess RUNS times (imports included: that is what an operator waits for) and
takes the median wall time. Prints the load time and prefill throughput from the JSON report,
and the time of a bare ``python -c "import torch"`` measured in the same run for scale.
Exits 1 when the median misses the target or the smoke test fails. No network is used.

    .venv/bin/python benchmarks/smoke_tiny.py [--runs 3] [--target 5.0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _provision() -> list[str]:
    exe = Path(sys.executable).with_name("provision")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "provision.cli.main"]


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    return time.perf_counter() - t0, r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--target", type=float, default=5.0, help="seconds of wall time (median)")
    opts = ap.parse_args()

    from provision.testing.tiny import write_tiny

    env = dict(os.environ, HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny-pixtral"
        write_tiny(model, seed=0)
        env["PROVISION_HOME"] = str(Path(tmp) / "home")
        torch_s, _ = _timed([sys.executable, "-c", "import torch"], env)
        walls: list[float] = []
        reports: list[dict] = []  # type: ignore[type-arg]
        for _ in range(opts.runs):
            wall, r = _timed([*_provision(), "smoke", str(model), "--device", "cpu", "--json"], env)
            if r.returncode != 0:
                print(f"provision smoke failed (exit {r.returncode}):\n{r.stderr[-2000:]}", file=sys.stderr)
                return 1
            walls.append(wall)
            reports.append(json.loads(r.stdout)["smoke"])
    med = statistics.median(walls)
    rep = reports[walls.index(med)] if med in walls else reports[-1]
    print(f"provision smoke (tiny, cpu): median wall {med:.2f} s over {opts.runs} runs "
          f"({', '.join(f'{w:.2f}' for w in walls)}); target {opts.target:.1f} s -> ratio {med / opts.target:.2f}")
    print(f"  bare 'import torch' in the same run: {torch_s:.2f} s")
    print(f"  load {rep['load_seconds']:.3f} s for {rep['weights_bytes'] / 1e6:.1f} MB "
          f"({rep['weights_bytes'] / 1e9 / max(rep['load_seconds'], 1e-9):.2f} GB/s)")
    print(f"  prefill {rep['prompt_tokens']} tokens in {rep['prefill_seconds'] * 1000:.1f} ms "
          f"({rep['prefill_tokens_per_second']:,.0f} tok/s); decode {rep['per_token_seconds'] * 1000:.1f} ms/token")
    if med >= opts.target:
        print(f"MISSED: median {med:.2f} s >= {opts.target:.1f} s", file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
