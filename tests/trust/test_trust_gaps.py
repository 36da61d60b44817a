"""The trust gaps closed after issue 20: a profile's signature goes with the profile (``rm``, ``gc``),
``run --profile-from`` trusts a certificate chain (given, or pinned by the manifest), a profile
converted here is not replaced by a shared one without ``--force``, and the bad inputs of the issue
that had no test through ``--profile-from`` (a tampered record, a record naming a file outside the
folder, a malformed chain): one-line error, exit 5, nothing committed. The swarm runs on 127.0.0.1
with DHT, LSD, UPnP and NAT-PMP off (``--network closed``)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from provision.testing.torrent_fixtures import seed_thread
from tests.fetch.test_profile_share import PROFILE, Origin, _member, _nothing_committed, origin, seeding
from tests.support.cli import cli_json
from tests.trust.keys import certificate_chain

__all__ = ["origin"]  # the fixture, shared with tests/fetch/test_profile_share.py

pytestmark = [pytest.mark.timeout(240)]

MODEL = "tiny-pixtral"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _one_line(doc: dict[str, Any], err: str) -> str:
    msg = str(doc["error"]["message"])
    assert "\n" not in msg and len([x for x in err.splitlines() if x.startswith("error:")]) == 1, err
    return msg


def _share_copy(origin: Origin, where: Path) -> Path:
    """A copy of the origin's profile laid out as a store: ``where/tiny-pixtral/fp8-hf``."""
    folder = where / MODEL / PROFILE
    shutil.copytree(origin.profile, folder)
    return folder


@contextlib.contextmanager
def raw_seeding(folder: Path, signature: Path | None) -> Iterator[str]:
    """``folder`` served as a shared profile by a seeder that checks nothing (another tool, or a
    hostile one): yields the magnet."""
    from provision.stages.profile_share import _publish_folder

    with _publish_folder(folder, signature, f"{MODEL}-{PROFILE}") as root, \
            seed_thread(root, listen="127.0.0.1:0") as info:
        yield info.magnet


# -- 1. a profile's signature goes with its profile ------------------------------------------------


def _fake_store(home: Path) -> Path:
    mdir = home / "models" / MODEL
    (mdir / PROFILE).mkdir(parents=True)
    (mdir / PROFILE / "model.safetensors").write_bytes(b"w" * 1000)
    (mdir / "original").mkdir()
    (mdir / "original" / "params.json").write_text("{}")
    (mdir / f"{PROFILE}_signature.sig").write_bytes(b"s" * 300)
    return mdir


