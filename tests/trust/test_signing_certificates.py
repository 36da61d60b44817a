"""Signing with a certificate (a leaf issued by a root made on the spot) and checking it offline
against the chain: a chain of another root, an expired leaf and a malformed chain are exit 5."""

from __future__ import annotations

from pathlib import Path

import pytest

from provision.formats.report_schema import validate_report
from provision.testing.ci import require_module
from tests.support.cli import cli_json
from tests.trust.keys import certificate_chain


@pytest.fixture(autouse=True)
def _model_signing() -> None:
    require_module("model_signing", why="provision sign --certificate")


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "README.md").write_text("a model card\n")
    (d / "params.json").write_text("{}")
    return d


def _sign(capsys: pytest.CaptureFixture[str], folder: Path, key: Path, cert: Path, root: Path, sig: Path) -> None:
    rc, doc, err = cli_json(capsys, "sign", str(folder), "--key", str(key), "--certificate", str(cert),
                            "--certificate-chain", str(root), "--signature", str(sig))
    assert rc == 0, err
    validate_report(doc)
    assert doc["sign"]["method"] == "certificate"


def _verify(capsys: pytest.CaptureFixture[str], folder: Path, sig: Path, root: Path) -> tuple[int, dict, str]:  # type: ignore[type-arg]
    rc, doc, err = cli_json(capsys, "verify", str(folder), "--signature", str(sig), "--certificate-chain", str(root))
    validate_report(doc)
    return rc, doc, err


def test_a_certificate_signature_verifies_offline_against_its_root(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, cert, root = certificate_chain(tmp_path)
    _sign(capsys, folder, key, cert, root, tmp_path / "m.sig")
    rc, doc, err = _verify(capsys, folder, tmp_path / "m.sig", root)
    assert rc == 0, err
    assert doc["signature"]["method"] == "certificate" and doc["signature"]["files"] == 2


def test_a_chain_of_another_root_is_refused_with_exit_5(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, cert, root = certificate_chain(tmp_path)
    _sign(capsys, folder, key, cert, root, tmp_path / "m.sig")
    other = tmp_path / "other"
    other.mkdir()
    _k, _c, other_root = certificate_chain(other)
    rc, doc, err = _verify(capsys, folder, tmp_path / "m.sig", other_root)
    assert rc == 5, err
    assert "\n" not in doc["error"]["message"] and "certificate chain" in doc["error"]["message"]


def test_signing_with_an_expired_certificate_is_refused_and_writes_nothing(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, cert, root = certificate_chain(tmp_path, expired=True)
    rc, doc, err = cli_json(capsys, "sign", str(folder), "--key", str(key), "--certificate", str(cert),
                            "--certificate-chain", str(root), "--signature", str(tmp_path / "m.sig"))
    assert rc == 2, err
    assert "expired" in doc["error"]["message"] and not (tmp_path / "m.sig").exists()


def test_a_signature_whose_certificate_has_expired_is_refused_with_exit_5(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """model-signing 1.1.1 itself accepts an expired leaf; provision checks the validity period."""
    key, cert, root = certificate_chain(tmp_path, expired=True)
    from provision.stages import sign

    with monkeypatch.context() as m:  # let the signing through, as an older signer would have
        m.setattr(sign, "_check_validity", lambda *a, **k: None)
        sign.sign_folder(folder, private_key=key, signature=tmp_path / "m.sig", certificate=cert,
                         certificate_chain=[root])
    rc, doc, err = _verify(capsys, folder, tmp_path / "m.sig", root)
    assert rc == 5, err
    assert "expired" in doc["error"]["message"] and "\n" not in doc["error"]["message"]


def test_a_malformed_certificate_chain_is_refused_with_exit_5(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, cert, root = certificate_chain(tmp_path)
    _sign(capsys, folder, key, cert, root, tmp_path / "m.sig")
    junk = tmp_path / "junk.crt"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    rc, doc, err = _verify(capsys, folder, tmp_path / "m.sig", junk)
    assert rc == 5, err
    assert "\n" not in doc["error"]["message"]
