"""BitTorrent through libtorrent: the only package that imports it (callers import it lazily,
so ``provision --help`` never loads libtorrent).

``meta`` reads .torrent files and magnets' file lists and refuses hostile names; ``session``
builds every session (public and closed network modes); ``job`` resolves a plan's source, paths
and files; ``download`` is ``fetch_torrent``, which hashes files while they arrive
(``stream_hash``) through the alert pump of ``live``, reports ``telemetry`` and moves the
verified files into place (``place``); ``seed`` serves verified files (``provision seed``,
``--seed-for``, background seeding); ``create`` makes torrents. This package does not decide
which source to use (``provision.stages.fetch``) or what a valid file is (``provision.stages.verify``).
"""

from provision.settings import NETWORK_MODES
from provision.stages.fetch.torrent.create import TORRENT_VERSIONS, CreatedTorrent, create_torrent
from provision.stages.fetch.torrent.download import fetch_torrent
from provision.stages.fetch.torrent.meta import (
    TorrentMeta,
    check_info_names,
    magnet_listing,
    read_torrent_file,
    whitelist_lines,
)
from provision.stages.fetch.torrent.place import DeferredSignals
from provision.stages.fetch.torrent.seed import (
    BackgroundSeeding,
    SeedInfo,
    SeedResult,
    background_seeding,
    seed,
    seed_verified,
)
from provision.stages.fetch.torrent.session import closed_flags, open_session, session_settings

__all__ = [
    "NETWORK_MODES", "TORRENT_VERSIONS", "BackgroundSeeding", "CreatedTorrent", "DeferredSignals", "SeedInfo",
    "SeedResult", "TorrentMeta", "background_seeding", "check_info_names", "closed_flags", "create_torrent",
    "fetch_torrent", "magnet_listing", "open_session", "read_torrent_file", "seed", "seed_verified",
    "session_settings", "whitelist_lines",
]
