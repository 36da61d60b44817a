"""What to fetch from the Hub: the plan's files paired with the Hub's facts about them.

``source_of`` names the repo, revision and path prefix of a plan's Hub source; ``wanted_files``
checks the plan (and its manifest) against a ``HubSnapshot`` and refuses any disagreement on
size or hash before a byte is downloaded; ``wanted_offline`` does the same from the manifest
alone when there is no snapshot. Each ``Wanted`` file names the authority that will vouch for
it: the manifest's sha256, else the Hub's LFS sha256, else the git blob SHA-1. Nothing here
touches the network or the disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from provision.errors import FetchError, HashMismatchError, NotFoundError, SizeMismatchError
from provision.stages.fetch.request import FetchRequest, HubSnapshot

if TYPE_CHECKING:
    from provision.stages.verify import Authority

AuthorityKind = Literal["manifest-sha256", "hub-lfs-sha256", "git-blob-sha1"]


@dataclass(frozen=True)
class Wanted:
    path: str  # relative path under dest
    repo_path: str  # path in the repo
    size: int
    kind: AuthorityKind
    sha256: str | None
    git_sha1: str | None

    @property
    def key(self) -> str:
        """The content's name in the staging folder: its expected hash and size."""
        digest = self.sha256 if self.sha256 else self.git_sha1
        return f"{digest}-{self.size}"

    def authority(self) -> Authority:
        from provision.stages.verify import Authority

        return Authority(kind=self.kind, size=self.size, sha256=self.sha256,
                         git_sha1=self.git_sha1 if self.kind == "git-blob-sha1" else None)


def source_of(plan: FetchRequest) -> tuple[str, str, str]:
    """(repo, revision as asked, prefix) for an hf:// plan or a manifest's hf source."""
    if plan.kind == "hf":
        assert plan.hf is not None
        return plan.hf.repo, plan.hf.revision or "main", ""
    src = plan.manifest.source("hf") if plan.manifest is not None else None
    if src is None or src.repo is None:
        raise FetchError(f"{plan.name} has no Hugging Face source.", hint="Use --source torrent.")
    return src.repo, src.revision or "main", src.prefix  # no pinned commit: main (file hashes vouch)


def wanted_files(plan: FetchRequest, snap: HubSnapshot, prefix: str) -> tuple[list[Wanted], list[str]]:
    """Pair the plan's files with the Hub's facts; refuse disagreements before downloading.
    Returns (what to fetch, the plan's files this source skips)."""
    out: list[Wanted] = []
    skipped: list[str] = []
    if plan.kind == "hf":
        names = [f.path for f in plan.files] if plan.files else sorted(snap.files)
        specs: list[tuple[str, int | None, str | None, str | None, bool]] = [(n, None, None, None, False) for n in names]
    else:
        assert plan.manifest is not None
        specs = []
        for pf in plan.files:
            if "hf" not in pf.sources:
                skipped.append(pf.path)
                continue
            fs = plan.manifest.file(pf.path)
            specs.append((pf.path, pf.size, pf.sha256, fs.git_sha1 if fs else None, pf.optional))
    for path, size, sha, gsha, optional in specs:
        repo_path = prefix + path
        rf = snap.files.get(repo_path)
        if rf is None:
            if optional:
                skipped.append(path)
                continue
            raise NotFoundError(f"{repo_path} is not in hf://{snap.repo}@{snap.commit}.",
                                hint="Check the manifest's file list, prefix and revision.",
                                repo=snap.repo, commit=snap.commit, path=repo_path)
        if size is not None and size != rf.size:
            raise SizeMismatchError(
                f"{repo_path} is {rf.size} bytes at hf://{snap.repo}@{snap.commit} but the manifest says {size}.",
                hint="The manifest and the pinned revision disagree; fix the manifest.",
                path=path, expected=size, actual=rf.size)
        if sha and rf.lfs_sha256 and sha != rf.lfs_sha256:
            raise HashMismatchError(
                f"{repo_path} has sha256 {rf.lfs_sha256} at hf://{snap.repo}@{snap.commit} but the manifest says {sha}.",
                hint="The manifest and the pinned revision disagree; fix the manifest.",
                path=path, expected=sha, actual=rf.lfs_sha256)
        if sha:
            out.append(Wanted(path, repo_path, rf.size, "manifest-sha256", sha, None))
        elif rf.lfs_sha256:
            out.append(Wanted(path, repo_path, rf.size, "hub-lfs-sha256", rf.lfs_sha256, None))
        elif gsha or rf.blob_id:
            out.append(Wanted(path, repo_path, rf.size, "git-blob-sha1", None, gsha or rf.blob_id))
        else:
            raise FetchError(f"The Hub gave no hash for {repo_path} in {snap.repo}, so it cannot be verified.",
                             hint="Pin its sha256 in the manifest.", path=repo_path)
    return out, skipped


def wanted_offline(plan: FetchRequest, snap: HubSnapshot | None, prefix: str) -> list[Wanted]:
    """What ``HF_HUB_OFFLINE`` can check: from the recorded snapshot, else the manifest's pins."""
    if snap is not None:
        return wanted_files(plan, snap, prefix)[0]
    if plan.kind == "hf" or plan.manifest is None:
        assert plan.hf is not None
        raise FetchError(
            f"HF_HUB_OFFLINE is set and there is no record of a previous fetch of {plan.hf.uri}.",
            hint="Unset HF_HUB_OFFLINE and fetch once with the network, or use a manifest.", repo=plan.hf.repo)
    out = []
    for pf in plan.files:
        if "hf" not in pf.sources:
            continue
        fs = plan.manifest.file(pf.path)
        if pf.size is None or not (pf.sha256 or (fs and fs.git_sha1)):
            raise FetchError(f"HF_HUB_OFFLINE is set and the manifest pins no size and hash for {pf.path}, so the "
                             "local copy cannot be verified.", hint="Unset HF_HUB_OFFLINE, or lock the manifest.",
                             path=pf.path)
        if pf.sha256:
            out.append(Wanted(pf.path, prefix + pf.path, pf.size, "manifest-sha256", pf.sha256, None))
        else:
            assert fs is not None
            out.append(Wanted(pf.path, prefix + pf.path, pf.size, "git-blob-sha1", None, fs.git_sha1))
    return out
