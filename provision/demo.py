"""`make demo` / `python -m provision.demo`: the main job on the built-in tiny model, offline.

Builds the tiny checkpoint in a temporary folder and runs `provision run` on its manifest
into a fresh PROVISION_HOME, on loopback only. It exits with the pipeline's exit code.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from provision.cli import run_cli


def main() -> int:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="provision-demo-") as tmp:
        root = Path(tmp)
        print(f"demo: building the tiny checkpoint in {root / 'tiny'}", file=sys.stderr)
        rc = run_cli(["tiny", str(root / "tiny")])
        if rc:
            return rc
        home = root / "home"
        print(f"demo: provision run into a fresh home {home}", file=sys.stderr)
        rc = run_cli(["run", str(root / "tiny" / "manifest.toml"), "--home", str(home), "--offline"])
    print(f"demo: finished with exit code {rc} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
