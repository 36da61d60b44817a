"""What a Hub or HTTP failure means: our error (with what to do about it) and whether to retry.

``hub_error`` turns a huggingface_hub/httpx2 exception into a ``ProvisionError`` subclass with a
message and hint; ``is_transient`` says whether it is worth another try; ``retry_after`` is how
long to wait (the server's ``Retry-After``, else jittered exponential backoff); ``with_retries``
calls a metadata request under that policy. Downloads apply the same policy in ``download``.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

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
    if isinstance(err, (httpx2.TransportError, OSError)):
        return FetchError(f"Cannot reach {endpoint} for {uri}: {type(err).__name__}.",
                          hint="Check the network, proxies and HF_ENDPOINT, then run again.", **ctx)
    return FetchError(f"The Hub answered {status} for {uri}{' ' + path if path else ''}.",
                      hint="Run again later; if it persists check HF_ENDPOINT.", **ctx)


def with_retries(fn: Callable[[], T], *, retries: int, what: Callable[[BaseException], ProvisionError],
                 progress: ProgressFn | None = None, give_up_after: float = 120.0) -> T:
    """Call ``fn``; retry 429/5xx and transport errors with backoff honouring Retry-After.
    Transport errors (no answer at all) stop being retried ``give_up_after`` seconds after the first."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    attempt = 0
    first_failure: float | None = None
    while True:
        try:
            return fn()
        except (HfHubHTTPError, httpx2.TransportError) as e:
            status = http_status(e)
            transient = is_transient(status) if status is not None else isinstance(e, httpx2.TransportError)
            if first_failure is None:
                first_failure = time.monotonic()
            if not transient or attempt >= retries or (
                    status is None and time.monotonic() - first_failure > give_up_after):
                raise what(e) from None
            wait_s = retry_after(e, attempt)
            note(progress, "hf", f"the Hub answered {status or type(e).__name__}; retrying in {wait_s:.1f} s")
            time.sleep(wait_s)
            attempt += 1
