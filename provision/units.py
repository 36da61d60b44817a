"""Human-readable sizes for messages and tables (no I/O, no terminal)."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    units = ["B", "KB", "MB", "GB", "TB"]
    v = float(n)
    for u in units:
        if abs(v) < 1000 or u == units[-1]:
            return f"{v:.0f} {u}" if u == "B" else f"{v:.2f} {u}"
        v /= 1000
    return f"{v:.2f} TB"  # pragma: no cover
