"""Import a pickled PyTorch release (``consolidated.00.pth``, or shards ``consolidated.NN.pt``) as safetensors, safely.

The one way a pickle gets in (manifests, verify, the loader and convert refuse them), and it is
never unpickled in the calling process: every pickle's published sha256 or md5 (or the sha256 a
verified torrent download computed) is checked first (exit 5 on a mismatch, before anything
parses the file; shards are imported together only when every one has such an authority). A
fresh interpreter locked down by ``pickle_sandbox`` (memory and CPU limits, no network, no
writes outside its folder, no core dumps) runs ``torch.load(weights_only=True, mmap=True)``,
merges the shards, checks the dict against ``params.json``'s ``tensor_spec`` and streams it into
a staging folder. The parent treats that output as hostile: it re-reads the written header with
the parser verify uses and checks it against the spec, adds ``params.json`` (``rope_theta`` made
explicit), the tokenizer and ``import.json``, and renames the folder to ``out``. A failure leaves
``out`` untouched and the pickle is never copied. The module stays large because the parent and
the child it starts (``--child``) share one file: the protocol between them is read in one place.
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
from typing import TYPE_CHECKING, Any

from provision.errors import (
    ConvertError,
    HashMismatchError,
    HostileContentError,
    ManifestError,
    ParamsError,
    ProvisionError,
    ResourceError,
    StructureError,
    UsageError,
    VerifyError,
)
from provision.formats.params import read_params_file, spec_diff
from provision.formats.pickles import PICKLE_SUFFIXES, is_pickle_name
from provision.formats.safetensors import FROM_TORCH, check_safetensors
from provision.io.atomic import TMP_PREFIX, atomic_write_bytes, atomic_write_text, fsync_dir
from provision.io.hashing import hash_file
from provision.io.space import check_free_space
from provision.progress import ProgressFn, note
from provision.stages.pickle_sandbox import Limits, net_namespace, preexec

if TYPE_CHECKING:
    from provision.formats.manifest import Manifest

WEIGHTS_NAME = "consolidated.safetensors"
RECORD_NAME = "import.json"
TOKENIZER_GLOBS = ("tekken*.json", "tokenizer.model", "tokenizer.model.v*")
DEFAULT_TIMEOUT_S = 3600.0
BASE_MEMORY = 4 << 30  # the loader's own needs (the interpreter, torch) on top of twice the pickles
WRITE_CHUNK = 64 << 20
CHILD_ERROR_EXIT = 3
_HEX = {"sha256": re.compile(r"^[0-9a-fA-F]{64}$"), "md5": re.compile(r"^[0-9a-fA-F]{32}$")}



@dataclass(frozen=True)
class PickleSource:
    """One pickle to import and what vouches for it (a release hash, or a verified download's sha256)."""

    path: Path
    sha256: str | None = None
    md5: str | None = None
    authority: str = ""  # what the hash came from, for the record: "sha256", "md5", "torrent-v1-pieces", ...


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
    shards: list[dict[str, Any]] = field(default_factory=list)  # one per pickle: name, size, sha256, md5, authority
    sandbox: dict[str, Any] = field(default_factory=dict)  # the loader's limits and network mode

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "source": str(self.source), "source_sha256": self.source_sha256,
                "source_md5": self.source_md5, "authority": self.authority, "tensors": self.tensors,
                "parameters": self.parameters, "dtypes": self.dtypes, "rope_theta_added": self.rope_theta_added,
                "files": [{"path": p, "size": s, "sha256": h} for p, (s, h) in sorted(self.files.items())],
                "seconds": round(self.seconds, 3), "shards": self.shards, "sandbox": self.sandbox}


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


def find_pickles(src: Path) -> list[Path]:
    """``src`` itself (a pickle file), or every pickle file in folder ``src``, by name."""
    src = Path(src)
    if src.is_file():
        return [find_pickle(src)]
    if not src.is_dir():
        raise UsageError(f"{src} does not exist; pass the .pth file or the folder holding it.", path=str(src))
    found = sorted(p for p in src.iterdir() if p.is_file() and is_pickle_name(p.name))
    if not found:
        raise UsageError(f"{src} holds no pickle file ({', '.join(PICKLE_SUFFIXES)}).", path=str(src))
    return found


