"""libtorrent sessions: the settings packs of the two network modes and the one place a session
is built, opened and closed.

``closed`` turns DHT, LSD, UPnP, NAT-PMP and uTP off and listens on 127.0.0.1 unless told
otherwise; it keeps PEX, which only passes on peers learnt from the given trackers and peers
(how fleet members find each other). ``public`` keeps libtorrent's defaults. With
``PROVISION_FORBID_PUBLIC_NETWORK=1`` (the test suite) a session that could reach beyond
loopback is refused. This module adds no torrent and reads no alert: the callers do.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

import libtorrent as lt

from provision.errors import UsageError
from provision.settings import NETWORK_MODES, Settings
from provision.version import __version__

# pread()/pwrite() disk I/O instead of 2.1's default (mmap): less CPU per byte written, and
# no mapping that would pin the pages the stream hasher drops once they are on disk
DISK_IO = "pread_disk_io_constructor"

_ALERTS = (lt.alert.category_t.error_notification | lt.alert.category_t.status_notification
           | lt.alert.category_t.storage_notification | lt.alert.category_t.piece_progress_notification
           | lt.alert.category_t.tracker_notification | lt.alert.category_t.connect_notification
           | lt.alert.category_t.peer_notification)

# flags that keep a torrent from starting at once; every add_torrent here clears them
NOT_STARTED = lt.torrent_flags.paused | lt.torrent_flags.auto_managed


def parse_listen(value: str) -> str:
    """``HOST:PORT`` as libtorrent's ``listen_interfaces`` wants it (IPv6 in brackets); exit 2 if malformed."""
    v = value.strip()
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) < 65536) or not host:
        raise UsageError(f"Malformed --listen {value!r} (expected HOST:PORT, e.g. 127.0.0.1:6881 or [::1]:0).")
    if host.startswith("[") != host.endswith("]"):
        raise UsageError(f"Malformed --listen {value!r}: unbalanced brackets around the IPv6 address.")
    bare = host.strip("[]")
    if ":" in bare:
        return f"[{bare}]:{int(port)}"
    return f"{bare}:{int(port)}"


def session_settings(network: str, *, listen: str | None = None, upload_rate: int = 0,
                     download_rate: int = 0) -> dict[str, Any]:
    """The settings every session starts from (``lt.session(settings)``: nothing runs before them).

    ``closed``: no DHT, LSD, UPnP, NAT-PMP or uTP (20 MB/s on loopback instead of ~500), listening
    on ``listen`` or 127.0.0.1 with a free port, several peers per address allowed (loopback
    tests). ``public``: libtorrent's defaults (DHT, LSD, UPnP, NAT-PMP, uTP), ``listen`` if given.
    """
    if network not in NETWORK_MODES:
        raise UsageError(f"--network must be one of {', '.join(NETWORK_MODES)}, got {network!r}.")
    s: dict[str, Any] = {
        "user_agent": f"provision/{__version__} libtorrent/{lt.__version__}",
        "alert_mask": _ALERTS,
        "alert_queue_size": 200_000,
        "upload_rate_limit": max(0, int(upload_rate)),
        "download_rate_limit": max(0, int(download_rate)),
        "stop_tracker_timeout": 1,
        "close_redundant_connections": False,  # keep the peer that sent the metadata while priorities apply
        # throughput on fast links: deeper send buffers than the defaults (500 kB / 10 kB), but
        # not so deep that the seeder's fill_send_buffer dominates its CPU (seen with 8 MiB)
        "send_buffer_watermark": 1 << 20,
        "send_buffer_low_watermark": 256 << 10,
        "max_queued_disk_bytes": 64 << 20,
        "max_out_request_queue": 3000,
        "max_allowed_in_request_queue": 6000,
        # few threads on few cores: 2 disk threads and 1 SHA-1 thread measured ~8% faster on 2
        # cores than 4 + 2 (less lock contention on the file being written, fewer switches)
        "aio_threads": 2,
        "hashing_threads": 1,
    }
    if upload_rate or download_rate:
        s["ignore_limits_on_local_network"] = False  # a limit the user asked for applies to LAN peers too
    if network == "closed":
        s.update({
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "enable_outgoing_utp": False,
            "enable_incoming_utp": False,
            "dht_bootstrap_nodes": "",
            "listen_interfaces": parse_listen(listen or "127.0.0.1:0"),
            "allow_multiple_connections_per_ip": True,
        })
    elif listen:
        s["listen_interfaces"] = parse_listen(listen)
    return s


def _refuse_public(settings: dict[str, Any]) -> None:
    loud = [k for k in ("enable_dht", "enable_lsd", "enable_upnp", "enable_natpmp") if settings.get(k, True)]
    listen = str(settings.get("listen_interfaces", "0.0.0.0"))
    if loud or not all(part.strip().startswith(("127.", "[::1]", "10.77.")) for part in listen.split(",")):
        raise UsageError(f"refusing a public libtorrent session here ({', '.join(loud) or listen}): "
                         "PROVISION_FORBID_PUBLIC_NETWORK=1 allows only the closed network mode.")


def open_session(settings: dict[str, Any]) -> Any:
    """A libtorrent session started from ``settings`` (nothing runs before they apply).

    ``PROVISION_FORBID_PUBLIC_NETWORK=1`` (set by the test suite) refuses any session with DHT,
    LSD, UPnP or NAT-PMP on, or listening beyond loopback: a safety net for the network rule."""
    if Settings.load().forbid_public_network:
        _refuse_public(settings)
    params = lt.session_params()
    params.settings = settings  # type: ignore[assignment]  # the bindings take a dict
    params.disk_io_constructor = DISK_IO
    try:
        return lt.session(params)
    except RuntimeError as e:  # pragma: no cover - libtorrent rejects a settings value
        raise UsageError(f"libtorrent refused the session settings: {e}.") from None


def close_session(ses: Any) -> None:
    """Pause ``ses`` and remove its torrents (best effort: it may be half torn down already)."""
    if ses is None:
        return
    # teardown, often in a finally: libtorrent raises for a session or handle already gone (nothing
    # left to stop then), and whatever it raises must not replace the error being handled
    with contextlib.suppress(Exception):
        ses.pause()
    with contextlib.suppress(Exception):  # same
        for h in ses.get_torrents():
            ses.remove_torrent(h)


def closed_flags(network: str) -> int:
    """Torrent flags of the network mode: ``closed`` turns the torrent's DHT and LSD off."""
    if network == "closed":
        # PEX stays on: it only passes on peers that came from the given trackers and peers
        # (how fleet members find each other), never a DHT or LSD discovery
        return int(lt.torrent_flags.disable_dht | lt.torrent_flags.disable_lsd)
    return 0


def listen_endpoint(ses: Any, settings: dict[str, Any]) -> str:
    """HOST:PORT others can use to reach this session (for x.pe); wildcards become this host's address."""
    port = int(ses.listen_port())
    iface = str(settings.get("listen_interfaces") or "0.0.0.0:0").split(",")[0]
    host = iface.rpartition(":")[0].strip("[]")
    if host in ("0.0.0.0", "::", ""):
        host = _primary_address()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _primary_address() -> str:
    try:
        for fam, _, _, _, addr in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            ip = str(addr[0])
            if fam == socket.AF_INET and not ip.startswith("127."):
                return ip
    except OSError:  # the host name does not resolve: loopback is what others on this host can use
        pass
    return "127.0.0.1"
