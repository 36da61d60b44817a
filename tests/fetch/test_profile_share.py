"""Quantize once, seed the result, on loopback: an origin converts the tiny model to fp8 once, signs the
profile and seeds it (`provision seed MODEL --profile fp8-hf`); a member runs `provision run MANIFEST
--profile-from MAGNET --trust-key PUB` and gets the profile without the original and without converting.
Every refusal (a record naming another source, a changed file, no signature where a key is required, a
signature by another key) is one line, exit 5, and leaves nothing in the member's store.

Every libtorrent session here is closed (no DHT/LSD/UPnP/NAT-PMP) and listens on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from provision.formats.report_schema import validate_report
from provision.testing.ci import require_module
from provision.testing.torrent_fixtures import seed_thread
from tests.support.cli import cli_json
from tests.trust.keys import ec_keypair

pytestmark = [pytest.mark.timeout(240)]

PROFILE = "fp8-hf"


@dataclass(frozen=True)
class Origin:
    home: Path
    profile: Path
    signature: Path
    public_key: Path
    other_key: Path  # a key pair's public half that did not sign anything here
    manifest: Path


@pytest.fixture(scope="module")
def origin(tiny_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Origin:
    """The tiny model converted once to fp8 (target l4, smoke on the CPU) and signed."""
    require_module("model_signing", why="profiles are shared signed")
    from provision import api

    root = tmp_path_factory.mktemp("origin")
    home = root / "home"
    res = api.run(str(tiny_src / "manifest.toml"), home=home, adopt=tiny_src, target="l4", device="cpu")
    assert res.profile == PROFILE and res.profile_dir is not None
    priv, pub = ec_keypair(root, "publisher")
    _other_priv, other_pub = ec_keypair(root, "stranger")
    sig = root / "fp8.sig"
    api.sign(res.profile_dir, key=priv, signature=sig)
    return Origin(home=home, profile=res.profile_dir, signature=sig, public_key=pub, other_key=other_pub,
                  manifest=tiny_src / "manifest.toml")


@contextlib.contextmanager
def seeding(folder: Path, **kw: Any) -> Iterator[str]:
    """``folder`` seeded as a shared profile from a thread (closed network, 127.0.0.1) through the Python
    API: yields the magnet."""
    from provision.api import seed_profile

    ready = threading.Event()
    stop = threading.Event()
    got: dict[str, Any] = {}

    def run() -> None:
        try:
            got["result"] = seed_profile(folder, network="closed", listen="127.0.0.1:0", seed_for=None, stop=stop,
                                         on_ready=lambda info: (got.setdefault("magnet", info.magnet), ready.set()),
                                         **kw)
        except BaseException as e:  # shown by the test
            got["error"] = e
            ready.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        assert ready.wait(60), "the seeder did not start"
        if "error" in got:
            raise got["error"]
        yield str(got["magnet"])
    finally:
        stop.set()
        t.join(30)


def _member(capsys: pytest.CaptureFixture[str], home: Path, manifest: Path, ref: str,
            *extra: str) -> tuple[int, dict[str, Any], str]:
    rc, doc, err = cli_json(capsys, "run", str(manifest), "--home", str(home), "--profile-from", ref,
                            "--network", "closed", "--device", "cpu", "--offline", "--stall-timeout", "30", *extra)
    if doc:
        validate_report(doc)
    return rc, doc, err


def _nothing_committed(home: Path) -> None:
    model = home / "models" / "tiny-pixtral"
    assert not (model / PROFILE).exists() and not (model / f"{PROFILE}_signature.sig").exists()
    assert not (model / "original").exists()


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_a_member_takes_the_signed_profile_from_the_seeder_without_the_original_or_a_conversion(
        origin: Origin, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "member"
    with seeding(origin.profile, signature=origin.signature) as magnet:
        rc, doc, err = _member(capsys, home, origin.manifest, magnet, "--trust-key", str(origin.public_key))
        assert rc == 0, err
        stages = [s["stage"] for s in doc["stages"]]
        assert stages == ["plan", "fetch-profile", "smoke"], stages  # no fetch, verify or convert
        got = home / "models" / "tiny-pixtral" / PROFILE
        assert doc["profile_dir"] == str(got) and doc["profile"] == PROFILE
        assert not (got.parent / "original").exists()
        for f in sorted(p for p in origin.profile.rglob("*") if p.is_file()):  # byte for byte, record included
            assert _sha(got / f.relative_to(origin.profile)) == _sha(f), f.name
        assert (got.parent / f"{PROFILE}_signature.sig").read_bytes() == origin.signature.read_bytes()
        fp = doc["stages"][1]["details"]
        assert fp["checks"]["signature"]["verified"] is True
        assert "manifest sha256" in fp["checks"]["source"]["matched"]
        assert doc["stages"][2]["result"] == "ok" and doc["provenance"]["sha256"] == _sha(got / "provenance.json")
        # the member's smoke test did not rewrite the publisher's signed record: the signature still verifies
        rc2, ver, err2 = cli_json(capsys, "verify", str(got), "--signature",
                                  str(got.parent / f"{PROFILE}_signature.sig"), "--public-key", str(origin.public_key))
        assert rc2 == 0 and ver["signature"]["method"] == "key", err2
        # a second run finds the profile in place and fetches nothing
        rc3, again, err3 = _member(capsys, home, origin.manifest, magnet, "--trust-key", str(origin.public_key))
        assert rc3 == 0, err3
        assert [(s["stage"], s["result"]) for s in again["stages"]] == [
            ("plan", "ok"), ("fetch-profile", "skipped"), ("smoke", "skipped")]


def test_a_profile_whose_record_names_another_source_is_refused_with_exit_5(
        origin: Origin, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from provision.testing.tiny import write_tiny

    other = tmp_path / "other"
    write_tiny(other, seed=1)  # same name, other weights: another source
    home = tmp_path / "member"
    with seeding(origin.profile, signature=origin.signature) as magnet:
        rc, doc, err = _member(capsys, home, other / "manifest.toml", magnet, "--trust-key", str(origin.public_key))
    assert rc == 5, err
    assert "names another source" in doc["error"]["message"]
    assert "\n" not in doc["error"]["message"] and len([x for x in err.splitlines() if x.startswith("error:")]) == 1
    _nothing_committed(home)
    assert not any((home / "staging").rglob("provenance.json"))  # staging cleaned


def _tampered_share(origin: Origin, tmp_path: Path) -> Path:
    """A copy of the profile with one byte of its weights flipped (same size), its signature beside it."""
    bad = tmp_path / "bad-origin" / "tiny-pixtral" / PROFILE
    shutil.copytree(origin.profile, bad)
    weights = next(p for p in sorted(bad.glob("*.safetensors")))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    shutil.copyfile(origin.signature, bad.with_name(f"{PROFILE}_signature.sig"))
    return bad


def test_a_profile_with_a_changed_file_is_refused_with_exit_5_and_nothing_committed(
        origin: Origin, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from provision.stages.profile_share import _publish_folder

    bad = _tampered_share(origin, tmp_path)
    from provision.stages.profile_share import seed_profile

    with pytest.raises(Exception) as refused:  # the origin itself refuses to publish it
        seed_profile(bad, network="closed", listen="127.0.0.1:0", seed_for=0)
    assert getattr(refused.value, "exit_code", None) == 5
    # a seeder that does not check (another tool) serves it anyway: the member refuses it
    with _publish_folder(bad, bad.with_name(f"{PROFILE}_signature.sig"), "tiny-pixtral-fp8-hf") as root, \
            seed_thread(root, listen="127.0.0.1:0") as info:
        home = tmp_path / "member"
        rc, doc, err = _member(capsys, home, origin.manifest, info.magnet, "--trust-key", str(origin.public_key))
    assert rc == 5, err
    assert "does not match provenance.json" in doc["error"]["message"] or "changed" in doc["error"]["message"]
    _nothing_committed(home)


def test_an_unsigned_profile_is_refused_with_exit_5_when_a_key_is_required(
        origin: Origin, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "member"
    with seeding(origin.profile) as magnet:  # no --signature, none beside the folder
        rc, doc, err = _member(capsys, home, origin.manifest, magnet, "--trust-key", str(origin.public_key))
        assert rc == 5, err
        assert "not signed" in doc["error"]["message"]
        _nothing_committed(home)
        # --allow-unsigned takes it on its record alone (and says so)
        rc2, doc2, err2 = _member(capsys, home, origin.manifest, magnet, "--allow-unsigned")
        assert rc2 == 0, err2
        assert doc2["stages"][1]["details"]["checks"]["signature"]["verified"] is False


def test_a_profile_signed_by_an_untrusted_key_is_refused_with_exit_5(
        origin: Origin, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from provision import api
    from provision.errors import VerifyError
    from provision.stages.fetch import TorrentOptions

    home = tmp_path / "member"
    with seeding(origin.profile, signature=origin.signature) as magnet:
        rc, doc, err = _member(capsys, home, origin.manifest, magnet, "--trust-key", str(origin.other_key))
        assert rc == 5, err
        assert "not made by the trusted key" in doc["error"]["message"]
        _nothing_committed(home)
        with pytest.raises(VerifyError, match="trusted key") as refused:  # the Python API refuses it the same way
            api.run(str(origin.manifest), home=tmp_path / "api-member", offline=True, profile_from=magnet,
                    trust_key=origin.other_key, device="cpu", torrent=TorrentOptions(network="closed"))
        assert refused.value.exit_code == 5
    _nothing_committed(tmp_path / "api-member")


def test_profile_from_usage_errors_are_exit_2_before_any_download(
        origin: Origin, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "member"
    rc, doc, _err = _member(capsys, home, origin.manifest, "127.0.0.1:6881", "--trust-key", str(origin.public_key))
    assert rc == 2 and "does not say which torrent" in doc["error"]["message"]
    magnet = "magnet:?xt=urn:btih:" + "ab" * 20 + "&x.pe=127.0.0.1:9"
    rc2, doc2, _ = _member(capsys, home, origin.manifest, magnet)  # no key, no --allow-unsigned
    assert rc2 == 2 and "--trust-key" in json.dumps(doc2["error"])
    _nothing_committed(home)


def test_seed_profile_cli_publishes_the_record_and_signature_in_the_torrent(
        origin: Origin, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import libtorrent as lt

    torrent, magnet_out = tmp_path / "p.torrent", tmp_path / "p.magnet"
    rc, doc, err = cli_json(capsys, "--home", str(origin.home), "seed", "tiny-pixtral", "--profile", PROFILE,
                            "--signature", str(origin.signature), "--network", "closed", "--seed-for", "0",
                            "--torrent-out", str(torrent), "--magnet-out", str(magnet_out))
    assert rc == 0, err
    validate_report(doc)
    prof = doc["seed"]["profile"]
    assert prof["name"] == PROFILE and prof["signature"] == str(origin.signature)
    assert prof["record_sha256"] == _sha(origin.profile / "provenance.json")
    fs = lt.torrent_info(str(torrent)).layout()
    names = sorted(fs.file_path(i).split("/", 1)[1] for i in range(fs.num_files())
                   if not fs.file_flags(i) & fs.flag_pad_file)
    want = sorted([f"{PROFILE}/{p.relative_to(origin.profile).as_posix()}" for p in origin.profile.rglob("*")
                   if p.is_file()] + [f"{PROFILE}_signature.sig"])
    assert names == want
    assert magnet_out.read_text().strip() == doc["seed"]["magnet"]
    assert not [p for p in origin.profile.parent.iterdir() if p.name.startswith(".provision-share-")]


def test_the_key_the_manifest_pins_is_the_trusted_key_without_trust_key(
        origin: Origin, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pinned = tmp_path / "pinned"
    pinned.mkdir()
    manifest = pinned / "manifest.toml"
    shutil.copyfile(origin.other_key, pinned / "publisher.pub.pem")  # pins a key that did not sign the profile
    manifest.write_text(origin.manifest.read_text()
                        + '\n[signing]\npublic_key = "publisher.pub.pem"\nsignature = "model.sig"\n')
    home = tmp_path / "member"
    with seeding(origin.profile, signature=origin.signature) as magnet:
        rc, doc, err = _member(capsys, home, manifest, magnet)
        assert rc == 5 and "trusted key" in doc["error"]["message"], err
        _nothing_committed(home)
        shutil.copyfile(origin.public_key, pinned / "publisher.pub.pem")  # now the publisher's own key
        rc2, doc2, err2 = _member(capsys, home, manifest, magnet)
    assert rc2 == 0, err2
    checks = doc2["stages"][1]["details"]["checks"]
    assert checks["signature"] == {**checks["signature"], "verified": True, "key": "manifest [signing]"}
    # the manifest's bytes differ from the origin's (a [signing] table): the files tie the record to it
    assert "manifest sha256" not in checks["source"]["matched"]
    assert "file consolidated.safetensors" in checks["source"]["matched"]


def test_a_torrent_file_with_the_seeder_named_by_peer_works_without_a_magnet(
        origin: Origin, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from provision.formats.sources import parse_magnet

    torrent = tmp_path / "fp8.torrent"
    home = tmp_path / "member"
    with seeding(origin.profile, signature=origin.signature, torrent_out=torrent) as magnet:
        peer = parse_magnet(magnet).peers[0]  # the seeder's HOST:PORT, as `provision seed` prints it
        rc, doc, err = _member(capsys, home, origin.manifest, str(torrent), "--peer", peer,
                               "--trust-key", str(origin.public_key), "--skip-smoke")
    assert rc == 0, err
    assert [s["stage"] for s in doc["stages"]] == ["plan", "fetch-profile"]
    assert _tree(home / "models" / "tiny-pixtral" / PROFILE) == _tree(origin.profile)


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}
