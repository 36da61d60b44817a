"""``provision bundle import``: verify a bundle offline and land it in the store as if fetched.

A bundle is a folder or a plain tar (``bundle.json`` its first member). Its index is read
first (bounded) and validated (``index.parse_index``); then every file is copied into the
model's staging folder (``staging/<model>/bundle``) and hashed on the way: a size or sha256
that differs from the index, a file missing from it or not listed in it, a path that leaves
the bundle, a symlink, hardlink, device or FIFO, or a truncated archive is a one-line
``VerifyError`` (exit 5), the staging folder is removed and nothing reaches the store. Tar
members are never extracted: each is checked and streamed, at most its listed size, into
staging. Each file verified is recorded in a journal beside the staged files, so an import
that is interrupted (killed, a slow share gone) resumes without copying a verified file again.

Once every file is staged, the cross-checks run: the manifest lock's sizes and sha256 against
the original's files (and every required manifest file present), each bundled folder's
``provenance.json`` (when it has one) against that folder's files, the torrent's infohashes and
file list against the index, and every staged file against the torrent's piece hashes (v2
merkle roots, else v1 pieces; a second authority besides the index's sha256, reported as
``authority``). Then ``io.staging.verify_and_commit`` moves the files into
``models/<model>/``, the manifest lock goes where ``provision run``
records manifests, and the state file records fetch and verify (original) and convert (each
profile), so a later ``provision run`` skips them; a profile bundled without its original is
recorded as ``--drop-original`` leaves one (the original's params.json kept), so a run skips
the fetch too. An existing original or profile folder is
refused (exit 2). The model's lock is held from the first staged byte to the state file (a
running ``provision run`` of the model makes the import wait, then exit 6). It does not convert
or smoke-test anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from provision.errors import (
    HashMismatchError,
    HostileContentError,
    ManifestError,
    SizeMismatchError,
    StructureError,
    UsageError,
    VerifyError,
)
from provision.formats.manifest import Manifest, parse_manifest_bytes
from provision.formats.provenance import PROVENANCE_NAME
from provision.io.atomic import atomic_write_text, disk_full_is_exit_6, fsync_path
from provision.io.hashing import BLOCK_SIZE
from provision.io.opening import open_regular, read_regular
from provision.io.paths import safe_join, safe_relpath
from provision.io.staging import commit_file, prune_empty, verify_and_commit
from provision.layout import ORIGINAL, Layout, ModelPaths
from provision.progress import ByteCounter, ProgressFn
from provision.settings import default_home
from provision.stages.bundle.index import (
    INDEX_NAME,
    MAX_INDEX_BYTES,
    PROFILE_DIR,
    BundleFile,
    BundleIndex,
    parse_index,
)
from provision.store.lock import ModelLock
from provision.store.state import FileFact, load_state, save_state

JOURNAL = ".bundle-journal.json"


@dataclass
class ImportResult:
    model: str
    model_dir: Path
    original: bool
    profiles: list[str]
    files: int
    bytes_copied: int
    files_reused: int
    bundle_sha256: str
    seconds: float
    authority: dict[str, Any] = field(default_factory=dict)  # what vouched for the files: sha256 and torrent pieces

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "model_dir": str(self.model_dir), "original": self.original,
                "profiles": self.profiles, "files": self.files, "bytes_copied": self.bytes_copied,
                "files_reused": self.files_reused, "bundle_sha256": self.bundle_sha256,
                "seconds": round(self.seconds, 3), "authority": self.authority}


class _Journal:
    """The files already verified in staging, keyed by bundle path, for one bundle (its index's sha256)."""

    def __init__(self, stage: Path, bundle_sha256: str) -> None:
        self.path = stage / JOURNAL
        self.bundle_sha256 = bundle_sha256
        self.done: dict[str, dict[str, Any]] = {}
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            doc = None
        if isinstance(doc, dict) and doc.get("bundle_sha256") == bundle_sha256 and isinstance(doc.get("done"), dict):
            self.done = doc["done"]
        else:  # another bundle's (or an unreadable) staging: start over
            _drop_staging(stage)

    def reusable(self, stage: Path, f: BundleFile) -> bool:
        """``f`` was verified into staging before and the staged file is unchanged since."""
        d = self.done.get(f.path)
        if not isinstance(d, dict) or d.get("sha256") != f.sha256 or d.get("size") != f.size:
            return False
        try:
            fact = FileFact(path=safe_join(stage, f.path), size=int(d["size"]), mtime_ns=int(d["mtime_ns"]),
                            inode=int(d["inode"]), sha256=f.sha256)
        except (KeyError, TypeError, ValueError):
            return False
        return fact.mismatch() is None

    def record(self, staged: Path, f: BundleFile) -> None:
        st = os.stat(staged)
        self.done[f.path] = {"size": st.st_size, "sha256": f.sha256, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
        atomic_write_text(self.path, json.dumps({"bundle_sha256": self.bundle_sha256, "done": self.done}))


def _parts(stage: Path) -> Path:
    """Where files are written before their sha256 matched: beside the staging folder, so no part
    name can collide with a name the bundle lists."""
    return stage.with_name(stage.name + ".parts")


def _drop_staging(stage: Path) -> None:
    shutil.rmtree(stage, ignore_errors=True)
    shutil.rmtree(_parts(stage), ignore_errors=True)
    prune_empty(stage.parent)


def _stream_into(read: Callable[[int], bytes], f: BundleFile, stage: Path, counter: ByteCounter) -> Path:
    """Copy exactly ``f.size`` bytes from ``read`` into staging (written aside, moved in once its
    sha256 matches); a short source is a truncated bundle, a longer one is caught by its caller."""
    target = safe_join(stage, f.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _parts(stage).mkdir(exist_ok=True)
    part = _parts(stage) / hashlib.sha256(f.path.encode()).hexdigest()
    h = hashlib.sha256()
    left = f.size
    with open(part, "wb") as fo:
        while left:
            chunk = read(min(BLOCK_SIZE, left))
            if not chunk:
                raise StructureError(f"Bundle file {f.path} is truncated ({f.size - left:,d} of {f.size:,d} bytes).",
                                     path=f.path)
            h.update(chunk)
            fo.write(chunk)
            left -= len(chunk)
            counter(len(chunk))
    if h.hexdigest() != f.sha256:
        part.unlink()
        raise HashMismatchError(f"Bundle file {f.path} has sha256 {h.hexdigest()}, bundle.json says {f.sha256}.",
                                path=f.path)
    fsync_path(part)
    os.replace(part, target)
    return target


class _Source:
    """Where a bundle's bytes come from: ``index_bytes`` once, then ``members`` (path, opener, size)."""

    def index_bytes(self) -> bytes:
        raise NotImplementedError

    def members(self, index: BundleIndex) -> Iterator[tuple[BundleFile, Callable[[], IO[bytes]] | None]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _DirSource(_Source):
    def __init__(self, root: Path) -> None:
        self.root = root

    def index_bytes(self) -> bytes:
        try:
            return read_regular(self.root / INDEX_NAME, root=self.root, what="bundle.json", max_bytes=MAX_INDEX_BYTES)
        except FileNotFoundError:
            raise StructureError(f"{self.root} has no {INDEX_NAME}: not a bundle.") from None

    def _listing(self) -> set[str]:
        found: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in (*dirnames, *filenames):
                p = Path(dirpath) / name
                rel = p.relative_to(self.root).as_posix()
                mode = os.lstat(p).st_mode
                if stat.S_ISLNK(mode):
                    raise HostileContentError(f"Refusing bundle member {rel}: it is a symlink.", path=rel)
                if stat.S_ISDIR(mode):
                    continue
                if not stat.S_ISREG(mode):
                    raise HostileContentError(f"Refusing bundle member {rel}: not a regular file.", path=rel)
                found.add(rel)
        found.discard(INDEX_NAME)
        return found

    def members(self, index: BundleIndex) -> Iterator[tuple[BundleFile, Callable[[], IO[bytes]] | None]]:
        found = self._listing()
        listed = {f.path for f in index.files}
        extra = sorted(found - listed)
        if extra:
            raise StructureError(f"Bundle file {extra[0]} is not listed in bundle.json.", path=extra[0])
        missing = sorted(listed - found)
        if missing:
            raise StructureError(f"Bundle file {missing[0]} is missing.", path=missing[0])
        for f in index.files:
            p = safe_join(self.root, f.path)
            size = os.lstat(p).st_size
            if size != f.size:
                raise SizeMismatchError(f"Bundle file {f.path} is {size:,d} bytes, bundle.json says {f.size:,d}.",
                                        path=f.path)
            yield f, (lambda p=p: open(open_regular(p, root=self.root, what="bundle file"), "rb"))  # type: ignore[misc]


class _TarSource(_Source):
    """A plain tar read member by member, never extracted: ``bundle.json`` must come first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.tf = tarfile.open(path, mode="r:")
            self.first = self.tf.next()
        except (tarfile.TarError, EOFError) as e:
            raise StructureError(f"{path} is not a readable tar archive ({e}).") from None

    def close(self) -> None:
        self.tf.close()

    def index_bytes(self) -> bytes:
        m = self.first
        if m is None or m.name != INDEX_NAME or not m.isreg():
            raise StructureError(f"{self.path}: the first member is not {INDEX_NAME}: not a bundle archive.")
        if m.size > MAX_INDEX_BYTES:
            raise StructureError(f"{INDEX_NAME} is {m.size:,d} bytes, over the {MAX_INDEX_BYTES:,d} limit.")
        fh = self.tf.extractfile(m)
        assert fh is not None
        raw = fh.read(m.size)
        if len(raw) != m.size:
            raise StructureError(f"{self.path} is truncated (in {INDEX_NAME}).")
        return raw

    def members(self, index: BundleIndex) -> Iterator[tuple[BundleFile, Callable[[], IO[bytes]] | None]]:
        seen: set[str] = set()
        try:
            while (m := self.tf.next()) is not None:
                rel = safe_relpath(m.name, what="tar member").as_posix()
                if m.issym() or m.islnk():
                    raise HostileContentError(f"Refusing tar member {m.name}: it is a "
                                              f"{'symlink' if m.issym() else 'hardlink'}.", path=m.name)
                if m.isdir():
                    continue
                if not m.isreg():
                    raise HostileContentError(f"Refusing tar member {m.name}: not a regular file.", path=m.name)
                f = index.file(rel)
                if f is None:
                    raise StructureError(f"Tar member {m.name} is not listed in bundle.json.", path=m.name)
                if rel in seen:
                    raise StructureError(f"Tar member {m.name} appears twice.", path=m.name)
                seen.add(rel)
                if m.size != f.size:
                    raise SizeMismatchError(f"Tar member {m.name} is {m.size:,d} bytes, bundle.json says {f.size:,d}.",
                                            path=m.name)
                yield f, (lambda m=m: self.tf.extractfile(m))  # type: ignore[misc]
        except (tarfile.TarError, EOFError) as e:
            raise StructureError(f"{self.path} is truncated or corrupt ({e}).") from None
        missing = sorted({f.path for f in index.files} - seen)
        if missing:
            raise StructureError(f"Bundle file {missing[0]} is missing (truncated archive?).", path=missing[0])


def _open_source(path: Path) -> _Source:
    if path.is_dir():
        return _DirSource(path)
    if path.is_file():
        return _TarSource(path)
    raise UsageError(f"{path} is neither a bundle folder nor a bundle archive.")


def _cross_check(stage: Path, index: BundleIndex) -> dict[str, Any]:
    """The manifest lock and the torrent agree with the staged files and the index, and every staged
    file matches the torrent's piece hashes (exit 5); returns the authorities used, for the report."""
    raw = safe_join(stage, index.manifest).read_bytes()
    try:
        m = parse_manifest_bytes(raw, path=Path(index.manifest))
    except ManifestError as e:
        raise StructureError(f"Bundle manifest lock is invalid: {e}") from None
    if index.original:
        original = {f.path.split("/", 1)[1]: f for f in index.folder_files(ORIGINAL)}
        for spec in m.files:
            got = original.get(spec.path)
            if got is None:
                if not spec.optional:
                    raise StructureError(f"Bundle lacks original/{spec.path}, which manifest {m.name} requires.",
                                         path=spec.path)
                continue
            if (spec.sha256 is not None and spec.sha256 != got.sha256) or (
                    spec.size is not None and spec.size != got.size):
                raise HashMismatchError(f"original/{spec.path} does not match the bundle's manifest lock "
                                        f"(sha256 {got.sha256}, the lock says {spec.sha256}).", path=spec.path)
    for folder in ([ORIGINAL] if index.original else []) + [p.name for p in index.profiles]:
        _check_provenance(stage, index, folder)
    signed = _check_signature(stage, index, m) if index.original and m.signing is not None else None
    from provision.stages.fetch.torrent.meta import load_torrent_info, meta_from_info

    tpath = index.torrent.path
    try:
        meta = meta_from_info(load_torrent_info(safe_join(stage, tpath)))
    except UsageError as e:
        raise StructureError(f"Bundle torrent {tpath} is invalid: {e}") from None
    if (meta.btih, meta.btmh) != (index.torrent.btih, index.torrent.btmh):
        raise HashMismatchError(f"Bundle torrent {tpath} has other infohashes than bundle.json records.")
    if sorted(meta.files) != sorted((f.path, f.size) for f in index.payload) or meta.name != index.torrent.name:
        raise StructureError(f"Bundle torrent {tpath} lists other files than bundle.json.")
    return {"sha256": INDEX_NAME, **_check_pieces(stage, index), **({"signature": signed} if signed else {})}


def _check_signature(stage: Path, index: BundleIndex, m: Manifest) -> dict[str, Any]:
    """The manifest lock pins a publisher (``[signing]``): the bundled original must carry the
    release's signature and match it, as a fetch would have required (``stages.fetch.signed``). A
    signature pinned by URL cannot be read offline: the import says so instead of checking it."""
    from provision.stages.fetch.signed import SignatureGate

    assert m.signing is not None
    if m.signing.signature_url is not None:
        return {"signature": m.signing.signature_url, "checked": False,
                "why": "the manifest pins a signature URL; bundle import does not use the network"}
    gate = SignatureGate(m.signing)
    gate({f.path.split("/", 1)[1]: (safe_join(stage, f.path), f.sha256) for f in index.folder_files(ORIGINAL)})
    assert gate.result is not None
    return {**gate.result, "checked": True}


def _check_pieces(stage: Path, index: BundleIndex) -> dict[str, Any]:
    """Every staged payload file against the bundle torrent's pieces (v2 merkle roots; v1 SHA-1 pieces
    where the torrent has no v2 part), hashed in parallel: a second authority besides bundle.json's
    sha256, the one a host that pinned the bundle's btih/btmh trusts. ``HashMismatchError`` (exit 5)
    names the first file that differs."""
    from provision.stages.fetch.torrent.meta import info_hashes, load_torrent_info
    from provision.stages.verify import verify_files
    from provision.stages.verify.torrent import TorrentRef, with_torrent

    ti = load_torrent_info(safe_join(stage, index.torrent.path))
    btih, btmh = info_hashes(ti.info_hashes())
    ref = TorrentRef(path=stage / index.torrent.path, info=ti, chain="bundle torrent", btih=btih, btmh=btmh)
    auths = with_torrent({}, ref, add_missing=True)
    report = verify_files(stage, auths, structure=False, check_params=False, whole_sha256=False,
                          pickles_as_data=True)
    bad = [f for f in report.files if f.path in auths and f.status != "ok"]  # staging also holds the journal
    if bad:
        why = next((c.message for c in bad[0].checks if not c.ok and c.message), bad[0].status)
        raise HashMismatchError(f"Bundle file {bad[0].path} does not match the bundle torrent's pieces ({why}).",
                                path=bad[0].path)
    kinds = sorted({a.kind for a in auths.values()})
    return {"pieces": "+".join(kinds), "torrent": index.torrent.path, "btih": btih, "btmh": btmh,
            "piece_checked_files": sum(1 for a in auths.values() if a.kind != "none" and (a.merkle_root or
                                                                                          a.piece_hashes))}


def _check_provenance(stage: Path, index: BundleIndex, folder: str) -> None:
    """A bundled folder's ``provenance.json``, when it has one, records exactly the folder's files
    as bundle.json lists them (those were checked against bundle.json already: no second read)."""
    from provision.formats.provenance import MAX_RECORD_BYTES, PROVENANCE_NAME, is_inert, validate

    rel = f"{folder}/{PROVENANCE_NAME}"
    if index.file(rel) is None:
        return
    try:
        record = json.loads(read_regular(safe_join(stage, rel), what="provenance record",
                                         max_bytes=MAX_RECORD_BYTES).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise StructureError(f"Bundle record {rel} is not valid JSON ({str(e)[:120]}).", path=rel) from None
    if not isinstance(record, dict):
        raise StructureError(f"Bundle record {rel} is not a JSON object.", path=rel)
    validate(record, where=rel)
    recorded = {(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in record["files"]}
    bundled = {(f.path.split("/", 1)[1], f.size, f.sha256) for f in index.folder_files(folder)
               if f.path != rel}
    recorded_paths = {p for p, _, _ in recorded}  # a README or signature beside the record travels along
    bundled = {b for b in bundled if b[0] in recorded_paths or not is_inert(b[0])}
    if recorded != bundled:
        first = sorted(recorded ^ bundled)[0][0]
        raise HashMismatchError(f"Bundle record {rel} does not match the bundled {folder}/ files "
                                f"(first difference: {first}).", path=rel)


def _refuse_existing(mp: ModelPaths, index: BundleIndex) -> None:
    for name in ([ORIGINAL] if index.original else []) + [p.name for p in index.profiles]:
        d = mp.root / name
        if d.exists() and any(d.iterdir()):
            raise UsageError(f"{d} already exists in the store; the bundle would replace it.",
                             hint=f"Remove it first (provision rm {mp.dirname}"
                                  f"{'' if name == ORIGINAL else ' --profile ' + name}).")


def _record_state(mp: ModelPaths, index: BundleIndex, bundle_sha256: str) -> None:
    state = load_state(mp.state_file)
    state.model = state.model or mp.dirname
    facts = {"source": "bundle", "bundle_sha256": bundle_sha256}
    if index.original:
        state.invalidate("fetch")
        files = {f.path.split("/", 1)[1]: mp.root / f.path for f in index.folder_files(ORIGINAL)}
        sha = {f.path.split("/", 1)[1]: f.sha256 for f in index.folder_files(ORIGINAL)}
        state.record_stage("fetch", files=files, facts=facts, sha256=sha)
        state.record_stage("verify", files=files, sha256=sha)
    elif index.original_params is not None and not mp.original.exists() and not state.stage_valid("verify"):
        # a profile without its original: recorded as --drop-original records it, so a run keeps the profile
        state.invalidate("fetch")
        state.record_stage("fetch", facts=facts)
        state.record_stage("verify")
        state.mark_original_dropped(index.original_params)
    for p in index.profiles:
        state.invalidate(f"convert:{p.name}")
        folder = mp.profile(p.name)
        cmd = p.serve_command.replace(PROFILE_DIR, str(folder)) if p.serve_command else None
        # provenance.json is left out as the pipeline leaves it out: smoke rewrites it, the conversion stays valid
        converted = [f for f in index.folder_files(p.name) if f.path.rsplit("/", 1)[-1] != PROVENANCE_NAME]
        state.record_stage(f"convert:{p.name}", files=[mp.root / f.path for f in converted],
                           sha256={str(mp.root / f.path): f.sha256 for f in converted},
                           facts={"scheme": p.scheme, "layout": p.layout, "vllm_command": cmd, **facts})
    save_state(state, mp.state_file)


def _stage_all(source: _Source, index: BundleIndex, stage: Path, journal: _Journal, counter: ByteCounter,
               path: Path) -> tuple[int, int]:
    """Copy every file not verified before into staging: (bytes copied, files reused)."""
    copied = reused = 0
    for f, opener in source.members(index):
        if journal.reusable(stage, f):
            reused += 1
            counter(f.size)
            continue
        assert opener is not None
        try:
            with opener() as fh:
                staged = _stream_into(fh.read, f, stage, counter)
        except (tarfile.TarError, EOFError) as e:
            raise StructureError(f"{path} is truncated or corrupt ({e}).") from None
        journal.record(staged, f)
        copied += f.size
    counter.finish()
    return copied, reused


def import_bundle(path: Path, *, home: Path | None = None, progress: ProgressFn | None = None) -> ImportResult:
    """Verify the bundle at ``path`` (folder or tar) and land it in the store under ``home``; the model's
    lock is held from the first staged byte to the state file, so a run or another import waits."""
    t0 = time.monotonic()
    path = Path(path)
    lay = Layout(Path(home) if home else default_home())
    source = _open_source(path)
    try:
        raw = source.index_bytes()
        index = parse_index(raw)
        mp = lay.model_at(index.model)
        _refuse_existing(mp, index)
        created = not mp.root.exists()
        mp.root.mkdir(parents=True, exist_ok=True)
        try:
            with ModelLock(mp.lock_file, command="bundle import", what=f"Model {mp.dirname}"):
                _refuse_existing(mp, index)
                copied, reused, authority = _land(source, index, hashlib.sha256(raw).hexdigest(), lay, mp, path,
                                                  progress)
        except BaseException:
            if created:
                with contextlib.suppress(OSError):  # not empty: something was committed, keep it
                    mp.root.rmdir()
            raise
    finally:
        source.close()
    return ImportResult(model=index.model, model_dir=mp.root, original=index.original,
                        profiles=[p.name for p in index.profiles], files=len(index.files), bytes_copied=copied,
                        files_reused=reused, bundle_sha256=hashlib.sha256(raw).hexdigest(),
                        seconds=time.monotonic() - t0, authority=authority)


def _land(source: _Source, index: BundleIndex, bundle_sha256: str, lay: Layout, mp: ModelPaths, path: Path,
          progress: ProgressFn | None) -> tuple[int, int, dict[str, Any]]:
    """Stage and verify every file, cross-check, commit, record the state: (bytes copied, files reused,
    the authorities that vouched for the files).
    A rejected bundle leaves no staged file; an interruption keeps the verified ones for a resume."""
    stage = mp.staging / "bundle"
    journal = _Journal(stage, bundle_sha256)
    counter = ByteCounter(progress, task="bundle:import", total=sum(f.size for f in index.files),
                          description=f"importing {index.model}", interval=0.25)
    rels = [f.path for f in index.files if f.path not in (index.manifest, index.torrent.path)]
    try:
        with disk_full_is_exit_6(stage, kept="the files verified so far stay staged; import again to resume"):
            copied, reused = _stage_all(source, index, stage, journal, counter, path)
        authority: dict[str, Any] = {}
        verify_and_commit(stage, mp.root, rels, lambda: authority.update(_cross_check(stage, index)),
                          on_interrupted=lambda: None)
    except VerifyError:
        _drop_staging(stage)
        raise
    commit_file(safe_join(stage, index.manifest), lay.manifest_file(index.model))
    _record_state(mp, index, bundle_sha256)
    _drop_staging(stage)
    return copied, reused, authority
