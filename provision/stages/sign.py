"""Signing a folder of weights with OpenSSF Model Signing, and checking such a signature offline.

``sign_folder`` signs every file of a folder (an original or a profile, its ``provenance.json``
included) with an elliptic-curve private key, or a key plus its signing certificate and chain,
and writes the Sigstore-bundle signature atomically outside the folder; a folder whose
provenance record no longer matches its files is refused first, so nothing is signed that the
record does not vouch for. ``verify_folder_signature`` checks a signature against a public key
or a certificate chain without the network; a changed, missing or extra file, a signature made
by another key and a malformed signature file are each a one-line ``VerifyError`` (exit 5).
Key material is never put in a message or a result. ``signed_digests`` and ``check_signed_files``
check a signature a manifest pins at fetch time (``provision.stages.fetch.signed``): the files
staged by a fetcher against the sha256 the verified signature lists. ``verify_sigstore_bundle``
checks a keyless (Sigstore) signature offline against a given ``trusted_root.json``; keyless
*signing* is not done here: it needs the network (an OIDC token, Fulcio, Rekor, a timestamp
authority). The ``model_signing`` package (the ``signing`` extra) is imported when used.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provision.errors import HashMismatchError, HostileContentError, UsageError, VerifyError
from provision.formats import provenance
from provision.io.atomic import TMP_PREFIX, fsync_dir, fsync_path
from provision.io.hashing import sha256_file
from provision.io.opening import check_regular

MAX_SIGNATURE_BYTES = 16 << 20
_DIFF = re.compile(r"(?P<what>Hash mismatch for|Extra files found in model|Missing files in model)"
                   r" \\?'(?P<name>[^'\\]*)\\?'(?::\s*(?P<files>[^\]\"'\\]*))?")


@dataclass(frozen=True)
class SignatureResult:
    """A signature made or checked: the folder, the signature file and its sha256, the files it covers."""

    folder: Path
    signature: Path
    signature_sha256: str
    files: int
    provenance: bool  # the folder holds a provenance.json (covered by the signature, and checked)
    method: str  # "key" or "certificate"

    def to_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "signature": str(self.signature),
                "signature_sha256": self.signature_sha256, "files": self.files, "provenance": self.provenance,
                "method": self.method}


def _model_signing() -> Any:
    try:
        import model_signing
    except ImportError as e:
        raise UsageError("Signing needs the model-signing package: pip install 'provision[signing]'.") from e
    return model_signing


def _check_folder(folder: Path, signature: Path, *, check_record: bool = True) -> tuple[int, bool]:
    """The folder's file count and whether it has a record, after checking it: only regular files,
    the signature outside it, and the files matching its ``provenance.json`` when it has one."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        raise UsageError(f"{folder} is not a folder.", path=str(folder))
    sig = Path(signature).resolve()
    if sig == folder.resolve() or folder.resolve() in sig.parents:
        raise UsageError(f"--signature {signature} is inside {folder}; write it outside the folder it signs.",
                         path=str(signature))
    has_record = (folder / provenance.PROVENANCE_NAME).exists()
    if has_record and check_record:
        provenance.check(folder, inert_extra_ok=True)  # a README beside a profile is signed with it
    n = len(provenance.list_files(folder)) + (1 if has_record else 0)
    if n == 0:
        raise UsageError(f"{folder} holds no file to sign.", path=str(folder))
    return n, has_record


def _hashing_config(ms: Any) -> Any:
    """Every file counts: git files (.gitignore, .gitattributes) are not skipped as the library's default does."""
    return ms.hashing.Config().set_ignored_paths(paths=[], ignore_git_paths=False)


