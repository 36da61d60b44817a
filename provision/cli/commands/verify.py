"""`provision verify DIR [--manifest M]`: check a model folder's hashes, structure and hostile files.

A thin command over ``provision.stages.verify.verify_dir``: it renders the per-file table and, with
``--json``, reports every check (also when verification fails). Exit 5 for any content or
structure failure, 3 when params.json is malformed. It never writes anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from provision.cli.app import App, get_app
from provision.cli.options import json_option

if TYPE_CHECKING:
    from provision.stages.verify import VerifyReport


def render_report(app: App, report: VerifyReport) -> None:
    from provision.units import human_bytes

    t = app.terminal
    for f in report.files:
        size = f"{f.size:>14,d} B" if f.size is not None else f"{'-':>16s}"
        sha = f"sha256 {f.sha256[:16]}…" if f.sha256 else ""
        auth = f"[{f.authority}]" if f.authority else ""
        line = f"{f.status:8s} {f.path:40s} {size}  {auth} {sha}".rstrip()
        if f.status == "unlisted":
            app.result(f"{'unlisted':8s} {f.path:40s} {human_bytes(f.size or 0):>16s}  (not in the manifest; "
                       "left alone)")
        else:
            app.result(line)
    for c in report.checks:
        if c.ok and c.name in ("index", "params", "tensors"):
            t.debug(f"{c.name}: ok {c.actual or ''}".rstrip())
    # the first failure becomes the command's one error line; the others are listed before it
    for c in report.failures[1:]:
        t.warn(f"also failed ({c.name}): {c.message}")
    if report.authorities:
        t.info(f"checked against: {report.describe_authorities()}")
    if report.torrent is not None:
        t.info(f"torrent {report.torrent['torrent']} ({report.torrent['chain']})")
    rate = report.bytes_hashed / report.seconds if report.seconds > 0 else 0.0
    t.debug(f"hashed {human_bytes(report.bytes_hashed)} in {report.seconds:.2f} s "
            f"({human_bytes(rate)}/s, {report.workers} workers)")


def _check_trust(app: App, folder: Path, doc: dict[str, Any], signature: Path | None, public_key: Path | None,
                 chain: tuple[Path, ...]) -> None:
    """Check FOLDER against its provenance.json (when present) and ``signature``; adds both to ``doc``."""
    from provision.errors import VerifyError
    from provision.formats import provenance

    try:
        if (folder / provenance.PROVENANCE_NAME).exists():
            doc["provenance"] = provenance.check(folder, inert_extra_ok=True).to_dict()
            app.terminal.info(f"{doc['provenance']['files']} files match {provenance.PROVENANCE_NAME}.")
            inert = doc["provenance"]["not_in_record"]
            if inert:  # a README or licence beside the profile: named, never judged (no loader reads them)
                app.terminal.info(f"not in {provenance.PROVENANCE_NAME} (no model loader reads them; left alone): "
                                  f"{', '.join(inert[:10])}{' ...' if len(inert) > 10 else ''}")
        if signature is not None:
            from provision.stages.sign import verify_folder_signature

            doc["signature"] = verify_folder_signature(folder, signature=signature, public_key=public_key,
                                                       certificate_chain=chain,
                                                       check_record="provenance" not in doc).to_dict()
            app.terminal.info(f"signature {signature.name} verified.")
    except VerifyError as e:
        app.fail(e, doc)


def _check_sigstore(app: App, folder: Path, doc: dict[str, Any], bundle: Path, trust_root: Path, identity: str,
                    issuer: str) -> None:
    """Check a keyless Sigstore signature of FOLDER offline against ``trust_root``; adds it to ``doc``."""
    from provision.errors import VerifyError
    from provision.stages.sign import verify_sigstore_bundle

    try:
        doc["sigstore"] = {**verify_sigstore_bundle(folder, bundle=bundle, trust_root=trust_root, identity=identity,
                                                    issuer=issuer, check_record="provenance" not in doc).to_dict(),
                           "identity": identity, "issuer": issuer, "trust_root": str(trust_root)}
        app.terminal.info(f"Sigstore signature {bundle.name} verified offline: {identity} ({issuer}).")
    except VerifyError as e:
        app.fail(e, doc)


@click.command("verify")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--manifest", "manifest_ref", metavar="M",
              help="Manifest name or .toml path whose sizes and sha256 the files must match.")
@click.option("--torrent", "torrent_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A .torrent whose pieces vouch for the files (checked on every core; with --manifest it must "
                   "be the torrent the manifest pins). Without it, --manifest uses the store's copy when it has one.")
@click.option("--workers", type=click.IntRange(min=1, max=256), default=None,
              help="Threads hashing files and torrent piece ranges (default: the number of CPU cores).")
@click.option("--signature", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="An OpenSSF Model Signing signature of FOLDER to check (offline).")
@click.option("--public-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The signer's public key (PEM) the --signature must be made by.")
@click.option("--certificate-chain", "chain", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Certificates establishing trust in a certificate-signed --signature (repeatable).")
@click.option("--sigstore-bundle", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A keyless (Sigstore) OpenSSF Model Signing signature of FOLDER, checked offline against "
                   "--trust-root for --identity and --issuer.")
@click.option("--trust-root", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A Sigstore trusted_root.json (Fulcio CAs, Rekor and CT log keys, timestamp authorities).")
@click.option("--identity", default=None, help="The signer identity the Sigstore certificate must name (e-mail, URI).")
@click.option("--issuer", default=None, help="The OIDC issuer that must have vouched for --identity.")
@json_option
def command(folder: Path, manifest_ref: str | None, torrent_file: Path | None, workers: int | None,
            signature: Path | None,
            public_key: Path | None, chain: tuple[Path, ...], sigstore_bundle: Path | None,
            trust_root: Path | None, identity: str | None, issuer: str | None, json_out: bool) -> None:
    """Verify the model files in FOLDER: sha256 against the manifest (or reported when there is
    none), or the pieces of the torrent the manifest pins (or --torrent) on every core, safetensors structure, params.json against the tensors, no pickles, no symlinks out;
    every file against FOLDER's provenance.json when it has one, and --signature when given."""
    app = get_app(json_out, "verify")
    if (public_key is not None or chain) and signature is None:
        from provision.errors import UsageError

        raise UsageError("--public-key and --certificate-chain check a --signature; pass one.")
    keyless = (sigstore_bundle, trust_root, identity, issuer)
    if any(v is not None for v in keyless) and any(v is None for v in keyless):
        from provision.errors import UsageError

        raise UsageError("A Sigstore signature is checked with all four of --sigstore-bundle, --trust-root, "
                         "--identity and --issuer.")
    from provision.stages.verify import verify_dir

    manifest = None
    if manifest_ref is not None:
        from provision.formats.manifest import load_manifest

        manifest = load_manifest(manifest_ref)
        app.manifest_sha256 = manifest.sha256
    elif (folder / "manifest.toml").is_file():
        app.terminal.info(f"note: {folder / 'manifest.toml'} is present; pass --manifest to check its hashes.")
    home = app.settings.home if manifest is not None else None  # the store's torrents/ for the manifest's magnet
    report = verify_dir(folder, manifest, progress=app.terminal.progress, workers=workers, torrent=torrent_file,
                        home=home)
    render_report(app, report)
    doc: dict[str, Any] = {"manifest": str(manifest.path) if manifest and manifest.path else None,
                           "verify": report.to_dict()}
    if not report.ok:
        err = report.failures[0].error
        if err is not None:
            app.fail(err, doc)
        report.raise_for_failure()
    _check_trust(app, folder, doc, signature, public_key, chain)
    if sigstore_bundle is not None and trust_root is not None and identity is not None and issuer is not None:
        _check_sigstore(app, folder, doc, sigstore_bundle, trust_root, identity, issuer)
    n = sum(1 for f in report.files if f.status == "ok")
    app.terminal.success(f"{n} files verified in {folder} ({report.seconds:.1f} s).")
    app.finish(doc)
