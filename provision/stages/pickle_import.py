"""Import a pickled PyTorch release (Mistral 7B's ``consolidated.00.pth``) as safetensors, safely.

The one way a pickle gets in (manifests, verify, the loader and convert refuse them), and it is
never unpickled in the calling process: the published sha256 or md5 is checked first (exit 5 on
a mismatch, before anything parses the file); a fresh interpreter without core dumps runs
``torch.load(weights_only=True, mmap=True)``, checks the loaded dict against ``params.json``'s
``tensor_spec`` and streams it into a staging folder; the parent checks the written header
again, adds ``params.json`` (``rope_theta`` made explicit), the tokenizer and ``import.json``, and
renames the folder to ``out``. A failure leaves ``out`` untouched and the pickle is never copied.
The module stays large because the parent and the child it starts (``--child``) share one file:
the protocol between them is read in one place.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.errors import (
    ConvertError,
    HashMismatchError,
    HostileContentError,
    ParamsError,
    ProvisionError,
    StructureError,
    UsageError,
)
from provision.formats.params import spec_diff
from provision.formats.pickles import PICKLE_SUFFIXES, is_pickle_name
from provision.formats.safetensors import FROM_TORCH, check_safetensors
from provision.io.atomic import TMP_PREFIX, atomic_write_text, fsync_dir
from provision.io.hashing import hash_file
from provision.io.space import check_free_space
from provision.progress import ProgressFn, note

WEIGHTS_NAME = "consolidated.safetensors"
RECORD_NAME = "import.json"
TOKENIZER_GLOBS = ("tekken*.json", "tokenizer.model", "tokenizer.model.v*")
DEFAULT_TIMEOUT_S = 3600.0
WRITE_CHUNK = 64 << 20
CHILD_ERROR_EXIT = 3
_HEX = {"sha256": re.compile(r"^[0-9a-fA-F]{64}$"), "md5": re.compile(r"^[0-9a-fA-F]{32}$")}



@dataclass
class ImportResult:
    out_dir: Path
    source: Path
    source_sha256: str
    source_md5: str | None
    authority: str  # "sha256" | "md5": the release hash that was checked
    tensors: int
    parameters: int
    dtypes: dict[str, int]  # safetensors dtype -> tensor count
    rope_theta_added: bool
    files: dict[str, tuple[int, str]] = field(default_factory=dict)  # path -> (size, sha256)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "source": str(self.source), "source_sha256": self.source_sha256,
                "source_md5": self.source_md5, "authority": self.authority, "tensors": self.tensors,
                "parameters": self.parameters, "dtypes": self.dtypes, "rope_theta_added": self.rope_theta_added,
                "files": [{"path": p, "size": s, "sha256": h} for p, (s, h) in sorted(self.files.items())],
                "seconds": round(self.seconds, 3)}


# ---------------------------------------------------------------------------------------
# the parent side


def find_pickle(src: Path) -> Path:
    """The pickle to import: ``src`` itself, or the one pickle file in folder ``src``."""
    src = Path(src)
    if src.is_file():
        if not is_pickle_name(src.name):
            raise UsageError(f"{src} is not a pickle file ({', '.join(PICKLE_SUFFIXES)}); pass the .pth file "
                             "or its folder.", path=str(src))
        return src
    if not src.is_dir():
        raise UsageError(f"{src} does not exist; pass the .pth file or the folder holding it.", path=str(src))
    found = sorted(p for p in src.iterdir() if p.is_file() and is_pickle_name(p.name))
    if not found:
        raise UsageError(f"{src} holds no pickle file ({', '.join(PICKLE_SUFFIXES)}).", path=str(src))
    if len(found) > 1:
        raise UsageError(f"{src} holds {len(found)} pickle files ({', '.join(p.name for p in found[:4])}); "
                         "pass the one to import.", path=str(src))
    return found[0]


def _check_hash_arg(kind: str, value: str | None) -> str | None:
    if value is None:
        return None
    v = value.strip()
    if not _HEX[kind].match(v):
        n = 64 if kind == "sha256" else 32
        raise UsageError(f"--{kind} must be {n} hex characters, got {value!r}.", **{kind: value})
    return v.lower()


def _prepare_out(out_dir: Path, src_folder: Path) -> None:
    if out_dir.resolve() == src_folder.resolve():
        raise UsageError(f"--out {out_dir} is the pickle's own folder; choose a new folder for the safetensors.",
                         path=str(out_dir))
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise UsageError(f"--out {out_dir} exists and is not a folder.", path=str(out_dir))
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise UsageError(f"--out {out_dir} is not empty; choose a new folder (nothing is overwritten).",
                         path=str(out_dir))


def _child_command(payload_file: str) -> list[str]:
    """The command that runs the loader process (a separate interpreter)."""
    return [sys.executable, "-s", "-m", "provision.stages.pickle_import", "--child", payload_file]


def _no_core_dumps() -> None:  # runs in the child between fork and exec
    import resource

    # a hard limit that forbids it: the load still runs, a crash may leave a core file
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _run_child(payload: dict[str, Any], timeout: float, staging: Path) -> dict[str, Any]:
    env = dict(os.environ)
    env["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"  # belt and braces: weights_only even if a caller forgot
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the same modules as this interpreter
    out_f = staging / ".child.out"
    err_f = staging / ".child.err"
    in_f = staging / ".child.in"  # a file, not argv: a big model's spec outgrows one argument (128 KiB)
    in_f.write_text(json.dumps(payload), encoding="utf-8")
    with open(out_f, "wb") as out, open(err_f, "wb") as err:
        proc = subprocess.Popen(_child_command(str(in_f)), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=err, env=env, cwd=str(staging), start_new_session=True,
                                preexec_fn=_no_core_dumps)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):  # it exited on its own meanwhile
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise ConvertError(f"The pickle loader process ran past {timeout:.0f} s and was killed.",
                               hint="Raise --timeout on a slow disk.") from None
        except BaseException:  # Ctrl-C, SIGTERM: the loader goes too
            with contextlib.suppress(ProcessLookupError):  # it exited on its own meanwhile
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    stdout = out_f.read_text(encoding="utf-8", errors="replace")
    stderr = err_f.read_text(encoding="utf-8", errors="replace")
    doc: dict[str, Any] | None = None
    for line in reversed(stdout.strip().splitlines()):
        with contextlib.suppress(ValueError):  # a line of the loader's own output, not the JSON answer
            cand = json.loads(line)
            if isinstance(cand, dict):
                doc = cand
                break
    if rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        raise ConvertError(f"The pickle loader process died ({name}); nothing was written.",
                           hint="A killed loader is often out of memory; check free RAM and try again.",
                           signal=-rc)
    if rc == 0 and doc is not None and "error" not in doc:
        return doc
    if doc is not None and "error" in doc:
        msg = str(doc.get("message", "")).strip()
        kind = doc["error"]
        if kind == "hostile":
            raise HostileContentError(f"torch.load(weights_only=True) refused {payload['path']}: {msg}",
                                      hint="The file holds more than tensors; it was not executed. Do not use it.",
                                      path=payload["path"])
        if kind == "structure":
            raise StructureError(msg, hint="The pickle and params.json come from different models; check both.",
                                 path=payload["path"])
        raise ConvertError(f"Importing {payload['path']} failed: {msg}", path=payload["path"])
    tail = " ".join(stderr.strip().splitlines()[-3:])[-400:]
    raise ConvertError(f"The pickle loader process exited with status {rc}: {tail or 'no message'}.",
                       path=payload["path"])


def _spec_check(path: Path, spec: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Header-only re-check of the written file against the spec; returns dtype counts."""
    info = check_safetensors(path)
    have = {n: tuple(t.shape) for n, t in info.tensors.items()}
    problem = spec_problem(have, spec)
    if problem:
        raise StructureError(f"The written {path.name} does not match params.json: {problem}.", path=str(path))
    counts: dict[str, int] = {}
    for t in info.tensors.values():
        counts[t.dtype] = counts.get(t.dtype, 0) + 1
    return counts


