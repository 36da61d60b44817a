"""The streaming loop of a conversion: source tensors, chunk by chunk, cast or quantized into the shard writer.

``stream_tensors`` reads every planned tensor through the ``Prefetcher`` (so each source file is
read once, in order, and hashed on the way), casts or quantizes its row pieces (``provision.quant``)
on one or several threads (``parallel.OrderedPool``), permutes q/k rows for the ``hf`` layout
(``provision.model.hf_names``) and hands the bytes to the ``CheckpointWriter`` in order, so the
output is the same for any number of threads; it returns one ``TensorReport`` per tensor, with
the relative error of every quantized weight. It does not choose the profile, name the output files or commit them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from provision.errors import ConvertError
from provision.formats.safetensors import TORCH_NAMES
from provision.formats.safetensors_writer import CheckpointWriter
from provision.io.hashing import BackgroundHasher
from provision.model import hf_names
from provision.stages.convert.allocator import keep_freed_blocks
from provision.stages.convert.items import Item, chunks, read_plan
from provision.stages.convert.parallel import OrderedPool
from provision.stages.convert.prefetch import Prefetcher, SourceStream
from provision.stages.convert.record import TensorReport
from provision.stages.convert.source import SafetensorsSource

ERROR_SAMPLE = 16  # relative error of tensors over ERROR_SAMPLE_MIN_BYTES: measured on every 16th row
ERROR_SAMPLE_MIN_BYTES = 1 << 20
WINDOW_PER_WORKER = 2  # pieces started and not yet written, per conversion thread

def _torch_dtype(st: str) -> Any:
    import torch

    return getattr(torch, TORCH_NAMES[st])


def _as_bytes(t: Any) -> memoryview:
    import torch

    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


@dataclass
class ChunkOut:
    """What converting one row piece of a tensor produced: the bytes of its first output entry and,
    for a quantized weight, its scales and the squared-error sums of its sampled rows."""

    data: memoryview
    scale: Any = None
    err2: float = 0.0
    ref2: float = 0.0
    max_abs: float = 0.0


def _rows(item: Item, buf: memoryview, r: int, n: int) -> Any:
    """The piece as a tensor of the source dtype, q/k rows permuted for the ``hf`` layout."""
    import torch

    t = item.src
    w = torch.frombuffer(buf, dtype=_torch_dtype(t.dtype)).reshape((n, *t.shape[1:]) if t.shape else ())
    if item.permute_heads is not None:
        w = hf_names.permute_to_hf(w, item.permute_heads * n // t.shape[0])
    return w


def _cast_chunk(item: Item, buf: memoryview, r: int, n: int) -> ChunkOut:
    import torch

    t = item.src
    if item.action == "copy" and item.permute_heads is None:
        return ChunkOut(buf)
    src_dt, out_dt = _torch_dtype(t.dtype), _torch_dtype(item.out_dtype)
    o = _rows(item, buf, r, n).to(out_dt)
    if out_dt != src_dt and not bool(torch.isfinite(o).all()):
        raise ConvertError(f"Tensor {t.name!r} overflows {item.out_dtype}; convert it to bf16 instead.",
                           tensor=t.name)
    return ChunkOut(_as_bytes(o))


def _quantize_chunk(item: Item, buf: memoryview, r: int, n: int, scheme: str) -> ChunkOut:
    import torch

    from provision import quant

    t = item.src
    spec = quant.SCHEMES[scheme]
    cols = t.shape[1]
    w = _rows(item, buf, r, n)
    parts = quant.quantize(w, scheme, scale_dtype=_torch_dtype(item.out_dtype))
    # the error is measured on every ERROR_SAMPLE-th row of big tensors (all rows of small
    # ones): dequantizing everything again would cost as much as quantizing
    step = ERROR_SAMPLE if t.nbytes > ERROR_SAMPLE_MIN_BYTES and n >= ERROR_SAMPLE else 1
    sample = {k: (v[::step] if k != "weight_shape" else v) for k, v in parts.items()}
    wf = w[::step].float()
    deq = quant.dequantize(sample, scheme) if spec.kind == "float" else quant.dequantize_int(
        quant.unpack_int32(sample["weight_packed"], spec.num_bits, cols), sample["weight_scale"],
        spec.group_size or quant.GROUP_SIZE)
    diff = wf.sub_(deq)
    return ChunkOut(_as_bytes(parts["weight"] if spec.kind == "float" else parts["weight_packed"]),
                    scale=parts["weight_scale"], err2=float(torch.linalg.vector_norm(diff)) ** 2,
                    ref2=float(torch.linalg.vector_norm(w[::step].float())) ** 2, max_abs=float(diff.abs().max()))


def convert_chunk(item: Item, buf: memoryview, r: int, n: int, scheme: str) -> ChunkOut:
    """Convert rows ``r``..``r+n`` of ``item`` from their source bytes ``buf``; touches nothing shared,
    so pieces of any tensors may be converted on several threads at once."""
    if item.action == "quantize":
        return _quantize_chunk(item, buf, r, n, scheme)
    return _cast_chunk(item, buf, r, n)


class _ItemWriter:
    """Writes the converted pieces of the tensors in order and completes each tensor's report."""

    def __init__(self, items: list[Item], writer: CheckpointWriter, scheme: str) -> None:
        self.writer, self.scheme = writer, scheme
        self.last = {id(it): list(chunks(it))[-1][0] for it in items}
        self.reports: list[TensorReport] = []
        self.scales: list[Any] = []
        self.err2 = self.ref2 = self.max_abs = 0.0

    def put(self, item: Item, r: int, out: ChunkOut) -> None:
        self.writer.write(item.entries[0].name if item.action == "quantize" else item.out_name, out.data)
        if item.action == "quantize":
            self.scales.append(out.scale)
            self.err2 += out.err2
            self.ref2 += out.ref2
            self.max_abs = max(self.max_abs, out.max_abs)
        if r == self.last[id(item)]:
            self.reports.append(self._finish(item))

    def _finish(self, item: Item) -> TensorReport:
        import torch

        rep = TensorReport(item.src.name, item.out_name, item.action)
        if item.action == "quantize":
            self.writer.write(item.entries[1].name, _as_bytes(torch.cat(self.scales, 0)))
            if len(item.entries) > 2:  # the int schemes' weight_shape
                self.writer.write(item.entries[2].name,
                                  _as_bytes(torch.tensor([item.src.shape[0], item.src.shape[1]], dtype=torch.int64)))
            rep.relative_error = math.sqrt(self.err2 / self.ref2) if self.ref2 else 0.0
            rep.max_abs_error = self.max_abs
            self.scales, self.err2, self.ref2, self.max_abs = [], 0.0, 0.0, 0.0
        return rep


