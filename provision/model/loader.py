"""Load Pixtral weights from a checkpoint folder onto a device, with no second copy in RAM (only a
few reused 16 MiB read buffers).

It reads the Mistral layout (``params.json`` + ``consolidated*.safetensors``, the model's own
names) and the transformers (Llava) layout (``config.json`` + ``model*.safetensors``, renamed and
q/k-permuted through ``hf_names``; a ``quantization_config`` swaps in ``quantized.QuantLinear``).
The model is built on the meta device, the tensors read by the pipelined reader (several threads
``pread`` the files into a few reused host buffers, pinned for a GPU, each copied to the device
asynchronously on a copy stream while the next ones fill: no per-tensor wait; the same code with
plain copies on the CPU), then adopted by ``load_state_dict(strict=True, assign=True)``; ``check_fits`` refuses
(exit 6, with both numbers) before anything is read when the device lacks memory. Pickle files
are never read. It does not tokenize or generate.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from provision.errors import (
    ConvertError,
    GPUMemoryError,
    HostileContentError,
    ParamsError,
    ResourceError,
    StructureError,
    UsageError,
)
from provision.formats.params import ModelArgs
from provision.formats.pickles import PICKLE_SUFFIXES
from provision.formats.safetensors import (
    DTYPE_BYTES,
    TORCH_NAMES,
    SafetensorsInfo,
    check_safetensors,
    read_index,
)
from provision.hardware import mem_available
from provision.io.diskio import read_full
from provision.io.opening import read_regular
from provision.model.pixtral import Pixtral, build_model
from provision.model.placement import Placement

MISTRAL_INDEX = "consolidated.safetensors.index.json"
HF_INDEX = "model.safetensors.index.json"
_ST_FLOAT = ("F32", "F16", "BF16")  # the float dtypes a load casts to the requested dtype
FLOAT_DTYPES = tuple(getattr(torch, TORCH_NAMES[st]) for st in _ST_FLOAT)
DTYPE_NAMES: dict[str, torch.dtype] = {TORCH_NAMES[st]: getattr(torch, TORCH_NAMES[st]) for st in _ST_FLOAT}


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint folder holds: its layout, args, and which file holds each tensor."""

    path: Path
    layout: str  # "mistral" | "hf"
    args: ModelArgs
    files: dict[str, Path]  # tensor name as stored -> safetensors file
    config: dict[str, Any] | None = None  # config.json (hf layout)

    @property
    def quantized(self) -> bool:
        return bool(self.config and self.config.get("quantization_config"))


def _shards(folder: Path, single: str, index: str, pattern: str) -> list[Path]:
    idx = folder / index
    if idx.is_file():
        try:  # the shared reader: bounded, no duplicate keys, no '..'
            names = read_index(idx).shards
        except HostileContentError as e:
            if e.context.get("path") == str(idx):  # the index itself (too large): not a shard name
                raise
            raise HostileContentError(f"{idx} names a shard outside its folder ({e.message}).",
                                      path=str(idx)) from None
        out = []
        for n in names:
            if "/" in n or n.startswith("."):
                raise HostileContentError(f"{idx} names a shard outside its folder: {n!r}.", path=str(idx))
            out.append(folder / n)
        return out
    if (folder / single).is_file():
        return [folder / single]
    return sorted(folder.glob(pattern))


def _headers(shards: list[Path]) -> dict[Path, SafetensorsInfo]:
    """The checked header of every shard (``provision.formats.safetensors``; no tensor is read)."""
    infos: dict[Path, SafetensorsInfo] = {}
    for shard in shards:
        if not shard.is_file():
            raise StructureError(f"Weight shard {shard.name} is missing from {shard.parent}; fetch it again.",
                                 path=str(shard))
        try:
            infos[shard] = check_safetensors(shard, root=shard.parent)
        except (StructureError, HostileContentError) as e:
            raise StructureError(f"{shard} is not a readable safetensors file ({e.message}); fetch it again.",
                                 path=str(shard)) from None
    return infos


