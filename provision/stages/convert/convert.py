"""The convert stage: a Mistral-format checkpoint -> a cast or quantized copy for one target.

``convert(src_dir, out_dir, target=..., scheme="auto", layout=None, context=32768)``:

1. reads ``params.json`` and the safetensors header(s) of ``consolidated*.safetensors``;
2. picks the profile (``profiles.choose``): an unknown scheme is a usage error (2), a scheme
   the target cannot run is exit 3, nothing fitting is exit 6, a full disk is exit 6, all
   before anything is written;
3. streams the tensors one at a time in file order, each in row chunks of about 16 MiB read
   with ``os.pread`` (the source is never mapped; pages read are dropped with
   ``posix_fadvise(DONTNEED)``), casts or quantizes them (``quant.py``), renames and permutes
   q/k for the ``hf`` layout (``keymap.py``) and writes them with the streaming writer under
   temporary names; the source's sha256 is computed on the way in a helper thread and
   patched into every shard's metadata;
4. commits the shards, then the side files (``params.json``/``tekken.json`` or ``config.json``
   with a compressed-tensors ``quantization_config``, processor and tokenizer files), and
   writes ``provision-convert.json`` (the record: profile, per-tensor relative error of every
   quantized weight, measured on every 16th row of tensors over 1 MiB, the ``vllm serve``
   command) last. ``compare_logits`` adds the model-level check (top-1 agreement and cosine of
   logits, 16-bit vs converted, on the smoke prompt) when both fit in RAM.

A run killed midway leaves only ``.provision-tmp-*`` files, removed by the next run. It does
not verify the source's hashes against a manifest (``verify`` does) and does not run the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.errors import ConvertError, HostileContentError, StructureError, UsageError
from provision.formats.params import ModelArgs
from provision.hardware import Target, parse_target
from provision.io.atomic import atomic_write_text
from provision.io.space import check_free_space
from provision.progress import ProgressEvent, ProgressFn
from provision.stages.profiles import CASTS, QUANTIZED, Profile, choose, quantized_tensor

RECORD_NAME = "provision-convert.json"
CHUNK_BYTES = 16 << 20
ERROR_SAMPLE = 16  # relative error of tensors over ERROR_SAMPLE_MIN_BYTES: measured on every 16th row
ERROR_SAMPLE_MIN_BYTES = 1 << 20
MAX_HEADER = 100 * 10**6
SHARD_BYTES = 5 * 10**9
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# Names this stage writes; anything else in an existing --out folder makes it refuse.
_OUR_FILES = re.compile(
    r"^(consolidated(-\d{5}-of-\d{5})?\.safetensors|consolidated\.safetensors\.index\.json|"
    r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|params\.json|tekken\.json|"
    r"tokenizer\.model(\.v\d+m?\d*)?|config\.json|generation_config\.json|preprocessor_config\.json|"
    r"processor_config\.json|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|"
    r"chat_template\.jinja|chat_template\.json|" + re.escape(RECORD_NAME) + r")$")
_SIDE_FILES_MISTRAL = re.compile(r"^(params\.json|tekken\.json|tokenizer\.model(\.v\d+m?\d*)?)$")

_ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
_TORCH_TO_ST = {"bfloat16": "BF16", "float16": "F16"}


# ---------------------------------------------------------------------------------------
# Source


@dataclass(frozen=True)
class SrcTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offsets
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsSource:
    """One safetensors file read by offsets: header parsed and checked, tensors read in pieces."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise StructureError(f"Cannot open {self.path}: {e.strerror}.", path=str(path)) from None
        try:
            self.size = os.fstat(self.fd).st_size
            head = os.pread(self.fd, 8, 0)
            if len(head) < 8:
                raise StructureError(f"{self.path.name} is too short to be a safetensors file.", path=str(path))
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER or 8 + n > self.size:
                raise StructureError(f"{self.path.name} claims a {n}-byte header; the file is {self.size} bytes.",
                                     path=str(path))
            self.header_bytes = head + os.pread(self.fd, n, 8)
            try:
                doc = json.loads(self.header_bytes[8:])
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise StructureError(f"{self.path.name} has a header that is not JSON.", path=str(path)) from None
            if not isinstance(doc, dict):
                raise StructureError(f"{self.path.name} has a header that is not a JSON object.", path=str(path))
            self.data_start = 8 + n
            tensors = []
            for name, info in doc.items():
                if name == "__metadata__":
                    continue
                try:
                    dtype, shape = info["dtype"], tuple(int(x) for x in info["shape"])
                    b, end = (int(x) for x in info["data_offsets"])
                except (KeyError, TypeError, ValueError):
                    raise StructureError(f"{self.path.name}: tensor {name!r} has a malformed header entry.",
                                         path=str(path), tensor=name) from None
                if dtype not in _ST_DTYPES:
                    raise ConvertError(f"{self.path.name}: tensor {name!r} has dtype {dtype}; only BF16, F16 and "
                                       "F32 sources can be converted.", tensor=name, dtype=dtype)
                item = 2 if dtype != "F32" else 4
                if end - b != math.prod(shape) * item or b < 0 or self.data_start + end > self.size:
                    raise StructureError(f"{self.path.name}: tensor {name!r} has offsets that do not match its "
                                         "shape or the file size.", path=str(path), tensor=name)
                tensors.append(SrcTensor(name, dtype, shape, self.data_start + b, self.data_start + end))
            self.tensors = sorted(tensors, key=lambda t: t.start)
        except BaseException:
            os.close(self.fd)
            raise

    def read(self, start: int, n: int) -> bytearray:
        buf = bytearray(n)
        self.read_into(memoryview(buf), start)
        return buf

    def read_into(self, mv: memoryview, start: int) -> None:
        n = mv.nbytes
        got = 0
        while got < n:
            k = os.preadv(self.fd, [mv[got:]], start + got)
            if k == 0:
                raise StructureError(f"{self.path.name} ended early at byte {start + got}.", path=str(self.path))
            got += k

    def drop_cache(self, start: int, n: int) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(self.fd, start, n, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class _Hasher:
    """sha256 of one file fed in order (header, then every data byte) on a helper thread."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.q: queue.Queue[tuple[bytes | bytearray | memoryview, Callable[[], None] | None] | None] = \
            queue.Queue(maxsize=3)
        self.error: BaseException | None = None
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        try:
            while True:
                item = self.q.get()
                if item is None:
                    return
                data, done = item
                self.h.update(data)
                if done is not None:
                    done()
        except BaseException as e:  # pragma: no cover
            self.error = e

    def feed(self, b: bytes | bytearray | memoryview, done: Callable[[], None] | None = None) -> None:
        """Hash ``b`` next; ``done`` is called once it has been (so a reused buffer can be freed)."""
        self.q.put((b, done))

    def hexdigest(self) -> str:
        self.q.put(None)
        self.t.join()
        if self.error:  # pragma: no cover
            raise self.error
        return self.h.hexdigest()

    def abandon(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self.q.get_nowait()
        with contextlib.suppress(queue.Full):
            self.q.put_nowait(None)


def find_sources(src_dir: Path) -> list[Path]:
    """The Mistral-format weight files of ``src_dir`` (``consolidated*.safetensors``)."""
    d = Path(src_dir)
    if not d.is_dir():
        raise UsageError(f"{d} is not a folder; pass the folder holding params.json and consolidated.safetensors.")
    files = sorted(p for p in d.iterdir() if re.fullmatch(r"consolidated(-\d{5}-of-\d{5})?\.safetensors", p.name))
    for p in files:
        if p.is_symlink() and d.resolve() not in p.resolve().parents:
            raise HostileContentError(f"Refusing {p.name}: it is a symlink out of {d}.", path=str(p))
    if not files:
        pickles = [p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise HostileContentError(f"{d} holds only pickle weights ({', '.join(pickles)}); provision never "
                                      "loads pickle files.", hint="Use a safetensors release.", files=pickles)
        raise StructureError(f"No consolidated*.safetensors in {d}; convert reads Mistral-format checkpoints.",
                             path=str(d))
    return files


# ---------------------------------------------------------------------------------------
# What to write


@dataclass
class Item:
    """One source tensor and what it becomes."""

    src: SrcTensor
    source_index: int
    action: str  # copy | cast | quantize
    out_name: str  # for quantize: the module name (suffixes are added)
    out_dtype: str  # safetensors dtype of the 16-bit output or the scale
    permute_heads: int | None
    entries: list[Any] = field(default_factory=list)  # writer.TensorEntry


@dataclass
class TensorReport:
    name: str
    out_name: str
    action: str
    relative_error: float | None = None
    max_abs_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "out_name": self.out_name, "action": self.action,
                "relative_error": self.relative_error, "max_abs_error": self.max_abs_error}


@dataclass
class ConvertResult:
    src_dir: Path
    out_dir: Path
    target: Target
    profile: Profile
    files: list[tuple[str, int]]
    source_files: list[dict[str, Any]]
    tensors: list[TensorReport]
    bytes_read: int
    bytes_written: int
    seconds: float
    vllm_command: str
    notes: list[str] = field(default_factory=list)

    @property
    def scheme(self) -> str:
        return self.profile.scheme

    @property
    def layout(self) -> str:
        return self.profile.layout

    def quality(self) -> dict[str, Any]:
        errs = [t.relative_error for t in self.tensors if t.relative_error is not None]
        return {"quantized_tensors": len(errs),
                "relative_error_max": max(errs) if errs else 0.0,
                "relative_error_mean": (sum(errs) / len(errs)) if errs else 0.0}

    def to_dict(self) -> dict[str, Any]:
        return {
            "src_dir": str(self.src_dir), "out_dir": str(self.out_dir), "target": self.target.to_dict(),
            "profile": self.profile.to_dict(), "scheme": self.scheme, "layout": self.layout,
            "files": [{"path": n, "size": s} for n, s in self.files], "source_files": self.source_files,
            "bytes_read": self.bytes_read, "bytes_written": self.bytes_written, "seconds": round(self.seconds, 3),
            "throughput_bytes_per_s": round(self.bytes_read / self.seconds) if self.seconds else None,
            "quality": self.quality(), "tensors": [t.to_dict() for t in self.tensors],
            "vllm_command": self.vllm_command, "notes": self.notes,
        }


def _plan_items(sources: list[SafetensorsSource], args: ModelArgs, profile: Profile) -> list[Item]:
    from provision.formats.safetensors_writer import TensorEntry
    from provision.model import hf_names as keymap
    from provision.quant import SCHEMES

    scheme, layout = profile.scheme, profile.layout
    dt16 = _TORCH_TO_ST[profile.activation_dtype] if scheme in QUANTIZED else _TORCH_TO_ST[
        "bfloat16" if scheme == "bf16" else "float16"]
    items: list[Item] = []
    seen: set[str] = set()
    for si, src in enumerate(sources):
        for t in src.tensors:
            if t.name in seen:
                raise StructureError(f"Tensor {t.name!r} appears in two source files.", tensor=t.name)
            seen.add(t.name)
            out = keymap.mistral_name_to_hf(t.name) if layout == "hf" else t.name
            heads = keymap.rope_heads(t.name, args) if layout == "hf" else None
            if scheme in QUANTIZED and quantized_tensor(t.name, t.shape, scheme) and SCHEMES[scheme].supports(t.shape):
                spec = SCHEMES[scheme]
                rows, cols = t.shape
                module = out[: -len(".weight")]
                if spec.kind == "float":
                    ents = [TensorEntry(module + ".weight", "F8_E4M3", (rows, cols)),
                            TensorEntry(module + ".weight_scale", dt16, (rows, 1))]
                else:
                    ents = [TensorEntry(module + ".weight_packed", "I32", (rows, spec.packed_cols(cols))),
                            TensorEntry(module + ".weight_scale", dt16, (rows, spec.scale_cols(cols))),
                            TensorEntry(module + ".weight_shape", "I64", (2,))]
                items.append(Item(t, si, "quantize", module, dt16, heads, ents))
            else:
                action = "copy" if t.dtype == dt16 else "cast"
                items.append(Item(t, si, action, out, dt16, heads, [TensorEntry(out, dt16, t.shape)]))
    return items


def _check_spec(items: list[Item], args: ModelArgs) -> None:
    from provision.formats.params import tensor_spec

    want = tensor_spec(args)
    have = {i.src.name: i.src.shape for i in items}
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    wrong = [k for k in want if k in have and tuple(want[k]) != have[k]]
    if missing or extra or wrong:
        first = (missing or extra or wrong)[0]
        raise StructureError(
            f"The source tensors do not match params.json ({len(missing)} missing, {len(extra)} extra, "
            f"{len(wrong)} of the wrong shape; first: {first!r}); run `provision verify` on it.",
            missing=missing[:20], extra=extra[:20], wrong_shape=wrong[:20])


# ---------------------------------------------------------------------------------------
# Conversion of one tensor


def _torch_dtype(st: str) -> Any:
    import torch

    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[st]


def _as_bytes(t: Any) -> memoryview:
    import torch

    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


def _chunks(item: Item) -> Iterator[tuple[int, int]]:
    """(first row, row count) pieces of about CHUNK_BYTES (the whole tensor when it must be permuted)."""
    shape = item.src.shape
    rows = shape[0] if shape else 1
    if item.permute_heads is not None or len(shape) < 2 or rows <= 1:
        yield 0, rows
        return
    row_bytes = item.src.nbytes // rows
    per = max(1, CHUNK_BYTES // max(row_bytes, 1))
    if item.action == "quantize":
        per = max(1, min(per, (2 << 20) // max(row_bytes, 1)))  # cache-sized float32 temporaries
    for r in range(0, rows, per):
        yield r, min(per, rows - r)


class _BufferRing:
    """Read buffers reused across chunks (no page faults or zero-fill per chunk).

    ``acquire(holders)`` hands out a free buffer that returns to the pool once ``release``
    has been called ``holders`` times (the converter and the hasher each release it).
    """

    def __init__(self, size: int, count: int) -> None:
        self.bufs = [bytearray(max(size, 1)) for _ in range(count)]
        self.free: queue.Queue[int] = queue.Queue()
        for i in range(count):
            self.free.put(i)
        self.refs = [0] * count
        self.lock = threading.Lock()

    def acquire(self, holders: int, stop: threading.Event) -> int | None:
        while not stop.is_set():
            try:
                i = self.free.get(timeout=0.1)
            except queue.Empty:
                continue
            self.refs[i] = holders
            return i
        return None

    def release(self, i: int) -> None:
        with self.lock:
            self.refs[i] -= 1
            if self.refs[i] == 0:
                self.free.put(i)


class _Stream:
    """Reads one source's bytes in file order, feeding the hasher and dropping the page cache."""

    def __init__(self, src: SafetensorsSource, hasher: _Hasher | None) -> None:
        self.src, self.hasher = src, hasher
        self.pos = src.data_start  # next byte the hasher expects

    def _gap(self, start: int) -> None:
        if start > self.pos:  # bytes between tensors (not written by well-formed files): hash them too
            gap = self.src.read(self.pos, start - self.pos)
            if self.hasher:
                self.hasher.feed(gap)
            self.pos = start

    def read(self, start: int, n: int) -> bytearray:
        """A fresh buffer (used for the rare trailing bytes)."""
        self._gap(start)
        buf = self.src.read(start, n)
        if self.hasher:
            self.hasher.feed(buf)
        self.pos = start + n
        self.src.drop_cache(start, n)
        return buf

    def read_ring(self, start: int, n: int, ring: _BufferRing, stop: threading.Event) -> tuple[int, memoryview] | None:
        """Read into a ring buffer held by the caller and (until hashed) by the hasher."""
        self._gap(start)
        i = ring.acquire(2 if self.hasher else 1, stop)
        if i is None:
            return None
        mv = memoryview(ring.bufs[i])[:n]
        self.src.read_into(mv, start)
        if self.hasher:
            self.hasher.feed(mv, lambda: ring.release(i))
        self.pos = start + n
        self.src.drop_cache(start, n)
        return i, mv


class _Prefetcher:
    """Reads a known sequence of (source, start, length) ranges ahead on a helper thread.

    At most ``depth`` chunks wait in memory, in a ring of reused buffers. ``read(si, start, n)``
    must ask for the ranges in the planned order; the memoryview it returns stays valid until
    the next ``read`` (or ``close``). Progress is reported on the calling thread.
    """

    def __init__(self, streams: list[_Stream], plan: list[tuple[int, int, int]], on_bytes: Callable[[int], None],
                 depth: int = 3) -> None:
        self.streams, self.plan, self.on_bytes = streams, plan, on_bytes
        self.ring = _BufferRing(max((n for _, _, n in plan), default=1), depth + 6)
        self.q: queue.Queue[tuple[tuple[int, int, int], int | None, memoryview | None, BaseException | None]] = \
            queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.held: int | None = None
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _put(self, x: tuple[tuple[int, int, int], int | None, memoryview | None, BaseException | None]) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        for key in self.plan:
            if self.stop.is_set():
                return
            si, start, n = key
            try:
                got = self.streams[si].read_ring(start, n, self.ring, self.stop)
            except BaseException as e:
                self._put((key, None, None, e))
                return
            if got is None or not self._put((key, got[0], got[1], None)):
                return

    def _release_held(self) -> None:
        if self.held is not None:
            self.ring.release(self.held)
            self.held = None

    def read(self, si: int, start: int, n: int) -> memoryview:
        self._release_held()
        key, idx, mv, err = self.q.get()
        if err is not None:
            raise err
        if key != (si, start, n) or mv is None or idx is None:
            raise ConvertError(f"Internal error: read {key} arrived where {(si, start, n)} was expected.")
        self.held = idx
        self.on_bytes(n)
        return mv

    def close(self) -> None:
        self.stop.set()
        self._release_held()
        with contextlib.suppress(queue.Empty):
            while True:
                _, idx, _, _ = self.q.get_nowait()
                if idx is not None:
                    self.ring.release(idx)
        self.t.join(timeout=10)


@dataclass
class _View:
    """One source as seen by ``_convert_item``: ``read(start, n)`` through the prefetcher."""

    pre: _Prefetcher
    si: int

    def read(self, start: int, n: int) -> memoryview:
        return self.pre.read(self.si, start, n)


def _read_plan(items: list[Item]) -> list[tuple[int, int, int]]:
    plan = []
    for it in items:
        rows = it.src.shape[0] if it.src.shape else 1
        row_bytes = it.src.nbytes // rows if rows else 0
        for r, n in _chunks(it):
            plan.append((it.source_index, it.src.start + r * row_bytes, n * row_bytes))
    return plan


def _convert_item(item: Item, stream: _View, writer: Any, scheme: str) -> TensorReport:
    import torch

    from provision import quant
    from provision.model import hf_names as keymap

    t = item.src
    rep = TensorReport(t.name, item.out_name, item.action)
    src_dt = _torch_dtype(t.dtype)
    out_dt = _torch_dtype(item.out_dtype)
    rows = t.shape[0] if t.shape else 1
    row_bytes = t.nbytes // rows if rows else 0
    if item.action == "copy" and item.permute_heads is None:
        for r, n in _chunks(item):
            writer.write(item.out_name, stream.read(t.start + r * row_bytes, n * row_bytes))
        return rep
    if item.action in ("copy", "cast"):
        for r, n in _chunks(item):
            buf = stream.read(t.start + r * row_bytes, n * row_bytes)
            w = torch.frombuffer(buf, dtype=src_dt).reshape((n, *t.shape[1:]) if t.shape else ())
            if item.permute_heads is not None:
                w = keymap.permute_to_hf(w, item.permute_heads)
            o = w.to(out_dt)
            if out_dt != src_dt and not bool(torch.isfinite(o).all()):
                raise ConvertError(f"Tensor {t.name!r} overflows {item.out_dtype}; convert it to bf16 instead.",
                                   tensor=t.name)
            writer.write(item.out_name, _as_bytes(o))
        return rep
    # quantize
    spec = quant.SCHEMES[scheme]
    cols = t.shape[1]
    scales: list[Any] = []
    err2 = 0.0
    ref2 = 0.0
    max_abs = 0.0
    qname = item.entries[0].name
    for r, n in _chunks(item):
        buf = stream.read(t.start + r * row_bytes, n * row_bytes)
        w = torch.frombuffer(buf, dtype=src_dt).reshape(n, cols)
        if item.permute_heads is not None:
            w = keymap.permute_to_hf(w, item.permute_heads)
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
        writer.write(qname, _as_bytes(parts["weight"] if spec.kind == "float" else parts["weight_packed"]))
        scales.append(parts["weight_scale"])
    writer.write(item.entries[1].name, _as_bytes(torch.cat(scales, 0)))
    if spec.kind == "int":
        writer.write(item.entries[2].name, _as_bytes(torch.tensor([t.shape[0], cols], dtype=torch.int64)))
    rep.relative_error = math.sqrt(err2 / ref2) if ref2 else 0.0
    rep.max_abs_error = max_abs
    return rep


# ---------------------------------------------------------------------------------------
# Side files


def quantization_config(scheme: str, *, ratio: float | None = None, ignore: list[str] | None = None) -> dict[str, Any]:
    """compressed-tensors' ``quantization_config`` for a scheme (the FP8-dynamic / W4A16 recipes).

    ``ignore`` adds the (transformers) module names of decoder Linears left in 16-bit because
    their shapes do not suit the scheme; the vision tower, projector and lm_head are always ignored.
    """
    from provision.quant import SCHEMES

    spec = SCHEMES[scheme]
    weights = {"num_bits": spec.num_bits, "type": spec.kind, "symmetric": True, "group_size": spec.group_size,
               "strategy": spec.strategy, "dynamic": False, "actorder": None, "block_structure": None,
               "observer": "minmax", "observer_kwargs": {}}
    acts = None
    if spec.dynamic_activations:
        acts = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "token",
                "dynamic": True, "actorder": None, "block_structure": None, "observer": None,
                "observer_kwargs": {}}
    fmt = "float-quantized" if spec.kind == "float" else "pack-quantized"
    cfg: dict[str, Any] = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                      "output_activations": None, "format": fmt}},
        "ignore": ["re:.*lm_head", "re:.*multi_modal_projector.*", "re:.*vision_tower.*", *(ignore or [])],
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }
    if ratio is not None:
        cfg["global_compression_ratio"] = ratio
    return cfg