def sign_folder(folder: Path, *, private_key: Path, signature: Path, certificate: Path | None = None,
                certificate_chain: Sequence[Path] = ()) -> SignatureResult:
    """Sign every file of ``folder`` with ``private_key`` (PEM, elliptic curve; with ``certificate``
    and its ``certificate_chain`` when given) into ``signature`` (written atomically, outside the folder)."""
    folder, signature, private_key = Path(folder), Path(signature), Path(private_key)
    n, has_record = _check_folder(folder, signature)
    check_regular(private_key, what="private key")
    for p in ([certificate] if certificate else []) + list(certificate_chain):
        check_regular(p, what="certificate")
    if certificate is not None:
        try:
            _check_validity(certificate.read_bytes(), what=f"certificate {certificate.name}")
        except VerifyError as e:
            raise UsageError(str(e)) from None
    ms = _model_signing()
    cfg = ms.signing.Config().set_hashing_config(_hashing_config(ms))
    try:
        if certificate is not None:
            cfg.use_certificate_signer(private_key=private_key, signing_certificate=certificate,
                                       certificate_chain=list(certificate_chain))
        else:
            cfg.use_elliptic_key_signer(private_key=private_key)
    except Exception:  # the library's message may quote the key file: never repeated
        raise UsageError(f"--key {private_key.name} is not a usable elliptic-curve private key (PEM), or the "
                         "certificate does not belong to it.") from None
    signature.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{signature.name}.", dir=signature.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        cfg.sign(folder, tmp)
        fsync_path(tmp)
        os.replace(tmp, signature)
        fsync_dir(signature.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):  # replaced: nothing left to remove
            tmp.unlink()
    return SignatureResult(folder=folder, signature=signature, signature_sha256=sha256_file(signature), files=n,
                           provenance=has_record, method="certificate" if certificate is not None else "key")


def _mismatch(message: str) -> str:
    """The first difference the library names (a file), without its digest bytes."""
    m = _DIFF.search(message)
    if m is None:
        return "the files differ from the signed ones"
    if m["what"] == "Hash mismatch for":
        return f"{m['name']} changed"
    kind = "extra" if m["what"].startswith("Extra") else "missing"
    return f"{kind} file(s) {(m['files'] or '').strip().rstrip(',')}"


def _check_validity(der_or_pem: bytes, *, what: str) -> None:
    """Refuse (``VerifyError``) a certificate outside its validity period now: without a trusted
    timestamp the signing time is unknown, so an expired signing certificate vouches for nothing."""
    import datetime

    from cryptography import x509

    try:
        cert = (x509.load_pem_x509_certificate(der_or_pem) if der_or_pem.lstrip().startswith(b"-----")
                else x509.load_der_x509_certificate(der_or_pem))
    except ValueError:
        raise VerifyError(f"The {what} is not a readable X.509 certificate.") from None
    now = datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        state = "expired" if now > cert.not_valid_after_utc else "not yet valid"
        raise VerifyError(f"The {what} is {state} (valid {cert.not_valid_before_utc:%Y-%m-%d} to "
                          f"{cert.not_valid_after_utc:%Y-%m-%d}); a signature made with it is not trusted.")


def _signing_certificate(signature: Path) -> bytes:
    """The DER signing certificate a certificate-signed bundle carries (``VerifyError`` when it has none)."""
    import base64
    import json

    try:
        doc = json.loads(signature.read_bytes())
        raw = doc["verificationMaterial"]["x509CertificateChain"]["certificates"][0]["rawBytes"]
        return base64.b64decode(raw, validate=True)
    except (ValueError, KeyError, IndexError, TypeError):
        raise VerifyError(f"Signature {signature.name} carries no signing certificate (malformed, or made with "
                          "a bare key: check it with --public-key).", path=str(signature)) from None


def _unverified(signature: Path, public_key: Path | None) -> str:
    if public_key is not None:
        return f"Signature {signature.name} is malformed or does not verify."
    return (f"Signature {signature.name} does not verify against the certificate chain (malformed, expired, or "
            "signed under another root).")


