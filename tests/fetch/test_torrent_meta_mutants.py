"""A bare magnet's file list learnt from peers (``magnet_listing``), and how it gives up.

Gaps the mutation run of ``stages/fetch/torrent/meta.py`` showed: the listing and its stall
were reached only by slow tests outside the unit selection. All on loopback in closed mode; the
expected sizes are the files' own sizes on disk, the expected hashes those the seeder published.
"""

from __future__ import annotations

import time
from pathlib import Path

import libtorrent as lt
import pytest

from provision.errors import StallError
from provision.formats.sources import build_magnet
from provision.stages.fetch.torrent.meta import magnet_listing
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
