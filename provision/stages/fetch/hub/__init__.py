"""The Hugging Face Hub source: pinned, verified, resumable downloads. The only package that
imports huggingface_hub, and only lazily (inside functions), so importing it costs nothing.

``hub_listing(ref, options)`` resolves ``hf://org/repo[@rev]`` to one commit and returns that
commit's files as a ``HubSnapshot``; the plan carries it, and ``fetch_hub(plan, dest=, options=,
progress=)`` downloads exactly that commit. huggingface_hub provides the token, the endpoint,
the commit a branch points to and each file's metadata; the bytes go through our own ranged
download of the file's ``resolve`` URL (``download``), are verified and committed into place
(``fetch``). Modules: ``env`` (endpoint, offline mode, token), ``errors`` (Hub errors, retry
policy), ``listing`` (snapshots, the offline record), ``wanted`` (what to fetch and what vouches
for it), ``http`` (one ranged GET), ``download`` (resumable partial files), ``fetch`` (the driver).

Staging layout (``Layout(home).staging(model)``)::

    staging/<model>/
    ├── hub/<sha256-or-sha1>-<size>.part     bytes received so far (never trusted as such)
    ├── hub/<sha256-or-sha1>-<size>.json     provenance: what the bytes are supposed to be
    ├── hub/<sha256-or-sha1>-<size>.lock     held (flock) by the process writing the partial
    ├── hub/verify/<key>/<path>              a finished download while it is being verified
    └── hub-record.json                      refs -> commit and the commit's listing (offline use)
"""

from __future__ import annotations

from provision.stages.fetch.hub.env import hub_endpoint, hub_offline
from provision.stages.fetch.hub.fetch import fetch_hub
from provision.stages.fetch.hub.listing import hub_listing
from provision.stages.fetch.hub.wanted import source_of

__all__ = ["fetch_hub", "hub_endpoint", "hub_listing", "hub_offline", "source_of"]
