"""The convert stage: a Mistral-format checkpoint -> a cast or quantized copy for one target GPU.

``convert`` reads ``params.json`` and the source headers, chooses the profile (``profiles.choose``),
checks the output folder (``output.check_out``) and refuses a quantized scheme that would quantize
no layer, all before anything is written; then, in a new staging folder beside the output, it
streams the tensors into shards (``stream``), writes the side files of the layout (``output`` for
``mistral``, ``hf_export`` for ``hf``), checks the result (verify's structure checks, the loader's
load check and, when asked, the logit comparison of ``compare``), writes the record and the
``provenance.json`` that hashes every file of the folder (``record``) and commits the folder by
rename. A failure removes the staging folder; a run killed midway
leaves only a ``.provision-tmp-convert-*`` folder beside the output, removed by the next run. It
does not verify the source against a manifest (``verify`` does).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.errors import ConvertError, ManifestError
from provision.formats.params import ModelArgs
from provision.formats.provenance import PROVENANCE_NAME, SourceIdentity
from provision.formats.safetensors_writer import CheckpointWriter, plan_shards
from provision.hardware import Target, parse_target
from provision.io.diskio import reopen_direct
from provision.io.readahead import ReadAhead
from provision.io.space import check_free_space
from provision.progress import ByteCounter, ProgressEvent, ProgressFn
from provision.stages.convert.compare import compare_logits, should_compare
from provision.stages.convert.hf_export import TOKENIZER_CHILD_MIN_BYTES, HfSideFiles, write_hf_side_files
from provision.stages.convert.items import Item, check_against_params, plan_items
from provision.stages.convert.output import (
    MISTRAL_SIDE_FILES,
    check_out,
    commit_output,
    copy_side_file,
    new_stage,
    side_files,
)
from provision.stages.convert.parallel import resolve_workers, usable_cpus
from provision.stages.convert.record import RECORD_NAME, ConvertResult, write_provenance, write_record
from provision.stages.convert.serve import vllm_command
from provision.stages.convert.source import SafetensorsSource, find_sources
from provision.stages.convert.stream import stream_tensors
from provision.stages.profiles import QUANTIZED, Profile, choose

SHARD_BYTES = 5 * 10**9
REHASH_BYTES = 16 << 20  # read size when a file is hashed on its own
REHASH_DEPTH = 3  # its read buffers: the next pieces are read while one is hashed
KEEP_AHEAD_BYTES = 256 << 20  # source pages the source hasher leaves cached ahead of the conversion


class ConvertCancelled(ConvertError):
    """The conversion was called off (``ConvertHooks.abort``) before it committed; nothing was."""


@dataclass(frozen=True)
class ConvertHooks:
    """How a conversion that overlaps its source's download (``provision.stages.overlap``) reads it:
    ``open_source(path, src_dir)`` opens a weights file whose reads wait for verified bytes,
    ``src_dir`` is the folder the record names (where the verified original lands) and
    ``source_identity`` is asked for only before the provenance record is written (after the
    download was verified). ``abort`` calls the conversion off from another thread: it is looked
    at between steps, and the commit happens under ``lock`` with ``abort`` clear, so whoever sets
    ``abort`` while holding ``lock`` (``cancel``) knows the conversion either committed already or
    never will. ``side_ready(name)``, when given, blocks until the side file ``name`` (e.g.
    ``tekken.json``) is complete, so it can be read while the tensors stream (``ConvertCancelled``,
    or the overlap's own error, once the run gave up)."""

    open_source: Callable[[Path, Path], SafetensorsSource]
    src_dir: Path
    source_identity: Callable[[], SourceIdentity | None]
    abort: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    side_ready: Callable[[str], None] | None = None

    def check(self) -> None:
        """``ConvertCancelled`` once ``abort`` is set."""
        if self.abort.is_set():
            raise ConvertCancelled("The conversion was called off before it was committed.")

    @contextlib.contextmanager
    def committing(self) -> Iterator[None]:
        """Hold ``lock`` for the commit, which happens only if ``abort`` is still clear."""
        with self.lock:
            self.check()
            yield

    def cancel(self) -> None:
        """Call the conversion off; once this returns it has committed already or never will."""
        with self.lock:
            self.abort.set()


def _writer(out_dir: Path, items: list[Item], profile: Profile, source_files: list[dict[str, Any]],
            shard_bytes: int, *, final_header: bool = True) -> CheckpointWriter:
    """The shard writer of the layout: one ``consolidated.safetensors``, or ``model*.safetensors`` shards
    (``final_header``: the source digests in their headers are known already)."""
    entries = [e for it in items for e in it.entries]
    metadata = {"format": "pt", "provision.scheme": profile.scheme, "provision.layout": profile.layout,
                "provision.source": json.dumps(source_files, separators=(",", ":"))}
    if profile.layout == "mistral":
        return CheckpointWriter(out_dir, [entries], ["consolidated.safetensors"], metadata=metadata, index_name=None,
                                final_header=final_header)
    shards = plan_shards(entries, shard_bytes)
    m = len(shards)
    names = ["model.safetensors"] if m == 1 else [f"model-{i + 1:05d}-of-{m:05d}.safetensors" for i in range(m)]
    return CheckpointWriter(out_dir, shards, names, metadata=metadata,
                            index_name=None if m == 1 else "model.safetensors.index.json", final_header=final_header)


def _refuse_unquantizable(items: list[Item], prof: Profile) -> None:
    """A quantized scheme that would quantize no layer of this model is refused (exit 3) before
    anything is written: its output would declare a ``quantization_config`` no layer carries."""
    if prof.scheme in QUANTIZED and not any(it.action == "quantize" for it in items):
        from provision.quant import SCHEMES

        spec = SCHEMES[prof.scheme]
        size = f" (in_features must be a multiple of the group size {spec.group_size})" if spec.group_size else ""
        raise ManifestError(f"--scheme {prof.scheme} would quantize no layer of this model{size}; use --scheme "
                            "bf16 or fp16 instead.", scheme=prof.scheme)


def _source_files(sources: list[SafetensorsSource], side: list[Path],
                  known: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The record's ``source_files``: a digest the caller gave (``known``) is in from the start
    (``sha256_from: caller``, so the shard headers need no patch), the others are zero until
    filled in while streaming."""
    known = known or {}
    return [{"path": s.path.name, "size": s.size, "sha256": known.get(s.path.name, "0" * 64),
             "sha256_from": "caller" if s.path.name in known else "computed"}
            for s in sources] + [{"path": p.name, "size": p.stat().st_size} for p in side if p.name == "params.json"]


def _hash_fd(fd: int, stop: threading.Event | None = None, reader: SafetensorsSource | None = None) -> str:
    """The sha256 of an open file (``stop`` set: abandoned, ``ConvertError``). Read with ``O_DIRECT``
    where it can (the disk writes into the buffer: no copy out of the page cache, the CPU cost that
    dominates reading on a small VM), else in big pieces dropped from the page cache behind; then,
    with ``reader`` (the conversion reading the same file), pages up to ``KEEP_AHEAD_BYTES`` ahead
    of its position stay cached for it to read (it drops them). A helper thread reads the next
    pieces while this one hashes (``ReadAhead``): the digest is ready after the slower of the disk
    and sha256, not their sum (it decides how much of the output must be read back to be hashed)."""
    import hashlib

    h = hashlib.sha256()
    dfd = reopen_direct(fd)
    off = 0

    def fill(mv: memoryview, _stop: threading.Event) -> int:
        nonlocal dfd, off
        if dfd is not None:
            try:
                n = os.preadv(dfd, [mv], off)
            except OSError:  # the filesystem refused the direct read after all: read through the cache
                os.close(dfd)
                dfd = None
        if dfd is None:
            n = os.preadv(fd, [mv], off)
            ahead = off - reader.read_end if reader is not None else -1
            if not 0 <= ahead <= KEEP_AHEAD_BYTES:
                with contextlib.suppress(OSError, AttributeError):  # advice only (and missing on macOS)
                    os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
        off += n
        return n

    try:
        with ReadAhead(fill, size=REHASH_BYTES, depth=REHASH_DEPTH, name="sha256-source-read") as ahead:
            while block := ahead.next():
                if stop is not None and stop.is_set():
                    raise ConvertError("The source hash was abandoned.")
                h.update(block)
    finally:
        if dfd is not None:
            os.close(dfd)
    return h.hexdigest()


def _hash_file(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _hash_fd(fd)
    finally:
        os.close(fd)


def _stamp(s: SafetensorsSource) -> tuple[int, int, int]:
    st = os.fstat(s.fd)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


class _SourceHashes:
    """The sha256 of the source files the caller did not vouch for, computed on helper threads
    from the start of the conversion (while torch loads and the plan is made), so that the shard
    headers, which record them, are final early and the output is hashed as it is written instead
    of being read back. The conversion reads the same open files; ``check_unchanged`` refuses a
    source whose size or modification time changed meanwhile (the digest would not be of the bytes
    converted)."""

    def __init__(self, sources: list[SafetensorsSource], known: Mapping[str, str]) -> None:
        self.todo = [s for s in sources if s.path.name not in known]
        self.names = {s.path.name for s in self.todo}
        self.stamps = {s.path.name: _stamp(s) for s in self.todo}
        self.ex = ThreadPoolExecutor(max_workers=max(1, min(len(self.todo), usable_cpus())),
                                     thread_name_prefix="sha256-source")
        self.stop = threading.Event()
        self.futures = {s.path.name: self.ex.submit(_hash_fd, s.fd, self.stop, s) for s in self.todo}
        self.waiter: threading.Thread | None = None

    def when_done(self, fn: Callable[[dict[str, str]], None]) -> None:
        """Call ``fn({name: sha256})`` on a helper thread once every digest is known (not at all
        when one failed: ``result`` raises that error)."""
        from concurrent.futures import wait

        def run() -> None:
            wait(list(self.futures.values()))
            if all(f.exception() is None for f in self.futures.values()):
                with contextlib.suppress(Exception):  # finish() patches the header itself then
                    fn({n: f.result() for n, f in self.futures.items()})

        self.waiter = threading.Thread(target=run, daemon=True, name="sha256-source-done")
        self.waiter.start()

    def result(self) -> dict[str, str]:
        """The digests (a read error raised as it happened)."""
        return {n: f.result() for n, f in self.futures.items()}

    def check_unchanged(self, sources: list[SafetensorsSource]) -> None:
        for s in sources:
            if s.path.name in self.stamps and _stamp(s) != self.stamps[s.path.name]:
                raise ConvertError(f"{s.path.name} changed during the conversion; nothing was written. Run "
                                   "convert again when nothing writes the source.", path=str(s.path))

    def close(self) -> None:
        self.stop.set()
        self.ex.shutdown(wait=True, cancel_futures=True)
        if self.waiter is not None:
            self.waiter.join()


def _output_digests(stage: Path, written: Mapping[str, str], names: list[str]) -> dict[str, str]:
    """``{name: sha256}`` of the weight files in ``stage``: the writer's digests of what it wrote
    (``written``) and, for a shard whose header was patched after its bytes were hashed, the file
    read back once (the shards in parallel: hashlib releases the GIL)."""
    todo = [n for n in names if n.endswith(".safetensors") and n not in written]
    out = {n: d for n, d in written.items() if n in names}
    if todo:
        with ThreadPoolExecutor(max_workers=min(len(todo), usable_cpus())) as ex:
            out.update(zip(todo, ex.map(lambda n: _hash_file(stage / n), todo), strict=True))
    return out


def _check_output(stage: Path, known_sha256: Mapping[str, str] | None = None) -> dict[str, tuple[int, str]]:
    """The checks a conversion passes before it is committed: ``verify``'s structure checks of the
    weights and index, then the loader's load check (names, shapes, quantized layers, on meta).
    ``known_sha256`` (the digests of the weight files as they were written) stands in for reading
    those files again; every other file is read. Returns verify's ``{path: (size, sha256)}``, for
    the provenance record."""
    from provision.model.loader import check_loadable
    from provision.stages.verify import verify_dir
    from provision.stages.verify.authority import Authority
    from provision.stages.verify.scan import scan
    from provision.stages.verify.verifier import verify_files

    if known_sha256:  # verify_dir's own checks (authority "none"), the known digests not read again
        expected = {e.rel: Authority(kind="none") for e in scan(stage) if e.readable}
        report = verify_files(stage, expected, known_sha256=known_sha256, check_params=True)
    else:
        report = verify_dir(stage)
    report.raise_for_failure()
    check_loadable(stage)
    return report.facts


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
    force: bool = False,
    compare: bool | None = False,
    source_identity: SourceIdentity | None = None,
    workers: int | None = None,
    hooks: ConvertHooks | None = None,
) -> ConvertResult:
    """Convert the Mistral-format checkpoint in ``src_dir`` into ``out_dir`` for ``target``.

    The output is written into a staging folder beside ``out_dir`` and moved there only when it
    passed ``verify``'s structure checks, the loader's load check and (``compare``; ``None``: the
    default of ``should_compare``) the logit comparison against the source; any failure removes
    it. ``out_dir`` must be new, empty or an earlier conversion; ``force`` adds the conversion to
    a folder holding other files without ever overwriting one (``output.check_out``).
    ``source_sha256`` maps source file names to sha256 digests the caller has just verified
    (``provision run`` passes what verify computed); those files are recorded with that digest
    instead of being hashed again while streaming. ``source_identity`` (manifest, infohash, Hub
    repository) goes into the ``provenance.json`` written into the staging folder before the
    commit. ``workers`` threads convert the tensors
    (``parallel.resolve_workers``: ``None`` reads ``PROVISION_CONVERT_WORKERS``, else the usable
    CPUs, at most 8); the output is the same for any number. ``hooks``: see ``ConvertHooks``.
    """
    t0 = time.monotonic()
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    args = ModelArgs.from_file(src_dir / "params.json")
    tgt = target if isinstance(target, Target) else parse_target(target)
    prof = choose(args, tgt, scheme, layout, context=context)
    n_workers = resolve_workers(workers)
    paths = find_sources(src_dir)
    side = side_files(src_dir)
    mode = check_out(src_dir, out_dir, force=force)
    sources: list[SafetensorsSource] = []
    hashes: _SourceHashes | None = None
    try:
        sources += [hooks.open_source(p, src_dir) if hooks else SafetensorsSource(p, root=src_dir) for p in paths]
        if hooks is None:  # a source still arriving (hooks) is hashed as it streams instead
            hashes = _SourceHashes(sources, source_sha256 or {})
        items = plan_items(sources, args, prof)
        check_against_params(items, args)
        _refuse_unquantizable(items, prof)
        source_files = _source_files(sources, side, source_sha256)
        stage = new_stage(out_dir)
        try:
            res, output_sha256 = _write(src_dir, stage, out_dir, args, tgt, prof, items, sources, side, source_files,
                         shard_bytes=shard_bytes, context=context, progress=progress, hf_tokenizer=hf_tokenizer,
                         source_sha256=source_sha256 or {}, t0=t0, workers=n_workers, hashes=hashes,
                         side_ready=hooks.side_ready if hooks is not None else None)
            if hooks is not None:
                hooks.check()
                res.src_dir, source_identity = hooks.src_dir, hooks.source_identity()
            facts = _check_output(stage, output_sha256)
            if compare if compare is not None else should_compare(res.bytes_read):
                res.logits_comparison = compare_logits(src_dir, stage)
            res.seconds = time.monotonic() - t0
            write_record(res, context=context, folder=stage)
            write_provenance(res, stage, context=context, source=source_identity, side=side,
                             source_sha256=source_sha256 or {}, output_facts=facts)
            with hooks.committing() if hooks is not None else contextlib.nullcontext():
                commit_output(stage, out_dir, mode, [n for n, _ in res.files] + [RECORD_NAME, PROVENANCE_NAME])
        finally:
            shutil.rmtree(stage, ignore_errors=True)  # gone after a commit; a failed run leaves nothing
    finally:
        if hashes is not None:
            hashes.close()
        for s in sources:
            s.close()
    if progress is not None:
        progress(ProgressEvent(task="convert", done=res.bytes_read, total=res.bytes_read, unit="B",
                               description=f"convert -> {prof.name}", finished=True))
    return res


def _write(src_dir: Path, stage: Path, out_dir: Path, args: ModelArgs, tgt: Target, prof: Profile,
           items: list[Item], sources: list[SafetensorsSource], side: list[Path], source_files: list[dict[str, Any]],
           *, shard_bytes: int, context: int, progress: ProgressFn | None, hf_tokenizer: bool,
           source_sha256: Mapping[str, str], t0: float, workers: int,
           hashes: _SourceHashes | None = None,
           side_ready: Callable[[str], None] | None = None) -> tuple[ConvertResult, dict[str, str]]:
    """Stream the tensors and write the side files of the layout into ``stage``; the result (for
    ``out_dir``) and the sha256 of every weight file written (``_output_digests``). ``hashes``
    computes the digests of the sources the caller did not give; once they are known the shard
    headers are final and the shards are hashed as they are written. The ``hf`` layout's side
    files (the tokenizer built from tekken.json takes seconds) are written on a helper thread
    while the tensors stream, once ``side_ready`` says tekken.json is complete."""
    # final only when every digest is known now (an overlapped fetch names its files at once but
    # may give their digests only at the end: their shards are hashed once the header is patched)
    final = all(source_sha256.get(s.path.name) is not None for s in sources)
    writer = _writer(stage, items, prof, source_files, shard_bytes, final_header=final)

    def fill(digests: Mapping[str, str]) -> str:
        for f in source_files:
            if f["path"] in digests:
                f["sha256"], f["sha256_from"] = digests[f["path"]], "computed"
        return json.dumps(source_files, separators=(",", ":"))

    bytes_read = sum(s.size for s in sources)

    def hf_side_files() -> HfSideFiles:
        if side_ready is not None and (src_dir / "tekken.json").exists():
            side_ready("tekken.json")
        return write_hf_side_files(src_dir, stage, args, prof, items, writer.data_bytes, hf_tokenizer=hf_tokenizer,
                                   tokenizer_in_child=bytes_read >= TOKENIZER_CHILD_MIN_BYTES)

    # the side files' thread writes into ``stage``: leaving the block waits for it, a failure included
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="convert-side") as side_pool:
        hf_side = side_pool.submit(hf_side_files) if prof.layout == "hf" else None
        try:
            if hashes is not None and not final:
                hashes.when_done(lambda d: writer.finalize_header({"provision.source": fill(d)}))
            check_free_space(stage, writer.total_size + (64 << 20), what=f"the {prof.name} conversion")
            on_bytes = ByteCounter(progress, task="convert", total=sum(s.size - s.data_start for s in sources),
                                   description=f"convert -> {prof.name}", interval=0.2, report_end=True)
            reports = stream_tensors(sources, items, writer, prof.scheme, source_files, source_sha256, on_bytes,
                                     workers=workers, hashed_elsewhere=hashes.names if hashes is not None else ())
            if hashes is not None:
                fill(hashes.result())
                hashes.check_unchanged(sources)
            writer.finish({"provision.source": json.dumps(source_files, separators=(",", ":"))})
            files = [p.name for p in writer.commit()]
            output_sha256 = _output_digests(stage, writer.digests(), files)
        except BaseException:
            writer.abort()
            raise
        hf = hf_side.result() if hf_side is not None else None
    notes: list[str] = []
    hf_tok = False
    if hf is None:
        files += [copy_side_file(p, src_dir, stage) for p in side if MISTRAL_SIDE_FILES.match(p.name)]
    else:
        files += hf.files
        notes += hf.notes
        hf_tok = hf.hf_tokenizer
    sizes = [(n, (stage / n).stat().st_size) for n in files]
    return ConvertResult(src_dir=src_dir, out_dir=out_dir, target=tgt, profile=prof, files=sizes,
                         source_files=source_files, tensors=reports, bytes_read=bytes_read,
                         bytes_written=sum(s for _, s in sizes), seconds=time.monotonic() - t0,
                         vllm_command=vllm_command(out_dir, prof, context, hf_tokenizer=hf_tok,
                                                      multimodal=args.vision_encoder is not None),
                         notes=notes), output_sha256
