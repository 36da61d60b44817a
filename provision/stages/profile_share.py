"""Quantize once, seed the result: publish a converted profile to a swarm, and take one from it.

``seed_profile`` serves a committed profile folder (its ``provenance.json`` included, after the
folder was checked against it) together with its signature, as one torrent laid out like the
store (``<profile>/…`` and ``<profile>_signature.sig``), through ``stages.fetch.torrent.seed``.
``SharedProfile`` is the other side, for ``provision run SOURCE --profile-from MAGNET|TORRENT``:
it downloads that torrent into staging (``fetch_torrent``: pieces checked on arrival), then checks
the signature against a trusted public key or certificate chain (``--trust-key``,
``--trust-certificate-chain``, else the manifest's ``[signing]`` public key, else its certificate
chain), the files against the record, and the record's source against SOURCE's manifest (or
magnet / Hub reference); only then does it move the profile (and its signature) into
``models/<model>/`` and record it in the state file as the model's converted profile. Any failure
there is a one-line ``VerifyError`` (exit 5) and nothing is committed. A profile of the same name
converted on this host is never replaced silently: the take is refused (``UsageError``, exit 2,
nothing committed) unless ``force`` (``run --force``); one taken earlier from another torrent is
replaced, and the progress says so. It never downloads the original and never converts; the
caller (``pipeline``) smoke-tests the result.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provision.errors import StructureError, UsageError, VerifyError
from provision.formats import provenance
from provision.formats.sources import HFRef, Magnet, parse_magnet
from provision.io.atomic import fsync_dir
from provision.layout import ORIGINAL, Layout, model_dirname
from provision.progress import ProgressFn, note
from provision.store.remove import PROFILE_SIGNATURE_SUFFIX

if TYPE_CHECKING:
    from provision.formats.manifest import Manifest
    from provision.stages.fetch.request import FetchRequest, PlannedFile, TorrentOptions
    from provision.stages.fetch.torrent.seed import SeedResult
    from provision.store.state import State

# a profile's signature sits beside it: models/<model>/<profile>_signature.sig (not "<profile>.sig": in a
# hybrid torrent a folder "x" beside a file "x.sig" breaks libtorrent 2.0's v1/v2 file order check)
SIGNATURE_SUFFIX = PROFILE_SIGNATURE_SUFFIX  # "_signature.sig": `provision rm --profile` and gc know it too
HOW = "profile-from"  # the ``how`` fact of a profile taken from a swarm, in the state file
_PEER = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$")


def signature_beside(folder: Path) -> Path:
    """Where a profile's signature is kept: ``<folder>_signature.sig`` beside the folder."""
    folder = Path(folder)
    return folder.with_name(folder.name + SIGNATURE_SUFFIX)


def is_profile_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a converted profile: a ``provenance.json`` with a recipe."""
    if not (Path(folder) / provenance.PROVENANCE_NAME).is_file():
        return False
    with contextlib.suppress(VerifyError):
        return provenance.read(Path(folder)).get("recipe") is not None
    return False


# ---------------------------------------------------------------------------------------
# publishing (the origin)


@contextlib.contextmanager
def _publish_folder(folder: Path, signature: Path | None, name: str) -> Iterator[Path]:
    """A hidden folder beside ``folder`` holding ``name/<profile>/…`` (hard links to the profile's
    files; copies across filesystems) and ``name/<profile>_signature.sig``: the torrent's contents."""
    tmp = Path(tempfile.mkdtemp(prefix=".provision-share-", dir=folder.parent))
    try:
        root = tmp / name
        dest = root / folder.name
        for rel in [*provenance.list_files(folder), provenance.PROVENANCE_NAME]:
            src, dst = folder / rel, dest / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:  # another filesystem (or no hard links): a copy serves the same bytes
                shutil.copyfile(src, dst)
        if signature is not None:
            shutil.copyfile(signature, root / (folder.name + SIGNATURE_SUFFIX))
        yield root
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class ProfileSeed:
    """A profile seeded: the seed's own result, the profile, its record and its signature."""

    seed: SeedResult
    profile: str
    folder: Path
    record_sha256: str
    signature: Path | None

    def to_dict(self) -> dict[str, Any]:
        d = self.seed.to_dict()
        d["profile"] = {"name": self.profile, "folder": str(self.folder), "record_sha256": self.record_sha256,
                        "signature": str(self.signature) if self.signature is not None else None}
        return d


