"""The verify digests and content checks against independent implementations and exact messages.

``merkle_root_file`` (BEP 52 pieces root) is compared with the pieces root libtorrent writes into
a v2 torrent it creates, across the sizes where the tree shape changes; ``git_blob_sha1`` with
``git hash-object``; the v1/v2 checks with hand-made authorities whose expected outcome is
worked out in the test.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import libtorrent as lt
import pytest

from provision.errors import HashMismatchError
from provision.stages.verify.authority import Authority
from provision.stages.verify.content import hash_check, v1_check, v2_check
from provision.stages.verify.digests import (
    ZERO,
    git_blob_sha1,
    merkle_reduce,
    merkle_root_file,
    pad_hash,
    v2_geometry,
)
from provision.stages.verify.parallel import FileWork
from provision.testing.ci import require_tool

BLOCK = 16384


def _libtorrent_pieces_root(path: Path) -> bytes:
    """The v2 pieces root libtorrent computes for ``path`` (a v2-only torrent of that one file)."""
    ct = lt.create_torrent([lt.create_file_entry(path.name, path.stat().st_size)], 0, lt.create_torrent.v2_only)
    lt.set_piece_hashes(ct, str(path.parent))
    node = ct.generate()[b"info"][b"file tree"][path.name.encode()][b""]
    return bytes(node[b"pieces root"])


# sizes around every change of shape: one block, a partial second block, an odd number of
# blocks, exactly one 256-leaf chunk, one block past it (two chunks, padded subtree), three chunks
@pytest.mark.parametrize("size", [1, BLOCK - 1, BLOCK, BLOCK + 1, 5 * BLOCK + 7, 256 * BLOCK,
                                  256 * BLOCK + 1, 600 * BLOCK + 3])
def test_the_merkle_root_equals_the_pieces_root_libtorrent_writes(tmp_path: Path, size: int) -> None:
    p = tmp_path / f"f{size}.bin"
    p.write_bytes(os.urandom(size))
    assert merkle_root_file(p) == _libtorrent_pieces_root(p)


def test_a_chunk_root_is_the_same_through_a_buffer_that_splits_blocks_and_counts_its_bytes(tmp_path: Path) -> None:
    from provision.stages.verify.digests import v2_chunk_root

    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom(3 * BLOCK + 5))  # one chunk of 4 leaves
    counted: list[int] = []
    odd = v2_chunk_root(p, 0, 4, bytearray(10000), on_bytes=counted.append)  # reads end mid-block
    assert odd == v2_chunk_root(p, 0, 4, bytearray(1 << 20)) == _libtorrent_pieces_root(p)
    assert sum(counted) == 3 * BLOCK + 5


def test_an_empty_file_has_no_merkle_root(tmp_path: Path) -> None:
    p = tmp_path / "empty"
    p.write_bytes(b"")
    assert merkle_root_file(p) is None


@pytest.mark.parametrize(("size", "geometry"), [
    (1, (1, 1, 1)), (BLOCK, (1, 1, 1)), (BLOCK + 1, (1, 2, 2)), (3 * BLOCK, (1, 4, 4)),
    (256 * BLOCK, (1, 256, 256)), (257 * BLOCK, (2, 256, 512)), (600 * BLOCK, (3, 256, 1024)),
])
def test_v2_geometry_counts_chunks_leaves_per_chunk_and_padded_leaves(size: int,
                                                                       geometry: tuple[int, int, int]) -> None:
    # blocks = ceil(size / 16 KiB); leaves = next power of two; a chunk is min(256, leaves)
    assert v2_geometry(size) == geometry


def test_pad_hashes_are_roots_of_all_zero_subtrees() -> None:
    z1 = hashlib.sha256(bytes(64)).digest()
    assert pad_hash(0) == bytes(32) == ZERO
    assert pad_hash(1) == z1
    assert pad_hash(2) == hashlib.sha256(z1 + z1).digest()


def test_merkle_reduce_pads_the_bottom_row_to_the_width() -> None:
    a, b, c = (hashlib.sha256(x).digest() for x in (b"a", b"b", b"c"))
    ab = hashlib.sha256(a + b).digest()
    cz = hashlib.sha256(c + ZERO).digest()
    assert merkle_reduce([a, b, c], 4, ZERO) == hashlib.sha256(ab + cz).digest()
    assert merkle_reduce([a], 1, ZERO) == a


def test_git_blob_sha1_equals_git_hash_object(tmp_path: Path) -> None:
    require_tool("git")
    for name, data in (("empty", b""), ("text", b"hello\n"), ("bin", os.urandom(70000))):
        p = tmp_path / name
        p.write_bytes(data)
        git = subprocess.run(["git", "hash-object", str(p)], capture_output=True, text=True, check=True,
                             timeout=30).stdout.strip()
        assert git_blob_sha1(p) == git


def _work(tmp_path: Path, data: bytes, auth: Authority) -> FileWork:
    p = tmp_path / "w.bin"
    p.write_bytes(data)
    return FileWork(rel="w.bin", path=p, size=len(data), auth=auth, want_sha256=False)


def test_a_hash_check_passes_on_equal_hex_and_names_both_and_the_authority_otherwise() -> None:
    auth = Authority(kind="manifest-sha256", sha256="aa" * 32)
    ok = hash_check("sha256", "m/x.bin", auth, "aa" * 32, "aa" * 32)
    assert ok.ok and ok.error is None and (ok.expected, ok.actual) == ("aa" * 32, "aa" * 32)
    bad = hash_check("sha256", "m/x.bin", auth, "aa" * 32, "bb" * 32)
    assert bad.ok is False and isinstance(bad.error, HashMismatchError) and bad.error.exit_code == 5
    assert bad.to_dict()["ok"] is False  # the JSON report says false, not null
    assert bad.message == f"m/x.bin: sha256 is {'bb' * 32} but the manifest-sha256 authority says {'aa' * 32}."
    assert bad.error.context == {"path": "m/x.bin", "expected": "aa" * 32, "actual": "bb" * 32,
                                 "authority": "manifest-sha256", "check": "sha256"}
    assert bad.authority == "manifest-sha256" and ok.authority == "manifest-sha256"
    missing = hash_check("md5", "x", auth, "cc" * 16, None)
    assert not missing.ok and "md5 is None" in missing.message


def test_v1_pieces_pass_when_none_is_bad_and_their_count_matches(tmp_path: Path) -> None:
    auth = Authority(kind="torrent-v1-pieces", piece_length=1000, piece_hashes=(b"x" * 20,) * 3)
    c = v1_check(_work(tmp_path, b"z" * 2500, auth))  # ceil(2500 / 1000) = 3 pieces
    assert c.ok and c.actual == "3 pieces ok" and c.name == "torrent-v1-pieces"


def test_v1_piece_count_mismatch_is_reported_before_bad_pieces(tmp_path: Path) -> None:
    auth = Authority(kind="torrent-v1-pieces", piece_length=1000, piece_hashes=(b"x" * 20,) * 2)
    w = _work(tmp_path, b"z" * 2001, auth)  # 3 pieces, 2 listed
    w.v1_bad = [0]
    c = v1_check(w)
    assert c.ok is False and (c.expected, c.actual) == (2, 3) and c.authority == "torrent-v1-pieces"
    assert (c.name, c.file) == ("torrent-v1-pieces", "w.bin")
    assert c.message == "w.bin spans 3 pieces of 1,000 bytes but the torrent-v1-pieces authority lists 2."
    assert c.error is not None and c.error.context == {"path": "w.bin", "expected": 2, "actual": 3,
                                                       "authority": "torrent-v1-pieces"}
    assert c.error.hint == "Delete it and fetch it again."


def test_v1_bad_pieces_name_the_first_and_its_byte_range_clipped_to_the_file(tmp_path: Path) -> None:
    auth = Authority(kind="torrent-v1-pieces", piece_length=1000, piece_hashes=(b"x" * 20,) * 3)
    w = _work(tmp_path, b"z" * 2500, auth)
    w.v1_bad = [2, 1]
    c = v1_check(w)
    assert c.ok is False and isinstance(c.error, HashMismatchError)
    assert c.message == ("w.bin: 2 of 3 pieces fail their SHA-1 (first: piece 1, bytes 1,000..2,000) "
                         "under the torrent-v1-pieces authority.")
    w.v1_bad = [2]
    assert "first: piece 2, bytes 2,000..2,500)" in v1_check(w).message  # the last piece ends at the file's end
    assert c.error.context == {"path": "w.bin", "bad_pieces": [1, 2], "authority": "torrent-v1-pieces"}
    assert (c.expected, c.actual) == ("3 pieces ok", "2 bad: [1, 2]")


def test_many_bad_pieces_are_listed_up_to_100_in_the_error_and_20_in_the_check(tmp_path: Path) -> None:
    auth = Authority(kind="torrent-v1-pieces", piece_length=10, piece_hashes=(b"x" * 20,) * 150)
    w = _work(tmp_path, b"z" * 1500, auth)
    w.v1_bad = list(range(150))
    c = v1_check(w)
    assert c.error is not None and c.error.context["bad_pieces"] == list(range(100))
    assert c.actual == f"150 bad: {list(range(20))}"
    assert c.message.startswith("w.bin: 150 of 150 pieces fail their SHA-1 (first: piece 0, bytes 0..10)")


def test_v2_check_reduces_the_chunk_roots_to_the_authoritys_root(tmp_path: Path) -> None:
    data = os.urandom(257 * BLOCK)  # two chunks
    w = _work(tmp_path, data, Authority(kind="torrent-v2-merkle"))
    root = _libtorrent_pieces_root(w.path)
    from provision.stages.verify.digests import v2_chunk_root

    buf = bytearray(1 << 20)
    w.v2_roots = {i: v2_chunk_root(w.path, i, 256, buf) for i in range(2)}
    w.auth = Authority(kind="torrent-v2-merkle", merkle_root=root)
    good = v2_check(w)
    assert good.ok and good.actual == root.hex() == good.expected and good.authority == "torrent-v2-merkle"
    assert good.name == "torrent-v2-merkle" and good.file == "w.bin"
    w.auth = Authority(kind="torrent-v2-merkle", merkle_root=bytes(32))
    bad = v2_check(w)
    assert not bad.ok and bad.message == f"w.bin: merkle root is {root.hex()} but the torrent-v2-merkle authority says {'00' * 32}."
    assert bad.error is not None and bad.error.context == {"path": "w.bin", "expected": "00" * 32,
                                                           "actual": root.hex(), "authority": "torrent-v2-merkle"}
    assert bad.authority == "torrent-v2-merkle" and (bad.expected, bad.actual) == ("00" * 32, root.hex())
    w.auth = Authority(kind="torrent-v2-merkle", merkle_root=root)
    w.v2_roots = {0: w.v2_roots[0]}  # a chunk missing: no root at all, never a partial one
    missing = v2_check(w)
    assert not missing.ok and missing.actual is None


def test_an_empty_file_passes_v2_only_without_a_root_or_with_the_zero_root(tmp_path: Path) -> None:
    for root, ok in ((None, True), (ZERO, True), (b"\x01" * 32, False)):
        c = v2_check(_work(tmp_path, b"", Authority(kind="torrent-v2-merkle", merkle_root=root)))
        assert c.ok is ok and c.actual is None


# ---- the folder scan, admission and the whole verify, on folders built here


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    (root / "sub").mkdir(parents=True)
    (root / "a.dat").write_bytes(b"aaaa")
    (root / "sub" / "b.dat").write_bytes(b"bb")
    (root / "w.pth").write_bytes(b"pickle")
    (root / "in-link").symlink_to(root / "a.dat")
    (root / "pickled-link.bin").symlink_to(root / "w.pth")
    (root / "dir-link").symlink_to(root / "sub")
    outside = tmp_path / "outside.dat"
    outside.write_bytes(b"o")
    (root / "out-link").symlink_to(outside)
    (root / "dangling").symlink_to(root / "nothing")
    os.mkfifo(root / "fifo")
    return root


def test_scan_classifies_every_entry_without_following_links(tmp_path: Path) -> None:
    from provision.stages.verify.scan import scan

    root = _folder(tmp_path)
    got = {e.rel: (e.kind, e.size) for e in scan(root)}
    assert got == {
        "a.dat": ("file", 4), "sub/b.dat": ("file", 2), "w.pth": ("pickle", None),
        "in-link": ("symlink-in", 4), "pickled-link.bin": ("pickle", None), "dir-link": ("dir-link", None),
        "out-link": ("symlink-out", None), "dangling": ("special", None), "fifo": ("special", None),
    }
    assert [e.rel for e in scan(root)] == sorted(got)
    readable = {e.rel for e in scan(root) if e.readable}
    assert readable == {"a.dat", "sub/b.dat", "in-link"}
    out = next(e for e in scan(root) if e.rel == "out-link")
    assert out.target == str((tmp_path / "outside.dat").resolve())


def test_hostile_checks_name_what_each_refused_entry_is(tmp_path: Path) -> None:
    from provision.stages.verify.scan import hostile_check, scan

    root = _folder(tmp_path)
    checks = {e.rel: hostile_check(e) for e in scan(root)}
    assert {r for r, c in checks.items() if c is None} == {"a.dat", "sub/b.dat", "in-link", "dir-link"}
    pick = checks["w.pth"]
    assert pick is not None and not pick.ok and pick.name == "hostile" and pick.actual == "pickle"
    assert pick.message.startswith("Refusing w.pth: it is a pickle format (.pth), which can run code")
    out = checks["out-link"]
    target = str((tmp_path / "outside.dat").resolve())
    assert out is not None and out.message == f"Refusing out-link: it is a symlink that leaves the model folder (to {target})."
    assert out.actual == f"symlink -> {target}"
    fifo = checks["fifo"]
    assert fifo is not None and fifo.actual == "special" and "not a regular file" in fifo.message
    for c in checks.values():
        if c is not None:
            assert c.error is not None and c.error.exit_code == 5


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_admission_reports_missing_folders_sizes_and_statuses_with_exact_messages(tmp_path: Path) -> None:
    from provision.stages.verify.verifier import verify_files

    root = _folder(tmp_path)
    A = Authority
    rep = verify_files(root, {
        "a.dat": A(kind="manifest-sha256", size=4, sha256=_sha(b"aaaa").upper()),
        "sub/b.dat": A(kind="manifest-sha256", size=3),
        "gone.dat": A(kind="manifest-sha256", size=6),
        "gone2.dat": A(kind="hub-lfs-sha256"),
        "sub": A(kind="manifest-sha256"),
        "in-link": A(kind="git-blob-sha1", git_sha1=git_blob_sha1(root / "a.dat").upper()),
    }, structure=False, workers=1)
    status = {f.path: f.status for f in rep.files}
    assert status["a.dat"] == "ok" and status["in-link"] == "ok"
    assert status["sub/b.dat"] == "failed" and status["gone.dat"] == "missing" and status["sub"] == "missing"
    assert status["w.pth"] == "refused" and status["fifo"] == "refused" and status["dir-link"] == "unlisted"
    msgs = {(c.name, c.file): c.message for c in rep.failures}
    assert msgs[("size", "sub/b.dat")] == "sub/b.dat is 2 bytes but the manifest-sha256 authority says 3."
    assert msgs[("present", "gone.dat")] == "gone.dat is missing; the manifest-sha256 authority expects a file of 6 bytes."
    assert msgs[("present", "gone2.dat")] == "gone2.dat is missing; the hub-lfs-sha256 authority expects a file."
    assert msgs[("present", "sub")] == "sub is a folder; the manifest-sha256 authority expects a file."
    a = rep.file("a.dat")
    assert a is not None and (a.size, a.sha256, a.sha256_source) == (4, _sha(b"aaaa"), "read")
    assert not any(c.file == "sub/b.dat" and c.name == "sha256" for c in rep.checks)  # no hashing after a bad size
    assert rep.facts["a.dat"] == (4, _sha(b"aaaa")) and "sub/b.dat" not in rep.facts


def test_expected_hostile_paths_and_pickles_are_refused_without_reading(tmp_path: Path) -> None:
    from provision.stages.verify.verifier import verify_files

    root = _folder(tmp_path)
    rep = verify_files(root, {"../outside.dat": Authority(kind="manifest-sha256"),
                              "new.pt": Authority(kind="manifest-sha256")}, structure=False, workers=1)
    by = {(c.name, c.file): c for c in rep.failures}
    assert by[("hostile", "../outside.dat")].error is not None
    assert by[("hostile", "new.pt")].message == ("Refusing new.pt: it is a pickle format; provision reads "
                                                 "safetensors only and never opens it.")
    assert rep.file("new.pt") is not None and rep.file("new.pt").status == "refused"  # type: ignore[union-attr]


def test_pickles_as_data_hashes_a_regular_pickle_but_never_a_linked_one(tmp_path: Path) -> None:
    from provision.stages.verify.verifier import verify_files

    root = _folder(tmp_path)
    rep = verify_files(root, {"w.pth": Authority(kind="manifest-sha256", sha256=_sha(b"pickle")),
                              "pickled-link.bin": Authority(kind="manifest-sha256")},
                       structure=False, workers=1, pickles_as_data=True)
    w = rep.file("w.pth")
    assert w is not None and w.status == "ok" and w.sha256 == _sha(b"pickle")
    link = rep.file("pickled-link.bin")
    assert link is not None and link.status == "refused"


def test_a_fetcher_hash_stands_in_for_the_read_but_is_still_compared(tmp_path: Path) -> None:
    from provision.stages.verify.verifier import verify_files

    root = tmp_path / "m"
    root.mkdir()
    (root / "a.dat").write_bytes(b"aaaa")
    auth = {"a.dat": Authority(kind="manifest-sha256", sha256=_sha(b"aaaa"))}
    rep = verify_files(root, auth, known_sha256={"./a.dat": _sha(b"aaaa").upper()}, structure=False, workers=1)
    a = rep.file("a.dat")
    assert rep.ok and a is not None and a.sha256_source == "fetcher" and a.sha256 == _sha(b"aaaa")
    assert rep.bytes_hashed == 0  # nothing read: the fetcher's hash stood in
    bad = verify_files(root, auth, known_sha256={"a.dat": "00" * 32}, structure=False, workers=1)
    assert [c.name for c in bad.failures] == ["sha256"] and bad.failures[0].actual == "00" * 32


def test_md5_is_checked_when_the_authority_sets_it(tmp_path: Path) -> None:
    from provision.stages.verify.verifier import verify_files

    root = tmp_path / "m"
    root.mkdir()
    (root / "t.model").write_bytes(b"tok")
    good = verify_files(root, {"t.model": Authority(kind="manifest-md5", md5=hashlib.md5(b"tok").hexdigest().upper())},
                        structure=False, workers=1)
    assert good.ok and [c.name for c in good.checks] == ["present", "md5"]
    bad = verify_files(root, {"t.model": Authority(kind="manifest-md5", md5="0" * 32)}, structure=False, workers=1)
    assert not bad.ok and bad.failures[0].name == "md5"


def test_a_root_that_is_not_a_folder_is_a_usage_error(tmp_path: Path) -> None:
    from provision.errors import UsageError
    from provision.stages.verify.verifier import verify_files

    f = tmp_path / "file"
    f.write_bytes(b"")
    for bad in (f, tmp_path / "missing"):
        with pytest.raises(UsageError, match="is not a folder") as ei:
            verify_files(bad, {})
        assert ei.value.exit_code == 2


def test_the_worker_count_is_at_least_one(tmp_path: Path) -> None:
    from provision.stages.verify.verifier import verify_files

    assert verify_files(tmp_path, {}, workers=3).workers == 3
    assert verify_files(tmp_path, {}, workers=0).workers >= 1


@pytest.mark.parametrize(("rels", "weights"), [
    (["consolidated.safetensors", "extra.safetensors", "params.json"], ["consolidated.safetensors"]),
    (["a.safetensors", "b.safetensors", "params.json"], ["a.safetensors", "b.safetensors"]),
    (["a.safetensors", "config.json", "params.json"], []),
    (["model-1.safetensors", "model.safetensors.index.json"], []),
    (["sub/consolidated.safetensors", "x.bin"], []),
])
def test_mistral_weights_are_consolidated_files_else_top_level_ones_unless_hf(rels: list[str],
                                                                              weights: list[str]) -> None:
    from provision.stages.verify.structure import mistral_weights

    assert mistral_weights(rels) == weights
