"""A bundle of a model whose manifest pins its publisher (``[signing]``): `bundle import` lands it
"as if fetched", so the bundled original must carry the release's signature and match it, as the
fetch required. A bundle rebuilt around a signature by another key (its bundle.json and torrent
made consistent again, as whoever rebuilt it can) is exit 5 with nothing in the store."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from provision.formats.report_schema import validate_report
from provision.testing.ci import require_module
from tests.support.cli import cli_json, provision_home
from tests.trust.keys import ec_keypair

MODEL = "tiny-pixtral"


@pytest.fixture(scope="module")
def signed_bundle(tiny_src: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a bundle of the tiny model fetched from a signed release with a pinned key, the other key)."""
    require_module("model_signing", why="a manifest's pinned signature")
    from provision import api
    from provision.stages.sign import sign_folder

    work = tmp_path_factory.mktemp("signed-bundle")
    release = work / "rel"
    shutil.copytree(tiny_src, release)
    priv, pub = ec_keypair(work, "publisher")
    other, _ = ec_keypair(work, "other")
    sign_folder(release, private_key=priv, signature=work / "model.sig")
    shutil.copyfile(work / "model.sig", release / "model.sig")
    text = (release / "manifest.toml").read_text()
    text = text.replace('[[sources]]\ntype = "hf"', '[[sources]]\ntype = "local"\npath = "."\n\n[[sources]]\ntype = "hf"')
    (release / "manifest.toml").write_text(text + f'\n[signing]\npublic_key = "{pub}"\nsignature = "model.sig"\n')
    home = work / "home"
    api.run(str(release / "manifest.toml"), home=home, target="cpu", skip_smoke=True)  # fetch checks the pin
    out = work / "bundle"
    api.bundle_export(MODEL, out, home=home, manifest=release / "manifest.toml")
    return out, other


def _reseal(b: Path) -> None:
    """Make bundle.json and the torrent agree with the files again (what a rebuilt bundle does)."""
    from provision.stages.fetch.torrent.create import create_torrent

    doc: dict[str, Any] = json.loads((b / "bundle.json").read_text())
    tpath = doc["torrent"]["path"]
    for f in doc["files"]:
        if f["path"] != tpath:
            data = (b / f["path"]).read_bytes()
            f["size"], f["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    payload = sorted((f["path"], f["size"]) for f in doc["files"] if f["path"] != tpath)
    ct = create_torrent(b, files=payload, name=doc["torrent"]["name"])
    (b / tpath).write_bytes(ct.data)
    doc["torrent"]["btih"], doc["torrent"]["btmh"] = ct.btih, ct.btmh
    for f in doc["files"]:
        if f["path"] == tpath:
            f["size"], f["sha256"] = len(ct.data), hashlib.sha256(ct.data).hexdigest()
    (b / "bundle.json").write_text(json.dumps(doc))


def test_a_signed_original_is_imported_and_the_signature_is_reported(
    signed_bundle: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    b, _other = signed_bundle
    assert (b / "original" / "model.sig").is_file()  # the fetch kept the release's signature
    rc, doc, err = cli_json(capsys, "bundle", "import", str(b))
    assert rc == 0, err
    validate_report(doc, "bundle import")
    sig = doc["bundle"]["authority"]["signature"]
    assert sig["checked"] is True and sig["method"] == "key" and sig["signature"] == "model.sig"
    assert sig["files"] == 3 and sig["signature_sha256"] == hashlib.sha256(
        (b / "original" / "model.sig").read_bytes()).hexdigest()


def test_a_bundle_rebuilt_around_another_keys_signature_is_exit_5_and_nothing_lands(
    signed_bundle: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from provision.stages.sign import sign_folder

    src, other = signed_bundle
    b = tmp_path / "b"
    shutil.copytree(src, b)
    orig = b / "original"
    (orig / "model.sig").unlink()
    sign_folder(orig, private_key=other, signature=tmp_path / "forged.sig")
    shutil.copyfile(tmp_path / "forged.sig", orig / "model.sig")
    _reseal(b)
    rc, doc, err = cli_json(capsys, "bundle", "import", str(b))
    assert rc == 5, err
    assert doc["error"]["message"] == "Signature model.sig does not verify: not made by the pinned public key."
    home = provision_home()
    assert not (home / "models" / MODEL).exists()
    assert not [p for p in (home / "staging").rglob("*") if p.is_file()] if (home / "staging").exists() else True
