"""Converting while fetching: ``provision run`` converts the tensors whose pieces a torrent
download has verified (or, from the Hub, whose bytes have been written) while the rest of the
download is still arriving.

``Overlap.attach`` is the fetch's ``piece_watch``: it receives the torrent download's
``StreamHasher`` (its ``have`` map says which pieces libtorrent passed hash-checking and flushed),
or the Hub download's ``HubStream`` (the same face over the partial files: a "piece" is ``have``
once the written prefix covers it, unverified until the whole-file sha256 passes), and starts one thread that waits for the small side files (``params.json``, tokenizer; their
pieces are asked for first) and for each weight file's header, then runs the ordinary
``stages.convert.convert`` over a private source folder (``staging/<model>/overlap-<pid>/``:
copies of the side files, hard links of the staged weight files) whose reads wait until their
byte range is verified (``GatedSource``). The conversion stops before its last step: the source
digests it records come from ``LateDigests``, which wait for the pipeline's verdict on the whole
download (``Gate``: the fetch's and verify's full checks passed), so the profile is committed only
after every source file passed its full verification; a failure discards it (the convert stage's
staging folder is removed, nothing is committed). A killed run redoes the conversion (no
per-tensor state is kept: the state file records a conversion only once it is committed). Before
the commit, every file the conversion read must be the very inode the fetch put in place, and no
source file may have started over (``restarted``, a Hub download the server would not continue):
otherwise the conversion is discarded and the pipeline converts after the fetch.

It does nothing when a torrent's weight file was already in place before the download (the
pipeline then converts after the fetch as before), nor for an adopted folder. It does not choose
what to download, verify files or write the state file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provision.errors import ProvisionError, StructureError
from provision.formats.params import ModelArgs
from provision.formats.provenance import SourceIdentity
from provision.formats.safetensors import MAX_HEADER_BYTES
from provision.progress import ProgressFn, note
from provision.stages.convert.source import SOURCE_NAME, SafetensorsSource

if TYPE_CHECKING:
    from provision.hardware import Target
    from provision.stages.convert.record import ConvertResult
    from provision.stages.convert.stage import ConvertHooks
    from provision.stages.profiles import Profile

WAIT_S = 0.2  # how often a waiting reader looks at the abort flag
VIEW_PREFIX = "overlap-"


class OverlapCancelled(ProvisionError):
    """The download failed or the run ended before the overlapped conversion could be committed."""


class OverlapUnavailable(Exception):
    """This download cannot be converted while it arrives; the pipeline converts after it instead."""


class Gate:
    """The pipeline's verdict on the download: resolved with the verified digests, or failed."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.digests: dict[str, str] | None = None
        self.identity: SourceIdentity | None = None
        self.error: BaseException | None = None

    def resolve(self, digests: Mapping[str, str], identity: SourceIdentity | None) -> None:
        with self.cond:
            if self.error is None:
                self.digests, self.identity = dict(digests), identity
            self.cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self.cond:
            if self.digests is None and self.error is None:
                self.error = error
            self.cond.notify_all()

    @property
    def failed(self) -> bool:
        return self.error is not None

    def wait(self) -> dict[str, str]:
        with self.cond:
            while self.digests is None and self.error is None:
                self.cond.wait(WAIT_S)
            if self.error is not None:
                raise OverlapCancelled(f"The download was not verified ({self.error}); the overlapped conversion "
                                       "is discarded.")
            assert self.digests is not None
            return self.digests


