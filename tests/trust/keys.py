"""EC P-256 key pairs made on the spot for the signing tests (PEM files: PKCS#8 private, SPKI public)."""

from __future__ import annotations

from pathlib import Path


def ec_keypair(folder: Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.pem`` (private) and ``NAME.pub.pem`` (public) into ``folder``; return both paths."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    priv.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def certificate_chain(folder: Path, *, expired: bool = False) -> tuple[Path, Path, Path]:
    """A root CA and a code-signing leaf it issued (EC P-256): (leaf key, leaf certificate, root
    certificate), PEM files in ``folder``. ``expired``: the leaf's validity ended yesterday."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def usage(*, sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=not sign, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=sign, crl_sign=sign,
                             encipher_only=False, decipher_only=False)

    root_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = (x509.CertificateBuilder().subject_name(name("test root")).issuer_name(name("test root"))
            .public_key(root_key.public_key()).serial_number(1)
            .not_valid_before(now - 2 * day).not_valid_after(now + 10 * day)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(usage(sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(name("publisher")).issuer_name(name("test root"))
            .public_key(leaf_key.public_key()).serial_number(2)
            .not_valid_before(now - 2 * day).not_valid_after(now - day if expired else now + 10 * day)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256()))
    key, cert, root_pem = folder / "leaf.pem", folder / "leaf.crt", folder / "root.crt"
    key.write_bytes(leaf_key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    cert.write_bytes(leaf.public_bytes(ser.Encoding.PEM))
    root_pem.write_bytes(root.public_bytes(ser.Encoding.PEM))
    return key, cert, root_pem
