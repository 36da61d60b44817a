"""The pipeline behind `provision run`: plan -> fetch -> verify -> convert -> smoke, resumable.

Each stage is a library function (``stages.fetch.fetch`` or ``stages.adopt.adopt``,
``stages.verify.verify_files``, ``stages.convert.convert``, ``stages.smoke.smoke``) wrapped in a
``Stage``; a pickled torrent release (``stages.pickle_release``) fetches into staging and adds
an ``import`` stage before verify. ``run_pipeline`` runs them under the model's lock and records
every finished stage in ``state.json`` with the facts of the files it relied on, so a rerun skips
what still matches and a run killed anywhere resumes (``reverify`` re-hashes everything). The conversion profile is
chosen once, before the fetch when params.json is known, else from the verified original. It
never prints: progress goes through the callback, failures are ``ProvisionError``s, and the
result carries one record per stage for the report.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provision.errors import ProvisionError
from provision.formats.manifest import FileSpec, Manifest, Source, load_manifest, write_manifest
from provision.formats.provenance import PROVENANCE_NAME, SourceIdentity
from provision.layout import Layout, model_dirname
from provision.progress import ProgressFn, note
from provision.settings import Settings
from provision.stages.fetch import HubOptions, TorrentOptions
from provision.stages.plan import Plan, make_plan
from provision.store.state import State, load_state, save_state

if TYPE_CHECKING:
    from provision.formats.params import ModelArgs
    from provision.hardware import Target
    from provision.stages.overlap import Overlap
    from provision.stages.pickle_release import PickledRelease
    from provision.stages.profiles import Profile
    from provision.stages.verify.torrent import TorrentRef


@dataclass
class RunOptions:
    source: str = "auto"  # auto | torrent | hf
    target: str = "auto"
    scheme: str = "auto"
    layout: str | None = None
    context: int = 32768
    device: str = "auto"
    adopt: Path | None = None
    discover_hf_cache: bool = True
    drop_original: bool = False
    reverify: bool = False
    skip_smoke: bool = False
    skip_convert: bool = False
    torrent: TorrentOptions = field(default_factory=TorrentOptions)
    hub: HubOptions = field(default_factory=HubOptions)
    lock_timeout: float | None = None
    keep_pickle: bool = False  # a pickled torrent release: keep the pickle in staging after the import
    convert_workers: int | None = None  # threads converting tensors (None: PROVISION_CONVERT_WORKERS or the CPUs)
    overlap: bool = True  # convert what the download has delivered while the rest arrives (stages.overlap)
    profile_from: str | None = None  # a shared profile's magnet or .torrent: fetched instead of original + convert
    trust_key: Path | None = None  # the public key a --profile-from signature must verify against
    allow_unsigned: bool = False  # --profile-from without a key: trust the provenance record alone
    trust_certificate_chain: tuple[Path, ...] = ()  # --profile-from: certificates a certificate signature chains to
    replace_local_profile: bool = False  # --profile-from --force: replace a profile of the same name converted here
    smoke_engine: str | None = None  # provision | vllm | both; None: stages.smoke_vllm.default_engine


@dataclass
class RunResult:
    plan: Plan
    dry_run: bool
    stages: list[dict[str, Any]] = field(default_factory=list)
    model_dir: Path | None = None
    profile: str | None = None
    profile_dir: Path | None = None
    vllm_command: str | None = None
    provenance: dict[str, str] | None = None  # the profile's provenance.json: path and sha256
    ready_after_last_byte_seconds: float | None = None  # last source byte -> profile committed (both in this run)
    overlap: dict[str, Any] | None = None  # how the conversion overlapped the fetch (stages.overlap)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"plan": self.plan.to_dict(), "dry_run": self.dry_run, "stages": self.stages}
        if self.model_dir is not None:
            d["model_dir"] = str(self.model_dir)
        if self.profile is not None:
            d["profile"] = self.profile
            d["profile_dir"] = str(self.profile_dir)
        if self.vllm_command:
            d["vllm_command"] = self.vllm_command
        if self.provenance is not None:
            d["provenance"] = self.provenance
        if self.ready_after_last_byte_seconds is not None:
            d["ready_after_last_byte_seconds"] = self.ready_after_last_byte_seconds
        if self.overlap is not None:
            d["overlap"] = self.overlap
        return d


def _record(result: RunResult, stage: str, outcome: str, seconds: float, nbytes: int,
            details: dict[str, Any] | None = None, **extra: Any) -> None:
    rec: dict[str, Any] = {"stage": stage, "result": outcome, "seconds": round(seconds, 3), "bytes": int(nbytes),
                           "details": details or {}}
    rec.update({k: v for k, v in extra.items() if v is not None})
    result.stages.append(rec)


def _files_of(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def _locked_manifest(plan: Plan, facts: dict[str, tuple[int, str]], fetch_extra: dict[str, Any]) -> Manifest:
    """A manifest for a bare magnet / hf:// source, pinned to what a verified fetch delivered."""
    sources: list[Source] = []
    if plan.magnet is not None:
        sources.append(Source(type="torrent", magnet=plan.magnet.uri, prefix=""))
    if plan.hf is not None:
        rev = fetch_extra.get("commit") or fetch_extra.get("revision") or plan.hf.revision  # hub: commit
        if rev and len(rev) == 40:
            sources.append(Source(type="hf", repo=plan.hf.repo, revision=rev))
    if plan.torrent_file is not None:
        sources.append(Source(type="torrent", torrent=plan.torrent_file.name))
    if not sources:  # pragma: no cover - a manifest plan never gets here
        raise ProvisionError("internal: no source to record")
    files = tuple(FileSpec(path=p, size=s, sha256=h) for p, (s, h) in sorted(facts.items()))
    arch = "pixtral"
    return Manifest(name=model_dirname(plan.name).lower(), architecture=arch, format="mistral",
                    sources=tuple(sources), files=files,
                    description=f"Recorded by provision run from {plan.source[:120]}")


