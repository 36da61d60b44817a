"""What a Hub or HTTP failure means: our error (with what to do about it) and whether to retry.

``hub_error`` turns a huggingface_hub/httpx2 exception into a ``ProvisionError`` subclass with a
message and hint; ``is_transient`` says whether it is worth another try; ``retry_after`` is how
long to wait (the server's ``Retry-After``, else jittered exponential backoff); ``RetryPolicy``
is the one retry rule of every Hub request: a bounded number of tries, all within one deadline
(``--stall-timeout``) counted from the first failure, and none at all for a host name that does
not resolve. ``with_retries`` runs a metadata request under it; ``download`` asks it per file.
"""

from __future__ import annotations

import contextlib
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

from provision.errors import AuthError, FetchError, NotFoundError, ProvisionError, StallError
from provision.progress import ProgressFn, note

MAX_RETRY_AFTER_S = 120.0
T = TypeVar("T")


def http_status(err: BaseException) -> int | None:
    """The HTTP status of the response an exception carries, if any."""
    resp = getattr(err, "response", None)
    code = getattr(resp, "status_code", None)
    return int(code) if isinstance(code, int) else None


def is_transient(status: int | None) -> bool:
    """408, 429, 5xx, or no answer at all: another try may succeed."""
    return status is None or status in (408, 429) or status >= 500


def retry_after(err: BaseException, attempt: int) -> float:
    """Seconds to wait: the server's Retry-After (seconds or a date), else exponential backoff."""
    headers = getattr(getattr(err, "response", None), "headers", None)
    raw = headers.get("Retry-After") if headers is not None else None
    if raw:
        raw = raw.strip()
        if raw.isdigit():
            return min(float(raw), MAX_RETRY_AFTER_S)
        with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):  # not a date: back off instead
            when = parsedate_to_datetime(raw).timestamp()
            return min(max(when - time.time(), 0.0), MAX_RETRY_AFTER_S)
    return min(0.5 * 2**attempt, 30.0) * (0.75 + 0.5 * random.random())


def unresolved_host(err: BaseException) -> bool:
    """True when ``err`` (or what caused it) is a failed host name lookup: retrying will not help soon."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, socket.gaierror):
            return True
        text = str(e).lower()
        if "name resolution" in text or "name or service not known" in text or "nodename nor servname" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def _refused(err: BaseException) -> bool:
    """True when ``err`` (or what caused it) is a refused TCP connection."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ConnectionRefusedError) or "connection refused" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


@dataclass
class RetryPolicy:
    """When to try a failed Hub request again: at most ``retries`` more tries, each wait cut so that
    the last try starts within ``deadline_s`` of the first failure, never for a 4xx other than
    408/429, nor for a host name that does not resolve."""

    retries: int
    deadline_s: float
    first_failure: float | None = field(default=None)

    def wait_before_retry(self, err: BaseException, status: int | None, attempt: int) -> float | None:
        """Seconds to wait before try ``attempt + 2``, or None to give up now."""
        now = time.monotonic()
        if self.first_failure is None:
            self.first_failure = now
        if not is_transient(status) or attempt >= self.retries or (status is None and unresolved_host(err)):
            return None
        left = self.first_failure + self.deadline_s - now
        if left <= 0:
            return None
        return min(retry_after(err, attempt), left)

    def reset(self) -> None:
        """A request got through: the next failure starts a new deadline."""
        self.first_failure = None


