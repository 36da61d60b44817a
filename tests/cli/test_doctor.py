"""`provision doctor`: one ok/warn/fail line per check with its fix, exit 0/1, network checks only when
allowed (against the loopback hub and loopback trackers here), and the token never shown."""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from provision.cli.diagnose import check_disk, check_gpus, check_module, check_torch, probe_tracker
from provision.cli.main import run_cli
from provision.hardware import Hardware, detect
from provision.testing.hub_server import LoopbackHub
from tests.support.cli import cli_json
from tests.support.nvml import FakeNVML

SECRET = "hf_doctorSecretValue0123456789abcdef"  # a made-up token: it must never be printed


def _checks(doc: dict[str, object]) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for c in doc["checks"]:  # type: ignore[attr-defined]
        out.setdefault(c["name"], []).append(c)
    return out


@contextmanager
def udp_tracker(*, reply: bool = True, garbage: bool = False) -> Iterator[str]:
    """A loopback UDP tracker that answers one BEP 15 connect request (or stays silent)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(10)  # bounds the helper thread
    port = sock.getsockname()[1]

    def serve() -> None:
        try:
            data, addr = sock.recvfrom(64)
        except OSError:
            return
        magic, action, tid = struct.unpack(">QII", data[:16])
        assert (magic, action) == (0x41727101980, 0)  # BEP 15's protocol id and "connect"
        if reply:
            body = b"nonsense-reply!!" if garbage else struct.pack(">IIQ", 0, tid, 0x1234)
            sock.sendto(body, addr)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"udp://127.0.0.1:{port}/announce"
    finally:
        t.join(timeout=15)
        sock.close()


@contextmanager
def tcp_listener() -> Iterator[str]:
    """A loopback TCP port that accepts connections (an HTTP tracker's socket)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}/announce"
    finally:
        srv.close()


def test_token_value_never_appears_in_output_or_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    log = tmp_path / "doctor.log"
    capsys.readouterr()
    assert run_cli(["doctor", "--offline", "--verbose", "--log-file", str(log)]) == 0
    human = capsys.readouterr()
    rc, doc, err = cli_json(capsys, "doctor", "--offline", "--log-file", str(log))
    assert rc == 0
    for text in (human.out, human.err, json.dumps(doc), err, log.read_text()):
        assert SECRET not in text and SECRET[8:24] not in text
    (tok,) = _checks(doc)["hf-token"]
    assert tok["status"] == "ok" and "present" in tok["detail"]


def test_no_token_is_reported_as_public_repositories_only(capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc, _ = cli_json(capsys, "doctor", "--offline")
    assert rc == 0 and "no Hugging Face token" in _checks(doc)["hf-token"][0]["detail"]


def test_closed_mode_checks_nothing_over_the_network(hub: LoopbackHub, capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc, _ = cli_json(capsys, "doctor", "--network", "closed")
    assert rc == 0
    c = _checks(doc)
    assert "not checked (closed network mode)" in c["hub"][0]["detail"]
    assert c["tracker"][0]["status"] == "ok" and "not checked" in c["tracker"][0]["detail"]
    assert hub.requests == []  # the loopback hub saw nothing


def test_public_mode_reaches_the_loopback_hub_and_trackers(hub: LoopbackHub,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    with udp_tracker() as udp, tcp_listener() as http:
        rc, doc, _ = cli_json(capsys, "doctor", "--network", "public", "--tracker", udp, "--tracker", http,
                              "--timeout", "5")
    assert rc == 0
    c = _checks(doc)
    assert c["hub"][0] == {"name": "hub", "status": "ok", "detail": f"{hub.endpoint} answers", "fix": None}
    assert [(t["status"], t["detail"]) for t in c["tracker"]] == [("ok", f"{udp} answers"), ("ok", f"{http} answers")]
    assert hub.requests  # the hub check did reach it


def test_an_unreachable_hub_and_a_silent_tracker_are_warnings_with_fixes(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # the conftest's HF_ENDPOINT is a dead loopback port
    with udp_tracker(reply=False) as silent:
        rc, doc, _ = cli_json(capsys, "doctor", "--network", "public", "--tracker", silent, "--timeout", "0.5")
    assert rc == 0  # warnings do not fail the doctor
    c = _checks(doc)
    assert c["hub"][0]["status"] == "warn" and "HF_ENDPOINT" in (c["hub"][0]["fix"] or "")
    assert c["tracker"][0]["status"] == "warn" and "does not answer within 0.5 s" in c["tracker"][0]["detail"]
    assert c["tracker"][0]["fix"]


def test_a_reply_that_is_not_bep15_is_not_an_answer() -> None:
    with udp_tracker(garbage=True) as url:
        assert probe_tracker(url, 5) == "the reply is not a BEP 15 connect response"
    assert probe_tracker("wss://127.0.0.1:1/announce", 1) == "unsupported tracker scheme 'wss'"


def test_public_mode_without_trackers_given_probes_none_when_public_traffic_is_forbidden(
        hub: LoopbackHub, capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc, _ = cli_json(capsys, "doctor", "--network", "public")  # tests set PROVISION_FORBID_PUBLIC_NETWORK=1
    assert rc == 0
    assert [t["detail"] for t in _checks(doc)["tracker"]] == ["no tracker to check (pass --tracker URL)"]


def test_a_failed_check_makes_the_doctor_exit_1_with_the_fix(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("provision.cli.diagnose.DISK_FAIL_BYTES", 10**30)  # no disk has that much free
    capsys.readouterr()
    assert run_cli(["doctor", "--offline"]) == 1
    out = capsys.readouterr().out
    (disk,) = [ln for ln in out.splitlines() if ln.split()[1:2] == ["disk"]]
    assert disk.startswith("fail") and "-> Free space there or point PROVISION_HOME" in disk


def test_every_line_says_ok_warn_or_fail(capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert run_cli(["doctor", "--offline"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [ln.split()[1] for ln in lines]
    assert names == ["gpu", "torch", "disk", "store", "libtorrent", "vllm", "smoke-engine", "hf-token", "network", "hub", "tracker"]
    assert all(ln.split()[0] in ("ok", "warn", "fail") for ln in lines)


def test_disk_thresholds(tmp_path: Path) -> None:
    gb = 10**9
    assert check_disk(tmp_path, lambda p: 500 * 10**6).status == "fail"  # 0.5 GB: under the 1 GB floor
    assert check_disk(tmp_path, lambda p: 30 * gb).status == "warn"  # under Pixtral 12B + an fp8 copy (40 GB)
    ok = check_disk(tmp_path, lambda p: 100 * gb)
    assert ok.status == "ok" and ok.detail == f"100.00 GB free under {tmp_path}"


def test_gpu_check_names_the_detected_card_and_driver() -> None:
    hw = detect(FakeNVML.card("l4"), use_smi=False)
    c = check_gpus(hw, "550.54.15")
    assert c.status == "ok" and "NVIDIA L4" in c.detail and "driver 550.54.15" in c.detail
    none = check_gpus(Hardware(cpu_count=2), None)
    assert none.status == "warn" and none.fix


def _fake_torch(cuda: str | None, available: bool) -> types.ModuleType:
    m = types.ModuleType("torch")
    m.__version__ = "9.9.9"  # type: ignore[attr-defined]
    m.version = types.SimpleNamespace(cuda=cuda)  # type: ignore[attr-defined]
    m.cuda = types.SimpleNamespace(is_available=lambda: available, device_count=lambda: 1)  # type: ignore[attr-defined]
    return m


def test_torch_cpu_build_on_a_gpu_host_fails_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(None, False))
    c = check_torch(has_gpu=True)
    assert c.status == "fail" and "CPU-only build" in c.detail and "CUDA build" in (c.fix or "")
    assert check_torch(has_gpu=False).status == "ok"
    monkeypatch.setitem(sys.modules, "torch", _fake_torch("12.4", False))
    assert check_torch(has_gpu=True).status == "fail"
    monkeypatch.setitem(sys.modules, "torch", _fake_torch("12.4", True))
    ok = check_torch(has_gpu=True)
    assert ok.status == "ok" and "CUDA 12.4 build" in ok.detail


def test_module_check_reports_version_or_absence() -> None:
    import importlib.metadata

    c = check_module("click", "click", need="warn", why="x", fix="y")
    assert (c.status, c.detail) == ("ok", f"click {importlib.metadata.version('click')}")
    gone = check_module("provision_no_such_module", "nothing", need="warn", why="needed to serve", fix="pip it")
    assert (gone.status, gone.fix) == ("warn", "pip it") and "needed to serve" in gone.detail
