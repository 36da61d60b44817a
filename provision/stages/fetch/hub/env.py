"""Where the Hub is and who we are to it: ``HF_ENDPOINT``, offline mode and the token; and where
huggingface_hub's log lines go.

Each setting is read when asked (huggingface_hub reads the environment once, at import, so a test
or a long-lived process that changes it would otherwise go unheard). ``route_hub_logging`` takes
away the stderr handler huggingface_hub installs on its logger, so its lines reach Python logging's
root like any library's (the CLI shows them with ``--verbose`` and keeps them in ``--log-file``).
Nothing here touches the network or logs the token.
"""

from __future__ import annotations

import logging
import os

from provision.stages.fetch.request import HubOptions

_TRUE = {"1", "true", "yes", "on"}


def hub_endpoint() -> str:
    """``HF_ENDPOINT`` as it is now, else huggingface_hub's default, without a trailing slash."""
    env = os.environ.get("HF_ENDPOINT")
    if env:
        return env.rstrip("/")
    from huggingface_hub import constants

    return str(constants.ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as it is now."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        v = os.environ.get(name)
        if v is not None and v.strip():
            return v.strip().lower() in _TRUE
    return False


def resolve_token(options: HubOptions) -> str | None:
    """--token (which the CLI fills from HF_TOKEN), else what huggingface_hub finds: HF_TOKEN or
    the token ``hf auth login`` saved."""
    if options.token:
        return options.token
    from huggingface_hub.utils import get_token

    try:
        return get_token()
    except Exception:  # an unreadable token file means no token, as huggingface_hub itself treats it
        return None


def route_hub_logging() -> None:
    """Remove the stream handler(s) huggingface_hub adds to its ``huggingface_hub`` logger and let its
    records propagate to the root logger instead. Safe to call any number of times."""
    import huggingface_hub.utils.logging  # noqa: F401 - importing it is what installs the handler

    lg = logging.getLogger("huggingface_hub")
    for h in list(lg.handlers):
        if type(h) is logging.StreamHandler:
            lg.removeHandler(h)
    lg.propagate = True