def _tensor_files(shards: list[Path]) -> dict[str, Path]:
    return {name: shard for shard, info in _headers(shards).items() for name in info.tensors}


def open_checkpoint(path: Path) -> Checkpoint:
    """Find the layout, parse the args and index the tensors of a checkpoint folder (reads headers only)."""
    folder = Path(path)
    if not folder.is_dir():
        raise StructureError(f"Model folder {folder} does not exist or is not a folder.", path=str(folder))
    if (folder / "params.json").is_file():
        args = ModelArgs.from_file(folder / "params.json")
        shards = _shards(folder, "consolidated.safetensors", MISTRAL_INDEX, "consolidated*.safetensors")
        layout, config = "mistral", None
    elif (folder / "config.json").is_file():
        from provision.model.hf_names import args_from_hf_config

        try:
            config = json.loads(read_regular(folder / "config.json", root=folder, what="config file",
                                             max_bytes=16 << 20).decode("utf-8"))
        except (OSError, ValueError) as e:
            raise ParamsError(f"{folder / 'config.json'} is not valid JSON ({e}).") from None
        try:
            args = args_from_hf_config(config)
        except ParamsError:
            raise
        except (ArithmeticError, ValueError, TypeError) as e:  # a zero divisor, a huge or mistyped number
            raise ParamsError(f"{folder / 'config.json'} holds an impossible value ({type(e).__name__}: "
                              f"{str(e)[:200]}).", path=str(folder / "config.json")) from None
        shards = _shards(folder, "model.safetensors", HF_INDEX, "model*.safetensors")
        layout = "hf"
    else:
        raise StructureError(f"{folder} has neither params.json (Mistral layout) nor config.json (transformers "
                             "layout); point at a model folder.", path=str(folder))
    if not shards:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise HostileContentError(f"{folder} holds only pickle weights ({pickles[0]}); provision reads "
                                      "safetensors only.", path=str(folder))
        raise StructureError(f"{folder} has no safetensors weights; fetch the model first.", path=str(folder))
    return Checkpoint(path=folder, layout=layout, args=args, files=_tensor_files(shards), config=config)


def weights_bytes(ckpt: Checkpoint, dtype: torch.dtype | None) -> int:
    """Bytes the weights take on the device once cast to ``dtype`` (headers only, nothing read)."""
    target = torch.empty((), dtype=dtype).element_size() if dtype is not None else None
    total = 0
    for info in _headers(sorted(set(ckpt.files.values()))).values():
        for name, t in info.tensors.items():
            if ckpt.files.get(name) != info.path:
                continue
            size = target if (target is not None and t.dtype in _ST_FLOAT) else DTYPE_BYTES.get(t.dtype, 4)
            total += math.prod(t.shape) * size
    return total


def free_device_bytes(device: torch.device) -> int:
    """Free memory of ``device``: ``cudaMemGetInfo`` for a GPU, MemAvailable for the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return mem_available()


def check_fits(needed: int, device: torch.device) -> None:
    """Raise (exit 6) when ``needed`` bytes do not fit in ``device``'s free memory."""
    free = free_device_bytes(device)
    if needed <= free:
        return
    gib = 2**30
    msg = (f"The model needs {needed / gib:.2f} GiB on {device} but only {free / gib:.2f} GiB is free; "
           "use a bigger device, a smaller dtype or a quantized profile.")
    if device.type == "cuda":
        raise GPUMemoryError(msg, needed_bytes=needed, free_bytes=free, device=str(device))
    raise ResourceError(msg, needed_bytes=needed, free_bytes=free, device=str(device))


