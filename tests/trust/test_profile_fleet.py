"""Quantize once, seed the result, proven on a private network (network namespaces joined by a bridge,
10.77.0.0/24, as tests/fetch/test_fleet.py builds it): one origin converts the tiny model to fp8 once and
signs it, then seeds the profile (`provision seed tiny-pixtral --profile fp8-hf`, upload capped, 2 upload
slots, opentracker with a whitelist); four members, each a separate `provision run MANIFEST --profile-from
MAGNET --trust-key PUB` in the closed network mode on its own address, started together.

Proves: every member ends with the origin's profile byte for byte (record and signature included), smoke-
tested; none of them fetched the original or converted (no fetch/verify/convert stage in its report, no
original/ in its store); the origin uploaded at most 1.2x the profile (the members fed each other); a
fifth member that trusts another key refuses the profile (exit 5, nothing committed), while the four
still serve it. Figures are printed (`pytest -s`).

Needs root (namespaces): in CI its absence is a failure, elsewhere a skip.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from provision.testing.ci import require_module, require_tool
from provision.testing.fleet_fixtures import BT_PORT, Fleet, Proc, fleet_network, require_netns
from provision.testing.torrent_fixtures import wait_for
from tests.trust.keys import ec_keypair

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(400)]

CAP = "4M"  # the origin's upload cap, under what the members trade at on 2 shared cores
PROFILE = "fp8-hf"
MEMBERS = ("m1", "m2", "m3", "m4")
ADDRS = {"tracker": "10.77.0.1", "origin": "10.77.0.2", "m1": "10.77.0.11", "m2": "10.77.0.12",
         "m3": "10.77.0.13", "m4": "10.77.0.14", "m5": "10.77.0.15"}
MEMBER_SEED_FOR = 45  # seconds each member serves after its download (during its smoke test, then after)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _member_argv(manifest: Path, home: Path, magnet: str, key: Path, addr: str) -> list[str]:
    return ["run", str(manifest), "--home", str(home), "--profile-from", magnet, "--trust-key", str(key),
            "--network", "closed", "--listen", f"{addr}:{BT_PORT}", "--seed-for", str(MEMBER_SEED_FOR),
            "--device", "cpu", "--offline", "--stall-timeout", "90", "--json"]


def _wait_exit(p: Proc, timeout: float) -> int:
    wait_for(p.done, timeout, interval=0.2, what=f"{p.name} to finish")
    return int(p.proc.returncode)


def test_one_origin_converts_once_and_four_members_take_the_signed_fp8_profile_from_the_swarm(
        tmp_path: Path) -> None:
    require_netns()
    require_tool("opentracker")
    require_module("model_signing", why="profiles are shared signed")
    from provision import api
    from provision.testing.tiny import write_tiny

    tiny = tmp_path / "tiny"
    write_tiny(tiny, seed=0)
    # the origin converts once (no network needed: the original is adopted from disk) and signs
    origin_home = tmp_path / "origin-home"
    res = api.run(str(tiny / "manifest.toml"), home=origin_home, adopt=tiny, target="l4", device="cpu")
    assert [s["stage"] for s in res.stages if s["result"] == "ok"].count("convert") == 1
    assert res.profile == PROFILE and res.profile_dir is not None
    profile = res.profile_dir
    priv, pub = ec_keypair(tmp_path, "publisher")
    _stranger_priv, stranger_pub = ec_keypair(tmp_path, "stranger")
    sig = tmp_path / "fp8-hf.sig"
    api.sign(profile, key=priv, signature=sig)
    want = _tree(profile)
    size = sum((profile / rel).stat().st_size for rel in want)
    # a member has only the manifest: its original files are nowhere on its disk
    manifests = {}
    for name in (*MEMBERS, "m5"):
        (tmp_path / "src" / name).mkdir(parents=True)
        manifests[name] = tmp_path / "src" / name / "manifest.toml"
        shutil.copyfile(tiny / "manifest.toml", manifests[name])

    with fleet_network(ADDRS, lifetime=600) as net:
        fleet = Fleet(net, tmp_path / "fleet")
        try:
            fleet.start_tracker()
            origin = fleet.start_origin(Path("tiny-pixtral"), cap=CAP, extra=[
                "--home", str(origin_home), "--profile", PROFILE, "--signature", str(sig), "--upload-slots", "2", "--super-seed"])
            assert f"x.pe={ADDRS['origin']}:" in origin.magnet and "tr=http%3A%2F%2F10.77.0.1" in origin.magnet
            homes = {n: tmp_path / "homes" / n for n in (*MEMBERS, "m5")}
            t0 = time.monotonic()
            procs = [fleet.start_provision(n, _member_argv(manifests[n], homes[n], origin.magnet, pub, ADDRS[n]),
                                           home=homes[n]) for n in MEMBERS]
            model = {n: homes[n] / "models" / "tiny-pixtral" for n in MEMBERS}

            def all_committed() -> bool:
                for p in procs:
                    if p.done() and p.proc.returncode != 0:
                        raise AssertionError(f"{p.name} exited {p.proc.returncode}:\n{p.tail()}")
                return all((model[n] / PROFILE / "provenance.json").is_file() for n in MEMBERS)

            wait_for(all_committed, 180, interval=0.2, what="every member to commit the profile")
            t_fleet = time.monotonic() - t0
            up = fleet.stop_origin(origin)  # every member has it: what the origin uploaded is final

            # a member that trusts another key: it can only get the profile from the four, and refuses it
            m5 = fleet.start_provision("m5", _member_argv(manifests["m5"], homes["m5"], origin.magnet,
                                                         stranger_pub, ADDRS["m5"]), home=homes["m5"])
            assert _wait_exit(m5, 120) == 5, m5.tail()
            rep5 = m5.report()
            assert rep5["error"]["exit_code"] == 5 and "trusted key" in rep5["error"]["message"]
            m5_model = homes["m5"] / "models" / "tiny-pixtral"
            assert not (m5_model / PROFILE).exists() and not (m5_model / "original").exists()
            assert not list(homes["m5"].rglob("provenance.json"))  # staging cleaned too
            # the origin is gone: m5 got every byte from the four members, and refused them only after

            reports: list[dict[str, Any]] = []
            for p in procs:
                assert _wait_exit(p, MEMBER_SEED_FOR + 120) == 0, p.tail()
                reports.append(p.report())
        finally:
            fleet.close()

    traded = 0
    for n, rep in zip(MEMBERS, reports, strict=True):
        stages = {s["stage"]: s for s in rep["stages"]}
        assert [s["stage"] for s in rep["stages"]] == ["plan", "fetch-profile", "smoke", "seed"], n
        assert not {"fetch", "verify", "convert"} & set(stages), f"{n} fetched the original or converted"
        assert not (model[n] / "original").exists() and not list(homes[n].rglob("consolidated.safetensors"))
        assert _tree(model[n] / PROFILE) == want, f"{n} holds other bytes than the origin's profile"
        assert (model[n] / f"{PROFILE}_signature.sig").read_bytes() == sig.read_bytes()
        assert stages["fetch-profile"]["details"]["checks"]["signature"]["verified"] is True
        assert stages["smoke"]["result"] == "ok" and stages["smoke"]["details"]["passed"] is True
        traded += int(stages["seed"]["bytes"])
    print(f"\nprofile fleet: {len(MEMBERS)} members, profile {size / 1e6:.1f} MB, origin cap {CAP}B/s, 2 slots\n"
          f"  all committed in {t_fleet:.1f} s; origin uploaded {up / 1e6:.1f} MB = {up / size:.2f}x the profile "
          f"(target <= 1.2); members uploaded {traded / 1e6:.1f} MB while seeding after their download")
    assert up <= 1.2 * size, (up, size)