def _processor_files(args: ModelArgs) -> dict[str, dict[str, Any]]:
    v = args.vision_encoder
    assert v is not None
    pre = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
           "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
           "image_processor_type": "PixtralImageProcessor",
           "patch_size": {"height": v.patch_size, "width": v.patch_size}, "resample": 3,
           "rescale_factor": 0.00392156862745098, "size": {"longest_edge": v.image_size}}
    proc = {"image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]", "image_token": "[IMG]",
            "patch_size": v.patch_size, "processor_class": "PixtralProcessor"}
    gen = {"bos_token_id": 1, "eos_token_id": 2}
    return {"preprocessor_config.json": pre, "processor_config.json": proc, "generation_config.json": gen}


def _write_hf_tokenizer(tekken: Path, out_dir: Path) -> list[str]:
    """tokenizer.json & co. from tekken.json through transformers (when installed); the names written."""
    try:
        from transformers.integrations.mistral import convert_tekken_tokenizer
    except Exception:
        return []
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=".provision-tmp-tok-", dir=out_dir))
    try:
        tok = convert_tekken_tokenizer(str(tekken))
        tok.save_pretrained(str(tmp))
        names = []
        for p in sorted(tmp.iterdir()):
            if _OUR_FILES.match(p.name):
                os.replace(p, out_dir / p.name)
                names.append(p.name)
        return names
    except Exception:
        return []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def vllm_command(out_dir: Path, profile: Profile, context: int, *, hf_tokenizer: bool = True) -> str:
    """The exact ``vllm serve`` line for a converted folder."""
    import shlex

    parts = ["vllm", "serve", shlex.quote(str(out_dir))]
    if profile.layout == "mistral":
        parts += ["--tokenizer-mode", "mistral", "--config-format", "mistral", "--load-format", "mistral"]
    else:
        if profile.scheme in QUANTIZED:
            parts += ["--quantization", "compressed-tensors"]
        if not hf_tokenizer:
            parts += ["--tokenizer-mode", "mistral"]
    parts += ["--dtype", profile.activation_dtype if profile.scheme in QUANTIZED else
              ("bfloat16" if profile.scheme == "bf16" else "float16")]
    parts += ["--max-model-len", str(context)]
    if profile.gpus > 1:
        parts += ["--tensor-parallel-size", str(profile.gpus)]
    parts += ["--limit-mm-per-prompt", shlex.quote('{"image": 4}')]
    return " ".join(parts)