def check_placement_fits(placement: Placement, reserve_bytes: int = 0) -> None:
    """``check_fits`` for every device of a placement (its share, plus ``reserve_bytes`` on each)."""
    need: dict[str, int] = {}
    for d, b in zip(placement.devices, placement.bytes_per_device, strict=True):
        if b:
            need[d] = need.get(d, 0) + b + reserve_bytes
    for d, b in need.items():
        if torch.device(d).type != "meta":
            check_fits(b, torch.device(d))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"Device {device!r} is not supported; use auto, cpu or cuda.", device=device) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ResourceError("--device cuda was asked for but no CUDA GPU is usable here; use --device cpu.",
                            device=device)
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"Device {device!r} is not supported; use auto, cpu or cuda.", device=device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def default_dtype(ckpt: Checkpoint, device: torch.device) -> torch.dtype:
    """bf16 on a GPU (the release's dtype), float32 on the CPU (fast, exact kernels there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _finish(ckpt: Checkpoint, name: str, t: torch.Tensor, dtype: torch.dtype | None) -> tuple[str, torch.Tensor]:
    """One stored tensor -> the model's name and layout (hf: renamed, q/k un-permuted), floats cast to ``dtype``."""
    from provision.model import hf_names as keymap

    if ckpt.layout == "hf":
        name, t = keymap.hf_to_mistral(name, t, ckpt.args)
    if dtype is not None and t.dtype in FLOAT_DTYPES and t.dtype != dtype and \
            name.rsplit(".", 1)[-1] in ("weight", "bias"):
        t = t.to(dtype)
    return name, t


def read_tensors_simple(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype | None,
                        placement: Placement | None = None) -> dict[str, torch.Tensor]:
    """The reference reader: ``safe_open(...).get_tensor`` one tensor after the other (the pipelined
    reader's tests and benchmark compare against it)."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, f in ckpt.files.items():
        by_file.setdefault(f, []).append(name)
    out: dict[str, torch.Tensor] = {}
    dev = "cpu" if device.type == "cpu" or placement is not None else str(device)
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt", device=dev) as sf:
            for name in names:
                name, t = _finish(ckpt, name, sf.get_tensor(name), dtype)
                if placement is not None:  # several devices: each tensor goes to its layer's device
                    t = t.to(placement.device_of(name))
                out[name] = t
    return out


# ---------------------------------------------------------------------------------------
# The pipelined reader: several threads read the files into a few reused (pinned, on a GPU) host
# buffers while the previous buffers are copied to the device asynchronously on a copy stream.
#
#   file bytes --pread, N threads--> buffer k (pinned) --copy stream, non_blocking--> device tensor
#                                    ^ reused once the event recorded after its copies has passed
#
# A buffer holds consecutive bytes of one file: several small tensors, or a piece of a large one.
# Nothing waits per tensor: the only waits are for a buffer to come back and one at the end.

DEFAULT_LOAD_THREADS = 8
DEFAULT_BUFFER_BYTES = 16 << 20


@dataclass(frozen=True)
class Segment:
    """Bytes ``buf_off``..``buf_off + nbytes`` of a chunk's buffer belong at ``dst_off`` of tensor ``tensor``."""

    buf_off: int
    tensor: int
    dst_off: int
    nbytes: int


@dataclass(frozen=True)
class Chunk:
    """One read: ``nbytes`` (at most a buffer) from ``file_off`` of file ``file``, split into segments."""

    file: int
    file_off: int
    nbytes: int
    segments: tuple[Segment, ...]


def plan_chunks(ranges: list[tuple[int, int, int, int]], buffer_bytes: int) -> list[Chunk]:
    """Cut tensors' byte ranges ``(file, tensor, file offset, nbytes)`` into buffer-sized reads of
    consecutive bytes: small neighbours share a read, a large tensor spans several."""
    if buffer_bytes < 1:
        raise UsageError(f"The load buffer must hold at least one byte, got {buffer_bytes}.")
    chunks: list[Chunk] = []
    cur: tuple[int, int] | None = None  # (file, file offset) of the chunk being filled
    length = 0
    segs: list[Segment] = []

    def flush() -> None:
        nonlocal cur, length, segs
        if cur is not None and length:
            chunks.append(Chunk(cur[0], cur[1], length, tuple(segs)))
        cur, length, segs = None, 0, []

    for file, tensor, off, n in sorted(ranges, key=lambda r: (r[0], r[2])):
        pos = 0
        while pos < n:
            if cur is not None and (cur[0] != file or cur[1] + length != off + pos or length == buffer_bytes):
                flush()
            if cur is None:
                cur = (file, off + pos)
            take = min(n - pos, buffer_bytes - length)
            segs.append(Segment(length, tensor, pos, take))
            length += take
            pos += take
    flush()
    return chunks


