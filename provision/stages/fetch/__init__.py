"""Fetch stage: bring a plan's files into its destination, verified.

``fetch(plan, ...)`` tries the plan's sources in order (``source="auto"``) or the one named,
moving to the next when one fails or stalls (a dead torrent falls back to the Hub). The
sources themselves live in the ``torrent`` package (the only importer of libtorrent) and the
``hub`` package (the only importer of huggingface_hub); both download into a staging folder and move a file under
its final name only after ``verify`` passed. A manifest's ``local`` source (files already on this disk) is taken
in by ``stages.adopt`` the same way, and is tried first. Unless the caller already holds it (``provision run``
does), the fetch holds the model's lock while it runs, so ``provision gc`` and ``provision rm`` leave its staging folder
and resume data alone. Nothing here prints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provision.errors import FetchError, ManifestError, UsageError
from provision.layout import Layout
from provision.progress import ProgressFn, note
from provision.stages.fetch.request import (
    NETWORK_CHOICES,
    SOURCE_CHOICES,
    ExistingPolicy,
    FetchedFile,
    FetchRequest,
    FetchResult,
    HubOptions,
    HubSnapshot,
    PlannedFile,
    TorrentOptions,
)

if TYPE_CHECKING:
    from provision.stages.fetch.signed import SignatureGate

__all__ = ["NETWORK_CHOICES", "SOURCE_CHOICES", "FetchRequest", "FetchResult", "FetchedFile", "HubOptions",
           "HubSnapshot", "PlannedFile", "TorrentOptions", "fetch", "model_lock", "source_order"]


def source_order(plan: FetchRequest, source: str) -> list[str]:
    """Which source types to try, in order."""
    if source not in SOURCE_CHOICES:
        raise UsageError(f"--source must be one of {', '.join(SOURCE_CHOICES)}, got {source!r}.")
    if plan.kind == "magnet" or plan.kind == "torrent":
        avail = ["torrent"]
    elif plan.kind == "hf":
        avail = ["hf"]
    else:
        assert plan.manifest is not None
        avail = [s.type for s in plan.manifest.sources_in_order()]
    if source == "auto":
        return avail
    if source not in avail:
        raise ManifestError(f"--source {source}: {plan.name} has no {source} source (it has {', '.join(avail)}).")
    return [source]


@contextlib.contextmanager
def model_lock(plan: FetchRequest, *, timeout: float | None = None) -> Iterator[Callable[[], None]]:
    """Hold ``plan``'s model lock (``LockTimeoutError``, exit 6, when another run or fetch holds it
    past ``timeout``); yields a function that releases it early (once the files are in place, before
    seeding). A model folder created only to hold the lock is removed again when empty."""
    from provision.store.lock import ModelLock

    m = Layout(plan.home).model(plan.name)
    created = not m.root.exists()
    try:
        with ModelLock(m.lock_file, timeout=timeout, command=f"fetch {plan.source[:200]}",
                       what=f"Model {m.dirname}") as held:
            yield held.release
    finally:
        if created:
            with contextlib.suppress(OSError):  # the fetch filled it (its default dest) or a run started meanwhile
                m.root.rmdir()


def fetch(
    plan: FetchRequest,
    *,
    source: str = "auto",
    dest: Path | None = None,
    torrent: TorrentOptions | None = None,
    hub: HubOptions | None = None,
    progress: ProgressFn | None = None,
    lock: bool = True,
    lock_timeout: float | None = None,
    pickles_as_data: bool = False,
    force: bool = False,
) -> FetchResult:
    """Fetch every file of ``plan`` into ``dest`` (default ``plan.dest``), verified. ``lock=False`` says
    the caller already holds the model's lock; otherwise it is held for the fetch (``lock_timeout``).
    ``pickles_as_data``: the caller imports the torrent's pickles, so they are verified as bytes, not refused.
    A file already in a ``dest`` outside the store, under a name the fetch writes, that is not the
    verified file is refused (``UsageError``, exit 2) unless ``force`` (then replaced and named)."""
    order = source_order(plan, source)
    target = Path(dest) if dest else plan.dest
    policy = existing_policy(plan, target, force)
    torrent = replace(torrent or TorrentOptions(), existing=policy)
    hub = replace(hub or HubOptions(), existing=policy)
    from provision.stages.fetch.signed import gate_for

    gate = gate_for(plan)  # a manifest's [signing] pin: every fetcher checks its staged files before committing
    if gate is not None:
        plan = gate.request(plan, target)
        gate.prefetch()
    with model_lock(plan, timeout=lock_timeout) if lock else contextlib.nullcontext(None) as release:
        return _fetch_in_order(plan, order, target, torrent, hub, progress, pickles_as_data, release, gate)


def existing_policy(plan: FetchRequest, dest: Path, force: bool) -> ExistingPolicy:
    """"replace" inside the store's models folder (provision wrote what is there and repairs it),
    else "force" or "refuse": a folder of the user's, whose files no fetch replaces unasked."""
    models = Layout(plan.home).models.resolve()
    if dest.resolve().is_relative_to(models):
        return "replace"
    return "force" if force else "refuse"


def _fetch_in_order(plan: FetchRequest, order: list[str], target: Path, torrent: TorrentOptions | None,
                    hub: HubOptions | None, progress: ProgressFn | None, pickles_as_data: bool = False,
                    on_placed: Callable[[], None] | None = None, gate: SignatureGate | None = None) -> FetchResult:
    """Try ``order``'s sources one after the other until one delivers."""
    attempts: list[dict[str, Any]] = []
    last: FetchError | None = None
    for i, kind in enumerate(order):
        try:
            if kind == "local":
                from provision.stages.adopt import fetch_local

                res = fetch_local(plan, dest=target, progress=progress, gate=gate)
            elif kind == "torrent":
                from provision.stages.fetch.torrent import fetch_torrent

                res = fetch_torrent(plan, dest=target, options=torrent or TorrentOptions(), progress=progress,
                                    pickles_as_data=pickles_as_data, on_placed=on_placed, gate=gate)
            else:
                from provision.stages.fetch.hub import fetch_hub

                res = fetch_hub(plan, dest=target, options=hub or HubOptions(), progress=progress, gate=gate)
        except FetchError as e:
            attempts.append({"source": kind, "error": e.to_dict()})
            last = e
            if i + 1 < len(order):
                note(progress, "fetch", f"source {kind} failed ({e}); trying {order[i + 1]}")
                continue
            raise
        res.attempts = attempts + res.attempts
        if gate is not None:
            res.extra["signature"] = gate.result  # names and hashes only: no key material
        return res
    assert last is not None  # pragma: no cover
    raise last
