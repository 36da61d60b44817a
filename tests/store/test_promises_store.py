"""The README's shared store: in a group-owned setgid home under ``umask 002`` every folder a run
creates keeps the store's group, the setgid bit and group write, and every file it writes gets the
store's group and group write (a file's mode is what ``open()`` gives under the umask: 0o666 & ~0o002
= 0o664). The run downloads from the loopback Hub (a hard-linked adoption keeps the source's own
inode, mode and group)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from provision.testing.hub_server import LoopbackHub
from provision.testing.torrent_fixtures import PROVISION, REPO, provision_env


def _store_group() -> int:
    """A group for the store other than our own effective group where we may chown to one (root:
    any gid; others: a supplementary group), so inheriting it is visible; else our own."""
    if os.geteuid() == 0:
        return 4242  # any gid: root may give a folder to a group that has no name
    others = [g for g in os.getgroups() if g != os.getegid()]
    return others[0] if others else os.getegid()


def _run_under_umask(tiny_src: Path, home: Path, umask: int) -> None:
    argv = [*PROVISION, "run", str(tiny_src / "manifest.toml"), "--home", str(home), "--no-hf-cache",
            "--target", "cpu", "--scheme", "bf16", "--skip-smoke"]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=REPO, env=provision_env(),
                        umask=umask)
    assert cp.returncode == 0, cp.stderr[-3000:]


def _entries(home: Path) -> tuple[list[Path], list[Path]]:
    dirs, files = [], []
    for dirpath, dirnames, filenames in os.walk(home):
        dirs += [Path(dirpath) / d for d in dirnames]
        files += [Path(dirpath) / f for f in filenames]
    return dirs, files


@pytest.mark.slow
def test_a_setgid_store_under_umask_002_gives_every_new_folder_and_file_the_store_group(
    hub: LoopbackHub, tiny_src: Path, tmp_path: Path
) -> None:
    home = tmp_path / "store"  # README: install -d -m 2775 -g mlusers /srv/provision
    home.mkdir()
    gid = _store_group()
    os.chown(home, -1, gid)
    os.chmod(home, 0o2775)
    _run_under_umask(tiny_src, home, 0o002)
    dirs, files = _entries(home)
    names = {p.name for p in files}
    assert {"consolidated.safetensors", "params.json", "tekken.json", "state.json"} <= names  # the run wrote them
    assert any(p.parent.name == "bf16-mistral" for p in files)  # and its conversion
    for d in dirs:
        st = d.stat()
        assert st.st_mode & stat.S_ISGID, f"{d} lost the setgid bit"
        assert st.st_gid == gid, f"{d} has group {st.st_gid}, not the store's {gid}"
        assert st.st_mode & 0o070 == 0o070, f"{d} is {oct(st.st_mode)}: not group-writable under umask 002"
    for f in files:
        st = f.stat()
        assert st.st_gid == gid, f"{f} has group {st.st_gid}, not the store's {gid}"
        assert st.st_mode & 0o060 == 0o060, f"{f} is {oct(st.st_mode)}: not group-writable under umask 002"