# ---------------------------------------------------------------------------------------
# The stage


def _prepare_out(src_dir: Path, out_dir: Path) -> None:
    from provision.formats.safetensors_writer import remove_stale_temporaries

    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a folder.")
    if out_dir.resolve() == src_dir.resolve():
        raise UsageError("--out must differ from the source folder; converting in place would destroy the original.")
    if out_dir.is_dir():
        remove_stale_temporaries(out_dir)
        for p in out_dir.iterdir():
            if p.name.startswith(".provision-tmp-") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                continue
            if not _OUR_FILES.match(p.name):
                raise UsageError(f"--out {out_dir} holds {p.name}, which convert did not write; "
                                 "choose an empty or new folder.", path=str(p))


def _sha_placeholder(sources: list[SafetensorsSource], src_dir: Path) -> list[dict[str, Any]]:
    return [{"path": s.path.name, "size": s.size, "sha256": "0" * 64, "sha256_from": "computed"}
            for s in sources] + [
        {"path": n, "size": (src_dir / n).stat().st_size} for n in ("params.json",) if (src_dir / n).is_file()]


def convert(
    src_dir: Path,
    out_dir: Path,
    *,
    target: Target | str | None = "auto",
    scheme: str = "auto",
    layout: str | None = None,
    context: int = 32768,
    progress: ProgressFn | None = None,
    shard_bytes: int = SHARD_BYTES,
    hf_tokenizer: bool = True,
    source_sha256: Mapping[str, str] | None = None,
) -> ConvertResult:
    """Convert the Mistral-format checkpoint in ``src_dir`` into ``out_dir`` for ``target``.

    ``source_sha256`` maps source file names to sha256 digests the caller has just verified
    (``provision run`` passes what verify computed); those files are recorded with that digest
    instead of being hashed again while streaming.
    """
    from provision.formats.safetensors_writer import CheckpointWriter, plan_shards

    t0 = time.monotonic()
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    args = ModelArgs.from_file(src_dir / "params.json")
    tgt = target if isinstance(target, Target) else parse_target(target)
    prof = choose(args, tgt, scheme, layout, context=context)
    if prof.layout == "hf" and args.vision_encoder is None:
        raise UsageError("The hf layout is written for Pixtral (Llava) checkpoints; use --layout mistral.")
    paths = find_sources(src_dir)
    _prepare_out(src_dir, out_dir)
    sources = [SafetensorsSource(p) for p in paths]
    writer: CheckpointWriter | None = None
    hashers: list[_Hasher] = []
    try:
        items = _plan_items(sources, args, prof)
        _check_spec(items, args)
        entries = [e for it in items for e in it.entries]
        meta_src = _sha_placeholder(sources, src_dir)
        metadata = {"format": "pt", "provision.scheme": prof.scheme, "provision.layout": prof.layout,
                    "provision.source": json.dumps(meta_src, separators=(",", ":"))}
        if prof.layout == "mistral":
            shards, names, index = [entries], ["consolidated.safetensors"], None
        else:
            shards = plan_shards(entries, shard_bytes)
            m = len(shards)
            names = ["model.safetensors"] if m == 1 else [f"model-{i + 1:05d}-of-{m:05d}.safetensors"
                                                          for i in range(m)]
            index = None if m == 1 else "model.safetensors.index.json"
        writer = CheckpointWriter(out_dir, shards, names, metadata=metadata, index_name=index)
        out_dir.mkdir(parents=True, exist_ok=True)
        check_free_space(out_dir, writer.total_size + (64 << 20), what=f"the {prof.name} conversion")

        total = sum(s.size - s.data_start for s in sources)
        done = 0
        last = 0.0

        def on_bytes(n: int) -> None:
            nonlocal done, last
            done += n
            now = time.monotonic()
            if progress is not None and (now - last > 0.2 or done >= total):
                last = now
                progress(ProgressEvent(task="convert", done=done, total=total, unit="B",
                                       description=f"convert -> {prof.name}"))

        known = dict(source_sha256 or {})
        streams = []
        hashed: list[int] = []  # indexes into meta_src of the files hashed here
        for i, s in enumerate(sources):
            if s.path.name in known:
                meta_src[i]["sha256"] = known[s.path.name]
                meta_src[i]["sha256_from"] = "caller"
                streams.append(_Stream(s, None))
                continue
            h = _Hasher()
            hashers.append(h)
            hashed.append(i)
            h.feed(s.header_bytes)
            streams.append(_Stream(s, h))
        reports = []
        pre = _Prefetcher(streams, _read_plan(items), on_bytes)
        import torch

        threads = torch.get_num_threads()
        # one torch thread: the chunks are small, and idle OpenMP workers spin on the core that the
        # reader and hasher threads need (measured here: half the CPU time, twice the throughput)
        torch.set_num_threads(1)
        try:
            for it in items:
                reports.append(_convert_item(it, _View(pre, it.source_index), writer, prof.scheme))
        finally:
            torch.set_num_threads(threads)
            pre.close()
        for s, st in zip(sources, streams, strict=True):
            if st.pos < s.size:  # trailing bytes after the last tensor
                st.read(st.pos, s.size - st.pos)
        digests = [h.hexdigest() for h in hashers]
        hashers = []
        for digest, i in zip(digests, hashed, strict=True):
            meta_src[i]["sha256"] = digest
            meta_src[i]["sha256_from"] = "computed"
        writer.finish({"provision.source": json.dumps(meta_src, separators=(",", ":"))})
        written = writer.commit()
    except BaseException:
        for h in hashers:
            h.abandon()
        if writer is not None:
            writer.abort()
        raise
    finally:
        for s in sources:
            s.close()

    files = [p.name for p in written]
    notes: list[str] = []
    hf_tok = False
    if prof.layout == "mistral":
        for p in sorted(src_dir.iterdir()):
            if _SIDE_FILES_MISTRAL.match(p.name) and p.is_file():
                with open(p, "rb") as fh:
                    data = fh.read()
                from provision.io.atomic import atomic_write_bytes

                atomic_write_bytes(out_dir / p.name, data)
                files.append(p.name)
    else:
        from provision.model import hf_names as keymap

        cfg = keymap.hf_config(args, dtype=prof.activation_dtype if prof.scheme in QUANTIZED else
                               ("bfloat16" if prof.scheme == "bf16" else "float16"))
        if prof.scheme in QUANTIZED:
            dense = sum(math.prod(i.src.shape) * 2 for i in items)
            # decoder Linears left 16-bit (shapes the scheme cannot take), as regexes that match
            # both the on-disk names (language_model.model.layers...) and transformers' in-memory
            # ones (model.language_model.layers...)
            left = ["re:.*language_model.*" + re.escape(i.out_name[: -len(".weight")].split("language_model.model.", 1)[-1]) + "$"
                    for i in items if i.action != "quantize" and i.src.name.startswith("layers.")
                    and len(i.src.shape) == 2]
            cfg["quantization_config"] = quantization_config(prof.scheme, ratio=dense / max(writer.data_bytes, 1),
                                                             ignore=left)
        atomic_write_text(out_dir / "config.json", json.dumps(cfg, indent=2) + "\n")
        files.append("config.json")
        for name, doc in _processor_files(args).items():
            atomic_write_text(out_dir / name, json.dumps(doc, indent=2) + "\n")
            files.append(name)
        tekken = src_dir / "tekken.json"
        if tekken.is_file():
            from provision.io.atomic import atomic_write_bytes

            atomic_write_bytes(out_dir / "tekken.json", tekken.read_bytes())
            files.append("tekken.json")
            tok_files = _write_hf_tokenizer(tekken, out_dir) if hf_tokenizer else []
            files += tok_files
            hf_tok = "tokenizer.json" in tok_files
            if not hf_tok:
                notes.append("tokenizer.json not written (transformers is not installed or it was not asked "
                             "for); vLLM reads tekken.json with --tokenizer-mode mistral")
        else:
            notes.append("no tekken.json in the source: copy the tokenizer files into the output by hand")
    # drop files of an earlier conversion that this one does not produce
    for p in out_dir.iterdir():
        if p.is_file() and _OUR_FILES.match(p.name) and p.name not in files and p.name != RECORD_NAME:
            p.unlink()
    cmd = vllm_command(out_dir, prof, context, hf_tokenizer=hf_tok)
    sizes = [(n, (out_dir / n).stat().st_size) for n in files]
    res = ConvertResult(src_dir=src_dir, out_dir=out_dir, target=tgt, profile=prof, files=sizes,
                        source_files=meta_src, tensors=reports, bytes_read=sum(s.size for s in sources),
                        bytes_written=sum(s for _, s in sizes), seconds=time.monotonic() - t0,
                        vllm_command=cmd, notes=notes)
    record = res.to_dict()
    record["context"] = context
    atomic_write_text(out_dir / RECORD_NAME, json.dumps(record, indent=2) + "\n")
    if progress is not None:
        progress(ProgressEvent(task="convert", done=res.bytes_read, total=res.bytes_read, unit="B",
                               description=f"convert -> {prof.name}", finished=True))
    return res


