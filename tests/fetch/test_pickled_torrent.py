"""Pickled torrent releases (Mistral 7B v0.1, Mixtral 8x7B) end to end on loopback, closed network mode.

Tiny 7B-shaped and Mixtral-shaped releases are pickled as the torrents ship them (one
``consolidated.00.pth``, or the Hub layout's ``consolidated.NN.pt`` shards), seeded by ``provision
seed`` (or aria2c), and ``provision run MAGNET`` must go from the swarm to a passed smoke test:
the pickle fetched into staging, imported by the locked-down loader into ``original/``, dropped,
then verify, convert and smoke. The expected results come from a twin release written from the
same tensors with ``safetensors.torch.save``: the imported original weights equal its bytes, the
converted files equal the twin run's byte for byte (all but the conversion's own record of paths
and timings), and the smoke test generates the same token ids. A manifest run (``--source
torrent``) checks the release's md5, keeps the pickle only with ``--keep-pickle`` and refuses a
pickle that fails its md5. A hostile pickle from the swarm never runs (exit 5, nothing left).
A download killed by SIGKILL resumes; an import already published is taken over without
importing again. A host that imported the pickle seeds the derived safetensors to the next.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from provision.formats.manifest import FileSpec, Manifest, SmokeSpec, Source, write_manifest
from provision.formats.pickles import is_pickle_name
from provision.testing.ci import require_tool
from provision.testing.tiny_pickled import PickledRelease, write_pickled_release, write_safetensors_twin
from provision.testing.torrent_fixtures import (
    REPO,
    aria2c_seed,
    json_report,
    make_v1_torrent,
    provision_env,
    provision_seed,
    resume_fraction,
    run_provision,
    seed_thread,
    stop_process,
    wait_for,
)

STAGES = ["plan", "fetch", "import", "verify", "convert", "smoke"]
CONVERT_RECORD = "provision-convert.json"  # the conversion's own record: paths and timings differ by run
PROVENANCE = "provenance.json"  # names the source (a pickle import vs a safetensors twin): compared by its files


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def run_args(source: str, home: Path, *extra: str) -> list[str]:
    return ["run", source, "--home", str(home), "--network", "closed", "--no-hf-cache", "--stall-timeout", "30",
            "--target", "cpu", "--json", *extra]


def _model_dir(home: Path) -> Path:
    dirs = [d for d in (home / "models").iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def _smoke_ids(doc: dict[str, Any]) -> list[int]:
    smoke = next(s for s in doc["stages"] if s["stage"] == "smoke")
    assert smoke["result"] == "ok" and smoke["details"]["passed"] is True
    return list(smoke["details"]["token_ids"])


def _pickles_under(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file() and is_pickle_name(p.name))


def _twin_run(twin: PickledRelease, home: Path) -> tuple[dict[str, Any], Path]:
    with seed_thread(twin.folder) as info:
        cp = run_provision(run_args(info.magnet, home), timeout=300)
    assert cp.returncode == 0, cp.stderr[-3000:]
    doc = json_report(cp)
    return doc, Path(doc["profile_dir"])


def _assert_same_conversion(a: Path, b: Path) -> None:
    names = sorted(p.name for p in b.iterdir())
    assert sorted(p.name for p in a.iterdir()) == names
    for name in names:
        if name not in (CONVERT_RECORD, PROVENANCE):
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    if PROVENANCE in names:  # both records vouch for the same output bytes (the records themselves aside)
        def outputs(d: Path) -> list[Any]:
            return [f for f in json.loads((d / PROVENANCE).read_text())["files"] if f["path"] != CONVERT_RECORD]

        assert outputs(a) == outputs(b)


# ---------------------------------------------------------------------------------------
# from the swarm to the smoke test, equal to the safetensors twin


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "shards"), [("7b", 1), ("mixtral", 1), ("mixtral", 4)],
                         ids=["7b-pth", "mixtral-pth", "mixtral-4-shards"])
def test_run_by_magnet_takes_a_pickled_release_from_the_swarm_to_a_smoke_test_equal_to_its_safetensors_twin(
        tmp_path: Path, kind: str, shards: int) -> None:
    rel = write_pickled_release(tmp_path / "release" / "mistral-pickled", kind, shards=shards)  # type: ignore[arg-type]
    twin = write_safetensors_twin(tmp_path / "twin" / "mistral-twin", kind)  # type: ignore[arg-type]
    home = tmp_path / "home"
    with provision_seed(rel.folder, tmp_path / "seed") as s:
        cp = run_provision(run_args(s.magnet, home), timeout=300)
    assert cp.returncode == 0, cp.stderr[-3000:]
    doc = json_report(cp)
    assert [st["stage"] for st in doc["stages"]] == STAGES
    assert all(st["result"] == "ok" for st in doc["stages"])
    from provision.formats.report_schema import validate_report

    validate_report(doc)  # the import stage is a documented stage of the run report
    model = _model_dir(home)
    original = model / "original"
    # the import wrote exactly what safetensors.torch.save writes for the same tensors
    assert _sha(original / "consolidated.safetensors") == twin.sha256("consolidated.safetensors")
    assert (original / "params.json").read_bytes() == (rel.folder / "params.json").read_bytes()
    assert _sha(original / "tokenizer.model") == rel.sha256("tokenizer.model")
    assert _pickles_under(home) == []  # dropped from staging, never in original/
    # provenance: the state's import stage names each pickle by the sha256 of its bytes
    state = json.loads((model / "state.json").read_text())
    shards_rec = state["stages"]["import"]["facts"]["shards"]
    assert [(r["name"], r["sha256"]) for r in shards_rec] == [(n, rel.sha256(n)) for n in rel.pickles]
    assert state["stages"]["fetch"]["facts"]["btih"] == s.magnet.split("btih:")[1][:40].lower()
    assert state["stages"]["import"]["tool_version"]
    twin_doc, twin_out = _twin_run(twin, tmp_path / "home-twin")
    _assert_same_conversion(Path(doc["profile_dir"]), twin_out)
    assert _smoke_ids(doc) == _smoke_ids(twin_doc)


@pytest.mark.slow
@pytest.mark.interop
def test_an_independent_client_seeding_the_pickled_release_gets_it_imported_and_smoke_tested(
        tmp_path: Path) -> None:
    aria2c = require_tool("aria2c")
    require_tool("mktorrent")
    rel = write_pickled_release(tmp_path / "seedside" / "mistral-7b-tiny", "7b")
    twin = write_safetensors_twin(tmp_path / "twin", "7b")
    torrent = make_v1_torrent(rel.folder, tmp_path / "rel.torrent", tool="mktorrent")
    from provision.stages.fetch.torrent import read_torrent_file

    btih = read_torrent_file(torrent).btih
    home = tmp_path / "home"
    with aria2c_seed(torrent, rel.folder.parent, binary=aria2c) as (port, _proc):
        cp = run_provision(run_args(f"magnet:?xt=urn:btih:{btih}&dn=mistral-7b-tiny", home,
                                    "--peer", f"127.0.0.1:{port}"), timeout=300)
    assert cp.returncode == 0, cp.stderr[-3000:]
    doc = json_report(cp)
    assert [st["stage"] for st in doc["stages"]] == STAGES
    assert _sha(_model_dir(home) / "original" / "consolidated.safetensors") == twin.sha256("consolidated.safetensors")
    assert _pickles_under(home) == []
    _smoke_ids(doc)


# ---------------------------------------------------------------------------------------
# a manifest release: --source torrent, the release's md5, --keep-pickle, resume


def _release_manifest(path: Path, magnet: str, rel: PickledRelease, *, md5: str) -> Path:
    """A manifest shaped like mistral-7b-v0.1's: the Hub's transformers files, the torrent's pickle."""
    m = Manifest(
        name="tiny-7b-pickled", architecture="mistral", format="hf",
        sources=(Source(type="hf", repo="provision/tiny-7b-pickled"), Source(type="torrent", magnet=magnet)),
        files=(FileSpec(path="config.json", sources=("hf",)),
               FileSpec(path="model.safetensors", sources=("hf",)),
               FileSpec(path="tokenizer.model", size=rel.files["tokenizer.model"][0],
                        sha256=rel.sha256("tokenizer.model")),
               FileSpec(path="params.json", optional=True, sources=("torrent",)),
               FileSpec(path="consolidated.00.pth", md5=md5, optional=True, pickle=True, sources=("torrent",))),
        smoke=SmokeSpec(prompt="What is the capital of France? Answer in one word.", max_tokens=8),
    )
    return write_manifest(m, path).path or path


