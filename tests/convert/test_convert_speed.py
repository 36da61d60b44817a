"""Convert's fast path: output hashed as it is written, sources hashed up front, writeback as it goes.

The shard writer hashes what it writes (a helper thread reading the file back behind it) from the
moment its header is final; the convert stage hashes the sources it was not given digests for on
helper threads while the plan is made, so the headers are final early and the pre-commit verify
reads no weight file again. Expected digests here are hashlib's of the files on disk.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from provision.errors import ConvertError
from provision.formats import safetensors_writer as sw
from provision.formats.safetensors_writer import CheckpointWriter, ShardWriter, TensorEntry
from provision.stages.convert import stage as convert_stage
from provision.stages.convert.stage import convert


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _entries(n: int, size: int) -> list[TensorEntry]:
    return [TensorEntry(f"t{i}", "U8", (size,)) for i in range(n)]


def _payload(i: int, size: int) -> bytes:
    return bytes((i * 7 + j) % 251 for j in range(size))


def _write_all(w: ShardWriter, n: int, size: int) -> None:
    for i in range(n):
        data = _payload(i, size)
        w.write(f"t{i}", data[: size // 3])
        w.write(f"t{i}", data[size // 3:])


@pytest.fixture
def small_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writeback and output hashing in ranges of a few KiB, so a small file crosses many of them."""
    monkeypatch.setattr(sw, "WRITEBACK_BYTES", 4096)
    monkeypatch.setattr(sw, "FOLLOW_BYTES", 1000)


def test_a_shard_with_a_final_header_reports_the_sha256_of_its_file(tmp_path: Path, small_ranges: None) -> None:
    w = ShardWriter(tmp_path / "a.safetensors", _entries(9, 5000), {"format": "pt"})
    _write_all(w, 9, 5000)
    w.finish()
    w.commit()
    assert w.sha256 == _sha(tmp_path / "a.safetensors")


def test_a_header_finalized_midway_gives_the_digest_and_bytes_of_a_header_known_from_the_start(
        tmp_path: Path, small_ranges: None) -> None:
    meta = {"format": "pt", "provision.source": json.dumps([{"sha256": "0" * 64}])}
    final = {"provision.source": json.dumps([{"sha256": "ab" * 32}])}
    late = ShardWriter(tmp_path / "late.safetensors", _entries(9, 5000), meta, final_header=False)
    for i in range(9):
        late.write(f"t{i}", _payload(i, 5000))
        if i == 4:  # the source digest arrives halfway through
            late.finalize_header(final)
    late.finish(final)
    late.commit()
    early = ShardWriter(tmp_path / "early.safetensors", _entries(9, 5000), {**meta, **final})
    _write_all(early, 9, 5000)
    early.finish()
    early.commit()
    assert (tmp_path / "late.safetensors").read_bytes() == (tmp_path / "early.safetensors").read_bytes()
    assert late.sha256 == early.sha256 == _sha(tmp_path / "late.safetensors")


def test_metadata_changed_at_finish_is_hashed_as_patched(tmp_path: Path, small_ranges: None) -> None:
    meta = {"format": "pt", "provision.source": "0" * 64}
    for final_header in (True, False):
        path = tmp_path / f"x{final_header}.safetensors"
        w = ShardWriter(path, _entries(5, 3000), meta, final_header=final_header)
        _write_all(w, 5, 3000)
        w.finish({"provision.source": "cd" * 32})
        w.commit()
        assert b"cd" * 32 in path.read_bytes()[:400]
        assert w.sha256 == _sha(path)


def test_checkpoint_writer_digests_name_every_shard(tmp_path: Path, small_ranges: None) -> None:
    e = _entries(6, 4000)
    w = CheckpointWriter(tmp_path, [e[:3], e[3:]], ["s1.safetensors", "s2.safetensors"], metadata={"k": "v"},
                         final_header=False)
    w.finalize_header({"k": "w"})  # before any shard is opened
    for i in range(6):
        w.write(f"t{i}", _payload(i, 4000))
    w.finish({"k": "w"})
    w.commit()
    assert w.digests() == {n: _sha(tmp_path / n) for n in ("s1.safetensors", "s2.safetensors")}


