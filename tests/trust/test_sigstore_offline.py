"""`provision verify --sigstore-bundle B --trust-root R --identity I --issuer U` checks a keyless
(Sigstore) OpenSSF Model Signing signature with no network at all: the Fulcio chain, SCT, Rekor
inclusion proof and checkpoint, and signed timestamp all verify against the given trusted root.

The signature is real: ``data/oms-v1.1.0-sigstore.sig`` is the model-transparency project's
interoperability test vector ``scripts/tests/v1.1.0-sigstore/model.sig`` (Apache-2.0), signed
through Sigstore's public-good instance (Fulcio, Rekor, TSA) over two files, ``signme-1`` and
``signme-2`` (their bytes are their names; the signed sha256 of each is checked below). The trusted
root is Sigstore's production ``trusted_root.json`` as sigstore-python ships it, copied to a file:
the same root an air-gapped host would be handed. Every test records socket connects: none."""

from __future__ import annotations

import hashlib
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest

from provision.formats.report_schema import validate_report
from tests.support.cli import cli_json

BUNDLE = Path(__file__).parent / "data" / "oms-v1.1.0-sigstore.sig"
IDENTITY = "stefanb@us.ibm.com"
ISSUER = "https://sigstore.verify.ibm.com/oauth2"
SIGNED = {"signme-1": "f6310066c7320497ea554260c32c43660bff648cb2a61194832cc086077085e1",
          "signme-2": "32dcb1f8e1ae52d5963e56a6ba06ab58b424c15ed2a6b70d2feca1d089370028"}


def _shipped_root(instance: str) -> Path:
    pytest.importorskip("model_signing")
    import sigstore

    p = Path(sigstore.__file__).parent / "_store" / f"https%3A%2F%2F{instance}" / "trusted_root.json"
    if not p.is_file():
        pytest.skip(f"sigstore-python does not ship {instance}'s trusted_root.json here")
    return p


@pytest.fixture()
def connects(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    seen: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        seen.append(address)
        raise OSError("connections are refused in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return seen


@pytest.fixture()
def signed(tmp_path: Path) -> tuple[Path, Path]:
    """(the signed folder, the production trusted root copied beside it)."""
    folder = tmp_path / "model"
    folder.mkdir()
    for name, sha in SIGNED.items():
        (folder / name).write_bytes(name.encode())
        assert hashlib.sha256(name.encode()).hexdigest() == sha  # the bytes the signature vouches for
    root = tmp_path / "trusted_root.json"
    shutil.copyfile(_shipped_root("tuf-repo-cdn.sigstore.dev"), root)
    return folder, root


def _verify(capsys: pytest.CaptureFixture[str], folder: Path, root: Path, *, identity: str = IDENTITY,
            issuer: str = ISSUER) -> tuple[int, dict, str]:  # type: ignore[type-arg]
    rc, doc, err = cli_json(capsys, "verify", str(folder), "--sigstore-bundle", str(BUNDLE), "--trust-root",
                            str(root), "--identity", identity, "--issuer", issuer)
    validate_report(doc)
    return rc, doc, err


def test_a_real_sigstore_signature_verifies_offline_against_a_given_trust_root(
    signed: tuple[Path, Path], capsys: pytest.CaptureFixture[str], connects: list[Any]
) -> None:
    folder, root = signed
    rc, doc, err = _verify(capsys, folder, root)
    assert rc == 0, err
    sg = doc["sigstore"]
    assert sg["method"] == "sigstore" and sg["identity"] == IDENTITY and sg["issuer"] == ISSUER
    assert sg["signature_sha256"] == hashlib.sha256(BUNDLE.read_bytes()).hexdigest() and sg["files"] == 2
    from provision import api

    res = api.verify_sigstore(folder, bundle=BUNDLE, trust_root=root, identity=IDENTITY, issuer=ISSUER)
    assert res.method == "sigstore" and res.signature_sha256 == sg["signature_sha256"]
    assert connects == []


def test_a_changed_file_fails_the_sigstore_signature_with_exit_5(
    signed: tuple[Path, Path], capsys: pytest.CaptureFixture[str], connects: list[Any]
) -> None:
    folder, root = signed
    (folder / "signme-2").write_bytes(b"signme-X")
    rc, doc, err = _verify(capsys, folder, root)
    assert rc == 5, err
    assert "signme-2 changed" in doc["error"]["message"] and "\n" not in doc["error"]["message"]
    assert connects == []


@pytest.mark.parametrize(("identity", "issuer"), [("someone@example.org", ISSUER),
                                                  (IDENTITY, "https://accounts.google.com")])
def test_another_identity_or_issuer_is_exit_5(
    signed: tuple[Path, Path], capsys: pytest.CaptureFixture[str], identity: str, issuer: str
) -> None:
    folder, root = signed
    rc, doc, err = _verify(capsys, folder, root, identity=identity, issuer=issuer)
    assert rc == 5, err
    msg = doc["error"]["message"]
    assert msg.startswith("Signature oms-v1.1.0-sigstore.sig does not verify") and "\n" not in msg


def test_a_trust_root_that_does_not_hold_the_signing_ca_is_exit_5(
    signed: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], connects: list[Any]
) -> None:
    folder, _root = signed
    staging = tmp_path / "staging_root.json"  # Sigstore's staging instance: other CAs and log keys
    shutil.copyfile(_shipped_root("tuf-repo-cdn.sigstage.dev"), staging)
    rc, doc, err = _verify(capsys, folder, staging)
    assert rc == 5, err
    assert "does not verify against staging_root.json" in doc["error"]["message"]
    assert connects == []


def test_a_malformed_trust_root_is_exit_5_and_a_missing_issuer_is_exit_2(
    signed: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _root = signed
    bad = tmp_path / "bad_root.json"
    bad.write_text('{"mediaType": "nonsense"}')
    rc, doc, err = _verify(capsys, folder, bad)
    assert rc == 5 and "is not a Sigstore trusted root" in doc["error"]["message"], err
    rc, doc, err = cli_json(capsys, "verify", str(folder), "--sigstore-bundle", str(BUNDLE), "--trust-root",
                            str(bad), "--identity", IDENTITY)
    assert rc == 2 and "--issuer" in doc["error"]["message"], err