@pytest.mark.slow
def test_a_manifest_run_with_source_torrent_checks_the_md5_keeps_the_pickle_when_asked_and_reruns_as_done(
        tmp_path: Path) -> None:
    rel = write_pickled_release(tmp_path / "release" / "mistral-7B-v0.1", "7b")
    home = tmp_path / "home"
    with seed_thread(rel.folder) as info:
        manifest = _release_manifest(tmp_path / "tiny-7b-pickled.toml", info.magnet, rel,
                                     md5=rel.md5("consolidated.00.pth"))
        cp = run_provision(run_args(str(manifest), home, "--source", "torrent", "--keep-pickle"), timeout=300)
        assert cp.returncode == 0, cp.stderr[-3000:]
        doc = json_report(cp)
        again = run_provision(run_args(str(manifest), home, "--source", "torrent"), timeout=300)
    assert [st["stage"] for st in doc["stages"]] == STAGES
    imp = next(st for st in doc["stages"] if st["stage"] == "import")["details"]
    assert imp["shards"][0]["md5"] == rel.md5("consolidated.00.pth")  # the release's md5 was checked
    kept = home / "staging" / "tiny-7b-pickled" / "pickle-src" / "consolidated.00.pth"
    assert _pickles_under(home) == [str(kept.relative_to(home))] and _sha(kept) == rel.sha256("consolidated.00.pth")
    assert not (home / "models" / "tiny-7b-pickled" / "original" / "consolidated.00.pth").exists()
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json_report(again)
    assert [(st["stage"], st["result"]) for st in rerun["stages"]] == [
        ("plan", "ok"), ("fetch", "skipped"), ("import", "skipped"), ("verify", "skipped"), ("convert", "skipped"),
        ("smoke", "skipped")]


