"""What a Hub download shows the overlapped conversion (``provision.stages.fetch.hub.stream``): pieces
that count once the written prefix covers them, links that follow a partial's inode through its
renames, a start-over that stops the stream, and an ``Overlap`` over it that commits only when the
bytes it converted are the ones the fetch put in place."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from provision.hardware import parse_target
from provision.stages.convert import convert
from provision.stages.fetch.hub.stream import MIRROR_PREFIX, HubStream, open_stream
from provision.stages.overlap import Overlap, PieceMap
from provision.stages.profiles import Profile

PL = 100  # a small piece length, so the arithmetic is visible


def _stream(tmp_path: Path, files: list[tuple[str, int, Path | None]]) -> HubStream:
    return HubStream(tmp_path / "staging", files, piece_length=PL)


def test_files_start_on_their_own_piece_runs_and_an_empty_file_still_has_one(tmp_path: Path) -> None:
    s = _stream(tmp_path, [("a.json", 250, None), ("empty", 0, None), ("b.safetensors", 100, None)])
    assert [(f.rel, f.offset) for f in s.files] == [("a.json", 0), ("empty", 300), ("b.safetensors", 400)]
    assert len(s.have) == 5 and not any(s.have)
    assert all(f.path.parent == tmp_path / "staging" / f"{MIRROR_PREFIX}{os.getpid()}" for f in s.files)


def test_a_piece_counts_once_the_written_prefix_covers_it_and_the_last_short_piece_once_the_file_is_complete(
        tmp_path: Path) -> None:
    s = _stream(tmp_path, [("a.json", 250, None)])
    part = tmp_path / "a.part"
    part.write_bytes(b"x" * 99)
    s.begin("a.json", part, 99)
    assert list(s.have) == [0, 0, 0]
    s.advance("a.json", 200)
    assert list(s.have) == [1, 1, 0]
    s.advance("a.json", 249)  # piece 2 holds bytes 200..249: one short
    assert list(s.have) == [1, 1, 0]
    s.advance("a.json", 250)
    assert list(s.have) == [1, 1, 1]
    assert not s.stopped and not s.restarted


def test_a_resumed_partial_shows_its_kept_prefix_at_once_and_a_file_in_place_counts_whole(tmp_path: Path) -> None:
    done = tmp_path / "done.json"
    done.write_bytes(b"{}" * 60)
    s = _stream(tmp_path, [("done.json", 120, done), ("w.safetensors", 500, None)])
    assert list(s.have) == [1, 1, 0, 0, 0, 0, 0]  # in place and verified: every piece
    part = tmp_path / "w.part"
    part.write_bytes(b"k" * 320)
    s.begin("w.safetensors", part, 320)  # 320 bytes kept from an earlier run
    assert list(s.have) == [1, 1, 1, 1, 1, 0, 0]
    assert s.files[0].path.read_bytes() == done.read_bytes()


def test_the_link_follows_the_partial_through_its_renames(tmp_path: Path) -> None:
    s = _stream(tmp_path, [("w.safetensors", 200, None)])
    part = tmp_path / "w.part"
    part.touch()  # the download opened (created) its partial
    s.begin("w.safetensors", part, 0)
    with open(part, "ab") as fh:
        fh.write(b"a" * 100)
    moved = tmp_path / "verify" / "w.safetensors"
    moved.parent.mkdir()
    part.replace(moved)  # to the verify folder, as fetch does once the file is complete
    with open(moved, "ab") as fh:
        fh.write(b"b" * 100)
    assert s.files[0].path.read_bytes() == b"a" * 100 + b"b" * 100


def test_a_partial_opened_again_as_another_file_is_a_start_over_that_stops_the_stream(tmp_path: Path) -> None:
    s = _stream(tmp_path, [("w.safetensors", 300, None), ("p.json", 10, None)])
    part = tmp_path / "w.part"
    part.touch()
    s.begin("w.safetensors", part, 0)
    s.advance("w.safetensors", 100)
    s.begin("w.safetensors", part, 100)  # the same file continued (a retry): not a start-over
    assert not s.stopped and not s.restarted
    part.unlink()  # the server would not continue the range: the partial starts again from byte 0
    part.touch()
    s.begin("w.safetensors", part, 0)
    assert s.stopped and s.restarted == {"w.safetensors"}
    pm = PieceMap(s, threading.Event())
    with pytest.raises(Exception, match="stopped"):  # a read still waiting for bytes gives up
        pm.wait(s.files[0].offset, 100, 100)


def test_stop_removes_the_links_only(tmp_path: Path) -> None:
    s = _stream(tmp_path, [("w.safetensors", 10, None)])
    part = tmp_path / "w.part"
    part.write_bytes(b"0123456789")
    s.begin("w.safetensors", part, 10)
    assert s.files[0].path.exists()
    s.stop()
    assert s.stopped and not s.mirror.exists()
    assert part.read_bytes() == b"0123456789"  # the download's own file is untouched


def test_a_stream_that_cannot_link_the_files_in_place_is_not_offered(tmp_path: Path) -> None:
    assert open_stream(tmp_path / "staging", [("w.safetensors", 10, tmp_path / "not-there")]) is None
    assert not (tmp_path / "staging" / f"{MIRROR_PREFIX}{os.getpid()}").exists()


# -- an Overlap over a HubStream: committed only when what it read is what the fetch put in place --

def _profile() -> Profile:
    return Profile(scheme="bf16", layout="mistral", gpus=1, activation_dtype="bfloat16", weight_bytes=0, kv_bytes=0,
                   need_bytes=0, available_bytes=0, runnable=True, fits=True, how="")


def _download_into_place(tiny_src: Path, tmp_path: Path) -> tuple[Overlap, HubStream, Path, Path]:
    """The tiny checkpoint "downloaded" through a HubStream: each file written to a partial (every
    byte shown), the conversion started beside it, then the partials moved into ``original``."""
    staging, original, out = tmp_path / "staging", tmp_path / "original", tmp_path / "out"
    names = sorted(p.name for p in tiny_src.iterdir() if p.name != "manifest.toml")
    stream = HubStream(staging, [(n, (tiny_src / n).stat().st_size, None) for n in names])
    ov = Overlap(staging=staging, original=original, choose=lambda _a: (parse_target("cpu"), _profile()),
                 out_dir=lambda _p: out, context=4096, workers=1, progress=None)
    ov.attach(stream, None)
    assert ov.started
    parts = staging / "hub"
    parts.mkdir(parents=True)
    for n in names:
        shutil.copyfile(tiny_src / n, parts / n)
        stream.begin(n, parts / n, (parts / n).stat().st_size)
    original.mkdir()
    for n in names:
        (parts / n).replace(original / n)
    stream.stop()
    return ov, stream, original, out


def _digests(original: Path) -> dict[str, str]:
    import hashlib

    return {"consolidated.safetensors": hashlib.sha256((original / "consolidated.safetensors").read_bytes())
            .hexdigest()}


def _wait_at_gate(ov: Overlap) -> None:
    """Until the conversion streamed every tensor and waits for the verdict (or ended)."""
    import time

    end = time.monotonic() + 120
    while ov.thread is not None and ov.thread.is_alive() and ov.log.total < 33_000_000 and time.monotonic() < end:
        time.sleep(0.05)


def test_an_overlap_over_a_hub_stream_commits_what_a_conversion_after_the_fetch_writes(
        tiny_src: Path, tmp_path: Path) -> None:
    ov, _, original, out = _download_into_place(tiny_src, tmp_path)
    res = ov.finish(_digests(original), None, _profile())  # type: ignore[arg-type]
    assert res is not None and out.is_dir()
    ref = tmp_path / "ref"
    convert(original, ref, target="cpu", scheme="bf16", layout="mistral", context=4096, workers=1,
            source_sha256=_digests(original))
    assert (out / "consolidated.safetensors").read_bytes() == (ref / "consolidated.safetensors").read_bytes()


def test_an_overlap_whose_source_started_over_is_discarded_even_after_reading_every_byte(
        tiny_src: Path, tmp_path: Path) -> None:
    ov, stream, original, out = _download_into_place(tiny_src, tmp_path)
    _wait_at_gate(ov)
    stream.restart("consolidated.safetensors")  # e.g. the resumed file failed and was fetched again
    assert ov.finish(_digests(original), None, _profile()) is None  # type: ignore[arg-type]
    assert not out.exists()


def test_an_overlap_that_read_another_file_than_the_one_in_place_is_discarded(
        tiny_src: Path, tmp_path: Path) -> None:
    ov, _, original, out = _download_into_place(tiny_src, tmp_path)
    _wait_at_gate(ov)
    w = original / "consolidated.safetensors"
    shutil.copyfile(w, tmp_path / "copy")
    (tmp_path / "copy").replace(w)  # same bytes, another inode: not the file the conversion read
    assert ov.finish(_digests(original), None, _profile()) is None  # type: ignore[arg-type]
    assert not out.exists()
