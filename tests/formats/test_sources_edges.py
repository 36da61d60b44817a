"""SOURCE parsing edge by edge: magnet keys, case, numbered keys, repeated hashes, peers and
hf:// references, each with the reason it gives.

Expected values are written here (hex worked out from the bytes with ``bytes.hex`` and
``base64.b32encode``); nothing is read back from the parser to build an expectation.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from provision.errors import UsageError
from provision.formats.sources import (
    HFRef,
    Magnet,
    build_magnet,
    parse_hf,
    parse_magnet,
    parse_peer,
    parse_source,
)

H1 = "0123456789abcdef0123456789abcdef01234567"
H2 = "89abcdef0123456789abcdef0123456789abcdef"
V2 = "fe" * 32


def test_the_scheme_and_the_xt_kinds_are_case_insensitive_and_hex_is_lowercased() -> None:
    m = parse_magnet(f"MAGNET:?XT=URN:BTIH:{H1.upper()}")
    assert m.btih == H1 and m.btmh is None
    m2 = parse_magnet(f"magnet:?xt=URN:BTMH:1220{V2.upper()}")
    assert m2.btmh == V2


def test_numbered_xt_and_tr_keys_are_read_like_plain_ones() -> None:
    m = parse_magnet(f"magnet:?xt.1=urn:btih:{H1}&xt.2=urn:btmh:1220{V2}&tr.1=udp%3A%2F%2Fa%3A1&tr.2=http%3A%2F%2Fb%2Fann")
    assert (m.btih, m.btmh) == (H1, V2)
    assert m.trackers == ("udp://a:1", "http://b/ann")


def test_base32_is_accepted_in_lower_case_too() -> None:
    raw = bytes.fromhex(H1)
    b32 = base64.b32encode(raw).decode()
    assert len(b32) == 32
    assert parse_magnet(f"magnet:?xt=urn:btih:{b32.lower()}").btih == H1


def test_the_same_hash_twice_is_one_hash_and_two_different_ones_are_refused() -> None:
    b32 = base64.b32encode(bytes.fromhex(H1)).decode()
    assert parse_magnet(f"magnet:?xt=urn:btih:{H1}&xt=urn:btih:{b32}").btih == H1
    with pytest.raises(UsageError, match=f"two different btih infohashes \\({H1} and {H2}\\)") as ei:
        parse_magnet(f"magnet:?xt=urn:btih:{H1}&xt=urn:btih:{H2}")
    assert ei.value.exit_code == 2 and ei.value.hint is not None and "one infohash per kind" in ei.value.hint
    with pytest.raises(UsageError, match="two different btmh infohashes"):
        parse_magnet(f"magnet:?xt=urn:btmh:1220{V2}&xt=urn:btmh:1220{'ab' * 32}")


def test_other_xt_kinds_and_unknown_keys_are_ignored() -> None:
    m = parse_magnet(f"magnet:?xt=urn:ed2k:31D6CFE0D16AE931B73C59D7E0C089C0&xt=urn:btih:{H1}&kt=x&as=y")
    assert m == Magnet(uri=m.uri, btih=H1)


def test_a_blank_display_name_and_spaces_around_the_hash() -> None:
    m = parse_magnet(f"magnet:?xt=+urn:btih:{H1}+&dn=")
    assert m.btih == H1 and m.name == ""


@pytest.mark.parametrize(("bad", "needle"), [
    (f"magnet:?xt=urn:btih:{H1}0", "is neither 40 hex nor 32 base32 characters"),
    ("magnet:?xt=urn:btih:" + "1" * 32, "is neither 40 hex nor 32 base32 characters"),  # 1 is not base32
    (f"magnet:?xt=urn:btmh:1220{V2}00", "is not a sha2-256 multihash (1220 + 64 hex)"),
    (f"magnet:?xt=urn:btmh:1114{V2}", "is not a sha2-256 multihash"),
    ("magnet:xt=urn:btih:" + H1, "Not a magnet link"),
    ("magnet:?", "it has no 'xt=urn:btih:' or 'xt=urn:btmh:' infohash"),
])
def test_malformed_hashes_and_missing_ones_are_usage_errors(bad: str, needle: str) -> None:
    with pytest.raises(UsageError) as ei:
        parse_magnet(bad)
    assert needle in str(ei.value) and ei.value.exit_code == 2


def test_a_missing_infohash_error_says_how_to_fix_it() -> None:
    with pytest.raises(UsageError) as ei:
        parse_magnet("magnet:?dn=x")
    assert ei.value.hint == "Copy the whole link, including the xt= part."


def test_a_long_non_magnet_is_quoted_shortened_in_the_error() -> None:
    with pytest.raises(UsageError) as ei:
        parse_magnet("x" * 100)
    assert f"{'x' * 60!r}" in str(ei.value) and "x" * 61 not in str(ei.value)


@pytest.mark.parametrize(("peer", "host", "port"), [
    ("127.0.0.1:1", "127.0.0.1", 1), ("host-a.example:65535", "host-a.example", 65535),
    ("[::1]:6881", "::1", 6881), (" 10.0.0.2:80 ", "10.0.0.2", 80),
    ("Seed-A.Example:7", "Seed-A.Example", 7), ("[::FFFF:7f00:1]:9", "::FFFF:7f00:1", 9),
    ("Xeon-1:80", "Xeon-1", 80),  # only the brackets of an IPv6 address are stripped, never letters
])
def test_peers_parse_host_and_port_at_the_bounds(peer: str, host: str, port: int) -> None:
    assert parse_peer(peer) == (host, port)


@pytest.mark.parametrize("bad", ["127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1", ":80", "a b:1", "h:123456",
                                 "[zz]:1", "h:-1"])
def test_bad_peers_are_refused_naming_where_they_came_from(bad: str) -> None:
    with pytest.raises(UsageError, match=r"in --peer \(expected HOST:PORT\)"):
        parse_peer(bad)
    with pytest.raises(UsageError, match=r"in magnet x\.pe"):
        parse_magnet(f"magnet:?xt=urn:btih:{H1}&x.pe={bad}")


def test_build_magnet_writes_each_part_only_when_given_and_quotes_names() -> None:
    assert build_magnet(btih=H1, btmh=None) == f"magnet:?xt=urn:btih:{H1}"
    assert build_magnet(btih=None, btmh=V2) == f"magnet:?xt=urn:btmh:1220{V2}"
    uri = build_magnet(btih=H1, btmh=V2, name="a/b c&d", trackers=("udp://t:1/a",), peers=("127.0.0.1:5",),
                       web_seeds=("http://w/x y",))
    assert uri == (f"magnet:?xt=urn:btih:{H1}&xt=urn:btmh:1220{V2}&dn=a%2Fb%20c%26d&tr=udp%3A%2F%2Ft%3A1%2Fa"
                   "&x.pe=127.0.0.1:5&ws=http%3A%2F%2Fw%2Fx%20y")
    m = parse_magnet(uri)
    assert (m.name, m.web_seeds, m.peers) == ("a/b c&d", ("http://w/x y",), ("127.0.0.1:5",))


def test_describe_and_infohash_prefer_v1() -> None:
    both = Magnet(uri="", btih=H1, btmh=V2, name="n")
    assert both.infohash == H1 and both.describe() == f"btih:{H1} btmh:{V2} (n)"
    v2 = Magnet(uri="", btmh=V2)
    assert v2.infohash == V2 and v2.describe() == f"btmh:{V2}"
    assert Magnet(uri="").infohash == ""


@pytest.mark.parametrize(("uri", "repo", "rev"), [
    ("hf://org/repo", "org/repo", None), ("hf://org/repo/", "org/repo", None),
    ("hf://Org-1/re.po_2@v1.0", "Org-1/re.po_2", "v1.0"), (f"hf://a/b@{H1}", "a/b", H1),
    ("hf://Xorg/repoX", "Xorg/repoX", None),  # only slashes are trimmed from the ends
])
def test_hf_references_split_repo_and_revision(uri: str, repo: str, rev: str | None) -> None:
    ref = parse_hf(uri)
    assert (ref.repo, ref.revision) == (repo, rev)
    assert ref.uri == (f"hf://{repo}" + (f"@{rev}" if rev else ""))


def test_only_a_full_40_hex_commit_is_pinned() -> None:
    assert HFRef("a/b", H1).pinned and HFRef("a/b", H1.upper()).pinned
    assert not HFRef("a/b", H1[:39]).pinned and not HFRef("a/b", "main").pinned and not HFRef("a/b").pinned


@pytest.mark.parametrize(("bad", "needle"), [
    ("hf:/org/repo", "Not a Hugging Face source"),
    ("hf://org/repo@", "Empty revision after '@'"),
    ("hf://-org/repo", "Malformed Hugging Face repo '-org/repo'"),
    ("hf://org/.repo", "Malformed Hugging Face repo"),
    ("hf://org", "Malformed Hugging Face repo 'org'"),
])
def test_malformed_hf_references_say_what_is_wrong(bad: str, needle: str) -> None:
    with pytest.raises(UsageError) as ei:
        parse_hf(bad)
    assert needle in str(ei.value)


def test_parse_source_keeps_the_stripped_text_and_routes_each_kind(tmp_path: Path) -> None:
    m = parse_source(f"  MAGNET:?xt=urn:btih:{H1}  ")
    assert m.kind == "magnet" and m.magnet is not None and m.magnet.btih == H1 and m.raw == f"MAGNET:?xt=urn:btih:{H1}"
    h = parse_source("hf://a/b@main")
    assert h.kind == "hf" and h.hf == HFRef("a/b", "main") and h.raw == "hf://a/b@main"
    t = tmp_path / "x.torrent"
    t.write_bytes(b"d4:infode")
    ts = parse_source(str(t))
    assert ts.kind == "torrent" and ts.torrent is not None and ts.torrent.path == t and ts.raw == str(t)
    man = parse_source("some/manifest.toml")
    assert man.kind == "manifest" and man.manifest is not None and man.manifest.ref == "some/manifest.toml"
    assert man.raw == "some/manifest.toml"
    for url in ("http://x/y", "https://x/y"):
        with pytest.raises(UsageError, match="URL sources are not supported") as ei:
            parse_source(url)
        assert ei.value.hint is not None and "magnet link" in ei.value.hint
    with pytest.raises(UsageError, match="Torrent file not found"):
        parse_source(str(tmp_path / "missing.torrent"))
