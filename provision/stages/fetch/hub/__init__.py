"""The Hugging Face Hub source: pinned, verified, resumable downloads. The only package that
imports huggingface_hub, and only inside functions.

``hub_listing`` resolves ``hf://org/repo[@rev]`` to one commit and lists its files (a
``HubSnapshot`` the plan carries); ``fetch_hub`` downloads exactly that commit through our own
ranged, resumable download of each file's ``resolve`` URL, then verifies and commits the files.
Partial downloads live in ``staging/<model>/hub/`` (``<hash>-<size>.part`` with a ``.json``
provenance and a ``.lock``), and ``hub-record.json`` keeps resolved commits for offline use.
It does not choose between sources (``provision.stages.fetch`` does).
"""

from __future__ import annotations

from provision.stages.fetch.hub.env import hub_endpoint, hub_offline
from provision.stages.fetch.hub.fetch import fetch_hub
from provision.stages.fetch.hub.listing import hub_listing
from provision.stages.fetch.hub.wanted import source_of

__all__ = ["fetch_hub", "hub_endpoint", "hub_listing", "hub_offline", "source_of"]
