"""Verify a model folder: content hashes against an authority, safetensors structure, hostile files.

Every fetcher calls this before it trusts a file, and ``provision verify`` / ``manifest lock``
call it on a finished folder. It never imports torch, never mmaps, never holds a whole file in
memory and never writes anything: it reads and reports. The work is split by job:

* ``authority``: what vouches for a file (``Authority``: manifest sha256 or md5, the Hub's LFS
  sha256, git blob SHA-1, torrent v1 pieces / v2 merkle root) and ``authorities_from_manifest``;
* ``scan``: what lies in the folder, and which entries are hostile (pickles by name, never
  opened; symlinks leaving the folder; FIFOs, devices, sockets);
* ``digests``: git's blob id and the BEP 52 merkle root (the sha256 is ``provision.io.hashing``'s);
* ``parallel``: every file's hashing, read once for all its whole-file hashes, spread over a
  thread pool, torrent-vouched files split into piece ranges;
* ``content``: the computed digests judged against the authority;
* ``structure``: safetensors headers, indexes, and params.json against the tensors;
* ``report``: ``Check``, ``FileReport``, ``VerifyReport`` (``raise_for_failure`` raises the
  first failure's typed error);
* ``verifier``: ``verify_files`` (a folder against given authorities) and ``verify_dir`` (against
  a manifest, or every file under authority "none").

This package module only re-exports the names other modules use.
"""

from __future__ import annotations

from provision.io.hashing import sha256_file
from provision.stages.verify.authority import Authority, AuthorityKind, authorities_from_manifest
from provision.stages.verify.digests import git_blob_sha1, merkle_root_file
from provision.stages.verify.report import Check, FileReport, VerifyReport
from provision.stages.verify.verifier import verify_dir, verify_files

__all__ = [
    "Authority",
    "AuthorityKind",
    "Check",
    "FileReport",
    "VerifyReport",
    "authorities_from_manifest",
    "git_blob_sha1",
    "merkle_root_file",
    "sha256_file",
    "verify_dir",
    "verify_files",
]
