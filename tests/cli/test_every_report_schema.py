"""Every command's real --json output, on success and on failure, validates against the schema
shipped for that command (and `provision schema COMMAND` prints that same schema)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from provision.formats.report_schema import REPORT_SCHEMAS, bundled_schema, validate_report
from tests.support.cli import cli_json

Case = Callable[[pytest.FixtureRequest, Path], list[str]]


def _tiny(req: pytest.FixtureRequest) -> Path:
    p: Path = req.getfixturevalue("tiny_src")
    return p


def _copy(req: pytest.FixtureRequest, tmp: Path) -> Path:
    dst = tmp / "copy"
    shutil.copytree(_tiny(req), dst)
    return dst


def _flipped(req: pytest.FixtureRequest, tmp: Path) -> Path:
    from tests.support.files import data_offset, flip_byte

    d = _copy(req, tmp)
    w = d / "consolidated.safetensors"
    flip_byte(w, data_offset(w) + 1000)  # one tensor byte: the manifest's sha256 no longer matches
    return d


def _adopted(req: pytest.FixtureRequest, tmp: Path) -> None:
    from provision.cli.main import run_cli

    t = _tiny(req)
    assert run_cli(["run", str(t / "manifest.toml"), "--adopt", str(t), "--skip-convert", "--skip-smoke", "-q"]) == 0


def _pickle_src(req: pytest.FixtureRequest) -> Path:
    p: Path = req.getfixturevalue("tiny_7b_pickle")
    return p


def _hub_repo(req: pytest.FixtureRequest, repo: str) -> str:
    req.getfixturevalue("hub")
    return f"hf://provision/{repo}"


def _ls_ok(req: pytest.FixtureRequest, tmp: Path) -> list[str]:
    _adopted(req, tmp)
    return ["ls"]


def _rm_ok(req: pytest.FixtureRequest, tmp: Path) -> list[str]:
    _adopted(req, tmp)
    return ["rm", "tiny-pixtral", "--yes"]


def _lock_ok(req: pytest.FixtureRequest, tmp: Path) -> list[str]:
    m = tmp / "m.toml"
    shutil.copy(_tiny(req) / "manifest.toml", m)
    return ["manifest", "lock", str(_tiny(req)), "--manifest", str(m)]


def _lock_bad(req: pytest.FixtureRequest, tmp: Path) -> list[str]:
    d = _flipped(req, tmp)
    return ["manifest", "lock", str(d), "--manifest", str(d / "manifest.toml")]


def _import_ok(req: pytest.FixtureRequest, tmp: Path) -> list[str]:
    src = _pickle_src(req)
    return ["import-pickle", str(src), "--out", str(tmp / "st"), "--manifest", str(src / "manifest.toml")]


def _smoke_bad(req: pytest.FixtureRequest, tmp: Path) -> list[str]:
    g = tmp / "golden.json"
    g.write_text(json.dumps([1, 2, 3]))  # ids the model does not generate: the golden check fails
    return ["smoke", str(_tiny(req)), "--device", "cpu", "--golden", str(g)]


def _doctor_bad(req: pytest.FixtureRequest, tmp: Path) -> list[str]:
    mp: pytest.MonkeyPatch = req.getfixturevalue("monkeypatch")
    mp.setattr("provision.cli.diagnose.DISK_FAIL_BYTES", 10**30)  # no disk is that large: the disk check fails
    return ["doctor", "--offline"]


def _exported(req: pytest.FixtureRequest, tmp: Path) -> Path:
    """A bundle of the tiny model's original, exported from a store of its own under ``tmp``."""
    from provision.cli.main import run_cli

    t, src = _tiny(req), str(tmp / "src")
    assert run_cli(["run", str(t / "manifest.toml"), "--adopt", str(t), "--skip-convert", "--skip-smoke", "-q",
                    "--home", src]) == 0
    assert run_cli(["bundle", "export", "tiny-pixtral", str(tmp / "b"), "--home", src, "--manifest",
                    str(t / "manifest.toml"), "-q"]) == 0
    return tmp / "b"


def _bundle_export_ok(req: pytest.FixtureRequest, tmp: Path) -> list[str]:
    _adopted(req, tmp)
    return ["bundle", "export", "tiny-pixtral", str(tmp / "b"), "--manifest", str(_tiny(req) / "manifest.toml")]


