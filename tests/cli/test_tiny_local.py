"""`provision tiny OUT` writes a manifest whose only source is OUT itself (``type = "local"``), and
`provision run OUT/manifest.toml` takes the files in without any network; a local source is verified
like any other (a changed file is exit 5, nothing committed) and `--source local` needs one."""

from __future__ import annotations

import hashlib
import shutil
import socket
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from provision.cli.main import run_cli
from provision.formats.manifest import Source, load_manifest, write_manifest
from provision.layout import Layout
from tests.support.cli import cli_json, provision_home

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TINY_FILES = {"consolidated.safetensors", "params.json", "tekken.json"}


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record (and refuse) every name lookup and every connect the test's process attempts."""
    attempts: list[Any] = []

    def lookup(*args: Any, **kwargs: Any) -> Any:
        attempts.append(("getaddrinfo", args[:2]))
        raise socket.gaierror(socket.EAI_NONAME, "name lookups are refused in this test")

    def connect(self: socket.socket, address: Any) -> None:
        attempts.append(("connect", address))
        raise OSError("connections are refused in this test")

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    return attempts


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.slow
def test_tiny_then_run_its_manifest_works_with_no_network_request_and_passes_the_smoke_test(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, no_network: list[Any]
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.example.invalid")  # any Hub request would fail
    out = tmp_path / "t"
    rc, doc, err = cli_json(capsys, "tiny", str(out))
    assert rc == 0, err
    written = tomllib.loads((out / "manifest.toml").read_text())
    assert written["sources"] == [{"type": "local", "path": "."}]  # no hf, no torrent source
    rc, doc, err = cli_json(capsys, "run", str(out / "manifest.toml"), "--target", "cpu", "--scheme", "bf16")
    assert rc == 0, err
    stages = {s["stage"]: s for s in doc["stages"]}
    assert stages["fetch"]["result"] == "ok" and stages["fetch"]["details"]["how"] == "local"
    assert stages["smoke"]["result"] == "ok"
    assert doc["plan"]["sources"] == [f"local folder {out}"]
    original = Layout(provision_home()).original("tiny-pixtral")
    assert {p.name for p in original.iterdir()} >= TINY_FILES
    assert all(_sha256(original / n) == _sha256(out / n) for n in TINY_FILES)
    assert no_network == []


def test_every_tiny_kind_writes_only_a_local_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for kind in ("pixtral", "mistral-7b", "mistral-nemo", "mixtral", "pixtral-large"):
        assert run_cli(["tiny", str(tmp_path / kind), "--kind", kind]) == 0, kind
        sources = tomllib.loads((tmp_path / kind / "manifest.toml").read_text())["sources"]
        assert sources == [{"type": "local", "path": "."}], kind


@pytest.fixture()
def local_tiny(tiny_src: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint whose manifest names its own folder as the only source."""
    out = tmp_path / "local-tiny"
    shutil.copytree(tiny_src, out)
    m = load_manifest(out / "manifest.toml")
    write_manifest(replace(m, sources=(Source(type="local", path="."),)), out / "manifest.toml")
    return out


def test_a_changed_file_in_a_local_source_is_exit_5_and_nothing_is_committed(
    local_tiny: Path, capsys: pytest.CaptureFixture[str], no_network: list[Any]
) -> None:
    p = local_tiny / "params.json"
    raw = bytearray(p.read_bytes())
    raw[raw.index(b"64")] = ord("9")  # "dim": 64 -> 94: same size, other bytes
    p.write_bytes(bytes(raw))
    rc, doc, err = cli_json(capsys, "run", str(local_tiny / "manifest.toml"), "--target", "cpu", "--scheme", "bf16")
    assert rc == 5, err
    assert "params.json" in doc["error"]["message"]
    original = Layout(provision_home()).original("tiny-pixtral")
    assert not original.exists() or not any(original.iterdir())  # not even the files that did match
    assert _sha256(p) == hashlib.sha256(bytes(raw)).hexdigest()  # the source folder is left as it was
    assert no_network == []


def test_a_local_source_missing_a_file_is_a_fetch_failure_naming_it(
    local_tiny: Path, capsys: pytest.CaptureFixture[str], no_network: list[Any]
) -> None:
    (local_tiny / "tekken.json").unlink()
    rc, doc, err = cli_json(capsys, "fetch", str(local_tiny / "manifest.toml"), "--dest", str(local_tiny.parent / "d"))
    assert rc == 4, err
    assert "tekken.json" in doc["error"]["message"]
    assert not (local_tiny.parent / "d").exists()


def test_auto_takes_a_local_source_before_an_hf_source_listed_first(
    tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    no_network: list[Any]
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.example.invalid")
    hf_only = load_manifest(tiny_src / "manifest.toml")
    assert [s.type for s in hf_only.sources] == ["hf"]  # the tests' tiny manifest
    m = tmp_path / "both.toml"  # the hf source first, then the checkpoint's folder
    write_manifest(replace(hf_only, sources=(*hf_only.sources, Source(type="local", path=str(tiny_src)))), m)
    assert [s["type"] for s in tomllib.loads(m.read_text())["sources"]] == ["hf", "local"]
    rc, doc, err = cli_json(capsys, "fetch", str(m), "--dest", str(tmp_path / "d"))
    assert rc == 0, err
    assert doc["fetch"]["source"] == "local" and doc["fetch"]["attempts"] == []
    assert {f["path"] for f in doc["fetch"]["files"]} == TINY_FILES
    assert no_network == []


def test_source_local_on_a_manifest_without_one_is_a_one_line_error(
    tiny_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    rc = run_cli(["fetch", str(tiny_src / "manifest.toml"), "--source", "local", "--dest", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 3
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "has no local source" in lines[0] and "(it has hf)" in lines[0], err
    assert not (tmp_path / "d").exists()
