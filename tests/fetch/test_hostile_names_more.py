"""Names that would cost a user: a torrent path no filesystem can create (exit 5, before anything is
written), terminal escape sequences in names (escaped in the error line), an `--include` that
matches nothing (exit 4, one line)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from provision.cli.main import run_cli
from provision.errors import HostileContentError, UsageError, printable
from provision.testing.hub_server import LoopbackHub
from provision.testing.tiny import TINY_REPO
from tests.support.cli import cli_json, provision_home

ESC = "\x1b[2J"


def v1_torrent(path: Path, parts: list[bytes], name: bytes = b"model") -> Path:
    import libtorrent as lt

    data = b"x" * 1000
    info = {b"name": name, b"piece length": 16384, b"pieces": hashlib.sha1(data).digest(),
            b"files": [{b"length": len(data), b"path": parts}]}
    path.write_bytes(lt.bencode({b"info": info}))
    return path


@pytest.mark.parametrize(("parts", "why"), [
    ([b"a" * 256], "256-byte name: NAME_MAX is 255"),
    ([b"d" * 200] * 18 + [b"f"], "18 x 201 + 1 + 'model/' = 3625 bytes, over 4096 - 512 = 3584"),
])
def test_a_torrent_path_no_filesystem_can_create_is_exit_5_before_anything_is_written(
        parts: list[bytes], why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = v1_torrent(tmp_path / "long.torrent", parts)
    dest = tmp_path / "dest"
    code, doc, err = cli_json(capsys, "fetch", str(t), "--dest", str(dest), "--network", "closed",
                              "--stall-timeout", "2")
    assert code == 5, (why, err)
    assert "Refusing the torrent" in doc["error"]["message"] and "Traceback" not in err
    assert not dest.exists() and not (provision_home() / "staging").exists()


def test_a_v2_file_tree_path_over_the_limit_is_refused() -> None:
    import libtorrent as lt

    from provision.stages.fetch.torrent import check_info_names

    tree: dict[bytes, Any] = {b"f.dat": {b"": {b"length": 1}}}
    for _ in range(18):  # 'model' + 18 x '/<200 bytes>' + '/f.dat' = 5 + 3618 + 6 = 3629 bytes, over 3584
        tree = {b"d" * 200: tree}
    with pytest.raises(HostileContentError):
        check_info_names(lt.bencode({b"name": b"model", b"piece length": 16384, b"meta version": 2,
                                     b"file tree": tree}))
    # 'model' + 17 x '/<200 bytes>' + '/f.dat' = 5 + 3417 + 6 = 3428 bytes, fine; with a 200-byte file
    # name at the end 5 + 3417 + 201 = 3623, over 3584: the file's own name counts
    ok: dict[bytes, Any] = {b"f.dat": {b"": {b"length": 1}}}
    long_leaf: dict[bytes, Any] = {b"f" * 200: {b"": {b"length": 1}}}
    for _ in range(17):
        ok, long_leaf = {b"d" * 200: ok}, {b"d" * 200: long_leaf}
    check_info_names(lt.bencode({b"name": b"model", b"piece length": 16384, b"meta version": 2, b"file tree": ok}))
    with pytest.raises(HostileContentError):
        check_info_names(lt.bencode({b"name": b"model", b"piece length": 16384, b"meta version": 2,
                                     b"file tree": long_leaf}))


def test_printable_escapes_control_characters_and_keeps_the_rest() -> None:
    assert printable(f"layers.0{ESC}.weight\n") == "layers.0\\x1b[2J.weight\\x0a"
    assert printable("ünïcode/ok.safetensors") == "ünïcode/ok.safetensors"
    assert str(UsageError(f"bad {ESC}", hint=f"see {ESC}")) == "bad \\x1b[2J see \\x1b[2J"


def test_a_file_name_with_an_escape_sequence_reaches_the_terminal_escaped(
        hub: LoopbackHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "w.dat"
    src.write_bytes(b"w" * 100)
    hub.add_repo("provision/esc", {f"we{ESC}ird.dat": src})
    capsys.readouterr()
    rc = run_cli(["fetch", "hf://provision/esc", "--include", "*.bin", "--dest", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc in (4, 5), err  # matches nothing (4), or refused as a hostile name (5): named either way
    assert "\x1b" not in err
    assert "we\\x1b[2Jird.dat" in err


def test_a_tensor_name_with_an_escape_sequence_reaches_the_terminal_escaped(
        tiny_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import struct

    st = tiny_copy / "consolidated.safetensors"
    raw = st.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[f"{name}{ESC}"] = header.pop(name)  # an unknown tensor, its name carrying a screen clear
    body = json.dumps(header).encode()
    body += b" " * ((8 - len(body) % 8) % 8)
    st.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    capsys.readouterr()
    rc = run_cli(["verify", str(tiny_copy)])
    cap = capsys.readouterr()
    assert rc != 0
    assert "\x1b" not in cap.err and "\x1b" not in cap.out
    assert "\\x1b[2J" in cap.err + cap.out


def test_include_matching_nothing_is_exit_4_with_one_line(hub: LoopbackHub, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, err = cli_json(capsys, "fetch", f"hf://{TINY_REPO}", "--include", "*.bin", "--dest",
                              str(tmp_path / "d"))
    assert code == 4, err
    assert "matches --include *.bin" in doc["error"]["message"]
    assert not (tmp_path / "d").exists()
    assert not [r for r in hub.requests if "/resolve/" in r.path]


def test_a_magnet_with_two_different_btih_is_exit_2_and_the_same_twice_is_fine() -> None:
    from provision.formats.sources import parse_magnet

    a, b = "a" * 40, "b" * 40
    with pytest.raises(UsageError) as e:
        parse_magnet(f"magnet:?xt=urn:btih:{a}&xt=urn:btih:{b}")
    assert e.value.exit_code == 2 and a in str(e.value) and b in str(e.value)
    assert parse_magnet(f"magnet:?xt=urn:btih:{a}&xt.1=urn:btih:{a.upper()}").btih == a
    with pytest.raises(UsageError):
        parse_magnet(f"magnet:?xt=urn:btmh:1220{'c' * 64}&xt.2=urn:btmh:1220{'d' * 64}")
