"""`provision sign DIR --key KEY.pem --signature SIG`: sign a folder with OpenSSF Model Signing.

A thin command over ``provision.stages.sign.sign_folder``: every file of DIR (its
``provenance.json`` included, after the folder was checked against it) is signed with an
elliptic-curve private key, or the key and its signing certificate and chain. The signature
file is written atomically outside DIR; nothing is written when a check fails. The key's bytes
appear in no message, log or report. ``provision verify DIR --signature SIG --public-key
PUB.pem`` checks it offline.
"""

from __future__ import annotations

from pathlib import Path

import click

from provision.cli.app import get_app
from provision.cli.options import json_option


@click.command("sign")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--key", "private_key", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Elliptic-curve private key (PEM, unencrypted) to sign with.")
@click.option("--signature", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the signature (a Sigstore bundle), outside FOLDER.")
@click.option("--certificate", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The key's signing certificate (PEM): sign with a certificate instead of a bare key.")
@click.option("--certificate-chain", "chain", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Certificates up to the root, for --certificate (repeatable).")
@json_option
def command(folder: Path, private_key: Path, signature: Path, certificate: Path | None, chain: tuple[Path, ...],
            json_out: bool) -> None:
    """Sign every file of FOLDER (a model or a converted profile, its provenance.json included)."""
    app = get_app(json_out, "sign")
    from provision.stages.sign import sign_folder

    if chain and certificate is None:
        from provision.errors import UsageError

        raise UsageError("--certificate-chain needs --certificate.")
    res = sign_folder(folder, private_key=private_key, signature=signature, certificate=certificate,
                      certificate_chain=chain)
    app.terminal.success(f"Signed {res.files} files of {folder} -> {signature} (sha256 {res.signature_sha256[:16]}…).")
    app.finish({"sign": res.to_dict()})