def seed_profile(folder: Path, *, signature: Path | None = None, version: str = "hybrid",
                 progress: ProgressFn | None = None, **seed_options: Any) -> ProfileSeed:
    """Seed the converted profile in ``folder`` with its record and signature (``signature``, else
    ``<folder>_signature.sig`` when it exists). The folder is checked against its ``provenance.json`` first
    (exit 5 when it no longer matches). ``seed_options`` are ``stages.fetch.torrent.seed``'s."""
    from provision.stages.fetch.torrent.seed import seed

    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        raise UsageError(f"{folder} is not a profile folder.", path=str(folder))
    if not (folder / provenance.PROVENANCE_NAME).is_file():
        raise UsageError(f"{folder} has no {provenance.PROVENANCE_NAME}: only a converted profile with its "
                         "record can be seeded as a profile.", hint="Convert it with provision run or convert.")
    record = provenance.read(folder)
    if record.get("recipe") is None:
        raise UsageError(f"{folder}'s record has no recipe: it is not a converted profile.", path=str(folder))
    if version not in ("hybrid", "v1"):
        raise UsageError("A profile is seeded as a hybrid or v1 torrent (--torrent-version hybrid or v1).")
    provenance.check(folder, record)
    if signature is None and signature_beside(folder).is_file():
        signature = signature_beside(folder)
    if signature is not None and not Path(signature).is_file():
        raise UsageError(f"--signature {signature} does not exist.", path=str(signature))
    name = model_dirname(f"{folder.resolve().parent.name}-{folder.name}")
    note(progress, "seed", f"publishing profile {folder.name} with its record"
                           + (f" and signature {Path(signature).name}" if signature is not None else " (unsigned)"))
    with _publish_folder(folder, Path(signature) if signature is not None else None, name) as root:
        res = seed(root, version=version, progress=progress, **seed_options)
    return ProfileSeed(seed=res, profile=folder.name, folder=folder, record_sha256=provenance.record_sha256(folder),
                       signature=Path(signature) if signature is not None else None)


# ---------------------------------------------------------------------------------------
# taking a profile from the swarm (a fleet member)


@dataclass(frozen=True)
class ProfileRef:
    """Where a shared profile comes from: a magnet (its x.pe / tr name the seeders) or a .torrent."""

    text: str
    magnet: Magnet | None = None
    torrent_path: Path | None = None


def parse_profile_ref(value: str) -> ProfileRef:
    """``--profile-from``'s value: a magnet or a .torrent file; a bare HOST:PORT is exit 2 (the
    infohash must be known: pass the seeder's magnet, which names it as x.pe, or its .torrent)."""
    v = value.strip()
    if v.startswith("magnet:"):
        return ProfileRef(text=v, magnet=parse_magnet(v))
    p = Path(v)
    if p.is_file():
        return ProfileRef(text=v, torrent_path=p)
    if _PEER.match(v):
        raise UsageError(f"--profile-from {v}: a peer alone does not say which torrent to ask it for.",
                         hint="Pass the seeder's magnet (provision seed prints it; it names the seeder), or its "
                              ".torrent with --peer HOST:PORT.")
    raise UsageError(f"--profile-from {v!r} is neither a magnet link nor an existing .torrent file.")


@dataclass(frozen=True)
class _ShareRequest:
    """The ``FetchRequest`` of a shared profile's torrent (every file of it, into ``dest``)."""

    source: str
    kind: Any
    name: str
    home: Path
    dest: Path
    magnet: Magnet | None
    torrent_file: Path | None
    files: Sequence[PlannedFile] = ()
    manifest: Manifest | None = None
    hf: HFRef | None = None
    hub_snapshot: Any = None


