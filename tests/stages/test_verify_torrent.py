"""Torrent authorities: our v1 piece and v2 merkle checks agree with libtorrent's own hashes
(torrents built offline with ``create_torrent``; no session, no network), split a file into
piece ranges hashed in parallel, and name the bad piece when a byte flips."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

import provision.stages.verify.parallel as parallel
from provision.errors import HashMismatchError
from provision.stages.verify import Authority, merkle_root_file, verify_files
from tests.support.files import flip_byte, snapshot

PIECE = 32 * 1024
SIZES = {"a.safetensors.part": 100_000, "b.json": 50_000, "c.bin.txt": 16_384, "d": 5 * (1 << 20) + 12_345,
         "e": 1}


@pytest.fixture()
def payload(tmp_path: Path) -> Path:
    root = tmp_path / "t"
    root.mkdir()
    for i, (name, size) in enumerate(SIZES.items()):
        (root / name).write_bytes(os.urandom(size) if i % 2 else bytes([i]) * size)
    return root


def _torrent(root: Path, flags: int) -> Any:
    import warnings

    import libtorrent as lt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        fs = lt.file_storage()
        lt.add_files(fs, str(root))
        ct = lt.create_torrent(fs, PIECE, flags=flags)
        lt.set_piece_hashes(ct, str(root.parent))
        return lt.torrent_info(ct.generate())


def _v1_authorities(root: Path) -> dict[str, Authority]:
    import warnings

    import libtorrent as lt

    ti = _torrent(root, lt.create_torrent.v1_only | lt.create_torrent.canonical_files)
    out: dict[str, Authority] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        fs = ti.files()
        for i in range(fs.num_files()):
            if fs.file_flags(i) & fs.flag_pad_file:
                continue
            size = fs.file_size(i)
            first = ti.map_file(i, 0, 0).piece
            n = -(-size // PIECE)
            hashes = tuple(bytes(ti.hash_for_piece(p)) for p in range(first, first + n))
            rel = fs.file_path(i).split("/", 1)[1]
            out[rel] = Authority("torrent-v1-pieces", size=size, piece_length=PIECE, piece_hashes=hashes)
    return out


def _v2_authorities(root: Path) -> dict[str, Authority]:
    import warnings

    import libtorrent as lt

    ti = _torrent(root, lt.create_torrent.v2_only)
    out: dict[str, Authority] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        fs = ti.files()
        for i in range(fs.num_files()):
            if fs.file_flags(i) & fs.flag_pad_file:
                continue
            rel = fs.file_path(i).split("/", 1)[1]
            out[rel] = Authority("torrent-v2-merkle", size=fs.file_size(i), piece_length=PIECE,
                                 merkle_root=fs.root(i).to_bytes())
    return out


def test_merkle_root_equals_libtorrent_pieces_root(payload: Path) -> None:
    auths = _v2_authorities(payload)
    assert set(auths) == set(SIZES)
    for rel, a in auths.items():
        assert merkle_root_file(payload / rel) == a.merkle_root, rel


@pytest.mark.parametrize("build", [_v1_authorities, _v2_authorities], ids=["v1", "v2"])
def test_torrent_authorities_verify_clean_and_are_named(payload: Path, build: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "SPLIT_UNIT_BYTES", 2 * PIECE)  # several independent ranges per file
    auths = build(payload)
    rep = verify_files(payload, auths, workers=3)
    rep.raise_for_failure()
    kind = next(iter(auths.values())).kind
    assert {f.authority for f in rep.files} == {kind}
    assert any(c.name == kind and c.ok for c in rep.checks)
    for f in rep.files:  # the whole-file sha256 is reported even under a torrent authority
        assert f.sha256 == hashlib.sha256((payload / f.path).read_bytes()).hexdigest()


@pytest.mark.parametrize("build", [_v1_authorities, _v2_authorities], ids=["v1", "v2"])
def test_flipped_byte_under_torrent_authority_names_the_file_and_piece(payload: Path, build: Any,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "SPLIT_UNIT_BYTES", 2 * PIECE)
    auths = build(payload)
    flip_byte(payload / "d", 3 * PIECE + 7)
    before = snapshot(payload)
    rep = verify_files(payload, auths, workers=2)
    assert snapshot(payload) == before
    [fail] = rep.failures
    assert fail.file == "d" and fail.authority == next(iter(auths.values())).kind
    if fail.name == "torrent-v1-pieces":
        assert "piece 3" in fail.message
        assert fail.error is not None and fail.error.context["bad_pieces"] == [3]
    with pytest.raises(HashMismatchError):
        rep.raise_for_failure()


def test_v1_pieces_without_padding_accept_a_short_last_piece(tmp_path: Path) -> None:
    d = tmp_path / "x"
    d.mkdir()
    data = os.urandom(PIECE * 2 + 100)
    (d / "f").write_bytes(data)
    hashes = tuple(hashlib.sha1(data[i:i + PIECE]).digest() for i in range(0, len(data), PIECE))
    assert verify_files(d, {"f": Authority("torrent-v1-pieces", piece_length=PIECE, piece_hashes=hashes)}).ok
    # a zero-padded last piece is accepted only when the size is pinned (else trailing zeros could be cut)
    padded = (*hashes[:-1], hashlib.sha1(data[2 * PIECE:] + bytes(PIECE - 100)).digest())
    assert verify_files(d, {"f": Authority("torrent-v1-pieces", size=len(data), piece_length=PIECE,
                                           piece_hashes=padded)}).ok
    assert not verify_files(d, {"f": Authority("torrent-v1-pieces", piece_length=PIECE,
                                               piece_hashes=padded)}).ok


def test_v1_piece_count_mismatch_fails(tmp_path: Path) -> None:
    d = tmp_path / "x"
    d.mkdir()
    (d / "f").write_bytes(b"a" * (PIECE + 1))
    rep = verify_files(d, {"f": Authority("torrent-v1-pieces", piece_length=PIECE, piece_hashes=(b"\0" * 20,))})
    [fail] = rep.failures
    assert "spans 2 pieces" in fail.message and "lists 1" in fail.message
