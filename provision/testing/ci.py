"""What tests and benchmarks need to know about the CI they run in (``CI=true``).

``require_tool`` fails a test in CI when a tool ``.ci/run`` installs is missing, and skips it elsewhere.
"""

from __future__ import annotations

import os
import shutil

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
