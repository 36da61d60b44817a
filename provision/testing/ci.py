"""What tests and benchmarks need to know about the CI they run in (``CI=true``).

``require_tool`` (an executable ``.ci/run`` installs) and ``require_module`` (a test-only Python
dependency) fail a test in CI when the thing is missing, and skip it elsewhere. Nothing here
installs anything.
"""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """Path of an executable; in CI a missing one fails the test, elsewhere it skips."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} is not installed (.ci/run installs it)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def require_module(name: str, *, why: str) -> ModuleType:
    """The imported module ``name``; in CI a missing one fails the test (``why`` says what needs it),
    elsewhere it skips. The message names the distribution (``_`` read as ``-``)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        dist = name.replace("_", "-")
        if IN_CI:
            pytest.fail(f"{dist} is not installed ({why})")
        pytest.skip(f"{dist} is not installed")
