"""`provision fetch SOURCE`: download and verify a model's files (torrent or Hub)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from provision.cli.app import get_app, json_option

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)(i?)[bB]?(?:/s)?\s*$")


def parse_rate(value: str | None) -> int:
    """'10M', '500k', '1.5GiB' -> bytes per second; 0 or empty means unlimited."""
    if not value:
        return 0
    m = _RATE.match(value)
    if not m:
        raise click.BadParameter(f"{value!r} is not a rate (examples: 500k, 10M, 1G).")
    base = 1024 if m.group(3) else 1000
    mult = {"": 1, "k": base, "m": base**2, "g": base**3}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


F = TypeVar("F", bound=Callable[..., Any])


def torrent_options(f: F) -> F:
    """Options shared by `fetch`, `seed` and `run` for BitTorrent."""
    opts = [
        click.option("--network", type=click.Choice(["public", "closed"]), envvar="PROVISION_NETWORK",
                     default="public", show_default=True,
                     help="public: DHT, trackers, PEX. closed: only the peers and trackers given, no DHT/LSD/UPnP/NAT-PMP/uTP."),
        click.option("--listen", metavar="HOST:PORT", help="Listen interface (closed mode default 127.0.0.1:0)."),
        click.option("--tracker", "trackers", multiple=True, metavar="URL", help="Add a tracker (repeatable)."),
        click.option("--seed-for", type=click.FloatRange(min=0), default=0, show_default=True, metavar="SECONDS",
                     help="Keep seeding this long after the download."),
        click.option("--max-upload-rate", metavar="R", help="Upload limit, e.g. 10M (bytes/s)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@click.command("fetch")
@click.argument("source")
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), help="Destination folder.")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), envvar="PROVISION_HOME",
              help="Model store (default ~/.cache/provision).")
@click.option("--include", multiple=True, metavar="GLOB", help="Only files matching this glob (repeatable).")
@click.option("--source", "source_kind", type=click.Choice(["auto", "torrent", "hf"]), default="auto",
              show_default=True, help="Which of the manifest's sources to use; auto tries them in order.")
@click.option("--peer", "peers", multiple=True, metavar="HOST:PORT", help="Connect to this peer (repeatable).")
@torrent_options
@click.option("--max-download-rate", metavar="R", help="Download limit, e.g. 50M (bytes/s).")
@click.option("--stall-timeout", type=click.FloatRange(min=1), default=120, show_default=True,
              help="Seconds without progress before a source counts as stalled.")
@click.option("--token", envvar="HF_TOKEN", help="Hugging Face token (default: HF_TOKEN or the saved login).",
              show_envvar=True)
@json_option
def command(source: str, dest: Path | None, home: Path | None, include: tuple[str, ...], source_kind: str,
            peers: tuple[str, ...], network: str, listen: str | None, trackers: tuple[str, ...], seed_for: float,
            max_upload_rate: str | None, max_download_rate: str | None, stall_timeout: float, token: str | None,
            json_out: bool) -> None:
    """Download SOURCE's files into DEST, verify them, and move them into place."""
    app = get_app(json_out, "fetch")
    from provision.formats.sources import parse_peer
    from provision.stages.fetch import HubOptions, TorrentOptions, fetch
    from provision.stages.plan import make_plan
    from provision.units import human_bytes

    for p in peers:
        parse_peer(p)
    up, down = parse_rate(max_upload_rate), parse_rate(max_download_rate)
    hopts = HubOptions(token=token, stall_timeout=stall_timeout)
    from provision.stages.fetch.hub import use_options

    use_options(hopts)  # the plan's listing of an hf:// repo uses --token and --stall-timeout too
    plan = make_plan(source, settings=app.settings, home=home, dest=dest, include=include,
                     offline=True if source.startswith("magnet:") else False)
    if plan.manifest is not None:
        app.manifest_sha256 = plan.manifest.sha256
    topts = TorrentOptions(peers=peers, trackers=trackers, network=network, listen=listen, seed_for=seed_for,
                           max_upload_rate=up, max_download_rate=down, stall_timeout=stall_timeout,
                           metadata_timeout=stall_timeout, include=include)
    res = fetch(plan, source=source_kind, dest=dest, torrent=topts, hub=hopts, progress=app.terminal.progress)
    app.terminal.success(f"{len(res.files)} files verified in {res.dest} from {res.source}: "
                         f"{human_bytes(res.bytes_downloaded)} downloaded in {res.seconds:.1f} s")
    app.finish({"fetch": res.to_dict()})
