"""The convert stage: a Mistral-format checkpoint -> a cast or quantized copy for one target GPU.

``convert`` reads ``params.json`` and the source headers, chooses the profile (``profiles.choose``)
and checks the output folder and the free disk before anything is written; then it streams the
tensors into shards under temporary names (``stream``), commits them, writes the side files of the
layout (``output`` for ``mistral``, ``hf_export`` for ``hf``) and, last, the record
(``record``). A run killed midway leaves only ``.provision-tmp-*`` files, removed by the next
run. It does not verify the source against a manifest (``verify`` does) and does not run the model
(``compare`` does, on request).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from provision.errors import UsageError
from provision.formats.params import ModelArgs
from provision.formats.safetensors_writer import CheckpointWriter, plan_shards
from provision.hardware import Target, parse_target
from provision.io.space import check_free_space
from provision.progress import ByteCounter, ProgressEvent, ProgressFn
from provision.stages.convert.hf_export import write_hf_side_files
from provision.stages.convert.items import Item, check_against_params, plan_items
from provision.stages.convert.output import copy_mistral_side_files, prepare_out, remove_leftovers
from provision.stages.convert.record import ConvertResult, write_record
from provision.stages.convert.serve import vllm_command
from provision.stages.convert.source import SafetensorsSource, find_sources
from provision.stages.convert.stream import stream_tensors
from provision.stages.profiles import Profile, choose

SHARD_BYTES = 5 * 10**9


def _source_files(sources: list[SafetensorsSource], src_dir: Path) -> list[dict[str, Any]]:
    """The record's ``source_files``, digests still zero (filled in while streaming)."""
    return [{"path": s.path.name, "size": s.size, "sha256": "0" * 64, "sha256_from": "computed"}
            for s in sources] + [
        {"path": n, "size": (src_dir / n).stat().st_size} for n in ("params.json",) if (src_dir / n).is_file()]


def _writer(out_dir: Path, items: list[Item], profile: Profile, source_files: list[dict[str, Any]],
            shard_bytes: int) -> CheckpointWriter:
    """The shard writer of the layout: one ``consolidated.safetensors``, or ``model*.safetensors`` shards."""
    entries = [e for it in items for e in it.entries]
    metadata = {"format": "pt", "provision.scheme": profile.scheme, "provision.layout": profile.layout,
                "provision.source": json.dumps(source_files, separators=(",", ":"))}
    if profile.layout == "mistral":
        return CheckpointWriter(out_dir, [entries], ["consolidated.safetensors"], metadata=metadata, index_name=None)
    shards = plan_shards(entries, shard_bytes)
    m = len(shards)
    names = ["model.safetensors"] if m == 1 else [f"model-{i + 1:05d}-of-{m:05d}.safetensors" for i in range(m)]
    return CheckpointWriter(out_dir, shards, names, metadata=metadata,
                            index_name=None if m == 1 else "model.safetensors.index.json")


def convert(
    src_dir: Path,
    out_dir: Path,
    *,
    target: Target | str | None = "auto",
    scheme: str = "auto",
    layout: str | None = None,
    context: int = 32768,
    progress: ProgressFn | None = None,
    shard_bytes: int = SHARD_BYTES,
    hf_tokenizer: bool = True,
    source_sha256: Mapping[str, str] | None = None,
) -> ConvertResult:
    """Convert the Mistral-format checkpoint in ``src_dir`` into ``out_dir`` for ``target``.

    ``source_sha256`` maps source file names to sha256 digests the caller has just verified
    (``provision run`` passes what verify computed); those files are recorded with that digest
    instead of being hashed again while streaming.
    """
    t0 = time.monotonic()
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    args = ModelArgs.from_file(src_dir / "params.json")
    tgt = target if isinstance(target, Target) else parse_target(target)
    prof = choose(args, tgt, scheme, layout, context=context)
    if prof.layout == "hf" and args.vision_encoder is None:
        raise UsageError("The hf layout is written for Pixtral (Llava) checkpoints; use --layout mistral.")
    paths = find_sources(src_dir)
    prepare_out(src_dir, out_dir)
    sources = [SafetensorsSource(p) for p in paths]
    writer: CheckpointWriter | None = None
    try:
        items = plan_items(sources, args, prof)
        check_against_params(items, args)
        source_files = _source_files(sources, src_dir)
        writer = _writer(out_dir, items, prof, source_files, shard_bytes)
        out_dir.mkdir(parents=True, exist_ok=True)
        check_free_space(out_dir, writer.total_size + (64 << 20), what=f"the {prof.name} conversion")
        on_bytes = ByteCounter(progress, task="convert", total=sum(s.size - s.data_start for s in sources),
                               description=f"convert -> {prof.name}", interval=0.2, report_end=True)
        reports = stream_tensors(sources, items, writer, prof.scheme, source_files, source_sha256 or {}, on_bytes)
        writer.finish({"provision.source": json.dumps(source_files, separators=(",", ":"))})
        files = [p.name for p in writer.commit()]
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        for s in sources:
            s.close()

    notes: list[str] = []
    hf_tok = False
    if prof.layout == "mistral":
        files += copy_mistral_side_files(src_dir, out_dir)
    else:
        side = write_hf_side_files(src_dir, out_dir, args, prof, items, writer.data_bytes, hf_tokenizer=hf_tokenizer)
        files += side.files
        notes += side.notes
        hf_tok = side.hf_tokenizer
    remove_leftovers(out_dir, keep=files)
    sizes = [(n, (out_dir / n).stat().st_size) for n in files]
    bytes_read = sum(s.size for s in sources)
    res = ConvertResult(src_dir=src_dir, out_dir=out_dir, target=tgt, profile=prof, files=sizes,
                        source_files=source_files, tensors=reports, bytes_read=bytes_read,
                        bytes_written=sum(s for _, s in sizes), seconds=time.monotonic() - t0,
                        vllm_command=vllm_command(out_dir, prof, context, hf_tokenizer=hf_tok), notes=notes)
    write_record(res, context=context)
    if progress is not None:
        progress(ProgressEvent(task="convert", done=bytes_read, total=bytes_read, unit="B",
                               description=f"convert -> {prof.name}", finished=True))
    return res
