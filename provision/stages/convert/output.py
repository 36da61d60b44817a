"""The output folder of a conversion: what may be there, the staging folder, and the commit.

A conversion is written into a new staging folder beside ``--out`` (``new_stage``) and reaches
``--out`` only when it is complete and checked (``commit_output``); a failure removes the
staging folder, so nothing is left under the final name. ``check_out`` decides, before anything
is written, how ``--out`` may be used (``OutMode``):

* ``new``: ``--out`` does not exist or is an empty folder; the staging folder is renamed onto it.
* ``replace``: ``--out`` holds an earlier conversion and nothing else (every file is named in its
  ``provision-convert.json`` with the size recorded there, or is a ``.provision-tmp-*`` file an
  interrupted writer left); the old folder is swapped out by a rename and then only those files
  are deleted.
* ``merge`` (``--force``): ``--out`` holds files convert did not write; convert's files are added
  next to them and the command is refused (exit 2) when any of their names is already taken by
  a file convert did not write. Files of an earlier conversion recorded there may be replaced.

Anything else is refused with ``UsageError`` (exit 2) before a byte is written: convert never
deletes or overwrites a file it did not write. ``side_files`` lists (and checks, through
``provision.io.opening``) the source's ``params.json`` and tokenizer files; ``copy_side_file``
copies one. Tensors are written elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Literal

from provision.errors import UsageError
from provision.formats.provenance import PROVENANCE_NAME
from provision.io.atomic import TMP_PREFIX, atomic_write_bytes, fsync_dir
from provision.io.opening import check_regular, read_regular
from provision.stages.convert.record import RECORD_NAME

OutMode = Literal["new", "replace", "merge"]

# Names this stage writes.
OUR_FILES = re.compile(
    r"^(consolidated(-\d{5}-of-\d{5})?\.safetensors|consolidated\.safetensors\.index\.json|"
    r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|params\.json|tekken\.json|"
    r"tokenizer\.model(\.v\d+m?\d*)?|config\.json|generation_config\.json|preprocessor_config\.json|"
    r"processor_config\.json|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|"
    r"chat_template\.jinja|chat_template\.json|" + re.escape(RECORD_NAME) + "|" + re.escape(PROVENANCE_NAME) + r")$")
MISTRAL_SIDE_FILES = re.compile(r"^(params\.json|tekken\.json|tokenizer\.model(\.v\d+m?\d*)?)$")
MAX_SIDE_FILE_BYTES = 256 << 20  # tekken.json is ~19 MB
_STAGE = re.compile(re.escape(TMP_PREFIX) + r"convert(-old)?-(?P<name>.+)-(?P<pid>\d+)$")


def _recorded_files(out_dir: Path) -> dict[str, int]:
    """Name -> size of the files an earlier conversion recorded in ``out_dir`` (names convert writes
    only; {} without a readable record)."""
    try:
        raw = read_regular(out_dir / RECORD_NAME, root=out_dir, what="conversion record", max_bytes=64 << 20)
        doc = json.loads(raw.decode("utf-8"))
        files = doc["files"]
        mine = {str(f["path"]): int(f["size"]) for f in files if OUR_FILES.match(str(f["path"]))}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return mine


def _written_by_convert(out_dir: Path) -> set[str]:
    """The entries of ``out_dir`` an earlier conversion wrote: its record and the recorded files
    that still have their recorded size."""
    recorded = _recorded_files(out_dir)
    if not recorded:
        return set()
    mine = {RECORD_NAME}
    with contextlib.suppress(OSError):  # its provenance record (rewritten by smoke, so no size to compare)
        if (out_dir / PROVENANCE_NAME).is_file() and not (out_dir / PROVENANCE_NAME).is_symlink():
            mine.add(PROVENANCE_NAME)
    for name, size in recorded.items():
        p = out_dir / name
        with contextlib.suppress(OSError):
            st = p.lstat()
            if not p.is_symlink() and p.is_file() and st.st_size == size:
                mine.add(name)
    return mine


def _temporaries(out_dir: Path) -> set[str]:
    """The ``.provision-tmp-*`` regular files in ``out_dir``: an interrupted writer's temporaries
    (folders of that name are another command's staging and are not counted)."""
    return {p.name for p in out_dir.iterdir()
            if p.name.startswith(TMP_PREFIX) and p.is_file() and not p.is_symlink()}


def check_out(src_dir: Path, out_dir: Path, *, force: bool = False) -> OutMode:
    """How a conversion of ``src_dir`` may use ``out_dir`` (see the module docstring); raises
    ``UsageError`` (exit 2) when it may not. Writes nothing."""
    if out_dir.is_symlink():
        raise UsageError(f"--out {out_dir} is a symlink; pass the folder it points to.")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a folder.")
    if out_dir.resolve() == src_dir.resolve() or src_dir.resolve() in out_dir.resolve().parents:
        raise UsageError("--out must be outside the source folder; converting in place would destroy the original.")
    if not out_dir.is_dir():
        return "new"
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return "new"
    mine = _written_by_convert(out_dir) | _temporaries(out_dir)
    foreign = [n for n in entries if n not in mine]
    if not foreign:
        return "replace"
    if not force:
        raise UsageError(f"--out {out_dir} holds {foreign[0]}, which convert did not write; choose an empty or new "
                         "folder (or --force to add the conversion next to those files).", path=str(out_dir / foreign[0]))
    taken = [n for n in foreign if OUR_FILES.match(n)]
    if taken:
        raise UsageError(f"--out {out_dir} holds {taken[0]}, a name convert writes, and convert did not write it; "
                         "--force never overwrites such a file: choose another folder.", path=str(out_dir / taken[0]))
    return "merge"


def side_files(src_dir: Path) -> list[Path]:
    """The ``params.json`` and tokenizer files of ``src_dir`` a ``mistral`` output copies, each
    checked to be a regular file inside ``src_dir`` (``HostileContentError``, exit 5, otherwise)."""
    out = []
    for p in sorted(src_dir.iterdir()):
        if MISTRAL_SIDE_FILES.match(p.name) or p.name == "tekken.json":
            check_regular(p, root=src_dir, what="side file")
            out.append(p)
    return out


def copy_side_file(src: Path, src_dir: Path, dest_dir: Path) -> str:
    """Copy one checked side file of ``src_dir`` into ``dest_dir`` (read through ``read_regular``)."""
    atomic_write_bytes(dest_dir / src.name, read_regular(src, root=src_dir, what="side file",
                                                         max_bytes=MAX_SIDE_FILE_BYTES))
    return src.name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _stage_label(out_dir: Path) -> str:
    return out_dir.name[:64]


def remove_dead_stages(out_dir: Path) -> None:
    """Remove the staging folders a killed conversion into ``out_dir`` left beside it (their process is gone)."""
    parent = out_dir.parent
    if not parent.is_dir():
        return
    label = _stage_label(out_dir)
    for p in parent.iterdir():
        m = _STAGE.match(p.name)
        if m and m["name"] == label and p.is_dir() and not p.is_symlink() and not _pid_alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)


