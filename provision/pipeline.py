"""The pipeline behind `provision run`: plan -> fetch -> verify -> convert -> smoke, resumable.

Each stage is a library function (``fetch.fetch``, ``verify.verify_files``,
``convert.convert.convert``, ``smoke.smoke``); this module chains them under the model's lock
(``lock.ModelLock``) and records every finished stage in ``state.json`` with the size, mtime,
inode and sha256 of the files it relied on. A rerun skips a stage whose files still match and
redoes what does not; ``reverify`` re-hashes everything. A run killed anywhere resumes: fetches
continue from their staging/resume data, conversions write shards atomically, and a stage is
recorded only once it finished. It never prints: progress goes through the callback, failures
are ``ProvisionError``s, and the result carries one record per stage for the report.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from provision.errors import ProvisionError
from provision.formats.manifest import FileSpec, Manifest, Source, write_manifest
from provision.layout import Layout
from provision.progress import ProgressFn, note
from provision.settings import Settings
from provision.stages.fetch import HubOptions, TorrentOptions
from provision.stages.plan import Plan, make_plan


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


@dataclass
class RunResult:
    plan: Plan
    dry_run: bool
    stages: list[dict[str, Any]] = field(default_factory=list)
    model_dir: Path | None = None
    profile: str | None = None
    profile_dir: Path | None = None
    vllm_command: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"plan": self.plan.to_dict(), "dry_run": self.dry_run, "stages": self.stages}
        if self.model_dir is not None:
            d["model_dir"] = str(self.model_dir)
        if self.profile is not None:
            d["profile"] = self.profile
            d["profile_dir"] = str(self.profile_dir)
        if self.vllm_command:
            d["vllm_command"] = self.vllm_command
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
    from provision.layout import model_dirname

    arch = "pixtral"
    return Manifest(name=model_dirname(plan.name).lower(), architecture=arch, format="mistral",
                    sources=tuple(sources), files=files,
                    description=f"Recorded by provision run from {plan.source[:120]}")


def _preflight_profile(plan: Plan, opts: RunOptions) -> None:
    """Choose the conversion profile before any download when params.json is known (the
    manifest's ``[params]`` or an original already on disk): nothing fits -> exit 6, a scheme the
    target cannot run -> exit 3, before a single byte is fetched."""
    if opts.skip_convert:
        return
    from provision.formats.params import ModelArgs

    if plan.manifest is not None and plan.manifest.params is not None:
        args = ModelArgs.from_dict(plan.manifest.params)
    elif (plan.dest / "params.json").is_file():
        args = ModelArgs.from_file(plan.dest / "params.json")
    else:
        return
    from provision.hardware import parse_target
    from provision.stages.profiles import choose

    choose(args, parse_target(opts.target, hardware=plan.hardware), opts.scheme, opts.layout, context=opts.context)


def _background_seeding(opts: RunOptions) -> AbstractContextManager[Any]:
    """With --seed-for, a torrent fetch keeps serving from a thread while the later stages run."""
    if opts.torrent.seed_for <= 0 or opts.source == "hf":
        return nullcontext(None)
    from provision.stages.fetch.torrent import background_seeding

    return background_seeding()


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
    from provision.store.lock import ModelLock
    from provision.store.state import load_state, save_state

    opts = options or RunOptions()
    st = settings or Settings.load()
    home = Path(home) if home else st.home
    t0 = time.monotonic()
    from provision.stages.fetch.hub import use_options

    use_options(opts.hub)  # the plan's listing of a private hf:// repo uses the token too
    plan = make_plan(source, settings=st, home=home, offline=offline or source.startswith("magnet:"))
    result = RunResult(plan=plan, dry_run=dry_run)
    _record(result, "plan", "ok", time.monotonic() - t0, plan.bytes_to_fetch,
            {"files": len(plan.files), "bytes_total": plan.bytes_total, "free_bytes": plan.free_bytes})
    if dry_run:
        return result
    _preflight_profile(plan, opts)
    lay = Layout(home)
    result.model_dir = lay.model_dir(plan.name)
    result.model_dir.mkdir(parents=True, exist_ok=True)
    state_path = lay.state_file(plan.name)

    def emit(rec: dict[str, Any]) -> None:
        if on_stage is not None:
            on_stage(rec)

    with ModelLock(lay.lock_file(plan.name), timeout=opts.lock_timeout, command=f"run {source[:200]}"), \
            _background_seeding(opts) as seeding:
        state = load_state(state_path)
        for w in getattr(state, "warnings", []):
            note(progress, "run", f"state: {w}")
        original = plan.dest
        manifest = plan.manifest

        # ---- fetch -------------------------------------------------------------------------
        t = time.monotonic()
        fetch_extra: dict[str, Any] = {}
        if state.stage_valid("fetch") and not opts.reverify and original.is_dir():
            _record(result, "fetch", "skipped", time.monotonic() - t, 0, {"reason": "already fetched and unchanged"})
            if seeding is not None:  # a restarted fleet member still serves late hosts
                from provision.stages.fetch.torrent import seed_verified

                seed_verified(plan, original, opts.torrent, progress)
        else:
            state.invalidate("fetch")
            save_state(state, state_path)
            snap = opts.adopt
            how = "adopt"
            if snap is None and opts.discover_hf_cache:
                from provision.stages.adopt import find_hf_snapshot

                snap = find_hf_snapshot(plan)
                how = "hf-cache"
            if snap is not None:
                from provision.stages.adopt import adopt

                ares = adopt(plan, snap, dest=original, progress=progress)
                facts = {f["path"]: (f["size"], f["sha256"]) for f in ares.files}
                _record(result, "fetch", "ok", time.monotonic() - t, 0,
                        {"how": how, **ares.to_dict()})
            else:
                from provision.stages.fetch import fetch

                fres = fetch(plan, source=opts.source, dest=original, torrent=opts.torrent, hub=opts.hub,
                             progress=progress)
                fetch_extra = fres.extra
                facts = {f.path: (f.size, f.sha256) for f in fres.files if f.sha256}
                _record(result, "fetch", "ok", time.monotonic() - t, fres.bytes_downloaded,
                        {"how": fres.source, **fres.to_dict()})
            if manifest is None:
                # pin what the verified fetch delivered, so later verifies have an authority
                manifest = write_manifest(_locked_manifest(plan, facts, fetch_extra),
                                          lay.manifests / f"{plan.name.replace('/', '--')}.toml")
            state.record_stage("fetch", files={p: original / p for p in facts},
                               facts={"source": result.stages[-1]["details"].get("how"),
                                      **{k: v for k, v in fetch_extra.items() if isinstance(v, (str, int, float))}},
                               sha256={p: h for p, (_s, h) in facts.items()})
            save_state(state, state_path)
        emit(result.stages[-1])
        if manifest is None:
            from provision.formats.manifest import load_manifest

            manifest = load_manifest(lay.manifests / f"{plan.name.replace('/', '--')}.toml")

        # ---- verify ------------------------------------------------------------------------
        t = time.monotonic()
        if state.stage_valid("verify") and not opts.reverify:
            _record(result, "verify", "skipped", time.monotonic() - t, 0, {"reason": "verified and unchanged"})
        else:
            from provision.stages.verify import authorities_from_manifest, verify_files

            known: dict[str, str] = {}
            rec = state.get("fetch")
            if rec is not None and not opts.reverify:  # hashed while fetching: no second read
                known = {k: f.sha256 for k, f in rec.files.items() if f.sha256}
            auths = authorities_from_manifest(manifest)
            present = {p: a for p, a in auths.items()
                       if (original / p).exists() or not manifest.file(p) or not manifest.file(p).optional}  # type: ignore[union-attr]
            vrep = verify_files(original, present, known_sha256=known, progress=progress)
            vrep.raise_for_failure()
            state.record_stage("verify", files={p: original / p for p in present if (original / p).exists()},
                               sha256={p: h for p, (_s, h) in vrep.facts.items()})
            save_state(state, state_path)
            _record(result, "verify", "ok", time.monotonic() - t, vrep.bytes_hashed, vrep.to_dict())
        emit(result.stages[-1])

        # ---- convert -----------------------------------------------------------------------
        smoke_dir = original
        if not opts.skip_convert:
            from provision.formats.params import ModelArgs
            from provision.hardware import parse_target
            from provision.stages.convert.convert import convert
            from provision.stages.profiles import choose

            t = time.monotonic()
            target = parse_target(opts.target, hardware=plan.hardware)
            prof = choose(ModelArgs.from_file(original / "params.json"), target, opts.scheme, opts.layout,
                          context=opts.context)
            out = lay.profile(plan.name, prof.name)
            stage = f"convert:{prof.name}"
            result.profile, result.profile_dir = prof.name, out
            if state.stage_valid(stage) and not opts.reverify and out.is_dir():
                _record(result, "convert", "skipped", time.monotonic() - t, 0,
                        {"reason": "converted and unchanged"}, profile=prof.name)
            else:
                state.invalidate(stage)
                save_state(state, state_path)
                vrec = state.get("verify")  # hashes verify already computed: no second read
                src_sha = {k: f.sha256 for k, f in vrec.files.items() if f.sha256} if vrec else {}
                cres = convert(original, out, target=target, scheme=prof.scheme, layout=prof.layout,
                               context=opts.context, progress=progress, source_sha256=src_sha)
                result.vllm_command = cres.vllm_command
                state.record_stage(stage, files=_files_of(out), facts={"scheme": cres.scheme, "layout": cres.layout,
                                                                      "vllm_command": cres.vllm_command})
                save_state(state, state_path)
                d = cres.to_dict()
                d.pop("tensors", None)
                _record(result, "convert", "ok", time.monotonic() - t, cres.bytes_written, d, profile=prof.name)
            emit(result.stages[-1])
            smoke_dir = out

        # ---- smoke -------------------------------------------------------------------------
        if not opts.skip_smoke:
            from provision.stages.smoke import smoke

            t = time.monotonic()
            stage = f"smoke:{result.profile or 'original'}"
            if state.stage_valid(stage) and not opts.reverify:
                _record(result, "smoke", "skipped", time.monotonic() - t, 0, {"reason": "passed and unchanged"},
                        profile=result.profile)
            else:
                srep = smoke(smoke_dir, device=opts.device, manifest=replace(manifest), progress=progress)
                state.record_stage(stage, files=_files_of(smoke_dir), facts={"text": srep.text[:200]})
                save_state(state, state_path)
                _record(result, "smoke", "ok", time.monotonic() - t, srep.weights_bytes, srep.to_dict(),
                        profile=result.profile)
            emit(result.stages[-1])

        # ---- seed: serve the rest of --seed-for (it started when the fetch ended) -------------
        if seeding is not None:
            for facts in seeding.wait():
                _record(result, "seed", "ok", float(facts.get("seconds", 0.0)), int(facts.get("uploaded_bytes", 0)),
                        facts)
                emit(result.stages[-1])

        # ---- drop the original -------------------------------------------------------------
        if opts.drop_original and not opts.skip_convert and result.profile_dir is not None and \
                (opts.skip_smoke is False) and original.is_dir():
            freed = sum(p.stat().st_size for p in _files_of(original))
            shutil.rmtree(original)
            state.invalidate("fetch")
            save_state(state, state_path)
            _record(result, "drop-original", "ok", 0.0, freed, {"removed": str(original)})
            emit(result.stages[-1])
    return result