def manifest_sources(src: Path, manifest: Manifest) -> list[PickleSource]:
    """The pickles at ``src`` (a file, or every one in a folder: shards) with the hashes ``manifest``
    pins for them. One pickle without a pinned hash is a manifest error (exit 3); among shards,
    ``import_pickles`` refuses the lot (exit 5)."""
    paths = find_pickles(src)
    out = []
    for p in paths:
        spec = manifest.file(p.name)
        if spec is None or not spec.pickle:
            raise ManifestError(f"Manifest {manifest.name} does not list the pickle {p.name}; pass --sha256 from "
                                "a source you trust.", manifest=manifest.name, file=p.name)
        if len(paths) == 1 and not (spec.sha256 or spec.md5):
            raise ManifestError(f"Manifest {manifest.name} pins no sha256 for the pickle {p.name}; pass --sha256 "
                                "from a source you trust.", manifest=manifest.name, file=p.name)
        out.append(PickleSource(p, spec.sha256, spec.md5, authority="manifest-sha256" if spec.sha256 else
                                "manifest-md5" if spec.md5 else ""))
    return out


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
    """The command that runs the loader process (a separate interpreter, writing no bytecode)."""
    return [sys.executable, "-s", "-B", "-m", "provision.stages.pickle_import", "--child", payload_file]


def default_memory_limit(pickle_bytes: int) -> int:
    """The loader's data-memory limit: twice the pickles (a legacy file is read into memory, a zip
    one mapped privately) plus the interpreter's own needs."""
    return 2 * int(pickle_bytes) + BASE_MEMORY


def _signal_name(num: int) -> str:
    return signal.Signals(num).name if num in signal.Signals._value2member_map_ else str(num)


