"""``provision bundle export``: copy a model's verified files out of the store into a bundle.

The bundle is a folder (or, with ``archive``, one uncompressed tar with ``bundle.json`` first)
holding ``original/`` and/or one converted profile's folder, exactly as the store has them
(provenance records and signature files included, as ordinary files; without the original,
its ``params.json`` goes into the index), ``manifest.lock.toml``
(the model's manifest with every original file's size and sha256 recorded), a ``.torrent`` of
all of that (so the bundle can be seeded) and ``bundle.json`` listing every file with its
size and sha256. Only what the store's state records as verified (or converted) and unchanged
is exported, and each file is hashed while it is copied: a byte that changed since is exit 5.
A folder bundle is built under a temporary name beside OUT and renamed into place; an archive's
files are hard-linked (else copied) into the store's staging area and written once, into a tar
that is renamed into place. So OUT is the whole bundle or absent; an existing OUT is refused (exit 2). It does not import bundles.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provision.errors import HashMismatchError, HostileContentError, ManifestError, UsageError
from provision.formats.manifest import Manifest, dump_manifest, load_manifest, with_file_facts
from provision.io.atomic import TMP_PREFIX, atomic_writer, disk_full_is_exit_6, fsync_dir
from provision.io.hashing import stream_file
from provision.layout import ORIGINAL, Layout, ModelPaths, model_dirname
from provision.progress import ByteCounter, ProgressFn
from provision.settings import default_home
from provision.stages.bundle.index import (
    INDEX_NAME,
    MANIFEST_NAME,
    PROFILE_DIR,
    BundleFile,
    BundleIndex,
    BundleProfile,
    BundleTorrent,
)
from provision.store.lock import ModelLock
from provision.store.state import State, load_state
from provision.version import __version__


@dataclass
class ExportResult:
    out: Path
    model: str
    archive: bool
    original: bool
    profiles: list[str]
    files: int
    bytes: int
    btih: str | None
    btmh: str | None
    manifest_sha256: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "model": self.model, "archive": self.archive, "original": self.original,
                "profiles": self.profiles, "files": self.files, "bytes": self.bytes, "btih": self.btih,
                "btmh": self.btmh, "manifest_sha256": self.manifest_sha256, "seconds": round(self.seconds, 3)}


def _walk(folder: Path) -> list[str]:
    """Relative paths of the regular files under ``folder`` (hidden names left out); a symlink or a
    special file is refused (exit 5): the store holds regular files only."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in (*filenames, *(d for d in dirnames if (Path(dirpath) / d).is_symlink())):
            p = Path(dirpath) / name
            rel = p.relative_to(folder).as_posix()
            if name.startswith("."):
                continue
            if p.is_symlink() or not p.is_file():
                raise HostileContentError(f"Refusing to export {folder.name}/{rel}: not a regular file.", path=rel)
            out.append(rel)
    return sorted(out)


def _copy_hashing(src: Path, dst: Path, counter: ByteCounter, *, link: bool) -> tuple[int, str]:
    """Copy ``src`` to ``dst`` (a new file), hashing the bytes read: (size, sha256). With ``link``,
    hard-link it instead where the filesystem allows (the tar is written from the link)."""
    h = hashlib.sha256()
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst)
        except OSError:  # another filesystem, or links not allowed: a copy does the same
            pass
        else:
            return stream_file(dst, h.update, on_bytes=counter), h.hexdigest()
    with open(dst, "xb") as fo:
        def consume(b: memoryview) -> None:
            h.update(b)
            fo.write(b)

        size = stream_file(src, consume, on_bytes=counter)
    return size, h.hexdigest()


def _known_sha256(state: State, stage: str) -> dict[str, str]:
    rec = state.get(stage)
    return {k: f.sha256 for k, f in rec.files.items() if f.sha256} if rec is not None else {}


def _manifest_for(lay: Layout, mp: ModelPaths, model: str, ref: str | Path | None) -> Manifest:
    if ref is not None:
        return load_manifest(ref)
    recorded = lay.manifest_file(model)
    if recorded.is_file():
        return load_manifest(recorded)
    try:
        return load_manifest(mp.dirname)
    except ManifestError:
        raise ManifestError(f"No manifest is recorded for {model} in the store.",
                            hint="Pass --manifest with the manifest the model was run from.") from None


def _serve_template(state: State, profile: str, folder: Path) -> str | None:
    rec = state.get(f"convert:{profile}")
    cmd = rec.facts.get("vllm_command") if rec is not None else None
    return cmd.replace(str(folder), PROFILE_DIR) if isinstance(cmd, str) and cmd else None


def export_bundle(model: str, out: Path, *, home: Path | None = None, profile: str | None = None,
                  original: bool = True, manifest: str | Path | None = None, archive: bool = False,
                  progress: ProgressFn | None = None) -> ExportResult:
    """Write the bundle of ``model`` (its verified original and/or converted ``profile``) to ``out``;
    a full disk is exit 6 with nothing left at ``out``."""
    with disk_full_is_exit_6(Path(out)):
        return _export(model, Path(out), home=home, profile=profile, original=original, manifest=manifest,
                       archive=archive, progress=progress)