def _names(d: Mapping[str, Any] | None, *keys: str) -> Any:
    for k in keys:
        d = d.get(k) if isinstance(d, Mapping) else None
    return d


def check_source(record: Mapping[str, Any], plan: FetchRequest) -> dict[str, Any]:
    """Check that ``record``'s source is SOURCE (``plan``): every identity both name must agree
    (manifest name, infohash, Hub repository and commit, each pinned file's size and sha256), and at
    least one must tie them. ``VerifyError`` (exit 5) otherwise; returns what matched."""
    src = record.get("source") or {}
    m = plan.manifest
    matched: list[str] = []
    want = f"SOURCE {plan.source[:120]}"

    def differs(what: str, theirs: Any, ours: Any) -> VerifyError:
        return VerifyError(f"The shared profile's provenance record names another source: its {what} is "
                           f"{str(theirs)[:80]!r}, {want} has {str(ours)[:80]!r}; refusing it.", what=what)

    rec_manifest = src.get("manifest") or {}
    if m is not None and rec_manifest.get("name"):
        if rec_manifest["name"] != m.name:
            raise differs("manifest name", rec_manifest["name"], m.name)
        if m.sha256 and rec_manifest.get("sha256") == m.sha256:
            matched.append("manifest sha256")
    btih = plan.magnet.btih if plan.magnet is not None else None
    for s in m.sources if m is not None else ():
        if s.type == "torrent" and s.magnet and btih is None:
            with contextlib.suppress(ValueError):
                btih = parse_magnet(s.magnet).btih
    if btih and src.get("btih"):
        if str(src["btih"]).lower() != btih.lower():
            raise differs("infohash", src["btih"], btih)
        matched.append("btih")
    repo, rev = (plan.hf.repo, plan.hf.revision) if plan.hf is not None else (None, None)
    hf_src = m.source("hf") if m is not None else None
    if hf_src is not None and hf_src.repo:
        repo, rev = repo or hf_src.repo, rev or hf_src.revision
    if repo and _names(src, "hf", "repo"):
        if str(_names(src, "hf", "repo")).lower() != repo.lower():
            raise differs("Hub repository", _names(src, "hf", "repo"), repo)
        commit = _names(src, "hf", "commit")
        if rev and len(rev) == 40 and commit:
            if str(commit).lower() != rev.lower():
                raise differs("Hub commit", commit, rev)
            matched.append("hf commit")
    if m is not None:
        pinned = {f.path: (f.size, f.sha256) for f in m.files if f.sha256}
        for f in src.get("files") or []:
            path, size, sha = str(f["path"]), int(f["size"]), str(f["sha256"])
            if m.files and m.file(path) is None:
                raise differs("source file", path, "no such file")
            if path in pinned:
                psize, psha = pinned[path]
                if psha != sha or (psize is not None and psize != size):
                    raise differs(f"{path} (sha256)", sha[:16] + "…", str(psha)[:16] + "…")
                matched.append(f"file {path}")
    if not matched:
        raise VerifyError(f"The shared profile's provenance record cannot be tied to {want}: no manifest hash, "
                          "infohash, Hub commit or file hash the two share; refusing it.")
    return {"matched": matched}


@dataclass
class Fetched:
    """A shared profile committed into the store (``Outcome``'s inputs for the pipeline)."""

    profile: str
    folder: Path
    signature: Path | None
    infohash: str
    bytes_downloaded: int
    details: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)