def _run_child(payload: dict[str, Any], timeout: float, staging: Path, limits: Limits) -> dict[str, Any]:
    env = dict(os.environ)
    env["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"  # belt and braces: weights_only even if a caller forgot
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the same modules as this interpreter
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(proxy, None)
    out_f = staging / ".child.out"
    err_f = staging / ".child.err"
    in_f = staging / ".child.in"  # a file, not argv: a big model's spec outgrows one argument (128 KiB)
    in_f.write_text(json.dumps(payload), encoding="utf-8")
    with open(out_f, "wb") as out, open(err_f, "wb") as err:
        proc = subprocess.Popen(_child_command(str(in_f)), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=err, env=env, cwd=str(staging), start_new_session=True,
                                preexec_fn=preexec(limits, writable=str(staging)))
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
    where = payload["paths"][0] if len(payload["paths"]) == 1 else f"{len(payload['paths'])} pickle shards"
    if rc < 0:
        if -rc in (signal.SIGXCPU, signal.SIGKILL) and (doc is None or "error" not in doc):
            hint = ("A killed loader is often out of memory or past its CPU limit "
                    f"({limits.cpu_seconds} s); check free RAM and --timeout.")
        else:
            hint = "A killed loader is often out of memory; check free RAM and try again."
        if -rc == signal.SIGXCPU:
            raise ResourceError(f"The pickle loader process used its {limits.cpu_seconds} s of CPU time and was "
                                "stopped; nothing was written.", hint="Raise --timeout for a big pickle.",
                                signal=-rc)
        raise ConvertError(f"The pickle loader process died ({_signal_name(-rc)}); nothing was written.",
                           hint=hint, signal=-rc)
    if rc == 0 and doc is not None and "error" not in doc:
        return doc
    if doc is not None and "error" in doc:
        msg = str(doc.get("message", "")).strip()
        kind = doc["error"]
        if kind == "hostile":
            raise HostileContentError(f"torch.load(weights_only=True) refused {where}: {msg}",
                                      hint="The file holds more than tensors; it was not executed. Do not use it.",
                                      path=where)
        if kind == "sandbox":
            raise HostileContentError(f"The pickle loader tried something its sandbox forbids ({msg}); "
                                      f"{where} was not imported.", hint="Do not use this file.", path=where)
        if kind == "memory":
            raise ResourceError(f"Loading {where} needed more than the loader's memory limit "
                                f"({limits.memory_bytes:,d} bytes); nothing was written.",
                                hint="A pickle that claims far more than its size is hostile; otherwise raise "
                                     "the memory limit.", path=where, limit=limits.memory_bytes)
        if kind == "structure":
            raise StructureError(msg, hint="The pickle and params.json come from different models; check both.",
                                 path=where)
        if kind == "load":
            raise StructureError(f"{where} is not a readable PyTorch checkpoint (truncated or damaged): {msg}",
                                 hint="Fetch it again; if its hash matches, the release itself is damaged.",
                                 path=where)
        raise ConvertError(f"Importing {where} failed: {msg}", path=where)
    tail = " ".join(stderr.strip().splitlines()[-3:])[-400:]
    raise ConvertError(f"The pickle loader process exited with status {rc}: {tail or 'no message'}.", path=where)


def _spec_check(path: Path, spec: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Header-only re-check of the written file against the spec (the parser verify uses); returns
    dtype counts. The loader's output is not trusted: this is what stands between it and ``out``."""
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
                  memory_limit: int | None = None, progress: ProgressFn | None = None) -> ImportResult:
    """Import the pickle at ``src`` (file or folder) into ``out_dir`` as Mistral-format safetensors.

    ``sha256`` or ``md5`` (the release's published hash) is required and checked first."""
    want_sha = _check_hash_arg("sha256", sha256)
    want_md5 = _check_hash_arg("md5", md5)
    if want_sha is None and want_md5 is None:
        raise UsageError("Importing a pickle needs the release's hash: pass --sha256 (or --md5) from a source "
                         "you trust; provision never loads an unverified pickle.")
    pkl = find_pickle(Path(src))
    source = PickleSource(pkl, want_sha, want_md5, authority="sha256" if want_sha else "md5")
    return import_pickles([source], out_dir, params=params, explicit_rope=explicit_rope, timeout=timeout,
                          memory_limit=memory_limit, progress=progress)


def _check_sources(sources: Sequence[PickleSource]) -> list[PickleSource]:
    if not sources:
        raise UsageError("No pickle to import.")
    out = [PickleSource(Path(s.path), _check_hash_arg("sha256", s.sha256), _check_hash_arg("md5", s.md5),
                        s.authority) for s in sources]
    folders = {s.path.parent.absolute() for s in out}
    if len(folders) > 1:
        raise UsageError("The pickle shards must sit in one folder.")
    bare = [s.path.name for s in out if not (s.sha256 or s.md5)]
    if bare and len(out) == 1:
        raise UsageError("Importing a pickle needs the release's hash: pass --sha256 (or --md5) from a source "
                         "you trust; provision never loads an unverified pickle.")
    if bare:
        raise VerifyError(f"Refusing to import {len(out)} pickle shards: {', '.join(bare[:3])} "
                          f"{'has' if len(bare) == 1 else 'have'} no sha256 or md5 from the torrent or a manifest; "
                          "shards are imported together only when every one is authenticated.",
                          hint="Fetch them by torrent, or pin every shard's hash in the manifest.", files=bare)
    for s in out:
        if not s.path.is_file() or s.path.is_symlink():
            raise UsageError(f"{s.path} is not a regular file.", path=str(s.path))
    return out


def check_zip_members(path: Path) -> None:
    """A zip-format pickle (``torch.save``'s container) names only plain relative members: an
    absolute path, a ``..`` step, a backslash or a symlink entry is refused (exit 5). Reads the
    central directory only, never a member; a non-zip (legacy) pickle passes untouched."""
    import stat
    import zipfile

    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise StructureError(f"{path.name} is a damaged zip container ({e}).", path=str(path)) from None
    for info in infos:
        name = info.filename
        parts = name.split("/")
        if (name.startswith("/") or "\\" in name or ".." in parts or (len(name) > 1 and name[1] == ":")
                or stat.S_ISLNK(info.external_attr >> 16)):
            raise HostileContentError(f"{path.name} holds the zip member {name[:200]!r}, which escapes its "
                                      "archive; it was not loaded.", hint="Do not use this file.", path=str(path),
                                      member=name[:200])


def _check_hashes(sources: Sequence[PickleSource], progress: ProgressFn | None) -> list[dict[str, Any]]:
    """Hash every pickle (before anything parses one) and compare with its authority."""
    shards = []
    for s in sources:
        note(progress, "import", f"hashing {s.path.name} ({s.path.stat().st_size:,d} bytes)")
        got_sha, got_md5 = hash_file(s.path, md5=s.md5 is not None)
        for kind, want, got in (("sha256", s.sha256, got_sha), ("md5", s.md5, got_md5)):
            if want is not None and got != want:
                raise HashMismatchError(f"{s.path.name}: {kind} is {got} but the release's is {want}; it was not "
                                        "loaded.", hint="The file is damaged or not the release; fetch it again.",
                                        path=str(s.path), expected=want, actual=got, check=kind)
        check_zip_members(s.path)
        shards.append({"name": s.path.name, "size": s.path.stat().st_size, "sha256": got_sha, "md5": got_md5,
                       "authority": s.authority or ("sha256" if s.sha256 else "md5")})
    return shards


def import_pickles(sources: Sequence[PickleSource], out_dir: Path, *, params: Path | None = None,
                   explicit_rope: bool = True, timeout: float = DEFAULT_TIMEOUT_S, memory_limit: int | None = None,
                   progress: ProgressFn | None = None) -> ImportResult:
    """Import one pickle, or the shards of one model (all in one folder, each with its hash), into
    ``out_dir`` as one ``consolidated.safetensors`` (see the module docstring)."""
    from provision.formats.params import ModelArgs, parameter_count, tensor_spec
    from provision.model.mistral import explicit_params

    t0 = time.monotonic()
    if timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {timeout}.")
    if memory_limit is not None and memory_limit <= 0:
        raise UsageError(f"The memory limit must be positive, got {memory_limit}.")
    srcs = _check_sources(sources)
    folder = srcs[0].path.parent
    out_dir = Path(out_dir).absolute()
    params_path = Path(params) if params is not None else folder / "params.json"
    if not params_path.exists() and not params_path.is_symlink():
        raise ParamsError(f"params.json not found at {params_path}; pass --params with the release's params.json.",
                          path=str(params_path))
    params_bytes, raw_params = read_params_file(params_path)  # read once: the copy below is these bytes
    args = ModelArgs.from_dict(raw_params)
    spec = tensor_spec(args)
    _prepare_out(out_dir, folder)

    # 1. the release hashes, before anything parses a file
    shards = _check_hashes(srcs, progress)
    total = sum(int(s["size"]) for s in shards)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(out_dir.parent, total + (64 << 20), what="the imported safetensors")
    limits = Limits(memory_bytes=memory_limit or default_memory_limit(total), cpu_seconds=int(timeout) + 1)

    # 2. load and write in a separate, locked-down process, into a staging folder beside out_dir
    staging = out_dir.parent / f"{TMP_PREFIX}import-{out_dir.name}.{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        names = ", ".join(s.path.name for s in srcs)
        note(progress, "import", f"loading {names} with torch.load(weights_only=True) in a locked-down process")
        payload = {"paths": [str(s.path.resolve()) for s in srcs], "out": str(staging / WEIGHTS_NAME),
                   "spec": {k: list(v) for k, v in spec.items()},
                   "source_sha256": ",".join(str(s["sha256"]) for s in shards), "parent_net": net_namespace()}
        child = _run_child(payload, timeout, staging, limits)
        for name in (".child.in", ".child.out", ".child.err"):
            with contextlib.suppress(OSError):  # scratch files: the staging folder goes at the end anyway
                (staging / name).unlink()
        leftovers = sorted(p.name for p in staging.iterdir() if p.name != WEIGHTS_NAME)
        if leftovers or not (staging / WEIGHTS_NAME).is_file() or (staging / WEIGHTS_NAME).is_symlink():
            raise HostileContentError(f"The pickle loader left {', '.join(leftovers) or 'no weights'} in its "
                                      "folder; nothing was imported.", path=str(staging))
        # 3. check what the child wrote (hostile until proven otherwise), then the small files
        dtypes = _spec_check(staging / WEIGHTS_NAME, spec)
        new_params, added = explicit_params(raw_params) if explicit_rope else (raw_params, False)
        if added:
            atomic_write_text(staging / "params.json", json.dumps(new_params, indent=4) + "\n")
        else:  # byte for byte
            atomic_write_bytes(staging / "params.json", params_bytes)
        for pattern in TOKENIZER_GLOBS:
            for tok in sorted(folder.glob(pattern)):
                if tok.is_file() and not tok.is_symlink():
                    shutil.copyfile(tok, staging / tok.name)
        files: dict[str, tuple[int, str]] = {}
        for p in sorted(staging.iterdir()):
            files[p.name] = (p.stat().st_size, hash_file(p)[0])
        first = shards[0]
        sandbox = {"memory_limit": limits.memory_bytes, "cpu_seconds": limits.cpu_seconds,
                   "network": child.get("network", "no-sockets"),
                   "filesystem": child.get("filesystem", "python-writes-refused")}
        record = {"imported_from": str(srcs[0].path.resolve()), "source_sha256": first["sha256"],
                  "source_md5": first["md5"], "checked_against": first["authority"], "shards": shards,
                  "loader": "torch.load(weights_only=True, mmap=True) in a separate, locked-down process",
                  "sandbox": sandbox, "tensors": len(spec), "parameters": parameter_count(args),
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
    return ImportResult(out_dir=out_dir, source=srcs[0].path, source_sha256=str(first["sha256"]),
                        source_md5=first["md5"], authority="sha256" if srcs[0].sha256 else "md5", tensors=len(spec),
                        parameters=parameter_count(args), dtypes=dtypes, rope_theta_added=added, files=files,
                        seconds=time.monotonic() - t0, shards=shards, sandbox=sandbox)


# ---------------------------------------------------------------------------------------
# the child side (a separate interpreter; only this part imports torch and touches the pickle)


class _ChildError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _load(path: str) -> Any:
    import pickle

    import torch

    from provision.stages.pickle_sandbox import SandboxRefusal

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # a legacy (non-zip) torch.save file cannot be mmapped; weights_only still applies
            return torch.load(path, map_location="cpu", weights_only=True)
    except SandboxRefusal as e:
        raise _ChildError("sandbox", str(e)[:300]) from None
    except MemoryError:
        raise _ChildError("memory", "out of memory") from None
    except pickle.UnpicklingError as e:
        text = str(e)
        if "SandboxRefusal" in text or "the loader may not" in text:
            raise _ChildError("sandbox", next(ln.strip() for ln in text.splitlines() if "may not" in ln)[:300]) \
                from None
        first = text.strip().splitlines()
        detail = next((ln.strip() for ln in first if "Unsupported" in ln or "global" in ln.lower()),
                      first[0] if first else "")
        raise _ChildError("hostile", detail[:300]) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        text = str(e)
        if "allocate" in text.lower() or "out of memory" in text.lower():
            raise _ChildError("memory", text.strip().splitlines()[0][:300]) from None
        raise _ChildError("load", f"{type(e).__name__}: {text.strip().splitlines()[0][:300] if text else ''}") \
            from None


def _merge(paths: Sequence[str]) -> dict[str, Any]:
    """Load every shard and merge them into one {name: tensor} dict (a name in two shards is refused)."""
    import torch

    merged: dict[str, Any] = {}
    for path in paths:
        obj = _load(path)
        if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
            raise _ChildError("structure", f"The pickle holds a {type(obj).__name__}, not a {{name: tensor}} dict.")
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise _ChildError("structure", f"Entry {bad[0]!r} of the pickle is not a tensor.")
        dup = sorted(set(obj) & set(merged))
        if dup:
            raise _ChildError("structure", f"Tensor {dup[0]!r} is in two shards ({Path(path).name} and an "
                                           "earlier one).")
        merged.update(obj)
    return merged


def _child(payload: dict[str, Any]) -> dict[str, Any]:
    import torch

    from provision.formats.safetensors_writer import CheckpointWriter, TensorEntry
    from provision.stages.pickle_sandbox import filesystem_mode, lock_down, network_mode

    out = Path(payload["out"])
    lock_down(str(out.parent))  # from here: no sockets, no processes, no writes outside the staging folder
    obj = _merge(payload["paths"])
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
    # safetensors' own order (widest dtype first, then by name) and metadata: the file equals what
    # safetensors.torch.save writes for the same tensors; the provenance is in import.json
    entries.sort(key=lambda e: (-obj[e.name].element_size(), e.name))
    meta = {"format": "pt"}
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
    return {"tensors": len(entries), "bytes": writer.data_bytes, "pid": os.getpid(),
            "network": network_mode(str(payload.get("parent_net", ""))), "filesystem": filesystem_mode()}


def _child_main(argv: Sequence[str]) -> int:
    payload = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    try:
        doc = _child(payload)
    except _ChildError as e:
        print(json.dumps({"error": e.kind, "message": str(e)}), flush=True)
        return CHILD_ERROR_EXIT
    except MemoryError:
        print(json.dumps({"error": "memory", "message": "out of memory"}), flush=True)
        return CHILD_ERROR_EXIT
    except PermissionError as e:  # the sandbox's refusal outside the load (the writer's own files are allowed)
        print(json.dumps({"error": "sandbox", "message": str(e)[:300]}), flush=True)
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