@pytest.mark.slow
def test_a_torrent_whose_pickle_fails_the_release_md5_exits_5_and_leaves_no_original_and_no_pickle(
        tmp_path: Path) -> None:
    rel = write_pickled_release(tmp_path / "release" / "mistral-7B-v0.1", "7b")
    wrong = hashlib.md5(b"another release", usedforsecurity=False).hexdigest()
    home = tmp_path / "home"
    with seed_thread(rel.folder) as info:
        manifest = _release_manifest(tmp_path / "tiny-7b-pickled.toml", info.magnet, rel, md5=wrong)
        cp = run_provision(run_args(str(manifest), home, "--source", "torrent"), timeout=300)
    assert cp.returncode == 5, cp.stderr[-3000:]
    doc = json.loads(cp.stdout)
    assert doc["error"]["kind"] == "hash_mismatch" and "md5" in doc["error"]["message"]
    assert "\n" not in doc["error"]["message"]
    assert not (home / "models" / "tiny-7b-pickled" / "original").exists()
    assert _pickles_under(home) == []  # the same torrent would deliver the same bytes: not kept


@pytest.mark.slow
def test_a_run_killed_during_the_pickle_download_resumes_and_goes_the_whole_way(tmp_path: Path) -> None:
    rel = write_pickled_release(tmp_path / "release" / "mistral-pickled", "7b")
    home = tmp_path / "home"
    size = rel.files["consolidated.00.pth"][0]
    with seed_thread(rel.folder, max_upload_rate=size // 6) as info:  # about 6 s for the pickle
        args = [sys.executable, "-m", "provision.cli.main", *run_args(info.magnet, home)]
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=provision_env(),
                             cwd=REPO)
        try:
            resume = home / "torrents" / f"{info.btih}.resume"
            wait_for(lambda: (resume.is_file() and resume_fraction(resume) > 0.2) or p.poll() is not None, 120,
                     what="a fifth of the pickle downloaded")
            assert p.poll() is None, "the run finished before it could be killed"
            os.kill(p.pid, signal.SIGKILL)
            p.wait(30)
        finally:
            stop_process(p)
        model = _model_dir(home)
        assert not (model / "original").exists()  # nothing imported, nothing placed
        cp = run_provision(run_args(info.magnet, home), timeout=300)
    assert cp.returncode == 0, cp.stderr[-3000:]
    doc = json_report(cp)
    fetch = next(st for st in doc["stages"] if st["stage"] == "fetch")["details"]
    assert fetch["extra"]["resumed"] is True and fetch["extra"]["bytes_before_resume"] > 0
    assert [st["stage"] for st in doc["stages"]] == STAGES
    assert _pickles_under(home) == []


