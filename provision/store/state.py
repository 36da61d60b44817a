"""The per-model state file: which pipeline stages finished, and the file facts they relied on.

``State.record_stage`` stores, for every file a finished stage relied on, its size, ``mtime_ns``,
inode and (when known) sha256, plus free facts; ``State.stage_valid`` lets a rerun skip a stage
whose files still match. Stage names are ``plan`` ... ``smoke``, optionally qualified by a profile
(``convert:fp8-hf``); ``invalidate`` drops a stage and the later ones. ``mark_original_dropped``
records that ``--drop-original`` removed the verified original (the fetch and verify records stay,
without files, with the original's params.json, so a rerun keeps the converted profile that
depends on them instead of downloading again). The file is schema-versioned
JSON, written atomically and group-readable, with paths relative to the model folder; a missing,
corrupt or future-schema file loads as an empty state with a warning (it only costs a redo). It
does not decide what a stage records, run stages or hash files.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.io.atomic import atomic_write_text, current_umask
from provision.version import __version__

STATE_SCHEMA_VERSION = 1
STATE_KIND = "provision-state"
STAGES: tuple[str, ...] = ("plan", "fetch", "import", "verify", "convert", "smoke")  # import: a pickled release
ORIGINAL_DROPPED = "original_dropped"  # fact of the fetch and verify records once --drop-original ran
DROPPED_PARAMS = "params"  # fact of the fetch record then: the original's params.json, as a JSON object


def shared_file_mode() -> int:
    """File mode for files in a shared home: what the umask allows, and always group-readable.

    With ``umask 002`` (the advice for a shared home) this is 0o664; with 077 it is 0o640.
    """
    return (0o666 & ~current_umask()) | 0o440


def split_stage(stage: str) -> tuple[str, str | None]:
    """``"convert:fp8-hf"`` -> ``("convert", "fp8-hf")``; raises ValueError for an unknown stage."""
    base, _, qual = stage.partition(":")
    if base not in STAGES or (_ and not qual):
        raise ValueError(f"Unknown stage {stage!r}: expected one of {', '.join(STAGES)} (optionally ':<profile>').")
    return base, (qual or None)


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class FileFact:
    """What a stage relied on for one file."""

    path: Path  # absolute in memory; stored relative to the state file's folder when inside it
    size: int
    mtime_ns: int
    inode: int
    sha256: str | None = None

    @classmethod
    def of(cls, path: Path, sha256: str | None = None) -> FileFact:
        st = os.stat(path)
        return cls(path=Path(path).absolute(), size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino,
                   sha256=sha256)

    def mismatch(self) -> str | None:
        """None when the file on disk still matches; otherwise a short reason."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return f"{self.path} is missing"
        except OSError as e:
            return f"{self.path} cannot be read ({e.strerror})"
        if st.st_size != self.size:
            return f"{self.path} changed size ({self.size} -> {st.st_size} bytes)"
        if st.st_ino != self.inode:
            return f"{self.path} was replaced (inode {self.inode} -> {st.st_ino})"
        if st.st_mtime_ns != self.mtime_ns:
            return f"{self.path} was modified (mtime changed)"
        return None


@dataclass
class StageRecord:
    stage: str
    finished: str
    tool_version: str
    files: dict[str, FileFact] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageCheck:
    stage: str
    ok: bool
    reasons: tuple[str, ...] = ()


