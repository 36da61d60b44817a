"""`seed --seed-for N` (and a run's --seed-for) counts down: every seeding progress event carries the
seconds left, never more than N and never rising; the terminal does not count the countdown as a
change worth a line of its own (tests/cli/test_progress_lines.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from provision.formats.manifest import load_manifest
from provision.progress import ProgressEvent
from provision.stages.fetch.torrent import seed


@pytest.mark.slow
def test_seeding_for_a_set_time_reports_a_countdown_of_the_seconds_left(tiny_src: Path, tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    seed(tiny_src, manifest=load_manifest(tiny_src / "manifest.toml"), network="closed", listen="127.0.0.1:0",
         seed_for=3, progress=events.append, torrent_out=tmp_path / "t.torrent")
    lefts = [int(str(e.extra["left"]).removesuffix("s")) for e in events if e.task.startswith("seed:")
             and e.description.startswith("seeding")]
    assert lefts, [e.task for e in events]  # serving 3 s emits a seeding event each second
    assert all(0 <= v <= 3 for v in lefts)
    assert lefts == sorted(lefts, reverse=True)