def test_rm_profile_removes_the_profiles_signature_beside_it_and_keeps_the_original(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    mdir = _fake_store(home)
    (mdir / "other_signature.sig").write_bytes(b"x")  # another profile's: not ours to remove
    (mdir / "other").mkdir()
    rc, doc, err = cli_json(capsys, "rm", MODEL, "--profile", PROFILE, "--yes", "--home", str(home))
    assert rc == 0, err
    assert not (mdir / PROFILE).exists() and not (mdir / f"{PROFILE}_signature.sig").exists()
    assert (mdir / "original" / "params.json").is_file() and (mdir / "other_signature.sig").is_file()
    kinds = {Path(r["path"]).name: r["kind"] for r in doc["removed"]}
    assert kinds == {PROFILE: "profile", f"{PROFILE}_signature.sig": "signature"}


def test_rm_profile_size_counts_the_signature(tmp_path: Path) -> None:
    from provision.store.remove import removal_size

    home = tmp_path / "home"
    _fake_store(home)
    assert removal_size(home, MODEL, PROFILE) == 1000 + 300


def test_gc_removes_a_signature_whose_profile_is_gone_and_keeps_one_beside_its_profile(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    mdir = _fake_store(home)
    orphan = mdir / "gone-profile_signature.sig"  # left by an rm before signatures went with profiles
    orphan.write_bytes(b"o" * 10)
    rc, dry, err = cli_json(capsys, "gc", "--dry-run", "--home", str(home))
    assert rc == 0, err
    assert [(Path(i["path"]).name, i["kind"]) for i in dry["removed"]] == [(orphan.name, "signature")]
    assert orphan.is_file()
    rc2, doc, err2 = cli_json(capsys, "gc", "--home", str(home))
    assert rc2 == 0, err2
    assert [Path(i["path"]).name for i in doc["removed"]] == [orphan.name]
    assert "gone-profile" in doc["removed"][0]["reason"]
    assert not orphan.exists() and (mdir / f"{PROFILE}_signature.sig").is_file() and (mdir / PROFILE).is_dir()


# -- 2. --profile-from trusts a certificate chain ---------------------------------------------------


@pytest.fixture(scope="module")
def cert_signed(origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The origin's profile signed with a leaf certificate (``good``), and with an expired leaf
    (``expired``, signed as an older signer that did not check the validity period would)."""
    from provision.stages import sign

    root = tmp_path_factory.mktemp("certs")
    out: dict[str, Path] = {}
    for kind in ("good", "expired"):
        (root / kind).mkdir()
        key, cert, ca = certificate_chain(root / kind, expired=kind == "expired")
        folder = _share_copy(origin, root / kind / "share")
        with contextlib.ExitStack() as stack:
            if kind == "expired":  # let the signing through, as an older signer would have
                stack.enter_context(mock.patch.object(sign, "_check_validity", lambda *a, **k: None))
            sign.sign_folder(folder, private_key=key, signature=folder.with_name(f"{PROFILE}_signature.sig"),
                             certificate=cert, certificate_chain=[ca])
        out[kind], out[f"{kind}-root"] = folder, ca
    (root / "stranger").mkdir()
    out["other-root"] = certificate_chain(root / "stranger")[2]
    return out


def test_profile_from_takes_a_profile_signed_under_the_trusted_certificate_chain(
        origin: Origin, cert_signed: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "member"
    with seeding(cert_signed["good"]) as magnet:
        rc, doc, err = _member(capsys, home, origin.manifest, magnet, "--trust-certificate-chain",
                               str(cert_signed["good-root"]), "--skip-smoke")
    assert rc == 0, err
    sig = doc["stages"][1]["details"]["checks"]["signature"]
    assert sig["verified"] is True and sig["method"] == "certificate" and sig["key"] == "--trust-certificate-chain"
    got = home / "models" / MODEL
    assert _sha(got / f"{PROFILE}_signature.sig") == _sha(cert_signed["good"].with_name(f"{PROFILE}_signature.sig"))
    assert _sha(got / PROFILE / "provenance.json") == _sha(origin.profile / "provenance.json")


@pytest.mark.parametrize("case", ["other-root", "expired", "malformed"])
def test_profile_from_refuses_another_chain_an_expired_signer_or_a_malformed_chain_with_exit_5(
        origin: Origin, cert_signed: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        case: str) -> None:
    folder = cert_signed["expired" if case == "expired" else "good"]
    chain = {"other-root": cert_signed["other-root"], "expired": cert_signed["expired-root"],
             "malformed": tmp_path / "junk.crt"}[case]
    if case == "malformed":
        chain.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    home = tmp_path / "member"
    with seeding(folder) as magnet:
        rc, doc, err = _member(capsys, home, origin.manifest, magnet, "--trust-certificate-chain", str(chain))
    assert rc == 5, err
    msg = _one_line(doc, err)
    want = {"other-root": "certificate chain", "expired": "expired", "malformed": "certificate chain"}[case]
    assert want in msg, msg
    _nothing_committed(home)
    assert not any((home / "staging").rglob("provenance.json"))


def test_the_certificate_chain_the_manifest_pins_is_trusted_without_an_option(
        origin: Origin, cert_signed: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pinned = tmp_path / "pinned"
    pinned.mkdir()
    manifest = pinned / "manifest.toml"
    shutil.copyfile(cert_signed["other-root"], pinned / "root.crt")  # pins a chain that did not sign it
    manifest.write_text(origin.manifest.read_text()
                        + '\n[signing]\ncertificate_chain = ["root.crt"]\nsignature = "model.sig"\n')
    home = tmp_path / "member"
    with seeding(cert_signed["good"]) as magnet:
        rc, doc, err = _member(capsys, home, manifest, magnet, "--skip-smoke")
        assert rc == 5 and "certificate chain" in _one_line(doc, err), err
        _nothing_committed(home)
        shutil.copyfile(cert_signed["good-root"], pinned / "root.crt")  # now the publisher's root
        rc2, doc2, err2 = _member(capsys, home, manifest, magnet, "--skip-smoke")
    assert rc2 == 0, err2
    sig = doc2["stages"][1]["details"]["checks"]["signature"]
    assert sig["verified"] is True and sig["key"] == "manifest [signing] certificate_chain"


def test_trust_key_and_trust_certificate_chain_together_are_exit_2(
        origin: Origin, cert_signed: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    magnet = "magnet:?xt=urn:btih:" + "ab" * 20 + "&x.pe=127.0.0.1:9"
    home = tmp_path / "member"
    rc, doc, err = _member(capsys, home, origin.manifest, magnet, "--trust-key", str(origin.public_key),
                           "--trust-certificate-chain", str(cert_signed["good-root"]))
    assert rc == 2 and "not both" in _one_line(doc, err)
    rc2, doc2, err2 = _member(capsys, home, origin.manifest, magnet, "--trust-certificate-chain",
                              str(tmp_path / "missing.crt"))
    assert rc2 == 2 and "does not exist" in _one_line(doc2, err2)
    _nothing_committed(home)


# -- 3. a profile converted here is not replaced silently ------------------------------------------


def test_a_profile_converted_here_is_not_replaced_by_a_shared_one_without_force(
        origin: Origin, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "member"
    shutil.copytree(origin.home, home)  # this host converted fp8-hf itself
    local = home / "models" / MODEL / PROFILE
    (local / "NOTES.md").write_text("my own conversion\n")
    before = {p.relative_to(local): _sha(p) for p in local.rglob("*") if p.is_file()}
    with seeding(origin.profile, signature=origin.signature) as magnet:
        rc, doc, err = _member(capsys, home, origin.manifest, magnet, "--trust-key", str(origin.public_key),
                               "--skip-smoke")
        assert rc == 2, err
        msg = _one_line(doc, err)
        assert PROFILE in msg and "converted here" in msg and "--force" in json.dumps(doc["error"])
        assert {p.relative_to(local): _sha(p) for p in local.rglob("*") if p.is_file()} == before
        assert not (local.parent / f"{PROFILE}_signature.sig").exists()
        assert not list((home / "staging").rglob("share-*"))  # the download is not kept
        rc2, doc2, err2 = _member(capsys, home, origin.manifest, magnet, "--trust-key", str(origin.public_key),
                                  "--skip-smoke", "--force")
    assert rc2 == 0, err2
    assert doc2["profile_dir"] == str(local)
    assert not (local / "NOTES.md").exists()  # the shared profile, byte for byte, replaced it
    assert _sha(local.parent / f"{PROFILE}_signature.sig") == _sha(origin.signature)
    state = json.loads((home / "models" / MODEL / "state.json").read_text())
    facts = next(v for k, v in state["stages"].items() if k == f"convert:{PROFILE}")["facts"]
    assert facts["how"] == "profile-from"


def test_a_profile_taken_earlier_from_another_torrent_is_replaced_without_force(
        origin: Origin, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "member"
    key = ("--trust-key", str(origin.public_key), "--skip-smoke")
    with seeding(origin.profile, signature=origin.signature) as magnet:
        rc, first, err = _member(capsys, home, origin.manifest, magnet, *key)
        assert rc == 0, err
    with seeding(origin.profile, signature=origin.signature, version="v1") as magnet_v1:  # another infohash
        rc2, doc, err2 = _member(capsys, home, origin.manifest, magnet_v1, *key)
    assert rc2 == 0, err2
    assert [(s["stage"], s["result"]) for s in doc["stages"]] == [("plan", "ok"), ("fetch-profile", "ok")]
    infohash = doc["stages"][1]["details"]["infohash"]
    assert infohash != first["stages"][1]["details"]["infohash"]
    state = json.loads((home / "models" / MODEL / "state.json").read_text())
    assert state["stages"][f"convert:{PROFILE}"]["facts"]["infohash"] == infohash
    assert "replacing the copy taken earlier" in err2


# -- 4. bad input through --profile-from that had no test --------------------------------------------


def test_a_shared_profile_with_a_tampered_record_is_refused_with_exit_5_and_nothing_committed(
        origin: Origin, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _share_copy(origin, tmp_path / "bad")
    rec = json.loads((folder / "provenance.json").read_text())
    rec["recipe"]["scheme"] = "bf16"  # a lie about the recipe; the files still match the record
    (folder / "provenance.json").write_text(json.dumps(rec))
    home = tmp_path / "member"
    with raw_seeding(folder, origin.signature) as magnet:
        rc, doc, err = _member(capsys, home, origin.manifest, magnet, "--trust-key", str(origin.public_key))
    assert rc == 5, err
    assert "provenance.json" in _one_line(doc, err)
    _nothing_committed(home)


def test_a_shared_record_naming_a_file_outside_the_folder_is_refused_with_exit_5_and_nothing_committed(
        origin: Origin, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _share_copy(origin, tmp_path / "bad")
    rec = json.loads((folder / "provenance.json").read_text())
    rec["files"].append({"path": "../../escape.bin", "size": 1, "sha256": "0" * 64})
    (folder / "provenance.json").write_text(json.dumps(rec))
    home = tmp_path / "member"
    with raw_seeding(folder, None) as magnet:  # unsigned: the record alone is judged
        rc, doc, err = _member(capsys, home, origin.manifest, magnet, "--allow-unsigned")
    assert rc == 5, err
    msg = _one_line(doc, err)
    assert "escape.bin" in msg or "'..'" in msg or "outside" in msg, msg
    _nothing_committed(home)
    assert not (home / "models" / "escape.bin").exists() and not (home / "escape.bin").exists()
