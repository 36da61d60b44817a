"""The torrent name checks and file listing, case by case (offline: torrents are bencoded here).

Each hostile component is refused on its own (one check per rule), the v2 file tree's depth
limit is pinned at its boundary, and the listing of a real multi-file torrent (pad files left out,
the root folder stripped) and its infohash are compared with values computed here from the raw
bencoded bytes with hashlib, never with what the code under test reports.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import libtorrent as lt
import pytest

from provision.errors import HostileContentError, UsageError
from provision.stages.fetch.torrent.meta import (
    check_component,
    check_info_names,
    hash_of,
    load_torrent_info,
    read_torrent_file,
    root_prefix,
    whitelist_lines,
)

PIECE = 16384


def _v1_info(files: list[tuple[list[bytes], bytes, bool]], name: bytes = b"model") -> dict[bytes, Any]:
    """A v1 multi-file info dict over ``(path parts, data, is_pad)`` with the real piece hashes."""
    blob = b"".join(data for _, data, _ in files)
    pieces = b"".join(hashlib.sha1(blob[i:i + PIECE]).digest() for i in range(0, len(blob), PIECE))
    entries: list[dict[bytes, Any]] = []
    for parts, data, pad in files:
        e: dict[bytes, Any] = {b"length": len(data), b"path": parts}
        if pad:
            e[b"attr"] = b"p"
        entries.append(e)
    return {b"name": name, b"piece length": PIECE, b"pieces": pieces, b"files": entries}


def _write(tmp_path: Path, info: dict[bytes, Any]) -> tuple[Path, str]:
    """The .torrent file and its btih: sha1 of the bencoded info dictionary (BEP 3)."""
    raw_info = lt.bencode(info)
    path = tmp_path / "t.torrent"
    path.write_bytes(b"d4:info" + raw_info + b"e")
    return path, hashlib.sha1(raw_info).hexdigest()


@pytest.mark.parametrize("part", ["", ".", "..", "a/b", "/etc", "a\\b", "a\x00b", "C:", "c:evil", "x:"])
def test_each_hostile_component_is_refused_alone_with_exit_5_naming_it(part: str) -> None:
    with pytest.raises(HostileContentError) as ei:
        check_component(part, "file name")
    assert ei.value.exit_code == 5
    assert f"the file name {part!r} would leave the destination folder" in str(ei.value)
    assert ei.value.context["path"] == part


@pytest.mark.parametrize("part", ["c", "...", ".hidden", "a..b", "ab:c", "model.safetensors", "é"])
def test_plain_names_that_only_look_odd_are_accepted(part: str) -> None:
    check_component(part, "file name")  # one letter, dots inside a name, a colon past the drive position


@pytest.mark.parametrize("key", [b"name", b"name.utf-8"])
def test_a_hostile_torrent_name_is_refused_under_either_key(key: bytes) -> None:
    info = _v1_info([([b"a.bin"], b"x" * 10, False)])
    info[key] = b".."
    with pytest.raises(HostileContentError, match="torrent name"):
        check_info_names(lt.bencode(info))


@pytest.mark.parametrize("key", [b"path", b"path.utf-8"])
def test_a_hostile_file_path_is_refused_under_either_key(key: bytes) -> None:
    info = _v1_info([([b"a.bin"], b"x" * 10, False)])
    info[b"files"][0][key] = [b"ok", b".."]
    with pytest.raises(HostileContentError, match="file name"):
        check_info_names(lt.bencode(info))


@pytest.mark.parametrize(("mutate", "needle"), [
    (lambda i: i[b"files"][0].__setitem__(b"path", []), "a file path is empty or malformed"),
    (lambda i: i[b"files"][0].__setitem__(b"path", b"flat"), "a file path is empty or malformed"),
    (lambda i: i[b"files"].__setitem__(0, b"not a dict"), "a file entry is malformed"),
    (lambda i: i.__setitem__(b"name", 7), "a torrent name is not a string"),
    (lambda i: i[b"files"][0].__setitem__(b"path", [b"\xff\xfe"]), "is not valid UTF-8"),
])
def test_malformed_entries_are_refused_naming_what_is_wrong(mutate: Any, needle: str) -> None:
    info = _v1_info([([b"a.bin"], b"x" * 10, False)])
    mutate(info)
    with pytest.raises(HostileContentError, match=needle):
        check_info_names(lt.bencode(info))


def test_an_info_section_that_is_not_a_dictionary_is_refused() -> None:
    with pytest.raises(HostileContentError, match="info dictionary is malformed"):
        check_info_names(lt.bencode([b"name", b"x"]))


def _deep_tree(levels: int) -> dict[bytes, Any]:
    """A v2 file tree whose one file sits ``levels`` folders deep (so its node is at depth ``levels + 1``)."""
    tree: dict[bytes, Any] = {b"f.bin": {b"": {b"length": 1}}}
    for i in range(levels):
        tree = {f"d{i}".encode(): tree}
    return tree


def test_a_v2_file_tree_is_accepted_up_to_depth_64_and_refused_beyond() -> None:
    ok = {b"name": b"model", b"piece length": PIECE, b"meta version": 2, b"file tree": _deep_tree(63)}
    check_info_names(lt.bencode(ok))  # file node at depth 64: the limit
    too_deep = {**ok, b"file tree": _deep_tree(64)}
    with pytest.raises(HostileContentError, match="v2 file tree is malformed"):
        check_info_names(lt.bencode(too_deep))


@pytest.mark.parametrize(("tree", "needle"), [
    ({}, "malformed"),
    ({b"a": {}}, "malformed"),
    ({b"a": b"not a dict"}, "malformed"),
    ({b"": {b"length": 1}}, "empty file name"),
    ({b"a": {b"": {b"length": 1}, b"b": {b"": {b"length": 1}}}}, "empty file name"),
])
def test_malformed_v2_file_trees_are_refused(tree: dict[bytes, Any], needle: str) -> None:
    info = {b"name": b"model", b"piece length": PIECE, b"meta version": 2, b"file tree": tree}
    with pytest.raises(HostileContentError, match=needle):
        check_info_names(lt.bencode(info))


def test_a_multi_file_torrent_lists_its_files_under_the_root_without_pad_files(tmp_path: Path) -> None:
    a, pad, b = b"a" * 20000, b"\0" * (2 * PIECE - 20000), b"b" * 5000
    info = _v1_info([([b"sub", b"a.bin"], a, False), ([b".pad", b"12768"], pad, True), ([b"b.bin"], b, False)])
    path, btih = _write(tmp_path, info)
    meta = read_torrent_file(path)
    assert meta.name == "model"
    assert meta.files == (("sub/a.bin", 20000), ("b.bin", 5000))
    assert meta.total_size == 25000
    assert meta.piece_length == PIECE
    assert (meta.btih, meta.btmh) == (btih, None)
    assert meta.describe() == f"model, 2 files, btih:{btih}"
    ti = load_torrent_info(path)
    assert root_prefix(ti) == "model/"
    assert hash_of(ti) == btih


def test_a_single_file_torrent_has_no_root_folder(tmp_path: Path) -> None:
    data = b"z" * 1000
    info = {b"name": b"weights.bin", b"piece length": PIECE, b"length": len(data),
            b"pieces": hashlib.sha1(data).digest()}
    path, btih = _write(tmp_path, info)
    meta = read_torrent_file(path)
    assert meta.files == (("weights.bin", 1000),)
    assert root_prefix(load_torrent_info(path)) == ""
    assert meta.btih == btih


def test_an_unreadable_or_garbage_torrent_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="Cannot read torrent file") as ei:
        load_torrent_info(tmp_path / "missing.torrent")
    assert ei.value.exit_code == 2
    junk = tmp_path / "junk.torrent"
    junk.write_bytes(b"this is not bencode")
    with pytest.raises(UsageError, match="Cannot read torrent file"):
        load_torrent_info(junk)


def test_a_hostile_torrent_file_is_refused_when_read(tmp_path: Path) -> None:
    path, _ = _write(tmp_path, _v1_info([([b"..", b"evil.bin"], b"x" * 10, False)]))
    with pytest.raises(HostileContentError):
        read_torrent_file(path)


def test_whitelist_lines_are_40_hex_each_the_v2_hash_cut_to_20_bytes_without_duplicates() -> None:
    v1, v2 = "ab" * 20, "cd" * 32
    assert whitelist_lines(v1, None) == [v1]
    assert whitelist_lines(None, v2) == ["cd" * 20]
    assert whitelist_lines(v1, v2) == [v1, "cd" * 20]
    assert whitelist_lines("cd" * 20, v2) == ["cd" * 20]  # the same 40 hex once
    assert whitelist_lines(None, None) == []


def test_describe_names_the_hashes_a_torrent_has() -> None:
    from provision.stages.fetch.torrent.meta import TorrentMeta

    v1, v2 = "ab" * 20, "cd" * 32
    both = TorrentMeta(name="m", files=(("a", 1), ("b", 2)), btih=v1, btmh=v2, piece_length=PIECE, total_size=3)
    assert both.describe() == f"m, 2 files, btih:{v1} btmh:{v2}"
    only_v2 = TorrentMeta(name="m", files=(("a", 1),), btih=None, btmh=v2, piece_length=PIECE, total_size=1)
    assert only_v2.describe() == f"m, 1 files, btmh:{v2}"