def new_stage(out_dir: Path) -> Path:
    """A new, empty staging folder beside ``out_dir`` (same filesystem, so the commit is a rename)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_stages(out_dir)
    stage = out_dir.parent / f"{TMP_PREFIX}convert-{_stage_label(out_dir)}-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)  # our own pid's: an earlier call of this process that died
    stage.mkdir()
    return stage


def commit_output(stage: Path, out_dir: Path, mode: OutMode, files: list[str]) -> None:
    """Move the checked conversion in ``stage`` to ``out_dir`` (``mode`` from ``check_out``); the
    staging folder is gone afterwards. Raises ``UsageError`` when ``out_dir`` changed meanwhile
    so that the commit would overwrite a file convert did not write (the staging folder is left
    for the caller to remove)."""
    parent = out_dir.parent
    if mode == "new":
        if out_dir.is_dir() and any(out_dir.iterdir()):
            raise UsageError(f"--out {out_dir} was filled by something else during the conversion; nothing was "
                             "written to it.", path=str(out_dir))
        os.replace(stage, out_dir)  # onto nothing, or onto an empty folder
        fsync_dir(parent)
        return
    if mode == "replace":
        old = parent / f"{TMP_PREFIX}convert-old-{_stage_label(out_dir)}-{os.getpid()}"
        mine = _written_by_convert(out_dir)
        temporaries = _temporaries(out_dir)
        if any(p.name not in mine and p.name not in temporaries for p in out_dir.iterdir()):
            raise UsageError(f"--out {out_dir} gained files convert did not write during the conversion; "
                             "nothing was replaced.", path=str(out_dir))
        os.replace(out_dir, old)
        os.replace(stage, out_dir)
        fsync_dir(parent)
        for name in mine:
            with contextlib.suppress(FileNotFoundError):
                (old / name).unlink()
        for name in temporaries:  # an interrupted writer's temporaries
            with contextlib.suppress(OSError):
                (old / name).unlink()
        with contextlib.suppress(OSError):  # something that is not ours appeared: the folder stays
            old.rmdir()
        return
    # merge: link each file in (a link never replaces an existing name), replacing only our own
    mine = _written_by_convert(out_dir)
    taken = [n for n in files if n not in mine and (out_dir / n).exists()]
    if taken:
        raise UsageError(f"--out {out_dir} gained {taken[0]} during the conversion; nothing was added to it.",
                         path=str(out_dir / taken[0]))
    for name in files:
        target = out_dir / name
        if name in mine:
            os.replace(stage / name, target)
            continue
        try:
            os.link(stage / name, target)
        except FileExistsError:
            raise UsageError(f"--out {out_dir} gained {name} during the conversion; it was not overwritten.",
                             path=str(target)) from None
        (stage / name).unlink()
    for name in mine - set(files) - {RECORD_NAME}:
        with contextlib.suppress(FileNotFoundError):
            (out_dir / name).unlink()
    fsync_dir(out_dir)
    shutil.rmtree(stage, ignore_errors=True)
