"""Judge a file's computed digests against what its authority vouches for.

Each function turns one comparison (a whole-file hash, the torrent v1 pieces, the torrent v2
merkle root) into a passed ``Check`` or a failed one carrying a ``HashMismatchError`` whose
message says what differs. It computes nothing from the file itself: ``parallel`` hashed it.
"""

from __future__ import annotations

from provision.errors import HashMismatchError
from provision.stages.verify.authority import Authority
from provision.stages.verify.digests import ZERO, v2_geometry, v2_root
from provision.stages.verify.parallel import FileWork
from provision.stages.verify.report import Check, CheckName


def hash_check(name: CheckName, rel: str, auth: Authority, expected: str, actual: str | None) -> Check:
    """A whole-file digest (sha256, git-sha1, md5) against the authority's ``expected`` hex."""
    if actual == expected:
        return Check(name, rel, True, auth.kind, expected, actual)
    err = HashMismatchError(
        f"{rel}: {name} is {actual} but the {auth.kind} authority says {expected}.",
        hint="The file is damaged or a different version; delete it and fetch it again.",
        path=rel, expected=expected, actual=actual, authority=auth.kind, check=name,
    )
    return Check(name, rel, False, auth.kind, expected, actual, err.message, err)


def v1_check(w: FileWork) -> Check:
    """The torrent v1 pieces: their number, then which failed their SHA-1."""
    a = w.auth
    plen = a.piece_length or 1
    npieces = -(-w.size // plen)
    name: CheckName = "torrent-v1-pieces"
    if npieces != len(a.piece_hashes):
        err = HashMismatchError(
            f"{w.rel} spans {npieces} pieces of {plen:,d} bytes but the {a.kind} authority lists "
            f"{len(a.piece_hashes)}.", hint="Delete it and fetch it again.",
            path=w.rel, expected=len(a.piece_hashes), actual=npieces, authority=a.kind)
        return Check(name, w.rel, False, a.kind, len(a.piece_hashes), npieces, err.message, err)
    if w.v1_bad:
        bad = sorted(w.v1_bad)
        err = HashMismatchError(
            f"{w.rel}: {len(bad)} of {npieces} pieces fail their SHA-1 (first: piece {bad[0]}, bytes "
            f"{bad[0] * plen:,d}..{min((bad[0] + 1) * plen, w.size):,d}) under the {a.kind} authority.",
            hint="Delete it and fetch it again (a torrent client re-downloads only the bad pieces).",
            path=w.rel, bad_pieces=bad[:100], authority=a.kind)
        return Check(name, w.rel, False, a.kind, f"{npieces} pieces ok", f"{len(bad)} bad: {bad[:20]}",
                     err.message, err)
    return Check(name, w.rel, True, a.kind, f"{npieces} pieces", f"{npieces} pieces ok")


def v2_check(w: FileWork) -> Check:
    """The torrent v2 merkle root reduced from the chunk roots (an empty file has none)."""
    a = w.auth
    name: CheckName = "torrent-v2-merkle"
    if w.size == 0:
        ok = a.merkle_root is None or a.merkle_root == ZERO
        actual = None
    else:
        nchunks, chunk, total = v2_geometry(w.size)
        roots = [w.v2_roots[i] for i in range(nchunks)] if len(w.v2_roots) == nchunks else []
        actual = v2_root(roots, chunk, total).hex() if roots else None
        ok = a.merkle_root is not None and actual == a.merkle_root.hex()
    exp = a.merkle_root.hex() if a.merkle_root is not None else None
    if ok:
        return Check(name, w.rel, True, a.kind, exp, actual)
    err = HashMismatchError(f"{w.rel}: merkle root is {actual} but the {a.kind} authority says {exp}.",
                            hint="Delete it and fetch it again.", path=w.rel, expected=exp, actual=actual,
                            authority=a.kind)
    return Check(name, w.rel, False, a.kind, exp, actual, err.message, err)