def _params_before_fetch(plan: Plan) -> ModelArgs | None:
    """The model's params.json when known before any download: the manifest's ``[params]`` or
    an original already on disk."""
    from provision.formats.params import ModelArgs

    if plan.manifest is not None and plan.manifest.params is not None:
        return ModelArgs.from_dict(plan.manifest.params)
    if (plan.dest / "params.json").is_file():
        return ModelArgs.from_file(plan.dest / "params.json")
    return None


def _choose_profile(args: ModelArgs, opts: RunOptions, target: Target) -> Profile:
    """The conversion profile: nothing fits -> exit 6, a scheme the target cannot run -> exit 3."""
    from provision.stages.profiles import choose

    return choose(args, target, opts.scheme, opts.layout, context=opts.context)


def _background_seeding(opts: RunOptions) -> AbstractContextManager[Any]:
    """With --seed-for, a torrent fetch keeps serving from a thread while the later stages run."""
    if opts.torrent.seed_for <= 0 or opts.source == "hf":
        return nullcontext(None)
    from provision.stages.fetch.torrent import background_seeding

    return background_seeding()


@dataclass(frozen=True)
class Outcome:
    """What a stage that ran hands back: the report's bytes and details, the state record's inputs."""

    nbytes: int
    details: dict[str, Any]
    files: Mapping[str, Path] | list[Path]
    facts: dict[str, Any] | None = None
    sha256: dict[str, str] | None = None
    key: str | None = None  # the state key, when only the run learns it (a profile taken with --profile-from)


@dataclass(frozen=True)
class Stage:
    """One resumable step: ``is_valid`` says the recorded result still holds (skip it), ``run`` redoes it."""

    name: str  # in the report: fetch | import | verify | convert | smoke
    key: str  # in the state file: fetch, verify, convert:<profile>, smoke:<profile or original>
    is_valid: Callable[[], bool]
    run: Callable[[], Outcome]
    skip_reason: str
    profile: str | None = None
    invalidate_first: bool = False  # forget the record (and later stages') before redoing it
    keep_on_reverify: bool = False  # skipped when valid even under --reverify (nothing left to re-check)
    on_skip: Callable[[], None] | None = None