def verify_folder_signature(folder: Path, *, signature: Path, public_key: Path | None = None,
                            certificate_chain: Sequence[Path] = (), check_record: bool = True) -> SignatureResult:
    """Check ``signature`` over every file of ``folder`` offline, against ``public_key`` (PEM) or,
    without one, the ``certificate_chain``; the folder is first checked against its provenance
    record unless ``check_record`` is False (the caller just did)."""
    folder, signature = Path(folder), Path(signature)
    if public_key is None and not certificate_chain:
        raise UsageError("Checking a signature needs --public-key or --certificate-chain.")
    _check_signature_file(signature, "--signature")
    n, has_record = _check_folder(folder, signature, check_record=check_record)
    ms = _model_signing()
    cfg = ms.verifying.Config().set_hashing_config(_hashing_config(ms))
    try:
        if public_key is not None:
            check_regular(Path(public_key), what="public key")
            cfg.use_elliptic_key_verifier(public_key=Path(public_key))
        else:
            cfg.use_certificate_verifier(certificate_chain=[Path(c) for c in certificate_chain])
    except Exception:  # the library's message may quote the file: never repeated
        what = "public key" if public_key is not None else "certificate chain"
        raise VerifyError(f"The {what} could not be loaded (PEM expected); nothing can be trusted with it.") from None
    if public_key is None:
        _check_validity(_signing_certificate(signature), what="signing certificate in the signature")
    try:
        cfg.verify(folder, signature)
    except ValueError as e:
        msg = str(e)
        if msg.startswith("Signature mismatch"):
            raise VerifyError(f"{folder} does not match signature {signature.name}: {_mismatch(msg)[:200]}.",
                              path=str(folder)) from None
        if "key" in msg.lower() and "mismatch" in msg.lower():
            raise VerifyError(f"Signature {signature.name} was not made by the trusted key.",
                              path=str(signature)) from None
        raise VerifyError(_unverified(signature, public_key), path=str(signature)) from None
    except Exception:  # a malformed bundle surfaces as KeyError, TypeError, protobuf and crypto errors
        raise VerifyError(_unverified(signature, public_key), path=str(signature)) from None
    return SignatureResult(folder=folder, signature=signature, signature_sha256=sha256_file(signature), files=n,
                           provenance=has_record, method="key" if public_key is not None else "certificate")


# ---------------------------------------------------------------------------------------
# a signature pinned by a manifest: the signed per-file digests, checked at fetch time


@dataclass(frozen=True)
class SignedDigests:
    """What a verified signature vouches for: ``{relative path: sha256}``, and how it was made."""

    files: dict[str, str]
    method: str  # "key" or "certificate"
    signature_sha256: str