def compare_logits(reference_dir: Path, converted_dir: Path, *, prompt: str | None = None,
                   images: list[Any] | None = None, device: str = "cpu") -> dict[str, Any]:
    """Top-1 agreement and cosine similarity of logits, reference (16-bit) vs converted model.

    Both folders are loaded with ``provision.model.loader.load_model`` in float32 on ``device``;
    the input is the smoke prompt (the manifest's, else the default) with its generated image.
    ``top1_agreement`` is the fraction of positions whose arg-max agrees; ``cosine`` the mean
    over positions of the cosine similarity of the logit vectors; ``cosine_min`` the worst.
    """
    import torch

    from provision.formats.manifest import SmokeSpec
    from provision.model.inputs import encode_chat, load_tokenizer, square_image
    from provision.model.loader import load_model

    spec = SmokeSpec()
    vision = (Path(reference_dir) / "params.json").is_file() and \
        ModelArgs.from_file(Path(reference_dir) / "params.json").vision_encoder is not None
    tok = load_tokenizer(Path(reference_dir), require_image=vision)  # text-only models: no image
    enc = encode_chat(tok, prompt if prompt is not None else spec.prompt,
                      images if images is not None else ([square_image(spec.image)] if vision else []))
    ids = torch.tensor([enc.tokens])
    out = []
    for d in (reference_dir, converted_dir):
        model, _ = load_model(Path(d), device=device, dtype=torch.float32)
        with torch.no_grad():
            out.append(model(ids.to(device), [im.to(device) for im in enc.images])[0].float().cpu())
        del model
    a, b = out
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    agree = (a.argmax(-1) == b.argmax(-1)).float()
    return {"positions": int(a.shape[0]), "top1_agreement": float(agree.mean()), "cosine": float(cos.mean()),
            "cosine_min": float(cos.min()), "max_abs_diff": float((a - b).abs().max())}


__all__ = ["CASTS", "QUANTIZED", "ConvertResult", "compare_logits", "convert", "quantization_config",
           "vllm_command"]