class _Run:
    """The state one `provision run` threads through its stages (under the model's lock)."""

    def __init__(self, plan: Plan, opts: RunOptions, lay: Layout, result: RunResult, state: State,
                 progress: ProgressFn | None, seeding: Any, chosen: tuple[Target, Profile] | None) -> None:
        self.plan, self.opts, self.lay, self.result, self.state = plan, opts, lay, result, state
        self.progress, self.seeding, self.chosen = progress, seeding, chosen
        self.state_path = lay.state_file(plan.name)
        self.original = plan.dest
        self.manifest: Manifest | None = plan.manifest
        self.pickled: PickledRelease | None = None
        self.overlap: Overlap | None = None  # the conversion running while the torrent downloads
        self.fetch_started_at: float | None = None
        self.last_byte_at: float | None = None  # the fetch's last source byte arrived
        self.ready_at: float | None = None  # the profile was committed

    def stages(self) -> Iterator[Stage]:
        """The stages in order; each is built once the ones before it ran (convert needs the params)."""
        st, opts = self.state, self.opts
        kept = ("original dropped after a verified conversion (--drop-original); the converted profile is "
                "still valid") if st.original_dropped else None
        if opts.profile_from is not None:  # a profile from the swarm: no original, no conversion
            yield from self.shared_profile_stages()
            return
        self.pickled = self._pickled_release()
        if self.pickled is None:
            yield Stage("fetch", "fetch", self.original_ready, self.fetch, kept or "already fetched and unchanged",
                        invalidate_first=True, on_skip=self.seed_earlier_fetch)
        else:  # a pickled torrent release: the pickle into staging, then imported into the original
            yield Stage("fetch", "fetch", self.pickle_fetched, self.fetch_pickled, kept or "already fetched",
                        invalidate_first=True, keep_on_reverify=True)  # --reverify re-checks the import instead
            yield Stage("import", "import", self.pickle_imported, self.import_pickled,
                        kept or "imported and unchanged", invalidate_first=True)
            self.manifest = None  # verify checks the imported files against the manifest the import pinned
        manifest = self.manifest or load_manifest(self.lay.manifest_file(self.plan.name))
        self.manifest = manifest
        yield Stage("verify", "verify", lambda: st.stage_valid("verify") or self.dropped_but_converted(), self.verify,
                    kept or "verified and unchanged")
        smoke_dir = self.original
        if not opts.skip_convert:
            target, prof = self._profile()
            out = self.lay.profile(self.plan.name, prof.name)
            self.result.profile, self.result.profile_dir = prof.name, out
            convert_key = f"convert:{prof.name}"
            yield Stage("convert", convert_key, lambda: st.stage_valid(convert_key) and out.is_dir(),
                        lambda: self.convert(target, prof, out), "converted and unchanged", profile=prof.name,
                        invalidate_first=True, on_skip=lambda: self.recall_serve_command(convert_key, out))
            smoke_dir = out
        if not opts.skip_smoke:
            smoke_key = f"smoke:{self.result.profile or 'original'}"
            yield Stage("smoke", smoke_key, lambda: st.stage_valid(smoke_key), lambda: self.smoke(smoke_dir),
                        "passed and unchanged", profile=self.result.profile)

    def _profile(self) -> tuple[Target, Profile]:
        """The target and profile chosen before the fetch, or now from the verified params.json."""
        if self.chosen is not None:
            return self.chosen
        from provision.formats.params import ModelArgs
        from provision.hardware import parse_target

        target = parse_target(self.opts.target, hardware=self.plan.hardware)
        dropped = self.state.dropped_params() if not (self.original / "params.json").is_file() else None
        args = ModelArgs.from_dict(dropped) if dropped is not None else ModelArgs.from_file(self.original / "params.json")
        self.chosen = target, _choose_profile(args, self.opts, target)
        return self.chosen

    def original_ready(self) -> bool:
        """The fetch can be skipped: the recorded original is still there, or ``--drop-original`` removed it
        and the conversion this run asks for is still valid."""
        if self.state.original_dropped:
            return self.dropped_but_converted()
        return self.state.stage_valid("fetch") and self.original.is_dir()

    def dropped_but_converted(self) -> bool:
        """``--drop-original`` removed the original, and this run's profile is converted and unchanged."""
        if not self.state.original_dropped or self.opts.skip_convert or self.original.is_dir():
            return False
        _target, prof = self._profile()
        return (self.state.stage_valid(f"convert:{prof.name}")
                and self.lay.profile(self.plan.name, prof.name).is_dir())

    def _pickled_release(self) -> PickledRelease | None:
        """The pickled torrent release this run imports, or None (another source, or no pickle)."""
        if self.opts.adopt is not None:
            return None
        from provision.stages.pickle_release import PickledRelease, pickles_to_import

        rec = self.state.get("import") or self.state.get("fetch")
        recorded = rec.facts.get("pickles") if rec is not None else None
        if isinstance(recorded, list) and recorded and all(isinstance(p, str) for p in recorded):
            pickles = tuple(recorded)
        elif rec is not None and rec.facts.get("source") == "torrent" and self.original.is_dir():
            return None  # fetched before as a release without pickles
        else:
            pickles = pickles_to_import(self.plan, self.opts.source, self.opts.torrent)
        if not pickles:
            return None
        return PickledRelease(self.plan, pickles, torrent=self.opts.torrent, keep_pickle=self.opts.keep_pickle,
                              progress=self.progress)

    def pickle_fetched(self) -> bool:
        """The pickled release's fetch can be skipped: its files still match the record, or the import
        that consumed them is recorded or published (the pickle is gone then)."""
        st, pk = self.state, self.pickled
        if st.original_dropped:
            return self.dropped_but_converted()
        rec = st.get("fetch")
        return rec is not None and pk is not None and (
            st.stage_valid("fetch") or self.pickle_imported()
            or pk.published({k: f.sha256 for k, f in rec.files.items() if f.sha256}))

    def pickle_imported(self) -> bool:
        if self.state.original_dropped:
            return self.dropped_but_converted()
        return self.state.stage_valid("import") and self.original.is_dir()

    def fetch_pickled(self) -> Outcome:
        assert self.pickled is not None
        got = self.pickled.fetch()
        return Outcome(got.bytes_downloaded, got.details, files={p: got.folder / p for p in got.files},
                       facts=got.facts, sha256={p: h for p, (_s, h) in got.files.items()})

    def import_pickled(self) -> Outcome:
        assert self.pickled is not None
        rec = self.state.get("fetch")
        known = {k: f.sha256 for k, f in rec.files.items() if f.sha256} if rec is not None else {}
        auths = rec.facts.get("authorities", {}) if rec is not None else {}
        imp = self.pickled.import_(known, auths if isinstance(auths, dict) else {})
        self.manifest = imp.manifest
        return Outcome(sum(s for s, _h in imp.files.values()), imp.details,
                       files={p: self.original / p for p in imp.files}, facts=imp.facts,
                       sha256={p: h for p, (_s, h) in imp.files.items()})

    def run_stage(self, stage: Stage) -> dict[str, Any]:
        t = time.monotonic()
        if (not self.opts.reverify or stage.keep_on_reverify) and stage.is_valid():
            _record(self.result, stage.name, "skipped", time.monotonic() - t, 0, {"reason": stage.skip_reason},
                    profile=stage.profile)
            if stage.on_skip is not None:
                stage.on_skip()
            return self.result.stages[-1]
        if stage.invalidate_first:
            self.state.invalidate(stage.key)
            save_state(self.state, self.state_path)
        out = stage.run()
        self.state.record_stage(out.key or stage.key, files=out.files, facts=out.facts, sha256=out.sha256)
        save_state(self.state, self.state_path)
        _record(self.result, stage.name, "ok", time.monotonic() - t, out.nbytes, out.details, profile=stage.profile)
        return self.result.stages[-1]

    # -- the stages --------------------------------------------------------------------------
    def shared_profile_stages(self) -> Iterator[Stage]:
        """--profile-from: the profile fetched from a swarm and checked (signature, record, source), then smoke."""
        from provision.stages.profile_share import SharedProfile

        opts = self.opts
        assert opts.profile_from is not None
        share = SharedProfile(self.plan, opts.profile_from, home=self.lay.home, torrent=opts.torrent,
                              trust_key=opts.trust_key, allow_unsigned=opts.allow_unsigned,
                              trust_certificate_chain=opts.trust_certificate_chain,
                              force=opts.replace_local_profile, progress=self.progress)

        def taken(name: str | None) -> None:
            if name is not None:
                self.result.profile, self.result.profile_dir = name, self.lay.profile(self.plan.name, name)
                self.recall_serve_command(f"convert:{name}", self.result.profile_dir)

        def fetched() -> Outcome:
            got = share.fetch(self.state)
            taken(got.profile)
            self.result.vllm_command = got.facts.get("vllm_command")
            if self.seeding is not None:
                got.details["seed"] = share.seed()
            return Outcome(got.bytes_downloaded, got.details, files=got.files, facts=got.facts, sha256=got.sha256,
                           key=f"convert:{got.profile}")

        def skipped() -> None:
            taken(share.recorded(self.state))
            if self.seeding is not None:
                share.seed()

        yield Stage("fetch-profile", "convert", lambda: share.recorded(self.state) is not None, fetched,
                    "taken from the swarm before and unchanged", on_skip=skipped)
        if not opts.skip_smoke and self.result.profile_dir is not None:
            smoke_key, out = f"smoke:{self.result.profile}", self.result.profile_dir
            yield Stage("smoke", smoke_key, lambda: self.state.stage_valid(smoke_key), lambda: self.smoke(out),
                        "passed and unchanged", profile=self.result.profile)

    def seed_earlier_fetch(self) -> None:
        if self.seeding is not None and self.original.is_dir():  # a restarted fleet member still serves late hosts
            from provision.stages.fetch.torrent import seed_verified

            seed_verified(self.plan, self.original, self.opts.torrent, self.progress)

    def fetch(self) -> Outcome:
        plan, opts, original = self.plan, self.opts, self.original
        snap, how = opts.adopt, "adopt"
        if snap is None and opts.discover_hf_cache:
            from provision.stages.adopt import find_hf_snapshot

            snap, how = find_hf_snapshot(plan), "hf-cache"
        extra: dict[str, Any] = {}
        if snap is not None:
            from provision.stages.adopt import adopt

            ares = adopt(plan, snap, dest=original, progress=self.progress)
            facts = {f["path"]: (f["size"], f["sha256"]) for f in ares.files}
            nbytes, details = 0, {"how": how, **ares.to_dict()}
        else:
            from provision.stages.fetch import fetch

            torrent, hub = opts.torrent, opts.hub
            self.overlap = self.start_overlap()
            if self.overlap is not None:
                torrent = replace(torrent, piece_watch=self.overlap.attach)
                hub = replace(hub, piece_watch=self.overlap.attach)
            self.fetch_started_at = time.monotonic()
            try:
                fres = fetch(plan, source=opts.source, dest=original, torrent=torrent, hub=hub,
                             progress=self.progress, lock=False)  # run_pipeline holds the model's lock
            except BaseException as e:  # a failed fetch discards the conversion running beside it
                if self.overlap is not None:
                    self.overlap.cancel(e)
                raise
            self.last_byte_at = _last_byte_at(self.fetch_started_at, fres.extra)
            extra = fres.extra
            facts = {f.path: (f.size, f.sha256) for f in fres.files if f.sha256}
            nbytes, details = fres.bytes_downloaded, {"how": fres.source, **fres.to_dict()}
        if self.manifest is None:  # pin what the verified fetch delivered, so later verifies have an authority
            self.manifest = write_manifest(_locked_manifest(plan, facts, extra), self.lay.manifest_file(plan.name))
        return Outcome(nbytes, details, files={p: original / p for p in facts},
                       facts={"source": details.get("how"),
                              **{k: v for k, v in extra.items() if isinstance(v, (str, int, float))}},
                       sha256={p: h for p, (_s, h) in facts.items()})

    def start_overlap(self) -> Overlap | None:
        """The conversion that follows the download (a torrent's verified pieces, a Hub file's written
        prefix), or None (``--skip-convert``, ``RunOptions.overlap`` off); it starts once the fetch
        knows its files, and not at all for an adopted folder."""
        if not self.opts.overlap or self.opts.skip_convert:
            return None
        from provision.stages.overlap import Overlap, clean_views

        clean_views(self.lay.staging(self.plan.name))
        expected = {f.path: f.sha256 for f in self.manifest.files if f.sha256} if self.manifest is not None else {}
        return Overlap(staging=self.lay.staging(self.plan.name), original=self.original, choose=self.overlap_profile,
                       out_dir=lambda prof: self.lay.profile(self.plan.name, prof.name), context=self.opts.context,
                       workers=self.opts.convert_workers, progress=self.progress, expected_sha256=expected)

    def overlap_profile(self, args: ModelArgs) -> tuple[Target, Profile]:
        """The profile the overlapped conversion writes: the one chosen before the fetch, else the
        same choice ``_profile`` makes from the verified params.json (the bytes it read are those)."""
        if self.chosen is not None:
            return self.chosen
        from provision.hardware import parse_target

        target = parse_target(self.opts.target, hardware=self.plan.hardware)
        return target, _choose_profile(args, self.opts, target)

    def close_overlap(self, error: BaseException | None) -> None:
        """The run ended: an overlapped conversion not committed by now is discarded; the report's figures."""
        ov = self.overlap
        if ov is not None and ov.started and ov.result is None:
            ov.cancel(error or RuntimeError("the run ended"))
        if self.last_byte_at is not None and self.ready_at is not None:
            self.result.ready_after_last_byte_seconds = round(max(0.0, self.ready_at - self.last_byte_at), 3)
        if ov is not None and ov.started:
            self.result.overlap = ov.report(self.last_byte_at, self.fetch_started_at)

    def recall_serve_command(self, convert_key: str, out: Path) -> None:
        """A conversion skipped as done still ends the run with its serve command: the one recorded
        in the state file, else the one in the converted folder's own record."""
        rec = self.state.get(convert_key)
        cmd = rec.facts.get("vllm_command") if rec is not None else None
        if not isinstance(cmd, str) or not cmd:
            from provision.stages.convert.record import read_record

            with contextlib.suppress(OSError, ValueError):  # no readable record: no serve line
                cmd = read_record(out).get("vllm_command")
        self.result.vllm_command = cmd if isinstance(cmd, str) and cmd else None

    def serve_original(self) -> None:
        """--skip-convert: the ``vllm serve`` line for the original (Mistral layout), in the 16-bit
        dtype the target runs; none when no 16-bit copy fits the target (nothing to serve there)."""
        from provision.formats.params import ModelArgs
        from provision.hardware import parse_target
        from provision.stages.convert.serve import vllm_command
        from provision.stages.profiles import choose

        if not (self.original / "params.json").is_file():
            return
        with contextlib.suppress(ProvisionError):  # no 16-bit profile fits: no serve line, the run stands
            target = parse_target(self.opts.target, hardware=self.plan.hardware)
            prof = choose(ModelArgs.from_file(self.original / "params.json"), target, "auto", "mistral",
                          context=self.opts.context)
            self.result.vllm_command = vllm_command(self.original, prof, self.opts.context)

    def torrent_authority(self, manifest: Manifest) -> TorrentRef | None:
        """The torrent info dictionary the sources pin (the plan's .torrent, the manifest's, or the store's
        copy), or None: then the manifest's hashes are the authority (a mismatching torrent is ignored)."""
        from provision.stages.verify.torrent import find_torrent

        try:
            return find_torrent(manifest, self.lay.home, magnet=self.plan.magnet, torrent_file=self.plan.torrent_file)
        except ProvisionError:
            return None

    def verify(self) -> Outcome:
        from provision.stages.verify import authorities_from_manifest, verify_files
        from provision.stages.verify.torrent import with_torrent

        manifest, original = self.manifest, self.original
        if manifest is None:  # pragma: no cover - stages() loads it right after the fetch
            raise ProvisionError("internal: verify without a manifest")
        known: dict[str, str] = {}
        rec = self.state.get("import") or self.state.get("fetch")  # import: a pickled release's written files
        if rec is not None and not self.opts.reverify:  # hashed while fetching: no second read
            known = {k: f.sha256 for k, f in rec.files.items() if f.sha256}

        def wanted(p: str) -> bool:
            spec = manifest.file(p)
            return (original / p).exists() or spec is None or not spec.optional

        present = {p: a for p, a in authorities_from_manifest(manifest).items() if wanted(p)}
        ref = self.torrent_authority(manifest)  # pieces checked on every core instead of one sha256 stream
        present = with_torrent(present, ref, skip=known)
        vrep = verify_files(original, present, known_sha256=known, progress=self.progress, whole_sha256=ref is None)
        if ref is not None:
            vrep.torrent = ref.to_dict()
        vrep.raise_for_failure()
        return Outcome(vrep.bytes_hashed, vrep.to_dict(),
                       files={p: original / p for p in present if (original / p).exists()},
                       sha256={p: h for p, (_s, h) in vrep.facts.items()})

    def source_identity(self) -> SourceIdentity:
        """Who the original is, for the profile's provenance record: the manifest, infohash, Hub repository."""
        from provision.formats.sources import parse_magnet

        m, plan = self.manifest, self.plan
        btih = plan.magnet.btih if plan.magnet is not None else None
        hf_repo = plan.hf.repo if plan.hf is not None else None
        hf_commit = None
        for src in m.sources if m is not None else ():
            if src.type == "torrent" and src.magnet and btih is None:
                with contextlib.suppress(ProvisionError):  # a manifest magnet without v1 infohash
                    btih = parse_magnet(src.magnet).btih
            if src.type == "hf" and src.repo:
                hf_repo = hf_repo or src.repo
                if src.repo == hf_repo and src.revision and len(src.revision) == 40:
                    hf_commit = src.revision.lower()
        return SourceIdentity(manifest_name=m.name if m is not None else None,
                              manifest_sha256=m.sha256 if m is not None else None,
                              btih=btih, hf_repo=hf_repo, hf_commit=hf_commit)

    def convert(self, target: Target, prof: Profile, out: Path) -> Outcome:
        from provision.stages.convert import convert

        vrec = self.state.get("verify")  # hashes verify already computed: no second read
        src_sha = {k: f.sha256 for k, f in vrec.files.items() if f.sha256} if vrec else {}
        # converted while fetching: committed now that verify passed (None: convert as usual)
        cres = self.overlap.finish(src_sha, self.source_identity(), prof) if self.overlap is not None else None
        if cres is None:
            cres = convert(self.original, out, target=target, scheme=prof.scheme, layout=prof.layout,
                           context=self.opts.context, progress=self.progress, source_sha256=src_sha,
                           source_identity=self.source_identity(), workers=self.opts.convert_workers)
        self.ready_at = time.monotonic()
        self.result.vllm_command = cres.vllm_command
        details = cres.to_dict()
        details.pop("tensors", None)
        # provenance.json is left out: the smoke stage rewrites it, which must not invalidate the conversion
        return Outcome(cres.bytes_written, details, files=[p for p in _files_of(out) if p.name != PROVENANCE_NAME],
                       facts={"scheme": cres.scheme, "layout": cres.layout, "vllm_command": cres.vllm_command})

    def smoke(self, smoke_dir: Path) -> Outcome:
        from provision.stages.smoke import smoke
        from provision.stages.smoke_vllm import default_engine

        engine = self.opts.smoke_engine or default_engine(smoke_dir)
        srep = smoke(smoke_dir, device=self.opts.device, manifest=self.manifest, progress=self.progress,
                     raise_on_fail=engine != "vllm")
        details: dict[str, Any] = srep.to_dict()
        if engine != "provision":  # vLLM judges too: it must answer with our engine's greedy ids (exit 8)
            from provision.stages.smoke_vllm import reference_images, smoke_vllm

            vrep = smoke_vllm(smoke_dir, srep, images=reference_images(smoke_dir, srep, []), progress=self.progress)
            details = {**details, "engine": engine, "vllm": vrep.to_dict()}
        if (smoke_dir != self.original and (smoke_dir / PROVENANCE_NAME).is_file()  # the profile's record, unless
                and self.opts.profile_from is None):  # signed by its publisher (--profile-from): kept as signed
            from provision.formats import provenance

            provenance.add_smoke(smoke_dir, provenance.smoke_entry(srep.to_dict()))
        return Outcome(srep.weights_bytes, details, files=_files_of(smoke_dir), facts={"text": srep.text[:200]})

    # -- after the stages --------------------------------------------------------------------
    def finish_seeding(self) -> Iterator[dict[str, Any]]:
        """Serve the rest of --seed-for (it started when the fetch ended): one record per torrent."""
        if self.seeding is None:
            return
        for facts in self.seeding.wait():
            _record(self.result, "seed", "ok", float(facts.get("seconds", 0.0)), int(facts.get("uploaded_bytes", 0)),
                    facts)
            yield self.result.stages[-1]

    def drop_original(self) -> dict[str, Any] | None:
        opts = self.opts
        if not (opts.drop_original and not opts.skip_convert and self.result.profile_dir is not None
                and not opts.skip_smoke and self.original.is_dir()):
            return None
        freed = sum(p.stat().st_size for p in _files_of(self.original))
        params = json.loads((self.original / "params.json").read_text(encoding="utf-8"))
        # recorded first: a removal cut short leaves a state that refetches, never one that trusts half a folder
        self.state.mark_original_dropped(params if isinstance(params, dict) else None)
        save_state(self.state, self.state_path)
        shutil.rmtree(self.original)
        _record(self.result, "drop-original", "ok", 0.0, freed, {"removed": str(self.original)})
        return self.result.stages[-1]


