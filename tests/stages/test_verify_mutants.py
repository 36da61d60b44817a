"""The verify scan and the per-file safetensors check, entry by entry and field by field.

Gaps the mutation run of ``stages/verify/{scan,structure}.py`` found: a symlink whose target
(not its name) is a pickle, the path and target a symlink entry keeps, and every field of the
safetensors check a report prints. Expected entries are built here from the tree the test makes.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from provision.errors import StructureError
from provision.stages.verify.report import Check
from provision.stages.verify.scan import Entry, scan
from provision.stages.verify.structure import safetensors_check


def _weights(path: Path, tensors: int) -> Path:
    header = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(tensors)}
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * tensors)
    return path


def test_a_link_named_like_weights_to_a_pickle_inside_is_a_pickle(tmp_path: Path) -> None:
    (tmp_path / "consolidated.00.pth").write_bytes(b"\x80\x02")
    (tmp_path / "model.safetensors").symlink_to("consolidated.00.pth")
    entries = {e.rel: e for e in scan(tmp_path)}
    target = os.path.realpath(tmp_path / "consolidated.00.pth")
    assert entries["model.safetensors"] == Entry("model.safetensors", tmp_path / "model.safetensors", "pickle",
                                                 target=target)


def test_a_link_to_a_file_inside_keeps_its_own_path_the_target_and_the_target_s_size(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "params.json").write_text("{}\n")  # 3 bytes
    (tmp_path / "params.json").symlink_to("real/params.json")
    entries = {e.rel: e for e in scan(tmp_path)}
    assert entries["params.json"] == Entry("params.json", tmp_path / "params.json", "symlink-in", size=3,
                                           target=os.path.realpath(tmp_path / "real" / "params.json"))
    assert entries["params.json"].readable


def test_the_safetensors_check_reports_its_name_file_outcome_authority_and_tensor_count(tmp_path: Path) -> None:
    good = _weights(tmp_path / "good.safetensors", 2)
    info, check = safetensors_check("good.safetensors", good, "manifest-sha256")
    assert info is not None and sorted(info.tensors) == ["t0", "t1"]
    assert check == Check("safetensors", "good.safetensors", True, "manifest-sha256", actual="2 tensors")


def test_a_malformed_weights_file_fails_the_check_with_the_error_it_raised(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 2) + b"{}" + b"\0")  # one byte no tensor accounts for
    info, check = safetensors_check("bad.safetensors", bad, "hub-lfs-sha256")
    assert info is None
    assert (check.name, check.file, check.ok, check.authority) == ("safetensors", "bad.safetensors", False,
                                                                   "hub-lfs-sha256")
    assert isinstance(check.error, StructureError)
    assert check.message == check.error.message
    assert check.message.startswith("bad.safetensors is not a valid safetensors file: ")
