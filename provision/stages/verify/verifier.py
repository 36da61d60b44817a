"""Run a verification: ``verify_files`` (a folder against given authorities) and ``verify_dir``.

Check order (so which error is "first"): hostile files, then each expected file in path order
(present, size, sha256, git-sha1, md5, torrent pieces, safetensors structure), then indexes,
then params.json against the tensors. Files nobody listed are reported ("unlisted", not opened,
not failed) unless hostile. ``known_sha256[path]`` (a fetcher that hashed while downloading)
replaces reading the file for its whole-file sha256, which is still compared with the
authority's; other hashes the authority names (git blob, md5, pieces) still read the file.
This module orders the work and assembles the report; scanning, hashing, judging and the
structure checks live in the sibling modules. It never raises for bad content.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from provision.errors import HostileContentError, ProvisionError, SizeMismatchError, UsageError, VerifyError
from provision.formats.pickles import is_pickle_name
from provision.formats.safetensors import SafetensorsInfo
from provision.io.paths import safe_join, safe_relpath
from provision.progress import ProgressFn
from provision.stages.verify.authority import Authority, authorities_from_manifest
from provision.stages.verify.content import hash_check, v1_check, v2_check
from provision.stages.verify.digests import v2_geometry
from provision.stages.verify.parallel import FileWork, hash_all
from provision.stages.verify.report import Check, FileReport, VerifyReport
from provision.stages.verify.scan import Entry, hostile_check, scan
from provision.stages.verify.structure import index_checks, params_checks, safetensors_check

if TYPE_CHECKING:
    from provision.formats.manifest import Manifest


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _norm(rel: str) -> str:
    """``./a//b`` -> ``a/b``; a hostile path is kept as given (it fails its check later)."""
    try:
        return str(safe_relpath(rel))
    except HostileContentError:
        return rel


def _check_root(root: Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder.", hint="Pass the folder that holds the model files.",
                         path=str(root))
    return root


def _admit(rel: str, auth: Authority, root: Path, entries: Mapping[str, Entry], hostile: Mapping[str, Check],
           fr: FileReport, checks: list[Check], pickles_as_data: bool = False) -> tuple[Path, int] | None:
    """Presence, hostility and size checks of one expected file; (path, size) when it may be hashed."""
    err: ProvisionError
    try:
        path = safe_join(root, rel, what="file path")
    except HostileContentError as exc:
        checks.append(Check("hostile", rel, False, auth.kind, message=exc.message, error=exc))
        return None
    if rel in hostile or (is_pickle_name(rel) and not pickles_as_data):
        if rel not in hostile:
            err = HostileContentError(f"Refusing {rel}: it is a pickle format; provision reads safetensors "
                                      "only and never opens it.", path=rel)
            checks.append(Check("hostile", rel, False, auth.kind, message=err.message, error=err))
        fr.status = "refused"
        return None
    ent = entries.get(rel)
    if ent is None or not ent.readable:
        what = "a folder" if path.is_dir() else "missing"
        err = VerifyError(f"{rel} is {what}; the {auth.kind} authority expects a file"
                          + (f" of {auth.size:,d} bytes." if auth.size is not None else "."),
                          hint="Fetch it again.", path=rel, authority=auth.kind)
        checks.append(Check("present", rel, False, auth.kind, expected="file", actual=what,
                            message=err.message, error=err))
        fr.status = "missing"
        return None
    size = ent.size or 0
    fr.size = size
    checks.append(Check("present", rel, True, auth.kind))
    if auth.size is None:
        return path, size
    if auth.size != size:
        err = SizeMismatchError(
            f"{rel} is {size:,d} bytes but the {auth.kind} authority says {auth.size:,d}.",
            hint="The file is truncated or a different version; delete it and fetch it again.",
            path=rel, expected=auth.size, actual=size, authority=auth.kind,
        )
        checks.append(Check("size", rel, False, auth.kind, auth.size, size, err.message, err))
        fr.status = "failed"
        return None
    checks.append(Check("size", rel, True, auth.kind, auth.size, size))
    return path, size


def _as_data(e: Entry) -> Entry:
    """A regular pickle file as plain bytes to hash (a symlinked one stays refused)."""
    if e.kind != "pickle" or e.target is not None:
        return e
    try:
        st = os.stat(e.path, follow_symlinks=False)
    except OSError:
        return e
    return Entry(e.rel, e.path, "file", size=st.st_size) if stat.S_ISREG(st.st_mode) else e


