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
