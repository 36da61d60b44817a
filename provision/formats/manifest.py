"""Manifests: one TOML file per model naming its sources, files, sizes, hashes and smoke test.

Load (``tomllib``), validate (a one-line ``ManifestError`` naming the field) and write
(``tomli_w``, atomically). A manifest never guesses: an unknown size or hash stays unset until
``provision manifest lock`` records it after a verified fetch. Nothing here fetches or verifies
(a ``local`` source's folder is only checked to exist when the manifest is parsed).
The module stays large because parsing and writing the one schema field by field belong
together. The schema below is the reference for the manifest format (``schema_version = 1``)::

    schema_version = 1
    name = "pixtral-12b-2409"            # [a-z0-9][a-z0-9._-]*
    architecture = "pixtral"             # model family the tensor spec comes from
    format = "mistral"                   # on-disk layout of the original: mistral | hf
    description = "..."                  # optional

    [[sources]]                          # tried in order by --source auto
    type = "torrent"
    magnet = "magnet:?xt=urn:btih:..."   # and/or
    torrent = "pixtral.torrent"          # a .torrent path relative to the manifest
    prefix = "pixtral-12b-240910/"       # where the files sit inside the torrent

    [[sources]]
    type = "hf"
    repo = "mistralai/Pixtral-12B-2409"
    revision = "<40 hex>"                # a full commit, never a branch; omitted only when no source
                                         # we trust names the commit: then the Hub's main is used and the
                                         # files' pinned sha256 are what vouch for the content
    prefix = ""                          # optional sub-folder in the repo
    gated = true                         # optional

    [[sources]]                          # files already on this disk (tried first by --source auto)
    type = "local"
    path = "."                           # a folder; relative to the manifest's folder (or absolute)

    [[files]]
    path = "consolidated.safetensors"    # relative, no '..'
    size = 25365479424                   # optional until locked
    sha256 = "<64 hex>"                  # optional until locked
    git_sha1 = "<40 hex>"                # optional (the Hub's blob id of a small file)
    md5 = "<32 hex>"                     # optional: a release's published md5 sum, verified when set
    optional = false                     # optional files are fetched when present
    sources = ["torrent", "hf"]          # optional: which source types carry it (default all)
    pickle = true                        # only on a .pth/.pt/.bin file, which must be optional: it is
                                         # listed, never fetched or loaded (`provision import-pickle`)

    [signing]                            # optional: fetch refuses files the publisher did not sign (exit 5)
    public_key = "publisher.pub.pem"     # an EC public key: PEM text, or a PEM file relative to the manifest
    certificate_chain = ["root.crt"]     # and/or certificates (PEM text or files) a certificate signature chains to
    signature = "model.sig"              # the OpenSSF Model Signing signature: a file of the release (fetched
                                         # with it), or an https:// URL (http:// only to a loopback address)

    [params]                             # optional: the release's params.json (sizes `plan` profiles offline)
    dim = 4096 ...

    [smoke]
    prompt = "..."
    expected = "red"                     # optional: must appear in the answer (real weights only)
    max_tokens = 16
    [smoke.image]                        # a generated test image
    kind = "square"                      # a coloured square on a plain background
    width = 256
    height = 256
    color = "red"
    background = "white"
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from provision.errors import HostileContentError, ManifestError, UsageError
from provision.formats.pickles import PICKLE_SUFFIXES, is_pickle_name
from provision.formats.sources import HEX40, HEX64, parse_magnet
from provision.io.atomic import atomic_write_text
from provision.io.opening import read_regular
from provision.io.paths import safe_relpath
from provision.settings import Settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SCHEMA_VERSION = 1
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
ARCHITECTURES = ("pixtral", "mistral", "mixtral")
FORMATS = ("mistral", "hf")
SourceType = Literal["torrent", "hf", "local"]  # a manifest source's ``type``
SOURCE_TYPES: tuple[SourceType, ...] = get_args(SourceType)


@dataclass(frozen=True)
class Source:
    type: SourceType
    magnet: str | None = None
    torrent: str | None = None
    repo: str | None = None
    revision: str | None = None
    prefix: str = ""
    gated: bool = False
    path: str | None = None  # a local source's folder, as written
    folder: Path | None = field(default=None, compare=False)  # a local source's folder, resolved when parsed

    def describe(self) -> str:
        if self.type == "local":
            return f"local folder {self.folder or self.path}"
        if self.type == "hf":
            return f"hf://{self.repo}" + (f"@{self.revision}" if self.revision else " (main, unpinned)")
        if self.magnet:
            return parse_magnet(self.magnet).describe()
        return f"torrent file {self.torrent}"


@dataclass(frozen=True)
class FileSpec:
    path: str
    size: int | None = None
    sha256: str | None = None
    git_sha1: str | None = None
    optional: bool = False
    sources: tuple[str, ...] = ()  # empty: every source carries it
    pickle: bool = False  # a pickled release file: listed for import-pickle, never fetched or loaded
    md5: str | None = None  # a published md5 sum (Mixtral 8x7B's release), checked when set

    def in_source(self, source_type: str) -> bool:
        return not self.sources or source_type in self.sources


@dataclass(frozen=True)
class SmokeImage:
    kind: str = "square"
    width: int = 256
    height: int = 256
    color: str = "red"
    background: str = "white"


@dataclass(frozen=True)
class SmokeSpec:
    prompt: str = "What colour is the square in this image? Answer in one word."
    expected: str | None = None
    max_tokens: int = 16
    image: SmokeImage = field(default_factory=SmokeImage)


@dataclass(frozen=True)
class SigningSpec:
    """A manifest's ``[signing]`` pin: the keys a release must be signed by, and where its signature is.
    Key bytes are kept out of ``repr`` (and so out of logs); a manifest written back carries them as PEM text."""

    signature: str  # a file of the release (relative path), or an https:// (loopback http://) URL
    public_key: bytes | None = field(default=None, repr=False)  # PEM
    certificate_chain: tuple[bytes, ...] = field(default=(), repr=False)  # PEM, one certificate each

    @property
    def signature_url(self) -> str | None:
        return self.signature if "://" in self.signature else None


@dataclass(frozen=True)
class Manifest:
    name: str
    architecture: str
    format: str
    sources: tuple[Source, ...]
    files: tuple[FileSpec, ...]
    smoke: SmokeSpec = field(default_factory=SmokeSpec)
    description: str = ""
    schema_version: int = SCHEMA_VERSION
    path: Path | None = field(default=None, compare=False)  # where it was loaded from
    sha256: str | None = field(default=None, compare=False)  # hash of the file's bytes
    params: dict[str, Any] | None = field(default=None, hash=False)  # the release's params.json, if carried
    signing: SigningSpec | None = None  # the publisher's pinned key(s) and signature location, if any

    def source(self, type_: str) -> Source | None:
        return next((s for s in self.sources if s.type == type_), None)

    def sources_in_order(self) -> tuple[Source, ...]:
        """The order ``--source auto`` tries: a local source first (it needs no network), then as written."""
        return tuple(sorted(self.sources, key=lambda s: s.type != "local"))

    def file(self, path: str) -> FileSpec | None:
        return next((f for f in self.files if f.path == path), None)

    @property
    def complete(self) -> bool:
        """True when every file has a size and a sha256."""
        return all(f.size is not None and f.sha256 for f in self.files)


# ---------------------------------------------------------------------------------------
# validation helpers


def _fail(where: str, msg: str) -> ManifestError:
    return ManifestError(f"Manifest {where}: {msg}", field=where)


def _take(d: dict[str, Any], where: str, allowed: dict[str, tuple[type, ...]],
          required: tuple[str, ...]) -> dict[str, Any]:
    extra = sorted(set(d) - set(allowed))
    if extra:
        raise _fail(f"{where}.{extra[0]}" if where else extra[0], "unknown field (check its spelling).")
    for key in required:
        if key not in d:
            raise _fail(f"{where}.{key}" if where else key, "required field is missing.")
    for key, value in d.items():
        types = allowed[key]
        if isinstance(value, bool) and bool not in types:
            ok = False
        else:
            ok = isinstance(value, types)
        if not ok:
            names = " or ".join(t.__name__ for t in types)
            raise _fail(f"{where}.{key}" if where else key,
                        f"expected {names}, got {type(value).__name__} {value!r}.")
    return d


def _parse_local(d: dict[str, Any], where: str, base: Path) -> Source:
    """A local source: ``path`` names an existing folder (relative to ``base``, the manifest's folder)."""
    for k in sorted(set(d) - {"type", "path"}):
        raise _fail(f"{where}.{k}", "not allowed for a local source.")
    if "path" not in d:
        raise _fail(f"{where}.path", "required field is missing (the folder that holds the files).")
    raw = d["path"]
    if not raw or "\0" in raw:
        raise _fail(f"{where}.path", f"expected a folder, got {raw!r}.")
    folder = Path(os.path.abspath(base / Path(raw).expanduser()))  # '..' taken lexically, as written back
    if not folder.exists():
        raise _fail(f"{where}.path", f"{folder} does not exist.")
    if not folder.is_dir():
        raise _fail(f"{where}.path", f"{folder} is not a folder.")
    return Source(type="local", path=raw, folder=folder)


def _parse_source(d: Any, i: int, base: Path) -> Source:
    where = f"sources[{i}]"
    if not isinstance(d, dict):
        raise _fail(where, "expected a table.")
    _take(d, where, {"type": (str,), "magnet": (str,), "torrent": (str,), "repo": (str,),
                     "revision": (str,), "prefix": (str,), "gated": (bool,), "path": (str,)}, ("type",))
    t = d["type"]
    if t not in SOURCE_TYPES:
        raise _fail(f"{where}.type", f"must be one of {', '.join(SOURCE_TYPES)}, got {t!r}.")
    if t == "local":
        return _parse_local(d, where, base)
    if "path" in d:
        raise _fail(f"{where}.path", f"not allowed for a{'n' if t == 'hf' else ''} {t} source.")
    prefix = d.get("prefix", "")
    if prefix:
        try:
            safe_relpath(prefix.rstrip("/"), what="prefix")
        except HostileContentError as e:
            raise _fail(f"{where}.prefix", e.message) from None
        if not prefix.endswith("/"):
            prefix += "/"
    if t == "torrent":
        for k in ("repo", "revision", "gated"):
            if k in d:
                raise _fail(f"{where}.{k}", "not allowed for a torrent source.")
        if "magnet" not in d and "torrent" not in d:
            raise _fail(where, "a torrent source needs 'magnet' or 'torrent'.")
        if "magnet" in d:
            try:
                parse_magnet(d["magnet"])
            except UsageError as e:
                raise _fail(f"{where}.magnet", e.message) from None
        if "torrent" in d:
            try:
                safe_relpath(d["torrent"], what="torrent path")
            except HostileContentError as e:
                raise _fail(f"{where}.torrent", e.message) from None
        return Source(type=t, magnet=d.get("magnet"), torrent=d.get("torrent"), prefix=prefix)
    for k in ("magnet", "torrent"):
        if k in d:
            raise _fail(f"{where}.{k}", "not allowed for an hf source.")
    if "repo" not in d:
        raise _fail(f"{where}.repo", "required field is missing.")
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$", d["repo"]):
        raise _fail(f"{where}.repo", f"expected 'org/name', got {d['repo']!r}.")
    if "revision" in d and not HEX40.match(d["revision"]):
        raise _fail(f"{where}.revision",
                    f"must be a full 40-hex commit id (not a branch or a short id), got {d['revision']!r}.")
    rev = d["revision"].lower() if "revision" in d else None
    return Source(type=t, repo=d["repo"], revision=rev, prefix=prefix, gated=d.get("gated", False))


def _parse_file(d: Any, i: int) -> FileSpec:
    where = f"files[{i}]"
    if not isinstance(d, dict):
        raise _fail(where, "expected a table.")
    _take(d, where, {"path": (str,), "size": (int,), "sha256": (str,), "git_sha1": (str,),
                     "optional": (bool,), "sources": (list,), "pickle": (bool,), "md5": (str,)}, ("path",))
    try:
        path = str(safe_relpath(d["path"], what="file path"))
    except HostileContentError as e:
        raise _fail(f"{where}.path", e.message) from None
    size = d.get("size")
    if size is not None and size < 0:
        raise _fail(f"{where}.size", f"must be >= 0, got {size}.")
    sha = d.get("sha256")
    if sha is not None and not HEX64.match(sha):
        raise _fail(f"{where}.sha256", f"must be 64 hex characters, got {sha!r}.")
    g = d.get("git_sha1")
    if g is not None and not HEX40.match(g):
        raise _fail(f"{where}.git_sha1", f"must be 40 hex characters, got {g!r}.")
    md5 = d.get("md5")
    if md5 is not None and not re.match(r"^[0-9a-fA-F]{32}$", md5):
        raise _fail(f"{where}.md5", f"must be 32 hex characters, got {md5!r}.")
    srcs = d.get("sources", [])
    for s in srcs:
        if s not in SOURCE_TYPES:
            raise _fail(f"{where}.sources", f"unknown source type {s!r}.")
    return FileSpec(path=path, size=size, sha256=sha.lower() if sha else None,
                    git_sha1=g.lower() if g else None, optional=d.get("optional", False),
                    sources=tuple(srcs), pickle=d.get("pickle", False), md5=md5.lower() if md5 else None)


def _parse_smoke(d: Any) -> SmokeSpec:
    if d is None:
        return SmokeSpec()
    if not isinstance(d, dict):
        raise _fail("smoke", "expected a table.")
    _take(d, "smoke", {"prompt": (str,), "expected": (str,), "max_tokens": (int,), "image": (dict,)}, ())
    img = SmokeImage()
    if "image" in d:
        _take(d["image"], "smoke.image", {"kind": (str,), "width": (int,), "height": (int,),
                                          "color": (str,), "background": (str,)}, ())
        img = SmokeImage(**d["image"])
        if img.kind != "square":
            raise _fail("smoke.image.kind", f"only 'square' is supported, got {img.kind!r}.")
        if not (16 <= img.width <= 4096 and 16 <= img.height <= 4096):
            raise _fail("smoke.image", "width and height must be between 16 and 4096.")
    mt = d.get("max_tokens", 16)
    if not 1 <= mt <= 4096:
        raise _fail("smoke.max_tokens", f"must be between 1 and 4096, got {mt}.")
    return SmokeSpec(prompt=d.get("prompt", SmokeSpec.prompt), expected=d.get("expected"),
                     max_tokens=mt, image=img)


MAX_KEY_BYTES = 1 << 20  # a PEM key or certificate chain is a few KB


def _pem_value(raw: str, where: str, base: Path) -> bytes:
    """PEM text as written, or the bytes of the PEM file it names (relative to ``base``). The
    value is never quoted back in a message: it may be key material."""
    if raw.lstrip().startswith("-----BEGIN "):
        return raw.encode()
    if not raw or "\0" in raw or "\n" in raw:
        raise _fail(where, "expected PEM text or the path of a PEM file.")
    p = base / Path(raw).expanduser()
    try:
        return read_regular(p, what="key file", max_bytes=MAX_KEY_BYTES)
    except FileNotFoundError:
        raise _fail(where, f"{p} does not exist.") from None
    except OSError as e:
        raise _fail(where, f"cannot read {p} ({e.strerror or e}).") from None


def _check_signature_ref(ref: str) -> str:
    if "://" not in ref:
        try:
            return safe_relpath(ref, what="signature path").as_posix()
        except HostileContentError as e:
            raise _fail("signing.signature", e.message) from None
    from ipaddress import ip_address
    from urllib.parse import urlsplit

    u = urlsplit(ref)
    host = u.hostname or ""
    try:
        loopback = host == "localhost" or ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if (u.scheme == "https" and host) or (u.scheme == "http" and loopback):
        return ref
    raise _fail("signing.signature", f"a URL must be https:// (http:// only to a loopback address), got {ref!r}.")


def _parse_signing(d: Any, base: Path) -> SigningSpec | None:
    """``[signing]``: ``signature`` and at least one of ``public_key`` / ``certificate_chain``, each
    PEM text or a PEM file; the key must load as an elliptic-curve public key and the chain as certificates."""
    if d is None:
        return None
    if not isinstance(d, dict):
        raise _fail("signing", "expected a table.")
    for k, t in (("public_key", str), ("certificate_chain", list)):  # checked first: _take would quote the value
        if k in d and not isinstance(d[k], t):
            raise _fail(f"signing.{k}", "expected PEM text or the path of a PEM file"
                        + (" (a list of them)." if t is list else "."))
    _take(d, "signing", {"public_key": (str,), "certificate_chain": (list,), "signature": (str,)}, ("signature",))
    if "public_key" not in d and not d.get("certificate_chain"):
        raise _fail("signing", "needs public_key or certificate_chain (whom the release must be signed by).")
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = None
    if "public_key" in d:
        key = _pem_value(d["public_key"], "signing.public_key", base)
        try:
            loaded = load_pem_public_key(key)
        except (ValueError, TypeError):
            raise _fail("signing.public_key", "is not a PEM public key.") from None
        if not isinstance(loaded, ec.EllipticCurvePublicKey):
            raise _fail("signing.public_key", "is not an elliptic-curve public key (OpenSSF Model Signing "
                        "key signatures use EC keys).")
        key = loaded.public_bytes(_pem(), _spki())
    chain: list[bytes] = []
    for i, c in enumerate(d.get("certificate_chain", [])):
        where = f"signing.certificate_chain[{i}]"
        if not isinstance(c, str):
            raise _fail(where, "expected PEM text or the path of a PEM file.")
        try:
            certs = x509.load_pem_x509_certificates(_pem_value(c, where, base))
        except ValueError:
            raise _fail(where, "holds no readable PEM certificate.") from None
        chain.extend(cert.public_bytes(_pem()) for cert in certs)
    return SigningSpec(signature=_check_signature_ref(d["signature"]), public_key=key,
                       certificate_chain=tuple(chain))


def _pem() -> Any:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.PEM


def _spki() -> Any:
    from cryptography.hazmat.primitives.serialization import PublicFormat

    return PublicFormat.SubjectPublicKeyInfo


def parse_manifest(data: dict[str, Any], *, path: Path | None = None, sha256: str | None = None) -> Manifest:
    """Validate a decoded TOML document and build a ``Manifest``."""
    _take(data, "", {"schema_version": (int,), "name": (str,), "architecture": (str,), "format": (str,),
                     "description": (str,), "sources": (list,), "files": (list,), "smoke": (dict,),
                     "params": (dict,), "signing": (dict,)},
          ("schema_version", "name", "architecture", "format", "sources", "files"))
    if data["schema_version"] != SCHEMA_VERSION:
        raise _fail("schema_version", f"this provision reads version {SCHEMA_VERSION}, got {data['schema_version']}.")
    if not NAME_RE.match(data["name"]):
        raise _fail("name", f"must match {NAME_RE.pattern}, got {data['name']!r}.")
    if data["architecture"] not in ARCHITECTURES:
        raise _fail("architecture", f"must be one of {', '.join(ARCHITECTURES)}, got {data['architecture']!r}.")
    if data["format"] not in FORMATS:
        raise _fail("format", f"must be one of {', '.join(FORMATS)}, got {data['format']!r}.")
    if not data["sources"]:
        raise _fail("sources", "at least one source is required.")
    if not data["files"]:
        raise _fail("files", "at least one file is required.")
    base = path.parent if path is not None else Path.cwd()  # a local source's relative path starts here
    sources = tuple(_parse_source(s, i, base) for i, s in enumerate(data["sources"]))
    files = tuple(_parse_file(f, i) for i, f in enumerate(data["files"]))
    seen: set[str] = set()
    for i, f in enumerate(files):
        if f.path in seen:
            raise _fail(f"files[{i}].path", f"duplicate path {f.path!r}.")
        seen.add(f.path)
        is_pickle = is_pickle_name(f.path)
        if is_pickle and not f.pickle:
            raise _fail(f"files[{i}].path", f"{f.path!r} is a pickle format; provision reads safetensors only "
                        "(mark it pickle = true and optional = true to list it for `provision import-pickle`).")
        if f.pickle and not is_pickle:
            raise _fail(f"files[{i}].pickle", f"{f.path!r} is not a pickle file name ({', '.join(PICKLE_SUFFIXES)}).")
        if f.pickle and not f.optional:
            raise _fail(f"files[{i}].optional", f"pickle file {f.path!r} must be optional: it is never fetched "
                        "or loaded as a model file.")
    params = data.get("params")
    if params is not None:
        from provision.errors import ParamsError
        from provision.formats.params import ModelArgs

        try:
            ModelArgs.from_dict(params)
        except ParamsError as e:
            raise _fail("params", e.message) from None
    return Manifest(name=data["name"], architecture=data["architecture"], format=data["format"],
                    sources=sources, files=files, smoke=_parse_smoke(data.get("smoke")),
                    description=data.get("description", ""), schema_version=data["schema_version"],
                    path=path, sha256=sha256, params=params, signing=_parse_signing(data.get("signing"), base))


def parse_manifest_bytes(raw: bytes, *, path: Path | None = None) -> Manifest:
    where = str(path) if path else "manifest"
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise ManifestError(f"Manifest {where} is not UTF-8 text.", path=where) from None
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"Manifest {where} is not valid TOML: {e}.", path=where) from None
    return parse_manifest(data, path=path, sha256=hashlib.sha256(raw).hexdigest())


