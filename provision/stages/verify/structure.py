"""Structure checks of a model folder, from headers only: safetensors files, indexes, params.json.

Every expected ``.safetensors`` is checked (``provision.formats.safetensors.check_safetensors``),
every ``*.safetensors.index.json`` against its shards, and, when ``params.json`` and
Mistral-format weights (``consolidated*.safetensors``, else every top-level ``.safetensors``
unless a ``config.json`` or an index marks an HF checkpoint) are both expected, ``params.json``
is parsed by ``ModelArgs.from_file`` (missing key / wrong type: ParamsError, exit 3) and the
tensors must equal ``tensor_spec(args)`` (``spec_diff``: names and shapes; nothing missing,
nothing extra, nothing stored twice). It never reads tensor data and never hashes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from provision.errors import HostileContentError, ParamsError, StructureError
from provision.formats.params import ModelArgs, spec_diff, tensor_spec
from provision.formats.safetensors import SafetensorsInfo, check_index, check_safetensors
from provision.stages.verify.authority import AuthorityKind
from provision.stages.verify.report import Check


def safetensors_check(rel: str, path: Path, authority: AuthorityKind) -> tuple[SafetensorsInfo | None, Check]:
    """The header facts of one ``.safetensors`` file (None when malformed) and its check."""
    try:
        info = check_safetensors(path)
    except (StructureError, HostileContentError) as exc:
        return None, Check("safetensors", rel, False, authority, message=exc.message, error=exc)
    return info, Check("safetensors", rel, True, authority, actual=f"{len(info.tensors)} tensors")


def index_checks(expected: Iterable[str], paths: Mapping[str, Path],
                 st_infos: Mapping[str, SafetensorsInfo]) -> list[Check]:
    """Each expected, readable index against the shards beside it (already-checked headers reused)."""
    out: list[Check] = []
    for rel in sorted(expected):
        if not rel.endswith(".safetensors.index.json") or rel not in paths:
            continue
        folder = rel.rpartition("/")[0]
        shards = {(k[len(folder) + 1:] if folder else k): v for k, v in st_infos.items()
                  if (k.rpartition("/")[0] == folder)}
        try:
            idx = check_index(paths[rel], shards)
            out.append(Check("index", rel, True, actual=f"{len(idx.weight_map)} tensors in {len(idx.shards)} shards"))
        except (StructureError, HostileContentError) as exc:
            out.append(Check("index", rel, False, message=exc.message, error=exc))
    return out


def mistral_weights(rels: list[str]) -> list[str]:
    """The Mistral-format weight files among ``rels``: ``consolidated*.safetensors`` at the top
    level; else every top-level ``.safetensors`` unless the folder looks like an HF checkpoint
    (a ``config.json`` or a ``*.safetensors.index.json`` beside them), whose names differ."""
    top = [r for r in rels if "/" not in r and r.endswith(".safetensors")]
    cons = [r for r in top if r.startswith("consolidated")]
    if cons:
        return cons
    if "config.json" in rels or any(r.endswith(".safetensors.index.json") for r in rels):
        return []
    return top


def params_checks(expected: Iterable[str], paths: Mapping[str, Path],
                  st_infos: Mapping[str, SafetensorsInfo]) -> list[Check]:
    """params.json parsed, then the Mistral weights' tensors against its spec; [] when either is
    not expected, and no tensors check when params.json or a weights file already failed."""
    rels = sorted(expected)
    if "params.json" not in rels:
        return []
    weights = mistral_weights(rels)
    if not weights or "params.json" not in paths:
        return []  # nothing to compare, or params.json missing or refused: already failed
    try:
        args = ModelArgs.from_file(paths["params.json"])
    except ParamsError as exc:
        return [Check("params", "params.json", False, message=exc.message, error=exc)]
    out = [Check("params", "params.json", True)]
    if not all(w in st_infos for w in weights):
        return out  # a weights file is missing or malformed: already failed
    have: dict[str, tuple[int, ...]] = {}
    dup: list[str] = []
    for w in weights:
        for name, t in st_infos[w].tensors.items():
            if name in have:
                dup.append(name)
            have[name] = t.shape
    spec = tensor_spec(args)
    missing, extra, wrong, parts = spec_diff(have, spec)
    where = ", ".join(weights)
    if not (missing or extra or wrong or dup):
        out.append(Check("tensors", where, True, expected=f"{len(spec)} tensors", actual=f"{len(have)} tensors"))
        return out
    if dup:
        parts.append(f"{len(dup)} stored twice (first {dup[0]!r})")
    err = StructureError(
        f"The tensors in {where} do not match params.json: " + "; ".join(parts) + ".",
        hint="The weights and params.json come from different models or revisions; fetch both again.",
        path=where, missing=missing[:50], extra=extra[:50], wrong_shape=wrong[:50], duplicated=dup[:50],
    )
    out.append(Check("tensors", where, False, expected=f"{len(spec)} tensors", actual=f"{len(have)} tensors",
                     message=err.message, error=err))
    return out
