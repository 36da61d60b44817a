"""``provision.io.opening``: the one way a file from outside is opened (used by every format reader)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from provision.errors import HostileContentError
from provision.io.opening import open_regular, read_regular


def test_a_regular_file_and_a_symlink_inside_the_root_are_read(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_bytes(b"{}")
    (tmp_path / "b.json").symlink_to("a.json")
    assert read_regular(tmp_path / "b.json", root=tmp_path, max_bytes=10) == b"{}"
    fd = open_regular(tmp_path / "a.json", root=tmp_path)
    try:
        assert os.read(fd, 10) == b"{}"
    finally:
        os.close(fd)


def test_a_symlink_out_of_the_root_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "tekken.json").symlink_to(tmp_path / "secret")
    with pytest.raises(HostileContentError, match="symlink out of") as e:
        read_regular(tmp_path / "m" / "tekken.json", root=tmp_path / "m", max_bytes=10)
    assert e.value.exit_code == 5


def test_a_file_in_a_subfolder_symlinked_out_of_the_root_is_refused(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x").write_text("s")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "sub").symlink_to(tmp_path / "outside")
    with pytest.raises(HostileContentError):
        read_regular(tmp_path / "m" / "sub" / "x", root=tmp_path / "m", max_bytes=10)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "params.json")
    with pytest.raises(HostileContentError, match="FIFO"):
        open_regular(tmp_path / "params.json", root=tmp_path)


def test_a_socket_and_a_device_and_a_folder_are_refused(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "sock"))
        with pytest.raises(HostileContentError, match="socket"):
            open_regular(tmp_path / "sock")
    (tmp_path / "null").symlink_to("/dev/null")
    with pytest.raises(HostileContentError, match="character device"):
        open_regular(tmp_path / "null")  # no root: the symlink is followed, the device refused
    with pytest.raises(HostileContentError, match="folder"):
        open_regular(tmp_path)


def test_a_file_over_the_cap_is_refused_before_reading(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * 101)
    with pytest.raises(HostileContentError, match="100-byte limit"):
        read_regular(tmp_path / "big", max_bytes=100)
    assert read_regular(tmp_path / "big", max_bytes=101) == b"x" * 101


def test_a_missing_file_is_the_callers_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_regular(tmp_path / "nope", root=tmp_path)