def _content_checks(w: FileWork, fr: FileReport, known: Mapping[str, str]) -> list[Check]:
    """What the hashing found for one file, judged against its authority."""
    rel, auth = w.rel, w.auth
    checks: list[Check] = []
    fr.git_sha1 = w.git_sha1
    if w.error is not None:
        checks.append(Check("read", rel, False, auth.kind, message=w.error.message, error=w.error))
    if rel in known:
        fr.sha256, fr.sha256_source = known[rel], "fetcher"
    elif w.sha256:
        fr.sha256, fr.sha256_source = w.sha256, "read"
    if w.read_bytes is not None and w.read_bytes != w.size:
        err = SizeMismatchError(f"{rel} changed size while it was verified ({w.size:,d} -> "
                                f"{w.read_bytes:,d} bytes).", hint="Run verify again when nothing writes it.",
                                path=rel, expected=w.size, actual=w.read_bytes)
        checks.append(Check("size", rel, False, auth.kind, w.size, w.read_bytes, err.message, err))
    if auth.sha256 and (fr.sha256 is not None or w.want_sha256 or not auth.splittable):
        # under a torrent authority a pinned sha256 is compared only when its digest is known anyway
        checks.append(hash_check("sha256", rel, auth, auth.sha256.lower(), fr.sha256))
    if auth.git_sha1:
        checks.append(hash_check("git-sha1", rel, auth, auth.git_sha1.lower(), w.git_sha1))
    if auth.md5:
        checks.append(hash_check("md5", rel, auth, auth.md5.lower(), w.md5))
    if auth.piece_hashes:
        checks.append(v1_check(w))
    if auth.merkle_root is not None or (auth.kind == "torrent-v2-merkle" and w.size == 0):
        checks.append(v2_check(w))
    return checks


