"""The Mistral 7B v0.1 and NeMo 12B 2407 manifests: what they pin, and `provision plan` offline.

Pinned values must be exactly the reference's (shared/reference/mistral-family.md) for that repo
and file; the tokenizer pins are cross-checked against the files mistral-common bundles.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from provision.cli.main import run_cli
from provision.formats.manifest import load_manifest
from provision.formats.sources import parse_magnet
from provision.stages.plan import make_plan
from provision.testing.hub_server import LoopbackHub
from tests.support.reference_facts import MISTRAL_7B, NEMO_INSTRUCT_2407

DATA = Path(__file__).resolve().parents[1] / "data"
NEW = ("mistral-7b-v0.1", "mistral-nemo-instruct-2407", "mistral-nemo-base-2407")


def _mc_data(name: str) -> Path:
    import mistral_common

    return Path(mistral_common.__file__).resolve().parent / "data" / name


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", NEW)
def test_each_new_manifest_loads_as_a_text_only_mistral_model(name: str) -> None:
    m = load_manifest(name)
    assert m.name == name and m.architecture == "mistral"
    assert m.smoke.prompt and m.source("hf") is not None


def test_mistral_7b_manifest_has_the_torrent_infohash_and_the_hf_repo() -> None:
    m = load_manifest("mistral-7b-v0.1")
    tor = m.source("torrent")
    assert tor is not None and tor.magnet is not None
    mag, ref = parse_magnet(tor.magnet), MISTRAL_7B.magnet
    assert ref is not None
    assert (mag.btih, mag.name) == (ref.btih, ref.name)
    assert tuple(mag.trackers) == ref.trackers
    hf = m.source("hf")
    assert hf is not None and hf.repo == MISTRAL_7B.hf_repo and hf.revision is None
    assert m.format == "hf"


def test_mistral_7b_manifest_pins_only_the_reference_hashes() -> None:
    m = load_manifest("mistral-7b-v0.1")
    pinned = {f.path: f.sha256 for f in m.files if f.sha256}
    assert pinned == {path: facts["sha256"] for path, facts in MISTRAL_7B.files.items()}
    tok = m.file("tokenizer.model")
    v1 = _mc_data("tokenizer.model.v1")
    assert tok is not None and (tok.size, tok.sha256) == (v1.stat().st_size, _sha(v1))
    pth = m.file("consolidated.00.pth")
    assert pth is not None and pth.pickle and pth.optional and pth.sources == ("torrent",) and pth.sha256 is None


def test_nemo_instruct_manifest_pins_the_reference_hashes_and_tekken_240718() -> None:
    m = load_manifest("mistral-nemo-instruct-2407")
    assert m.format == "mistral" and m.smoke.expected == "Paris"
    assert {f.path for f in m.files} == {"consolidated.safetensors", "params.json", "tekken.json"}
    c = m.file("consolidated.safetensors")
    assert c is not None and c.sha256 == NEMO_INSTRUCT_2407.files["consolidated.safetensors"]["sha256"]
    p = m.file("params.json")
    assert p is not None and p.size == NEMO_INSTRUCT_2407.files["params.json"]["size"]
    assert p.size == (DATA / "mistral-nemo-2407-params.json").stat().st_size
    t = m.file("tekken.json")
    bundled = _mc_data("tekken_240718.json")
    assert t is not None and (t.size, t.sha256) == (bundled.stat().st_size, _sha(bundled))


def test_nemo_base_manifest_pins_nothing_and_never_borrows_the_instruct_hashes() -> None:
    m = load_manifest("mistral-nemo-base-2407")
    assert m.source("hf") is not None and m.source("hf").repo == "mistralai/Mistral-Nemo-Base-2407"  # type: ignore[union-attr]
    assert all(f.size is None and f.sha256 is None for f in m.files)
    assert m.smoke.expected is None


@pytest.mark.parametrize("name", NEW)
def test_plan_for_each_new_manifest_works_offline(name: str, capsys: Any) -> None:
    assert run_cli(["plan", name, "--offline", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    plan = doc["plan"]
    assert plan["offline"] is True and plan["name"] == name
    paths = [f["path"] for f in plan["files"]]
    assert paths and not any(p.endswith(".pth") for p in paths)


def test_plan_lists_the_7b_pickle_as_a_note_never_as_a_file_to_fetch() -> None:
    plan = make_plan("mistral-7b-v0.1", offline=True)
    assert "consolidated.00.pth" not in {f.path for f in plan.files}
    assert any("consolidated.00.pth is a PyTorch pickle" in n and "import-pickle" in n for n in plan.notes)
    by = {f.path: f for f in plan.files}
    assert by["tokenizer.model"].sources == ("hf", "torrent")
    assert by["params.json"].sources == ("torrent",) and by["params.json"].optional
    assert by["config.json"].sources == ("hf",) and not by["config.json"].optional


@pytest.mark.parametrize(("name", "params", "weight_bytes"), [
    ("mistral-7b-v0.1", "mistral-7b-v0.1-params.json", 2 * 7_241_732_096),
    ("mistral-nemo-instruct-2407", "mistral-nemo-2407-params.json", 2 * 12_247_782_400),
])
def test_plan_sizes_the_bf16_profile_from_the_tensor_spec(name: str, params: str, weight_bytes: int,
                                                          capsys: Any) -> None:
    assert run_cli(["plan", name, "--offline", "--params", str(DATA / params), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    bf16 = next(c for c in doc["profiles"]["candidates"] if c["name"] == "bf16-mistral")
    assert bf16["weight_bytes"] == weight_bytes


def test_an_hf_source_without_a_revision_fetches_main_and_says_it_is_unpinned() -> None:
    from provision.stages.fetch.hub import source_of

    m = load_manifest("mistral-nemo-instruct-2407")
    assert m.sources[0].describe() == "hf://mistralai/Mistral-Nemo-Instruct-2407 (main, unpinned)"
    plan = make_plan("mistral-nemo-instruct-2407", offline=True)
    assert source_of(plan) == ("mistralai/Mistral-Nemo-Instruct-2407", "main", "")


def test_fetch_with_an_unpinned_hf_source_takes_main_and_verifies_the_pinned_hashes(
        hub: LoopbackHub, tiny_nemo: Path, tmp_path: Path, capsys: Any) -> None:
    from provision.formats.manifest import dump_manifest, parse_manifest_bytes

    names = ("consolidated.safetensors", "params.json", "tekken.json")
    commit = hub.add_repo("provision/tiny-mistral-nemo", {n: tiny_nemo / n for n in names})
    text = (tiny_nemo / "manifest.toml").read_text()
    lines = [ln for ln in text.splitlines() if not ln.startswith("revision")]
    (tmp_path / "m.toml").write_text("\n".join(lines) + "\n")
    m = parse_manifest_bytes((tmp_path / "m.toml").read_bytes())
    assert m.source("hf") is not None and m.source("hf").revision is None  # type: ignore[union-attr]
    assert "revision" not in dump_manifest(m)
    code = run_cli(["fetch", str(tmp_path / "m.toml"), "--source", "hf", "--dest", str(tmp_path / "d"), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert all((tmp_path / "d" / n).read_bytes() == (tiny_nemo / n).read_bytes() for n in names)
    api = [r.path for r in hub.requests if r.role == "hub" and r.path.startswith("/api/models/")]
    assert any("/revision/main" in p for p in api), api
    assert json.loads(out.out)["fetch"]["extra"]["commit"] == commit


def test_manifest_show_prints_the_7b_manifest(capsys: Any) -> None:
    assert run_cli(["manifest", "show", "mistral-7b-v0.1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    files = {f["path"]: f for f in doc["manifest"]["files"]}
    assert files["consolidated.00.pth"]["pickle"] is True


# ---------------------------------------------------------------------------------------
# verify knows text-only architectures through the same tensor spec


@pytest.mark.parametrize("kind", ["7b", "nemo"])
def test_verify_checks_a_text_only_checkpoint_against_its_tensor_spec(kind: str, tiny_7b: Path,
                                                                      tiny_nemo: Path) -> None:
    from provision.stages.verify import verify_dir

    path = tiny_7b if kind == "7b" else tiny_nemo
    rep = verify_dir(path, load_manifest(path / "manifest.toml"))
    assert rep.ok
    assert any(c.name == "tensors" and c.ok for c in rep.checks)


def test_verify_refuses_a_text_checkpoint_whose_params_imply_other_shapes(tiny_nemo: Path, tmp_path: Path) -> None:
    import shutil

    from provision.errors import StructureError
    from provision.stages.verify import verify_dir

    d = tmp_path / "nemo"
    shutil.copytree(tiny_nemo, d)
    params = json.loads((d / "params.json").read_text())
    params["vocab_size"] = 32000  # the 7B's vocabulary against NeMo's tensors
    (d / "params.json").write_text(json.dumps(params))
    rep = verify_dir(d)
    assert not rep.ok
    with pytest.raises(StructureError, match="wrong shape"):
        rep.raise_for_failure()