def _bundle_flipped(req: pytest.FixtureRequest, tmp: Path) -> list[str]:
    from tests.support.files import data_offset, flip_byte

    w = _exported(req, tmp) / "original" / "consolidated.safetensors"
    flip_byte(w, data_offset(w) + 1000)  # one tensor byte: bundle.json's sha256 no longer matches
    return ["bundle", "import", str(tmp / "b")]


def _signed(req: pytest.FixtureRequest, tmp: Path, signer: str) -> list[str]:
    """A copy of the tiny model signed by ``signer``'s key; the verify argv against the publisher's key."""
    from provision.stages.sign import sign_folder
    from tests.trust.keys import ec_keypair

    d = _copy(req, tmp)
    priv, pub = ec_keypair(tmp, "publisher")
    if signer != "publisher":
        priv, _ = ec_keypair(tmp, signer)
    sign_folder(d, private_key=priv, signature=tmp / "s.sig")
    return ["verify", str(d), "--signature", str(tmp / "s.sig"), "--public-key", str(pub)]


def _sign_ok(req: pytest.FixtureRequest, tmp: Path) -> list[str]:
    from tests.trust.keys import ec_keypair

    priv, _ = ec_keypair(tmp, "publisher")
    return ["sign", str(_copy(req, tmp)), "--key", str(priv), "--signature", str(tmp / "s.sig")]


def _a_file(tmp: Path) -> str:
    f = tmp / "a-file"
    f.write_text("x")
    return str(f)


# (command, case id, argv builder, expected exit code)
CASES: list[tuple[str, str, Case, int]] = [
    ("tiny", "ok", lambda r, t: ["tiny", str(t / "t")], 0),
    ("tiny", "pickle-for-pixtral", lambda r, t: ["tiny", str(t / "t"), "--pickle"], 2),
    ("ls", "ok", _ls_ok, 0),
    ("ls", "home-is-a-file", lambda r, t: ["ls", "--home", _a_file(t)], 2),
    ("plan", "ok", lambda r, t: ["plan", str(_tiny(r) / "manifest.toml"), "--offline", "--target", "cpu"], 0),
    ("plan", "unknown-manifest", lambda r, t: ["plan", "no-such-model", "--offline"], 3),
    ("manifest show", "ok", lambda r, t: ["manifest", "show", str(_tiny(r) / "manifest.toml")], 0),
    ("manifest show", "missing", lambda r, t: ["manifest", "show", str(t / "missing.toml")], 3),
    ("manifest lock", "ok", _lock_ok, 0),
    ("manifest lock", "hash-mismatch", _lock_bad, 5),
    ("verify", "ok", lambda r, t: ["verify", str(_tiny(r)), "--manifest", str(_tiny(r) / "manifest.toml")], 0),
    ("verify", "hash-mismatch", lambda r, t: ["verify", str(d := _flipped(r, t)), "--manifest",
                                              str(d / "manifest.toml")], 5),
    ("verify", "signature-ok", lambda r, t: _signed(r, t, "publisher"), 0),
    ("verify", "signature-by-another-key", lambda r, t: _signed(r, t, "mallory"), 5),
    ("sign", "ok", _sign_ok, 0),
    ("sign", "signature-inside-the-folder", lambda r, t: ["sign", str(d := _copy(r, t)), "--key", _a_file(t),
                                                          "--signature", str(d / "s.sig")], 2),
    ("convert", "ok", lambda r, t: ["convert", str(_tiny(r)), "--out", str(t / "c"), "--target", "cpu",
                                    "--scheme", "bf16", "--no-compare"], 0),
    ("convert", "scheme-the-target-cannot-run", lambda r, t: ["convert", str(_tiny(r)), "--out", str(t / "c"),
                                                              "--target", "t4", "--scheme", "fp8"], 3),
    ("smoke", "ok", lambda r, t: ["smoke", str(_tiny(r)), "--device", "cpu"], 0),
    ("smoke", "golden-mismatch", _smoke_bad, 8),
    ("seed", "ok", lambda r, t: ["seed", str(_tiny(r)), "--network", "closed", "--seed-for", "0",
                                 "--torrent-out", str(t / "t.torrent")], 0),
    ("seed", "missing-folder", lambda r, t: ["seed", str(t / "missing"), "--network", "closed", "--seed-for", "0"],
     2),
    ("import-pickle", "ok", _import_ok, 0),
    ("import-pickle", "wrong-sha256", lambda r, t: ["import-pickle", str(_pickle_src(r)), "--out", str(t / "st"),
                                                    "--sha256", "0" * 64], 5),
    ("fetch", "ok", lambda r, t: ["fetch", _hub_repo(r, "tiny-pixtral"), "--dest", str(t / "d")], 0),
    ("fetch", "no-such-repo", lambda r, t: ["fetch", _hub_repo(r, "no-such-repo"), "--dest", str(t / "d")], 4),
    ("gc", "ok", lambda r, t: ["gc", "--dry-run"], 0),
    ("gc", "home-is-a-file", lambda r, t: ["gc", "--home", _a_file(t)], 2),
    ("rm", "ok", _rm_ok, 0),
    ("rm", "unknown-model", lambda r, t: ["rm", "no-such-model", "--yes"], 2),
    ("doctor", "ok", lambda r, t: ["doctor", "--offline"], 0),
    ("doctor", "a-failed-check", _doctor_bad, 1),
    ("schema", "ok", lambda r, t: ["schema", "verify"], 0),
    ("schema", "unknown-command", lambda r, t: ["schema", "no-such-command"], 2),
    ("bundle export", "ok", _bundle_export_ok, 0),
    ("bundle export", "out-exists", lambda r, t: ["bundle", "export", "tiny-pixtral", _a_file(t)], 2),
    ("bundle import", "ok", lambda r, t: ["bundle", "import", str(_exported(r, t))], 0),
    ("bundle import", "changed-byte", _bundle_flipped, 5),
    ("run", "ok", lambda r, t: ["run", str(_tiny(r) / "manifest.toml"), "--adopt", str(_tiny(r)),
                                "--target", "cpu"], 0),
    ("run", "hash-mismatch", lambda r, t: ["run", str(_tiny(r) / "manifest.toml"), "--adopt",
                                           str(_flipped(r, t))], 5),
]


