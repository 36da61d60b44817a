"""A Hub repo's file list at one commit: resolved online, or read back from the offline record.

``resolve_snapshot`` asks the Hub which commit a revision points to (unless a commit is given)
and lists that commit's files with their sizes, git blob ids and LFS sha256. ``hub_listing`` is
what the planner calls: it returns the ``HubSnapshot``, which the plan carries to ``fetch_hub``
so the download uses exactly the commit that was listed. ``HubRecord`` is ``hub-record.json`` in
the staging folder: which commit each revision resolved to and each commit's files, so that
``HF_HUB_OFFLINE=1`` can still verify a local copy. Nothing here downloads file contents.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from provision.errors import DiskSpaceError, FetchError, ProvisionError
from provision.formats.sources import HEX40, HFRef
from provision.io.atomic import atomic_write_text
from provision.io.paths import safe_relpath
from provision.layout import Layout
from provision.progress import ProgressFn
from provision.stages.fetch.hub.env import hub_endpoint, hub_offline, resolve_token
from provision.stages.fetch.hub.errors import hub_error, with_retries
from provision.stages.fetch.hub.http import list_tree
from provision.stages.fetch.request import HubOptions, HubSnapshot, RemoteFile

RECORD_SCHEMA = 1


def resolve_snapshot(endpoint: str, repo: str, revision: str, token: str | None, options: HubOptions,
                     progress: ProgressFn | None = None, commit: str | None = None) -> HubSnapshot:
    """Resolve ``revision`` to a commit (unless given) and list every file of that commit."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token if token else False)

    def err(e: BaseException) -> ProvisionError:
        return hub_error(e, repo=repo, revision=revision, path=None, token=bool(token), endpoint=endpoint)

    if commit is None:
        info = with_retries(lambda: api.model_info(repo, revision=revision, timeout=options.stall_timeout),
                            retries=options.retries, what=err, progress=progress,
                            give_up_after=options.stall_timeout)
        commit = str(info.sha or "")
        if not HEX40.match(commit):
            raise FetchError(f"{endpoint} did not return a commit id for {repo}@{revision}.",
                             hint="Check that HF_ENDPOINT points to a Hugging Face Hub.", repo=repo)
    pinned = commit

    from huggingface_hub.hf_api import RepoFile

    def listing() -> list[Any]:  # not api.list_repo_tree: its http_backoff would retry on its own
        return [RepoFile(**e) for e in list_tree(endpoint, repo, pinned, token, options.stall_timeout)
                if e.get("type") == "file"]  # not a folder

    entries = with_retries(listing, retries=options.retries, what=err, progress=progress,
                           give_up_after=options.stall_timeout)
    files: dict[str, RemoteFile] = {}
    for e in entries:
        path = str(e.path)
        safe_relpath(path, what=f"file name from {repo}")
        lfs = e.lfs
        files[path] = RemoteFile(path=path, size=int(e.size), blob_id=e.blob_id,
                                 lfs_sha256=str(lfs.sha256).lower() if lfs is not None else None)
    return HubSnapshot(endpoint=endpoint, repo=repo, revision=revision, commit=pinned, files=files)


def hub_listing(ref: HFRef, options: HubOptions | None = None) -> HubSnapshot | None:
    """``ref``'s files at the commit its revision points to now (``options`` carry the token and
    stall timeout). With ``HF_HUB_OFFLINE`` set, the snapshot recorded by the last fetch, or None."""
    from provision.settings import Settings

    revision = ref.revision or "main"
    if hub_offline():
        return HubRecord(Layout(Settings.load().home).staging(ref.repo)).snapshot(ref.repo, revision)
    opts = options or HubOptions()
    return resolve_snapshot(hub_endpoint(), ref.repo, revision, resolve_token(opts), opts)


class HubRecord:
    """``hub-record.json``: which commit each revision resolved to, and each commit's files."""

    def __init__(self, staging: Path) -> None:
        self.path = staging / "hub-record.json"

    def load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {"schema": RECORD_SCHEMA, "repos": {}}
        if not isinstance(data, dict) or data.get("schema") != RECORD_SCHEMA or not isinstance(data.get("repos"), dict):
            return {"schema": RECORD_SCHEMA, "repos": {}}
        return data

    def save(self, snap: HubSnapshot) -> None:
        """Remember ``snap``; best effort, without fsync: losing it only means listing again."""
        data = self.load()
        r = data["repos"].setdefault(snap.repo, {"refs": {}, "commits": {}})
        r["refs"][snap.revision] = snap.commit
        r["commits"][snap.commit] = [[f.path, f.size, f.blob_id, f.lfs_sha256] for f in snap.files.values()]
        try:
            atomic_write_text(self.path, json.dumps(data, indent=1, sort_keys=True) + "\n", durable=False)
        except (OSError, DiskSpaceError):
            pass  # a read-only or full staging folder: the next offline run just has no record

    def snapshot(self, repo: str, revision: str) -> HubSnapshot | None:
        r = self.load()["repos"].get(repo)
        if not isinstance(r, dict):
            return None
        commit = revision if HEX40.match(revision) else r.get("refs", {}).get(revision)
        rows = r.get("commits", {}).get(commit) if commit else None
        if not isinstance(rows, list):
            return None
        try:
            files = {str(p): RemoteFile(path=str(p), size=int(s), blob_id=b, lfs_sha256=sh) for p, s, b, sh in rows}
        except (TypeError, ValueError):  # a malformed snapshot row: treat the revision as not recorded
            return None
        for p in files:
            safe_relpath(p, what=f"file name recorded for {repo}")
        return HubSnapshot(endpoint="", repo=repo, revision=revision, commit=str(commit), files=files)
