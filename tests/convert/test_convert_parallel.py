"""Convert on several threads: the output is byte for byte the serial one, errors surface in order,
the worker count comes from --workers / PROVISION_CONVERT_WORKERS / the CPUs, and a failure or a
kill leaves nothing committed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from provision.cli.main import run_cli
from provision.errors import ConvertError, UsageError
from provision.settings import Settings
from provision.stages.convert import RECORD_NAME, convert, items
from provision.stages.convert.parallel import MAX_DEFAULT_WORKERS, OrderedPool, resolve_workers
from tests.convert.conftest import TINY128_PARAMS
from tests.support.files import load_st

WAIT_S = 30.0  # deadline of every wait on another thread

# (scheme, layout): every profile convert writes (the mistral layout carries only casts)
PROFILES = [("bf16", "mistral"), ("bf16", "hf"), ("fp8", "hf"), ("w8a16", "hf"), ("w4a16", "hf")]

# a wider checkpoint than the tiny one: 64 MiB embedding (4 pieces of 16 MiB when cast), decoder
# Linears of 512 x 2048 (quantized in 2 MiB pieces), q/k of 8 heads of 64 rows
WIDE_PARAMS: dict[str, Any] = {
    **TINY128_PARAMS, "dim": 512, "head_dim": 64, "n_heads": 8, "n_kv_heads": 4, "hidden_dim": 2048,
    "vocab_size": 65536,
}


def _file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file convert wrote, except the two whose content records the run itself
    (its duration and time: provision-convert.json, provenance.json)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name not in (RECORD_NAME, "provenance.json")}


def _tensor_reports(folder: Path) -> Any:
    return json.loads((folder / RECORD_NAME).read_text())["tensors"]


def _convert_both(src: Path, tmp_path: Path, scheme: str, layout: str, workers: int) -> tuple[Path, Path]:
    one, many = tmp_path / "w1", tmp_path / f"w{workers}"
    for out, n in ((one, 1), (many, workers)):
        convert(src, out, target="h100", scheme=scheme, layout=layout, hf_tokenizer=False, workers=n)
    return one, many


@pytest.fixture(scope="module")
def wide_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from provision.testing.tiny import write_tiny

    out = tmp_path_factory.mktemp("wide") / "wide"
    write_tiny(out, seed=2, params=WIDE_PARAMS)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("scheme", "layout"), PROFILES)
def test_four_workers_write_the_same_bytes_as_one_on_the_tiny_model(tiny128_src: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch, scheme: str,
                                                                     layout: str) -> None:
    # small pieces, so that every tensor of the tiny model is cut into many and they overtake each other
    monkeypatch.setattr(items, "CHUNK_BYTES", 8 << 10)
    monkeypatch.setattr(items, "QUANT_CHUNK_BYTES", 4 << 10)
    one, many = _convert_both(tiny128_src, tmp_path, scheme, layout, 4)
    digests = _file_digests(one)
    assert any(n.endswith(".safetensors") for n in digests)
    assert _file_digests(many) == digests
    assert _tensor_reports(many) == _tensor_reports(one)  # the same relative errors, to the last bit


@pytest.mark.slow
@pytest.mark.parametrize(("scheme", "layout"), PROFILES)
def test_four_workers_write_the_same_bytes_as_one_on_a_wider_model(wide_src: Path, tmp_path: Path, scheme: str,
                                                                    layout: str) -> None:
    one, many = _convert_both(wide_src, tmp_path, scheme, layout, 4)
    assert _file_digests(many) == _file_digests(one)
    assert _tensor_reports(many) == _tensor_reports(one)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["bf16", "fp8", "w4a16"])
def test_q_and_k_permuted_in_head_pieces_equal_them_permuted_whole(tiny128_src: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   scheme: str) -> None:
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    monkeypatch.setattr(items, "CHUNK_BYTES", 1 << 30)  # every tensor in one piece
    monkeypatch.setattr(items, "QUANT_CHUNK_BYTES", 1 << 30)
    convert(tiny128_src, whole, target="h100", scheme=scheme, layout="hf", hf_tokenizer=False, workers=1)
    # q/k of the tiny128 decoder: 128 x 128 bf16 (256 B rows), 4 heads of 32 rows = 8 KiB per head;
    # 12 KiB pieces hold one head (rounded down to whole heads), so each tensor is cut into 4
    monkeypatch.setattr(items, "CHUNK_BYTES", 12 << 10)
    monkeypatch.setattr(items, "QUANT_CHUNK_BYTES", 12 << 10)
    convert(tiny128_src, pieces, target="h100", scheme=scheme, layout="hf", hf_tokenizer=False, workers=2)
    assert _file_digests(pieces) == _file_digests(whole)


def test_pieces_of_a_permuted_tensor_are_whole_heads(tiny128_src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from provision.formats.params import ModelArgs
    from provision.hardware import parse_target
    from provision.stages.convert.source import SafetensorsSource
    from provision.stages.profiles import choose

    args = ModelArgs.from_file(tiny128_src / "params.json")
    src = SafetensorsSource(tiny128_src / "consolidated.safetensors", root=tiny128_src)
    try:
        plan = items.plan_items([src], args, choose(args, parse_target("h100"), "bf16", "hf"))
    finally:
        src.close()
    wq = next(it for it in plan if it.src.name == "layers.0.attention.wq.weight")
    monkeypatch.setattr(items, "CHUNK_BYTES", 20 << 10)
    # 128 rows of 256 B, 4 heads of 32 rows: 20 KiB = 80 rows -> 64 rows (two whole heads) a piece
    assert list(items.chunks(wq)) == [(0, 64), (64, 64)]
    monkeypatch.setattr(items, "CHUNK_BYTES", 1 << 10)  # less than a head: one head a piece
    assert list(items.chunks(wq)) == [(0, 32), (32, 32), (64, 32), (96, 32)]


def test_a_later_tensor_that_overflows_fails_the_parallel_run_and_leaves_nothing(tiny_copy: Path,
                                                                                 tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = load_st(tiny_copy / "consolidated.safetensors")
    sd["norm.weight"] = torch.full_like(sd["norm.weight"], 1e6)
    save_file(sd, str(tiny_copy / "consolidated.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConvertError) as e:
        convert(tiny_copy, tmp_path / "o", target="t4", scheme="fp16", workers=4)
    assert e.value.exit_code == 7 and "norm.weight" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-pixtral"]  # no output, no staging folder


_KILLER = r"""
import os, signal, sys
from pathlib import Path
from provision.stages.convert import convert