class LateDigests(Mapping[str, str]):
    """The weight files' verified sha256, asked for when the conversion has streamed every tensor:
    ``[name]`` waits for the ``Gate`` (and raises when the download failed). ``name in`` and
    ``get`` answer at once: ``get`` gives the digest the manifest expects (verify checks the file
    against exactly that one, and the gate fails otherwise) or the default, a placeholder that
    convert replaces with ``[name]`` once the tensors are streamed."""

    def __init__(self, names: list[str], gate: Gate, expected: Mapping[str, str] | None = None) -> None:
        self.names, self.gate = names, gate
        self.expected = {k: v for k, v in (expected or {}).items() if k in names}

    def __contains__(self, name: object) -> bool:  # Mapping's own would look the digest up (and wait)
        return name in self.names

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return self.expected.get(name, default) if name in self.names else default

    def __getitem__(self, name: str) -> str:
        if name not in self.names:
            raise KeyError(name)
        digests = self.gate.wait()
        if name not in digests:  # verify vouched for no digest of this file: nothing to record
            raise OverlapCancelled(f"No verified sha256 for {name}; the overlapped conversion is discarded.")
        return digests[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class PieceMap:
    """Which bytes of the staged files are verified: the hasher's ``have`` map of pieces (marked once
    a ``flush_cache`` fence after libtorrent's hash check completed, which on a busy disk lags the
    download by seconds), or a piece this reader checked itself: libtorrent has it and the bytes in
    the file match the torrent's v1 SHA-1 of that piece (``piece_hash``; a piece reaching past its
    file waits for the fence). A piece a reader waits for gets the top priority (7): libtorrent's
    in-order picking leaves pieces behind, and the conversion reads in file order. (Deadlines,
    ``set_piece_deadline``, made such pieces arrive last behind a full request pipeline.)"""

    def __init__(self, hasher: Any, abort: threading.Event, handle: Any = None,
                 piece_hash: Callable[[int], bytes] | None = None) -> None:
        self.hasher, self.abort, self.handle, self.piece_hash = hasher, abort, handle, piece_hash
        self.pl = int(hasher.pl)
        self.asked: set[int] = set()
        self.checked: set[int] = set()  # pieces this reader hashed itself

    def _self_check(self, p: int, offset: int, size: int, read: Callable[[int, int], bytes]) -> bool:
        """Piece ``p`` is in the file and matches the torrent's SHA-1 of it (never raises)."""
        start = p * self.pl - offset
        if self.piece_hash is None or self.handle is None or start < 0 or start + self.pl > size:
            return False
        try:
            if not self.handle.have_piece(p):
                return False
            return hashlib.sha1(read(start, self.pl)).digest() == self.piece_hash(p)
        except (RuntimeError, OSError, ValueError):  # the torrent is gone, or a short read: wait for the fence
            return False

    def hurry(self, pieces: list[int]) -> None:
        """Ask libtorrent for these pieces before the others (top priority, once each)."""
        for p in pieces:
            if p in self.asked or self.handle is None:
                continue
            self.asked.add(p)
            try:
                self.handle.piece_priority(p, 7)
            except (RuntimeError, AttributeError):  # the torrent is gone, or an old binding: in order, later
                self.handle = None

    def pieces(self, offset: int, start: int, n: int) -> range:
        """The pieces holding bytes ``[start, start + n)`` of a file at torrent ``offset``."""
        if n <= 0:
            return range(0)
        return range((offset + start) // self.pl, (offset + start + n - 1) // self.pl + 1)

    def wait(self, offset: int, start: int, n: int, read: Callable[[int, int], bytes] | None = None,
             size: int = 0) -> None:
        """Block until those bytes are verified; ``OverlapCancelled`` when the run gave up. With
        ``read(start, length)`` (the file's bytes) and its ``size``, pieces are also checked here."""
        want = self.pieces(offset, start, n)
        h = self.hasher
        self.hurry([p for p in want if not h.have[p]])
        while True:
            missing = [p for p in want if not h.have[p] and p not in self.checked]
            if not missing:
                return
            if self.abort.is_set() or h.stopped:
                raise OverlapCancelled("The download stopped before these bytes were verified.")
            if read is not None:
                self.checked.update(p for p in missing if self._self_check(p, offset, size, read))
                if all(p in self.checked for p in missing):
                    return
            with h.cond:
                if not all(h.have[p] for p in missing):
                    h.cond.wait(WAIT_S)


class GatedSource(SafetensorsSource):
    """A staged weight file whose reads wait for their verified pieces (``PieceMap``)."""

    def __init__(self, path: Path, root: Path, pieces: PieceMap, offset: int, size: int, progress: ReadLog) -> None:
        self.piece_map, self.offset, self.log = pieces, offset, progress
        # the header's pieces were waited for before the file was linked; a Hub partial is still growing
        super().__init__(path, root=root, size=size)

    def read_into(self, mv: memoryview, start: int) -> None:
        if self.piece_map.abort.is_set():  # the run ended: no further tensor is read
            raise OverlapCancelled("The run ended before the overlapped conversion was committed.")
        self.piece_map.wait(self.offset, start, mv.nbytes, read=lambda s, k: os.pread(self.fd, k, s), size=self.size)
        super().read_into(mv, start)
        self.log.add(mv.nbytes)


class ReadLog:
    """Bytes the conversion read, with when: how much was converted before the last byte arrived."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.points: list[tuple[float, int]] = []
        self.total = 0

    def add(self, n: int) -> None:
        with self.lock:
            self.total += n
            self.points.append((time.monotonic(), self.total))

    def before(self, t: float) -> int:
        with self.lock:
            return max((b for at, b in self.points if at <= t), default=0)


def _v1_hashes(handle: Any) -> Callable[[int], bytes] | None:
    """The torrent's v1 SHA-1 of a piece (None for a v2-only torrent: the reader waits for the fence)."""
    try:
        ti = handle.torrent_file()
        if ti is None or not ti.info_hashes().has_v1():
            return None
    except (RuntimeError, AttributeError):  # an older binding or a handle going away
        return None
    return lambda p: bytes(ti.hash_for_piece(p))


def _pread(path: Path, start: int, n: int) -> bytes:
    with open(path, "rb") as fh:
        return os.pread(fh.fileno(), n, start)


def _preload() -> None:
    """Import what the conversion needs (torch, the loader, verify) ahead of it."""
    import torch  # noqa: F401

    import provision.model.loader
    import provision.stages.verify  # noqa: F401


def clean_views(staging: Path) -> None:
    """Remove the source views a killed run left in the model's staging folder (run holds the lock)."""
    if not staging.is_dir():
        return
    for p in staging.iterdir():
        if p.name.startswith(VIEW_PREFIX) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


class Overlap:
    """One run's conversion while fetching (see the module docstring)."""

    def __init__(self, *, staging: Path, original: Path, choose: Callable[[ModelArgs], tuple[Target, Profile]],
                 out_dir: Callable[[Profile], Path], context: int, workers: int | None,
                 progress: ProgressFn | None, expected_sha256: Mapping[str, str] | None = None) -> None:
        self.staging, self.original = staging, original
        self.choose, self.out_dir, self.context, self.workers = choose, out_dir, context, workers
        self.progress, self.expected = progress, dict(expected_sha256 or {})
        self.gate = Gate()
        self.abort = threading.Event()
        self.log = ReadLog()
        self.view = staging / f"{VIEW_PREFIX}{os.getpid()}"
        self.source: Any = None  # the fetch's StreamHasher or HubStream
        self.linked: list[str] = []  # the files in the view
        self.thread: threading.Thread | None = None
        self.hooks: ConvertHooks | None = None  # the conversion's own; ``cancel`` calls it off through them
        self.result: ConvertResult | None = None
        self.error: BaseException | None = None
        self.profile: Profile | None = None
        self.started_at: float | None = None  # the conversion began (headers and side files in)
        self.committed_at: float | None = None
        # torch and the output checks take seconds to import: loaded while the fetch starts
        threading.Thread(target=_preload, name="provision-overlap-import", daemon=True).start()

    # -- the fetch's side ---------------------------------------------------------------------
    def attach(self, hasher: Any, handle: Any) -> None:
        """The torrent fetch's ``piece_watch``: ask for the side files first, start the conversion thread."""
        if self.thread is not None:
            return
        files = [f for f in hasher.files if "/" not in f.rel]
        weights = [f for f in files if SOURCE_NAME.fullmatch(f.rel)]
        side = [f for f in files if f not in weights]
        if not weights or not any(f.rel == "params.json" for f in side):
            return  # nothing this conversion could start from: the pipeline converts after the fetch
        self.source = hasher
        # digests the fetch holds the files to, known before their bytes (a Hub file's LFS sha256):
        # the conversion's headers are final at once; the manifest's, when given, come first
        self.expected = {**dict(getattr(hasher, "sha256", None) or {}), **self.expected}
        pieces = PieceMap(hasher, self.abort, handle, _v1_hashes(handle))
        # the side files whole (params.json, the tokenizer the conversion reads while the tensors
        # stream), then the first piece of every other file (the weights' headers)
        first = [p for f in side for p in pieces.pieces(f.offset, 0, f.size)]
        pieces.hurry(sorted(set(first + [p for f in files for p in pieces.pieces(f.offset, 0, 1)])))
        self.thread = threading.Thread(target=self._run, args=(pieces, weights, side), name="provision-overlap",
                                       daemon=True)
        self.thread.start()

    # -- the conversion thread ----------------------------------------------------------------
    def _run(self, pieces: PieceMap, weights: list[Any], side: list[Any]) -> None:
        from provision.stages.convert import convert
        from provision.stages.convert.stage import ConvertCancelled, ConvertHooks

        try:
            try:
                self._link_view(pieces, weights, side)
            except OSError as e:  # a staged name already moved into place (the fetch was quicker): convert after
                raise OverlapUnavailable(f"staged file gone: {e}") from None
            target, prof = self.choose(ModelArgs.from_file(self.view / "params.json"))
            self.profile = prof
            offsets, sizes = {f.rel: f.offset for f in weights}, {f.rel: f.size for f in weights}
            note(self.progress, "convert", f"converting to {prof.name} while the download continues")
            self.started_at = time.monotonic()
            hooks = ConvertHooks(
                open_source=lambda p, root: GatedSource(p, root, pieces, offsets[p.name], sizes[p.name], self.log),
                src_dir=self.original, source_identity=lambda: self.gate.identity, abort=self.abort,
                side_ready=lambda name: self._side_ready(pieces, side, name))
            self.hooks = hooks
            if self.abort.is_set():
                raise OverlapCancelled("The run ended before the overlapped conversion began.")
            self.result = convert(self.view, self.out_dir(prof), target=target, scheme=prof.scheme,
                                  layout=prof.layout, context=self.context, progress=self.progress,
                                  source_sha256=LateDigests([f.rel for f in weights], self.gate, self.expected),
                                  hooks=hooks, workers=self.workers)
            self.committed_at = time.monotonic()
        except ConvertCancelled as e:
            self.error = OverlapCancelled(str(e))
        except BaseException as e:  # handed to the pipeline's thread by ``finish``
            self.error = e
        finally:
            shutil.rmtree(self.view, ignore_errors=True)

    def _link_view(self, pieces: PieceMap, weights: list[Any], side: list[Any]) -> None:
        """The source view: params.json once verified, the weight files once their headers are, and
        the other files now (they are read only after the ``Gate``; the tokenizer may still be arriving)."""
        self.view.mkdir(parents=True, exist_ok=True)
        params = next(f for f in side if f.rel == "params.json")
        pieces.wait(params.offset, 0, params.size)
        self._link(params)
        for f in weights:
            self._wait_header(pieces, f)
            self._link(f)
        for f in side:
            if f.rel != "params.json" and f.size > 0:
                if not f.path.is_file():  # preallocated, else there once a piece of it is written
                    pieces.wait(f.offset, 0, 1)
                self._link(f)

    def _side_ready(self, pieces: PieceMap, side: list[Any], name: str) -> None:
        """Wait until the side file ``name`` is complete (its pieces verified; a Hub file: written in
        full, its sha256 checked before the commit), asking for its pieces first."""
        f = next((x for x in side if x.rel == name), None)
        if f is None or f.size == 0:
            return
        view = self.view / name
        pieces.wait(f.offset, 0, f.size, read=lambda s, k: _pread(view, s, k), size=f.size)

    def _link(self, f: Any) -> None:
        """Hard-link a staged file into the view: the fetch may move its name meanwhile, never its inode."""
        os.link(f.path, self.view / f.rel)  # OSError (no hard links here, or moved): converted after the fetch
        self.linked.append(f.rel)

    def stale(self) -> str | None:
        """Why the bytes converted are not the ones verified (the download is over), or None: a
        source file started over, or a file in the view is not the one now in place."""
        restarted = sorted(getattr(self.source, "restarted", ()))
        if restarted:
            return f"{restarted[0]} was downloaded again from its first byte"
        for rel in list(self.linked):
            try:
                if os.stat(self.view / rel).st_ino != os.stat(self.original / rel).st_ino:
                    return f"{rel} in place is not the file converted"
            except OSError:
                return f"{rel} is not in place"
        return None

    def _wait_header(self, pieces: PieceMap, f: Any) -> None:
        """Wait for a weight file's 8-byte length and then its whole header (bounded)."""
        if f.size < 8:
            raise StructureError(f"{f.rel} is too small to be a safetensors file.", path=f.rel)
        pieces.wait(f.offset, 0, 8)
        with open(f.path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
        if n > MAX_HEADER_BYTES or 8 + n > f.size:  # convert's own reader says why, once the file is verified
            raise OverlapUnavailable(f"{f.rel}: header of {n} bytes")
        pieces.wait(f.offset, 0, 8 + n)

    # -- the pipeline's side ------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self.thread is not None

    def cancel(self, error: BaseException) -> None:
        """The download (or the run) failed: discard the conversion and wait for its thread. Once the
        abort is set (under the conversion's commit lock) it has committed already or never will;
        it stops at its next read or step."""
        self.gate.fail(error)
        hooks = self.hooks
        if hooks is not None:
            hooks.cancel()
        self.abort.set()
        self.join()

    def join(self, timeout: float = 600.0) -> None:
        """Wait for the conversion thread, in short slices: a SIGTERM the kernel handed to another
        thread (it does when the main one cannot take it, e.g. the process was stopped) only runs
        its handler once the main thread is back in Python, which an unbounded join would delay
        until the conversion ends."""
        end = time.monotonic() + timeout
        while self.thread is not None and self.thread.is_alive() and time.monotonic() < end:
            self.thread.join(min(WAIT_S, max(0.0, end - time.monotonic())))

    def finish(self, digests: Mapping[str, str], identity: SourceIdentity, prof: Profile) -> ConvertResult | None:
        """The download is verified: let the conversion commit and return its result; ``None`` when it
        cannot stand in for a conversion of ``prof`` (never started, another profile, not possible here)."""
        if self.thread is None:
            return None
        if self.profile is not None and self.profile.name != prof.name:
            self.cancel(OverlapCancelled(f"the run converts to {prof.name}"))
            return None
        why = self.stale() if self.thread.is_alive() else None
        if why is not None:
            note(self.progress, "convert", f"the conversion while fetching is discarded ({why}); converting again")
            self.cancel(OverlapCancelled(why))
            return None
        self.gate.resolve(digests, identity)
        self.join()
        if self.thread.is_alive():  # pragma: no cover - a conversion that outlives the bound
            self.cancel(OverlapCancelled("the overlapped conversion did not finish"))
            raise OverlapCancelled("The overlapped conversion did not finish in time.")
        # the download it followed stopped (another source delivered the files), or it could not start
        if isinstance(self.error, (OverlapUnavailable, OverlapCancelled)):
            return None
        if self.error is not None:
            raise self.error
        return self.result

    def report(self, last_byte_at: float | None, fetch_started_at: float | None) -> dict[str, Any]:
        """The run report's ``overlap`` facts."""
        out: dict[str, Any] = {"converted_while_fetching": self.result is not None}
        if self.started_at is not None and fetch_started_at is not None:
            out["convert_started_after_fetch_start_seconds"] = round(self.started_at - fetch_started_at, 3)
        if self.started_at is not None and last_byte_at is not None:
            out["convert_during_fetch_seconds"] = round(max(0.0, last_byte_at - self.started_at), 3)
            out["bytes_converted_before_last_byte"] = self.log.before(last_byte_at)
            out["bytes_converted"] = self.log.total
        return out
