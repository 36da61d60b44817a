"""What a safetensors or index refusal carries besides its message: the hint a user acts on and
the context the ``--json`` error report gives a script (path, tensor, shard). The mutation run
of ``formats/safetensors.py`` found these unread; the expected values are typed out here, the
files written byte by byte (``struct`` + ``json``).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from provision.errors import HostileContentError, StructureError
from provision.formats.safetensors import check_index, check_safetensors, read_index

INDEX = "model.safetensors.index.json"
REFETCH = "The index and its shards come from different revisions; fetch them again."


def _shard(folder: Path, name: str, tensors: list[str]) -> None:
    """A shard of one-byte U8 tensors, laid out in the order given."""
    header = {t: {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i, t in enumerate(tensors)}
    body = json.dumps(header).encode()
    (folder / name).write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * len(tensors))


def _index(folder: Path, doc: Any) -> Path:
    p = folder / INDEX
    p.write_text(json.dumps(doc))
    return p


def _parts(e: StructureError) -> dict[str, Any]:
    """The error's message, hint and context (what the --json error report is made of)."""
    return {"message": e.message, "hint": e.hint, "context": e.context}


def _report(path: Path) -> dict[str, Any]:
    with pytest.raises(StructureError) as ei:
        check_index(path)
    return _parts(ei.value)


def test_a_tensor_the_shard_lacks_names_the_index_the_tensor_and_the_shard(tmp_path: Path) -> None:
    _shard(tmp_path, "a.safetensors", ["t"])
    p = _index(tmp_path, {"weight_map": {"t": "a.safetensors", "v": "a.safetensors"}})
    rep = _report(p)
    assert rep["message"] == f"{INDEX} places tensor 'v' in 'a.safetensors', which does not hold it."
    assert rep["hint"] == REFETCH
    assert rep["context"] == {"path": str(p), "tensor": "v", "shard": "a.safetensors"}


def test_a_tensor_the_index_does_not_map_names_the_index_the_tensor_and_the_shard(tmp_path: Path) -> None:
    _shard(tmp_path, "a.safetensors", ["t", "u"])
    p = _index(tmp_path, {"weight_map": {"t": "a.safetensors"}})
    rep = _report(p)
    assert rep["message"] == f"Shard 'a.safetensors' holds tensor 'u', which {INDEX} does not map to it."
    assert rep["hint"] == REFETCH
    assert rep["context"] == {"path": str(p), "tensor": "u", "shard": "a.safetensors"}


def test_a_missing_shard_says_what_to_fetch_and_names_the_index(tmp_path: Path) -> None:
    p = _index(tmp_path, {"weight_map": {"t": "gone.safetensors"}})
    rep = _report(p)
    assert rep["hint"] == "Fetch the missing shard (or the whole folder) again."
    assert rep["context"] == {"path": str(p), "shard": "gone.safetensors"}


@pytest.mark.parametrize(("doc", "message", "hint"), [
    ({"metadata": {}}, f"{INDEX} has no 'weight_map' object.", "Fetch it again."),
    ({"weight_map": {"t": 3}}, f"{INDEX}: tensor 't' maps to 3, not a file name.", None),
])
def test_a_malformed_index_names_its_path_in_the_report(tmp_path: Path, doc: Any, message: str,
                                                         hint: str | None) -> None:
    p = _index(tmp_path, doc)
    rep = _report(p)
    assert (rep["message"], rep["hint"], rep["context"]) == (message, hint, {"path": str(p)})


def test_an_index_that_is_not_json_says_to_fetch_it_again_naming_its_path(tmp_path: Path) -> None:
    p = tmp_path / INDEX
    p.write_text("{not json")
    rep = _report(p)
    assert rep["message"].startswith(f"{INDEX} is not valid JSON (")
    assert (rep["hint"], rep["context"]) == ("Fetch it again.", {"path": str(p)})


def test_a_read_index_remembers_where_it_was_read_from(tmp_path: Path) -> None:
    p = _index(tmp_path, {"weight_map": {"t": "a.safetensors"}})
    assert read_index(p).path == p


def test_a_damaged_weights_file_says_to_delete_and_fetch_it_again(tmp_path: Path) -> None:
    p = tmp_path / "w.safetensors"
    p.write_bytes(struct.pack("<Q", 2) + b"{}" + b"\0")  # one byte of data no tensor accounts for
    with pytest.raises(StructureError) as ei:
        check_safetensors(p)
    rep = _parts(ei.value)
    assert rep["message"].startswith("w.safetensors is not a valid safetensors file: ")
    assert rep["hint"] == "The file is damaged or truncated; delete it and fetch it again."
    assert rep["context"]["path"] == str(p)


def _st(path: Path, header: Any, data: bytes) -> Path:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def test_a_tensor_whose_offsets_do_not_match_its_shape_reports_both_sizes(tmp_path: Path) -> None:
    p = _st(tmp_path / "w.safetensors", {"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 3]}}, b"\0" * 3)
    with pytest.raises(StructureError) as ei:
        check_safetensors(p)
    assert ei.value.message == ("w.safetensors is not a valid safetensors file: tensor 't' is F32[1] (4 bytes) "
                                "but its offsets span 3 bytes.")
    assert ei.value.context == {"path": str(p), "tensor": "t", "expected": 4.0, "actual": 3}


HOSTILE_HINT = "This is not a genuine checkpoint; delete it and fetch it again from a trusted source."


def test_a_header_claiming_more_than_the_limit_is_hostile_naming_the_file_and_the_claim(tmp_path: Path) -> None:
    from provision.formats.safetensors import MAX_HEADER_BYTES

    p = tmp_path / "w.safetensors"
    p.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    with pytest.raises(HostileContentError) as ei:
        check_safetensors(p)
    assert ei.value.hint == HOSTILE_HINT
    assert ei.value.context == {"path": str(p), "header_len": MAX_HEADER_BYTES + 1}


def test_a_header_with_too_many_values_is_hostile_with_the_same_hint(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from provision.formats import safetensors as st

    p = _st(tmp_path / "w.safetensors", {"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0")
    monkeypatch.setattr(st, "MAX_HEADER_ITEMS", 2)
    with pytest.raises(HostileContentError) as ei:
        check_safetensors(p)
    assert ei.value.hint == HOSTILE_HINT
    assert ei.value.context["path"] == str(p)


def test_a_weights_link_out_of_its_folder_is_refused_as_a_weights_file(tmp_path: Path) -> None:
    _st(tmp_path / "elsewhere.safetensors", {}, b"")
    (tmp_path / "model").mkdir()
    link = tmp_path / "model" / "w.safetensors"
    link.symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(HostileContentError) as ei:
        check_safetensors(link, root=tmp_path / "model")
    assert ei.value.message == f"Refusing weights file w.safetensors: it is a symlink out of {tmp_path / 'model'}."
