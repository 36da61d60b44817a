"""SOURCE parsing: magnets (btih hex/base32, btmh, dn, tr, x.pe, ws), hf://, .torrent, manifests."""

from __future__ import annotations

import base64

import pytest

from provision.errors import UsageError
from provision.formats.sources import build_magnet, parse_hf, parse_magnet, parse_peer, parse_source

PIXTRAL = (
    "magnet:?xt=urn:btih:7278e625de2b1da598b23954c13933047126238a&dn=pixtral-12b-240910"
    "&tr=udp%3A%2F%2Ftracker.opentrackr.org%3A1337%2Fannounce&tr=udp%3A%2F%2Fopen.demonii.com%3A1337%2Fannounce"
    "&tr=http%3A%2F%2Ftracker.ipv6tracker.org%3A80%2Fannounce"
)


def test_the_real_pixtral_magnet_parses_without_network() -> None:
    m = parse_magnet(PIXTRAL)
    assert m.btih == "7278e625de2b1da598b23954c13933047126238a"
    assert m.name == "pixtral-12b-240910"
    assert m.trackers == (
        "udp://tracker.opentrackr.org:1337/announce",
        "udp://open.demonii.com:1337/announce",
        "http://tracker.ipv6tracker.org:80/announce",
    )
    assert m.btmh is None and m.peers == ()


def test_base32_btih_is_decoded_to_hex() -> None:
    raw = bytes.fromhex("7278e625de2b1da598b23954c13933047126238a")
    m = parse_magnet("magnet:?xt=urn:btih:" + base64.b32encode(raw).decode())
    assert m.btih == raw.hex()


def test_v2_btmh_peers_and_web_seeds_are_parsed() -> None:
    h = "ab" * 32
    m = parse_magnet(f"magnet:?xt=urn:btmh:1220{h}&x.pe=127.0.0.1:6881&x.pe=[::1]:7000&ws=http%3A%2F%2F127.0.0.1%2Fx%2F")
    assert m.btmh == h and m.btih is None and m.infohash == h
    assert m.peers == ("127.0.0.1:6881", "[::1]:7000")
    assert m.web_seeds == ("http://127.0.0.1/x/",)


def test_hybrid_magnet_round_trips_through_build_magnet() -> None:
    uri = build_magnet(btih="11" * 20, btmh="22" * 32, name="a b", trackers=("http://127.0.0.1:6969/announce",),
                       peers=("127.0.0.1:1",), web_seeds=("http://127.0.0.1:8/r/",))
    m = parse_magnet(uri)
    assert (m.btih, m.btmh, m.name) == ("11" * 20, "22" * 32, "a b")
    assert m.trackers == ("http://127.0.0.1:6969/announce",) and m.peers == ("127.0.0.1:1",)


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("magnet:?dn=nothing", "no 'xt=urn:btih:'"),
        ("magnet:?xt=urn:btih:1234", "neither 40 hex nor 32 base32"),
        ("magnet:?xt=urn:btmh:1111" + "ab" * 32, "sha2-256 multihash"),
        ("magnet:?xt=urn:btih:" + "a" * 40 + "&x.pe=nohost", "Malformed peer address"),
        ("http://example/x", "Not a magnet link"),
    ],
)
def test_malformed_magnets_are_usage_errors(uri: str, needle: str) -> None:
    with pytest.raises(UsageError, match=needle) as ei:
        parse_magnet(uri)
    assert ei.value.exit_code == 2


def test_hf_sources_parse_repo_and_revision() -> None:
    assert parse_hf("hf://mistralai/Pixtral-12B-2409").revision is None
    ref = parse_hf("hf://mistralai/Pixtral-12B-2409@a9da202d8e3192195835f077c43435c8b22545ab")
    assert ref.repo == "mistralai/Pixtral-12B-2409" and ref.pinned
    assert not parse_hf("hf://org/repo@main").pinned


@pytest.mark.parametrize("bad", ["hf://noslash", "hf://a/b/c", "hf://org/repo@", "hf://../x"])
def test_malformed_hf_sources_are_usage_errors(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_hf(bad)


def test_parse_source_classifies_every_kind(tmp_path) -> None:  # type: ignore[no-untyped-def]
    t = tmp_path / "x.torrent"
    t.write_bytes(b"d4:infod4:name1:aee")
    assert parse_source(PIXTRAL).kind == "magnet"
    assert parse_source("hf://a/b").kind == "hf"
    assert parse_source(str(t)).kind == "torrent"
    assert parse_source("pixtral-12b-2409").kind == "manifest"
    with pytest.raises(UsageError, match="not found"):
        parse_source(str(tmp_path / "missing.torrent"))
    with pytest.raises(UsageError, match="URL sources"):
        parse_source("https://example.org/model")


def test_parse_peer_splits_host_and_port() -> None:
    assert parse_peer("127.0.0.1:6881") == ("127.0.0.1", 6881)
    assert parse_peer("[::1]:7") == ("::1", 7)
    with pytest.raises(UsageError):
        parse_peer("127.0.0.1:99999")