class SharedProfile:
    """One ``--profile-from`` of ``plan``'s model into the store under ``home`` (the caller holds the
    model's lock): ``recorded`` finds an earlier, still valid take, ``fetch`` does one."""

    def __init__(self, plan: FetchRequest, ref: str, *, home: Path, torrent: TorrentOptions,
                 trust_key: Path | None = None, allow_unsigned: bool = False,
                 trust_certificate_chain: Sequence[Path] = (), force: bool = False,
                 progress: ProgressFn | None = None) -> None:
        self.plan, self.home, self.progress = plan, Path(home), progress
        self.ref = parse_profile_ref(ref)
        # seeding starts once committed; nothing reads the files in order while they arrive: rarest pieces
        # first from the start, so members starting together ask the origin for different pieces
        self.options = replace(torrent, seed_for=0.0, include=(), in_order=False)
        self.seed_for = float(torrent.seed_for)
        self.trust_key = Path(trust_key) if trust_key is not None else None
        if self.trust_key is not None and not self.trust_key.is_file():
            raise UsageError(f"--trust-key {self.trust_key} does not exist.", path=str(self.trust_key))
        self.trust_chain = tuple(Path(c) for c in trust_certificate_chain)
        if self.trust_key is not None and self.trust_chain:
            raise UsageError("--profile-from takes --trust-key or --trust-certificate-chain, not both.",
                             hint="Pass the one the publisher signs with: a key, or a certificate chain.")
        for c in self.trust_chain:
            if not c.is_file():
                raise UsageError(f"--trust-certificate-chain {c} does not exist.", path=str(c))
        self.force = force
        # without --trust-key / --trust-certificate-chain, what SOURCE's manifest pins in its [signing]
        # table (PEM bytes): its public key, else its certificate chain
        signing = getattr(plan.manifest, "signing", None)
        pinned = getattr(signing, "public_key", None)
        explicit = self.trust_key is not None or bool(self.trust_chain)
        self.pinned_key: bytes | None = pinned if isinstance(pinned, bytes) and not explicit else None
        chain = getattr(signing, "certificate_chain", ()) or ()
        self.pinned_chain: tuple[bytes, ...] = (
            tuple(c for c in chain if isinstance(c, bytes)) if not explicit and self.pinned_key is None else ())
        if not explicit and self.pinned_key is None and not self.pinned_chain and not allow_unsigned:
            raise UsageError("--profile-from needs a key to check the profile's signature against.",
                             hint="Pass --trust-key PUBLISHER.pub.pem or --trust-certificate-chain ROOT.crt, pin "
                                  "one in the manifest's [signing] table, or pass --allow-unsigned to trust the "
                                  "record alone.")
        self.lay = Layout(self.home)
        self.model = self.lay.model(plan.name)
        self.request = _ShareRequest(
            source=self.ref.text, kind="magnet" if self.ref.magnet is not None else "torrent", name=plan.name,
            home=self.home, dest=self.model.staging / "share", magnet=self.ref.magnet,
            torrent_file=self.ref.torrent_path)
        from provision.stages.fetch.torrent.job import resolve_source

        self.key = resolve_source(self.request).key

    @property
    def staging(self) -> Path:
        return self.model.staging / f"share-{self.key[:16]}"

    def recorded(self, state: State) -> str | None:
        """The profile an earlier run took from this same torrent, when its record still holds."""
        from provision.store.state import split_stage

        for name, rec in state.stages.items():
            base, qual = split_stage(name)
            if (base == "convert" and qual and rec.facts.get("how") == HOW
                    and rec.facts.get("infohash") == self.key and state.stage_valid(name)
                    and self.model.profile(qual).is_dir()):
                return qual
        return None

    def fetch(self, state: State | None = None) -> Fetched:
        """Download, check (layout, signature, record, source) and commit; see the module docstring.
        ``state`` (the model's state file) tells a profile converted here from one taken earlier."""
        from provision.stages.fetch.torrent import fetch_torrent

        t0 = time.monotonic()
        stage = self.staging
        req = replace(self.request, dest=stage)
        note(self.progress, "fetch", f"fetching the shared profile {self.key[:16]}… (never the original)")
        res = fetch_torrent(req, dest=stage, options=self.options, progress=self.progress)
        try:
            prof, record, checks = self._check(stage)
            self._check_replace(prof, state)
            out = self._commit(stage, prof)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        sig = out.with_name(out.name + SIGNATURE_SUFFIX)
        files = {f"{prof}/{rel}": out / rel for rel in [*provenance.list_files(out), provenance.PROVENANCE_NAME]}
        sha = {f"{prof}/{f['path']}": str(f["sha256"]) for f in record["files"]}
        if sig.is_file():
            files[sig.name] = sig
        details: dict[str, Any] = {"how": HOW, "from": self.ref.text[:300], "infohash": self.key,
                                   "profile": prof, "profile_dir": str(out),
                                   "signature": str(sig) if sig.is_file() else None,
                                   "record_sha256": provenance.record_sha256(out), "checks": checks,
                                   "files": len(files), "fetch": res.to_dict(),
                                   "seconds": round(time.monotonic() - t0, 3)}
        recipe = record.get("recipe") or {}
        return Fetched(profile=prof, folder=out, signature=sig if sig.is_file() else None, infohash=self.key,
                       bytes_downloaded=res.bytes_downloaded, details=details, files=files, sha256=sha,
                       facts={"how": HOW, "infohash": self.key, "scheme": recipe.get("scheme"),
                              "layout": recipe.get("layout"), "vllm_command": self._serve_command(out)})

    def _check(self, stage: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """The torrent holds exactly one profile folder and (maybe) its signature; the signature
        verifies against the trusted key, the files match the record, the record names SOURCE."""
        from provision.stages.sign import verify_folder_signature

        tops = sorted(os.listdir(stage)) if stage.is_dir() else []
        folders = [t for t in tops if (stage / t).is_dir() and not (stage / t).is_symlink()]
        if len(folders) != 1 or folders[0] == ORIGINAL or folders[0] != model_dirname(folders[0]):
            raise StructureError(f"The shared torrent holds {', '.join(tops) or 'nothing'}: a shared profile is "
                                 "one profile folder and its signature.", path=str(stage))
        prof = folders[0]
        extra = [t for t in tops if t not in (prof, prof + SIGNATURE_SUFFIX)]
        if extra:
            raise StructureError(f"The shared torrent holds {extra[0]} besides the profile {prof} and its "
                                 "signature; refusing it.", path=str(stage / extra[0]))
        folder, sig = stage / prof, stage / (prof + SIGNATURE_SUFFIX)
        record = provenance.read(folder)
        recipe = record.get("recipe")
        if not recipe:
            raise StructureError(f"The shared {prof} has a provenance record without a recipe: not a profile.")
        if model_dirname(str(recipe.get("profile", ""))) != prof:
            raise StructureError(f"The shared folder is called {prof} but its record describes the profile "
                                 f"{str(recipe.get('profile'))[:60]!r}; refusing it.")
        checks: dict[str, Any] = {}
        if self.trust_key is not None or self.pinned_key is not None or self.trust_chain or self.pinned_chain:
            if not sig.is_file():
                raise VerifyError(f"The shared profile {prof} is not signed, and a signature by the trusted key "
                                  "is required; refusing it.")
            with self._anchor() as (key, chain, label):  # checks the record first
                r = verify_folder_signature(folder, signature=sig, public_key=key, certificate_chain=chain)
            checks["signature"] = {"verified": True, "sha256": r.signature_sha256, "files": r.files,
                                   "key": label, "method": r.method}
        else:
            provenance.check(folder, record)
            checks["signature"] = {"verified": False, "reason": "--allow-unsigned"}
            note(self.progress, "fetch", f"{prof}: no signature checked (--allow-unsigned); trusting its record")
        checks["provenance"] = {"files": len(record["files"]), "matched": True}
        checks["source"] = check_source(record, self.plan)
        return prof, record, checks

    @contextlib.contextmanager
    def _anchor(self) -> Iterator[tuple[Path | None, list[Path], str]]:
        """What the signature must verify against, as files: (public key, certificate chain, where from):
        --trust-key, --trust-certificate-chain, else the manifest's pinned PEM written to temporaries."""
        if self.trust_key is not None:
            yield self.trust_key, [], "--trust-key"
            return
        if self.trust_chain:
            yield None, list(self.trust_chain), "--trust-certificate-chain"
            return
        with tempfile.TemporaryDirectory(prefix="provision-key-") as tmp:
            if self.pinned_key is not None:
                path = Path(tmp) / "pinned.pub.pem"
                path.write_bytes(self.pinned_key)
                yield path, [], "manifest [signing]"
                return
            paths: list[Path] = []
            for i, pem in enumerate(self.pinned_chain):
                paths.append(Path(tmp) / f"chain{i}.pem")
                paths[-1].write_bytes(pem)
            yield None, paths, "manifest [signing] certificate_chain"

    def _check_replace(self, prof: str, state: State | None) -> None:
        """Refuse (exit 2) to replace a profile of the same name that was converted on this host (or
        whose origin the state file does not tell) unless ``force``; one taken earlier from the swarm
        is replaced, and the progress says so."""
        out = self.model.profile(prof)
        if not (out.exists() or out.is_symlink()):
            return
        rec = state.stages.get(f"convert:{prof}") if state is not None else None
        if rec is not None and rec.facts.get("how") == HOW:
            note(self.progress, "fetch", f"{prof}: replacing the copy taken earlier from torrent "
                                         f"{str(rec.facts.get('infohash'))[:16]}…")
            return
        if self.force:
            note(self.progress, "fetch", f"{prof}: replacing the profile converted here (--force)")
            return
        raise UsageError(f"Model {self.model.dirname} already has a profile {prof} converted here; the shared "
                         f"{prof} would replace it, so nothing was taken.",
                         hint=f"Pass --force to replace it, or remove it first with `provision rm "
                              f"{self.model.dirname} --profile {prof}`.", path=str(out))

    def _commit(self, stage: Path, prof: str) -> Path:
        """Move the checked profile (and its signature) into the model folder; a profile folder
        already there is replaced (after the new one is complete beside it)."""
        out = self.model.profile(prof)
        out.parent.mkdir(parents=True, exist_ok=True)
        old = out.with_name(f".provision-tmp-old-{prof}")
        if old.exists():
            shutil.rmtree(old)
        if out.exists():
            os.rename(out, old)
        os.rename(stage / prof, out)
        sig = stage / (prof + SIGNATURE_SUFFIX)
        kept_sig = out.with_name(prof + SIGNATURE_SUFFIX)
        if sig.is_file():
            os.replace(sig, kept_sig)
        else:
            with contextlib.suppress(FileNotFoundError):  # an older signature does not belong to these files
                kept_sig.unlink()
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(stage, ignore_errors=True)
        return out

    @staticmethod
    def _serve_command(out: Path) -> str | None:
        """The conversion record's serve command, pointed at this host's copy."""
        from provision.stages.convert.record import read_record

        with contextlib.suppress(OSError, ValueError, KeyError):
            rec = read_record(out)
            cmd, made_in = rec.get("vllm_command"), rec.get("out_dir")
            if isinstance(cmd, str) and cmd:
                return cmd.replace(str(made_in), str(out)) if isinstance(made_in, str) and made_in else cmd
        return None

    def seed(self) -> dict[str, Any] | None:
        """Serve the committed profile (the same torrent) in the active ``background_seeding()`` scope
        for ``--seed-for`` seconds, so later members fetch from this one too."""
        if self.seed_for <= 0:
            return None
        from provision.stages.fetch.torrent import seed_verified

        req = replace(self.request, dest=self.model.root)
        return seed_verified(req, self.model.root, replace(self.options, seed_for=self.seed_for), self.progress)


__all__ = ["HOW", "SIGNATURE_SUFFIX", "Fetched", "ProfileRef", "ProfileSeed", "SharedProfile", "check_source",
           "is_profile_folder", "parse_profile_ref", "seed_profile", "signature_beside"]