class Copier:
    """Copies host buffers into tensors of one device. This one (the CPU's) copies at once."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def fence(self) -> Any:
        """A marker after the copies issued so far (None: they are already done)."""
        return None

    def done(self, fence: Any) -> bool:
        return True

    def wait(self, fence: Any) -> None:
        """Block until the copies before ``fence`` are done (their source buffer may be reused)."""

    def finish(self) -> None:
        """Make the device's current stream see every copy (after the last one)."""


class CudaCopier(Copier):
    """Asynchronous copies on a side stream of one GPU; fences are CUDA events."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        # the destinations were allocated on the current stream: copy only after what ran there before
        self.stream.wait_stream(torch.cuda.current_stream(device))

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)

    def fence(self) -> Any:
        ev = torch.cuda.Event()
        ev.record(self.stream)
        return ev

    def done(self, fence: Any) -> bool:
        return bool(fence.query())

    def wait(self, fence: Any) -> None:
        fence.synchronize()

    def finish(self) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self.stream)


def copier_for(device: torch.device) -> Copier:
    return CudaCopier(device) if device.type == "cuda" else Copier()


def _read_chunk(fd: int, path: Path, chunk: Chunk, view: memoryview) -> None:
    got = read_full(fd, view[:chunk.nbytes], chunk.file_off)
    if got < chunk.nbytes:
        raise StructureError(f"{path} ended at byte {chunk.file_off + got} while its header promised "
                             f"{chunk.file_off + chunk.nbytes}; fetch it again.", path=str(path))


def stream_into(paths: list[Path], chunks: list[Chunk], dests: list[torch.Tensor], copiers: list[Copier],
                dest_copier: list[int], *, threads: int, buffer_bytes: int, pin: bool) -> None:
    """Read ``chunks`` of ``paths`` on ``threads`` threads into ``2 x threads`` reused host buffers (pinned
    when ``pin``) and copy each segment into its flat uint8 destination ``dests[i]`` through
    ``copiers[dest_copier[i]]``. A buffer is refilled only after the fence recorded after its copies."""
    if not chunks:
        return
    threads = max(1, threads)
    nbuf = max(2, min(2 * threads, len(chunks)))
    size = min(buffer_bytes, max(c.nbytes for c in chunks))
    bufs = [torch.empty(size, dtype=torch.uint8, pin_memory=pin) for _ in range(nbuf)]
    views = [memoryview(b.numpy()).cast("B") for b in bufs]  # type: ignore[arg-type]
    fds: list[int] = []
    free: deque[int] = deque(range(nbuf))
    pending: deque[tuple[Chunk, int, Future[None]]] = deque()
    inflight: deque[tuple[int, list[tuple[Copier, Any]]]] = deque()
    todo = iter(chunks)
    left = [len(chunks)]  # chunks not yet handed to a reader

    def reclaim(block: bool) -> None:
        while inflight:
            b, fences = inflight[0]
            if not all(c.done(f) for c, f in fences):
                if not block:
                    return
                for c, f in fences:
                    c.wait(f)
                block = False  # one buffer back is enough to go on
            inflight.popleft()
            free.append(b)

    try:
        for p in paths:
            fds.append(os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="provision-load") as pool:
            def submit() -> None:
                while free:
                    c = next(todo, None)
                    if c is None:
                        return
                    b = free.popleft()
                    left[0] -= 1
                    pending.append((c, b, pool.submit(_read_chunk, fds[c.file], paths[c.file], c, views[b])))

            try:
                submit()
                while pending:
                    c, b, fut = pending.popleft()
                    fut.result()
                    used: dict[int, Copier] = {}
                    for s in c.segments:
                        k = dest_copier[s.tensor]
                        copiers[k].copy(dests[s.tensor][s.dst_off:s.dst_off + s.nbytes],
                                        bufs[b][s.buf_off:s.buf_off + s.nbytes])
                        used[k] = copiers[k]
                    inflight.append((b, [(cp, cp.fence()) for cp in used.values()]))
                    reclaim(block=False)
                    if not free and left[0] and len(pending) < threads:
                        reclaim(block=True)  # the readers would idle: wait for the oldest buffer's copies
                    submit()
            finally:
                for _c, _b, fut in pending:
                    fut.cancel()
                while inflight:  # on an error too: no copy may still read a buffer we drop
                    reclaim(block=True)
        for cp in copiers:
            cp.finish()
    finally:
        for fd in fds:
            os.close(fd)


def read_files(paths: list[Path], device: torch.device | Callable[[str], torch.device], *,
               select: Callable[[Path, str], bool] | None = None, threads: int | None = None,
               buffer_bytes: int | None = None,
               copier_factory: Callable[[torch.device], Copier] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files ``paths`` (those ``select(path, name)`` accepts), in its
    stored dtype and shape, on ``device`` (or ``device(name)``), read by the pipelined reader above."""
    infos = _headers(list(paths))
    files = list(infos)
    keys: list[str] = []
    metas: list[tuple[torch.dtype, tuple[int, ...]]] = []
    ranges: list[tuple[int, int, int, int]] = []
    for fi, (path, info) in enumerate(infos.items()):
        for name, t in sorted(info.tensors.items(), key=lambda kv: kv[1].begin):
            if select is not None and not select(path, name):
                continue
            torch_name = TORCH_NAMES.get(t.dtype)
            if torch_name is None:
                raise StructureError(f"{path.name}: tensor {name!r} has dtype {t.dtype}, which the loader "
                                     "cannot read.", path=str(path), tensor=name)
            ranges.append((fi, len(keys), info.data_offset + t.begin, t.nbytes))
            keys.append(name)
            metas.append((getattr(torch, torch_name), t.shape))
    devs = [device(k) for k in keys] if callable(device) else [device] * len(keys)
    dev_keys = list(dict.fromkeys(str(d) for d in devs))
    dest_copier = [dev_keys.index(str(d)) for d in devs]
    dests = [torch.empty(r[3], dtype=torch.uint8, device=d) for r, d in zip(ranges, devs, strict=True)]
    make = copier_factory or copier_for
    copiers = [make(torch.device(k)) for k in dev_keys]
    pin = any(torch.device(k).type == "cuda" for k in dev_keys) and torch.cuda.is_available()
    size = buffer_bytes or DEFAULT_BUFFER_BYTES
    stream_into(files, plan_chunks(ranges, size), dests, copiers, dest_copier,
                threads=threads or min(DEFAULT_LOAD_THREADS, os.cpu_count() or 1), buffer_bytes=size, pin=pin)
    return {k: raw.view(dt).reshape(shape) for k, raw, (dt, shape) in zip(keys, dests, metas, strict=True)}


