"""`provision seed DIR`: make a torrent of a verified model folder and serve it to others.

Writes the .torrent (``--torrent-out``), the magnet (``--magnet-out``, and stderr) and an
opentracker whitelist line (``--whitelist-out``) before serving, then seeds until
``--seed-for`` ends or SIGINT/SIGTERM (both end a seed normally: exit 0 with the report).
``--seed-for 0`` writes the outputs and exits without serving. A converted profile
(``seed MODEL --profile P``, or a folder whose ``provenance.json`` has a recipe) is published with
its record and signature (``--signature``, else ``<profile>_signature.sig`` beside it) for
``provision run SOURCE --profile-from MAGNET``. The work is in ``provision.stages.fetch.torrent.seed``
and ``provision.stages.profile_share``; this module only parses options and renders.
"""

from __future__ import annotations

from pathlib import Path

import click

from provision.cli.app import get_app
from provision.cli.options import json_option, parse_rate


@click.command("seed")
@click.argument("folder", metavar="DIR|MODEL", type=click.Path(file_okay=False, path_type=Path))
@click.option("--profile", "profile", metavar="P",
              help="Seed MODEL's converted profile P from the store (with its provenance record and signature).")
@click.option("--signature", type=click.Path(dir_okay=False, path_type=Path), metavar="SIG",
              help="A profile's signature to publish with it (default: <profile>_signature.sig beside the folder, if any).")
@click.option("--manifest", "manifest_ref", metavar="M",
              help="Seed exactly the manifest's files (checked for size) and name the torrent after it.")
@click.option("--torrent-version", type=click.Choice(["hybrid", "v1", "v2"]), default="hybrid", show_default=True,
              help="hybrid (v1+v2) for everyone; v1 for old clients (aria2c, transmission 3).")
@click.option("--torrent-out", type=click.Path(dir_okay=False, path_type=Path), help="Write the .torrent here.")
@click.option("--magnet-out", type=click.Path(dir_okay=False, path_type=Path), help="Write the magnet link here.")
@click.option("--whitelist-out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the infohash line(s) an opentracker whitelist needs (40 hex each).")
@click.option("--web-seed", "web_seeds", multiple=True, metavar="URL",
              help="BEP 19 web seed (repeatable); a client fetches URL + name + '/' + path.")
@click.option("--tracker", "trackers", multiple=True, metavar="URL", help="Announce to this tracker (repeatable).")
@click.option("--network", type=click.Choice(["public", "closed"]), envvar="PROVISION_NETWORK", default="public",
              show_default=True, show_envvar=True,
              help="public: DHT, trackers, PEX. closed: only the trackers given, no DHT/LSD/UPnP/NAT-PMP/uTP, "
                   "listening on 127.0.0.1 unless --listen.")
@click.option("--listen", metavar="HOST:PORT", help="Listen interface (closed mode default 127.0.0.1:0).")
@click.option("--seed-for", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Serve this long (default: until SIGINT/SIGTERM; 0: write the outputs and exit).")
@click.option("--max-upload-rate", metavar="R", help="Upload limit, e.g. 10M (bytes/s).")
@click.option("--upload-slots", type=click.IntRange(min=0), default=0, metavar="N",
              help="Serve N peers at once (0: libtorrent's default, 8); 2 suits a fleet's origin.")
@click.option("--super-seed", is_flag=True,
              help="BEP 16 super seeding: offer each peer pieces the others lack, one at a time (a fleet's origin "
                   "then uploads about one copy; slower for a lone downloader).")
@json_option
def command(folder: Path, profile: str | None, signature: Path | None, manifest_ref: str | None,
            torrent_version: str, torrent_out: Path | None,
            magnet_out: Path | None, whitelist_out: Path | None, web_seeds: tuple[str, ...],
            trackers: tuple[str, ...], network: str, listen: str | None, seed_for: float | None,
            max_upload_rate: str | None, upload_slots: int, super_seed: bool, json_out: bool) -> None:
    """Create a torrent of DIR (a verified model folder, or MODEL's --profile P) and seed it."""
    app = get_app(json_out, "seed")
    from provision.progress import ProgressEvent
    from provision.stages.fetch.torrent import SeedInfo, seed
    from provision.units import human_bytes

    up = parse_rate(max_upload_rate)
    from provision.errors import UsageError
    from provision.stages.profile_share import is_profile_folder, seed_profile

    if profile is not None:
        from provision.layout import Layout

        folder = Layout(app.settings.home).profile(str(folder), profile)
        if not folder.is_dir():
            raise UsageError(f"The store has no profile {profile} of that model ({folder}).")
    share = profile is not None or is_profile_folder(folder)
    if share and manifest_ref:
        raise UsageError("--manifest names an original's files; a profile is seeded with its own record.")
    if signature is not None and not share:
        raise UsageError("--signature goes with a converted profile (a folder with provenance.json).")
    manifest = None
    if manifest_ref:
        from provision.formats.manifest import load_manifest

        manifest = load_manifest(manifest_ref)
        app.manifest_sha256 = manifest.sha256

    def ready(info: SeedInfo) -> None:
        app.result(f"magnet: {info.magnet}")
        if info.torrent_file:
            app.result(f"torrent: {info.torrent_file}")
        app.terminal.info(f"seeding {info.name} on {info.listen}"
                          + (f" for {seed_for:g} s" if seed_for else "" if seed_for == 0 else
                             " until SIGINT/SIGTERM"))

    def progress(ev: ProgressEvent) -> None:
        app.terminal.progress(ev)

    if share:
        shared = seed_profile(folder, signature=signature, version=torrent_version, torrent_out=torrent_out,
                              magnet_out=magnet_out, whitelist_out=whitelist_out, web_seeds=web_seeds,
                              trackers=trackers, network=network, listen=listen, seed_for=seed_for,
                              max_upload_rate=up, upload_slots=upload_slots, super_seed=super_seed, progress=progress,
                              on_ready=ready)
        res = shared.seed
        app.terminal.success(f"seeded profile {shared.profile} ({len(res.files)} files, "
                             f"{human_bytes(res.total_size)}, {'signed' if shared.signature else 'unsigned'}): "
                             f"{human_bytes(res.uploaded_bytes)} uploaded in {res.seconds:.1f} s "
                             f"(ended by {res.stopped_by})")
        app.finish({"seed": shared.to_dict()})
        return
    res = seed(folder, manifest=manifest, version=torrent_version, torrent_out=torrent_out, magnet_out=magnet_out,
               whitelist_out=whitelist_out, web_seeds=web_seeds, trackers=trackers, network=network, listen=listen,
               seed_for=seed_for, max_upload_rate=up, upload_slots=upload_slots, super_seed=super_seed,
               progress=progress, on_ready=ready)
    app.terminal.success(f"seeded {res.info.name} ({len(res.files)} files, {human_bytes(res.total_size)}): "
                         f"{human_bytes(res.uploaded_bytes)} uploaded in {res.seconds:.1f} s "
                         f"(ended by {res.stopped_by})")
    app.finish({"seed": res.to_dict()})
