"""The safetensors header reader's memory bound: a header just under the 100 MB byte limit costs
about twice its bytes, never gigabytes, and one with too many JSON values is refused unparsed.
Memory is the peak RSS (VmHWM) of a child process that only reads the header."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from provision.errors import HostileContentError
from provision.formats.safetensors import MAX_HEADER_BYTES, MAX_HEADER_ITEMS, check_safetensors

ROOT = Path(__file__).resolve().parents[2]

# VmHWM is the peak RSS of this process's own address space; ru_maxrss would carry the parent's
# (the test runner's) peak across fork and exec.
_CHILD = r"""
import sys
from pathlib import Path
from provision.errors import ProvisionError
from provision.formats.safetensors import check_safetensors
try:
    info = check_safetensors(Path(sys.argv[1]))
    outcome = f"ok {len(info.tensors)} {len(info.metadata)}"
except ProvisionError as e:
    outcome = f"exit {e.exit_code} {type(e).__name__}"
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print(outcome, hwm[0])  # KiB
"""


def _child_peak(path: Path) -> tuple[str, int]:
    """Read ``path``'s header in a child process (deadline 300 s): its outcome and its peak RSS in bytes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _CHILD, str(path)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    *outcome, kib = r.stdout.split()
    return " ".join(outcome), int(kib) * 1024


def _write(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _many_tensors_header(target_bytes: int) -> bytes:
    """Valid-looking zero-sized U8 tensors until the header is ``target_bytes`` long (~62 B each)."""
    entry = '"t{:08d}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'
    parts, size, i = [], 2, 0
    while size < target_bytes - 80:
        e = entry.format(i)
        parts.append(e)
        size += len(e) + 1
        i += 1
    return ("{" + ",".join(parts) + "}").encode()


@pytest.mark.slow
def test_a_99_mb_header_of_tiny_tensors_is_refused_without_costing_gigabytes(tmp_path: Path) -> None:
    header = _many_tensors_header(99_000_000)
    assert len(header) < MAX_HEADER_BYTES  # under the byte limit: only the value bound can refuse it
    p = _write(tmp_path / "many.safetensors", header)
    del header
    outcome, peak = _child_peak(p)
    assert outcome == "exit 5 HostileContentError"
    assert peak < 512 << 20, peak  # the old parser built 1.6 million entries: 1.5-3 GB


@pytest.mark.slow
def test_a_99_mb_header_within_the_value_bound_parses_in_about_twice_its_bytes(tmp_path: Path) -> None:
    # one tensor and a 99 MB metadata string: a legal header as large as the byte limit allows
    meta = "x" * 99_000_000
    header = json.dumps({"__metadata__": {"note": meta},
                         "w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}).encode()
    del meta
    assert len(header) < MAX_HEADER_BYTES
    p = _write(tmp_path / "big.safetensors", header, b"\0\0\0\0")
    del header
    outcome, peak = _child_peak(p)
    assert outcome == "ok 1 1"
    # raw buffer + decoded text + the parsed string: 3 x 99 MB, plus the interpreter
    assert peak < 512 << 20, peak


@pytest.mark.slow
def test_a_header_at_the_value_bound_parses_within_the_documented_memory(tmp_path: Path) -> None:
    # metadata with as many keys as the bound allows (each "k…":"v" pair counts 2 values + its comma)
    n = (MAX_HEADER_ITEMS - 1) // 2 - 8
    meta = ",".join(f'"k{i:07d}":"v"' for i in range(n))
    header = ('{"__metadata__":{' + meta + '},"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}').encode()
    del meta
    p = _write(tmp_path / "keys.safetensors", header, b"\0\0\0\0")
    outcome, peak = _child_peak(p)
    assert outcome.startswith("ok 1 ")
    assert peak < 512 << 20, peak


def test_too_many_values_is_refused_before_parsing(tmp_path: Path) -> None:
    # a 2.6 MB array of zeros: 1.3 million commas -> 2.6 million values, over MAX_HEADER_ITEMS
    header = ("[" + ",".join("0" * 1_300_000) + "]").encode()
    assert 1 + 2 * header.count(b",") + 2 > MAX_HEADER_ITEMS
    p = _write(tmp_path / "arr.safetensors", header)
    with pytest.raises(HostileContentError, match="JSON values"):
        check_safetensors(p)


def test_a_fifo_named_like_a_weights_file_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "consolidated.safetensors")
    with pytest.raises(HostileContentError) as e:
        check_safetensors(tmp_path / "consolidated.safetensors")
    assert e.value.exit_code == 5


def test_a_weights_symlink_out_of_the_root_is_refused(tmp_path: Path) -> None:
    outside = _write(tmp_path / "outside.safetensors", b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
                     b"\0")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").symlink_to(outside)
    with pytest.raises(HostileContentError, match="symlink"):
        check_safetensors(tmp_path / "m" / "model.safetensors", root=tmp_path / "m")
    assert check_safetensors(outside).tensors["w"].nbytes == 1
