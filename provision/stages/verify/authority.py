"""What vouches for a file's content: the ``Authority`` record and how a manifest yields one.

An authority names the facts a file must match (size, whole-file sha256, the Hub's git blob
SHA-1, a release's md5, torrent v1 piece SHA-1s or a torrent v2 merkle root) and the kind the
report calls it by. Fetchers build their own (the Hub's LFS sha256, a torrent's pieces);
``authorities_from_manifest`` builds one per manifest file. This module only describes; the
hashing is ``parallel``'s and the comparison ``content``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    from provision.formats.manifest import Manifest

AuthorityKind = Literal["manifest-sha256", "hub-lfs-sha256", "git-blob-sha1", "torrent-v2-merkle",
                        "torrent-v1-pieces", "manifest-md5", "none"]
AUTHORITY_KINDS: tuple[AuthorityKind, ...] = get_args(AuthorityKind)


@dataclass(frozen=True)
class Authority:
    """What vouches for one file's content.

    Every field that is set is checked, whatever the kind: size first (a wrong size skips
    hashing), then the whole-file sha256, the git blob SHA-1, the md5, the torrent v1 piece
    SHA-1s (``piece_hashes`` cover exactly this file, the file starting on a piece boundary; the
    last piece is accepted short or zero-padded to ``piece_length``, the latter only when
    ``size`` is known), the torrent v2 ``merkle_root`` (BEP 52 pieces root: SHA-256 merkle tree
    over 16 KiB blocks, leaves zero-padded to a power of two).
    """

    kind: AuthorityKind
    size: int | None = None
    sha256: str | None = None
    git_sha1: str | None = None
    piece_length: int | None = None  # torrent v1: bytes per piece (v2: informational)
    piece_hashes: tuple[bytes, ...] = ()  # torrent v1 piece SHA-1s covering exactly this file
    merkle_root: bytes | None = None  # torrent v2 pieces root
    md5: str | None = None  # a release's published md5 sum (Mixtral 8x7B), checked when set

    def __post_init__(self) -> None:
        if self.kind not in AUTHORITY_KINDS:
            raise ValueError(f"unknown authority kind {self.kind!r}")
        if self.piece_hashes and not self.piece_length:
            raise ValueError("piece_hashes need piece_length")

    @property
    def splittable(self) -> bool:
        """True when pieces vouch for the content (torrent v1 pieces or a v2 merkle root): the file
        can be checked in ranges on every core, with no whole-file pass."""
        return bool(self.piece_hashes and self.piece_length) or self.merkle_root is not None

    @property
    def has_content_hash(self) -> bool:
        return bool(self.sha256 or self.git_sha1 or self.piece_hashes or self.merkle_root or self.md5)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind}
        if self.size is not None:
            d["size"] = self.size
        if self.sha256:
            d["sha256"] = self.sha256
        if self.git_sha1:
            d["git_sha1"] = self.git_sha1
        if self.piece_hashes:
            d["piece_length"] = self.piece_length
            d["pieces"] = len(self.piece_hashes)
        if self.merkle_root is not None:
            d["merkle_root"] = self.merkle_root.hex()
        if self.md5:
            d["md5"] = self.md5
        return d


def authorities_from_manifest(manifest: Manifest) -> dict[str, Authority]:
    """One Authority per manifest file: "manifest-sha256" when it pins a sha256, else
    "git-blob-sha1" when it pins the Hub's blob id, else "manifest-md5" when it pins an md5,
    else "none" (its size, if any, is checked)."""
    out: dict[str, Authority] = {}
    for f in manifest.files:
        kind: AuthorityKind = ("manifest-sha256" if f.sha256 else "git-blob-sha1" if f.git_sha1 else
                               "manifest-md5" if f.md5 else "none")
        out[f.path] = Authority(kind=kind, size=f.size, sha256=f.sha256, git_sha1=f.git_sha1, md5=f.md5)
    return out
