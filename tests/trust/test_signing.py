"""`provision sign` and `provision verify --signature`: OpenSSF Model Signing with EC P-256 keys made
on the spot; every bad input is one line, exit 5, and no signature file is left behind."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from provision.formats.report_schema import validate_report
from provision.testing.ci import require_module
from tests.support.cli import cli_json
from tests.trust.keys import ec_keypair


@pytest.fixture(autouse=True)
def _model_signing() -> None:
    require_module("model_signing", why="provision sign / verify --signature")


@pytest.fixture()
def profile(tiny_src: Path, tmp_path: Path) -> Path:
    from provision import api

    out = tmp_path / "profile"
    api.convert(tiny_src, out, target="h100", scheme="bf16", layout="mistral")
    return out


def _sign(capsys: pytest.CaptureFixture[str], folder: Path, key: Path, sig: Path) -> dict:  # type: ignore[type-arg]
    rc, doc, err = cli_json(capsys, "sign", str(folder), "--key", str(key), "--signature", str(sig))
    assert rc == 0, err
    validate_report(doc)
    return doc


def test_sign_then_verify_offline_with_the_public_key(
    profile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    priv, pub = ec_keypair(tmp_path, "publisher")
    sig = tmp_path / "profile.sig"
    doc = _sign(capsys, profile, priv, sig)
    assert doc["sign"]["signature_sha256"] == hashlib.sha256(sig.read_bytes()).hexdigest()
    assert doc["sign"]["provenance"] is True
    assert doc["sign"]["files"] == len([p for p in profile.iterdir()])  # provenance.json included
    rc, ver, err = cli_json(capsys, "verify", str(profile), "--signature", str(sig), "--public-key", str(pub))
    assert rc == 0, err
    validate_report(ver)
    assert ver["signature"]["method"] == "key" and ver["provenance"]["files"] == doc["sign"]["files"] - 1


def test_the_private_key_never_reaches_stdout_stderr_the_log_or_the_report(
    profile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    priv, _pub = ec_keypair(tmp_path, "publisher")
    log = tmp_path / "log.txt"
    secret = priv.read_bytes()
    body = b"".join(secret.splitlines()[1:-1])  # the base64 key body, without the PEM armour lines
    rc, doc, err = cli_json(capsys, "--log-file", str(log), "-v", "sign", str(profile), "--key", str(priv),
                            "--signature", str(tmp_path / "s.sig"))
    assert rc == 0, err
    bad = tmp_path / "bad.pem"
    bad.write_bytes(secret[: len(secret) // 2])  # an unreadable key: its error names no key bytes either
    rc2, doc2, err2 = cli_json(capsys, "--log-file", str(log), "sign", str(profile), "--key", str(bad),
                               "--signature", str(tmp_path / "t.sig"))
    assert rc2 == 2 and not (tmp_path / "t.sig").exists()
    seen = (json.dumps(doc) + err + json.dumps(doc2) + err2).encode() + log.read_bytes()
    for chunk in (body[i:i + 24] for i in range(0, len(body) - 24, 24)):
        assert chunk not in seen


def _verify(capsys: pytest.CaptureFixture[str], folder: Path, sig: Path, pub: Path) -> tuple[int, dict, str]:  # type: ignore[type-arg]
    rc, doc, err = cli_json(capsys, "verify", str(folder), "--signature", str(sig), "--public-key", str(pub))
    if doc:
        validate_report(doc)
    return rc, doc, err


def _one_line_5(rc: int, doc: dict, err: str) -> str:  # type: ignore[type-arg]
    assert rc == 5, err
    msg: str = doc["error"]["message"]
    assert doc["ok"] is False and "\n" not in msg
    return msg


def test_a_tampered_file_fails_the_signature_with_exit_5(
    profile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    priv, pub = ec_keypair(tmp_path, "publisher")
    sig = tmp_path / "p.sig"
    _sign(capsys, profile, priv, sig)
    # change a file and its record together, so only the signature can catch it
    (profile / "tekken.json").write_bytes((profile / "tekken.json").read_bytes() + b" ")
    rec = json.loads((profile / "provenance.json").read_text())
    for f in rec["files"]:
        if f["path"] == "tekken.json":
            data = (profile / "tekken.json").read_bytes()
            f["size"], f["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (profile / "provenance.json").write_text(json.dumps(rec))
    msg = _one_line_5(*_verify(capsys, profile, sig, pub))
    assert "does not match signature" in msg


def test_a_tampered_record_fails_the_signature_with_exit_5(
    profile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    priv, pub = ec_keypair(tmp_path, "publisher")
    sig = tmp_path / "p.sig"
    _sign(capsys, profile, priv, sig)
    rec = json.loads((profile / "provenance.json").read_text())
    rec["recipe"]["scheme"] = "fp8"  # a lie about the recipe; the files still match the record
    (profile / "provenance.json").write_text(json.dumps(rec))
    msg = _one_line_5(*_verify(capsys, profile, sig, pub))
    assert "provenance.json" in msg


def test_a_signature_by_another_key_fails_with_exit_5(
    profile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    priv, _pub = ec_keypair(tmp_path, "mallory")
    _p2, trusted = ec_keypair(tmp_path, "publisher")
    sig = tmp_path / "p.sig"
    _sign(capsys, profile, priv, sig)
    msg = _one_line_5(*_verify(capsys, profile, sig, trusted))
    assert "not made by the trusted key" in msg


@pytest.mark.parametrize("content", [b"{garbage", b'{"mediaType": 1}', b""])
def test_a_malformed_signature_file_fails_with_exit_5(
    profile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    _priv, pub = ec_keypair(tmp_path, "publisher")
    sig = tmp_path / "bad.sig"
    sig.write_bytes(content)
    msg = _one_line_5(*_verify(capsys, profile, sig, pub))
    assert "malformed" in msg


def test_signing_a_folder_that_no_longer_matches_its_record_writes_no_signature(
    profile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    priv, _pub = ec_keypair(tmp_path, "publisher")
    shutil.copy(profile / "params.json", profile / "extra.json")
    sig = tmp_path / "p.sig"
    rc, doc, err = cli_json(capsys, "sign", str(profile), "--key", str(priv), "--signature", str(sig))
    _one_line_5(rc, doc, err)
    assert not sig.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".provision-tmp")]


def test_a_signature_inside_the_folder_it_signs_is_refused(
    profile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    priv, _pub = ec_keypair(tmp_path, "publisher")
    rc, _doc, err = cli_json(capsys, "sign", str(profile), "--key", str(priv), "--signature", str(profile / "x.sig"))
    assert rc == 2, err
    assert not (profile / "x.sig").exists()


def test_a_folder_with_a_symlink_is_neither_signed_nor_verified(
    profile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    priv, pub = ec_keypair(tmp_path, "publisher")
    sig = tmp_path / "p.sig"
    _sign(capsys, profile, priv, sig)
    (tmp_path / "secret.txt").write_text("outside")
    (profile / "link.txt").symlink_to(tmp_path / "secret.txt")
    _one_line_5(*_verify(capsys, profile, sig, pub))
    rc, doc, err = cli_json(capsys, "sign", str(profile), "--key", str(priv), "--signature", str(tmp_path / "q.sig"))
    _one_line_5(rc, doc, err)
    assert not (tmp_path / "q.sig").exists()