def _export(model: str, out: Path, *, home: Path | None, profile: str | None, original: bool,
            manifest: str | Path | None, archive: bool, progress: ProgressFn | None) -> ExportResult:
    t0 = time.monotonic()
    if os.path.lexists(out):
        raise UsageError(f"Refusing to overwrite {out}: it exists.", hint="Pick a new OUT or remove it first.")
    if not out.parent.is_dir():
        raise UsageError(f"Cannot write {out}: {out.parent} is not a folder.")
    if not original and profile is None:
        raise UsageError("Nothing to export: --no-original needs --profile.")
    lay = Layout(Path(home) if home else default_home())
    mp = lay.model(model)
    if not mp.root.is_dir():
        raise UsageError(f"{model} is not in the store ({lay.models}).", hint="See provision ls.")
    folders: list[tuple[str, Path, dict[str, str]]] = []
    with ModelLock(mp.lock_file, command="bundle export", what=f"Model {mp.dirname}"):
        state = load_state(mp.state_file)
        if original:
            check = state.check("verify")
            if not check.ok or not mp.original.is_dir():
                raise UsageError(f"{model} has no verified, unchanged original in the store "
                                 f"({check.reasons[0] if check.reasons else 'original/ is missing'}).",
                                 hint="Run provision run first, or pass --no-original with --profile.")
            folders.append((ORIGINAL, mp.original, _known_sha256(state, "verify")))
        if profile is not None:
            prof = model_dirname(profile)
            pdir = mp.profile(prof)
            check = state.check(f"convert:{prof}")
            if not check.ok or not pdir.is_dir():
                raise UsageError(f"{model} has no converted, unchanged profile {prof} in the store.",
                                 hint="See provision ls for the profiles it has.")
            folders.append((prof, pdir, {}))
        m = _manifest_for(lay, mp, model, manifest)
        # a folder is built beside OUT and renamed; an archive's files are hard links in the store's
        # staging area, written once, into the tar
        tmp = (lay.staging_root if archive else out.parent) / f"{TMP_PREFIX}bundle-{out.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            files: list[BundleFile] = []
            listing = [(name, folder, known, _walk(folder)) for name, folder, known in folders]
            counter = ByteCounter(progress, task="bundle:export", interval=0.25, description=f"exporting {mp.dirname}",
                                  total=sum((folder / rel).stat().st_size for _, folder, _, rels in listing
                                            for rel in rels))
            for name, folder, known, rels in listing:
                for rel in rels:
                    size, sha = _copy_hashing(folder / rel, tmp / name / rel, counter, link=archive)
                    if rel in known and known[rel] != sha:
                        raise HashMismatchError(f"{folder / rel} changed since it was verified (sha256 {sha}, "
                                                f"verified {known[rel]}).", path=str(folder / rel))
                    files.append(BundleFile(f"{name}/{rel}", size, sha))
            counter.finish()
            facts = {f.path.split("/", 1)[1]: (f.size, f.sha256) for f in files if f.path.startswith(ORIGINAL + "/")}
            for spec in m.files:
                got = facts.get(spec.path)
                if got is not None and spec.sha256 and (spec.sha256, spec.size or got[0]) != (got[1], got[0]):
                    raise HashMismatchError(f"original/{spec.path} does not match manifest {m.name}.",
                                            path=spec.path)
            text = dump_manifest(with_file_facts(m, facts)).encode()
            (tmp / MANIFEST_NAME).write_bytes(text)
            files.append(BundleFile(MANIFEST_NAME, len(text), hashlib.sha256(text).hexdigest()))
            from provision.stages.fetch.torrent.create import create_torrent

            ct = create_torrent(tmp, files=sorted((f.path, f.size) for f in files), name=mp.dirname,
                                progress=progress)
            tpath = f"{mp.dirname}.torrent"
            (tmp / tpath).write_bytes(ct.data)
            files.append(BundleFile(tpath, len(ct.data), hashlib.sha256(ct.data).hexdigest()))
            params = None if original else _original_params(mp, state)
            profiles = tuple(BundleProfile(name, *_convert_facts(state, name), _serve_template(state, name, folder))
                             for name, folder, _ in folders if name != ORIGINAL)
            index = BundleIndex(model=mp.dirname, manifest=MANIFEST_NAME,
                                torrent=BundleTorrent(tpath, ct.name, ct.btih, ct.btmh), original=original,
                                profiles=profiles, files=tuple(sorted(files, key=lambda f: f.path)),
                                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), tool_version=__version__,
                                original_params=params)
            (tmp / INDEX_NAME).write_bytes(index.to_json())
            if archive:
                _write_tar(tmp, index, out)
            else:
                os.rename(tmp, out)
                fsync_dir(out.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out=out, model=mp.dirname, archive=archive, original=original,
                        profiles=[p.name for p in profiles], files=len(files) + 1,
                        bytes=sum(f.size for f in files), btih=ct.btih, btmh=ct.btmh,
                        manifest_sha256=hashlib.sha256(text).hexdigest(), seconds=time.monotonic() - t0)


def _original_params(mp: ModelPaths, state: State) -> dict[str, Any] | None:
    """The original's params.json (from original/, or as recorded when --drop-original removed it)."""
    if (mp.original / "params.json").is_file():
        from provision.formats.params import read_params_file

        return read_params_file(mp.original / "params.json")[1]
    return state.dropped_params()


def _convert_facts(state: State, profile: str) -> tuple[str | None, str | None]:
    rec = state.get(f"convert:{profile}")
    facts = rec.facts if rec is not None else {}
    scheme, layout = facts.get("scheme"), facts.get("layout")
    return (scheme if isinstance(scheme, str) else None, layout if isinstance(layout, str) else None)


def _write_tar(folder: Path, index: BundleIndex, out: Path) -> None:
    """One plain tar, ``bundle.json`` first, then the files in index order; regular files only,
    no owners, written atomically to ``out``."""
    with atomic_writer(out) as fh, tarfile.open(fileobj=fh, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        for rel in (INDEX_NAME, *(f.path for f in index.files)):
            p = folder / rel
            ti = tarfile.TarInfo(rel)
            ti.size = p.stat().st_size
            ti.mode = 0o644
            ti.mtime = int(p.stat().st_mtime)
            with open(p, "rb") as f:
                tf.addfile(ti, f)
    with contextlib.suppress(OSError):
        fsync_dir(out.parent)