def progress(ev):
    if ev.done > int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)

convert(Path(sys.argv[1]), Path(sys.argv[2]), target="h100", scheme="fp8", hf_tokenizer=False,
        shard_bytes=150_000, progress=progress, workers=4)
"""


@pytest.mark.slow
def test_a_parallel_conversion_killed_midway_commits_nothing(tiny128_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    size = (tiny128_src / "consolidated.safetensors").stat().st_size
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([sys.executable, "-c", _KILLER, str(tiny128_src), str(out), str(size // 2)],
                       env=env, capture_output=True, timeout=120)
    assert r.returncode == -9, r.stderr.decode()[-2000:]
    assert not out.exists()
    left = [p.name for p in tmp_path.iterdir()]
    assert left and all(n.startswith(".provision-tmp-convert-o-") for n in left), left


# -- the ordered pool ------------------------------------------------------------------------------

def _wait(ev: threading.Event) -> None:
    if not ev.wait(WAIT_S):
        raise AssertionError("a job waited past its deadline")


def test_results_come_back_in_submission_order_when_later_jobs_finish_first() -> None:
    last_done = threading.Event()
    finished: list[int] = []

    def job(i: int) -> Callable[[], int]:
        def run() -> int:
            if i == 0:
                _wait(last_done)  # job 0 finishes only after job 3 has
            finished.append(i)
            if i == 3:
                last_done.set()
            return i * 10
        return run

    with OrderedPool[int, int](4, 4) as pool:
        got = list(pool.ordered((i, job(i)) for i in range(4)))
    assert got == [(0, 0), (1, 10), (2, 20), (3, 30)]
    assert finished[-1] == 0 and finished.index(3) < finished.index(0)


def test_no_more_than_the_window_of_jobs_is_taken_ahead_of_the_caller() -> None:
    taken = 0
    handed = 0
    most_ahead = 0

    def jobs() -> Any:
        nonlocal taken, most_ahead
        for i in range(50):
            taken += 1
            most_ahead = max(most_ahead, taken - handed)
            yield i, (lambda i=i: i)

    with OrderedPool[int, int](3, 5) as pool:
        for k, v in pool.ordered(jobs()):
            assert k == v
            handed += 1
    assert handed == 50
    assert most_ahead == 6  # the window of 5 in flight plus the one being taken when the oldest is handed back


def test_a_failing_job_raises_at_its_turn_after_the_results_before_it() -> None:
    def boom() -> int:
        raise ConvertError("job 2 failed")

    got: list[int] = []
    with OrderedPool[int, int](4, 8) as pool, pytest.raises(ConvertError, match="job 2 failed"):
        for _, v in pool.ordered([(0, lambda: 0), (1, lambda: 1), (2, boom), (3, lambda: 3)]):
            got.append(v)
    assert got == [0, 1]


def test_one_worker_runs_every_job_on_the_calling_thread() -> None:
    me = threading.get_ident()
    with OrderedPool[int, int](1, 1) as pool:
        assert [v for _, v in pool.ordered((i, threading.get_ident) for i in range(3))] == [me, me, me]


# -- how many workers ------------------------------------------------------------------------------

def _settings(workers: str | None) -> Settings:
    return Settings(home=Path("/nonexistent"), debug=False, log_file=None, network="closed", convert_workers=workers)


def test_default_workers_are_the_usable_cpus_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    from provision.stages.convert import parallel

    monkeypatch.setattr(parallel, "usable_cpus", lambda: 64)
    assert resolve_workers(None, _settings(None)) == MAX_DEFAULT_WORKERS == 8
    monkeypatch.setattr(parallel, "usable_cpus", lambda: 2)
    assert resolve_workers(None, _settings(None)) == 2


def test_workers_option_beats_the_environment_which_beats_the_cpus() -> None:
    assert resolve_workers(None, _settings("3")) == 3
    assert resolve_workers(5, _settings("3")) == 5


def test_the_environment_variable_is_read_by_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROVISION_CONVERT_WORKERS", " 6 ")
    assert Settings.load().convert_workers == "6"
    assert resolve_workers(None) == 6


@pytest.mark.parametrize(("workers", "env"), [(0, None), (-1, None), (None, "abc"), (None, "0"), (None, "2.5"),
                                              (None, "100000")])
def test_bad_worker_counts_are_usage_errors(workers: int | None, env: str | None) -> None:
    with pytest.raises(UsageError) as e:
        resolve_workers(workers, _settings(env))
    assert e.value.exit_code == 2
    assert "\n" not in str(e.value)


def test_cli_workers_zero_and_a_bad_environment_are_exit_2_and_write_nothing(
        tiny_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o"
    assert run_cli(["convert", str(tiny_src), "--out", str(out), "--scheme", "bf16", "--target", "h100",
                    "--workers", "0"]) == 2
    monkeypatch.setenv("PROVISION_CONVERT_WORKERS", "many")
    assert run_cli(["convert", str(tiny_src), "--out", str(out), "--scheme", "bf16", "--target", "h100"]) == 2
    assert list(tmp_path.iterdir()) == []


def test_cli_workers_option_converts(tiny_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert run_cli(["convert", str(tiny_src), "--out", str(out), "--scheme", "bf16", "--target", "h100",
                    "--workers", "3"]) == 0
    ref = tmp_path / "ref"
    convert(tiny_src, ref, target="h100", scheme="bf16", workers=1)
    assert _file_digests(out) == _file_digests(ref)


@pytest.mark.slow
def test_run_workers_option_reaches_the_conversion(tiny_src: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from provision.stages.convert import stream

    seen: list[int] = []
    real = stream.stream_tensors

    def spy(*args: Any, **kw: Any) -> Any:
        seen.append(kw["workers"])
        return real(*args, **kw)

    monkeypatch.setattr(stream, "stream_tensors", spy)
    monkeypatch.setattr("provision.stages.convert.stage.stream_tensors", spy)
    assert run_cli(["run", str(tiny_src / "manifest.toml"), "--home", str(tmp_path / "home"), "--adopt",
                    str(tiny_src), "--skip-smoke", "--target", "h100", "--scheme", "bf16", "--workers", "3"]) == 0
    assert seen == [3]
    assert run_cli(["run", str(tiny_src / "manifest.toml"), "--home", str(tmp_path / "home2"), "--adopt",
                    str(tiny_src), "--skip-smoke", "--workers", "0"]) == 2
    assert not (tmp_path / "home2").exists()


# -- the allocator -----------------------------------------------------------------------------------

_FAULTS = r"""
import resource, sys
from provision.stages.convert.allocator import keep_freed_blocks
if sys.argv[1] == "keep":
    assert keep_freed_blocks()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    b = bytearray(40 << 20)  # zero-filled: every page touched
    del b
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_new_page_faults() -> None:
    def faults(mode: str) -> int:
        r = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        assert r.returncode == 0, r.stderr[-2000:]
        return int(r.stdout.strip())

    pages = (40 << 20) // 4096  # 10240 pages of 4 KiB per block
    # glibc maps a 40 MiB block (over its 32 MiB dynamic ceiling) afresh each time: ~50 x 10240 faults
    assert faults("default") > 20 * pages
    # kept on the heap: the first block faults its pages in, the next 49 reuse them
    assert faults("keep") < 5 * pages
