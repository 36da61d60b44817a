"""The vLLM server's process-group bookkeeping, without vLLM: start-up cleanup stops only the groups
of dead runs that are still our launcher, and the serve line of a folder is the one convert prints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provision.stages.smoke_vllm import host_args
from provision.stages.smoke_vllm.server import LAUNCHER, _proc_start, cleanup_orphans


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL)


def _state(state_dir: Path, proc: subprocess.Popen[bytes], owner: int, owner_start: str | None) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    f = state_dir / f"server-{proc.pid}.json"
    f.write_text(json.dumps({"pgid": proc.pid, "pgid_start": _proc_start(proc.pid), "owner": owner,
                             "owner_start": owner_start}))
    return f


def _dead_owner() -> tuple[int, str | None]:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    start = _proc_start(p.pid)
    p.wait()
    return p.pid, start


# A stand-in for the launcher: same module name on its command line, no vLLM imported.
FAKE_SERVER = [sys.executable, "-c", "import time; time.sleep(120)", LAUNCHER]


def test_cleanup_stops_the_group_of_a_dead_run_that_is_still_our_launcher(tmp_path: Path) -> None:
    proc = _spawn(FAKE_SERVER)
    try:
        time.sleep(0.2)
        owner, start = _dead_owner()
        state = _state(tmp_path, proc, owner, start)
        assert cleanup_orphans(tmp_path) == [proc.pid]
        proc.wait(timeout=15)
        assert not _group_alive(proc.pid) and not state.exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_cleanup_leaves_a_live_runs_server_and_a_group_that_is_not_our_launcher(tmp_path: Path) -> None:
    live = _spawn(FAKE_SERVER)
    stranger = _spawn([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        time.sleep(0.2)
        _state(tmp_path, live, os.getpid(), _proc_start(os.getpid()))  # its owner (this test) is alive
        owner, start = _dead_owner()
        f = _state(tmp_path, stranger, owner, start)  # dead owner, but the pid is not our launcher
        assert cleanup_orphans(tmp_path) == []
        assert live.poll() is None and stranger.poll() is None
        assert not f.exists()  # the stale record is dropped, the process left alone
    finally:
        for p in (live, stranger):
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_host_args_set_the_reference_dtype_and_cpu_settings_in_place() -> None:
    serve = ["vllm", "serve", "/m", "--dtype", "bfloat16", "--max-model-len", "32768"]
    got = host_args(serve, "float32", cpu=True, weights_bytes=1 << 20)
    assert got[:7] == ["vllm", "serve", "/m", "--dtype", "float32", "--max-model-len", "32768"]
    assert got.count("--dtype") == 1 and "--enforce-eager" in got
    frac = float(got[got.index("--gpu-memory-utilization") + 1])
    assert 0.05 <= frac <= 0.9
    assert host_args(serve, "bfloat16", cpu=False, weights_bytes=1) == serve


@pytest.mark.parametrize("kind", ["7b", "nemo"])
def test_text_only_hf_conversion_prints_a_text_serve_line_and_smoke_starts_that_line(
        kind: str, tmp_path: Path) -> None:
    import shlex

    from provision.stages.convert import convert
    from provision.stages.convert.serve import serve_args_for
    from tests.vllm.conftest import write_vllm_tiny

    src = write_vllm_tiny(tmp_path / "src", kind)
    res = convert(src, tmp_path / "out", target="cpu", scheme="bf16", layout="hf", workers=1)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["MistralForCausalLM"] and cfg["head_dim"] == 64
    assert cfg["rope_theta"] == (1e6 if kind == "nemo" else 10000.0)
    argv = shlex.split(res.vllm_command)
    assert "--limit-mm-per-prompt" not in argv and argv[argv.index("--tokenizer-mode") + 1] == "mistral"
    assert serve_args_for(tmp_path / "out") == argv


def test_doctor_names_the_engine_a_smoke_test_would_use(monkeypatch: pytest.MonkeyPatch) -> None:
    from provision.cli.diagnose import check_smoke_engine
    from provision.stages.smoke_vllm import vllm_available

    monkeypatch.setenv("PROVISION_SMOKE_ENGINE", "vllm")
    assert check_smoke_engine().detail.startswith("smoke uses vllm for text-only models, vllm for vision")
    monkeypatch.delenv("PROVISION_SMOKE_ENGINE")
    expected = "both" if vllm_available()[0] else "provision"
    assert check_smoke_engine().detail.startswith(f"smoke uses {expected} for text-only models")
    monkeypatch.setenv("PROVISION_SMOKE_ENGINE", "gpu")
    assert check_smoke_engine().status == "fail"


@pytest.mark.parametrize("kind", ["7b", "nemo", "mixtral"])
def test_text_only_hf_layout_generates_the_sources_greedy_ids_on_our_engine(kind: str, tmp_path: Path) -> None:
    """The hf layout of 7B, NeMo and Mixtral (a Mixtral params.json without rope_theta means 1e6:
    config.json must say so) is the same model as the Mistral-format source."""
    from provision.stages.convert import convert
    from provision.stages.smoke import smoke
    from provision.testing.tiny_text import write_tiny_mistral
    from tests.vllm.conftest import vllm_tiny_params

    params = vllm_tiny_params("7b" if kind == "mixtral" else kind)
    if kind == "mixtral":
        params.pop("sliding_window")
        params["moe"] = {"num_experts": 4, "num_experts_per_tok": 2}
    src = tmp_path / "src"
    write_tiny_mistral(src, "7b" if kind == "mixtral" else kind, params=params, source="local")
    convert(src, tmp_path / "hf", target="cpu", scheme="bf16", layout="hf", workers=1)
    arch = json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"]
    assert arch == ["MixtralForCausalLM" if kind == "mixtral" else "MistralForCausalLM"]
    prompt = "What is the capital of France? Answer in one word."
    a = smoke(src, device="cpu", prompt=prompt, max_tokens=6)
    b = smoke(tmp_path / "hf", device="cpu", prompt=prompt, max_tokens=6)
    assert b.layout == "hf" and a.token_ids == b.token_ids
