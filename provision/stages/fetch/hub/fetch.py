"""``fetch_hub``: bring a plan's files from the Hub into ``dest``, verified, through the staging folder.

The driver: take the snapshot the plan was listed from (or resolve one, pinned), record it for
offline use, reuse files already in ``dest`` that verify, then download the rest in parallel
(``max_workers``) with ``download``. Each finished download moves to a verify folder of its own
(``staging/hub/verify/<key>/<path>``), is checked by ``provision.stages.verify`` (content hash
and safetensors structure) and committed into ``dest`` through ``provision.io.staging``. Files
with the same content are downloaded once; a resumed file that fails verification is fetched
again from byte 0 once (the kept bytes may be what was damaged). With ``HF_HUB_OFFLINE=1``
nothing goes on the network: a complete, verified local copy is success, an incomplete one a
``FetchError`` naming what is missing. It never prints, exits, writes to huggingface_hub's cache,
or checks ``params.json`` against the tensors (``provision verify`` does, on the whole folder).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

from provision.errors import FetchError, VerifyError
from provision.formats.sources import HEX40
from provision.io.paths import safe_join
from provision.io.staging import commit_files, prune_empty, verify_and_commit
from provision.layout import Layout
from provision.progress import ProgressEvent, ProgressFn, note
from provision.stages.fetch.hub.download import (
    ByteProgress,
    Transfer,
    discard_partial,
    download,
    partial_lock,
    partial_path,
)
from provision.stages.fetch.hub.env import hub_endpoint, hub_offline, resolve_token
from provision.stages.fetch.hub.listing import HubRecord, resolve_snapshot
from provision.stages.fetch.hub.stream import HubStream, open_stream
from provision.stages.fetch.hub.wanted import Wanted, source_of, wanted_files, wanted_offline
from provision.stages.fetch.request import (
    FetchedFile,
    FetchRequest,
    FetchResult,
    HubOptions,
    HubSnapshot,
    check_existing,
)

if TYPE_CHECKING:
    from provision.stages.verify import VerifyReport


def _verify(root: Path, items: dict[str, Wanted], known: dict[str, str],
            progress: ProgressFn | None = None) -> VerifyReport:
    """Content hashes (and safetensors structure) through ``provision.stages.verify``; the params.json
    versus tensors check belongs to ``provision verify`` on the whole folder, not to a download."""
    from provision.stages.verify import verify_files

    return verify_files(root, {p: w.authority() for p, w in items.items()},
                        known_sha256={p: s for p, s in known.items() if p in items},
                        structure=True, check_params=False, progress=progress)


def _verify_root(tr: Transfer, w: Wanted) -> Path:
    """A verify folder of this file's own: files downloading in parallel never see each other
    (a folder scan racing another file's rename into place would fail)."""
    return tr.partials / "verify" / w.key


def _check_and_commit(tr: Transfer, w: Wanted, staged: Path, sha: str | None, dest: Path, keep: bool) -> None:
    """Verify ``staged`` (under ``_verify_root``) and commit it under its final name; a failed verdict
    deletes it and its partial, an interruption keeps it as the partial when ``keep``."""
    root = _verify_root(tr, w)

    def check() -> None:
        _verify(root, {w.path: w}, {w.path: sha} if sha else {}).raise_for_failure()

    def keep_bytes() -> None:  # not a verdict on the bytes: keep them for the next run
        staged.replace(partial_path(tr, w))

    try:
        verify_and_commit(root, dest, [w.path], check, on_interrupted=keep_bytes if keep else None)
    except VerifyError:
        discard_partial(tr, w)
        raise


def _fetch_group(tr: Transfer, group: list[Wanted], dest: Path) -> list[FetchedFile]:
    """Download the first of files with the same content once; copy it for the others."""
    w = group[0]
    received = 0
    with partial_lock(tr, w):
        for attempt in (1, 2):
            part, sha, got = download(tr, w)
            received += got
            staged = safe_join(_verify_root(tr, w), w.path)
            staged.parent.mkdir(parents=True, exist_ok=True)
            part.replace(staged)
            try:
                _check_and_commit(tr, w, staged, sha, dest, keep=True)
            except VerifyError:
                # bytes kept from an earlier run (a crash, a power cut) may be what is wrong: once,
                # start that file over; fresh bytes that fail are the source's fault
                if attempt == 1 and w.path in tr.resumed and got < w.size:
                    note(tr.note, "hf", f"{w.path}: the resumed download did not verify; downloading it again")
                    if tr.stream is not None:
                        tr.stream.restart(w.path)
                    tr.progress.file(w, 0, delta=-w.size, force=True)
                    continue
                raise
            break
        discard_partial(tr, w)
    out = [FetchedFile(path=w.path, size=w.size, sha256=sha, authority=w.kind, downloaded_bytes=received)]
    for other in group[1:]:
        staged = safe_join(_verify_root(tr, other), other.path)
        staged.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(safe_join(dest, w.path), staged)
        _check_and_commit(tr, other, staged, None, dest, keep=False)
        out.append(FetchedFile(path=other.path, size=other.size, sha256=sha, authority=other.kind))
    return out


def _present(dest: Path, wanted: list[Wanted],
             progress: ProgressFn | None = None) -> tuple[dict[str, FetchedFile], dict[str, str]]:
    """Files already in ``dest`` that pass verification: {path: reused file}, and {path: why not} for
    every other file there under a wanted name (a symlink, not a file, another size, other bytes)."""
    cands = {}
    failed: dict[str, str] = {}
    for w in wanted:
        p = safe_join(dest, w.path)
        if p.is_symlink():
            failed[w.path] = "a symlink"
        elif p.exists() and not p.is_file():
            failed[w.path] = "not a regular file"
        elif p.is_file() and p.stat().st_size != w.size:
            failed[w.path] = f"{p.stat().st_size:,d} bytes, not the {w.size:,d} expected"
        elif p.is_file():
            cands[w.path] = w
    if not cands:
        return {}, failed
    report = _verify(dest, cands, {}, progress)
    ok: dict[str, FetchedFile] = {}
    for fr in report.files:
        if fr.path not in cands:
            continue
        w = cands[fr.path]
        if fr.status == "ok":
            ok[fr.path] = FetchedFile(path=w.path, size=w.size, sha256=fr.sha256 or w.sha256, authority=w.kind,
                                      reused=True)
        else:
            bad = [c.message or c.name for c in fr.checks if not c.ok]
            failed[fr.path] = bad[0] if bad else fr.status
    return ok, failed


def _fetch_offline(plan: FetchRequest, dest: Path, record: HubRecord, repo: str, revision: str, prefix: str,
                   endpoint: str, progress: ProgressFn, t0: float) -> FetchResult:
    """``HF_HUB_OFFLINE``: succeed only with a complete, verified local copy."""
    snap = record.snapshot(repo, revision)
    wanted = wanted_offline(plan, snap, prefix)
    present, failed = _present(dest, wanted, progress)
    missing = [w.path for w in wanted if w.path not in present]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        why = f" ({len(failed)} of them failed verification)" if failed else ""
        raise FetchError(f"HF_HUB_OFFLINE is set and {len(missing)} of {len(wanted)} files are missing from "
                         f"{dest}{why}: {shown}.",
                         hint="Unset HF_HUB_OFFLINE to download them, or copy them there.",
                         missing=missing, failed=failed, dest=str(dest))
    files = [present[w.path] for w in wanted]
    return FetchResult(dest=dest, source="hf", files=files, seconds=time.monotonic() - t0,
                       extra={"repo": repo, "revision": revision, "commit": snap.commit if snap else revision,
                              "endpoint": endpoint, "offline": True})


def _download_all(tr: Transfer, todo: list[Wanted], dest: Path) -> dict[str, FetchedFile]:
    """Download ``todo`` in parallel, one partial per distinct content; the first failure cancels the rest."""
    dest.mkdir(parents=True, exist_ok=True)
    tr.staging.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[Wanted]] = {}
    for w in todo:  # files with the same content share one partial: download it once
        groups.setdefault(w.key, []).append(w)
    results: dict[str, FetchedFile] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, min(tr.options.max_workers, len(groups))),
                              thread_name_prefix="hub-fetch")
    try:
        futures: dict[Future[list[FetchedFile]], list[Wanted]] = {
            pool.submit(_fetch_group, tr, g, dest): g for g in groups.values()}
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        errors = [f.exception() for f in done if f.exception() is not None]
        if errors:
            tr.cancel.set()
            wait(futures)
            real = [e for e in (f.exception() for f in futures) if e is not None
                    and not (isinstance(e, FetchError) and e.message == "Cancelled.")]
            first = (real or errors)[0]
            assert first is not None
            raise first
        for f in futures:
            for ff in f.result():
                results[ff.path] = ff
    finally:
        tr.cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def fetch_hub(plan: FetchRequest, *, dest: Path, options: HubOptions, progress: ProgressFn | None,
              snapshot: HubSnapshot | None = None,
              gate: Callable[[Mapping[str, tuple[Path, str | None]]], None] | None = None) -> FetchResult:
    """Fetch ``plan``'s files from the Hub into ``dest``, verified; see the module docstring.
    ``snapshot`` (default: the one the plan was listed from) pins the commit and its listing. With
    ``gate`` (a manifest's pinned signature) the downloads land in ``staging/<model>/signed`` and
    are committed together once the gate passed every file; a refusal leaves ``dest`` as it was."""
    t0 = time.monotonic()
    dest = Path(dest)
    repo, revision, prefix = source_of(plan)
    staging = Layout(plan.home).staging(plan.name)
    record = HubRecord(staging)
    endpoint = hub_endpoint()
    lock = threading.Lock()

    def serial(ev: ProgressEvent) -> None:
        if progress is not None:
            with lock:
                progress(ev)

    if hub_offline():
        res = _fetch_offline(plan, dest, record, repo, revision, prefix, endpoint, serial, t0)
        if gate is not None:
            gate({f.path: (safe_join(dest, f.path), f.sha256) for f in res.files})
        return res

    token = resolve_token(options)
    listed = snapshot if snapshot is not None else plan.hub_snapshot
    if listed is not None and plan.kind == "hf" and (listed.endpoint, listed.repo, listed.revision) == (
            endpoint, repo, revision):
        snap = listed  # the commit and listing the plan was made from: resolved once
    else:
        pinned = revision.lower() if HEX40.match(revision) else None
        snap = resolve_snapshot(endpoint, repo, revision, token, options, serial, commit=pinned)
    record.save(snap)
    if plan.kind == "hf":
        note(serial, "hf", f"hf://{repo}@{revision} is commit {snap.commit}")
    wanted, skipped = wanted_files(plan, snap, prefix)
    present, failed = _present(dest, wanted, serial)
    if options.existing == "replace":
        for p, why in failed.items():
            note(serial, "hf", f"{p} in {dest} failed verification ({why}); downloading it again")
    else:
        check_existing(dest, failed, options.existing, serial)
    todo = sorted((w for w in wanted if w.path not in present), key=lambda w: -w.size)
    prog = ByteProgress(serial, sum(w.size for w in wanted), sum(w.size for w in present.values()))
    tr = Transfer(endpoint=endpoint, repo=repo, commit=snap.commit, token=token, options=options, staging=staging,
                  progress=prog, note=serial)
    results: dict[str, FetchedFile] = dict(present)
    landing = dest if gate is None else staging / "signed"  # with a gate: committed only once it passed
    if gate is not None:
        shutil.rmtree(landing, ignore_errors=True)
    tr.stream = _watch(options, staging, dest, wanted, present, todo)
    if tr.stream is not None:  # what the conversion starts from comes first: params.json, then the rest
        todo.sort(key=lambda w: (w.path != "params.json", -w.size))
    download_start = time.monotonic()
    try:
        if todo:
            results.update(_download_all(tr, todo, landing))
    finally:
        if tr.stream is not None:
            tr.stream.stop()
    if gate is not None:
        try:
            gate({p: (safe_join(dest if p in present else landing, p), f.sha256) for p, f in results.items()})
            commit_files(landing, dest, [p for p in results if p not in present])
        finally:
            shutil.rmtree(landing, ignore_errors=True)
    prune_empty(tr.partials)  # only empty folders: partials of other downloads stay
    files = [results[w.path] for w in wanted]
    return FetchResult(
        dest=dest, source="hf", files=files, bytes_downloaded=sum(f.downloaded_bytes for f in files),
        seconds=time.monotonic() - t0,
        extra={"repo": repo, "revision": revision, "commit": snap.commit, "endpoint": endpoint, "prefix": prefix,
               "authenticated": bool(token), "retries": tr.retries_used, "resumed": tr.resumed,
               "skipped": skipped, "reverified_bad": failed, **_timing(t0, download_start, tr.last_byte_at)})


def _timing(t0: float, download_start: float, last_byte_at: float | None) -> dict[str, float]:
    """When the downloads began and how long until their last byte (``provision run`` times the
    profile from that byte on), in seconds; nothing when no byte was downloaded."""
    if last_byte_at is None:
        return {}
    return {"start_seconds": round(download_start - t0, 3),
            "download_seconds": round(max(0.0, last_byte_at - download_start), 3)}


def _watch(options: HubOptions, staging: Path, dest: Path, wanted: list[Wanted], present: Mapping[str, FetchedFile],
           todo: list[Wanted]) -> HubStream | None:
    """The stream ``options.piece_watch`` follows (``provision run``'s conversion while fetching), or
    None: no watch, nothing to download, or a file copied from another of the same content (it has
    no partial of its own to follow)."""
    if options.piece_watch is None or not todo or len({w.key for w in todo}) < len(todo):
        return None
    stream = open_stream(staging, [(w.path, w.size, safe_join(dest, w.path) if w.path in present else None)
                                   for w in wanted], sha256={w.path: w.sha256 for w in wanted if w.sha256})
    if stream is not None:
        options.piece_watch(stream, None)
    return stream
