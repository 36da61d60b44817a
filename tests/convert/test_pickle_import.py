"""Safe import of a pickled release (Mistral 7B's torrent ships ``consolidated.00.pth``).

Pickles stay refused by default (manifest, verify, loader); ``provision import-pickle`` checks the
release's hash first, loads with ``torch.load(weights_only=True, mmap=True)`` in a separate
process and keeps only safetensors. Hostile pickles (``__reduce__`` -> ``os.system``) must be
refused without running, leaving nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from provision.cli.main import run_cli
from provision.errors import (
    ConvertError,
    HashMismatchError,
    HostileContentError,
    ManifestError,
    ParamsError,
    StructureError,
    UsageError,
)
from provision.io.atomic import TMP_PREFIX
from provision.stages import pickle_import
from provision.stages.pickle_import import import_pickle

PICKLE_NAME = "consolidated.00.pth"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes(), usedforsecurity=False).hexdigest()


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(TMP_PREFIX))


class _Payload:
    """Unpickling this runs ``touch <marker>`` (what a hostile release would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _hostile_release(folder: Path, marker: Path, params_from: Path, *, fmt: str) -> Path:
    folder.mkdir()
    shutil.copy(params_from / "params.json", folder / "params.json")
    evil = {"tok_embeddings.weight": _Payload(marker)}
    if fmt == "raw":
        (folder / PICKLE_NAME).write_bytes(pickle.dumps(evil))
    else:  # torch.save's zip container, pickling the payload inside data.pkl
        torch.save(evil, folder / PICKLE_NAME)
    return folder / PICKLE_NAME


def test_the_payload_used_below_really_runs_when_plainly_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))  # proves the payload is live (our own bytes)
    assert marker.exists()


# ---------------------------------------------------------------------------------------
# refused by default


def test_pickles_are_refused_by_the_loader_verify_and_manifests_without_the_option(tiny_7b_pickle: Path) -> None:
    from provision.formats.manifest import parse_manifest_bytes
    from provision.model.loader import load_model
    from provision.stages.verify import verify_dir

    with pytest.raises(HostileContentError, match="pickle"):
        load_model(tiny_7b_pickle)
    rep = verify_dir(tiny_7b_pickle)
    assert not rep.ok and rep.file(PICKLE_NAME) is not None and rep.file(PICKLE_NAME).status == "refused"  # type: ignore[union-attr]
    text = (tiny_7b_pickle / "manifest.toml").read_text().replace("pickle = true\n", "")
    with pytest.raises(ManifestError, match="pickle format"):
        parse_manifest_bytes(text.encode())


