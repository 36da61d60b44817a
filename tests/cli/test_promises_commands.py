"""Command options the README promises and no other test exercises from the command line:
``verify --workers N``, ``import-pickle --md5``, ``plan --include GLOB``, ``plan --context N`` and
``NO_PROXY`` for Hub sources."""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import provision.stages.verify.parallel as parallel
from provision.testing.hub_server import LoopbackHub
from provision.testing.tiny import TINY_REPO
from tests.support.cli import cli_json

FILES = ("consolidated.safetensors", "params.json", "tekken.json")  # the tiny manifest's files


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# -- verify --workers ---------------------------------------------------------------------------
class _Watch:
    """Which pools ``hash_all`` opened and which threads hashed whole files (the real work, unchanged)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pools: list[int] = []
        self.threads: list[str] = []
        real_unit: Callable[..., Any] = parallel._whole_unit
        watch = self

        class Pool(ThreadPoolExecutor):
            def __init__(self, max_workers: int | None = None, **kw: Any) -> None:
                watch.pools.append(int(max_workers or 0))
                super().__init__(max_workers=max_workers, **kw)

        def unit(*a: Any, **kw: Any) -> Any:
            watch.threads.append(threading.current_thread().name)
            return real_unit(*a, **kw)

        monkeypatch.setattr(parallel, "ThreadPoolExecutor", Pool)
        monkeypatch.setattr(parallel, "_whole_unit", unit)


def _verify(capsys: pytest.CaptureFixture[str], tiny_src: Path, workers: int) -> dict[str, Any]:
    rc, doc, err = cli_json(capsys, "verify", str(tiny_src), "--manifest", str(tiny_src / "manifest.toml"),
                            "--workers", str(workers))
    assert rc == 0, err
    report: dict[str, Any] = doc["verify"]
    got = {f["path"]: f["sha256"] for f in report["files"] if f["path"] in FILES}
    assert got == {f: _sha256(tiny_src / f) for f in FILES}
    return report


def test_verify_workers_sets_how_many_threads_hash_the_files(
    tiny_src: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    one = _Watch(monkeypatch)
    assert _verify(capsys, tiny_src, 1)["workers"] == 1
    assert one.pools == [] and set(one.threads) == {threading.main_thread().name}  # all on the caller's thread
    assert len(one.threads) == len(FILES)

    two = _Watch(monkeypatch)
    assert _verify(capsys, tiny_src, 2)["workers"] == 2
    assert two.pools == [2]  # three files, two workers: one pool of two threads
    assert len(two.threads) == len(FILES) and threading.main_thread().name not in two.threads
    assert 1 <= len(set(two.threads)) <= 2


# -- import-pickle --md5 --------------------------------------------------------------------------
def test_import_pickle_accepts_the_release_md5_and_refuses_a_wrong_one_before_loading(
    tiny_7b_pickle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from safetensors.torch import load_file

    pth = tiny_7b_pickle / "consolidated.00.pth"
    md5 = hashlib.md5(pth.read_bytes(), usedforsecurity=False).hexdigest()
    wrong = md5[:-1] + ("0" if md5[-1] != "0" else "1")
    bad_out = tmp_path / "refused"
    rc, doc, err = cli_json(capsys, "import-pickle", str(tiny_7b_pickle), "--out", str(bad_out), "--md5", wrong)
    assert rc == 5, err
    assert "md5" in doc["error"]["message"]
    assert "separate process" not in err  # the hash is checked first: the pickle was never loaded
    assert not (bad_out / "consolidated.safetensors").exists()

    out = tmp_path / "imported"
    rc, doc, err = cli_json(capsys, "import-pickle", str(tiny_7b_pickle), "--out", str(out), "--md5", md5)
    assert rc == 0, err
    assert doc["authority"] == "md5" and doc["source_md5"] == md5
    assert doc["source_sha256"] == _sha256(pth)
    want = torch.load(pth, weights_only=True, map_location="cpu")
    got = load_file(out / "consolidated.safetensors")
    assert sorted(got) == sorted(want)
    for k, t in want.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k


# -- plan --include / --context -------------------------------------------------------------------
def test_plan_include_lists_only_the_matching_files_and_sizes_only_them(
    tiny_src: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, doc, err = cli_json(capsys, "plan", str(tiny_src / "manifest.toml"), "--offline",
                            "--include", "params.json", "--include", "tekken*")
    assert rc == 0, err
    plan = doc["plan"]
    assert [f["path"] for f in plan["files"]] == ["params.json", "tekken.json"]
    sizes = (tiny_src / "params.json").stat().st_size + (tiny_src / "tekken.json").stat().st_size
    assert plan["bytes_total"] == plan["bytes_to_fetch"] == sizes
    assert "consolidated.safetensors" not in err  # nor does the human table show it


# Pixtral 12B (mistralai/Pixtral-12B-2409 params.json): 40 layers, 8 KV heads, head_dim 128. A 16-bit KV
# cache holds K and V: 2 x 40 x 8 x 128 x 2 bytes = 163,840 bytes per token (batch 1).
KV_BYTES_PER_TOKEN = 2 * 40 * 8 * 128 * 2


@pytest.mark.parametrize("context", [1000, 4096])
def test_plan_context_sizes_the_kv_cache_of_every_profile(context: int, capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc, err = cli_json(capsys, "plan", "pixtral-12b-2409", "--offline", "--target", "h100",
                            "--context", str(context))
    assert rc == 0, err
    prof = doc["profiles"]
    assert prof["context"] == context
    assert prof["candidates"]
    for r in prof["candidates"]:
        assert r["activation_dtype"] in ("bfloat16", "float16"), r  # a 16-bit KV cache
        assert r["kv_bytes"] == KV_BYTES_PER_TOKEN * context, r["name"]
        # README: memory needed = weights + KV cache + 10%
        assert r["need_bytes"] == math.ceil((r["weight_bytes"] + r["kv_bytes"]) * 1.1), r["name"]


# -- NO_PROXY -------------------------------------------------------------------------------------
def test_no_proxy_sends_hub_requests_around_the_proxy(
    hub: LoopbackHub, tiny_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    from huggingface_hub.utils import close_session

    from provision.testing.hub_server import loopback_proxy

    def fetch(dest: Path) -> None:
        close_session()  # huggingface_hub's shared client reads the proxy settings when it is made
        try:
            rc, _, err = cli_json(capsys, "fetch", f"hf://{TINY_REPO}", "--dest", str(dest), "--include", "*.json")
        finally:
            close_session()
        assert rc == 0, err
        for f in ("params.json", "tekken.json"):
            assert _sha256(dest / f) == _sha256(tiny_src / f)

    with loopback_proxy() as proxy:
        for var in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy",
                    "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        fetch(tmp_path / "direct")
        assert proxy.seen == []  # every request (hub and CDN, both on 127.0.0.1) went around it
        assert hub.requests  # and reached the hub directly
        monkeypatch.delenv("NO_PROXY")
        fetch(tmp_path / "proxied")
        assert any("/resolve/" in url for _, url, _ in proxy.seen)  # without NO_PROXY the same fetch uses it
