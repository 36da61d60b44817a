"""The pipelined loader (threads -> reused host buffers -> asynchronous copies) reads exactly what
``safe_open`` reads: for bf16 and fp8 checkpoints, both layouts, any buffer size, any thread count.

On this CPU-only machine the copies are plain ``copy_`` calls; ``DeferredCopier`` below stands in
for a CUDA copy stream: a copy only happens when its fence is waited on (or at the end), and the
buffer still holds whatever was written into it at that time. A loader that refilled a buffer
before its copies were done would hand the deferred copies the wrong bytes, so these tests also
catch the reuse races the GPU path could have. A copier that claims its copies are done when they
are not shows the corruption the check detects.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from provision.errors import StructureError
from provision.model.loader import (
    Copier,
    open_checkpoint,
    plan_chunks,
    read_files,
    read_tensors_pipelined,
    read_tensors_simple,
)
from provision.model.placement import plan_placement

ST_DTYPES = {"U8": torch.uint8, "BF16": torch.bfloat16, "F32": torch.float32, "F8_E4M3": torch.float8_e4m3fn,
             "I64": torch.int64, "F16": torch.float16}


class DeferredCopier(Copier):
    """A copy stream that runs each copy as late as it may: when a fence after it is waited on, or at the end."""

    def __init__(self) -> None:
        self.queue: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.ran = 0
        self.waits = 0

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.queue.append((dst, src))  # views: the bytes are read when the copy runs

    def fence(self) -> Any:
        return len(self.queue)

    def done(self, fence: Any) -> bool:
        return self.ran >= fence

    def wait(self, fence: Any) -> None:
        self.waits += 1
        while self.ran < fence:
            dst, src = self.queue[self.ran]
            dst.copy_(src)
            self.ran += 1

    def finish(self) -> None:
        self.wait(len(self.queue))


class LyingCopier(DeferredCopier):
    """Says every copy is done at once (a loader that reuses buffers without waiting would behave so)."""

    def done(self, fence: Any) -> bool:
        return True


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k].dtype, tuple(a[k].shape), a[k].device) == (b[k].dtype, tuple(b[k].shape), b[k].device), k
        assert _raw(a[k]) == _raw(b[k]), k


def _write_st(path: Path, tensors: list[tuple[str, str, tuple[int, ...], bytes]]) -> None:
    """A safetensors file written by hand (layout from the format's spec, not from our writer)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, dt, shape, data in tensors:
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(data)]}
        off += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(t[3] for t in tensors))


def _mixed_file(path: Path, seed: int) -> None:
    rng = random.Random(seed)
    tensors: list[tuple[str, str, tuple[int, ...], bytes]] = []
    sizes = [0, 1, 2, 3, 5, 64, 999, 1000, 1001, 4096, 5000, 12345]
    for i in range(60):
        dt = rng.choice(list(ST_DTYPES))
        width = ST_DTYPES[dt].itemsize
        n = rng.choice(sizes)
        shape: tuple[int, ...] = (n,) if i % 3 else ((n, 1) if n else (0, 4))
        if i == 7:
            shape = ()  # a scalar
            n = 1
        data = rng.randbytes(n * width)
        if dt in ("BF16", "F16", "F32", "F8_E4M3"):  # no NaN bit patterns: compare bytes anyway, but keep them sane
            data = bytes(b & 0x3F for b in data)
        tensors.append((f"t.{i:02d}", dt, shape, data))
    _write_st(path, tensors)


@pytest.fixture(scope="module")
def mixed_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("mixed")
    paths = [d / "a.safetensors", d / "b.safetensors"]
    for i, p in enumerate(paths):
        _mixed_file(p, seed=i)
    return paths