def read_tensors_pipelined(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype | None,
                           placement: Placement | None = None, *, threads: int | None = None,
                           buffer_bytes: int | None = None,
                           copier_factory: Callable[[torch.device], Copier] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``ckpt`` on ``device`` (or each on its ``placement`` device) through ``read_files``:
    the same tensors, names and dtypes as ``read_tensors_simple``."""
    from provision.model import hf_names as keymap

    def model_name(stored: str) -> str:
        return keymap.hf_name_to_mistral(stored) if ckpt.layout == "hf" else stored

    where: torch.device | Callable[[str], torch.device] = device
    if placement is not None:
        where = lambda stored: torch.device(placement.device_of(model_name(stored)))  # noqa: E731
    stored = read_files(sorted(set(ckpt.files.values())), where, select=lambda p, n: ckpt.files.get(n) == p,
                        threads=threads, buffer_bytes=buffer_bytes, copier_factory=copier_factory)
    out: dict[str, torch.Tensor] = {}
    for name in list(stored):
        key, tensor = _finish(ckpt, name, stored.pop(name), dtype)  # each cast frees its source as it goes
        out[key] = tensor
    return out


def _read_tensors(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype | None,
                 placement: Placement | None = None, *, pipelined: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of ``ckpt`` under the model's names on its device, floats cast to ``dtype``."""
    if pipelined:
        return read_tensors_pipelined(ckpt, device, dtype, placement)
    return read_tensors_simple(ckpt, device, dtype, placement)


def _meta_tensors(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Every stored tensor as a meta tensor of its stored dtype and shape, under the model's names
    (what ``_read_tensors`` would return, without reading a byte of data)."""
    from provision.model import hf_names as keymap

    out: dict[str, torch.Tensor] = {}
    for info in _headers(sorted(set(ckpt.files.values()))).values():
        for name, t in info.tensors.items():
            torch_name = TORCH_NAMES.get(t.dtype)
            if torch_name is None:
                raise StructureError(f"{info.path.name}: tensor {name!r} has dtype {t.dtype}, which the loader "
                                     "cannot read.", path=str(info.path), tensor=name)
            meta = torch.empty(t.shape, dtype=getattr(torch, torch_name), device="meta")
            if ckpt.layout == "hf":
                name, meta = keymap.hf_to_mistral(name, meta, ckpt.args)
            out[name] = meta
    return out


def _assign(model: Pixtral, ckpt: Checkpoint, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Swap in the quantized layers, then adopt ``tensors`` (strict): the checks every load makes."""
    if ckpt.quantized:
        try:
            from provision.model.quantized import apply_quantization
        except ImportError:
            raise ConvertError(f"{path} is quantized but this installation has no quantization runtime "
                               "(provision.model.quantized); reinstall provision.", path=str(path)) from None
        apply_quantization(model, ckpt.config or {}, tensors)
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(x.strip() for x in first[:3])[:400]
        raise StructureError(f"The tensors in {path} do not match the architecture of its "
                             f"{'params' if ckpt.layout == 'mistral' else 'config'}.json: {detail}",
                             path=str(path)) from None


def check_loadable(path: Path) -> Checkpoint:
    """The load check of a checkpoint folder without reading its tensor data: the headers, the
    args, the quantized layers and every tensor's name and shape against the architecture, on
    the meta device. Raises what ``load_model`` would (``StructureError``, ``ConvertError``...)."""
    ckpt = open_checkpoint(path)
    _assign(build_model(ckpt.args, device="meta"), ckpt, _meta_tensors(ckpt), Path(path))
    return ckpt


def load_model(path: Path, *, device: str = "cpu", dtype: torch.dtype | None = None,
               reserve_bytes: int = 0, placement: Placement | None = None,
               pipelined: bool = True) -> tuple[Pixtral, ModelArgs]:
    """Build Pixtral on meta and assign the checkpoint's tensors on ``device`` (strict).

    ``dtype`` None means the device default (bf16 on GPU, float32 on CPU). ``reserve_bytes``
    is added to the weights when checking free memory (KV cache, activations). With a
    ``placement`` (``provision.model.placement``) each tensor is read onto its layer's device and
    each device's share is checked against its free memory. ``pipelined`` False reads through
    ``read_tensors_simple`` (the reference; the benchmark compares both).
    """
    dev = resolve_device(device)
    ckpt = open_checkpoint(path)
    dt = dtype if dtype is not None else default_dtype(ckpt, dev)
    if placement is None:
        check_fits(weights_bytes(ckpt, dt) + reserve_bytes, dev)
    else:
        check_placement_fits(placement, reserve_bytes)
    model = build_model(ckpt.args, device="meta")
    _assign(model, ckpt, _read_tensors(ckpt, dev, dt, placement, pipelined=pipelined), Path(path))
    return model.eval(), ckpt.args