def test_every_command_with_a_schema_has_a_success_and_a_failure_case() -> None:
    cmds = {c for c, _, _, _ in CASES}
    assert cmds == set(REPORT_SCHEMAS) - {"provision"}
    for c in cmds:
        codes = {code for cc, _, _, code in CASES if cc == c}
        assert 0 in codes and any(code != 0 for code in codes), c


SLOW = {("tiny", "ok"), ("smoke", "ok"), ("import-pickle", "ok")}  # over 3 s each


@pytest.mark.parametrize(("command", "case", "build", "code"), [
    pytest.param(*c, id=f"{c[0]}-{c[1]}", marks=[pytest.mark.slow] if (c[0], c[1]) in SLOW else [])
    for c in CASES])
def test_real_report_validates_against_its_commands_schema(command: str, case: str, build: Case, code: int,
                                                           request: pytest.FixtureRequest, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    argv = build(request, tmp_path)
    rc, doc, err = cli_json(capsys, *argv)
    assert rc == code, err
    assert doc["command"] == command and doc["exit_code"] == code and doc["ok"] is (code == 0)
    validate_report(doc, command)
    if code:
        assert doc["error"]["exit_code"] == code


def test_schema_command_prints_the_bundled_schema_that_validation_uses(capsys: pytest.CaptureFixture[str]) -> None:
    from jsonschema import Draft202012Validator

    for cmd in REPORT_SCHEMAS:
        capsys.readouterr()
        from provision.cli.main import run_cli

        assert run_cli(["schema", *cmd.split()]) == 0
        printed: dict[str, Any] = json.loads(capsys.readouterr().out)
        assert printed == bundled_schema(cmd), cmd
        Draft202012Validator.check_schema(printed)


def test_a_report_of_one_command_does_not_pass_as_another(tiny_src: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc, _ = cli_json(capsys, "verify", str(tiny_src))
    assert rc == 0
    validate_report(doc)
    doc["command"] = "seed"  # a verify report claiming to be a seed report lacks the seed object
    with pytest.raises(ValueError, match=r"seed report invalid at \$: 'seed' is a required property"):
        validate_report(doc)


def test_module_validator_accepts_a_smoke_report(tiny_src: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from provision.formats.report_schema import main

    rc, doc, _ = cli_json(capsys, "smoke", str(tiny_src), "--device", "cpu")
    assert rc == 0
    saved = tmp_path / "smoke.json"
    saved.write_text(json.dumps(doc))
    assert main([str(saved)]) == 0
    assert "smoke report valid" in capsys.readouterr().err