def test_an_aborted_writer_leaves_no_file_and_no_thread(tmp_path: Path, small_ranges: None) -> None:
    import threading

    before = {t.name for t in threading.enumerate()}
    w = ShardWriter(tmp_path / "a.safetensors", _entries(4, 5000))
    w.write("t0", _payload(0, 5000))
    w.abort()
    assert list(tmp_path.iterdir()) == []
    assert {t.name for t in threading.enumerate()} - before == set()


def test_writeback_drops_written_ranges_behind_the_writer(tmp_path: Path, small_ranges: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if sw._SFR is None:
        pytest.skip("no sync_file_range here")
    calls: list[tuple[int, int, int]] = []
    real = sw._SFR

    def spy(fd: int, start: int, n: int, flags: int) -> int:
        calls.append((start, n, flags))
        return int(real(fd, start, n, flags))

    monkeypatch.setattr(sw, "_SFR", spy)
    w = ShardWriter(tmp_path / "a.safetensors", _entries(9, 5000))
    _write_all(w, 9, 5000)
    w.finish()
    w.commit()
    started = [(s, n) for s, n, f in calls if f == sw._SFR_WRITE]
    waited = [(s, n) for s, n, f in calls if f & sw._SFR_WAIT_AFTER]
    assert len(started) >= 5 and waited  # writeback started range by range, earlier ranges waited for
    assert all(b[0] == a[0] + a[1] for a, b in itertools.pairwise(started))  # contiguous, in order
    assert w.sha256 == _sha(tmp_path / "a.safetensors")


def _real_hashes(out: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in out.iterdir() if p.name.endswith(".safetensors")}


@pytest.mark.parametrize("given", [False, True])
def test_convert_reads_no_weight_file_back_and_records_their_true_digests(
        tiny_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: bool) -> None:
    def no_rehash(path: Path) -> str:
        raise AssertionError(f"{path.name} was read back to be hashed")

    monkeypatch.setattr(convert_stage, "_hash_file", no_rehash)
    src_sha = _sha(tiny_src / "consolidated.safetensors")
    out = tmp_path / "o"
    convert(tiny_src, out, target="h100", scheme="fp8", hf_tokenizer=False, shard_bytes=200_000,
            source_sha256={"consolidated.safetensors": src_sha} if given else None)
    prov = json.loads((out / "provenance.json").read_text())
    recorded = {f["path"]: f["sha256"] for f in prov["files"]}
    real = _real_hashes(out)
    assert len(real) > 1 and all(recorded[n] == d for n, d in real.items())
    src = [f for f in prov["source"]["files"] if f["path"] == "consolidated.safetensors"] if "source" in prov else []
    rec = json.loads((out / "provision-convert.json").read_text())
    assert rec["source_files"][0]["sha256"] == src_sha
    assert rec["source_files"][0]["sha256_from"] == ("caller" if given else "computed")
    assert all(f["sha256"] == src_sha for f in src)


def test_convert_output_is_the_same_whether_the_source_digest_is_given_or_computed(
        tiny_src: Path, tmp_path: Path) -> None:
    src_sha = _sha(tiny_src / "consolidated.safetensors")
    convert(tiny_src, tmp_path / "a", target="h100", scheme="fp8", hf_tokenizer=False)
    convert(tiny_src, tmp_path / "b", target="h100", scheme="fp8", hf_tokenizer=False,
            source_sha256={"consolidated.safetensors": src_sha})
    a, b = _real_hashes(tmp_path / "a"), _real_hashes(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:  # the headers differ only in sha256_from; the tensors are the same bytes
        ra, rb = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
        ha, hb = (int.from_bytes(r[:8], "little") + 8 for r in (ra, rb))
        assert ra[ha:] == rb[hb:]
        assert ra[8:ha].replace(b'\\"computed\\"', b'\\"caller\\"').rstrip() == rb[8:hb].rstrip()


def test_a_source_changed_during_the_conversion_is_refused_and_nothing_is_committed(
        tiny_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = convert_stage.stream_tensors

    def touch_then_stream(*a: Any, **k: Any) -> Any:
        p = tiny_src / "consolidated.safetensors"
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # what an in-place rewrite does
        return real(*a, **k)

    monkeypatch.setattr(convert_stage, "stream_tensors", touch_then_stream)
    out = tmp_path / "o"
    with pytest.raises(ConvertError, match="changed during the conversion"):
        convert(tiny_src, out, target="h100", scheme="fp8", hf_tokenizer=False)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_failing_source_hash_fails_the_conversion_and_commits_nothing(
        tiny_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int, stop: Any = None, reader: Any = None) -> str:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(convert_stage, "_hash_fd", broken)
    out = tmp_path / "o"
    with pytest.raises(OSError, match="Input/output error"):
        convert(tiny_src, out, target="h100", scheme="fp8", hf_tokenizer=False)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_quantized_bytes_do_not_depend_on_the_piece_size(monkeypatch: pytest.MonkeyPatch) -> None:
    from provision import quant

    g = torch.Generator().manual_seed(3)
    w = (torch.randn(96, 256, generator=g) * 0.05).bfloat16()
    whole_q, whole_s = quant.quantize_fp8(w)
    parts = [quant.quantize_fp8(w[r:r + 7]) for r in range(0, 96, 7)]
    assert torch.equal(torch.cat([p[0] for p in parts]).view(torch.uint8), whole_q.view(torch.uint8))
    assert torch.equal(torch.cat([p[1] for p in parts]), whole_s)


def _fp8_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 per-channel quantization written out plainly in float32 (the formula before the fast path)."""
    from provision import quant

    x = w.to(torch.float32, copy=True)
    amax = x.abs().amax(dim=1, keepdim=True)
    scale = quant._round_up_to(torch.clamp(amax / 448.0, min=float(torch.finfo(torch.bfloat16).tiny)), torch.bfloat16)
    return x.div_(scale.float()).to(torch.float8_e4m3fn), scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fast_fp8_quantization_is_bit_identical_to_the_float32_formula(dtype: torch.dtype) -> None:
    from provision import quant

    g = torch.Generator().manual_seed(11)
    w = (torch.randn(64, 384, generator=g) * torch.logspace(-6, 2, 64).unsqueeze(1)).to(dtype)
    w[0] = 0  # an all-zero row: the smallest scale
    w[1, 7] = torch.finfo(dtype).max / 4  # a huge value beside small ones
    w[2, :5] = torch.finfo(dtype).tiny  # subnormal-range neighbours
    w[3] = -w[3]
    q, s = quant.quantize_fp8(w)
    rq, rs = _fp8_reference(w)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)


def test_direct_reads_return_the_exact_bytes_of_unaligned_ranges(tmp_path: Path) -> None:
    import mmap

    from provision.stages.convert.source import DIRECT_ALIGN, SafetensorsSource

    ts = {f"t{i}": torch.arange(i * 1000, i * 1000 + 1000 + 37 * i, dtype=torch.float32).bfloat16() for i in range(5)}
    from safetensors.torch import save_file

    save_file(ts, str(tmp_path / "consolidated.safetensors"))
    raw = (tmp_path / "consolidated.safetensors").read_bytes()
    src = SafetensorsSource(tmp_path / "consolidated.safetensors", root=tmp_path)
    try:
        if src._direct() is None:
            pytest.skip("no O_DIRECT on this filesystem")
        buf = memoryview(mmap.mmap(-1, len(raw) + 2 * DIRECT_ALIGN))
        for t in src.tensors:
            got = src.read_direct(buf, t.start, t.nbytes)
            assert got is not None and bytes(got) == raw[t.start:t.end]
        assert src.read_direct(buf[:100], 0, 50) is None  # a buffer without room for alignment: not direct
    finally:
        src.close()


def test_direct_and_buffered_reads_convert_to_the_same_bytes(tiny_src: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from provision.stages.convert.source import SafetensorsSource

    convert(tiny_src, tmp_path / "direct", target="h100", scheme="fp8", hf_tokenizer=False)
    monkeypatch.setattr(SafetensorsSource, "_direct", lambda self: None)
    monkeypatch.setattr(convert_stage, "reopen_direct", lambda fd: None)
    monkeypatch.setattr(sw, "reopen_direct", lambda fd: None)
    convert(tiny_src, tmp_path / "buffered", target="h100", scheme="fp8", hf_tokenizer=False)
    a, b = _real_hashes(tmp_path / "direct"), _real_hashes(tmp_path / "buffered")
    assert a == b and a
    pa = json.loads((tmp_path / "direct" / "provenance.json").read_text())
    pb = json.loads((tmp_path / "buffered" / "provenance.json").read_text())
    def digests(doc: dict[str, Any]) -> dict[str, str]:  # the record holds timings and its folder: it differs
        return {f["path"]: f["sha256"] for f in doc["files"] if f["path"] != "provision-convert.json"}

    assert digests(pa) == digests(pb) and "model.safetensors" in digests(pa)


def test_a_header_finalized_from_another_thread_while_writing_gives_the_file_digest(tmp_path: Path) -> None:
    import threading

    meta = {"provision.source": "0" * 64}
    for k in range(40):  # the other thread lands before the file opens, between writes, or near the end
        path = tmp_path / f"r{k}.safetensors"
        w = ShardWriter(path, _entries(12, 700), meta, final_header=False)
        go = threading.Event()

        def finalize(w: ShardWriter = w, go: threading.Event = go) -> None:
            go.wait()
            w.finalize_header({"provision.source": "ef" * 32})

        t = threading.Thread(target=finalize)
        t.start()
        for i in range(12):
            if i == k % 13:
                go.set()
            w.write(f"t{i}", _payload(i, 700))
        go.set()
        t.join()
        w.finish({"provision.source": "ef" * 32})
        w.commit()
        assert w.sha256 == _sha(path) and b"ef" * 32 in path.read_bytes()[:300]


def test_a_shard_finalized_at_finish_is_hashed_from_the_page_cache_not_read_from_the_disk(
        tmp_path: Path, small_ranges: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The header of a conversion whose source digest is computed on the way becomes final at the
    end: the shard written so far is still cached, and O_DIRECT would read all of it from the disk
    again (at 25 GB, about 15 s of the conversion's tail)."""
    direct: list[int] = []
    opened = sw.reopen_direct

    def spy_open(src: int) -> int | None:
        fd = opened(src)
        if fd is not None:
            direct.append(fd)
        return fd

    reads_from_disk: list[int] = []
    preadv = os.preadv

    def spy_preadv(fd: int, bufs: Any, offset: int, *flags: int) -> int:
        if fd in direct:
            reads_from_disk.append(offset)
        return preadv(fd, bufs, offset, *flags)

    monkeypatch.setattr(sw, "reopen_direct", spy_open)
    monkeypatch.setattr(os, "preadv", spy_preadv)
    monkeypatch.setattr(sw, "FOLLOW_BYTES", 64 << 10)  # whole aligned blocks, which O_DIRECT could read
    w = ShardWriter(tmp_path / "a.safetensors", _entries(8, 64 << 10), {"provision.source": "0" * 64},
                    final_header=False)
    _write_all(w, 8, 64 << 10)
    w.finish({"provision.source": "ef" * 32})
    w.commit()
    assert w.sha256 == _sha(tmp_path / "a.safetensors")
    assert direct and reads_from_disk == []  # it could have read past the cache, and did not
