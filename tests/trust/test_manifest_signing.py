"""The manifest's ``[signing]`` table: a pinned EC public key and/or certificate chain (PEM text or a
file beside the manifest) and a signature location (a release file or an https / loopback-http URL).
Bad values are one-line ``ManifestError``s (exit 3) that never quote key bytes; a manifest written
back carries the key as PEM text, so it stays valid wherever it is copied."""

from __future__ import annotations

from pathlib import Path

import pytest

from provision.errors import ManifestError
from provision.formats.manifest import dump_manifest, load_manifest, parse_manifest_bytes, write_manifest
from tests.trust.keys import certificate_chain, ec_keypair

HEAD = '''schema_version = 1
name = "m"
architecture = "pixtral"
format = "mistral"

[[sources]]
type = "hf"
repo = "org/model"

[[files]]
path = "params.json"

'''


def _write(tmp_path: Path, signing: str) -> Path:
    p = tmp_path / "m.toml"
    p.write_text(HEAD + "[signing]\n" + signing)
    return p


def _error(tmp_path: Path, signing: str) -> ManifestError:
    with pytest.raises(ManifestError) as ei:
        load_manifest(_write(tmp_path, signing))
    assert ei.value.exit_code == 3 and "\n" not in ei.value.message
    return ei.value


def test_a_key_file_beside_the_manifest_is_read_and_kept_out_of_repr(tmp_path: Path) -> None:
    _priv, pub = ec_keypair(tmp_path, "publisher")
    m = load_manifest(_write(tmp_path, 'public_key = "publisher.pub.pem"\nsignature = "model.sig"\n'))
    assert m.signing is not None and m.signing.signature == "model.sig" and m.signing.signature_url is None
    assert m.signing.public_key == pub.read_bytes()
    body = pub.read_text().splitlines()[1]
    assert body not in repr(m)


def test_inline_pem_text_and_a_certificate_chain_are_accepted_and_written_back_inline(tmp_path: Path) -> None:
    _priv, pub = ec_keypair(tmp_path, "publisher")
    _key, _cert, root = certificate_chain(tmp_path)
    pem = pub.read_text()
    m = load_manifest(_write(tmp_path, f'public_key = """{pem}"""\ncertificate_chain = ["root.crt"]\n'
                                       'signature = "sigs/model.sig"\n'))
    assert m.signing is not None and m.signing.certificate_chain == (root.read_bytes(),)
    elsewhere = tmp_path / "copy" / "m.toml"
    elsewhere.parent.mkdir()
    write_manifest(m, elsewhere)  # no root.crt beside the copy: the chain travels as text
    back = load_manifest(elsewhere)
    assert back.signing == m.signing
    assert back.signing is not None and back.signing.public_key == pub.read_bytes()
    assert "BEGIN CERTIFICATE" in dump_manifest(back)


@pytest.mark.parametrize(("signing", "field", "says"), [
    ('public_key = "k.pem"\n', "signing.signature", "required field is missing"),
    ('signature = "model.sig"\n', "signing", "needs public_key or certificate_chain"),
    ('public_key = "absent.pem"\nsignature = "s"\n', "signing.public_key", "does not exist"),
    ('public_key = "-----BEGIN PUBLIC KEY-----\\nAAAASECRETBYTES\\n-----END PUBLIC KEY-----\\n"\nsignature = "s"\n',
     "signing.public_key", "is not a PEM public key"),
    ('public_key = "rsa.pem"\nsignature = "s"\n', "signing.public_key", "not an elliptic-curve public key"),
    ('certificate_chain = ["junk.crt"]\nsignature = "s"\n', "signing.certificate_chain[0]", "no readable PEM"),
    ('public_key = "k.pub.pem"\nsignature = "../model.sig"\n', "signing.signature", ".."),
    ('public_key = "k.pub.pem"\nsignature = "http://example.org/model.sig"\n', "signing.signature",
     "http:// only to a loopback address"),
    ('public_key = "k.pub.pem"\nsignature = "s"\nkeyring = "x"\n', "signing.keyring", "unknown field"),
    ('public_key = ["-----BEGIN PUBLIC KEY-----", "SECRETBYTES"]\nsignature = "s"\n', "signing.public_key",
     "expected PEM text"),
])
def test_bad_signing_values_are_one_line_exit_3_naming_the_field(
    tmp_path: Path, signing: str, field: str, says: str
) -> None:
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import rsa

    ec_keypair(tmp_path, "k")
    rsa_pub = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    (tmp_path / "rsa.pem").write_bytes(rsa_pub.public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    (tmp_path / "junk.crt").write_text("not a certificate\n")
    e = _error(tmp_path, signing)
    assert e.context.get("field") == field, e.message
    assert says in e.message and "SECRETBYTES" not in e.message


def test_a_loopback_http_or_an_https_url_is_a_signature_location(tmp_path: Path) -> None:
    ec_keypair(tmp_path, "k")
    for url in ("http://127.0.0.1:8080/model.sig", "http://localhost/model.sig", "https://example.org/m.sig"):
        m = load_manifest(_write(tmp_path, f'public_key = "k.pub.pem"\nsignature = "{url}"\n'))
        assert m.signing is not None and m.signing.signature_url == url


def test_a_manifest_without_signing_pins_nothing() -> None:
    assert parse_manifest_bytes(HEAD.encode()).signing is None
    assert "[signing]" not in dump_manifest(parse_manifest_bytes(HEAD.encode()))


def test_manifest_show_gives_key_fingerprints_never_key_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import hashlib

    from cryptography.hazmat.primitives import serialization as ser

    from provision.formats.report_schema import validate_report
    from tests.support.cli import cli_json

    _priv, pub = ec_keypair(tmp_path, "k")
    m = _write(tmp_path, 'public_key = "k.pub.pem"\nsignature = "model.sig"\n')
    rc, doc, err = cli_json(capsys, "manifest", "show", str(m))
    assert rc == 0, err
    validate_report(doc)
    der = ser.load_pem_public_key(pub.read_bytes()).public_bytes(ser.Encoding.DER,
                                                                 ser.PublicFormat.SubjectPublicKeyInfo)
    assert doc["manifest"]["signing"] == {"signature": "model.sig", "public_key_sha256": hashlib.sha256(der).hexdigest(),
                                          "certificate_sha256": []}
    body = pub.read_text().splitlines()[1]
    assert body not in json_text(doc) + err
    from tests.support.cli import cli_output

    rc, out, err = cli_output(capsys, "manifest", "show", str(m))
    assert rc == 0 and f"signing: signature model.sig; public key sha256 {hashlib.sha256(der).hexdigest()[:16]}" in out
    assert body not in out + err


def json_text(doc: object) -> str:
    import json

    return json.dumps(doc)