def _last_byte_at(started: float, extra: Mapping[str, Any]) -> float:
    """When a fetch started at ``started`` received its last byte: the torrent's download phase end
    when it reports one, else now."""
    start, download = extra.get("start_seconds"), extra.get("download_seconds")
    if isinstance(start, (int, float)) and isinstance(download, (int, float)):
        return started + float(start) + float(download)
    return time.monotonic()


CONVERT_MARGIN = 64 << 20  # headers, index and side files beside the converted weights (as convert checks)


def _check_space(plan: Plan, opts: RunOptions, chosen: tuple[Target, Profile] | None, state: State,
                 lay: Layout) -> None:
    """Room for what the run still has to write: the download (less what is staged or skipped) and the
    conversion (the chosen profile's weights, else as much as the original's safetensors), at once:
    the original is dropped only after the conversion passed. ``DiskSpaceError`` (exit 6) names both."""
    from provision.io.space import check_run_space

    prof = chosen[1] if chosen is not None else None
    converted = prof is not None and state.stage_valid(f"convert:{prof.name}") and lay.profile(
        plan.name, prof.name).is_dir()
    fetch_need = 0 if state.original_dropped and converted else plan.bytes_still_needed
    if opts.skip_convert or converted:
        convert_need = 0
    elif prof is not None:
        convert_need = prof.weight_bytes + CONVERT_MARGIN
    else:
        convert_need = sum(f.size or 0 for f in plan.files if f.path.endswith(".safetensors")) + CONVERT_MARGIN
    check_run_space(plan.dest, fetch_need, convert_need, drop_original=opts.drop_original)


