"""Progress that tells the truth: real totals, one summary line per finished task (never repeated,
never left as a stacked bar), the unit of what is counted, one rate per line, and an idle task
that reports only when something changed.

Plain lines (no TTY) are read from a real command's stderr and from a Terminal writing to a
buffer; expected sizes are written out here from the bytes the test made."""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest  # noqa: F401 - fixtures by name

from provision.cli.console import Terminal
from provision.progress import ProgressEvent
from provision.stages.verify import verify_files
from provision.stages.verify.authority import Authority
from provision.testing.torrent_fixtures import provision_env

ROOT = Path(__file__).resolve().parents[2]


def _plain(interval: float = 0.0) -> tuple[Terminal, io.StringIO]:
    buf = io.StringIO()
    return Terminal(stream=buf, force_tty=False, progress_interval=interval), buf


def _lines(buf: io.StringIO) -> list[str]:
    return [ln for ln in buf.getvalue().splitlines() if ln]


def test_a_file_hashed_twice_shows_its_real_size_at_100_percent_when_verified(tmp_path: Path) -> None:
    # 3 pieces of 16 KiB and a short last one of 7 bytes: 3 * 16384 + 7 = 49159 bytes, read once for
    # its sha256 and once for its torrent v1 pieces
    data = bytes(range(256)) * 192 + b"1234567"
    assert len(data) == 49159
    (tmp_path / "w.txt").write_bytes(data)
    plen = 16384
    pieces = tuple(hashlib.sha1(data[i:i + plen]).digest() for i in range(0, len(data), plen))
    auth = Authority(kind="torrent-v1-pieces", size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                     piece_length=plen, piece_hashes=pieces)
    events: list[ProgressEvent] = []
    report = verify_files(tmp_path, {"w.txt": auth}, structure=False, check_params=False, progress=events.append,
                          workers=1)
    assert report.ok
    overall = [e for e in events if e.task == "verify"]
    assert overall[-1].finished and overall[-1].done == overall[-1].total == 49159
    assert all(e.total == 49159 and e.done <= 49159 for e in overall)
    assert report.bytes_hashed == 2 * 49159  # the report still counts every byte read


def test_a_finished_task_leaves_one_summary_line_however_often_it_is_reported_finished() -> None:
    t, buf = _plain()
    for done in (10_000_000, 53_300_000, 53_300_000, 53_270_000):  # a torrent's late "finished" repeats
        t.progress(ProgressEvent(task="fetch:torrent", done=done, total=53_270_000, description="torrent m",
                                 finished=done >= 53_270_000, extra={"peers": 1, "rate": "0.0MB/s"}))
    done_lines = [ln for ln in _lines(buf) if "done" in ln]
    assert len(done_lines) == 1
    assert done_lines[0].startswith("torrent m: done, 53.27 MB")  # never past the real total


def test_a_line_shows_one_rate_the_stages_own_when_it_gives_one() -> None:
    t, buf = _plain()
    for done in (1_000_000, 2_000_000):
        t.progress(ProgressEvent(task="fetch:torrent", done=done, total=4_000_000, description="torrent m",
                                 extra={"peers": 3, "rate": "1.5MB/s", "eta": "2s"}))
    (line,) = _lines(buf)  # the first event starts the clock
    assert line == "torrent m: 2.00 MB / 4.00 MB (50%) 1.5MB/s peers=3 eta=2s"
    assert len(re.findall(r"/s\b", line)) == 1


def test_counted_units_are_named_tokens_are_not_bytes() -> None:
    t, buf = _plain()
    for step in range(1, 17):
        t.progress(ProgressEvent(task="smoke:generate", done=step, total=16, unit="tokens", description="generating",
                                 finished=step == 16))
    lines = _lines(buf)
    assert lines[7].startswith("generating: 9/16 tokens (56%)")  # 9/16 = 56.25%
    assert lines[-1].startswith("generating: done, 16 tokens")
    assert not any(" B" in ln or "bytes" in ln for ln in lines)


def test_an_idle_seeder_reports_only_when_its_upload_or_peers_change() -> None:
    t, buf = _plain()

    def seeding(uploaded: int, peers: int, left: int) -> None:
        t.progress(ProgressEvent(task="seed:m", done=uploaded, total=None, description="seeding (uploaded)",
                                 extra={"peers": peers, "rate": "0.0MB/s", "left": f"{left}s"}))

    seeding(0, 0, 60)
    for left in range(59, 40, -1):  # idle: nothing uploaded, nobody connected, only the countdown moves
        seeding(0, 0, left)
    seeding(0, 1, 40)  # a peer connects
    seeding(5_000_000, 1, 39)  # and downloads
    lines = _lines(buf)
    assert lines == ["seeding (uploaded): 0 B 0.0MB/s peers=0 left=60s",
                     "seeding (uploaded): 0 B 0.0MB/s peers=1 left=40s",
                     "seeding (uploaded): 5.00 MB 0.0MB/s peers=1 left=39s"]


def test_on_a_terminal_a_finished_bar_gives_way_to_its_summary_and_nothing_stays_under_a_table() -> None:
    from rich.table import Table

    buf = io.StringIO()
    t = Terminal(stream=buf, force_tty=True)
    t.progress(ProgressEvent(task="verify", done=1_000_000, total=4_000_000, description="verify"))
    t.progress(ProgressEvent(task="other", done=1, total=10, unit="tokens", description="generating"))
    t.progress(ProgressEvent(task="verify", done=4_000_000, total=4_000_000, description="verify", finished=True))
    table = Table()
    table.add_column("stage")
    table.add_row("verify")
    t.print(table)  # "generating" never finished: its bar is taken down, not left under the table
    t.close()
    text = buf.getvalue()
    after = text[text.index("┏"):]  # the table's first line
    assert "generating" not in after and "verify: done, 4.00 MB" in text
    assert text.count("verify: done") == 1


def test_verify_without_a_tty_ends_with_one_summary_of_the_real_size(tiny_src: Path) -> None:
    size = sum(p.stat().st_size for p in tiny_src.iterdir() if p.name != "manifest.toml")
    cp = subprocess.run([sys.executable, "-m", "provision.cli.main", "verify", str(tiny_src), "--manifest",
                         str(tiny_src / "manifest.toml")], cwd=ROOT, text=True, capture_output=True, timeout=300,
                        env={**provision_env(), "PROVISION_PROGRESS_INTERVAL": "0"})
    assert cp.returncode == 0, cp.stderr
    verify = [ln for ln in cp.stderr.splitlines() if ln.startswith("verify")]
    assert verify and verify[-1].startswith(f"verify: done, {size / 1e6:.2f} MB")
    assert sum(1 for ln in verify if "done" in ln) == 1
    assert all("%" not in ln or re.search(r"\((\d+)%\)", ln) for ln in verify)
    assert "\r" not in cp.stderr and "\x1b" not in cp.stderr


def test_waiting_for_metadata_counts_peers_once_per_change_without_a_rate() -> None:
    t, buf = _plain()
    for peers in (0, 0, 0, 2, 2):
        t.progress(ProgressEvent(task="fetch:metadata", done=peers, total=None, unit="peers",
                                 description="waiting for metadata"))
    assert _lines(buf) == ["waiting for metadata: 0 peers", "waiting for metadata: 2 peers"]