def _load_file_all(paths: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for p in paths:
        out.update({f"{p.stem}:{k}": v for k, v in load_file(str(p)).items()})
    return out


def _read_all(paths: list[Path], **kw: Any) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p in paths:  # one file at a time keeps the names apart; each file still uses the whole pipeline
        out.update({f"{p.stem}:{k}": v for k, v in read_files([p], torch.device("cpu"), **kw).items()})
    return out


# ---------------------------------------------------------------------------------------
# the plan


def test_plan_covers_every_byte_once_within_the_buffer_size() -> None:
    # file 0: tensors of 10, 3, 25 and 0 bytes back to back, then one after a gap; file 1: one of 7
    ranges = [(0, 0, 100, 10), (0, 1, 110, 3), (0, 2, 113, 25), (0, 3, 138, 0), (0, 4, 200, 4), (1, 5, 50, 7)]
    chunks = plan_chunks(ranges, 8)
    assert all(0 < c.nbytes <= 8 for c in chunks)
    covered: dict[int, list[tuple[int, int]]] = {}
    for c in chunks:
        pos = 0
        for s in c.segments:
            assert s.buf_off == pos  # segments fill the buffer from its start, in file order
            covered.setdefault(s.tensor, []).append((s.dst_off, s.nbytes))
            pos += s.nbytes
        assert pos == c.nbytes
    sizes = {r[1]: r[3] for r in ranges}
    for t, parts in covered.items():
        assert sorted(parts)[0][0] == 0 and sum(n for _, n in parts) == sizes[t]
        ends = [o + n for o, n in sorted(parts)]
        assert [o for o, _ in sorted(parts)][1:] == ends[:-1]  # contiguous, no overlap
    assert 3 not in covered  # nothing to read for an empty tensor
    # a gap or another file starts a new read: the tensor at 200 and file 1's never share a chunk
    assert [(c.file, c.file_off, c.nbytes) for c in chunks][-2:] == [(0, 200, 4), (1, 50, 7)]
    assert (chunks[0].file_off, chunks[0].nbytes) == (100, 8)  # 10+3+25 bytes in reads of 8, 8, 8, 8, 6
    assert [c.nbytes for c in chunks[:5]] == [8, 8, 8, 8, 6]


def test_a_buffer_of_zero_bytes_is_refused() -> None:
    with pytest.raises(Exception, match="at least one byte"):
        plan_chunks([(0, 0, 0, 4)], 0)


# ---------------------------------------------------------------------------------------
# bytes read == bytes stored


@pytest.mark.parametrize(("buffer_bytes", "threads"), [(61, 2), (1000, 1), (4096, 4), (1 << 20, 2)])
def test_tensors_smaller_larger_and_across_buffers_read_back_exactly(mixed_files: list[Path], buffer_bytes: int,
                                                                     threads: int) -> None:
    _same(_read_all(mixed_files, buffer_bytes=buffer_bytes, threads=threads), _load_file_all(mixed_files))


@pytest.mark.parametrize(("buffer_bytes", "threads"), [(61, 2), (333, 4), (4096, 2)])
def test_asynchronous_copies_never_see_a_refilled_buffer(mixed_files: list[Path], buffer_bytes: int,
                                                         threads: int) -> None:
    made: list[DeferredCopier] = []

    def factory(_d: torch.device) -> Copier:
        made.append(DeferredCopier())
        return made[-1]

    got = _read_all(mixed_files, buffer_bytes=buffer_bytes, threads=threads, copier_factory=factory)
    _same(got, _load_file_all(mixed_files))
    assert all(c.waits > 0 and c.ran == len(c.queue) for c in made)  # buffers really were waited for, then reused


def test_a_loader_that_reused_buffers_early_would_be_caught(mixed_files: list[Path]) -> None:
    got = _read_all(mixed_files, buffer_bytes=500, threads=2, copier_factory=lambda _d: LyingCopier())
    ref = _load_file_all(mixed_files)
    assert any(_raw(got[k]) != _raw(ref[k]) for k in ref)


def test_several_destinations_each_get_their_own_copier(mixed_files: list[Path]) -> None:
    made: dict[str, DeferredCopier] = {}

    def factory(d: torch.device) -> Copier:
        made[str(d)] = DeferredCopier()
        return made[str(d)]

    # "cpu" and "cpu:0" are two device keys here: the per-device bookkeeping is what is under test
    def where(name: str) -> torch.device:
        return torch.device("cpu", 0) if int(name[2:]) % 2 == 0 else torch.device("cpu")

    got = read_files([mixed_files[0]], where, buffer_bytes=777, threads=2, copier_factory=factory)
    ref = {k.split(":", 1)[1]: v for k, v in _load_file_all([mixed_files[0]]).items()}
    _same(got, ref)
    assert set(made) == {"cpu", "cpu:0"} and all(c.ran == len(c.queue) > 0 for c in made.values())


def test_a_file_cut_short_after_its_header_was_checked_is_a_structure_error(tmp_path: Path) -> None:
    p = tmp_path / "short.safetensors"
    _write_st(p, [("a", "F32", (1000,), bytes(4000)), ("b", "F32", (1000,), bytes(4000))])
    from provision.model import loader

    infos = loader._headers([p])  # the header check passes on the whole file ...
    with p.open("r+b") as f:  # ... then the file shrinks (a concurrent rewrite, a bad disk)
        f.truncate(p.stat().st_size - 100)
    monkey = pytest.MonkeyPatch()
    monkey.setattr(loader, "_headers", lambda paths: infos)
    try:
        with pytest.raises(StructureError) as e:
            read_files([p], torch.device("cpu"), buffer_bytes=1024)
        assert e.value.exit_code == 5 and "fetch it again" in e.value.message
    finally:
        monkey.undo()


# ---------------------------------------------------------------------------------------
# whole checkpoints: the pipelined reader's state dict == the simple reader's


@pytest.fixture(scope="module")
def tiny_fp8(tiny_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from provision.stages.convert import convert

    out = tmp_path_factory.mktemp("fp8") / "fp8"
    convert(tiny_src, out, target="h100", scheme="fp8", layout="hf", hf_tokenizer=False)
    return out


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["bf16-mistral", "bf16-hf", "fp8-hf"])
def test_pipelined_reader_yields_the_simple_readers_state_dict(tiny_src: Path, tiny_hf: Path, tiny_fp8: Path,
                                                               which: str, dtype: torch.dtype | None) -> None:
    folder = {"bf16-mistral": tiny_src, "bf16-hf": tiny_hf, "fp8-hf": tiny_fp8}[which]
    ckpt = open_checkpoint(folder)
    cpu = torch.device("cpu")
    ref = read_tensors_simple(ckpt, cpu, dtype)
    _same(read_tensors_pipelined(ckpt, cpu, dtype, buffer_bytes=30011, threads=3), ref)
    _same(read_tensors_pipelined(ckpt, cpu, dtype, copier_factory=lambda _d: DeferredCopier(), buffer_bytes=65536),
          ref)
    if which == "fp8-hf":
        assert any(t.dtype == torch.float8_e4m3fn for t in ref.values())


def test_pipelined_reader_follows_a_placement(tiny_mixtral: Path) -> None:
    ckpt = open_checkpoint(tiny_mixtral)
    placement = plan_placement(ckpt.args, ["cpu", "cpu"], dtype_bytes=4)
    cpu = torch.device("cpu")
    _same(read_tensors_pipelined(ckpt, cpu, torch.float32, placement, buffer_bytes=4096),
          read_tensors_simple(ckpt, cpu, torch.float32, placement))


def test_load_model_gives_the_same_logits_through_either_reader(tiny_fp8: Path) -> None:
    from provision.model.loader import load_model

    fast, _ = load_model(tiny_fp8, device="cpu", dtype=torch.float32)
    slow, _ = load_model(tiny_fp8, device="cpu", dtype=torch.float32, pipelined=False)
    _same(fast.state_dict(), slow.state_dict())
    tokens = torch.tensor([[1, 7, 300, 12]])
    with torch.no_grad():
        assert torch.equal(fast(tokens), slow(tokens))