@dataclass
class State:
    """The stages of one model. Build with ``load_state``; persist with ``save_state``."""

    stages: dict[str, StageRecord] = field(default_factory=dict)
    model: str | None = None
    created: str = field(default_factory=_now_iso)
    updated: str | None = None
    tool_version: str = __version__
    warnings: list[str] = field(default_factory=list)

    def record_stage(
        self,
        stage: str,
        *,
        files: Mapping[str, Path | str] | Iterable[Path | str] = (),
        facts: Mapping[str, Any] | None = None,
        sha256: Mapping[str, str] | None = None,
    ) -> StageRecord:
        """Record ``stage`` as finished now, with the current facts of ``files``.

        ``files`` maps a key (usually the path relative to the model) to a path, or is a list of
        paths (keyed by their string form). ``sha256`` maps a key to its digest when known.
        Every file must exist (FileNotFoundError otherwise: a stage records what it produced).
        A stage recorded again replaces the earlier record; later stages are left alone.
        """
        split_stage(stage)
        items: list[tuple[str, Path]]
        if isinstance(files, Mapping):
            items = [(str(k), Path(v)) for k, v in files.items()]
        else:
            items = [(str(p), Path(p)) for p in files]
        hashes = dict(sha256 or {})
        recorded: dict[str, FileFact] = {}
        for key, p in items:
            digest = hashes.get(key) or hashes.get(str(p))
            recorded[key] = FileFact.of(p, digest)
        rec = StageRecord(stage=stage, finished=_now_iso(), tool_version=__version__, files=recorded,
                          facts=dict(facts or {}))
        self.stages[stage] = rec
        return rec

    def check(self, stage: str) -> StageCheck:
        """Whether ``stage`` is recorded and every file it relied on still matches, with reasons."""
        split_stage(stage)
        rec = self.stages.get(stage)
        if rec is None:
            return StageCheck(stage, False, (f"stage {stage} was not recorded",))
        if rec.facts.get(ORIGINAL_DROPPED):
            return StageCheck(stage, False, ("the original was removed by --drop-original after a verified "
                                             "conversion",))
        reasons = tuple(r for r in (f.mismatch() for f in rec.files.values()) if r is not None)
        return StageCheck(stage, not reasons, reasons)

    def stage_valid(self, stage: str) -> bool:
        """True when ``stage`` is recorded and every recorded file matches by size, mtime_ns, inode."""
        return self.check(stage).ok

    def invalidate(self, stage: str) -> list[str]:
        """Forget ``stage`` and every later stage; return the names dropped.

        ``invalidate("fetch")`` drops fetch, import, verify, every convert and every smoke;
        ``invalidate("convert")`` drops every convert and every smoke.
        ``invalidate("convert:fp8")`` drops convert:fp8, smoke:fp8 and an unqualified smoke, but not
        convert:bf16 or smoke:bf16.
        """
        base, qual = split_stage(stage)
        idx = STAGES.index(base)
        dropped = []
        for name in list(self.stages):
            b, q = split_stage(name)
            later = STAGES.index(b) > idx
            same = name == stage or (b == base and qual is None)
            if same or (later and (qual is None or q is None or q == qual)):
                del self.stages[name]
                dropped.append(name)
        return dropped

    def get(self, stage: str) -> StageRecord | None:
        return self.stages.get(stage)

    def mark_original_dropped(self, params: dict[str, Any] | None) -> None:
        """Record that the verified original was removed: the fetch and verify records keep their facts
        (and the fetch record ``params``, the original's params.json) but no files; later stages stay."""
        for name in ("fetch", "verify"):
            rec = self.stages.get(name)
            if rec is not None:
                rec.files = {}
                rec.facts[ORIGINAL_DROPPED] = True
        rec = self.stages.get("fetch")
        if rec is not None and params is not None:
            rec.facts[DROPPED_PARAMS] = params

    @property
    def original_dropped(self) -> bool:
        """Whether ``--drop-original`` removed the original after the recorded fetch."""
        rec = self.stages.get("fetch")
        return rec is not None and bool(rec.facts.get(ORIGINAL_DROPPED))

    def dropped_params(self) -> dict[str, Any] | None:
        """The dropped original's params.json, as recorded by ``mark_original_dropped``."""
        rec = self.stages.get("fetch")
        params = rec.facts.get(DROPPED_PARAMS) if rec is not None and self.original_dropped else None
        return params if isinstance(params, dict) else None

    def to_dict(self, base: Path | None = None) -> dict[str, Any]:
        return {
            "schema_version": STATE_SCHEMA_VERSION,
            "kind": STATE_KIND,
            "tool": "provision",
            "tool_version": __version__,
            "model": self.model,
            "created": self.created,
            "updated": self.updated,
            "stages": {
                name: {
                    "finished": r.finished,
                    "tool_version": r.tool_version,
                    "files": {k: _fact_to_dict(f, base) for k, f in r.files.items()},
                    "facts": r.facts,
                }
                for name, r in self.stages.items()
            },
        }


