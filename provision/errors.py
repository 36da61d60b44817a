"""Typed errors and the exit-code table: the one place both are defined.

Every failure a stage can report is a ``ProvisionError`` subclass carrying its exit code, a
one-sentence message (what is wrong, what to do next) and context for the ``--json`` report; each
also inherits from the closest builtin (``OSError``, ``ValueError``...). This module does not
print or exit (``cli.main`` does). The table below is the reference for the exit codes::

    0   ok
    1   unexpected error (a bug: run again with PROVISION_DEBUG=1 for the traceback)
    2   usage: a malformed command-line argument
    3   manifest or config: a bad manifest, params.json or option combination
    4   fetch: network, not found, auth, stalled
    5   verification: size, hash, structure, hostile content
    6   resources: disk, GPU memory, a lock held too long
    7   conversion
    8   smoke test
    130 interrupted by SIGINT
    143 terminated by SIGTERM
"""

from __future__ import annotations

import re
from typing import Any, Protocol

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_MANIFEST = 3
EXIT_FETCH = 4
EXIT_VERIFY = 5
EXIT_RESOURCES = 6
EXIT_CONVERT = 7
EXIT_SMOKE = 8
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "ok",
    EXIT_UNEXPECTED: "unexpected error",
    EXIT_USAGE: "usage: a malformed command-line argument",
    EXIT_MANIFEST: "manifest or config: a bad manifest, params.json or option combination",
    EXIT_FETCH: "fetch: network, not found, auth, stalled",
    EXIT_VERIFY: "verification: size, hash, structure, hostile content",
    EXIT_RESOURCES: "resources: disk, GPU memory, a lock held too long",
    EXIT_CONVERT: "conversion",
    EXIT_SMOKE: "smoke test",
    EXIT_SIGINT: "interrupted (SIGINT)",
    EXIT_SIGTERM: "terminated (SIGTERM)",
}


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with every control character (C0, DEL, C1: newlines and terminal escape sequences
    included) written as a visible ``\\xNN`` escape, so a name from a download or a checkpoint
    cannot move the cursor, clear the screen or forge a second line on a terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", text)


class _Reported:
    """What the CLI reports of an error: the one-line message (``str``), the exit code, the kind
    and the context of the ``--json`` report. Shared by ``ProvisionError`` and ``Interrupted``."""

    exit_code: int = EXIT_UNEXPECTED
    kind: str = "error"

    def __init__(self, message: str, *, hint: str | None = None, **context: Any) -> None:
        message = printable(message)  # names from a download or a file reach the terminal escaped
        super().__init__(message)  # type: ignore[call-arg]  # Exception or KeyboardInterrupt, next in the MRO
        self.message = message
        self.hint = printable(hint) if hint is not None else None
        self.context: dict[str, Any] = context

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} {self.hint}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "exit_code": self.exit_code,
            "message": str(self),
            "context": {k: _jsonable(v) for k, v in self.context.items()},
        }


class ProvisionError(_Reported, Exception):
    """Base of every expected failure. ``str(err)`` is the one-line message."""


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


class UsageError(ProvisionError, ValueError):
    exit_code = EXIT_USAGE
    kind = "usage"


class ManifestError(ProvisionError, ValueError):
    """A manifest, params.json or configuration is malformed or inconsistent."""

    exit_code = EXIT_MANIFEST
    kind = "manifest"


class ParamsError(ManifestError):
    kind = "params"


class FetchError(ProvisionError, ConnectionError):
    exit_code = EXIT_FETCH
    kind = "fetch"


class NotFoundError(FetchError):
    kind = "not_found"


class AuthError(FetchError):
    kind = "auth"


class StallError(FetchError):
    kind = "stalled"


class VerifyError(ProvisionError):
    exit_code = EXIT_VERIFY
    kind = "verify"


class HashMismatchError(VerifyError):
    kind = "hash_mismatch"


class SizeMismatchError(VerifyError):
    kind = "size_mismatch"


class StructureError(VerifyError):
    kind = "structure"


class HostileContentError(VerifyError):
    """A path that escapes the destination, a symlink out, a pickle, an absurd header."""

    kind = "hostile"


class ResourceError(ProvisionError, OSError):
    exit_code = EXIT_RESOURCES
    kind = "resources"


class DiskSpaceError(ResourceError):
    kind = "disk"


class GPUMemoryError(ResourceError):
    kind = "gpu_memory"


class LockTimeoutError(ResourceError):
    kind = "lock"


class ConvertError(ProvisionError):
    exit_code = EXIT_CONVERT
    kind = "convert"


class StageReport(Protocol):
    """What a stage that failed part-way hands back with its error: a report that renders to JSON."""

    def to_dict(self) -> dict[str, Any]: ...


class SmokeError(ProvisionError):
    """The smoke test failed. ``report`` is the finished run's report when the model ran but a
    check failed (``None`` when it could not run at all); its JSON is also in ``context``."""

    exit_code = EXIT_SMOKE
    kind = "smoke"

    def __init__(self, message: str, *, report: StageReport | None = None, hint: str | None = None,
                 **context: Any) -> None:
        if report is not None:
            context["report"] = report.to_dict()
        super().__init__(message, hint=hint, **context)
        self.report = report


class Interrupted(_Reported, KeyboardInterrupt):
    """Raised by the SIGTERM handler (and used for SIGINT) so ``finally`` blocks run. Like
    ``KeyboardInterrupt`` it is no ``Exception``: no ``except Exception`` (or ``except
    ProvisionError``) on the way can swallow it and carry on."""

    exit_code = EXIT_SIGINT
    kind = "interrupted"

    def __init__(self, message: str = "Interrupted.", *, signum: int = 2, **context: Any) -> None:
        super().__init__(message, **context)
        self.signum = signum
        self.exit_code = EXIT_SIGTERM if signum == 15 else EXIT_SIGINT
