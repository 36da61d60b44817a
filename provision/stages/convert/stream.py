"""The streaming loop of a conversion: source tensors, chunk by chunk, cast or quantized into the shard writer.

``stream_tensors`` reads every planned tensor through the ``Prefetcher`` (so each source file is
read once, in order, and hashed on the way), casts it or quantizes it (``provision.quant``),
permutes q/k rows for the ``hf`` layout (``provision.model.hf_names``) and hands the bytes to the
``CheckpointWriter``; it returns one ``TensorReport`` per tensor, with the relative error of every
quantized weight. It does not choose the profile, name the output files or commit them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from provision.errors import ConvertError
from provision.formats.safetensors import TORCH_NAMES
from provision.formats.safetensors_writer import CheckpointWriter
from provision.io.hashing import BackgroundHasher
from provision.model import hf_names
from provision.stages.convert.items import Item, chunks, read_plan
from provision.stages.convert.prefetch import Prefetcher, SourceStream
from provision.stages.convert.record import TensorReport
from provision.stages.convert.source import SafetensorsSource

ERROR_SAMPLE = 16  # relative error of tensors over ERROR_SAMPLE_MIN_BYTES: measured on every 16th row
ERROR_SAMPLE_MIN_BYTES = 1 << 20

Read = Callable[[int, int], memoryview]


def _torch_dtype(st: str) -> Any:
    import torch

    return getattr(torch, TORCH_NAMES[st])


def _as_bytes(t: Any) -> memoryview:
    import torch

    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


def _copy_or_cast(item: Item, read: Read, writer: CheckpointWriter) -> None:
    import torch

    t = item.src
    if item.action == "copy" and item.permute_heads is None:
        for r, n in chunks(item):
            writer.write(item.out_name, read(t.start + r * item.row_bytes, n * item.row_bytes))
        return
    src_dt, out_dt = _torch_dtype(t.dtype), _torch_dtype(item.out_dtype)
    for r, n in chunks(item):
        buf = read(t.start + r * item.row_bytes, n * item.row_bytes)
        w = torch.frombuffer(buf, dtype=src_dt).reshape((n, *t.shape[1:]) if t.shape else ())
        if item.permute_heads is not None:
            w = hf_names.permute_to_hf(w, item.permute_heads)
        o = w.to(out_dt)
        if out_dt != src_dt and not bool(torch.isfinite(o).all()):
            raise ConvertError(f"Tensor {t.name!r} overflows {item.out_dtype}; convert it to bf16 instead.",
                               tensor=t.name)
        writer.write(item.out_name, _as_bytes(o))


def _quantize(item: Item, read: Read, writer: CheckpointWriter, scheme: str, rep: TensorReport) -> None:
    import torch

    from provision import quant

    t = item.src
    spec = quant.SCHEMES[scheme]
    src_dt, out_dt = _torch_dtype(t.dtype), _torch_dtype(item.out_dtype)
    cols = t.shape[1]
    scales: list[Any] = []
    err2 = ref2 = max_abs = 0.0
    for r, n in chunks(item):
        buf = read(t.start + r * item.row_bytes, n * item.row_bytes)
        w = torch.frombuffer(buf, dtype=src_dt).reshape(n, cols)
        if item.permute_heads is not None:
            w = hf_names.permute_to_hf(w, item.permute_heads)
        parts = quant.quantize(w, scheme, scale_dtype=out_dt)
        # the error is measured on every ERROR_SAMPLE-th row of big tensors (all rows of small
        # ones): dequantizing everything again would cost as much as quantizing
        step = ERROR_SAMPLE if t.nbytes > ERROR_SAMPLE_MIN_BYTES and n >= ERROR_SAMPLE else 1
        sample = {k: (v[::step] if k != "weight_shape" else v) for k, v in parts.items()}
        wf = w[::step].float()
        deq = quant.dequantize(sample, scheme) if spec.kind == "float" else quant.dequantize_int(
            quant.unpack_int32(sample["weight_packed"], spec.num_bits, cols), sample["weight_scale"],
            spec.group_size or quant.GROUP_SIZE)
        diff = wf.sub_(deq)
        err2 += float(torch.linalg.vector_norm(diff)) ** 2
        ref2 += float(torch.linalg.vector_norm(w[::step].float())) ** 2
        max_abs = max(max_abs, float(diff.abs().max()))
        writer.write(item.entries[0].name, _as_bytes(parts["weight"] if spec.kind == "float" else
                                                     parts["weight_packed"]))
        scales.append(parts["weight_scale"])
    writer.write(item.entries[1].name, _as_bytes(torch.cat(scales, 0)))
    if spec.kind == "int":
        writer.write(item.entries[2].name, _as_bytes(torch.tensor([t.shape[0], cols], dtype=torch.int64)))
    rep.relative_error = math.sqrt(err2 / ref2) if ref2 else 0.0
    rep.max_abs_error = max_abs


def convert_item(item: Item, read: Read, writer: CheckpointWriter, scheme: str) -> TensorReport:
    """Read, convert and write one tensor; ``read(start, n)`` returns its bytes in planned order."""
    rep = TensorReport(item.src.name, item.out_name, item.action)
    if item.action == "quantize":
        _quantize(item, read, writer, scheme, rep)
    else:
        _copy_or_cast(item, read, writer)
    return rep


def stream_tensors(sources: list[SafetensorsSource], items: list[Item], writer: CheckpointWriter, scheme: str,
                   source_files: list[dict[str, Any]], known_sha256: Mapping[str, str],
                   on_bytes: Callable[[int], None]) -> list[TensorReport]:
    """Convert every item into ``writer``; fill in the sha256 of each entry of ``source_files``.

    ``source_files[i]`` describes ``sources[i]``; a file named in ``known_sha256`` takes that
    digest (``sha256_from: caller``), every other one is hashed while it streams.
    """
    import torch

    streams: list[SourceStream] = []
    hashers: list[tuple[int, BackgroundHasher]] = []
    try:
        for i, s in enumerate(sources):
            if s.path.name in known_sha256:
                source_files[i]["sha256"] = known_sha256[s.path.name]
                source_files[i]["sha256_from"] = "caller"
                streams.append(SourceStream(s, None))
                continue
            h = BackgroundHasher(depth=3, name=f"sha256:{s.path.name}")
            hashers.append((i, h))
            h.update(s.header_bytes)
            streams.append(SourceStream(s, h))
        pre = Prefetcher(streams, read_plan(items), on_bytes)
        threads = torch.get_num_threads()
        # one torch thread: the chunks are small, and idle OpenMP workers spin on the core that the
        # reader and hasher threads need
        torch.set_num_threads(1)
        try:
            reports = [convert_item(it, partial(pre.read, it.source_index), writer, scheme) for it in items]
        finally:
            torch.set_num_threads(threads)
            pre.close()
        digests = [(i, h.hexdigest()) for i, h in hashers]
    except BaseException:
        for _, h in hashers:
            h.abandon()
        raise
    for i, digest in digests:
        source_files[i]["sha256"] = digest
        source_files[i]["sha256_from"] = "computed"
    return reports