def convert_items(items: list[Item], pre: Prefetcher, writer: CheckpointWriter, scheme: str,
                  pool: OrderedPool[tuple[Item, int, int], ChunkOut]) -> list[TensorReport]:
    """Convert every piece of ``items`` on ``pool`` and write the results in order; the reports."""
    out = _ItemWriter(items, writer, scheme)

    def jobs() -> Iterator[tuple[tuple[Item, int, int], Callable[[], ChunkOut]]]:
        for it in items:
            for r, n in chunks(it):
                idx, mv = pre.take(it.source_index, it.src.start + r * it.row_bytes, n * it.row_bytes)
                yield (it, r, idx), partial(convert_chunk, it, mv, r, n, scheme)

    for (it, r, idx), res in pool.ordered(jobs()):
        out.put(it, r, res)  # a copied piece is the read buffer itself: written before it is reused
        pre.release(idx)
    return out.reports


def stream_tensors(sources: list[SafetensorsSource], items: list[Item], writer: CheckpointWriter, scheme: str,
                   source_files: list[dict[str, Any]], known_sha256: Mapping[str, str],
                   on_bytes: Callable[[int], None], workers: int = 1,
                   hashed_elsewhere: Collection[str] = ()) -> list[TensorReport]:
    """Convert every item into ``writer`` on ``workers`` threads; fill in the sha256 of each entry of
    ``source_files``. The output does not depend on ``workers``.

    ``source_files[i]`` describes ``sources[i]``; a file named in ``known_sha256`` takes that
    digest (``sha256_from: caller``), a file named in ``hashed_elsewhere`` is left as it is (the
    caller hashes it on its own thread), every other one is hashed while it streams. Memory: the
    read-ahead ring holds ``3 + WINDOW_PER_WORKER * workers + 5`` buffers of the largest piece
    (``items.CHUNK_BYTES``, 16 MiB), and each piece in flight has one output of at most that size.
    """
    import torch

    streams: list[SourceStream] = []
    hashers: list[tuple[int, BackgroundHasher]] = []
    try:
        known: list[int] = []  # their digests are read after the streaming (an overlapped fetch supplies them late)
        for i, s in enumerate(sources):
            if s.path.name in known_sha256:
                known.append(i)
                streams.append(SourceStream(s, None))
                continue
            if s.path.name in hashed_elsewhere:
                streams.append(SourceStream(s, None))
                continue
            h = BackgroundHasher(depth=3, name=f"sha256:{s.path.name}")
            hashers.append((i, h))
            h.update(s.header_bytes)
            streams.append(SourceStream(s, h))
        window = WINDOW_PER_WORKER * workers if workers > 1 else 1
        pre = Prefetcher(streams, read_plan(items), on_bytes, hold=window)
        threads = torch.get_num_threads()
        # one torch thread per conversion thread: the pieces are small, parallelism comes from
        # converting several at once, and idle OpenMP workers would spin on the cores that the
        # reader, hasher and writer need
        torch.set_num_threads(1)
        keep_freed_blocks()  # the pieces' temporaries are reused instead of page-faulted in again
        try:
            with OrderedPool[tuple[Item, int, int], ChunkOut](workers, window) as pool:
                reports = convert_items(items, pre, writer, scheme, pool)
        finally:
            torch.set_num_threads(threads)
            pre.close()
        digests = [(i, h.hexdigest()) for i, h in hashers]
        for i in known:
            source_files[i]["sha256"] = known_sha256[sources[i].path.name]
            source_files[i]["sha256_from"] = "caller"
    except BaseException:
        for _, h in hashers:
            h.abandon()
        raise
    for i, digest in digests:
        source_files[i]["sha256"] = digest
        source_files[i]["sha256_from"] = "computed"
    return reports
