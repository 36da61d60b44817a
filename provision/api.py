"""The Python API: each stage callable from another program, with the CLI's behaviour.

Example: ``result = provision.run("pixtral-12b-2409", home="/srv/provision", scheme="fp8")``,
then ``api.verify(result.model_dir / "original", "pixtral-12b-2409")``. Every function raises
``provision.errors.ProvisionError`` subclasses (with ``exit_code``) and prints nothing; pass
``progress=`` a callable taking ``ProgressEvent`` to watch. The stages are imported when called,
so ``import provision`` stays light (no torch, no libtorrent).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from provision.pipeline import RunOptions, RunResult, run_pipeline
from provision.progress import ProgressFn
from provision.stages.plan import Plan, make_plan

if TYPE_CHECKING:
    from provision.formats.provenance import CheckResult
    from provision.stages.bundle import ExportResult, ImportResult
    from provision.stages.convert import ConvertResult
    from provision.stages.fetch import FetchResult
    from provision.stages.profile_share import ProfileSeed
    from provision.stages.sign import SignatureResult
    from provision.stages.smoke import SmokeReport
    from provision.stages.verify import VerifyReport


def run(source: str, *, home: str | Path | None = None, dry_run: bool = False, offline: bool = False,
        progress: ProgressFn | None = None, **options: Any) -> RunResult:
    """`provision run`: options are ``RunOptions`` fields (scheme, target, adopt, torrent, hub, ...)."""
    return run_pipeline(source, home=Path(home) if home else None, options=RunOptions(**options),
                        offline=offline, dry_run=dry_run, progress=progress)


def plan(source: str, *, home: str | Path | None = None, offline: bool = False, **kw: Any) -> Plan:
    """`provision plan`."""
    return make_plan(source, home=Path(home) if home else None, offline=offline, **kw)


def fetch(source: str, *, home: str | Path | None = None, progress: ProgressFn | None = None,
          via: str = "auto", **kw: Any) -> FetchResult:
    """`provision fetch`: ``via`` is `--source` (auto, torrent or hf); other keyword arguments
    (dest, torrent, hub) go to ``provision.stages.fetch.fetch``."""
    from provision.stages.fetch import fetch as _fetch

    return _fetch(make_plan(source, home=Path(home) if home else None), source=via, progress=progress, **kw)


def verify(root: str | Path, manifest: str | Path | None = None, *,
           progress: ProgressFn | None = None) -> VerifyReport:
    """`provision verify`: returns a ``VerifyReport``; call ``raise_for_failure()`` on it."""
    from provision.formats.manifest import load_manifest
    from provision.stages.verify import verify_dir

    return verify_dir(Path(root), load_manifest(manifest) if manifest else None, progress=progress)


def convert(src_dir: str | Path, out_dir: str | Path, **kw: Any) -> ConvertResult:
    """`provision convert`: returns a ``ConvertResult``."""
    from provision.stages.convert import convert as _convert

    return _convert(Path(src_dir), Path(out_dir), **kw)


def verify_profile(folder: str | Path) -> CheckResult:
    """`provision verify FOLDER` of a folder with a ``provenance.json``: every file checked against
    the record (raises ``VerifyError``, exit 5, on a changed, missing or extra file or a path out; an
    extra README, licence or signature is listed in ``not_in_record`` instead)."""
    from provision.formats.provenance import check

    return check(Path(folder), inert_extra_ok=True)


def verify_sigstore(folder: str | Path, *, bundle: str | Path, trust_root: str | Path, identity: str,
                    issuer: str) -> SignatureResult:
    """`provision verify FOLDER --sigstore-bundle ...`: a keyless (Sigstore) signature checked offline
    against the given ``trusted_root.json`` for ``identity`` from ``issuer`` (raises ``VerifyError``, exit 5)."""
    from provision.stages.sign import verify_sigstore_bundle

    return verify_sigstore_bundle(Path(folder), bundle=Path(bundle), trust_root=Path(trust_root),
                                  identity=identity, issuer=issuer)


def sign(folder: str | Path, *, key: str | Path, signature: str | Path, certificate: str | Path | None = None,
         certificate_chain: tuple[str | Path, ...] = ()) -> SignatureResult:
    """`provision sign`: sign every file of ``folder`` with the private ``key`` into ``signature``."""
    from provision.stages.sign import sign_folder

    return sign_folder(Path(folder), private_key=Path(key), signature=Path(signature),
                       certificate=Path(certificate) if certificate else None,
                       certificate_chain=[Path(c) for c in certificate_chain])


def verify_signature(folder: str | Path, *, signature: str | Path, public_key: str | Path | None = None,
                     certificate_chain: tuple[str | Path, ...] = ()) -> SignatureResult:
    """`provision verify FOLDER --signature SIG`: check the signature offline (``VerifyError`` on failure)."""
    from provision.stages.sign import verify_folder_signature

    return verify_folder_signature(Path(folder), signature=Path(signature),
                                   public_key=Path(public_key) if public_key else None,
                                   certificate_chain=[Path(c) for c in certificate_chain])


def seed_profile(folder: str | Path, *, signature: str | Path | None = None, **kw: Any) -> ProfileSeed:
    """`provision seed MODEL --profile P`: serve the converted profile in ``folder`` with its provenance
    record and signature (default ``<folder>_signature.sig`` if there); other keyword arguments are
    ``provision.stages.fetch.torrent.seed``'s (network, listen, seed_for, stop, on_ready, ...). A member
    takes it with ``run(SOURCE, profile_from=MAGNET, trust_key=PUB)``."""
    from provision.stages.profile_share import seed_profile as _seed_profile

    return _seed_profile(Path(folder), signature=Path(signature) if signature else None, **kw)


def smoke(model_dir: str | Path, **kw: Any) -> SmokeReport:
    """`provision smoke`: returns a ``SmokeReport``."""
    from provision.stages.smoke import smoke as _smoke

    return _smoke(Path(model_dir), **kw)


def bundle_export(model: str, out: str | Path, *, home: str | Path | None = None, profile: str | None = None,
                  original: bool = True, manifest: str | Path | None = None, archive: bool = False,
                  progress: ProgressFn | None = None) -> ExportResult:
    """`provision bundle export`: returns an ``ExportResult``."""
    from provision.stages.bundle import export_bundle

    return export_bundle(model, Path(out), home=Path(home) if home else None, profile=profile, original=original,
                         manifest=manifest, archive=archive, progress=progress)


def bundle_import(path: str | Path, *, home: str | Path | None = None,
                  progress: ProgressFn | None = None) -> ImportResult:
    """`provision bundle import`: returns an ``ImportResult``."""
    from provision.stages.bundle import import_bundle

    return import_bundle(Path(path), home=Path(home) if home else None, progress=progress)
