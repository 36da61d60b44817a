"""The Hugging Face Hub source against a loopback hub (tests/hub_server.py): pinned, verified,
resumable, robust, and with error messages that say what to do. Nothing leaves 127.0.0.1."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from provision.cli.main import run_cli
from provision.layout import Layout
from provision.testing.hub_server import TOKENS, LoopbackHub, tiny_facts
from provision.testing.tiny import TINY_REPO
from provision.testing.torrent_fixtures import PROVISION, provision_env, stop_process, wait_for
from tests.support.cli import cli_json, provision_home

ALICE, BOB = list(TOKENS)


def same_files(a: Path, b: Path, names: list[str]) -> bool:
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def resolve_paths(h: LoopbackHub) -> list[str]:
    return [r.path for r in h.requests if r.role == "hub" and "/resolve/" in r.path]


def staging(name: str) -> Path:
    return Layout(provision_home()).staging(name)


# ---------------------------------------------------------------------------------------
# the fixture behaves like the Hub for huggingface_hub itself


def test_plain_hf_hub_download_works_against_the_loopback_hub(hub: LoopbackHub, tiny_src: Path,
                                                              tmp_path: Path) -> None:
    from huggingface_hub import HfApi, hf_hub_download

    rev, _ = tiny_facts(tiny_src)
    info = HfApi(endpoint=hub.endpoint).model_info(TINY_REPO, revision="main", files_metadata=True)
    assert info.sha == rev
    lfs = {s.rfilename: s.lfs for s in info.siblings or []}
    assert lfs["params.json"] is None and lfs["consolidated.safetensors"] is not None
    for name in ("consolidated.safetensors", "params.json"):
        p = hf_hub_download(TINY_REPO, name, endpoint=hub.endpoint, cache_dir=tmp_path / "c", token=False)
        assert Path(p).read_bytes() == (tiny_src / name).read_bytes()
    cdn = [r for r in hub.requests if r.role == "cdn"]
    assert cdn and all(r.status == 200 for r in cdn)  # the LFS file came through the redirect
    assert hub.unknown_api_calls == []


def test_loopback_hub_answers_ranges_with_206_and_a_bad_range_with_416(hub: LoopbackHub, tiny_src: Path) -> None:
    import httpx2

    rev, _ = tiny_facts(tiny_src)
    url = f"{hub.endpoint}/{TINY_REPO}/resolve/{rev}/params.json"
    data = (tiny_src / "params.json").read_bytes()
    with httpx2.Client() as c:
        r = c.get(url, headers={"Range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == data[10:20]
        assert r.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
        assert c.get(url, headers={"Range": f"bytes={len(data) + 5}-"}).status_code == 416
        h = c.head(f"{hub.endpoint}/{TINY_REPO}/resolve/main/consolidated.safetensors")
        assert h.status_code == 302 and h.headers["X-Repo-Commit"] == rev
        assert int(h.headers["X-Linked-Size"]) == (tiny_src / "consolidated.safetensors").stat().st_size


# ---------------------------------------------------------------------------------------
# full fetches


def test_fetch_hf_uri_gets_every_file_verified_and_reports_the_commit(
        hub: LoopbackHub, tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rev, files = tiny_facts(tiny_src)
    dest = tmp_path / "out"
    code, rep, err = cli_json(capsys, "fetch", f"hf://{TINY_REPO}", "--dest", str(dest))
    assert code == 0, err
    f = rep["fetch"]
    assert f["source"] == "hf" and f["extra"]["commit"] == rev and f["extra"]["revision"] == "main"
    auth = {x["path"]: x["authority"] for x in f["files"]}
    assert auth == {"consolidated.safetensors": "hub-lfs-sha256", "params.json": "git-blob-sha1",
                    "tekken.json": "hub-lfs-sha256"}
    assert sorted(p.name for p in dest.iterdir()) == sorted(files)
    assert same_files(dest, tiny_src, list(files))
    assert f["bytes_downloaded"] == sum(p.stat().st_size for p in files.values())
    # every byte came from the pinned commit, and nothing is left in staging but the record
    assert all(f"/resolve/{rev}/" in p for p in resolve_paths(hub))
    assert not (staging(TINY_REPO) / "hub").exists()


def test_fetch_manifest_uses_the_manifest_sha256_as_authority_and_its_default_dest(
        hub: LoopbackHub, tiny_src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, rep, err = cli_json(capsys, "fetch", str(tiny_src / "manifest.toml"), "--source", "hf")
    assert code == 0, err
    dest = Layout(provision_home()).original("tiny-pixtral")
    assert Path(rep["fetch"]["dest"]) == dest
    assert {x["authority"] for x in rep["fetch"]["files"]} == {"manifest-sha256"}
    assert same_files(dest, tiny_src, ["consolidated.safetensors", "params.json", "tekken.json"])


def test_second_fetch_reuses_verified_files_and_downloads_nothing(
        hub: LoopbackHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "out"
    assert cli_json(capsys, "fetch", f"hf://{TINY_REPO}", "--dest", str(dest))[0] == 0
    hub.reset_counters()
    code, rep, _ = cli_json(capsys, "fetch", f"hf://{TINY_REPO}", "--dest", str(dest))
    assert code == 0 and rep["fetch"]["bytes_downloaded"] == 0
    assert all(x["reused"] for x in rep["fetch"]["files"]) and resolve_paths(hub) == []


def test_a_file_in_dest_that_differs_is_refused_exit_2_and_replaced_only_with_force_which_names_it(
        hub: LoopbackHub, tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # issue 16 changed this: a user's --dest is never overwritten unasked (it used to be, silently)
    dest = tmp_path / "out"
    dest.mkdir()
    shutil.copy(tiny_src / "tekken.json", dest / "tekken.json")
    bad = bytearray((tiny_src / "params.json").read_bytes())
    bad[5] ^= 1
    (dest / "params.json").write_bytes(bytes(bad))
    mine = dest / "consolidated.safetensors"
    mine.write_bytes(b"the user's own weights")  # another size
    code, rep, err = cli_json(capsys, "fetch", f"hf://{TINY_REPO}", "--dest", str(dest))
    assert code == 2, err
    assert "refusing to replace" in rep["error"]["message"] and "--force" in rep["error"]["message"]
    assert set(rep["error"]["context"]["files"]) == {"consolidated.safetensors", "params.json"}
    assert (dest / "params.json").read_bytes() == bytes(bad) and mine.read_bytes() == b"the user's own weights"
    assert resolve_paths(hub) == []  # refused before a byte was downloaded

    code, rep, err = cli_json(capsys, "fetch", f"hf://{TINY_REPO}", "--dest", str(dest), "--force")
    assert code == 0, err
    assert f"replacing {dest / 'params.json'}" in err and f"replacing {mine}" in err
    reused = {x["path"]: x["reused"] for x in rep["fetch"]["files"]}
    assert reused == {"consolidated.safetensors": False, "params.json": False, "tekken.json": True}
    assert same_files(dest, tiny_src, ["params.json", "consolidated.safetensors"])


def test_a_damaged_file_in_the_stores_own_original_is_downloaded_again(
        hub: LoopbackHub, tiny_src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = Layout(provision_home()).original(TINY_REPO)  # provision's own folder: repaired, no --force
    dest.mkdir(parents=True)
    bad = bytearray((tiny_src / "params.json").read_bytes())
    bad[5] ^= 1
    (dest / "params.json").write_bytes(bytes(bad))
    code, rep, err = cli_json(capsys, "fetch", f"hf://{TINY_REPO}")
    assert code == 0, err
    assert {x["path"]: x["reused"] for x in rep["fetch"]["files"]}["params.json"] is False
    assert same_files(dest, tiny_src, ["params.json"])


def test_include_glob_fetches_only_matching_files(hub: LoopbackHub, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "out"
    code, _, err = cli_json(capsys, "fetch", f"hf://{TINY_REPO}", "--dest", str(dest), "--include", "*.json")
    assert code == 0, err
    assert sorted(p.name for p in dest.iterdir()) == ["params.json", "tekken.json"]


def test_plan_of_an_hf_uri_lists_files_with_sizes_and_lfs_sha256(
        hub: LoopbackHub, tiny_src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from provision.stages.plan import make_plan

    plan = make_plan(f"hf://{TINY_REPO}", home=provision_home(), check_disk=False)
    m = tiny_facts(tiny_src)[1]
    facts = {f.path: (f.size, f.sha256) for f in plan.files}
    assert set(facts) == set(m)
    assert facts["params.json"] == ((tiny_src / "params.json").stat().st_size, None)
    sha = hashlib.sha256((tiny_src / "consolidated.safetensors").read_bytes()).hexdigest()
    assert facts["consolidated.safetensors"][1] == sha


def test_a_branch_is_resolved_once_and_every_file_comes_from_that_commit(
        hub: LoopbackHub, tiny_src: Path, tmp_path: Path) -> None:
    from provision.stages.fetch import fetch
    from provision.stages.plan import make_plan

    rev, files = tiny_facts(tiny_src)
    hub.repos[TINY_REPO].refs["dev"] = rev
    plan = make_plan(f"hf://{TINY_REPO}@dev", home=provision_home(), dest=tmp_path / "out", check_disk=False)
    # the branch moves between plan and fetch: the fetch must still deliver the commit it listed
    other = tmp_path / "params.json"
    other.write_text(json.dumps({"moved": True}))
    moved = hub.add_repo(TINY_REPO, {**files, "params.json": other}, branches=("dev",))
    assert moved != rev and hub.repos[TINY_REPO].refs["dev"] == moved
    res = fetch(plan, source="hf")
    assert res.extra["commit"] == rev and res.extra["revision"] == "dev"
    assert same_files(tmp_path / "out", tiny_src, list(files))
    assert resolve_paths(hub) and all(f"/resolve/{rev}/" in p for p in resolve_paths(hub))


def test_a_later_fetch_of_the_branch_gets_its_new_commit(
        hub: LoopbackHub, tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, files = tiny_facts(tiny_src)
    other = tmp_path / "params.json"
    other.write_text(json.dumps({"moved": True}))
    moved = hub.add_repo(TINY_REPO, {**files, "params.json": other}, branches=("dev",))
    code, rep, err = cli_json(capsys, "fetch", f"hf://{TINY_REPO}@dev", "--dest", str(tmp_path / "out"))
    assert code == 0, err
    assert rep["fetch"]["extra"]["commit"] == moved
    assert (tmp_path / "out" / "params.json").read_bytes() == other.read_bytes()


# ---------------------------------------------------------------------------------------
# verification


def test_right_size_wrong_bytes_exits_5_and_leaves_nothing_under_the_final_name(
        hub: LoopbackHub, tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = bytearray((tiny_src / "tekken.json").read_bytes())
    bad[len(bad) // 2] ^= 0xFF
    (tmp_path / "bad").write_bytes(bytes(bad))
    hub.serve_instead["tekken.json"] = tmp_path / "bad"
    dest = tmp_path / "out"
    code, rep, err = cli_json(capsys, "fetch", str(tiny_src / "manifest.toml"), "--source", "hf", "--dest", str(dest))
    assert code == 5, err
    assert rep["error"]["kind"] == "hash_mismatch" and "tekken.json" in rep["error"]["message"]
    assert not (dest / "tekken.json").exists()
    assert not list(dest.glob(".provision-tmp-*"))
    # the bad bytes are not kept as a partial to resume from (other files' partials may stay)
    sha = hashlib.sha256((tiny_src / "tekken.json").read_bytes()).hexdigest()
    assert not list(staging("tiny-pixtral").rglob(f"{sha}-*"))
    assert not list(staging("tiny-pixtral").rglob("tekken.json"))


def test_a_manifest_sha256_that_disagrees_with_the_hub_fails_before_downloading(
        hub: LoopbackHub, tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (tiny_src / "manifest.toml").read_text()
    sha = hashlib.sha256((tiny_src / "tekken.json").read_bytes()).hexdigest()
    (tmp_path / "m.toml").write_text(text.replace(sha, "0" * 64))
    code, rep, _ = cli_json(capsys, "fetch", str(tmp_path / "m.toml"), "--dest", str(tmp_path / "out"))
    assert code == 5 and rep["error"]["kind"] == "hash_mismatch"
    assert "disagree" in rep["error"]["message"]
    assert not [p for p in resolve_paths(hub) if p.endswith("tekken.json")]


def test_a_hostile_file_name_in_the_listing_is_refused(
        hub: LoopbackHub, tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub.add_repo("evil/repo", {"../escape.json": tiny_src / "params.json"})
    code, rep, _ = cli_json(capsys, "fetch", "hf://evil/repo", "--dest", str(tmp_path / "out"))
    assert code == 5 and rep["error"]["kind"] == "hostile"
    assert not (tmp_path / "escape.json").exists()


# ---------------------------------------------------------------------------------------
# resume across processes


def _big_repo(hub: LoopbackHub, tmp_path: Path, size: int = 48 << 20) -> tuple[Path, str]:
    src = tmp_path / "weights.dat"
    src.write_bytes(os.urandom(size))
    hub.add_repo("provision/big", {"weights.dat": src})
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    return src, sha


@pytest.mark.slow
def test_sigkill_midway_then_resume_refetches_under_55_percent(
        hub: LoopbackHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, sha = _big_repo(hub, tmp_path)
    size = src.stat().st_size
    hub.rate_limit = 8 << 20
    dest = tmp_path / "out"
    part = staging("provision/big") / "hub" / f"{sha}-{size}.part"
    proc = subprocess.Popen([*PROVISION, "fetch", "hf://provision/big", "--dest", str(dest)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=provision_env())
    try:
        wait_for(lambda: _size(part) >= size // 2 or proc.poll() is not None, 60, what="half of the file")
        assert proc.poll() is None, "the first fetch ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        stop_process(proc, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    kept = part.stat().st_size
    assert size // 2 <= kept < size and not (dest / "weights.dat").exists()
    sidecar = json.loads(part.with_suffix(".json").read_text())
    assert sidecar["sha256"] == sha and sidecar["size"] == size

    # the server notices the dead client and ends that response (recorded, counted) before counting afresh
    hub.wait_idle(30)
    assert [r.range for r in hub.requests if r.role == "cdn"] == [None]  # the killed download, from byte 0
    hub.rate_limit = 0
    hub.reset_counters()
    code, rep, err = cli_json(capsys, "fetch", "hf://provision/big", "--dest", str(dest))
    assert code == 0, err
    assert (dest / "weights.dat").read_bytes() == src.read_bytes()
    assert rep["fetch"]["extra"]["resumed"]["weights.dat"] == kept
    assert hub.sent("weights.dat") == size - kept < 0.55 * size
    assert [r.range for r in hub.requests if r.role == "cdn"] == [f"bytes={kept}-"]
    assert not part.exists()


def test_sigterm_midway_exits_143_and_keeps_the_partial_for_the_next_run(
        hub: LoopbackHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, sha = _big_repo(hub, tmp_path, size=24 << 20)
    size = src.stat().st_size
    hub.rate_limit = 8 << 20
    part = staging("provision/big") / "hub" / f"{sha}-{size}.part"
    proc = subprocess.Popen([*PROVISION, "fetch", "hf://provision/big", "--dest", str(tmp_path / "out")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=provision_env())
    try:
        wait_for(lambda: _size(part) >= 4 << 20 or proc.poll() is not None, 60, what="4 MiB of the file")
        assert proc.poll() is None, "the first fetch ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        stop_process(proc, signal.SIGKILL)
    assert proc.returncode == 143, err.decode()
    kept = part.stat().st_size
    assert 0 < kept < size and not (tmp_path / "out" / "weights.dat").exists()
    hub.wait_idle(30)
    hub.rate_limit = 0
    code, rep, _ = cli_json(capsys, "fetch", "hf://provision/big", "--dest", str(tmp_path / "out"))
    assert code == 0 and rep["fetch"]["extra"]["resumed"]["weights.dat"] == kept


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def test_a_partial_whose_provenance_does_not_match_is_discarded(
        hub: LoopbackHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, sha = _big_repo(hub, tmp_path, size=12 << 20)
    size = src.stat().st_size
    d = staging("provision/big") / "hub"
    d.mkdir(parents=True)
    (d / f"{sha}-{size}.part").write_bytes(b"\0" * (size // 2))  # not these bytes...
    (d / f"{sha}-{size}.json").write_text(json.dumps({"schema": 1, "source": "hf", "kind": "hub-lfs-sha256",
                                                      "sha256": "f" * 64, "git_sha1": None, "size": size}))
    code, rep, err = cli_json(capsys, "fetch", "hf://provision/big", "--dest", str(tmp_path / "out"))
    assert code == 0, err
    assert rep["fetch"]["extra"]["resumed"] == {} and hub.sent("weights.dat") == size
    assert (tmp_path / "out" / "weights.dat").read_bytes() == src.read_bytes()


def test_a_resumed_partial_with_damaged_bytes_is_downloaded_again_from_the_start(
        hub: LoopbackHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, sha = _big_repo(hub, tmp_path, size=12 << 20)
    size = src.stat().st_size
    d = staging("provision/big") / "hub"
    d.mkdir(parents=True)
    (d / f"{sha}-{size}.part").write_bytes(b"\0" * (size // 2))  # right provenance, wrong bytes (a crash)
    (d / f"{sha}-{size}.json").write_text(json.dumps({"schema": 1, "source": "hf", "kind": "hub-lfs-sha256",
                                                      "sha256": sha, "git_sha1": None, "size": size}))
    code, _rep, err = cli_json(capsys, "fetch", "hf://provision/big", "--dest", str(tmp_path / "out"))
    assert code == 0, err
    assert "did not verify" in err
    assert hub.sent("weights.dat") == size - size // 2 + size
    assert (tmp_path / "out" / "weights.dat").read_bytes() == src.read_bytes()


def test_a_partial_without_its_provenance_sidecar_is_discarded(
        hub: LoopbackHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, sha = _big_repo(hub, tmp_path, size=12 << 20)
    size = src.stat().st_size
    d = staging("provision/big") / "hub"
    d.mkdir(parents=True)
    (d / f"{sha}-{size}.part").write_bytes(b"\0" * (size // 2))
    code, _rep, err = cli_json(capsys, "fetch", "hf://provision/big", "--dest", str(tmp_path / "out"))
    assert code == 0, err
    assert hub.sent("weights.dat") == size
    assert (tmp_path / "out" / "weights.dat").read_bytes() == src.read_bytes()


# ---------------------------------------------------------------------------------------
# tokens, gated repos, errors


def test_the_token_goes_to_the_hub_but_not_across_the_redirect_to_the_cdn(
        hub: LoopbackHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub.repos[TINY_REPO].gated = True
    hub.repos[TINY_REPO].accepted.add("alice")
    code, rep, err = cli_json(capsys, "fetch", f"hf://{TINY_REPO}", "--dest", str(tmp_path / "out"), "--token", ALICE)
    assert code == 0, err
    hub_auth = [r.authorization for r in hub.requests if r.role == "hub"]
    cdn_auth = [r.authorization for r in hub.requests if r.role == "cdn"]
    assert hub_auth and set(hub_auth) == {f"Bearer {ALICE}"}
    assert len(cdn_auth) == 2 and set(cdn_auth) == {None}
    assert rep["fetch"]["extra"]["authenticated"] is True
    assert ALICE not in err and ALICE not in json.dumps(rep)


def test_hf_token_env_and_the_saved_login_token_are_used(
        hub: LoopbackHub, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    hub.repos[TINY_REPO].gated = True
    hub.repos[TINY_REPO].accepted.add("alice")
    monkeypatch.setenv("HF_TOKEN", ALICE)
    assert cli_json(capsys, "fetch", f"hf://{TINY_REPO}", "--dest", str(tmp_path / "a"), "--include", "p*")[0] == 0
    monkeypatch.delenv("HF_TOKEN")
    saved = tmp_path / "hf" / "token"
    saved.parent.mkdir()
    saved.write_text(ALICE)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(saved))
    code, _, err = cli_json(capsys, "fetch", f"hf://{TINY_REPO}", "--dest", str(tmp_path / "b"), "--include", "p*")
    assert code == 0, err
    assert ALICE not in err


def test_gated_repo_without_a_token_exits_4_and_says_to_log_in(
        hub: LoopbackHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub.repos[TINY_REPO].gated = True
    code, rep, err = cli_json(capsys, "fetch", f"hf://{TINY_REPO}", "--dest", str(tmp_path / "out"))
    assert code == 4 and rep["error"]["kind"] == "auth"
    msg = rep["error"]["message"]
    assert "no Hugging Face token" in msg and "hf auth login" in msg and "HF_TOKEN" in msg
    assert f"{hub.endpoint}/{TINY_REPO}" in msg  # where to accept the licence
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_gated_repo_whose_licence_was_not_accepted_exits_4_and_says_to_accept_it(
        hub: LoopbackHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub.repos[TINY_REPO].gated = True
    hub.repos[TINY_REPO].accepted.add("alice")
    code, rep, _ = cli_json(capsys, "fetch", f"hf://{TINY_REPO}", "--dest", str(tmp_path / "out"), "--token", BOB)
    assert code == 4 and rep["error"]["kind"] == "auth"
    msg = rep["error"]["message"]
    assert "licence" in msg and "accept" in msg and f"{hub.endpoint}/{TINY_REPO}" in msg
    assert rep["error"]["context"]["status"] == 403
    assert BOB not in msg


def test_an_invalid_token_exits_4(hub: LoopbackHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, rep, _ = cli_json(capsys, "fetch", f"hf://{TINY_REPO}", "--dest", str(tmp_path / "out"), "--token", "hf_wrong")
    assert code == 4 and rep["error"]["kind"] == "auth" and "hf_wrong" not in rep["error"]["message"]


@pytest.mark.parametrize("source, words", [
    ("hf://nobody/nothing", "was not found"),
    (f"hf://{TINY_REPO}@no-such-branch", "Revision 'no-such-branch' does not exist"),
])
def test_unknown_repo_or_revision_exits_4_and_says_what_to_check(
        hub: LoopbackHub, tmp_path: Path, capsys: pytest.CaptureFixture[str], source: str, words: str) -> None:
    code, rep, _ = cli_json(capsys, "fetch", source, "--dest", str(tmp_path / "out"))
    assert code == 4 and rep["error"]["kind"] == "not_found"
    assert words in rep["error"]["message"] and "Check" in rep["error"]["message"]


def test_a_manifest_file_missing_from_the_repo_exits_4(
        hub: LoopbackHub, tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (tiny_src / "manifest.toml").read_text().replace('path = "params.json"', 'path = "params2.json"')
    (tmp_path / "m.toml").write_text(text)
    code, rep, _ = cli_json(capsys, "fetch", str(tmp_path / "m.toml"), "--dest", str(tmp_path / "out"))
    assert code == 4 and rep["error"]["kind"] == "not_found" and "params2.json" in rep["error"]["message"]


def test_a_file_that_404s_at_download_time_exits_4(
        hub: LoopbackHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub.fail_once["params.json"] = (404, {"X-Error-Code": "EntryNotFound"})
    code, rep, _ = cli_json(capsys, "fetch", f"hf://{TINY_REPO}", "--dest", str(tmp_path / "out"), "--include", "p*")
    assert code == 4 and rep["error"]["kind"] == "not_found" and "params.json" in rep["error"]["message"]


# ---------------------------------------------------------------------------------------
# robustness


def test_429_is_retried_after_the_servers_retry_after(
        hub: LoopbackHub, tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub.fail_once["tekken.json"] = (429, {"Retry-After": "1"})
    code, rep, err = cli_json(capsys, "fetch", f"hf://{TINY_REPO}", "--dest", str(tmp_path / "out"))
    assert code == 0, err
    assert rep["fetch"]["extra"]["retries"] == 1
    tries = [r for r in hub.requests if r.role == "hub" and r.path.endswith("/tekken.json")]
    assert [r.status for r in tries] == [429, 302]
    assert tries[1].at - tries[0].at >= 0.9  # it waited as told
    assert same_files(tmp_path / "out", tiny_src, ["tekken.json"])


def test_a_503_is_retried(hub: LoopbackHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub.fail_once["params.json"] = (503, {"Retry-After": "0"})
    code, rep, err = cli_json(capsys, "fetch", f"hf://{TINY_REPO}", "--dest", str(tmp_path / "out"), "--include", "p*")
    assert code == 0, err
    assert rep["fetch"]["extra"]["retries"] == 1


def test_a_server_that_stops_sending_is_a_stall_exit_4_and_the_partial_is_kept(
        hub: LoopbackHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, sha = _big_repo(hub, tmp_path, size=12 << 20)
    hub.stall_after["weights.dat"] = 1 << 20
    code, rep, _ = cli_json(capsys, "fetch", "hf://provision/big", "--dest", str(tmp_path / "out"),
                             "--stall-timeout", "1")
    assert code == 4 and rep["error"]["kind"] == "stalled"
    part = staging("provision/big") / "hub" / f"{sha}-{src.stat().st_size}.part"
    assert part.stat().st_size == 1 << 20  # kept for the next run
    assert not (tmp_path / "out" / "weights.dat").exists()


# ---------------------------------------------------------------------------------------
# offline


def test_offline_with_a_complete_local_copy_succeeds_without_the_network(
        hub: LoopbackHub, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "out"
    assert cli_json(capsys, "fetch", f"hf://{TINY_REPO}", "--dest", str(dest))[0] == 0
    hub.reset_counters()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, rep, err = cli_json(capsys, "fetch", f"hf://{TINY_REPO}", "--dest", str(dest))
    assert code == 0, err
    assert rep["fetch"]["extra"]["offline"] is True and all(f["reused"] for f in rep["fetch"]["files"])
    assert all(len(f["sha256"]) == 64 for f in rep["fetch"]["files"])  # git-blob files get theirs too
    assert hub.requests == []


def test_offline_with_an_incomplete_local_copy_exits_4_naming_what_is_missing(
        hub: LoopbackHub, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "out"
    assert cli_json(capsys, "fetch", f"hf://{TINY_REPO}", "--dest", str(dest))[0] == 0
    (dest / "tekken.json").unlink()
    hub.reset_counters()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, rep, _ = cli_json(capsys, "fetch", f"hf://{TINY_REPO}", "--dest", str(dest))
    assert code == 4 and "HF_HUB_OFFLINE" in rep["error"]["message"] and "tekken.json" in rep["error"]["message"]
    assert rep["error"]["context"]["missing"] == ["tekken.json"]
    assert hub.requests == []


def test_offline_manifest_verifies_a_copied_folder_without_any_hub(
        tiny_copy: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    code, rep, err = cli_json(capsys, "fetch", str(tiny_copy / "manifest.toml"), "--source", "hf", "--dest", str(tiny_copy))
    assert code == 0, err
    assert {f["authority"] for f in rep["fetch"]["files"]} == {"manifest-sha256"}
    bad = bytearray((tiny_copy / "params.json").read_bytes())
    bad[3] ^= 1
    (tiny_copy / "params.json").write_bytes(bytes(bad))
    code, rep, _ = cli_json(capsys, "fetch", str(tiny_copy / "manifest.toml"), "--source", "hf", "--dest", str(tiny_copy))
    assert code == 4 and "failed verification" in rep["error"]["message"]


def test_offline_hf_uri_with_no_previous_fetch_exits_4(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    code, rep, _ = cli_json(capsys, "fetch", f"hf://{TINY_REPO}", "--dest", str(tmp_path / "out"))
    assert code == 4 and "HF_HUB_OFFLINE" in rep["error"]["message"]


def test_an_unreachable_endpoint_exits_4(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    code, rep, _ = cli_json(capsys, "fetch", f"hf://{TINY_REPO}", "--dest", str(tmp_path / "out"), "--stall-timeout", "1")
    assert code == 4 and "127.0.0.1:9" in rep["error"]["message"]


# ---------------------------------------------------------------------------------------
# repo shapes


def test_nested_paths_empty_files_and_duplicate_contents_are_all_fetched(
        hub: LoopbackHub, tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").write_bytes(b"")
    files = {"a/config.json": tiny_src / "params.json", "b/config.json": tiny_src / "params.json",
             "sub/dir/tekken.json": tiny_src / "tekken.json", "empty.txt": tmp_path / "empty"}
    hub.add_repo("org/shapes", files)
    dest = tmp_path / "out"
    code, rep, err = cli_json(capsys, "fetch", "hf://org/shapes", "--dest", str(dest))
    assert code == 0, err
    for rel, src in files.items():
        assert (dest / rel).read_bytes() == src.read_bytes()
    got = {f["path"]: f for f in rep["fetch"]["files"]}
    assert got["empty.txt"]["authority"] == "git-blob-sha1"
    # the two identical files were downloaded once
    assert sum(1 for p in resolve_paths(hub) if p.endswith("/config.json")) == 1


def test_a_manifest_prefix_selects_the_sub_folder_of_the_repo(
        hub: LoopbackHub, tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rev, files = tiny_facts(tiny_src)
    commit = hub.add_repo("org/nested", {f"weights/{k}": v for k, v in files.items()}, revision="1" * 40)
    text = (tiny_src / "manifest.toml").read_text()
    text = text.replace(f'repo = "{TINY_REPO}"', 'repo = "org/nested"').replace(rev, commit)
    text = text.replace('revision = "1111111111111111111111111111111111111111"',
                        'revision = "1111111111111111111111111111111111111111"\nprefix = "weights/"')
    (tmp_path / "m.toml").write_text(text)
    dest = tmp_path / "out"
    code, rep, err = cli_json(capsys, "fetch", str(tmp_path / "m.toml"), "--dest", str(dest))
    assert code == 0, err
    assert same_files(dest, tiny_src, list(files)) and rep["fetch"]["extra"]["prefix"] == "weights/"


def test_a_partial_another_process_is_writing_is_left_alone_exit_6(
        hub: LoopbackHub, tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import fcntl

    sha = hashlib.sha256((tiny_src / "params.json").read_bytes()).hexdigest()
    d = staging("tiny-pixtral") / "hub"
    d.mkdir(parents=True)
    with open(d / f"{sha}-{(tiny_src / 'params.json').stat().st_size}.lock", "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        # a manifest pins sha256 for params.json, so its partial is keyed by it
        code, rep, _ = cli_json(capsys, "fetch", str(tiny_src / "manifest.toml"), "--dest", str(tmp_path / "out"),
                                 "--include", "params.json")
    assert code == 6 and rep["error"]["kind"] == "lock" and "params.json" in rep["error"]["message"]
    assert not (tmp_path / "out" / "params.json").exists()


@pytest.mark.slow
def test_a_server_whose_bytes_end_early_gets_416_restarts_then_exit_4(
        hub: LoopbackHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = _big_repo(hub, tmp_path, size=6 << 20)
    short = tmp_path / "short"
    short.write_bytes(src.read_bytes()[: 2 << 20])
    hub.serve_instead["weights.dat"] = short  # the CDN's copy is truncated: ranges past it get 416
    code, rep, _ = cli_json(capsys, "fetch", "hf://provision/big", "--dest", str(tmp_path / "out"))
    assert code == 4 and "refusing ranges" in rep["error"]["message"]
    assert 416 in [r.status for r in hub.requests if "weights.dat" in r.path or r.role == "cdn"]
    assert not (tmp_path / "out" / "weights.dat").exists()


def test_progress_is_reported_per_file_and_in_total(hub: LoopbackHub, tiny_src: Path, tmp_path: Path) -> None:
    from provision.progress import ProgressEvent
    from provision.stages.fetch import fetch
    from provision.stages.plan import make_plan

    events: list[ProgressEvent] = []
    plan = make_plan(str(tiny_src / "manifest.toml"), home=provision_home(), dest=tmp_path / "out", check_disk=False)
    fetch(plan, source="hf", progress=events.append)
    sizes = {f.path: f.size or 0 for f in plan.files}
    for name, size in sizes.items():
        last = [e for e in events if e.task == f"hf:{name}"][-1]
        assert last.finished and last.done == last.total == size and last.unit == "B"
    total = [e for e in events if e.task == "hf:total"]
    assert total[-1].finished and total[-1].done == total[-1].total == sum(sizes.values())
    assert all(a.done <= b.done for a, b in itertools.pairwise(total))


def test_proxies_from_the_environment_are_used(
        hub: LoopbackHub, tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.utils import close_session

    from provision.testing.hub_server import loopback_proxy

    with loopback_proxy() as proxy:
        try:
            with monkeypatch.context() as m:
                for var in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
                    m.delenv(var, raising=False)
                m.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")
                close_session()  # huggingface_hub's shared client reads the proxy settings when it is made
                code, _, err = cli_json(capsys, "fetch", f"hf://{TINY_REPO}", "--dest", str(tmp_path / "out"),
                                         "--include", "consolidated.safetensors")
        finally:
            close_session()
    assert code == 0, err
    urls = [u for _, u, _ in proxy.seen]
    assert any("/api/models/" in u for u in urls) and any("/resolve/" in u for u in urls)
    assert any(u.startswith(hub.cdn_url) for u in urls)  # the redirected download went through it too
    assert same_files(tmp_path / "out", tiny_src, ["consolidated.safetensors"])


def test_files_download_in_parallel_up_to_max_workers(hub: LoopbackHub, tmp_path: Path) -> None:
    from provision.stages.fetch import HubOptions, fetch
    from provision.stages.plan import make_plan

    files = {}
    for i in range(6):
        files[f"shard-{i}.dat"] = tmp_path / f"s{i}"
        files[f"shard-{i}.dat"].write_bytes(os.urandom(2 << 20))
    hub.add_repo("org/shards", files)
    hub.rate_limit = 4 << 20  # each shard takes about half a second: a fourth worker would overlap
    hub.overlap_gate = 3  # the first bodies wait until three are being sent at once (30 s at most)
    plan = make_plan("hf://org/shards", home=provision_home(), dest=tmp_path / "out", check_disk=False)
    res = fetch(plan, source="hf", hub=HubOptions(max_workers=3))
    assert len(res.files) == 6
    assert hub.gate_opened, f"never three downloads at once (at most {hub.max_active})"
    assert hub.max_active == 3


def test_a_private_repo_needs_the_token_for_its_listing_too(
        hub: LoopbackHub, tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub.add_repo("org/private", {"params.json": tiny_src / "params.json"})
    hub.repos["org/private"].private = True
    hub.repos["org/private"].accepted.add("alice")
    code, rep, _ = cli_json(capsys, "fetch", "hf://org/private", "--dest", str(tmp_path / "a"))
    assert code == 4 and rep["error"]["kind"] == "auth" and "private" in rep["error"]["message"]
    code, rep, err = cli_json(capsys, "fetch", "hf://org/private", "--dest", str(tmp_path / "a"), "--token", ALICE)
    assert code == 0, err
    code, rep, _ = cli_json(capsys, "fetch", "hf://org/private", "--dest", str(tmp_path / "b"), "--token", BOB)
    assert code == 4 and rep["error"]["kind"] == "not_found"


def test_provision_run_fetches_a_private_hf_repo_with_its_token(
        hub: LoopbackHub, tiny_src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub.repos[TINY_REPO].private = True
    hub.repos[TINY_REPO].accepted.add("alice")
    capsys.readouterr()
    code = run_cli(["run", f"hf://{TINY_REPO}", "--token", ALICE, "--skip-convert", "--skip-smoke", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert same_files(Layout(provision_home()).original(TINY_REPO), tiny_src, ["consolidated.safetensors", "params.json"])
    assert ALICE not in out.out + out.err


def test_huggingface_hub_reads_its_token_and_cache_under_this_tests_hf_home(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub computes these paths from HF_HOME once per process, at import; each test
    # has its own HF_HOME, so a stale path would read another test's (or the user's) saved token
    from huggingface_hub import constants
    from huggingface_hub.utils import get_token

    hf_home = Path(os.environ["HF_HOME"])
    assert Path(constants.HF_TOKEN_PATH) == hf_home / "token"
    assert Path(constants.HF_HUB_CACHE) == hf_home / "hub"
    assert get_token() is None
    (hf_home / "token").parent.mkdir(parents=True, exist_ok=True)
    (hf_home / "token").write_text(ALICE)  # what `hf auth login` saves
    assert get_token() == ALICE
