"""The read-ahead of convert: planned pieces read in big sequential requests, handed out exactly."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from provision.formats.safetensors_writer import ShardWriter, TensorEntry
from provision.io.hashing import BackgroundHasher
from provision.stages.convert import prefetch
from provision.stages.convert.prefetch import Prefetcher, SourceStream, blocks
from provision.stages.convert.source import SafetensorsSource


def test_blocks_join_ranges_that_follow_each_other_up_to_the_limit() -> None:
    plan = [(0, 100, 10), (0, 110, 10), (0, 120, 10), (0, 130, 5), (1, 135, 10), (1, 145, 40), (1, 300, 1)]
    assert blocks(plan, 30) == [[(0, 100, 10), (0, 110, 10), (0, 120, 10)],  # 30 bytes: full
                                [(0, 130, 5)],  # the next source starts a new run
                                [(1, 135, 10)],  # 10 + 40 > 30
                                [(1, 145, 40)],  # longer than the limit: alone
                                [(1, 300, 1)]]  # a gap: a new run
    assert [k for run in blocks(plan, 30) for k in run] == plan


def _source(tmp_path: Path, sizes: list[int]) -> tuple[Path, bytes]:
    entries = [TensorEntry(f"t{i}", "BF16", (n // 2,)) for i, n in enumerate(sizes)]
    w = ShardWriter(tmp_path / "consolidated.safetensors", entries, {"format": "pt"})
    data = b""
    for i, n in enumerate(sizes):
        chunk = hashlib.sha256(str(i).encode()).digest() * (n // 32 + 1)
        w.write(f"t{i}", chunk[:n])
        data += chunk[:n]
    w.finish()
    w.commit()
    return tmp_path / "consolidated.safetensors", data


@pytest.mark.parametrize("block", [1, 10_000, 1 << 20])
def test_pieces_come_back_with_their_exact_bytes_and_the_file_hashed_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    monkeypatch.setattr(prefetch, "BLOCK_BYTES", block)
    path, data = _source(tmp_path, [8192, 4098, 30_000, 2, 12_288])
    src = SafetensorsSource(path)
    try:
        h = BackgroundHasher(depth=3, name="t")
        h.update(src.header_bytes)
        plan = []
        pos = src.data_start
        for n in (4096, 4096, 4098, 7000, 23_000, 2, 12_288):  # pieces, not tensor-aligned, unaligned offsets
            plan.append((0, pos, n))
            pos += n
        assert pos == src.size
        pre = Prefetcher([SourceStream(src, h)], plan, lambda n: None, hold=3)
        try:
            held = []
            for si, start, n in plan:
                idx, mv = pre.take(si, start, n)
                off = start - src.data_start
                assert bytes(mv) == data[off:off + n]
                held.append(idx)
                if len(held) == 3:  # the caller keeps up to ``hold`` pieces, as the pool does
                    pre.release(held.pop(0))
            for idx in held:
                pre.release(idx)
        finally:
            pre.close()
        assert h.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
    finally:
        src.close()
    assert os.path.getsize(path) == src.size


def test_the_source_hasher_reading_ahead_gives_the_file_digest_and_stops_when_abandoned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from provision.errors import ConvertError
    from provision.stages.convert import stage

    monkeypatch.setattr(stage, "REHASH_BYTES", 8192)  # many pieces, each read while the last is hashed
    path, _ = _source(tmp_path, [40_000, 4, 20_480])
    fd = os.open(path, os.O_RDONLY)
    try:
        assert stage._hash_fd(fd) == hashlib.sha256(path.read_bytes()).hexdigest()
        stop = threading.Event()
        stop.set()
        before = threading.active_count()
        with pytest.raises(ConvertError, match="abandoned"):
            stage._hash_fd(fd, stop)
        assert threading.active_count() == before  # its reader thread is gone
    finally:
        os.close(fd)


def test_fp8_table_lookup_gives_the_bits_of_torchs_own_cast_for_every_code() -> None:
    import torch

    from provision.quant import dequantize_fp8, fp8_to_float32

    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    assert torch.equal(fp8_to_float32(codes).view(torch.int32), codes.float().view(torch.int32))
    q = codes.reshape(16, 16)[:, ::3]  # a strided view, as the error sample takes
    scale = torch.linspace(0.01, 2.0, 16).to(torch.bfloat16).reshape(16, 1)
    want = (q.float() * scale.float()).view(torch.int32)
    assert torch.equal(dequantize_fp8(q, scale).view(torch.int32), want)
