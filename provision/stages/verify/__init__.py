"""Verify a model folder: content hashes against an authority, safetensors structure, hostile files.

Every fetcher calls this before it trusts a file, and ``provision verify`` / ``manifest lock``
call it on a finished folder. It never imports torch, never mmaps, never holds a whole file in
memory and never writes: it reads and reports. The submodules split the job (``authority``,
``scan``, ``digests``, ``parallel``, ``content``, ``structure``, ``report``, ``verifier``); this
module only re-exports the names other modules use.
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