def builtin_dirs() -> list[Path]:
    """Where manifest names are looked up, in order."""
    dirs = list(Settings.load().manifest_dirs)
    dirs.append(Path(__file__).resolve().parents[1] / "data" / "manifests")  # shipped in the package
    return dirs


def available_names() -> list[str]:
    names: set[str] = set()
    for d in builtin_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.toml"))
    return sorted(names)


def resolve_manifest_path(ref: str) -> Path:
    p = Path(ref)
    if p.suffix == ".toml" or os.sep in ref or "/" in ref:
        if not p.exists() or p.is_dir():
            raise ManifestError(f"Manifest file not found: {ref}.", path=ref)
        return p  # anything but a regular file is refused when it is opened (exit 5)
    if not NAME_RE.match(ref):
        raise ManifestError(f"Unknown manifest {ref!r}.", hint=f"Known: {', '.join(available_names()) or 'none'}.")
    for d in builtin_dirs():
        cand = d / f"{ref}.toml"
        if cand.is_file():
            return cand
    raise ManifestError(f"Unknown manifest {ref!r}.",
                        hint=f"Known manifests: {', '.join(available_names()) or 'none'}; or pass a .toml path.")


MAX_MANIFEST_BYTES = 64 << 20  # a manifest listing thousands of files is well under 1 MB