def _fact_to_dict(f: FileFact, base: Path | None) -> dict[str, Any]:
    p = f.path
    if base is not None:
        try:
            p = f.path.relative_to(base.absolute())
        except ValueError:  # outside ``base``: recorded as an absolute path
            pass
    return {"path": str(p), "size": f.size, "mtime_ns": f.mtime_ns, "inode": f.inode, "sha256": f.sha256}


def _fact_from_dict(d: Any, base: Path) -> FileFact:
    if not isinstance(d, dict):
        raise ValueError("file entry is not an object")
    p = d["path"]
    size, mtime, ino, sha = d["size"], d["mtime_ns"], d["inode"], d.get("sha256")
    if not isinstance(p, str) or not p:
        raise ValueError("file path is not a string")
    for v in (size, mtime, ino):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError("size, mtime_ns and inode must be integers")
    if sha is not None and not isinstance(sha, str):
        raise ValueError("sha256 must be a string")
    path = Path(p)
    return FileFact(path=path if path.is_absolute() else base.absolute() / path, size=size, mtime_ns=mtime,
                    inode=ino, sha256=sha)


def _parse(doc: Any, base: Path) -> State:
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    if doc.get("kind") != STATE_KIND:
        raise ValueError("not a provision state file")
    stages_doc = doc.get("stages")
    if not isinstance(stages_doc, dict):
        raise ValueError("'stages' is not an object")
    st = State(model=doc.get("model") if isinstance(doc.get("model"), str) else None,
               created=str(doc.get("created") or _now_iso()), updated=doc.get("updated"))
    for name, r in stages_doc.items():
        split_stage(name)
        if not isinstance(r, dict) or not isinstance(r.get("files", {}), dict):
            raise ValueError(f"stage {name} is malformed")
        facts = r.get("facts", {})
        if not isinstance(facts, dict):
            raise ValueError(f"stage {name} facts is not an object")
        st.stages[name] = StageRecord(
            stage=name, finished=str(r.get("finished", "")), tool_version=str(r.get("tool_version", "")),
            files={str(k): _fact_from_dict(v, base) for k, v in r.get("files", {}).items()}, facts=facts)
    return st


def load_state(path: Path) -> State:
    """Read a state file. Missing -> empty; corrupt or future schema -> empty with a warning."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return State()
    except OSError as e:
        return State(warnings=[f"State file {path} cannot be read ({e.strerror}); every stage will be redone."])
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return State(warnings=[f"State file {path} is corrupt ({e}); ignoring it, every stage will be redone."])
    ver = doc.get("schema_version") if isinstance(doc, dict) else None
    if not isinstance(ver, int) or isinstance(ver, bool):
        return State(warnings=[f"State file {path} has no schema_version; ignoring it, every stage will be redone."])
    if ver > STATE_SCHEMA_VERSION:
        return State(warnings=[
            f"State file {path} has schema {ver}, newer than this provision ({__version__}, schema "
            f"{STATE_SCHEMA_VERSION}); ignoring it, every stage will be redone."])
    try:
        return _parse(doc, path.parent)
    except (KeyError, ValueError, TypeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) else e
        return State(warnings=[f"State file {path} is malformed ({msg}); ignoring it, every stage will be redone."])


def save_state(state: State, path: Path) -> None:
    """Write ``state`` atomically to ``path``, group-readable; paths inside its folder go relative."""
    path = Path(path)
    state.updated = _now_iso()
    text = json.dumps(state.to_dict(base=path.parent), indent=2, sort_keys=False) + "\n"
    atomic_write_text(path, text, perms=shared_file_mode())
