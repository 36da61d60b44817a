"""The output folder of a conversion: which names convert owns, the checks before writing, the cleanup after.

``prepare_out`` refuses an ``--out`` that is the source, a file, or a folder holding files convert
did not write, and removes the temporaries of an interrupted run; ``copy_mistral_side_files``
copies ``params.json`` and the tokenizer for the ``mistral`` layout; ``remove_leftovers`` deletes
files of an earlier conversion that this one did not produce. Tensors are written elsewhere.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from provision.errors import UsageError
from provision.formats.safetensors_writer import remove_stale_temporaries
from provision.io.atomic import TMP_PREFIX, atomic_write_bytes
from provision.stages.convert.record import RECORD_NAME

# Names this stage writes; anything else in an existing --out folder makes it refuse.
OUR_FILES = re.compile(
    r"^(consolidated(-\d{5}-of-\d{5})?\.safetensors|consolidated\.safetensors\.index\.json|"
    r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|params\.json|tekken\.json|"
    r"tokenizer\.model(\.v\d+m?\d*)?|config\.json|generation_config\.json|preprocessor_config\.json|"
    r"processor_config\.json|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|"
    r"chat_template\.jinja|chat_template\.json|" + re.escape(RECORD_NAME) + r")$")
_SIDE_FILES_MISTRAL = re.compile(r"^(params\.json|tekken\.json|tokenizer\.model(\.v\d+m?\d*)?)$")


def prepare_out(src_dir: Path, out_dir: Path) -> None:
    """Check ``out_dir`` can take a conversion of ``src_dir`` and clear an interrupted run's temporaries."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a folder.")
    if out_dir.resolve() == src_dir.resolve():
        raise UsageError("--out must differ from the source folder; converting in place would destroy the original.")
    if out_dir.is_dir():
        remove_stale_temporaries(out_dir)
        for p in out_dir.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                continue
            if not OUR_FILES.match(p.name):
                raise UsageError(f"--out {out_dir} holds {p.name}, which convert did not write; "
                                 "choose an empty or new folder.", path=str(p))


def copy_mistral_side_files(src_dir: Path, out_dir: Path) -> list[str]:
    """Copy ``params.json`` and the tokenizer files of ``src_dir``; the names copied."""
    names = []
    for p in sorted(src_dir.iterdir()):
        if _SIDE_FILES_MISTRAL.match(p.name) and p.is_file():
            atomic_write_bytes(out_dir / p.name, p.read_bytes())
            names.append(p.name)
    return names


def remove_leftovers(out_dir: Path, keep: list[str]) -> None:
    """Delete the files of an earlier conversion in ``out_dir`` that are not in ``keep`` (the record stays)."""
    for p in out_dir.iterdir():
        if p.is_file() and OUR_FILES.match(p.name) and p.name not in keep and p.name != RECORD_NAME:
            p.unlink()