def run_pipeline(
    source: str,
    *,
    settings: Settings | None = None,
    home: Path | None = None,
    options: RunOptions | None = None,
    offline: bool = False,
    dry_run: bool = False,
    progress: ProgressFn | None = None,
    on_stage: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Run SOURCE through every stage; return the per-stage records (raises on failure)."""
    from provision.hardware import parse_target
    from provision.store.lock import LockWait, ModelLock

    opts = options or RunOptions()
    st = settings or Settings.load()
    home = Path(home) if home else st.home
    t0 = time.monotonic()
    # a bare magnet's files come with its metadata, in the fetch: not listed here (nor called offline)
    plan = make_plan(source, settings=st, home=home, offline=offline, list_magnet=False,
                     hub_options=opts.hub,  # the listing of a private hf:// repo uses the token too
                     check_disk=dry_run)  # a run checks room for the download and the conversion together, below
    result = RunResult(plan=plan, dry_run=dry_run)
    _record(result, "plan", "ok", time.monotonic() - t0, plan.bytes_to_fetch,
            {"files": len(plan.files), "bytes_total": plan.bytes_total, "free_bytes": plan.free_bytes})
    if dry_run:
        return result
    chosen = None
    args = None if opts.skip_convert or opts.profile_from else _params_before_fetch(plan)
    if args is not None:  # choose the profile before a byte is fetched
        target = parse_target(opts.target, hardware=plan.hardware)
        chosen = target, _choose_profile(args, opts, target)
    lay = Layout(home)
    result.model_dir = lay.model_dir(plan.name)
    result.model_dir.mkdir(parents=True, exist_ok=True)

    def emit(rec: dict[str, Any] | None) -> None:
        if on_stage is not None and rec is not None:
            on_stage(rec)

    def waiting(w: LockWait) -> None:  # at once, then every few seconds: a silent wait looks hung
        note(progress, "lock", w.message(f"Model {plan.name}"))

    with ModelLock(lay.lock_file(plan.name), timeout=opts.lock_timeout, command=f"run {source[:200]}",
                   on_wait=waiting), \
            _background_seeding(opts) as seeding:
        state = load_state(lay.state_file(plan.name))
        for w in state.warnings:
            note(progress, "run", f"state: {w}")
        dropped = None if chosen is not None or opts.skip_convert else state.dropped_params()
        if dropped is not None:  # --drop-original removed params.json with the original: the state kept it
            from provision.formats.params import ModelArgs

            target = parse_target(opts.target, hardware=plan.hardware)
            chosen = target, _choose_profile(ModelArgs.from_dict(dropped), opts, target)
        if opts.profile_from is None:  # a shared profile's size is known from its torrent: the fetch checks room
            _check_space(plan, opts, chosen, state, lay)
        run = _Run(plan, opts, lay, result, state, progress, seeding, chosen)
        try:
            for stage in run.stages():
                emit(run.run_stage(stage))
        except BaseException as e:  # an overlapped conversion is never committed after a failure
            run.close_overlap(e)
            raise
        run.close_overlap(None)
        for rec in run.finish_seeding():
            emit(rec)
        emit(run.drop_original())
        if opts.skip_convert:
            run.serve_original()
        if result.profile_dir is not None and (result.profile_dir / PROVENANCE_NAME).is_file():
            from provision.formats.provenance import record_sha256

            result.provenance = {"path": str(result.profile_dir / PROVENANCE_NAME),
                                 "sha256": record_sha256(result.profile_dir)}
    return result
