"""`provision plan`: offline plans for manifests and .torrent files, unknowns, disk preflight."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from provision.cli.main import run_cli
from provision.errors import DiskSpaceError
from provision.stages.plan import make_plan
from tests.support.reference_facts import PIXTRAL_12B

ROOT = Path(__file__).resolve().parents[2]


def test_plan_for_the_real_pixtral_manifest_works_offline(capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import provision.stages.plan as plan_mod
    from provision.hardware import Hardware

    monkeypatch.setattr(plan_mod, "detect", lambda: Hardware(cpu_count=3))  # a host without a GPU
    assert run_cli(["plan", str(ROOT / "manifests" / "pixtral-12b-2409.toml"), "--offline", "--json"]) == 0
    out = capsys.readouterr()
    plan = json.loads(out.out)["plan"]
    assert [f["path"] for f in plan["files"]] == ["consolidated.safetensors", "params.json", "tekken.json", "RELEASE"]
    assert plan["files"][1]["size"] == 453 and plan["unknown_sizes"] is True
    assert PIXTRAL_12B.magnet is not None
    assert plan["sources"][0].startswith(f"btih:{PIXTRAL_12B.magnet.btih[:8]}")
    assert plan["sources"][1].startswith(f"hf://{PIXTRAL_12B.hf_repo}")
    assert plan["files"][3]["sources"] == ["torrent"] and plan["files"][3]["optional"] is True
    assert "hardware: no GPU detected (3 CPU cores)" in out.err


def test_plan_marks_present_files(tiny_src: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    shutil.copy(tiny_src / "params.json", dest / "params.json")
    (dest / "tekken.json").write_bytes(b"short")
    plan = make_plan(str(tiny_src / "manifest.toml"), dest=dest, offline=True)
    status = {f.path: f.status for f in plan.files}
    assert status == {"consolidated.safetensors": "missing", "params.json": "present", "tekken.json": "size-mismatch"}
    assert plan.bytes_to_fetch == plan.bytes_total - (tiny_src / "params.json").stat().st_size


def test_not_enough_disk_fails_with_exit_6_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m = tmp_path / "huge.toml"
    m.write_text(
        'schema_version = 1\nname = "huge"\narchitecture = "pixtral"\nformat = "mistral"\n'
        '[[sources]]\ntype = "hf"\nrepo = "org/huge"\nrevision = "' + "a" * 40 + '"\n'
        '[[files]]\npath = "consolidated.safetensors"\nsize = 9000000000000000\n'
    )
    home = tmp_path / "home"
    assert run_cli(["plan", str(m), "--home", str(home)]) == 6
    err = capsys.readouterr().err
    assert "Not enough disk space" in err and "free" in err
    assert not home.exists()
    with pytest.raises(DiskSpaceError) as ei:
        make_plan(str(m), home=home)
    assert ei.value.context["needed"] == 9000000000000000


def test_plan_reads_a_torrent_file_offline(tmp_path: Path) -> None:
    import libtorrent as lt

    payload = tmp_path / "payload" / "model"
    payload.mkdir(parents=True)
    (payload / "params.json").write_bytes(b"{}" * 100)
    (payload / "consolidated.safetensors").write_bytes(b"\0" * 70000)
    fs = lt.file_storage()
    lt.add_files(fs, str(payload))
    ct = lt.create_torrent(fs, 16384)
    lt.set_piece_hashes(ct, str(payload.parent))
    tfile = tmp_path / "model.torrent"
    tfile.write_bytes(lt.bencode(ct.generate()))
    plan = make_plan(str(tfile), offline=True)
    assert plan.kind == "torrent" and plan.name == "model"
    assert sorted((f.path, f.size) for f in plan.files) == [("consolidated.safetensors", 70000), ("params.json", 200)]


def test_bare_magnet_offline_shows_the_listing_as_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    magnet = "magnet:?xt=urn:btih:7278e625de2b1da598b23954c13933047126238a&dn=pixtral-12b-240910"
    assert run_cli(["plan", magnet, "--offline", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["files"] == [] and plan["unknown_sizes"] is True and plan["name"] == "pixtral-12b-240910"
    assert any("unknown" in n for n in plan["notes"])


def test_hf_source_offline_shows_the_listing_as_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["plan", "hf://mistralai/Pixtral-12B-2409", "--offline", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["files"] == [] and plan["dest"].endswith("mistralai--Pixtral-12B-2409/original")


def test_run_dry_run_prints_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["run", "pixtral-12b-2409", "--dry-run", "--offline", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["dry_run"] is True and doc["plan"]["name"] == "pixtral-12b-2409"


def test_make_plan_lists_hf_and_magnet_sources_through_injected_listers(tmp_path: Path) -> None:
    from provision.settings import network_mode
    from provision.stages.fetch.request import HubOptions, HubSnapshot, RemoteFile
    from provision.stages.plan import Listers

    seen: list[object] = []
    snap = HubSnapshot(endpoint="http://hub", repo="org/m", revision="dev", commit="c" * 40,
                       files={"b.json": RemoteFile("b.json", 3, "1" * 40, None),
                              "a.safetensors": RemoteFile("a.safetensors", 5, "2" * 40, "f" * 64)})

    def hub(ref: object, options: HubOptions) -> HubSnapshot:
        seen.append((ref, options.token))
        return snap

    def magnet(m: object, timeout: float, network: str) -> list[tuple[str, int | None, str | None]]:
        seen.append((timeout, network))
        return [("x.bin", 7, None)]

    listers = Listers(magnet=magnet, hub=hub)
    plan = make_plan("hf://org/m@dev", home=tmp_path, listers=listers, hub_options=HubOptions(token="t"),
                     check_disk=False)
    assert [(f.path, f.size, f.sha256, f.sources) for f in plan.files] == [
        ("a.safetensors", 5, "f" * 64, ("hf",)), ("b.json", 3, None, ("hf",))]
    assert plan.hub_snapshot is snap and seen[0][1] == "t"
    mag = make_plan("magnet:?xt=urn:btih:" + "a" * 40, home=tmp_path, listers=listers, metadata_timeout=9.0,
                    check_disk=False)
    assert [f.path for f in mag.files] == ["x.bin"] and seen[1] == (9.0, network_mode()) and mag.hub_snapshot is None
    off = make_plan("hf://org/m", home=tmp_path, listers=listers, offline=True, check_disk=False)
    assert off.files == () and len(seen) == 2  # offline: no lister is called
