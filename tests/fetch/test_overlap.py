"""The pieces of convert-while-fetching that need no swarm (``provision.stages.overlap``): which
torrent pieces hold a file's bytes, reads that wait for verified pieces (and ask for them first),
source digests that wait for the pipeline's verdict, and an overlapped conversion that gives way
to a conversion after the fetch when the download it followed stopped."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from provision.stages.convert import convert
from provision.stages.convert.source import SafetensorsSource
from provision.stages.convert.stage import ConvertCancelled, ConvertHooks
from provision.stages.fetch.torrent.stream_hash import StreamHasher
from provision.stages.overlap import Gate, LateDigests, Overlap, OverlapCancelled, PieceMap


class FakeHandle:
    """Records the pieces made time-critical; libtorrent "has" the pieces in ``has``."""

    def __init__(self, has: tuple[int, ...] = ()) -> None:
        self.deadlines: list[int] = []
        self.has = set(has)

    def have_piece(self, piece: int) -> bool:
        return piece in self.has

    def piece_priority(self, piece: int, priority: int) -> None:
        assert priority == 7  # the top priority
        self.deadlines.append(piece)


def _hasher(pieces: int = 10, piece_length: int = 100) -> StreamHasher:
    return StreamHasher([], piece_length, pieces)  # never started: only its piece map is used


def test_the_pieces_of_a_byte_range_count_the_files_offset_in_the_torrent() -> None:
    pm = PieceMap(_hasher(), threading.Event())
    assert list(pm.pieces(250, 0, 8)) == [2]  # bytes 250..257
    assert list(pm.pieces(250, 40, 100)) == [2, 3]  # bytes 290..389
    assert list(pm.pieces(0, 0, 100)) == [0]  # exactly one piece
    assert list(pm.pieces(0, 0, 101)) == [0, 1]
    assert list(pm.pieces(0, 5, 0)) == []


def test_a_read_waits_for_its_pieces_and_asks_for_the_missing_ones_first_once() -> None:
    h, handle = _hasher(), FakeHandle()
    pm = PieceMap(h, threading.Event(), handle)
    h.mark(2)
    done = threading.Event()

    def reader() -> None:
        pm.wait(0, 200, 200)  # pieces 2 and 3
        done.set()

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.3)
    assert not done.is_set()  # piece 3 is missing
    assert handle.deadlines == [3]  # only the missing piece was hurried
    h.mark(3)
    t.join(5)
    assert done.is_set()
    pm.wait(0, 200, 200)  # all there: no wait, nothing asked again
    assert handle.deadlines == [3]


def test_a_piece_libtorrent_has_is_read_before_its_fence_only_when_its_bytes_match_the_torrents_sha1() -> None:
    import hashlib

    data = bytes(range(256)) * 2  # a 512-byte file at torrent offset 0: pieces 0..4 of 100 bytes (4 straddles)
    good = {p: hashlib.sha1(data[p * 100:(p + 1) * 100]).digest() for p in range(5)}
    good[1] = hashlib.sha1(b"other bytes").digest()  # piece 1 on disk does not match its hash (yet)
    h = _hasher()
    pm = PieceMap(h, threading.Event(), FakeHandle(has=(0, 1, 2)), piece_hash=good.__getitem__)

    def read(start: int, n: int) -> bytes:
        return data[start:start + n]

    pm.wait(0, 200, 100, read=read, size=len(data))  # piece 2: libtorrent has it, the bytes match: no fence
    assert pm.checked == {2} and not h.have[2]
    for piece in (1, 3):  # 1: bytes do not match; 3: libtorrent does not have it
        blocked = threading.Thread(target=pm.wait, args=(0, piece * 100, 100), kwargs={"read": read, "size": 512})
        blocked.start()
        time.sleep(0.3)
        assert blocked.is_alive()
        h.mark(piece)  # the fence: verified for good
        blocked.join(5)
        assert not blocked.is_alive()
    assert pm.checked == {2}


@pytest.mark.parametrize("how", ["abort", "hasher stopped"])
def test_a_waiting_read_gives_up_when_the_run_or_the_download_stops(how: str) -> None:
    h, abort = _hasher(), threading.Event()
    pm = PieceMap(h, abort)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            pm.wait(0, 0, 50)
        except OverlapCancelled as e:
            errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.1)
    if how == "abort":
        abort.set()
    else:
        h.stop()
    t.join(5)
    assert not t.is_alive() and len(errors) == 1


def test_source_digests_answer_membership_at_once_and_the_digest_only_after_the_verdict() -> None:
    gate = Gate()
    d = LateDigests(["consolidated.safetensors"], gate, {"consolidated.safetensors": "a" * 64, "other": "b" * 64})
    assert "consolidated.safetensors" in d and "params.json" not in d and len(d) == 1
    assert d.get("consolidated.safetensors", "0") == "a" * 64  # the manifest's digest, without waiting
    assert LateDigests(["x.safetensors"], gate).get("x.safetensors", "0" * 64) == "0" * 64
    got: list[str] = []
    t = threading.Thread(target=lambda: got.append(d["consolidated.safetensors"]))
    t.start()
    time.sleep(0.3)
    assert got == []  # waits for the verdict
    gate.resolve({"consolidated.safetensors": "c" * 64}, None)
    t.join(5)
    assert got == ["c" * 64]  # the verified digest


def test_source_digests_raise_once_the_download_failed() -> None:
    gate = Gate()
    d = LateDigests(["consolidated.safetensors"], gate)
    gate.fail(RuntimeError("hash mismatch"))
    gate.resolve({"consolidated.safetensors": "c" * 64}, None)  # too late: the failure stands
    with pytest.raises(OverlapCancelled, match="hash mismatch"):
        d["consolidated.safetensors"]


def test_an_overlapped_conversion_whose_download_stopped_gives_way_to_a_conversion_after_the_fetch(
        tmp_path: Path) -> None:
    ov = Overlap(staging=tmp_path / "staging", original=tmp_path / "original", choose=_never, out_dir=_never,
                 context=4096, workers=1, progress=None)
    ov.thread = threading.Thread(target=lambda: None)
    ov.thread.start()
    ov.error = OverlapCancelled("The download stopped before these bytes were verified.")
    prof: Any = type("P", (), {"name": "bf16-mistral"})()
    assert ov.finish({}, None, prof) is None  # type: ignore[arg-type]
    ov.error = ValueError("a real conversion failure")
    with pytest.raises(ValueError):
        ov.finish({}, None, prof)  # type: ignore[arg-type]


def _never(*_a: Any) -> Any:
    raise AssertionError("not called")


class _CallsOffOnFirstRead(SafetensorsSource):
    """A source whose first tensor read calls the conversion off (as the run ending would)."""

    hooks: ConvertHooks | None = None

    def read_into(self, mv: memoryview, start: int) -> None:
        assert self.hooks is not None
        self.hooks.cancel()
        super().read_into(mv, start)


def test_a_conversion_called_off_midway_raises_convert_cancelled_and_commits_nothing(
        tiny_src: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_src, src)
    sources: list[_CallsOffOnFirstRead] = []

    def open_source(p: Path, root: Path) -> SafetensorsSource:
        s = _CallsOffOnFirstRead(p, root=root)
        s.hooks = hooks
        sources.append(s)
        return s

    hooks = ConvertHooks(open_source=open_source, src_dir=src, source_identity=lambda: None)
    out = tmp_path / "out"
    with pytest.raises(ConvertCancelled, match="called off"):
        convert(src, out, target="cpu", scheme="bf16", layout="mistral", context=4096, workers=1, hooks=hooks,
                source_sha256={})
    assert sources and hooks.abort.is_set()
    assert not out.exists()  # nothing committed
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".provision-tmp")] == []  # no staging left


def test_calling_off_waits_for_a_commit_in_progress() -> None:
    hooks = ConvertHooks(open_source=_never, src_dir=Path("."), source_identity=lambda: None)
    order: list[str] = []
    with hooks.committing():
        t = threading.Thread(target=lambda: (hooks.cancel(), order.append("cancelled")))
        t.start()
        t.join(0.3)
        order.append("committed")  # cancel() could not return while the commit held the lock
    t.join(10)
    assert order == ["committed", "cancelled"]
    with pytest.raises(ConvertCancelled), hooks.committing():
        pytest.fail("a commit after cancel() must not run")
