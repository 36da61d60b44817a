"""The streaming safetensors writer: header first, tensors in pieces, atomic, patchable metadata."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from provision.errors import ConvertError
from provision.formats.safetensors import check_safetensors
from provision.formats.safetensors_writer import (
    CheckpointWriter,
    ShardWriter,
    TensorEntry,
    build_header,
    plan_shards,
    remove_stale_temporaries,
)
from tests.support.files import load_st


def _b(t: torch.Tensor) -> memoryview:
    return memoryview(bytes(t.contiguous().view(torch.uint8).numpy())).cast("B")


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(33, 17, generator=g).bfloat16(),
        "b.weight": torch.randn(8, 16, generator=g).to(torch.float8_e4m3fn),
        "b.weight_scale": torch.rand(8, 1, generator=g).half(),
        "c.weight_packed": torch.randint(-2**31, 2**31 - 1, (5, 4), dtype=torch.int32, generator=g),
        "c.weight_shape": torch.tensor([5, 32], dtype=torch.int64),
        "d.bias": torch.randn(3, generator=g),
    }


_ST = {torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3", torch.float16: "F16", torch.int32: "I32",
       torch.int64: "I64", torch.float32: "F32"}


def _entries(ts: dict[str, torch.Tensor]) -> list[TensorEntry]:
    return [TensorEntry(k, _ST[v.dtype], tuple(v.shape)) for k, v in ts.items()]


def test_written_file_loads_with_safetensors_and_holds_the_same_tensors(tmp_path: Path) -> None:
    ts = _tensors()
    w = ShardWriter(tmp_path / "x.safetensors", _entries(ts), {"format": "pt", "k": "v"})
    for k, v in ts.items():
        data = _b(v)
        half = len(data) // 2
        w.write(k, data[:half])  # in two pieces
        w.write(k, data[half:])
    w.finish()
    assert not (tmp_path / "x.safetensors").exists()  # not before commit
    w.commit()
    back = load_st(tmp_path / "x.safetensors")
    assert set(back) == set(ts)
    # the data section holds the tensors in the order they were written, back to back
    spans = check_safetensors(tmp_path / "x.safetensors").tensors
    begins = [spans[k].begin for k in ts]
    assert begins == sorted(begins) and begins[0] == 0
    assert all(spans[a].end == spans[b].begin for a, b in itertools.pairwise(ts))
    for k, v in ts.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k].view(torch.uint8), v.view(torch.uint8))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}


def test_header_is_padded_to_8_bytes_and_offsets_are_contiguous() -> None:
    ents = _entries(_tensors())
    h = build_header(ents, {"format": "pt"}, reserve=13)
    n = int.from_bytes(h[:8], "little")
    assert len(h) == 8 + n and n % 8 == 0
    doc = json.loads(h[8:])
    offs = [doc[e.name]["data_offsets"] for e in ents]
    assert offs[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(offs))


def test_metadata_patched_at_the_end_fits_the_reserve_and_loads(tmp_path: Path) -> None:
    ts = {"a": torch.ones(4, 4).bfloat16()}
    placeholder = json.dumps([{"sha256": "0" * 64}])
    w = ShardWriter(tmp_path / "p.safetensors", _entries(ts), {"format": "pt", "src": placeholder})
    w.write("a", _b(ts["a"]))
    w.finish({"src": json.dumps([{"sha256": "ab" * 32}])})
    w.commit()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["src"])[0]["sha256"] == "ab" * 32
        assert torch.equal(f.get_tensor("a"), ts["a"])


def test_metadata_larger_than_the_reserve_is_refused(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path / "p.safetensors", [TensorEntry("a", "F32", (1,))], {"format": "pt"})
    w.write("a", b"\0\0\0\0")
    with pytest.raises(ConvertError):
        w.finish({"big": "x" * 100})
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_out_of_order_or_oversized_writes_are_refused(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path / "o.safetensors", [TensorEntry("a", "F32", (2,)), TensorEntry("b", "F32", (1,))])
    with pytest.raises(ConvertError):
        w.write("b", b"\0" * 4)
    with pytest.raises(ConvertError):
        w.write("a", b"\0" * 12)
    w.write("a", b"\0" * 8)
    with pytest.raises(ConvertError):
        w.finish()  # b was never written
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_plan_shards_respects_the_budget_and_keeps_order() -> None:
    ents = [TensorEntry(f"t{i}", "U8", (n,)) for i, n in enumerate([40, 30, 50, 200, 10])]
    shards = plan_shards(ents, 100)
    assert [[e.name for e in s] for s in shards] == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]
    assert [e for s in shards for e in s] == ents


def test_checkpoint_writer_commits_shards_then_index(tmp_path: Path) -> None:
    ts = _tensors()
    shards = plan_shards(_entries(ts), 200)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    cw = CheckpointWriter(tmp_path, shards, names, metadata={"format": "pt"}, index_name="model.safetensors.index.json")
    for k, v in ts.items():
        cw.write(k, _b(v))
    cw.finish()
    assert not any(p.name.startswith("model") for p in tmp_path.iterdir())
    cw.commit()
    idx = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(idx["weight_map"]) == set(ts) and idx["metadata"]["total_size"] == cw.data_bytes
    for k, v in ts.items():
        assert torch.equal(load_st(tmp_path / idx["weight_map"][k])[k].view(torch.uint8), v.view(torch.uint8))


def test_abort_and_stale_cleanup_leave_nothing(tmp_path: Path) -> None:
    ts = _tensors()
    cw = CheckpointWriter(tmp_path, [_entries(ts)], ["m.safetensors"])
    cw.write("a.weight", _b(ts["a.weight"]))
    tmps = list(tmp_path.iterdir())
    assert len(tmps) == 1 and tmps[0].name.startswith(".provision-tmp-m.safetensors.")
    assert remove_stale_temporaries(tmp_path) == tmps  # what a killed run leaves
    cw.abort()
    assert list(tmp_path.iterdir()) == []