def signed_digests(signature: Path, *, public_key: bytes | None = None,
                   certificate_chain: Sequence[bytes] = (), label: str | None = None) -> SignedDigests:
    """Check ``signature`` (an OpenSSF Model Signing bundle) against a pinned ``public_key`` (PEM
    bytes) or, failing that, ``certificate_chain`` (PEM bytes, one certificate each), offline, and
    return the sha256 of every file it covers. Nothing is hashed here: a caller compares its files'
    digests with these. A signature by another key, an expired signing certificate, a malformed
    bundle, or one that hashes files another way than sha256 per file is a one-line ``VerifyError``
    naming the signature by ``label`` (default its file name); key bytes appear in no message."""
    import shutil

    label = label or Path(signature).name
    if public_key is None and not certificate_chain:
        raise UsageError("Checking a signature needs a public key or a certificate chain.")
    try:
        st = check_regular(Path(signature), what="signature")
    except FileNotFoundError:
        raise VerifyError(f"Signature {label} does not exist.", path=str(signature)) from None
    if st.st_size > MAX_SIGNATURE_BYTES:
        raise HostileContentError(f"Refusing signature {label}: {st.st_size:,d} bytes is over the "
                                  f"{MAX_SIGNATURE_BYTES:,d}-byte limit.")
    ms = _model_signing()
    from model_signing._signing import sign_sigstore_pb

    try:
        bundle = sign_sigstore_pb.Signature.read(Path(signature))
    except Exception:  # protobuf / JSON errors: the file is no bundle
        raise VerifyError(f"Signature {label} is malformed (not an OpenSSF Model Signing bundle).") from None
    keydir = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}keys-"))
    try:
        tried: list[str] = []
        for method in ("key", "certificate"):
            cfg = ms.verifying.Config()
            if method == "key":
                if public_key is None:
                    continue
                (keydir / "key.pem").write_bytes(public_key)
                cfg.use_elliptic_key_verifier(public_key=keydir / "key.pem")
            else:
                if not certificate_chain:
                    continue
                paths = []
                for i, pem in enumerate(certificate_chain):
                    (keydir / f"chain{i}.pem").write_bytes(pem)
                    paths.append(keydir / f"chain{i}.pem")
                try:
                    _check_validity(_signing_certificate(Path(signature)),
                                    what=f"signing certificate in signature {label}")
                except VerifyError as e:
                    tried.append(str(e))
                    continue
                cfg.use_certificate_verifier(certificate_chain=paths)
            try:
                manifest = cfg._verifier.verify(bundle)
            except Exception:  # a bundle by another key, or a malformed one: never quoted
                tried.append(f"not made by the pinned {'public key' if method == 'key' else 'certificate chain'}")
                continue
            return _digests_of(manifest, method, sha256_file(Path(signature)), label)
        why = "; ".join(tried) if tried else "no usable pinned key"
        raise VerifyError(f"Signature {label} does not verify: {why[:300]}.", path=str(signature))
    finally:
        shutil.rmtree(keydir, ignore_errors=True)


def _digests_of(manifest: Any, method: str, signature_sha256: str, label: str) -> SignedDigests:
    ser = dict(getattr(manifest, "serialization_type", {}) or {})
    if ser.get("method") != "files" or ser.get("hash_type") != "sha256":
        raise VerifyError(f"Signature {label} hashes files as {ser.get('method')}/{ser.get('hash_type')}; provision "
                          "checks signatures that hash each file with sha256 (model-signing's default).")
    files: dict[str, str] = {}
    for rd in manifest.resource_descriptors():
        files[str(rd.identifier)] = rd.digest.digest_hex
    return SignedDigests(files=files, method=method, signature_sha256=signature_sha256)


def check_signed_files(signed: SignedDigests, files: Mapping[str, tuple[Path, str | None]], *, label: str,
                       skip: str | None = None) -> dict[str, Any]:
    """Every file of ``files`` (``{relative path: (where it is now, its sha256 or None)}``, ``skip``
    left out: the signature itself) must be covered by ``signed`` with the same sha256 (hashed here
    when not given). A file the signature does not cover is ``VerifyError``, other bytes
    ``HashMismatchError`` (exit 5). Returns the facts for a report (no key material)."""
    checked = 0
    for rel in sorted(files):
        if rel == skip:
            continue
        where, sha = files[rel]
        want = signed.files.get(rel)
        if want is None:
            raise VerifyError(f"{rel} is not covered by signature {label}: its publisher did not sign it.",
                              path=rel)
        got = sha or sha256_file(where)
        if got != want:
            raise HashMismatchError(f"{rel} does not match signature {label}: sha256 {got[:16]}…, signed "
                                    f"{want[:16]}….", path=rel)
        checked += 1
    return {"signature": label, "signature_sha256": signed.signature_sha256, "method": signed.method,
            "files": checked, "signed_not_fetched": sorted(set(signed.files) - set(files))[:50]}


# ---------------------------------------------------------------------------------------
# keyless (Sigstore) signatures: verified offline against a given trusted root

MAX_TRUST_ROOT_BYTES = 4 << 20


