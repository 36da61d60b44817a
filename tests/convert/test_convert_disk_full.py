"""A full disk while converting, and while creating an atomic write's temporary file, on a real
small tmpfs: exit 6 with the one-line disk message, and nothing left under a final or temporary name."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from provision.errors import DiskSpaceError
from provision.io.atomic import atomic_write_bytes
from provision.stages.convert import convert
from tests.support.disk import small_tmpfs

MiB = 1 << 20


def _weights_size(src: Path) -> int:
    return (src / "consolidated.safetensors").stat().st_size


def test_convert_onto_a_disk_too_small_for_the_output_is_refused_up_front_with_exit_6(
    tiny_src: Path, tmp_path: Path
) -> None:
    size = max(_weights_size(tiny_src) // 2, 256 << 10)  # a bf16 output of a bf16 source: about the source's size
    with small_tmpfs(tmp_path / "disk", size) as disk:
        with pytest.raises(DiskSpaceError) as e:
            convert(tiny_src, disk / "out", target="h100", scheme="bf16")
        assert e.value.exit_code == 6 and "Not enough disk space" in str(e.value)
        assert sorted(p.name for p in disk.iterdir()) == []  # no output, no staging folder, no temp file


def test_convert_that_runs_out_of_space_midway_is_exit_6_and_leaves_nothing(
    tiny_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the preflight passes (as when another writer fills the disk after it): the write itself hits ENOSPC
    import provision.stages.convert.stage as stage

    monkeypatch.setattr(stage, "check_free_space", lambda *a, **k: None)
    size = max(_weights_size(tiny_src) // 2, 256 << 10)
    with small_tmpfs(tmp_path / "disk", size) as disk:
        with pytest.raises(DiskSpaceError) as e:
            convert(tiny_src, disk / "out", target="h100", scheme="bf16")
        assert e.value.exit_code == 6
        assert "No space left on the device" in str(e.value) and "\n" not in str(e.value)
        assert sorted(p.name for p in disk.iterdir()) == []


def test_an_atomic_write_on_a_filesystem_without_free_inodes_is_exit_6_and_leaves_nothing(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", 4 * MiB, inodes=16) as disk:
        made = 0
        with pytest.raises(OSError) as full:  # use every inode: the next create is refused
            for made in range(1000):
                (disk / f"f{made}").touch()
        assert full.value.errno == errno.ENOSPC and made < 1000
        with pytest.raises(DiskSpaceError) as e:
            atomic_write_bytes(disk / "state.json", b"{}")
        assert e.value.exit_code == 6 and "state.json" in str(e.value)
        assert not (disk / "state.json").exists()
        assert not [p for p in disk.iterdir() if p.name.startswith(".provision-tmp-")]


def test_an_atomic_copy_onto_a_disk_too_small_is_exit_6_and_leaves_nothing(tmp_path: Path) -> None:
    from provision.io.atomic import atomic_copy

    src = tmp_path / "big.bin"
    src.write_bytes(b"\x5a" * (6 * MiB))
    with small_tmpfs(tmp_path / "disk", 4 * MiB) as disk:
        with pytest.raises(DiskSpaceError) as e:
            atomic_copy(src, disk / "big.bin")
        assert e.value.exit_code == 6 and "big.bin" in str(e.value) and "\n" not in str(e.value)
        assert sorted(p.name for p in disk.iterdir()) == []  # no final name, no temporary