def load_manifest(ref: str | Path) -> Manifest:
    path = resolve_manifest_path(str(ref))
    try:  # a FIFO or a device named like a manifest is refused without blocking (exit 5)
        raw = read_regular(path, what="manifest", max_bytes=MAX_MANIFEST_BYTES)
    except OSError as e:
        raise ManifestError(f"Cannot read manifest {path}: {e.strerror}.", path=str(path)) from None
    return parse_manifest_bytes(raw, path=path)


def manifest_to_dict(m: Manifest, *, folder: Path | None = None, key_text: bool = True) -> dict[str, Any]:
    """The TOML document of ``m``; ``folder`` is where it is written, which a local source's
    relative path is re-expressed against so it still names the same folder. ``key_text=False``
    (a report) puts the pinned keys' sha256 fingerprints in place of their PEM text."""
    d: dict[str, Any] = {"schema_version": m.schema_version, "name": m.name,
                         "architecture": m.architecture, "format": m.format}
    if m.description:
        d["description"] = m.description
    d["sources"] = []
    for s in m.sources:
        sd: dict[str, Any] = {"type": s.type}
        if s.type == "local" and s.path is not None:
            sd["path"] = _local_path_for(s.path, s.folder, folder)
        for k in ("magnet", "torrent", "repo", "revision"):
            v = getattr(s, k)
            if v is not None:
                sd[k] = v
        if s.prefix:
            sd["prefix"] = s.prefix
        if s.gated:
            sd["gated"] = True
        d["sources"].append(sd)
    d["files"] = []
    for f in m.files:
        fd: dict[str, Any] = {"path": f.path}
        if f.size is not None:
            fd["size"] = f.size
        # the optional fields in TOML key order; each is written only when set
        fd.update((k, v) for k, v in (("sha256", f.sha256), ("git_sha1", f.git_sha1), ("optional", f.optional),
                                      ("sources", list(f.sources)), ("pickle", f.pickle), ("md5", f.md5)) if v)
        d["files"].append(fd)
    sm: dict[str, Any] = {"prompt": m.smoke.prompt, "max_tokens": m.smoke.max_tokens}
    if m.smoke.expected:
        sm["expected"] = m.smoke.expected
    img = m.smoke.image
    sm["image"] = {"kind": img.kind, "width": img.width, "height": img.height, "color": img.color,
                   "background": img.background}
    d["smoke"] = sm
    if m.signing is not None and not key_text:
        d["signing"] = signing_summary(m.signing)
    elif m.signing is not None:  # key material as PEM text: the manifest stays self-contained wherever it is copied
        sg: dict[str, Any] = {}
        if m.signing.public_key is not None:
            sg["public_key"] = m.signing.public_key.decode()
        if m.signing.certificate_chain:
            sg["certificate_chain"] = [c.decode() for c in m.signing.certificate_chain]
        sg["signature"] = m.signing.signature
        d["signing"] = sg
    if m.params is not None:
        d["params"] = m.params
    return d


