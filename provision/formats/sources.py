"""Parse what a user names as a SOURCE: a manifest, a magnet link, a .torrent, or hf://.

Pure parsing, no network and no heavy imports. Magnet links follow BEP 9/BEP 52:
``xt=urn:btih:`` (v1, 40 hex or 32 base32 characters), ``xt=urn:btmh:1220<64 hex>`` (v2,
a sha2-256 multihash), ``dn``, ``tr`` (trackers), ``x.pe`` (peer addresses), ``ws`` (web
seeds). It does not resolve metadata: fetch does.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, urlsplit

from provision.errors import UsageError

HEX40 = re.compile(r"^[0-9a-fA-F]{40}$")
HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
B32 = re.compile(r"^[A-Za-z2-7]{32}$")
REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


SourceKind = Literal["manifest", "magnet", "torrent", "hf"]  # what a source string is


@dataclass(frozen=True)
class Magnet:
    uri: str
    btih: str | None = None  # v1 infohash, lowercase hex
    btmh: str | None = None  # v2 infohash, lowercase hex sha256 (without the 1220 prefix)
    name: str | None = None
    trackers: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()  # x.pe host:port
    web_seeds: tuple[str, ...] = ()

    @property
    def infohash(self) -> str:
        """The id we key state on: the v1 hash when present, else the v2 hash."""
        return self.btih or self.btmh or ""

    def describe(self) -> str:
        parts = [f"btih:{self.btih}" if self.btih else "", f"btmh:{self.btmh}" if self.btmh else ""]
        return " ".join(p for p in parts if p) + (f" ({self.name})" if self.name else "")


@dataclass(frozen=True)
class HFRef:
    repo: str
    revision: str | None = None  # branch, tag or commit; None means "main"

    @property
    def uri(self) -> str:
        return f"hf://{self.repo}" + (f"@{self.revision}" if self.revision else "")

    @property
    def pinned(self) -> bool:
        return self.revision is not None and bool(HEX40.match(self.revision))


@dataclass(frozen=True)
class TorrentFileRef:
    path: Path


@dataclass(frozen=True)
class ManifestRef:
    ref: str  # a path or a built-in name


@dataclass(frozen=True)
class ParsedSource:
    kind: SourceKind
    magnet: Magnet | None = None
    hf: HFRef | None = None
    torrent: TorrentFileRef | None = None
    manifest: ManifestRef | None = None
    raw: str = field(default="")


def _one_hash(kind: str, seen: str | None, found: str) -> str:
    """``found``, unless the magnet already named a different ``kind`` hash (then exit 2: which torrent
    is meant cannot be told, and keeping either would fetch something the user may not have asked for)."""
    if seen is not None and seen != found:
        raise UsageError(f"Malformed magnet link: it names two different {kind} infohashes ({seen} and {found}).",
                         hint="Use a magnet with one infohash per kind.")
    return found


def parse_magnet(uri: str) -> Magnet:
    """Parse a magnet URI; raise ``UsageError`` naming what is wrong."""
    if not uri.lower().startswith("magnet:?"):
        raise UsageError(f"Not a magnet link: {uri[:60]!r} (expected 'magnet:?xt=urn:btih:...').")
    query = uri[len("magnet:?"):]
    btih = btmh = name = None
    trackers: list[str] = []
    peers: list[str] = []
    ws: list[str] = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        k = key.lower()
        if k == "xt" or re.match(r"^xt\.\d+$", k):
            v = value.strip()
            low = v.lower()
            if low.startswith("urn:btih:"):
                h = v[len("urn:btih:"):]
                if HEX40.match(h):
                    found = h.lower()
                elif B32.match(h):
                    found = base64.b32decode(h.upper()).hex()
                else:
                    raise UsageError(
                        f"Malformed magnet link: btih {h!r} is neither 40 hex nor 32 base32 characters."
                    )
                btih = _one_hash("btih", btih, found)
            elif low.startswith("urn:btmh:"):
                h = v[len("urn:btmh:"):].lower()
                if not (h.startswith("1220") and HEX64.match(h[4:])):
                    raise UsageError(
                        f"Malformed magnet link: btmh {h!r} is not a sha2-256 multihash (1220 + 64 hex)."
                    )
                btmh = _one_hash("btmh", btmh, h[4:])
            # other xt kinds (ed2k, ...) are ignored
        elif k == "dn":
            name = value
        elif k == "tr" or re.match(r"^tr\.\d+$", k):
            trackers.append(value)
        elif k == "x.pe":
            peers.append(_check_peer(value, where="magnet x.pe"))
        elif k == "ws":
            ws.append(value)
    if btih is None and btmh is None:
        raise UsageError(
            "Malformed magnet link: it has no 'xt=urn:btih:' or 'xt=urn:btmh:' infohash.",
            hint="Copy the whole link, including the xt= part.",
        )
    return Magnet(uri=uri, btih=btih, btmh=btmh, name=name, trackers=tuple(trackers),
                  peers=tuple(peers), web_seeds=tuple(ws))


def _check_peer(value: str, *, where: str) -> str:
    v = value.strip()
    m = re.match(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$", v)
    if not m or not (0 < int(m.group(2)) < 65536):
        raise UsageError(f"Malformed peer address {value!r} in {where} (expected HOST:PORT).")
    return v


def parse_peer(value: str) -> tuple[str, int]:
    v = _check_peer(value, where="--peer")
    host, _, port = v.rpartition(":")
    return host.strip("[]"), int(port)


def build_magnet(
    *, btih: str | None, btmh: str | None, name: str | None = None, trackers: tuple[str, ...] = (),
    peers: tuple[str, ...] = (), web_seeds: tuple[str, ...] = (),
) -> str:
    from urllib.parse import quote

    parts: list[str] = []
    if btih:
        parts.append(f"xt=urn:btih:{btih}")
    if btmh:
        parts.append(f"xt=urn:btmh:1220{btmh}")
    if name:
        parts.append("dn=" + quote(name, safe=""))
    parts += ["tr=" + quote(t, safe="") for t in trackers]
    parts += ["x.pe=" + p for p in peers]
    parts += ["ws=" + quote(w, safe="") for w in web_seeds]
    return "magnet:?" + "&".join(parts)


def parse_hf(uri: str) -> HFRef:
    if not uri.startswith("hf://"):
        raise UsageError(f"Not a Hugging Face source: {uri!r} (expected hf://org/repo[@revision]).")
    rest = uri[len("hf://"):]
    repo, _, rev = rest.partition("@")
    repo = repo.strip("/")
    if not REPO_RE.match(repo):
        raise UsageError(f"Malformed Hugging Face repo {repo!r} (expected hf://org/repo[@revision]).")
    if _ and not rev:
        raise UsageError(f"Empty revision after '@' in {uri!r}.")
    return HFRef(repo=repo, revision=rev or None)


def parse_source(source: str) -> ParsedSource:
    """Classify a SOURCE argument. Does not read files beyond checking they exist."""
    s = source.strip()
    if s.lower().startswith("magnet:"):
        return ParsedSource(kind="magnet", magnet=parse_magnet(s), raw=s)
    if s.startswith("hf://"):
        return ParsedSource(kind="hf", hf=parse_hf(s), raw=s)
    scheme = urlsplit(s).scheme
    if scheme in ("http", "https"):
        raise UsageError(
            f"URL sources are not supported: {s!r}.",
            hint="Use a magnet link, a .torrent file, hf://org/repo[@rev] or a manifest.",
        )
    if s.endswith(".torrent"):
        p = Path(s)
        if not p.is_file():
            raise UsageError(f"Torrent file not found: {s}.")
        return ParsedSource(kind="torrent", torrent=TorrentFileRef(p), raw=s)
    return ParsedSource(kind="manifest", manifest=ManifestRef(s), raw=s)
