"""`provision fetch SOURCE`: download and verify a model's files (torrent or Hub)."""

from __future__ import annotations

from pathlib import Path

import click

from provision.cli.app import get_app
from provision.cli.options import home_option, json_option, parse_rate, source_option, transfer_options


@click.command("fetch")
@click.argument("source")
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), help="Destination folder.")
@home_option
@click.option("--include", multiple=True, metavar="GLOB", help="Only files matching this glob (repeatable).")
@click.option("--force", is_flag=True,
              help="Replace files already in --dest that are not the verified ones (each is named).")
@source_option
@transfer_options
@json_option
def command(source: str, dest: Path | None, home: Path | None, include: tuple[str, ...], force: bool, source_kind: str,
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
    # the plan's listing of an hf:// repo uses --token and --stall-timeout too
    plan = make_plan(source, settings=app.settings, home=home, dest=dest, include=include,
                     offline=source.startswith("magnet:"), hub_options=hopts)
    if plan.manifest is not None:
        app.manifest_sha256 = plan.manifest.sha256
    topts = TorrentOptions(peers=peers, trackers=trackers, network=network, listen=listen, seed_for=seed_for,
                           max_upload_rate=up, max_download_rate=down, stall_timeout=stall_timeout,
                           metadata_timeout=stall_timeout, include=include)
    res = fetch(plan, source=source_kind, dest=dest, torrent=topts, hub=hopts, progress=app.terminal.progress,
                force=force)
    app.terminal.success(f"{len(res.files)} files verified in {res.dest} from {res.source}: "
                         f"{human_bytes(res.bytes_downloaded)} downloaded in {res.seconds:.1f} s")
    app.result(str(res.dest))  # the result, as `hf download` gives it: where the verified files are
    app.finish({"fetch": res.to_dict()})