def verify_files(
    root: Path,
    expected: Mapping[str, Authority],
    *,
    known_sha256: Mapping[str, str] | None = None,
    structure: bool = True,
    check_params: bool = True,
    progress: ProgressFn | None = None,
    workers: int | None = None,
    pickles_as_data: bool = False,
    whole_sha256: bool = True,
    checked_pieces: Mapping[str, Collection[int]] | None = None,
    chunk_roots: Mapping[str, Mapping[int, bytes]] | None = None,
) -> VerifyReport:
    """Verify the ``expected`` files under ``root`` (see the module docstring); different files
    are hashed in parallel on ``workers`` threads (default: the CPU count). Never raises for bad
    content; call ``raise_for_failure()`` on the report. ``pickles_as_data`` (a pickled release's
    download, for ``import-pickle``) hashes regular pickle files like any bytes instead of refusing them.
    ``whole_sha256=False`` reads a file for its whole-file sha256 only where a sha256 (or nothing) is
    its authority: a file torrent pieces vouch for is checked in ranges on every worker and its
    report carries no sha256 unless ``known_sha256`` gives it (the default, True, also reports the
    sha256 of such a file: one more single-stream pass, which bounds the time of a big file).
    ``checked_pieces`` (the torrent fetch's write-behind) names, per file, the torrent v1 pieces
    (indices within the file) already read back from the file after they reached the disk and
    matched this authority's SHA-1: they are not read again (the report counts them);
    ``chunk_roots`` likewise gives v2 merkle chunk roots computed from what the file held on the
    disk: those chunks are not read again, and the root they reduce to is checked as usual.
    """
    t0 = time.monotonic()
    root = _check_root(root)
    nworkers = max(1, workers or _default_workers())
    report = VerifyReport(root=root, workers=nworkers)
    known = {_norm(k): v.lower() for k, v in (known_sha256 or {}).items()}
    expected = {_norm(k): v for k, v in expected.items()}
    checked = {_norm(k): v for k, v in (checked_pieces or {}).items()}
    given_roots = {_norm(k): v for k, v in (chunk_roots or {}).items()}

    entries = {e.rel: e for e in scan(root)}
    if pickles_as_data:  # a pickled release's download: its pickles are hashed as bytes, never opened as pickles
        entries = {r: _as_data(e) for r, e in entries.items()}
    hostile: dict[str, Check] = {}
    for e in entries.values():
        c = hostile_check(e)
        if c is not None:
            hostile[e.rel] = c
            report.checks.append(c)

    works: dict[str, FileWork] = {}
    reports: dict[str, FileReport] = {}
    file_checks: dict[str, list[Check]] = {}
    for rel in sorted(expected):
        auth = expected[rel]
        reports[rel] = FileReport(path=rel, status="ok", authority=auth.kind)
        file_checks[rel] = []
        admitted = _admit(rel, auth, root, entries, hostile, reports[rel], file_checks[rel], pickles_as_data)
        if admitted is not None:
            path, size = admitted
            want = rel not in known and (whole_sha256 or not auth.splittable)
            skip = frozenset(checked.get(rel, ())) if auth.piece_hashes else frozenset()
            works[rel] = FileWork(rel=rel, path=path, size=size, auth=auth, want_sha256=want,
                                  skip_pieces=frozenset(i for i in skip if 0 <= i < len(auth.piece_hashes)))
            if auth.merkle_root is not None and size > 0 and rel in given_roots:
                nchunks = v2_geometry(size)[0]
                works[rel].v2_roots = {i: r for i, r in given_roots[rel].items() if 0 <= i < nchunks}
                works[rel].given_roots = len(works[rel].v2_roots)

    # structure before hashing: headers only, so a hostile header is reported within milliseconds
    st_infos: dict[str, SafetensorsInfo] = {}
    st_checks: dict[str, Check] = {}
    if structure:
        for rel, w in works.items():
            if rel.endswith(".safetensors"):
                info, st_checks[rel] = safetensors_check(rel, w.path, w.auth.kind)
                if info is not None:
                    st_infos[rel] = info

    report.bytes_hashed = hash_all(works, nworkers, progress)

    for rel, w in works.items():
        file_checks[rel] += _content_checks(w, reports[rel], known)
        reports[rel].hash_units, reports[rel].hash_ranges = w.units, w.range_units
        reports[rel].hash_threads = len(w.threads)
        reports[rel].read_back = len(w.skip_pieces) + w.given_roots
        if rel in st_checks:
            file_checks[rel].append(st_checks[rel])

    for rel in sorted(expected):
        checks = file_checks[rel]
        report.checks.extend(checks)
        fr = reports[rel]
        fr.checks = checks
        if fr.status == "ok" and not all(c.ok for c in checks):
            fr.status = "failed"
        report.files.append(fr)

    # files nobody listed: reported, not failed (hostile ones already failed above)
    for rel, e in entries.items():
        if rel not in expected:
            report.files.append(FileReport(path=rel, status="refused" if rel in hostile else "unlisted",
                                           size=e.size))
    report.files.sort(key=lambda f: f.path)

    if structure:
        paths = {rel: w.path for rel, w in works.items()}
        report.checks += index_checks(expected, paths, st_infos)
        if check_params:
            report.checks += params_checks(expected, paths, st_infos)
    report.seconds = time.monotonic() - t0
    return report


def verify_dir(root: Path, manifest: Manifest | None = None, *, progress: ProgressFn | None = None,
               workers: int | None = None, torrent: Path | None = None, home: Path | None = None) -> VerifyReport:
    """Verify a model folder against ``manifest`` (its optional files may be absent), or, with no
    manifest, every regular file in it under authority "none" (structure, params, sha256 reported).

    With ``torrent`` (a .torrent file) or ``home`` (the store, whose ``torrents/`` keeps the info
    dictionary of every torrent fetched), the files a torrent vouches for are checked by its pieces
    on every worker instead of a whole-file sha256 (``torrent.find_torrent`` says which torrent is
    trusted); with ``torrent`` and no manifest, the torrent's files are the ones expected. The
    report's ``torrent`` names the dictionary used and what pins it."""
    from provision.stages.verify.torrent import find_torrent, with_torrent

    root = _check_root(root)
    ref = find_torrent(manifest, home, torrent_file=torrent) if torrent is not None or home is not None else None
    if manifest is None:
        expected = {e.rel: Authority(kind="none") for e in scan(root) if e.readable}
        expected = with_torrent(expected, ref, add_missing=True)
        check_params = True
    else:
        expected = authorities_from_manifest(manifest)
        for f in manifest.files:
            if f.optional and not os.path.lexists(root / f.path):
                expected.pop(f.path, None)
        expected = with_torrent(expected, ref)
        check_params = manifest.format == "mistral"
    report = verify_files(root, expected, progress=progress, workers=workers, check_params=check_params,
                          whole_sha256=ref is None)
    if ref is not None:
        report.torrent = ref.to_dict()
    return report