def signing_summary(spec: SigningSpec) -> dict[str, Any]:
    """A ``[signing]`` pin for reports and logs: the signature location and the sha256 of each pinned
    key's DER bytes (its fingerprint), never the key text."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

    key = None
    if spec.public_key is not None:
        der = load_pem_public_key(spec.public_key).public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        key = hashlib.sha256(der).hexdigest()
    certs = [hashlib.sha256(x509.load_pem_x509_certificate(c).public_bytes(Encoding.DER)).hexdigest()
             for c in spec.certificate_chain]
    return {"signature": spec.signature, "public_key_sha256": key, "certificate_sha256": certs}


def _local_path_for(path: str, parsed: Path | None, folder: Path | None) -> str:
    """A local source's ``path`` as written into a manifest in ``folder``: an absolute one as is, a relative
    one re-expressed from ``folder`` when both the folder it was ``parsed`` to and ``folder`` are known."""
    if parsed is None or folder is None or Path(path).expanduser().is_absolute():
        return path
    return os.path.relpath(parsed, os.path.abspath(folder))


def dump_manifest(m: Manifest, *, folder: Path | None = None) -> str:
    import tomli_w

    return tomli_w.dumps(manifest_to_dict(m, folder=folder), multiline_strings=False)


def write_manifest(m: Manifest, path: Path) -> Manifest:
    """Write atomically; return the manifest with its new path and hash."""
    text = dump_manifest(m, folder=Path(path).parent)
    back = parse_manifest_bytes(text.encode(), path=path)  # never write something we cannot read back
    atomic_write_text(path, text)
    return replace(m, path=path, sha256=hashlib.sha256(text.encode()).hexdigest(), sources=back.sources)


def with_file_facts(m: Manifest, facts: dict[str, tuple[int, str]]) -> Manifest:
    """Return a copy with size and sha256 recorded for the named files (``manifest lock``)."""
    files = []
    for f in m.files:
        if f.path in facts:
            size, sha = facts[f.path]
            files.append(replace(f, size=size, sha256=sha))
        else:
            files.append(f)
    return replace(m, files=tuple(files))