def test_without_a_release_hash_the_pickle_is_not_imported(tiny_7b_pickle: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="needs the release's hash"):
        import_pickle(tiny_7b_pickle, tmp_path / "out")
    assert run_cli(["import-pickle", str(tiny_7b_pickle), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("bad", ["abc", "g" * 64, "0" * 63])
def test_a_malformed_sha256_is_a_usage_error(bad: str, tiny_7b_pickle: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="64 hex"):
        import_pickle(tiny_7b_pickle, tmp_path / "out", sha256=bad)


def test_a_manifest_pickle_entry_must_be_optional_and_a_pickle_name() -> None:
    from provision.formats.manifest import parse_manifest_bytes

    base = ('schema_version = 1\nname = "m"\narchitecture = "mistral"\nformat = "mistral"\n'
            '[[sources]]\ntype = "torrent"\nmagnet = "magnet:?xt=urn:btih:208b101a0f51514ecf285885a8b0f6fb1a1e4d7d"\n')
    ok = parse_manifest_bytes((base + '[[files]]\npath = "consolidated.00.pth"\noptional = true\npickle = true\n').encode())
    assert ok.files[0].pickle
    with pytest.raises(ManifestError, match="must be optional"):
        parse_manifest_bytes((base + '[[files]]\npath = "consolidated.00.pth"\npickle = true\n').encode())
    with pytest.raises(ManifestError, match="not a pickle file name"):
        parse_manifest_bytes((base + '[[files]]\npath = "params.json"\noptional = true\npickle = true\n').encode())


# ---------------------------------------------------------------------------------------
# the import


def test_a_pickled_checkpoint_is_imported_and_equals_the_original_tensors(tiny_7b_pickle: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    src = tiny_7b_pickle / PICKLE_NAME
    res = import_pickle(tiny_7b_pickle, tmp_path / "out", sha256=_sha(src))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.safetensors", "import.json", "params.json",
                                                     "tokenizer.model"]
    original = torch.load(src, weights_only=True)  # our own test file
    imported = load_file(str(out / "consolidated.safetensors"))
    assert list(imported) != [] and set(imported) == set(original)
    for k, v in original.items():
        assert imported[k].dtype == v.dtype and torch.equal(imported[k], v), k
    assert res.tensors == len(original) and res.dtypes == {"BF16": len(original)}
    assert res.source_sha256 == _sha(src) and _leftovers(tmp_path) == []


def test_the_import_ran_in_another_process_and_records_its_provenance(tiny_7b_pickle: Path, tmp_path: Path) -> None:
    src = tiny_7b_pickle / PICKLE_NAME
    import_pickle(tiny_7b_pickle, tmp_path / "out", sha256=_sha(src))
    rec = json.loads((tmp_path / "out" / "import.json").read_text())
    assert rec["child"]["pid"] != os.getpid()
    assert rec["source_sha256"] == _sha(src) and rec["checked_against"] == "sha256"
    assert rec["files"]["consolidated.safetensors"]["sha256"] == _sha(tmp_path / "out" / "consolidated.safetensors")


def test_the_imported_model_equals_the_safetensors_release_verifies_and_smokes(
        tiny_7b_pickle: Path, tiny_7b: Path, tmp_path: Path) -> None:
    from provision.model.loader import load_model
    from provision.stages.smoke import smoke
    from provision.stages.verify import verify_dir

    out = tmp_path / "out"
    res = import_pickle(tiny_7b_pickle, out, sha256=_sha(tiny_7b_pickle / PICKLE_NAME))
    assert res.rope_theta_added
    params = json.loads((out / "params.json").read_text())
    assert params["rope_theta"] == 10000.0 and params["sliding_window"] == 8
    assert verify_dir(out).ok
    toks = torch.tensor([[1, 733, 16289, 28793, 22557, 1526, 733, 28748, 16289, 28793, 5, 6, 7]])
    with torch.no_grad():
        a = load_model(out, dtype=torch.float32)[0](toks)
        b = load_model(tiny_7b, dtype=torch.float32)[0](toks)
    assert torch.equal(a, b)
    assert smoke(out, device="cpu", max_tokens=3).passed


def test_keep_params_copies_params_json_byte_for_byte(tiny_7b_pickle: Path, tmp_path: Path) -> None:
    res = import_pickle(tiny_7b_pickle, tmp_path / "out", sha256=_sha(tiny_7b_pickle / PICKLE_NAME),
                        explicit_rope=False)
    assert not res.rope_theta_added
    assert (tmp_path / "out" / "params.json").read_bytes() == (tiny_7b_pickle / "params.json").read_bytes()


def test_the_release_md5_is_accepted_when_that_is_what_is_published(tiny_7b_pickle: Path, tmp_path: Path) -> None:
    res = import_pickle(tiny_7b_pickle / PICKLE_NAME, tmp_path / "out", md5=_md5(tiny_7b_pickle / PICKLE_NAME))
    assert res.authority == "md5" and res.source_md5 == _md5(tiny_7b_pickle / PICKLE_NAME)


# ---------------------------------------------------------------------------------------
# refused: wrong hash, hostile, mismatched, crashed


@pytest.mark.parametrize("which", ["sha256", "md5"])
def test_a_pickle_with_the_wrong_hash_is_refused_before_loading(which: str, tiny_7b_pickle: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("the loader ran although the hash did not match")

    monkeypatch.setattr(pickle_import, "_run_child", never)
    kw = {"sha256": "0" * 64} if which == "sha256" else {"md5": "0" * 32}
    with pytest.raises(HashMismatchError, match="it was not loaded") as ei:
        import_pickle(tiny_7b_pickle, tmp_path / "out", **kw)  # type: ignore[arg-type]
    assert ei.value.exit_code == 5
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_the_cli_exits_5_on_a_wrong_hash_and_writes_nothing(tiny_7b_pickle: Path, tmp_path: Path, capsys: Any) -> None:
    code = run_cli(["import-pickle", str(tiny_7b_pickle), "--out", str(tmp_path / "out"), "--sha256", "a" * 64,
                    "--json"])
    assert code == 5
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["exit_code"] == 5 and "it was not loaded" in doc["error"]["message"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["raw", "torch-zip"])
def test_a_hostile_pickle_is_refused_by_weights_only_and_never_runs(fmt: str, tiny_7b: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    evil = _hostile_release(tmp_path / "release", marker, tiny_7b, fmt=fmt)
    with pytest.raises(HostileContentError, match=r"weights_only=True\) refused") as ei:
        import_pickle(evil.parent, tmp_path / "out", sha256=_sha(evil))  # the hash matches: only the loader stops it
    assert ei.value.exit_code == 5
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_the_cli_refuses_a_hostile_pickle_with_exit_5(tiny_7b: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    evil = _hostile_release(tmp_path / "release", marker, tiny_7b, fmt="torch-zip")
    assert run_cli(["import-pickle", str(evil), "--out", str(tmp_path / "out"), "--sha256", _sha(evil)]) == 5
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_tensors_that_do_not_match_params_json_are_refused(tiny_7b_pickle: Path, tmp_path: Path) -> None:
    rel = tmp_path / "rel"
    shutil.copytree(tiny_7b_pickle, rel)
    params = json.loads((rel / "params.json").read_text())
    params["n_layers"] = 3
    (rel / "params.json").write_text(json.dumps(params))
    with pytest.raises(StructureError, match="9 tensors missing"):
        import_pickle(rel, tmp_path / "out", sha256=_sha(rel / PICKLE_NAME))
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_a_pickle_that_is_not_a_state_dict_is_refused(tiny_7b_pickle: Path, tmp_path: Path) -> None:
    rel = tmp_path / "rel"
    rel.mkdir()
    shutil.copy(tiny_7b_pickle / "params.json", rel / "params.json")
    torch.save([torch.zeros(2)], rel / PICKLE_NAME)
    with pytest.raises(StructureError, match="not a \\{name: tensor\\} dict"):
        import_pickle(rel, tmp_path / "out", sha256=_sha(rel / PICKLE_NAME))


def test_a_loader_process_that_dies_takes_nothing_else_with_it(tiny_7b_pickle: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pickle_import, "_child_command", lambda _a: [
        sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    with pytest.raises(ConvertError, match="died \\(SIGKILL\\)") as ei:
        import_pickle(tiny_7b_pickle, tmp_path / "out", sha256=_sha(tiny_7b_pickle / PICKLE_NAME))
    assert ei.value.exit_code == 7
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_a_loader_process_past_its_timeout_is_killed(tiny_7b_pickle: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pickle_import, "_child_command", lambda _a: [sys.executable, "-c", "import time; time.sleep(60)"])
    with pytest.raises(ConvertError, match="ran past 1 s"):
        import_pickle(tiny_7b_pickle, tmp_path / "out", sha256=_sha(tiny_7b_pickle / PICKLE_NAME), timeout=1.0)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------
# arguments


def test_a_non_empty_out_folder_is_refused_and_left_alone(tiny_7b_pickle: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        import_pickle(tiny_7b_pickle, out, sha256=_sha(tiny_7b_pickle / PICKLE_NAME))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_missing_params_json_is_a_params_error(tiny_7b_pickle: Path, tmp_path: Path) -> None:
    rel = tmp_path / "rel"
    rel.mkdir()
    shutil.copy(tiny_7b_pickle / PICKLE_NAME, rel / PICKLE_NAME)
    with pytest.raises(ParamsError, match=r"params\.json not found") as ei:
        import_pickle(rel, tmp_path / "out", sha256=_sha(rel / PICKLE_NAME))
    assert ei.value.exit_code == 3


def test_a_folder_with_two_pickles_asks_which_one(tmp_path: Path) -> None:
    (tmp_path / "a.pth").write_bytes(b"x")
    (tmp_path / "b.pt").write_bytes(b"y")
    with pytest.raises(UsageError, match="2 pickle files"):
        pickle_import.find_pickle(tmp_path)
    (tmp_path / "c.txt").write_bytes(b"")
    with pytest.raises(UsageError, match="not a pickle file"):
        pickle_import.find_pickle(tmp_path / "c.txt")
    with pytest.raises(UsageError, match="does not exist"):
        pickle_import.find_pickle(tmp_path / "nope")


def test_the_cli_takes_the_sha256_from_a_manifest_that_pins_it(tiny_7b_pickle: Path, tmp_path: Path,
                                                               capsys: Any) -> None:
    code = run_cli(["import-pickle", str(tiny_7b_pickle), "--out", str(tmp_path / "out"), "--manifest",
                    str(tiny_7b_pickle / "manifest.toml"), "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["source_sha256"] == _sha(tiny_7b_pickle / PICKLE_NAME)
    assert {f["path"] for f in doc["files"]} == {"consolidated.safetensors", "params.json", "tokenizer.model"}


def test_the_cli_refuses_a_manifest_that_pins_no_hash_for_the_pickle(tiny_7b_pickle: Path, tmp_path: Path) -> None:
    assert run_cli(["import-pickle", str(tiny_7b_pickle), "--out", str(tmp_path / "out"),
                    "--manifest", "mistral-7b-v0.1"]) == 3
    assert not (tmp_path / "out").exists()


def test_params_can_come_from_elsewhere_and_keep_params_keeps_its_bytes(tiny_7b_pickle: Path, tmp_path: Path) -> None:
    rel = tmp_path / "rel"
    rel.mkdir()
    shutil.copy(tiny_7b_pickle / PICKLE_NAME, rel / PICKLE_NAME)
    params = tmp_path / "elsewhere.json"
    shutil.copy(tiny_7b_pickle / "params.json", params)
    code = run_cli(["import-pickle", str(rel / PICKLE_NAME), "--out", str(tmp_path / "out"), "--sha256",
                    _sha(rel / PICKLE_NAME), "--params", str(params), "--keep-params"])
    assert code == 0
    assert (tmp_path / "out" / "params.json").read_bytes() == params.read_bytes()
    assert not (tmp_path / "out" / "tokenizer.model").exists()  # none beside the pickle: none copied


def test_the_importing_process_itself_never_imports_torch(tiny_7b_pickle: Path, tmp_path: Path) -> None:
    import subprocess

    code = ("import sys; from pathlib import Path; from provision.stages.pickle_import import import_pickle; "
            f"import_pickle(Path({str(tiny_7b_pickle)!r}), Path({str(tmp_path / 'out')!r}), "
            f"sha256={_sha(tiny_7b_pickle / PICKLE_NAME)!r}); print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
    assert (tmp_path / "out" / "consolidated.safetensors").is_file()


# ---------------------------------------------------------------------------------------
# more bad input: globals outside the allow-list, truncated, escaping zip members, limits


class _NotATensor:
    """A custom class: pickled as a global weights_only does not allow."""


def _release_with(folder: Path, params_from: Path, obj: Any, **save: Any) -> Path:
    folder.mkdir()
    shutil.copy(params_from / "params.json", folder / "params.json")
    torch.save(obj, folder / PICKLE_NAME, **save)
    return folder / PICKLE_NAME


@pytest.mark.parametrize("what", ["numpy", "custom-class"])
def test_a_global_outside_torch_s_allow_list_is_refused_with_exit_5(what: str, tiny_7b: Path, tmp_path: Path) -> None:
    import numpy as np

    value: Any = np.zeros(3) if what == "numpy" else _NotATensor()
    pkl = _release_with(tmp_path / "rel", tiny_7b, {"tok_embeddings.weight": value})
    with pytest.raises(HostileContentError, match=r"weights_only=True\) refused") as ei:
        import_pickle(pkl, tmp_path / "out", sha256=_sha(pkl))
    assert ei.value.exit_code == 5 and "\n" not in ei.value.message
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_truncated_pickle_whose_hash_matches_is_refused_as_unreadable_with_exit_5(
        legacy: bool, tiny_7b_pickle: Path, tmp_path: Path) -> None:
    rel = tmp_path / "rel"
    rel.mkdir()
    shutil.copy(tiny_7b_pickle / "params.json", rel / "params.json")
    whole = torch.load(tiny_7b_pickle / PICKLE_NAME, weights_only=True)  # our own test file
    torch.save(whole, rel / PICKLE_NAME, _use_new_zipfile_serialization=not legacy)
    data = (rel / PICKLE_NAME).read_bytes()
    (rel / PICKLE_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(StructureError, match="not a readable PyTorch checkpoint") as ei:
        import_pickle(rel, tmp_path / "out", sha256=_sha(rel / PICKLE_NAME))
    assert ei.value.exit_code == 5 and "\n" not in ei.value.message
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("member", ["../../escaped.txt", "/tmp/escaped.txt", "archive/../../escaped.txt"])
def test_a_zip_pickle_with_a_member_path_that_escapes_is_refused_before_loading(
        member: str, tiny_7b_pickle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings
    import zipfile

    rel = tmp_path / "rel"
    shutil.copytree(tiny_7b_pickle, rel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the odd name: that is the point
        with zipfile.ZipFile(rel / PICKLE_NAME, "a") as zf:
            zf.writestr(member, b"written where it should not be")

    def never(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("the loader ran on a zip with an escaping member")

    monkeypatch.setattr(pickle_import, "_run_child", never)
    with pytest.raises(HostileContentError, match="escapes its archive") as ei:
        import_pickle(rel, tmp_path / "out", sha256=_sha(rel / PICKLE_NAME))
    assert ei.value.exit_code == 5
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    assert not list(tmp_path.rglob("escaped.txt")) and not Path("/tmp/escaped.txt").exists()


def _memory_bomb(folder: Path, params_from: Path) -> Path:
    """A legacy torch.save file whose storage claims 2**31 - 1 float64s (16 GiB) but holds about 1 MB."""
    import struct

    n = 123_457  # over 65535, so pickled as BININT; it appears only as the storage's size and the shape
    pkl = _release_with(folder, params_from, {"tok_embeddings.weight": torch.zeros(n, dtype=torch.float64)},
                        _use_new_zipfile_serialization=False)
    data = pkl.read_bytes()
    pat = b"J" + struct.pack("<i", n)  # BININT n: first the storage's element count, then the shape
    i = data.index(pat)
    pkl.write_bytes(data[:i] + b"J" + struct.pack("<i", 2**31 - 1) + data[i + len(pat):])
    return pkl


@pytest.mark.slow
def test_a_pickle_that_claims_more_memory_than_the_loader_may_use_is_refused_with_exit_6(
        tiny_7b: Path, tmp_path: Path) -> None:
    from provision.errors import ResourceError

    pkl = _memory_bomb(tmp_path / "rel", tiny_7b)
    with pytest.raises(ResourceError, match="memory limit") as ei:
        import_pickle(pkl, tmp_path / "out", sha256=_sha(pkl), memory_limit=3 << 30)
    assert ei.value.exit_code == 6 and "\n" not in ei.value.message
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_the_loader_s_cpu_limit_stops_a_process_that_spins(tmp_path: Path) -> None:
    import subprocess

    from provision.stages.pickle_sandbox import Limits, preexec

    proc = subprocess.run([sys.executable, "-c", "while True: pass"], preexec_fn=preexec(Limits(1 << 30, 1)),
                          timeout=60, check=False)
    assert proc.returncode == -signal_number("SIGXCPU")


def signal_number(name: str) -> int:
    import signal

    return int(getattr(signal, name))


# ---------------------------------------------------------------------------------------
# the sandbox: no network, no writes outside its folder, no processes


_SANDBOXED = """
import json, os, socket, subprocess, sys
from provision.stages.pickle_sandbox import SandboxRefusal, lock_down, network_mode
folder, parent_net = sys.argv[1], sys.argv[2]
lock_down(folder)
out = {"network": network_mode(parent_net)}
def attempt(name, fn):
    try:
        fn()
        out[name] = "allowed"
    except SandboxRefusal:
        out[name] = "refused"
attempt("socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
attempt("connect", lambda: socket.create_connection(("127.0.0.1", 9), timeout=1))
attempt("write_outside", lambda: open(os.path.join(folder, "..", "outside.txt"), "w"))
attempt("write_inside", lambda: open(os.path.join(folder, "inside.txt"), "w").close())
attempt("process", lambda: subprocess.run(["true"]))
attempt("system", lambda: os.system("true"))
attempt("read", lambda: open(sys.executable, "rb").close())
print(json.dumps(out))
"""


def test_the_loader_sandbox_refuses_sockets_processes_and_writes_outside_its_folder(tmp_path: Path) -> None:
    import subprocess

    from provision.stages.pickle_sandbox import Limits, net_namespace, preexec

    folder = tmp_path / "staging"
    folder.mkdir()
    proc = subprocess.run([sys.executable, "-c", _SANDBOXED, str(folder), net_namespace()], capture_output=True,
                          text=True, timeout=60, check=False, preexec_fn=preexec(Limits(4 << 30, 60)))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert {k: v for k, v in got.items() if k != "network"} == {
        "socket": "refused", "connect": "refused", "write_outside": "refused", "write_inside": "allowed",
        "process": "refused", "system": "refused", "read": "allowed"}
    assert not (tmp_path / "outside.txt").exists() and (folder / "inside.txt").exists()
    if os.geteuid() == 0:  # root may always make a network namespace: the loader gets a closed one
        assert got["network"] == "namespace"


@pytest.mark.slow
def test_an_import_records_its_sandbox_and_as_root_runs_in_a_closed_network_namespace(
        tiny_7b_pickle: Path, tmp_path: Path) -> None:
    res = import_pickle(tiny_7b_pickle, tmp_path / "out", sha256=_sha(tiny_7b_pickle / PICKLE_NAME))
    rec = json.loads((tmp_path / "out" / "import.json").read_text())
    size = (tiny_7b_pickle / PICKLE_NAME).stat().st_size
    assert rec["sandbox"]["memory_limit"] == 2 * size + (4 << 30) == res.sandbox["memory_limit"]
    assert rec["sandbox"]["network"] in ("namespace", "no-sockets")
    assert rec["sandbox"]["filesystem"] in ("read-only", "python-writes-refused")
    if os.geteuid() == 0:
        assert rec["sandbox"]["network"] == "namespace" and rec["sandbox"]["filesystem"] == "read-only"


# ---------------------------------------------------------------------------------------
# the parent treats the loader's output as hostile


def _fake_child(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "fake_child.py"
    script.write_text("import json, sys\nfrom pathlib import Path\np = json.loads(Path(sys.argv[1]).read_text())\n"
                      + body + "\nprint(json.dumps({'tensors': 1, 'pid': 0}))\n")
    return [sys.executable, str(script)]


@pytest.mark.slow
def test_weights_the_loader_wrote_that_do_not_match_params_json_are_refused_by_the_parent(
        tiny_7b_pickle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cmd = _fake_child(tmp_path, "import torch\nfrom safetensors.torch import save_file\n"
                                "save_file({'tok_embeddings.weight': torch.zeros(2, 2)}, p['out'])")
    monkeypatch.setattr(pickle_import, "_child_command", lambda payload: [*cmd, payload])
    with pytest.raises(StructureError, match=r"The written consolidated\.safetensors does not match params\.json"):
        import_pickle(tiny_7b_pickle, tmp_path / "out", sha256=_sha(tiny_7b_pickle / PICKLE_NAME))
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_a_loader_that_leaves_other_files_in_its_folder_is_refused(
        tiny_7b_pickle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cmd = _fake_child(tmp_path, "Path(p['out']).write_bytes(b'x')\n"
                                "(Path(p['out']).parent / 'model.py').write_text('import os')")
    monkeypatch.setattr(pickle_import, "_child_command", lambda payload: [*cmd, payload])
    with pytest.raises(HostileContentError, match=r"left model\.py"):
        import_pickle(tiny_7b_pickle, tmp_path / "out", sha256=_sha(tiny_7b_pickle / PICKLE_NAME))
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------
# shards


@pytest.mark.slow
def test_shards_each_with_a_hash_import_as_one_model_byte_identical_to_safetensors_save(tmp_path: Path) -> None:
    from safetensors.torch import save

    from provision.stages.pickle_import import PickleSource, import_pickles
    from provision.testing.tiny import tiny_state_dict
    from provision.testing.tiny_pickled import release_params, write_pickled_release

    rel = write_pickled_release(tmp_path / "rel", "mixtral", shards=3)
    sources = [PickleSource(rel.folder / n, sha256=_sha(rel.folder / n)) for n in rel.pickles]
    res = import_pickles(sources, tmp_path / "out")
    from provision.formats.params import ModelArgs

    want = save(tiny_state_dict(ModelArgs.from_dict(release_params("mixtral")), 0), metadata={"format": "pt"})
    assert (tmp_path / "out" / "consolidated.safetensors").read_bytes() == want
    assert [s["name"] for s in res.shards] == list(rel.pickles)


def test_shards_are_refused_when_one_has_no_hash_from_the_torrent_or_a_manifest(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from provision.errors import VerifyError
    from provision.stages.pickle_import import PickleSource, import_pickles
    from provision.testing.tiny_pickled import write_pickled_release

    rel = write_pickled_release(tmp_path / "rel", "mixtral", shards=3)
    monkeypatch.setattr(pickle_import, "_run_child", lambda *_a, **_k: pytest.fail("the loader ran"))
    sources = [PickleSource(rel.folder / n, sha256=_sha(rel.folder / n) if n != "consolidated.01.pt" else None)
               for n in rel.pickles]
    with pytest.raises(VerifyError, match=r"consolidated\.01\.pt has no sha256 or md5") as ei:
        import_pickles(sources, tmp_path / "out")
    assert ei.value.exit_code == 5 and "\n" not in ei.value.message
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_tensor_in_two_shards_is_refused(tiny_7b: Path, tmp_path: Path) -> None:
    from provision.stages.pickle_import import PickleSource, import_pickles

    rel = tmp_path / "rel"
    rel.mkdir()
    shutil.copy(tiny_7b / "params.json", rel / "params.json")
    from safetensors.torch import load_file

    whole = load_file(str(tiny_7b / "consolidated.safetensors"))
    torch.save(whole, rel / "consolidated.00.pt")
    torch.save({"norm.weight": whole["norm.weight"]}, rel / "consolidated.01.pt")
    sources = [PickleSource(rel / n, sha256=_sha(rel / n)) for n in ("consolidated.00.pt", "consolidated.01.pt")]
    with pytest.raises(StructureError, match=r"'norm\.weight' is in two shards"):
        import_pickles(sources, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def _shard_manifest(path: Path, rel: Any, pinned: set[str]) -> Path:
    from provision.formats.manifest import FileSpec, Manifest, Source, write_manifest

    files = tuple(FileSpec(path=n, sha256=rel.sha256(n) if n in pinned else None, optional=True, pickle=True,
                           sources=("hf",)) for n in rel.pickles)
    m = Manifest(name="tiny-mixtral-shards", architecture="mixtral", format="hf",
                 sources=(Source(type="hf", repo="provision/tiny-mixtral-shards"),), files=files)
    write_manifest(m, path)
    return path


@pytest.mark.slow
def test_the_cli_imports_a_folder_of_shards_whose_manifest_pins_every_one(tmp_path: Path, capsys: Any) -> None:
    from provision.testing.tiny_pickled import write_pickled_release, write_safetensors_twin

    rel = write_pickled_release(tmp_path / "rel", "mixtral", shards=3)
    twin = write_safetensors_twin(tmp_path / "twin", "mixtral")
    manifest = _shard_manifest(tmp_path / "m.toml", rel, set(rel.pickles))
    code = run_cli(["import-pickle", str(rel.folder), "--out", str(tmp_path / "out"), "--manifest", str(manifest),
                    "--keep-params", "--memory-limit", "6GiB", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0, doc
    assert [s["name"] for s in doc["shards"]] == list(rel.pickles)
    assert doc["sandbox"]["memory_limit"] == 6 * 2**30
    assert _sha(tmp_path / "out" / "consolidated.safetensors") == twin.sha256("consolidated.safetensors")


def test_the_cli_refuses_shards_when_the_manifest_pins_only_some_with_exit_5(tmp_path: Path, capsys: Any) -> None:
    from provision.testing.tiny_pickled import write_pickled_release

    rel = write_pickled_release(tmp_path / "rel", "mixtral", shards=3)
    manifest = _shard_manifest(tmp_path / "m.toml", rel, {"consolidated.00.pt", "consolidated.01.pt"})
    code = run_cli(["import-pickle", str(rel.folder), "--out", str(tmp_path / "out"), "--manifest", str(manifest),
                    "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 5 and "consolidated.02.pt has no sha256 or md5" in doc["error"]["message"]
    assert not (tmp_path / "out").exists()


def test_the_loader_dies_with_its_parent_when_the_parent_is_killed(tmp_path: Path) -> None:
    import signal
    import subprocess

    from provision.testing.torrent_fixtures import wait_for

    pidfile = tmp_path / "child.pid"
    parent_code = ("import subprocess, sys, time\n"
                   "from provision.stages.pickle_sandbox import Limits, preexec\n"
                   "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
                   "preexec_fn=preexec(Limits(1 << 30, 120)))\n"
                   f"open({str(pidfile)!r}, 'w').write(str(c.pid))\n"
                   "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    try:
        wait_for(lambda: pidfile.is_file() and pidfile.read_text().strip(), 60, what="the loader to start")
        child = int(pidfile.read_text())
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)

        def gone() -> bool:
            try:
                return Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                return True

        wait_for(gone, 30, what="the loader to die with its parent")  # it would sleep 120 s otherwise
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(30)


_NATIVE_WRITES = """
import errno, os, sys
from provision.stages.pickle_sandbox import filesystem_mode
folder, outside = sys.argv[1], sys.argv[2]
res = {"filesystem": filesystem_mode()}
for name, path in (("inside", os.path.join(folder, "in.txt")), ("outside", outside)):
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))  # no audit hook here: only the mounts stop it
        res[name] = "written"
    except OSError as e:
        res[name] = errno.errorcode.get(e.errno, str(e.errno))
print(res)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a mount namespace needs root (CAP_SYS_ADMIN)")
def test_as_root_the_loader_sees_every_mount_read_only_but_its_own_folder(tmp_path: Path) -> None:
    import ast
    import subprocess

    from provision.stages.pickle_sandbox import Limits, preexec

    folder = tmp_path / "staging"
    folder.mkdir()
    outside = tmp_path / "outside.txt"
    proc = subprocess.run([sys.executable, "-c", _NATIVE_WRITES, str(folder), str(outside)], capture_output=True,
                          text=True, timeout=60, check=False, preexec_fn=preexec(Limits(4 << 30, 60), str(folder)))
    assert proc.returncode == 0, proc.stderr
    assert ast.literal_eval(proc.stdout.strip()) == {"filesystem": "read-only", "inside": "written",
                                                     "outside": "EROFS"}
    assert (folder / "in.txt").exists() and not outside.exists()
    probe = tmp_path / "host-still-writable.txt"
    probe.write_text("the host's mounts are untouched")  # nothing propagated back
    assert probe.read_text() == "the host's mounts are untouched"


@pytest.mark.parametrize("kind", ["fifo", "symlink-out"])
def test_a_params_json_that_is_a_fifo_or_links_out_of_the_folder_is_refused_with_exit_5(
    kind: str, tiny_7b_pickle: Path, tmp_path: Path
) -> None:
    src = tmp_path / "release"
    shutil.copytree(tiny_7b_pickle, src)
    (src / "params.json").unlink()
    if kind == "fifo":
        os.mkfifo(src / "params.json")  # reading it would block forever: refused without opening for read
    else:
        private = tmp_path / "private.json"
        private.write_text((tiny_7b_pickle / "params.json").read_text())
        (src / "params.json").symlink_to(private)
    with pytest.raises(HostileContentError) as e:
        import_pickle(src, tmp_path / "out", sha256=_sha(src / PICKLE_NAME))
    assert e.value.exit_code == 5 and "params" in str(e.value)
    assert not (tmp_path / "out").exists()