@pytest.mark.slow
def test_an_import_published_before_its_record_was_saved_is_taken_over_without_importing_again(
        tmp_path: Path) -> None:
    rel = write_pickled_release(tmp_path / "release" / "mistral-pickled", "7b")
    home = tmp_path / "home"
    with seed_thread(rel.folder) as info:
        first = run_provision(run_args(info.magnet, home, "--skip-convert", "--skip-smoke"),
                              timeout=300)
        assert first.returncode == 0, first.stderr[-3000:]
        model = _model_dir(home)
        # a SIGKILL between the rename into original/ and the state save: the import is not recorded
        state_path = model / "state.json"
        state = json.loads(state_path.read_text())
        del state["stages"]["import"]
        state_path.write_text(json.dumps(state))
        before = (model / "original" / "consolidated.safetensors").stat().st_ino
        cp = run_provision(run_args(info.magnet, home, "--skip-convert", "--skip-smoke"), timeout=300)
        again = run_provision(run_args(info.magnet, home, "--skip-convert", "--skip-smoke", "--reverify"),
                              timeout=300)
    assert cp.returncode == 0, cp.stderr[-3000:]
    doc = json_report(cp)
    assert [(st["stage"], st["result"]) for st in doc["stages"]] == [
        ("plan", "ok"), ("fetch", "skipped"), ("import", "ok"), ("verify", "ok")]
    assert next(st for st in doc["stages"] if st["stage"] == "import")["details"]["how"] == "taken over"
    assert (model / "original" / "consolidated.safetensors").stat().st_ino == before  # not written again
    # --reverify re-checks the import against its record; the dropped pickle is not fetched again
    assert again.returncode == 0, again.stderr[-3000:]
    redo = json_report(again)
    assert [(st["stage"], st["result"]) for st in redo["stages"]] == [
        ("plan", "ok"), ("fetch", "skipped"), ("import", "ok"), ("verify", "ok")]
    assert next(st for st in redo["stages"] if st["stage"] == "import")["details"]["how"] == "taken over"
    assert _pickles_under(home) == []


