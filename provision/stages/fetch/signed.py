"""A manifest's pinned signature, enforced while fetching: nothing unsigned reaches the destination.

When a manifest has a ``[signing]`` table, ``fetch`` builds a ``SignatureGate``. The release's
signature file (``signature = "model.sig"``) is added to the files each source fetches, as an
optional file (a release without it is refused here, not skipped); a URL signature is downloaded
once, before anything else (bounded, https or loopback http). Each fetcher (hub, torrent, local)
calls the gate with every file it is about to commit, still in its staging folder (or already in
place and reused), before anything is moved into place: the signature must verify offline against
the pinned public key or certificate chain, and every file must be one it covers with the same
sha256 (``provision.stages.sign``). Anything else is a one-line ``VerifyError`` (exit 5) and the
fetcher commits nothing. The gate keeps the facts for the report: signature name and sha256,
method, files checked, never a key byte. Files the signature covers but the manifest does not ask
for are not fetched (they are listed, not required). It does not fetch model files itself.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from provision.errors import FetchError, VerifyError
from provision.formats.manifest import Manifest, SigningSpec
from provision.formats.sources import HFRef, Magnet, SourceKind
from provision.io.atomic import TMP_PREFIX
from provision.stages.fetch.request import FetchRequest, HubSnapshot, PlannedFile

URL_TIMEOUT_S = 30.0


class SignedRequest:
    """``plan`` with the release's signature file added to its files (an optional file of every source)."""

    def __init__(self, plan: FetchRequest, extra: PlannedFile) -> None:
        self._plan = plan
        self._files = (*plan.files, extra)

    @property
    def source(self) -> str:
        return self._plan.source

    @property
    def kind(self) -> SourceKind:
        return self._plan.kind

    @property
    def name(self) -> str:
        return self._plan.name

    @property
    def home(self) -> Path:
        return self._plan.home

    @property
    def dest(self) -> Path:
        return self._plan.dest

    @property
    def files(self) -> Sequence[PlannedFile]:
        return self._files

    @property
    def manifest(self) -> Manifest | None:
        return self._plan.manifest

    @property
    def magnet(self) -> Magnet | None:
        return self._plan.magnet

    @property
    def hf(self) -> HFRef | None:
        return self._plan.hf

    @property
    def torrent_file(self) -> Path | None:
        return self._plan.torrent_file

    @property
    def hub_snapshot(self) -> HubSnapshot | None:
        return self._plan.hub_snapshot


class SignatureGate:
    """The check every fetcher runs on its staged files before committing them (see the module docstring)."""

    def __init__(self, spec: SigningSpec) -> None:
        self.spec = spec
        self.url = spec.signature_url
        self.release_file = None if self.url else spec.signature
        self.result: dict[str, Any] | None = None
        self._url_bytes: bytes | None = None

    def request(self, plan: FetchRequest, dest: Path) -> FetchRequest:
        """``plan`` with the signature file added, when the release carries it and the plan does not list it."""
        if self.release_file is None or any(f.path == self.release_file for f in plan.files):
            return plan
        kinds = tuple(s.type for s in plan.manifest.sources) if plan.manifest is not None else ()
        present = (dest / self.release_file).is_file()
        return SignedRequest(plan, PlannedFile(path=self.release_file, size=None, sha256=None, sources=kinds,
                                               status="present" if present else "missing", optional=True))

    def prefetch(self) -> None:
        """Download a URL signature (at most ``sign.MAX_SIGNATURE_BYTES``) before any model file."""
        if self.url is None or self._url_bytes is not None:
            return
        import urllib.error
        import urllib.request

        from provision.stages.sign import MAX_SIGNATURE_BYTES

        try:
            with urllib.request.urlopen(self.url, timeout=URL_TIMEOUT_S) as r:  # https, or http to loopback only
                data = r.read(MAX_SIGNATURE_BYTES + 1)
        except urllib.error.HTTPError as e:
            if e.code in (404, 410):
                raise VerifyError(f"There is no signature at {self.url} (HTTP {e.code}); the manifest pins signing, "
                                  "so the release is refused.") from None
            raise FetchError(f"Could not download the signature {self.url}: HTTP {e.code}.") from None
        except (urllib.error.URLError, OSError) as e:
            raise FetchError(f"Could not download the signature {self.url}: {getattr(e, 'reason', e)}.") from None
        if len(data) > MAX_SIGNATURE_BYTES:
            raise VerifyError(f"Refusing signature {self.url}: over the {MAX_SIGNATURE_BYTES:,d}-byte limit.")
        self._url_bytes = data

    def __call__(self, files: Mapping[str, tuple[Path, str | None]]) -> None:
        """Check ``files`` (``{relative path: (where it is now, sha256 or None)}``), the release's
        signature file among them unless it is a URL, before any is committed."""
        from provision.stages.sign import check_signed_files, signed_digests

        label = self.url or self.release_file or "signature"
        if self.url is not None:
            self.prefetch()
            assert self._url_bytes is not None
            fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}signature-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(self._url_bytes)
                signed = signed_digests(Path(tmp), public_key=self.spec.public_key,
                                        certificate_chain=self.spec.certificate_chain, label=label)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        else:
            assert self.release_file is not None
            sig = files.get(self.release_file)
            if sig is None:
                raise VerifyError(f"The release carries no signature {self.release_file}; the manifest pins "
                                  "signing, so its files are refused.", path=self.release_file)
            signed = signed_digests(sig[0], public_key=self.spec.public_key,
                                    certificate_chain=self.spec.certificate_chain, label=label)
        self.result = check_signed_files(signed, files, label=label, skip=self.release_file)


def gate_for(plan: FetchRequest) -> SignatureGate | None:
    """The gate of ``plan``'s manifest ``[signing]`` pin, or None when it pins nothing."""
    spec = plan.manifest.signing if plan.manifest is not None else None
    return SignatureGate(spec) if spec is not None else None


__all__ = ["SignatureGate", "SignedRequest", "gate_for"]
