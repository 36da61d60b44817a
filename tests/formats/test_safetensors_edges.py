"""The safetensors header checks rule by rule, each with the exact reason it gives.

Files are written here byte by byte (``struct`` + ``json``) or by the ``safetensors`` library,
which is also the reference for the dtype table; offsets and sizes in the expectations are
worked out in the test.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import _TYPES as LIB_TYPES
from safetensors.torch import save_file

from provision.errors import HostileContentError, StructureError
from provision.formats import safetensors as st
from provision.formats.safetensors import DTYPES, FROM_TORCH, TORCH_NAMES, check_index, check_safetensors


def write_st(path: Path, header: Any, data: bytes = b"", *, raw_header: bytes | None = None) -> Path:
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def refused(path: Path, needle: str, kind: type[Exception] = StructureError) -> Exception:
    with pytest.raises(kind) as ei:
        check_safetensors(path)
    assert needle in str(ei.value), str(ei.value)
    return ei.value


def test_the_dtype_table_agrees_with_the_safetensors_library_and_torch() -> None:
    for name, tname in TORCH_NAMES.items():
        lib = LIB_TYPES[name]  # safetensors' own name -> torch dtype map
        assert lib == getattr(torch, tname), name
        assert DTYPES[name].bits == torch.tensor([], dtype=lib).element_size() * 8, name
        assert FROM_TORCH[tname] == name
    # the formats torch has no dtype for here: widths from the safetensors spec
    assert {n: DTYPES[n].bits for n in ("F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "U16", "U32", "C64", "U64")} == \
        {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "F8_E8M0": 8, "U16": 16, "U32": 32, "C64": 64, "U64": 64}
    assert st.DTYPE_BYTES["BF16"] == 2 and "F4" not in st.DTYPE_BYTES and "F6_E2M3" not in st.DTYPE_BYTES


def test_a_library_written_file_parses_to_the_library_s_offsets(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(2, 3, dtype=torch.bfloat16), "b": torch.zeros(5, dtype=torch.int64),
               "c": torch.zeros(0, 4), "d": torch.tensor(1.5)}, str(p), metadata={"format": "pt"})
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    info = check_safetensors(p)
    assert info.header_len == n and info.size == len(raw)
    assert info.data_offset == 8 + n and info.data_bytes == len(raw) - 8 - n == 12 + 40 + 0 + 4
    assert info.metadata == {"format": "pt"}
    assert info.shapes() == {"a": (2, 3), "b": (5,), "c": (0, 4), "d": ()}
    for name, t in info.tensors.items():
        assert [t.begin, t.end] == header[name]["data_offsets"] and t.dtype == header[name]["dtype"]
        assert t.nbytes == t.end - t.begin


def test_null_metadata_is_an_empty_table(tmp_path: Path) -> None:
    p = write_st(tmp_path / "x.safetensors", {"__metadata__": None, "t": {"dtype": "U8", "shape": [2],
                                                                          "data_offsets": [0, 2]}}, b"ab")
    assert check_safetensors(p).metadata == {}


@pytest.mark.parametrize("meta", [["a"], {"k": 1}, {"k": None}, "text"])
def test_metadata_must_map_strings_to_strings(tmp_path: Path, meta: Any) -> None:
    p = write_st(tmp_path / "x.safetensors", {"__metadata__": meta})
    refused(p, "__metadata__ must map strings to strings")


def _one(entry: Any) -> dict[str, Any]:
    return {"t": entry}


@pytest.mark.parametrize(("entry", "needle"), [
    ([1, 2], "tensor 't' entry is not an object"),
    ({"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "zzz": 0, "aaa": 0}, "tensor 't' has unknown field 'aaa'"),
    ({"dtype": "U9", "shape": [1], "data_offsets": [0, 1]}, "tensor 't' has unknown dtype 'U9'"),
    ({"dtype": 8, "shape": [1], "data_offsets": [0, 1]}, "tensor 't' has unknown dtype 8"),
    ({"shape": [1], "data_offsets": [0, 1]}, "tensor 't' has unknown dtype None"),
    ({"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}, "tensor 't' has an invalid shape [-1]"),
    ({"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}, "tensor 't' has an invalid shape [True]"),
    ({"dtype": "U8", "shape": [1.0], "data_offsets": [0, 1]}, "tensor 't' has an invalid shape [1.0]"),
    ({"dtype": "U8", "shape": 1, "data_offsets": [0, 1]}, "tensor 't' has an invalid shape 1"),
    ({"dtype": "U8", "shape": [1], "data_offsets": [0]}, "tensor 't' has invalid data_offsets [0]"),
    ({"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 2]}, "tensor 't' has invalid data_offsets [0, 1, 2]"),
    ({"dtype": "U8", "shape": [1], "data_offsets": [-1, 0]}, "tensor 't' has invalid data_offsets [-1, 0]"),
    ({"dtype": "U8", "shape": [1], "data_offsets": [False, True]}, "has invalid data_offsets [False, True]"),
    ({"dtype": "U8", "shape": [1], "data_offsets": "0,1"}, "has invalid data_offsets '0,1'"),
    ({"dtype": "U8", "shape": [0], "data_offsets": [1, 0]}, "tensor 't' ends before it begins (1 > 0)"),
    ({"dtype": "BF16", "shape": [3], "data_offsets": [0, 5]},
     "tensor 't' is BF16[3] (6 bytes) but its offsets span 5 bytes"),
    ({"dtype": "F4", "shape": [3], "data_offsets": [0, 2]},
     "tensor 't' is F4[3] (1.5 bytes) but its offsets span 2 bytes"),
])
def test_each_malformed_tensor_entry_is_refused_naming_the_field(tmp_path: Path, entry: Any, needle: str) -> None:
    p = write_st(tmp_path / "x.safetensors", _one(entry), b"\0" * 8)
    err = refused(p, needle)
    assert str(err).startswith("x.safetensors is not a valid safetensors file: ")
    assert err.context["tensor"] == "t" and err.exit_code == 5  # type: ignore[attr-defined]


def test_sub_byte_and_empty_tensors_with_matching_offsets_are_accepted(tmp_path: Path) -> None:
    header = {"f4": {"dtype": "F4", "shape": [2, 3], "data_offsets": [0, 3]},  # 6 * 4 bits = 3 bytes
              "e": {"dtype": "F32", "shape": [0], "data_offsets": [3, 3]},
              "s": {"dtype": "F6_E3M2", "shape": [4], "data_offsets": [3, 6]}}  # 4 * 6 bits = 3 bytes
    info = check_safetensors(write_st(tmp_path / "x.safetensors", header, b"\0" * 6))
    assert {k: (t.begin, t.end) for k, t in info.tensors.items()} == {"f4": (0, 3), "e": (3, 3), "s": (3, 6)}


def test_a_file_shorter_than_the_length_field_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"\x01\x02\x03")
    err = refused(p, "the file is 3 bytes, shorter than the 8-byte header length")
    assert err.context["size"] == 3  # type: ignore[attr-defined]
    p.write_bytes(struct.pack("<Q", 0))  # exactly 8 bytes: an empty header, not JSON
    refused(p, "the header is not valid JSON")


def test_a_header_length_just_past_the_end_is_refused_and_one_that_fits_is_read(tmp_path: Path) -> None:
    body = b"{}"
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 3) + body)  # claims 3, holds 2
    refused(p, "the header length 3 points past the end of the 10-byte file")
    p.write_bytes(struct.pack("<Q", 2) + body)
    assert check_safetensors(p).tensors == {}


def test_the_header_limit_is_inclusive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = b'{"__metadata__": {}}'
    p = write_st(tmp_path / "x.safetensors", None, raw_header=body)
    monkeypatch.setattr(st, "MAX_HEADER_BYTES", len(body))
    assert check_safetensors(p).metadata == {}
    monkeypatch.setattr(st, "MAX_HEADER_BYTES", len(body) - 1)
    err = refused(p, f"its header claims {len(body)} bytes (the limit is {len(body) - 1})", HostileContentError)
    assert err.context["header_len"] == len(body)  # type: ignore[attr-defined]


def test_the_value_limit_counts_commas_and_openings_before_parsing(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    body = b'{"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    # 3 commas, 2 "[" and 2 "{": at most 1 + 2 * 7 = 15 values
    p = write_st(tmp_path / "x.safetensors", None, b"\0", raw_header=body)
    monkeypatch.setattr(st, "MAX_HEADER_ITEMS", 15)
    assert set(check_safetensors(p).tensors) == {"t"}
    monkeypatch.setattr(st, "MAX_HEADER_ITEMS", 14)
    refused(p, "its header holds up to 15 JSON values (the limit is 14, about 0 tensors)", HostileContentError)


@pytest.mark.parametrize(("raw", "needle"), [
    (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
    (b"[1, 2]", "the header is not a JSON object"),
    (b"\xff\xfe{}", "the header is not valid JSON"),
    (b'{"a": ', "the header is not valid JSON"),
])
def test_a_header_that_is_not_one_json_object_is_refused(tmp_path: Path, raw: bytes, needle: str) -> None:
    refused(write_st(tmp_path / "x.safetensors", None, raw_header=raw), needle)


def _u8(begin: int, end: int) -> dict[str, Any]:
    return {"dtype": "U8", "shape": [end - begin], "data_offsets": [begin, end]}


def test_overlap_is_reported_with_both_tensors_and_the_shared_bytes(tmp_path: Path) -> None:
    p = write_st(tmp_path / "x.safetensors", {"a": _u8(0, 6), "b": _u8(4, 8)}, b"\0" * 8)
    err = refused(p, "tensors 'a' and 'b' overlap (bytes 4..6)")
    assert err.context["other"] == "a"  # type: ignore[attr-defined]
    p = write_st(tmp_path / "y.safetensors", {"a": _u8(0, 8), "b": _u8(2, 4)}, b"\0" * 8)
    refused(p, "tensors 'a' and 'b' overlap (bytes 2..4)")  # b inside a


def test_adjacent_tensors_in_any_key_order_tile_the_data(tmp_path: Path) -> None:
    p = write_st(tmp_path / "x.safetensors", {"z": _u8(0, 3), "a": _u8(3, 8), "m": _u8(8, 8)}, b"\0" * 8)
    assert sorted((t.begin, t.end) for t in check_safetensors(p).tensors.values()) == [(0, 3), (3, 8), (8, 8)]


def test_gaps_and_tensors_past_the_data_are_refused_with_the_numbers(tmp_path: Path) -> None:
    refused(write_st(tmp_path / "a.safetensors", {"a": _u8(2, 4)}, b"\0" * 4),
            "2 bytes before tensor 'a' belong to no tensor")
    refused(write_st(tmp_path / "b.safetensors", {"a": _u8(0, 2), "b": _u8(3, 4)}, b"\0" * 4),
            "1 bytes before tensor 'b' belong to no tensor")
    err = refused(write_st(tmp_path / "c.safetensors", {"a": _u8(0, 5)}, b"\0" * 4),
                  "tensor 'a' ends at 5, past the 4-byte data section")
    assert (err.context["expected"], err.context["actual"]) == (4, 5)  # type: ignore[attr-defined]
    body = json.dumps({"a": _u8(0, 2)}).encode()
    err = refused(write_st(tmp_path / "d.safetensors", None, b"\0" * 3, raw_header=body),
                  f"the tensors cover 2 bytes but the data section holds 3 (file size {8 + len(body) + 3})")
    assert (err.context["expected"], err.context["actual"]) == (8 + len(body) + 2, 8 + len(body) + 3)  # type: ignore[attr-defined]


def test_a_missing_file_is_a_structure_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(StructureError, match=r"Cannot open gone\.safetensors"):
        check_safetensors(tmp_path / "gone.safetensors")


# ---- the index


def _shard(folder: Path, name: str, tensors: list[str]) -> Path:
    return write_st(folder / name, {t: _u8(i, i + 1) for i, t in enumerate(tensors)}, b"\0" * len(tensors))


def _index(folder: Path, doc: Any) -> Path:
    p = folder / "model.safetensors.index.json"
    p.write_text(json.dumps(doc) if not isinstance(doc, bytes) else doc.decode("latin-1"))
    return p


def test_a_consistent_index_lists_its_shards_once_each_sorted(tmp_path: Path) -> None:
    _shard(tmp_path, "b.safetensors", ["x", "y"])
    _shard(tmp_path, "a.safetensors", ["z"])
    idx = check_index(_index(tmp_path, {"metadata": {"total_size": 3},
                                        "weight_map": {"x": "b.safetensors", "y": "b.safetensors",
                                                       "z": "a.safetensors"}}))
    assert idx.shards == ["a.safetensors", "b.safetensors"]
    assert idx.metadata == {"total_size": 3}


def test_an_index_whose_metadata_is_not_an_object_keeps_an_empty_table(tmp_path: Path) -> None:
    _shard(tmp_path, "a.safetensors", ["z"])
    assert check_index(_index(tmp_path, {"metadata": [1], "weight_map": {"z": "a.safetensors"}})).metadata == {}


@pytest.mark.parametrize(("doc", "needle"), [
    ({"metadata": {}}, "has no 'weight_map' object"),
    ({"weight_map": ["a"]}, "has no 'weight_map' object"),
    ([], "has no 'weight_map' object"),
    ({"weight_map": {"t": 3}}, "tensor 't' maps to 3, not a file name"),
    (b'{"weight_map": {}, "weight_map": {}}', "is not valid JSON (duplicate key 'weight_map')"),
    (b"{not json", "is not valid JSON"),
])
def test_malformed_indexes_are_structure_errors(tmp_path: Path, doc: Any, needle: str) -> None:
    with pytest.raises(StructureError) as ei:
        check_index(_index(tmp_path, doc))
    assert needle in str(ei.value)


def test_an_index_naming_a_missing_shard_names_it(tmp_path: Path) -> None:
    with pytest.raises(StructureError, match=r"names shard 'gone\.safetensors', which is missing") as ei:
        check_index(_index(tmp_path, {"weight_map": {"t": "gone.safetensors"}}))
    assert ei.value.context["shard"] == "gone.safetensors"


def test_already_checked_shard_headers_are_used_instead_of_the_files(tmp_path: Path) -> None:
    p = _shard(tmp_path, "a.safetensors", ["t"])
    info = check_safetensors(p)
    p.unlink()  # only the passed header can satisfy the index now
    assert check_index(_index(tmp_path, {"weight_map": {"t": "a.safetensors"}}),
                       shards={"a.safetensors": info}).shards == ["a.safetensors"]


def test_the_index_and_its_shards_must_name_the_same_tensors_both_ways(tmp_path: Path) -> None:
    _shard(tmp_path, "a.safetensors", ["t", "u"])
    with pytest.raises(StructureError, match=r"places tensor 'v' in 'a\.safetensors', which does not hold it"):
        check_index(_index(tmp_path, {"weight_map": {"t": "a.safetensors", "u": "a.safetensors",
                                                     "v": "a.safetensors"}}))
    with pytest.raises(StructureError, match=r"Shard 'a\.safetensors' holds tensor 'u', which model\.safetensors"):
        check_index(_index(tmp_path, {"weight_map": {"t": "a.safetensors"}}))


def test_an_index_with_too_many_values_is_refused_as_hostile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _index(tmp_path, {"weight_map": {"a": "s", "b": "s"}})  # 1 comma, 2 "{": at most 7 values
    monkeypatch.setattr(st, "MAX_HEADER_ITEMS", 6)
    with pytest.raises(HostileContentError, match="far too many JSON values"):
        st.read_index(p)
    monkeypatch.setattr(st, "MAX_HEADER_ITEMS", 7)
    assert st.read_index(p).weight_map == {"a": "s", "b": "s"}


def test_an_index_symlinked_out_of_its_folder_is_refused_naming_it_an_index(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps({"weight_map": {}}))
    model = tmp_path / "model"
    model.mkdir()
    link = model / "model.safetensors.index.json"
    link.symlink_to(outside)
    with pytest.raises(HostileContentError, match=r"Refusing index model\.safetensors\.index\.json: it is a symlink out of"):
        st.read_index(link)


def test_an_unreadable_index_is_a_structure_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(StructureError, match=r"Cannot read gone\.index\.json: No such file or directory\.") as ei:
        st.read_index(tmp_path / "gone.index.json")
    assert ei.value.context["path"] == str(tmp_path / "gone.index.json")