def spec_problem(have: dict[str, tuple[int, ...]], spec: dict[str, tuple[int, ...]]) -> str:
    """'' when names and shapes equal the spec, else a short description of the first differences."""
    parts = spec_diff(have, spec)[3]
    return "; ".join(parts)


def import_pickle(src: Path, out_dir: Path, *, sha256: str | None = None, md5: str | None = None,
                  params: Path | None = None, explicit_rope: bool = True, timeout: float = DEFAULT_TIMEOUT_S,
                  progress: ProgressFn | None = None) -> ImportResult:
    """Import the pickle at ``src`` (file or folder) into ``out_dir`` as Mistral-format safetensors.

    ``sha256`` or ``md5`` (the release's published hash) is required and checked first."""
    from provision.formats.params import ModelArgs, parameter_count, tensor_spec
    from provision.model.mistral import explicit_params

    t0 = time.monotonic()
    want_sha = _check_hash_arg("sha256", sha256)
    want_md5 = _check_hash_arg("md5", md5)
    if want_sha is None and want_md5 is None:
        raise UsageError("Importing a pickle needs the release's hash: pass --sha256 (or --md5) from a source "
                         "you trust; provision never loads an unverified pickle.")
    if timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {timeout}.")
    pkl = find_pickle(Path(src))
    folder = pkl.parent
    out_dir = Path(out_dir).absolute()
    params_path = Path(params) if params is not None else folder / "params.json"
    if not params_path.is_file():
        raise ParamsError(f"params.json not found at {params_path}; pass --params with the release's params.json.",
                          path=str(params_path))
    try:
        raw_params = json.loads(params_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ParamsError(f"{params_path} is not valid JSON ({e}).", path=str(params_path)) from None
    args = ModelArgs.from_dict(raw_params)
    spec = tensor_spec(args)
    _prepare_out(out_dir, folder)

    # 1. the release hash, before anything parses the file
    note(progress, "import", f"hashing {pkl.name} ({pkl.stat().st_size:,d} bytes)")
    got_sha, got_md5 = hash_file(pkl, md5=want_md5 is not None)
    if want_sha is not None and got_sha != want_sha:
        raise HashMismatchError(f"{pkl.name}: sha256 is {got_sha} but the release's is {want_sha}; it was not "
                                "loaded.", hint="The file is damaged or not the release; fetch it again.",
                                path=str(pkl), expected=want_sha, actual=got_sha, check="sha256")
    if want_md5 is not None and got_md5 != want_md5:
        raise HashMismatchError(f"{pkl.name}: md5 is {got_md5} but the release's is {want_md5}; it was not "
                                "loaded.", hint="The file is damaged or not the release; fetch it again.",
                                path=str(pkl), expected=want_md5, actual=got_md5, check="md5")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(out_dir.parent, pkl.stat().st_size + (64 << 20), what="the imported safetensors")

    # 2. load and write in a separate process, into a staging folder beside out_dir
    staging = out_dir.parent / f"{TMP_PREFIX}import-{out_dir.name}.{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        note(progress, "import", f"loading {pkl.name} with torch.load(weights_only=True) in a separate process")
        payload = {"path": str(pkl.resolve()), "out": str(staging / WEIGHTS_NAME),
                   "spec": {k: list(v) for k, v in spec.items()}, "source_sha256": got_sha}
        child = _run_child(payload, timeout, staging)
        for name in (".child.in", ".child.out", ".child.err"):
            with contextlib.suppress(OSError):  # scratch files: the staging folder goes at the end anyway
                (staging / name).unlink()
        # 3. check what the child wrote, then the small files
        dtypes = _spec_check(staging / WEIGHTS_NAME, spec)
        new_params, added = explicit_params(raw_params) if explicit_rope else (raw_params, False)
        if added:
            atomic_write_text(staging / "params.json", json.dumps(new_params, indent=4) + "\n")
        else:  # byte for byte
            shutil.copyfile(params_path, staging / "params.json")
        for pattern in TOKENIZER_GLOBS:
            for tok in sorted(folder.glob(pattern)):
                if tok.is_file() and not tok.is_symlink():
                    shutil.copyfile(tok, staging / tok.name)
        files: dict[str, tuple[int, str]] = {}
        for p in sorted(staging.iterdir()):
            files[p.name] = (p.stat().st_size, hash_file(p)[0])
        record = {"imported_from": str(pkl.resolve()), "source_sha256": got_sha, "source_md5": got_md5,
                  "checked_against": "sha256" if want_sha else "md5", "loader": "torch.load(weights_only=True, "
                  "mmap=True) in a separate process", "tensors": len(spec), "parameters": parameter_count(args),
                  "rope_theta_added": added, "files": {k: {"size": s, "sha256": h} for k, (s, h) in files.items()},
                  "child": child}
        atomic_write_text(staging / RECORD_NAME, json.dumps(record, indent=2) + "\n")
        # 4. publish: one rename
        if out_dir.is_dir():
            out_dir.rmdir()  # checked empty above
        os.replace(staging, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    note(progress, "import", f"wrote {len(spec)} tensors to {out_dir / WEIGHTS_NAME}")
    return ImportResult(out_dir=out_dir, source=pkl, source_sha256=got_sha, source_md5=got_md5,
                        authority="sha256" if want_sha else "md5", tensors=len(spec),
                        parameters=parameter_count(args), dtypes=dtypes, rope_theta_added=added, files=files,
                        seconds=time.monotonic() - t0)


# ---------------------------------------------------------------------------------------
# the child side (a separate interpreter; only this part imports torch and touches the pickle)


class _ChildError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _load(path: str) -> Any:
    import pickle

    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # a legacy (non-zip) torch.save file cannot be mmapped; weights_only still applies
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((ln.strip() for ln in first if "Unsupported" in ln or "global" in ln.lower()),
                      first[0] if first else "")
        raise _ChildError("hostile", detail[:300]) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise _ChildError("load", f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}") \
            from None


def _child(payload: dict[str, Any]) -> dict[str, Any]:
    import torch

    from provision.formats.safetensors_writer import CheckpointWriter, TensorEntry

    obj = _load(payload["path"])
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise _ChildError("structure", f"The pickle holds a {type(obj).__name__}, not a {{name: tensor}} dict.")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise _ChildError("structure", f"Entry {bad[0]!r} of the pickle is not a tensor.")
    spec = {k: tuple(v) for k, v in payload["spec"].items()}
    problem = spec_problem({k: tuple(v.shape) for k, v in obj.items()}, spec)
    if problem:
        raise _ChildError("structure", f"The pickle's tensors do not match params.json: {problem}.")
    entries = []
    for name in spec:
        dt = str(obj[name].dtype).removeprefix("torch.")
        if dt not in FROM_TORCH:
            raise _ChildError("structure", f"Tensor {name!r} has dtype {dt}, which safetensors cannot hold here.")
        entries.append(TensorEntry(name, FROM_TORCH[dt], tuple(obj[name].shape)))
    out = Path(payload["out"])
    meta = {"format": "pt", "provision.imported_from": Path(payload["path"]).name,
            "provision.source_sha256": payload["source_sha256"]}
    writer = CheckpointWriter(out_dir=out.parent, shards=[entries], names=[out.name], metadata=meta)
    try:
        for e in entries:
            t = obj[e.name].detach().contiguous().reshape(-1).view(torch.uint8)
            for i in range(0, t.numel(), WRITE_CHUNK):
                writer.write(e.name, memoryview(t[i:i + WRITE_CHUNK].numpy()))
        writer.finish()
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return {"tensors": len(entries), "bytes": writer.data_bytes, "pid": os.getpid()}


def _child_main(argv: Sequence[str]) -> int:
    payload = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    try:
        doc = _child(payload)
    except _ChildError as e:
        print(json.dumps({"error": e.kind, "message": str(e)}), flush=True)
        return CHILD_ERROR_EXIT
    except ProvisionError as e:
        print(json.dumps({"error": "write", "message": e.message}), flush=True)
        return CHILD_ERROR_EXIT
    print(json.dumps(doc), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(_child_main(sys.argv[2:]))
    print("usage: provision import-pickle SRC --out DIR --sha256 HEX (this module is run by it)", file=sys.stderr)
    sys.exit(2)
