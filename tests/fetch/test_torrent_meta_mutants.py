"""A bare magnet's file list learnt from peers (``magnet_listing``), how it gives up, and what
each name refusal says.

Gaps the mutation run of ``stages/fetch/torrent/meta.py`` showed: the listing and its stall
were reached only by slow tests outside the unit selection. All on loopback in closed mode; the
expected sizes are the files' own sizes on disk, the expected hashes those the seeder published.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import libtorrent as lt
import pytest

from provision.errors import HostileContentError, StallError, UsageError
from provision.formats.sources import build_magnet
from provision.stages.fetch.torrent.meta import (
    check_component,
    check_info_names,
    check_path_length,
    load_torrent_info,
    magnet_listing,
    read_torrent_file,
)
from provision.stages.fetch.torrent.session import (
    NOT_STARTED,
    close_session,
    closed_flags,
    open_session,
    session_settings,
)
from provision.testing.torrent_fixtures import seed_thread

TINY_FILES = ("consolidated.safetensors", "params.json", "tekken.json")


def test_a_magnet_without_peers_is_listed_from_a_peer_given_apart(tiny_src: Path) -> None:
    with seed_thread(tiny_src) as info:
        bare = build_magnet(btih=info.btih, btmh=info.btmh, name=info.name)  # no x.pe, no tracker
        listing = magnet_listing(bare, timeout=30, network="closed", peers=[info.listen])
    on_disk = {p.name: p.stat().st_size for p in tiny_src.iterdir() if p.is_file()}
    assert all(extra is None for _, _, extra in listing)
    got = {p: s for p, s, _ in listing}
    assert set(got) == set(on_disk)  # every file, pad files left out, paths under the root folder
    assert all(got[rel] == on_disk[rel] for rel in TINY_FILES)


def test_nobody_answering_is_a_stall_after_the_timeout_naming_no_peers() -> None:
    btih = "ab" * 20
    t0 = time.monotonic()
    with pytest.raises(StallError) as ei:
        magnet_listing(f"magnet:?xt=urn:btih:{btih}&dn=nobody", timeout=1, network="closed")
    waited = time.monotonic() - t0
    assert waited >= 1  # it waited the whole timeout, not a poll less
    assert ei.value.exit_code == 4
    assert str(ei.value).startswith("No peers found for ")
    assert " in 1 s." in str(ei.value) and btih in str(ei.value)
    assert ei.value.context["peers"] == 0 and ei.value.context["infohash"] == btih
    assert "--network public" in (ei.value.hint or "")


def test_a_peer_without_the_metadata_is_a_stall_that_counts_it() -> None:
    """A second session holding the same bare magnet connects but has no metadata to give."""
    btih = "cd" * 20
    uri = f"magnet:?xt=urn:btih:{btih}&dn=nometa"
    settings = session_settings("closed")
    other = open_session(settings)
    try:
        atp = lt.parse_magnet_uri(uri)
        atp.save_path = "/nonexistent-provision-test"  # never written: it never gets the metadata
        atp.flags = (int(atp.flags) & ~int(NOT_STARTED)) | closed_flags("closed")  # started, as a fetch's
        other.add_torrent(atp)
        port = int(other.listen_port())
        with pytest.raises(StallError) as ei:
            magnet_listing(uri, timeout=3, network="closed", peers=[f"127.0.0.1:{port}"])
    finally:
        close_session(other)
    assert str(ei.value).startswith("No metadata from 1 peers for "), str(ei.value)
    assert ei.value.context["peers"] == 1


# ---------------------------------------------------------------------------------------
# what a refusal says (the one line a user reads, and the context the --json report carries)

PIECE = 16384


def _info(path: list[bytes], name: bytes = b"model") -> dict[bytes, Any]:
    data = b"x" * 10
    return {b"name": name, b"piece length": PIECE, b"pieces": hashlib.sha1(data).digest(),
            b"files": [{b"length": len(data), b"path": path}]}


def test_a_hostile_torrent_name_and_file_name_are_each_named_as_such() -> None:
    with pytest.raises(HostileContentError) as ei:
        check_info_names(lt.bencode(_info([b"a.bin"], name=b"..")))
    assert ei.value.message.startswith("Refusing the torrent: the torrent name '..' would leave")
    with pytest.raises(HostileContentError) as ei:
        check_info_names(lt.bencode(_info([b"ok", b"\xff"])))
    assert ei.value.message == "Refusing the torrent: the file name b'\\xff' is not valid UTF-8."
    v2: Any = {b"name": b"model", b"piece length": PIECE, b"meta version": 2,
          b"file tree": {b"\xfe.bin": {b"": {b"length": 1}}}}
    with pytest.raises(HostileContentError) as ei:
        check_info_names(lt.bencode(v2))
    assert ei.value.message == "Refusing the torrent: the file name b'\\xfe.bin' is not valid UTF-8."


def test_an_over_long_component_says_its_length_and_the_limit_and_keeps_200_bytes_of_it() -> None:
    part = "a" * 300  # 300 bytes: over NAME_MAX = 255 (Linux)
    with pytest.raises(HostileContentError) as ei:
        check_component(part, "file name")
    assert ei.value.message == ("Refusing the torrent: a file name is 300 bytes long, over the 255-byte limit of "
                                f"a file name ({'a' * 40!r}...).")
    assert ei.value.hint == "Do not use this torrent; ask its publisher for one with shorter names."
    assert ei.value.context["path"] == "a" * 200
    check_component("é" * 127, "file name")  # 254 bytes in UTF-8: under the limit
    with pytest.raises(HostileContentError, match="256 bytes long"):
        check_component("é" * 128, "file name")  # 128 characters, 256 bytes


def test_an_over_long_path_says_its_length_and_keeps_200_bytes_of_it() -> None:
    parts = ["d" * 200] * 18  # 18 * 200 + 17 separators = 3617 bytes > 4096 - 512 = 3584
    with pytest.raises(HostileContentError) as ei:
        check_path_length(parts)
    assert ei.value.message.startswith("Refusing the torrent: a file path is 3617 bytes long, over the 3584-byte "
                                       "limit (4096 for a whole path, 512 kept for the destination)")
    assert ei.value.hint == "Do not use this torrent; ask its publisher for one with shorter paths."
    assert ei.value.context["path"] == "d" * 200
    check_path_length(["d" * 200] * 17 + ["e" * 166])  # 3400 + 166 + 17 separators = 3583 bytes: accepted


def test_a_garbage_torrent_file_hints_at_a_truncated_download(tmp_path: Path) -> None:
    junk = tmp_path / "junk.torrent"
    junk.write_bytes(b"d4:infoi1e")  # bencode, but cut short
    with pytest.raises(UsageError) as ei:
        load_torrent_info(junk)
    assert ei.value.hint == "Is it a complete .torrent file?"


def test_a_hybrid_torrent_reports_both_hashes_computed_from_its_info_dictionary(tmp_path: Path) -> None:
    """BEP 3: btih = sha1(bencoded info); BEP 52: btmh = sha256(bencoded info)."""
    (tmp_path / "w.bin").write_bytes(bytes(range(256)) * 100)
    ct = lt.create_torrent([lt.create_file_entry("w.bin", 25600)], PIECE)  # hybrid (v1 + v2) by default
    lt.set_piece_hashes(ct, str(tmp_path))
    data = lt.bencode(ct.generate())
    path = tmp_path / "m.torrent"
    path.write_bytes(data)
    decoded: Any = lt.bdecode(data)
    raw_info = lt.bencode(decoded[b"info"])
    meta = read_torrent_file(path)
    assert meta.btih == hashlib.sha1(raw_info).hexdigest()
    assert meta.btmh == hashlib.sha256(raw_info).hexdigest()
    assert meta.files == (("w.bin", 25600),)


def test_listing_defaults_to_the_public_network_and_passes_its_listen_address_on() -> None:
    """Both show in the suite's safety net (PROVISION_FORBID_PUBLIC_NETWORK=1), which refuses
    the session before it opens: nothing leaves the machine."""
    uri = f"magnet:?xt=urn:btih:{'ef' * 20}"
    with pytest.raises(UsageError, match=r"refusing a public libtorrent session here \(enable_dht"):
        magnet_listing(uri, timeout=1)  # network="public" unless told
    with pytest.raises(UsageError, match=r"refusing a public libtorrent session here \(0\.0\.0\.0:0\)"):
        magnet_listing(uri, timeout=1, network="closed", listen="0.0.0.0:0")