def hub_error(err: BaseException, *, repo: str, revision: str, path: str | None, token: bool,
              endpoint: str) -> ProvisionError:
    """Turn a huggingface_hub/httpx2 error into ours, with a message saying what to do."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = http_status(err)
    uri = f"hf://{repo}@{revision}"
    page = f"{endpoint}/{repo}"
    ctx: dict[str, Any] = {"repo": repo, "revision": revision, "status": status}
    if path:
        ctx["path"] = path
    login = "pass --token, set HF_TOKEN, or run `hf auth login`"
    if isinstance(err, GatedRepoError) or (isinstance(err, HfHubHTTPError) and status in (401, 403)
                                           and "gated" in str(err).lower()):
        if status == 403 or token:
            return AuthError(f"{uri} is a gated repo and the licence has not been accepted for this token's account.",
                             hint=f"Open {page} while logged in as that user, accept the licence, then run again.",
                             **ctx)
        return AuthError(f"{uri} is a gated repo and no Hugging Face token was given.",
                         hint=f"Accept the licence on {page}, then {login}, and run again.", **ctx)
    if isinstance(err, RevisionNotFoundError):
        return NotFoundError(f"Revision {revision!r} does not exist in {repo}.",
                             hint="Check the branch, tag or commit id.", **ctx)
    if isinstance(err, RemoteEntryNotFoundError) or (status == 404 and path):
        return NotFoundError(f"{path} does not exist in {uri}.",
                             hint="Check the file name and revision in the manifest.", **ctx)
    if isinstance(err, RepositoryNotFoundError) or status == 404:
        if status == 401 and not token:
            return AuthError(f"{repo} was not found on {endpoint}, or it is private and no token was given.",
                             hint=f"Check the repo name; if it is private, {login}.", **ctx)
        if status == 401:
            return AuthError(f"The token was refused for {repo} on {endpoint} (invalid or without access).",
                             hint="Create a read token at https://huggingface.co/settings/tokens and pass it.", **ctx)
        return NotFoundError(f"{repo} was not found on {endpoint}.",
                             hint="Check the repo name (org/name); a private repo also needs a token.", **ctx)
    if status == 401:
        return AuthError(f"{endpoint} refused the request for {uri} (401): the token is missing or invalid.",
                         hint=f"{login.capitalize()}.", **ctx)
    if status == 403:
        return AuthError(f"{endpoint} forbids access to {uri} (403).",
                         hint=f"Check that your token can read {repo} and that its licence is accepted on {page}.",
                         **ctx)
    if isinstance(err, OfflineModeIsEnabled):
        return FetchError(f"huggingface_hub is in offline mode, so {uri} cannot be reached.",
                          hint="Unset HF_HUB_OFFLINE to download.", **ctx)
    if isinstance(err, httpx2.TimeoutException):
        return StallError(f"{endpoint} did not answer for {uri} in time.",
                          hint="Check the network or HF_ENDPOINT and run again.", **ctx)
    if unresolved_host(err):
        host = urlsplit(endpoint).hostname or endpoint
        return FetchError(f"Cannot resolve the host name {host} of {endpoint} for {uri}.",
                          hint="Check the network's DNS, proxies and HF_ENDPOINT, then run again.", **ctx)
    if isinstance(err, (httpx2.TransportError, OSError)):
        why = "the connection was refused" if _refused(err) else type(err).__name__
        return FetchError(f"Cannot reach {endpoint} for {uri}: {why}.",
                          hint="Check the network, proxies and HF_ENDPOINT, then run again.", **ctx)
    return FetchError(f"The Hub answered {status} for {uri}{' ' + path if path else ''}.",
                      hint="Run again later; if it persists check HF_ENDPOINT.", **ctx)


def with_retries(fn: Callable[[], T], *, retries: int, what: Callable[[BaseException], ProvisionError],
                 progress: ProgressFn | None = None, give_up_after: float = 120.0) -> T:
    """Call ``fn`` under a ``RetryPolicy`` of ``retries`` tries within ``give_up_after`` seconds of the
    first failure; each retry is one note, the final failure ``what(error)``."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    from provision.stages.fetch.hub.env import route_hub_logging

    route_hub_logging()
    policy = RetryPolicy(retries=retries, deadline_s=give_up_after)
    attempt = 0
    while True:
        try:
            return fn()
        except (HfHubHTTPError, httpx2.TransportError) as e:
            status = http_status(e)
            wait_s = policy.wait_before_retry(e, status, attempt)
            if wait_s is None:
                raise what(e) from None
            note(progress, "hf", f"the Hub answered {status or type(e).__name__}; retrying in {wait_s:.1f} s "
                                 f"(try {attempt + 2} of {retries + 1})")
            time.sleep(wait_s)
            attempt += 1