class _RunsACommand:
    """Unpickling this runs ``touch <marker>`` (what a hostile release would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_a_hostile_pickle_from_the_swarm_never_runs_exits_5_and_leaves_no_original_and_no_pickle(
        tmp_path: Path) -> None:
    import torch

    rel = write_pickled_release(tmp_path / "release" / "mistral-hostile", "7b")
    marker = tmp_path / "PWNED"
    pickled = rel.folder / "consolidated.00.pth"
    torch.save({"tok_embeddings.weight": _RunsACommand(marker)}, pickled)  # saving pickles it, runs nothing
    assert not marker.exists()
    home = tmp_path / "home"
    with seed_thread(rel.folder) as info:
        cp = run_provision(run_args(info.magnet, home), timeout=300)
    assert cp.returncode == 5, cp.stderr[-3000:]
    doc = json.loads(cp.stdout)
    assert doc["error"]["kind"] == "hostile" and "weights_only=True) refused" in doc["error"]["message"]
    assert "\n" not in doc["error"]["message"]
    assert not marker.exists()
    assert not (_model_dir(home) / "original").exists()
    assert _pickles_under(home) == []


@pytest.mark.slow
def test_a_host_that_imported_the_pickle_seeds_the_verified_safetensors_and_the_next_host_never_sees_a_pickle(
        tmp_path: Path) -> None:
    rel = write_pickled_release(tmp_path / "release" / "mistral-pickled", "7b")
    first = tmp_path / "home-a"
    with seed_thread(rel.folder) as info:
        cp = run_provision(run_args(info.magnet, first, "--skip-convert", "--skip-smoke"), timeout=300)
    assert cp.returncode == 0, cp.stderr[-3000:]
    original = _model_dir(first) / "original"
    second = tmp_path / "home-b"
    with provision_seed(original, tmp_path / "seed-derived") as s:
        cp = run_provision(run_args(s.magnet, second), timeout=300)
    assert cp.returncode == 0, cp.stderr[-3000:]
    doc = json_report(cp)
    assert [st["stage"] for st in doc["stages"]] == ["plan", "fetch", "verify", "convert", "smoke"]
    got = _model_dir(second) / "original"
    assert (got / "consolidated.safetensors").read_bytes() == (original / "consolidated.safetensors").read_bytes()
    assert _pickles_under(second) == []
    _smoke_ids(doc)


def _loader_children(parent: int) -> list[int]:
    """The pids of the pickle loader processes ``parent`` started (read from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"provision.stages.pickle_import" in cmd and b"--child" in cmd:
            out.append(int(d.name))
    return out


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


@pytest.mark.slow
def test_a_run_killed_during_the_import_takes_its_loader_along_and_the_rerun_imports_without_fetching_again(
        tmp_path: Path) -> None:
    rel = write_pickled_release(tmp_path / "release" / "mistral-pickled", "7b")
    home = tmp_path / "home"
    with seed_thread(rel.folder) as info:
        args = [sys.executable, "-m", "provision.cli.main", *run_args(info.magnet, home)]
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=provision_env(),
                             cwd=REPO)
        try:
            children = wait_for(lambda: _loader_children(p.pid) or p.poll() is not None, 120,
                                what="the pickle loader to start")
            assert p.poll() is None and isinstance(children, list), "the run ended before its import"
            os.kill(p.pid, signal.SIGKILL)
            p.wait(30)
            wait_for(lambda: all(_gone(c) for c in children), 30, what="the loader to die with its parent")
        finally:
            stop_process(p)
        model = _model_dir(home)
        assert not (model / "original").exists()
        staged = home / "staging" / model.name / "pickle-src" / "consolidated.00.pth"
        assert _sha(staged) == rel.sha256("consolidated.00.pth")  # verified and kept for the rerun
        cp = run_provision(run_args(info.magnet, home), timeout=300)
    assert cp.returncode == 0, cp.stderr[-3000:]
    doc = json_report(cp)
    assert [(st["stage"], st["result"]) for st in doc["stages"]][:3] == [
        ("plan", "ok"), ("fetch", "skipped"), ("import", "ok")]
    assert [d.name for d in model.iterdir() if d.name.startswith(".provision-tmp-")] == []
    assert _pickles_under(home) == []


# ---------------------------------------------------------------------------------------
# plan


def test_plan_of_the_mixtral_manifest_shows_the_import_and_the_disk_it_needs_offline() -> None:
    from provision.stages.plan import make_plan

    plan = make_plan("mixtral-8x7b-v0.1", offline=True, check_disk=False)
    # 46,702,792,704 parameters (the reference's count for 8x7B) x 2 bytes (bf16) = 93.41 GB for the
    # pickle, and as much for the safetensors while both exist: 186.81 GB
    note = next(n for n in plan.notes if n.startswith("consolidated.00.pth is a PyTorch pickle in the torrent"))
    assert "186.81 GB" in note and "93.41 GB each" in note
    assert "consolidated.00.pth" not in {f.path for f in plan.files}  # the Hub way never lists it to fetch


def test_plan_of_a_pickled_magnet_lists_the_pickle_and_the_disk_its_import_needs(tmp_path: Path) -> None:
    rel = write_pickled_release(tmp_path / "release" / "mistral-pickled", "7b")
    size = rel.files["consolidated.00.pth"][0]
    with seed_thread(rel.folder) as info:
        cp = run_provision(["plan", info.magnet, "--home", str(tmp_path / "home"), "--network", "closed", "--json"],
                           timeout=120)
    assert cp.returncode == 0, cp.stderr[-2000:]
    plan = json_report(cp)["plan"]
    assert 1e6 <= 2 * size < 1e8  # so the note writes it in MB with two decimals
    assert any(n.startswith("consolidated.00.pth: a PyTorch pickle") and f"{2 * size / 1e6:.2f} MB" in n
               for n in plan["notes"])