def verify_sigstore_bundle(folder: Path, *, bundle: Path, trust_root: Path, identity: str, issuer: str,
                           check_record: bool = True) -> SignatureResult:
    """Check a keyless OpenSSF Model Signing signature (a Sigstore bundle: Fulcio certificate, Rekor
    entry, timestamps) over ``folder`` offline: the certificate must chain to a Fulcio CA of
    ``trust_root`` (a Sigstore ``trusted_root.json``), its SCT, the Rekor inclusion proof and
    signed checkpoint, and the signed timestamps must verify against the keys ``trust_root``
    carries, and the certificate must name ``identity`` issued by the OIDC ``issuer``. No network
    is used: sigstore-python verifies all of that from the bundle and the root. Then the folder
    must match the signed file list (the signer's ignored paths left out). Every failure is a
    one-line ``VerifyError`` (exit 5)."""
    import json

    folder, bundle, trust_root = Path(folder), Path(bundle), Path(trust_root)
    _check_signature_file(bundle, "--sigstore-bundle")
    n, has_record = _check_folder(folder, bundle, check_record=check_record)
    ms = _model_signing()
    from model_signing._signing import sign_sigstore
    from sigstore.models import TrustedRoot
    from sigstore.verify import Verifier, policy

    try:
        tst = check_regular(trust_root, what="trust root")
        if tst.st_size > MAX_TRUST_ROOT_BYTES:
            raise ValueError("too large")
        root = TrustedRoot.from_file(str(trust_root))
        verifier = Verifier(trusted_root=root)
    except FileNotFoundError:
        raise UsageError(f"--trust-root {trust_root} does not exist.", path=str(trust_root)) from None
    except Exception:  # pydantic / JSON / crypto errors: one line
        raise VerifyError(f"--trust-root {trust_root.name} is not a Sigstore trusted root (trusted_root.json) "
                          "with a Fulcio CA and a transparency log.", path=str(trust_root)) from None
    sig_verifier = sign_sigstore.Verifier.__new__(sign_sigstore.Verifier)  # the root given, not a TUF lookup
    sig_verifier._verifier = verifier
    sig_verifier._policy = policy.Identity(identity=identity, issuer=issuer)
    cfg = ms.verifying.Config()
    cfg._verifier, cfg._uses_sigstore = sig_verifier, True
    try:
        cfg.verify(folder, bundle)
    except json.JSONDecodeError:
        raise VerifyError(f"Signature {bundle.name} is malformed (not a Sigstore bundle).", path=str(bundle)) from None
    except ValueError as e:
        msg = str(e)
        if msg.startswith("Signature mismatch"):
            raise VerifyError(f"{folder} does not match signature {bundle.name}: {_mismatch(msg)[:200]}.",
                              path=str(folder)) from None
        raise VerifyError(f"Signature {bundle.name} does not verify against {trust_root.name} for identity "
                          f"{identity} from {issuer} ({msg.splitlines()[0][:160] if msg else 'ValueError'}).",
                          path=str(bundle)) from None
    except Exception as e:  # sigstore's VerificationError (identity, chain, log, time) and malformed bundles
        why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise VerifyError(f"Signature {bundle.name} does not verify against {trust_root.name} for identity "
                          f"{identity} from {issuer} ({why}).", path=str(bundle)) from None
    return SignatureResult(folder=folder, signature=bundle, signature_sha256=sha256_file(bundle), files=n,
                           provenance=has_record, method="sigstore")


def _check_signature_file(path: Path, option: str) -> None:
    """A signature given by ``option``: an existing regular file within ``MAX_SIGNATURE_BYTES``."""
    try:
        st = check_regular(path, what="signature")
    except FileNotFoundError:
        raise UsageError(f"{option} {path} does not exist.", path=str(path)) from None
    if st.st_size > MAX_SIGNATURE_BYTES:
        raise HostileContentError(f"Refusing signature {path.name}: {st.st_size:,d} bytes is over the "
                                  f"{MAX_SIGNATURE_BYTES:,d}-byte limit.", path=str(path))
