"""What each source tensor becomes: the per-tensor plan of a conversion, before anything is read.

``plan_items`` decides, for every tensor of the source files, whether it is copied, cast or
quantized, under which output name (the ``hf`` layout renames and marks q/k for the RoPE
permutation) and which output entries it produces; ``check_against_params`` refuses a source whose
tensors do not match ``params.json``. ``chunks`` and ``read_plan`` cut tensors into the row
pieces the streaming loop reads (q/k tensors of the ``hf`` layout at head boundaries). Nothing here reads tensor data or writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from provision.errors import StructureError
from provision.formats.params import ModelArgs, spec_diff, tensor_spec
from provision.formats.safetensors import FROM_TORCH
from provision.formats.safetensors_writer import TensorEntry
from provision.model import hf_layout, hf_names
from provision.stages.convert.source import SafetensorsSource, SrcTensor
from provision.stages.profiles import QUANTIZED, Profile, quantized_tensor

CHUNK_BYTES = 16 << 20
QUANT_CHUNK_BYTES = 2 << 20  # cache-sized float32 temporaries while quantizing

Action = Literal["copy", "cast", "quantize"]

def output_dtype(profile: Profile) -> str:
    """The torch name of the 16-bit dtype a profile writes (its dense tensors, scales and config)."""
    if profile.scheme in QUANTIZED:
        return profile.activation_dtype
    return "bfloat16" if profile.scheme == "bf16" else "float16"


@dataclass
class Item:
    """One source tensor and what it becomes."""

    src: SrcTensor
    source_index: int
    action: Action
    out_name: str  # for quantize: the module name (suffixes are added)
    out_dtype: str  # safetensors dtype of the 16-bit output or the scale
    permute_heads: int | None
    entries: list[TensorEntry] = field(default_factory=list)

    @property
    def row_bytes(self) -> int:
        rows = self.src.shape[0] if self.src.shape else 1
        return self.src.nbytes // rows if rows else 0


def _quantized_entries(module: str, shape: tuple[int, ...], scheme: str, dt16: str) -> list[TensorEntry]:
    from provision.quant import SCHEMES

    spec = SCHEMES[scheme]
    rows, cols = shape
    if spec.kind == "float":
        return [TensorEntry(module + ".weight", "F8_E4M3", (rows, cols)),
                TensorEntry(module + ".weight_scale", dt16, (rows, 1))]
    return [TensorEntry(module + ".weight_packed", "I32", (rows, spec.packed_cols(cols))),
            TensorEntry(module + ".weight_scale", dt16, (rows, spec.scale_cols(cols))),
            TensorEntry(module + ".weight_shape", "I64", (2,))]


def plan_items(sources: list[SafetensorsSource], args: ModelArgs, profile: Profile) -> list[Item]:
    """Every tensor of ``sources`` in file order, with its action, output name and entries."""
    from provision.quant import SCHEMES  # torch: imported when a conversion starts, not with the package

    scheme, hf = profile.scheme, profile.layout == "hf"
    dt16 = FROM_TORCH[output_dtype(profile)]
    items: list[Item] = []
    seen: set[str] = set()
    for si, src in enumerate(sources):
        for t in src.tensors:
            if t.name in seen:
                raise StructureError(f"Tensor {t.name!r} appears in two source files.", tensor=t.name)
            seen.add(t.name)
            out = hf_layout.hf_out_name(t.name, args) if hf else t.name
            heads = hf_names.rope_heads(t.name, args) if hf else None
            if scheme in QUANTIZED and quantized_tensor(t.name, t.shape, scheme) and SCHEMES[scheme].supports(t.shape):
                module = out[: -len(".weight")]
                items.append(Item(t, si, "quantize", module, dt16, heads,
                                  _quantized_entries(module, t.shape, scheme, dt16)))
            else:
                action: Action = "copy" if t.dtype == dt16 else "cast"
                items.append(Item(t, si, action, out, dt16, heads, [TensorEntry(out, dt16, t.shape)]))
    return items


def check_against_params(items: list[Item], args: ModelArgs) -> None:
    """Refuse sources whose tensor names or shapes differ from what ``params.json`` implies."""
    missing, extra, wrong, _ = spec_diff({i.src.name: i.src.shape for i in items}, tensor_spec(args))
    if missing or extra or wrong:
        first = (missing or extra or wrong)[0]
        raise StructureError(
            f"The source tensors do not match params.json ({len(missing)} missing, {len(extra)} extra, "
            f"{len(wrong)} of the wrong shape; first: {first!r}); run `provision verify` on it.",
            missing=missing[:20], extra=extra[:20], wrong_shape=wrong[:20])


def head_rows(item: Item) -> int:
    """The rows of one head of a q/k tensor permuted for the ``hf`` layout (1 for other tensors).
    The permutation moves rows only within a head, so a piece of whole heads permutes alone."""
    rows = item.src.shape[0] if item.src.shape else 1
    heads = item.permute_heads
    if heads is None or heads <= 0 or rows % (2 * heads):
        return 1
    return rows // heads


def chunks(item: Item) -> Iterator[tuple[int, int]]:
    """(first row, row count) pieces of about CHUNK_BYTES; a tensor permuted for the ``hf`` layout is
    cut at head boundaries (whole when its rows do not divide into its heads)."""
    shape = item.src.shape
    rows = shape[0] if shape else 1
    if len(shape) < 2 or rows <= 1:
        yield 0, rows
        return
    unit = head_rows(item)
    if item.permute_heads is not None and unit == 1:  # permute_to_hf refuses it: one piece, one error
        yield 0, rows
        return
    row_bytes = item.src.nbytes // rows
    per = max(1, CHUNK_BYTES // max(row_bytes, 1))
    if item.action == "quantize":
        per = max(1, min(per, QUANT_CHUNK_BYTES // max(row_bytes, 1)))
    per = max(unit, per // unit * unit)
    for r in range(0, rows, per):
        yield r, min(per, rows - r)


def read_plan(items: list[Item]) -> list[tuple[int, int, int]]:
    """The (source index, file offset, length) ranges the streaming loop reads, in order."""
    return [(it.source_index, it.src.start + r * it.row_bytes, n * it.row_bytes)
            for it in items for r, n in chunks(it)]
