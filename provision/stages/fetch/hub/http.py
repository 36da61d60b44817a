"""The Hub's HTTP requests provision sends itself: one ranged GET of a file's ``resolve`` URL (and
its body read fast), and the listing of a commit's file tree.

Both go through huggingface_hub's own HTTP client (httpx2) but not through its ``http_backoff``,
which retries on its own and prints a line per try: the one retry layer is ``errors.with_retries``
(and ``download``), under one deadline. ``open_resolve`` follows redirects itself, so the token is
sent to the endpoint's origin only, never to a host a redirect leads to (a CDN, a signed URL).
``read_body`` yields the raw body. Nothing here retries, hashes or writes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urljoin, urlsplit

from provision.errors import FetchError
from provision.stages.fetch.hub.env import route_hub_logging

if TYPE_CHECKING:
    import httpx2

READ_SIZE = 1 << 20
MAX_REDIRECTS = 5


class RangeRefused(Exception):
    """The server ignored or refused our range: start the file again from byte 0."""


@dataclass(frozen=True)
class ResolveTarget:
    """Where a file of a pinned commit is, and how to ask for it."""

    endpoint: str
    repo: str
    commit: str
    repo_path: str
    token: str | None
    timeout: float  # seconds without a byte before a read gives up

    @property
    def url(self) -> str:
        return f"{self.endpoint}/{self.repo}/resolve/{self.commit}/{quote(self.repo_path)}"


def _origin(url: str) -> tuple[str, str, int]:
    p = urlsplit(url)
    return p.scheme, (p.hostname or "").lower(), p.port or {"http": 80, "https": 443}.get(p.scheme, 0)


@contextlib.contextmanager
def open_resolve(t: ResolveTarget, offset: int) -> Iterator[httpx2.Response]:
    """GET the resolve URL from ``offset``; yields a streaming response with status 200 or 206.
    416 raises ``RangeRefused``; other 4xx/5xx raise huggingface_hub's HTTP errors."""
    import httpx2
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    route_hub_logging()
    url = t.url
    home = _origin(t.endpoint)
    headers = build_hf_headers(token=t.token if t.token else False, library_name="provision")
    headers["Accept-Encoding"] = "identity"
    if offset:
        headers["Range"] = f"bytes={offset}-"
    timeout = httpx2.Timeout(t.timeout, connect=min(30.0, t.timeout))
    session = get_session()
    left_home = False
    for _hop in range(MAX_REDIRECTS + 1):
        send = dict(headers)
        left_home = left_home or _origin(url) != home
        if left_home:  # a host a redirect led to (a CDN, a signed URL) never sees the token
            send.pop("authorization", None)
            send.pop("Authorization", None)
        req = session.build_request("GET", url, headers=send, timeout=timeout)
        resp = session.send(req, stream=True, follow_redirects=False)
        try:
            if resp.is_redirect and resp.headers.get("Location"):
                url = urljoin(url, resp.headers["Location"])
                continue
            if resp.status_code == 416:
                raise RangeRefused()
            if resp.status_code >= 400:
                resp.read()
                hf_raise_for_status(resp)
            if resp.status_code not in (200, 206):
                raise FetchError(f"Unexpected HTTP {resp.status_code} for {t.repo_path} from {t.endpoint}.",
                                 hint="Check HF_ENDPOINT.", path=t.repo_path)
            yield resp
            return
        finally:
            resp.close()
    raise FetchError(f"Too many redirects for {t.repo_path} from {t.endpoint}.", hint="Check HF_ENDPOINT.",
                     path=t.repo_path)


def list_tree(endpoint: str, repo: str, commit: str, token: str | None, timeout: float) -> list[dict[str, Any]]:
    """Every entry of ``repo`` at ``commit`` (recursive), following the Hub's ``Link: next`` pages:
    the API's own dicts (``type``, ``path``, ``size``, ``oid``, ``lfs``). Errors are huggingface_hub's."""
    import httpx2
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    route_hub_logging()
    headers = build_hf_headers(token=token if token else False, library_name="provision")
    url: str | None = f"{endpoint}/api/models/{repo}/tree/{quote(commit, safe='')}"
    params: dict[str, Any] | None = {"recursive": True, "expand": False}
    entries: list[dict[str, Any]] = []
    session = get_session()
    while url is not None:
        resp = session.get(url, params=params, headers=headers,
                           timeout=httpx2.Timeout(timeout, connect=min(30.0, timeout)))
        hf_raise_for_status(resp)
        page = resp.json()
        if not isinstance(page, list):
            raise FetchError(f"{endpoint} did not answer a file list for {repo}@{commit}.",
                             hint="Check that HF_ENDPOINT points to a Hugging Face Hub.", repo=repo)
        entries.extend(e for e in page if isinstance(e, dict))
        url, params = resp.links.get("next", {}).get("url"), None
    return entries


def read_body(resp: httpx2.Response, timeout: float) -> Iterator[bytes]:
    """The raw body of ``resp``.

    The bytes h11 already buffered come through httpx2's ``iter_raw`` (which drains its buffer
    in one chunk); then a plain HTTP/1.1 body of known length is read straight from the
    connection's network stream (httpcore's ``network_stream`` extension) in ``READ_SIZE``
    reads, because h11's 64 KiB parsing loop caps a download at about half the loopback rate.
    The connection is closed afterwards, never reused. Anything else (chunked, compressed,
    HTTP/2) goes through ``iter_raw`` only."""
    import httpcore2
    import httpx2

    it = resp.iter_raw()
    h = resp.headers
    clen = h.get("Content-Length", "")
    ns = resp.extensions.get("network_stream")
    fast = (resp.http_version == "HTTP/1.1" and clen.isdigit() and ns is not None and hasattr(ns, "read")
            and h.get("Content-Encoding", "identity").lower() in ("", "identity")
            and "chunked" not in h.get("Transfer-Encoding", "").lower())
    if not fast or ns is None:
        yield from it
        return
    left = int(clen)
    first = next(it, b"")
    if first:
        left -= len(first)
        yield first
    while left > 0:
        try:
            b = ns.read(min(READ_SIZE, left), timeout)
        except httpcore2.TimeoutException as e:
            raise httpx2.ReadTimeout(str(e) or "read timed out") from None
        except (httpcore2.NetworkError, httpcore2.ProtocolError, OSError) as e:
            raise httpx2.ReadError(str(e) or type(e).__name__) from None
        if not b:
            raise httpx2.RemoteProtocolError("the server closed the connection before the body was complete")
        left -= len(b)
        yield b
