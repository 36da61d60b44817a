"""`provision doctor`: check this host for a run, one line per check, each ok / warn / fail with its fix.

A thin command over ``provision.cli.diagnose.run_checks``: it chooses the trackers to probe (those
given, else the README model's manifest's, unless public traffic is forbidden), prints one result
line per check and a summary, and exits 0 when nothing failed, 1 otherwise. The Hugging Face token
is reported as present or not; its value is never printed nor logged.
"""

from __future__ import annotations

from typing import Any

import click

from provision.cli.app import get_app
from provision.cli.options import json_option, network_option

DEFAULT_MANIFEST = "pixtral-12b-2409"  # the README's model: its trackers are the ones a first run meets
EXIT_FAILED_CHECK = 1


def default_trackers() -> tuple[str, ...]:
    """The trackers of the default manifest's torrent sources."""
    from provision.formats.manifest import load_manifest
    from provision.formats.sources import parse_magnet

    m = load_manifest(DEFAULT_MANIFEST)
    return tuple(t for s in m.sources if s.magnet for t in parse_magnet(s.magnet).trackers)


@click.command("doctor")
@network_option
@click.option("--tracker", "trackers", multiple=True, metavar="URL",
              help="Tracker to check (repeatable); default: the trackers of the pixtral-12b-2409 manifest.")
@click.option("--offline", is_flag=True, help="Check nothing over the network.")
@click.option("--timeout", type=click.FloatRange(min=0.1, max=60), default=3.0, show_default=True,
              metavar="SECONDS", help="How long each network check may take.")
@json_option
def command(network: str, trackers: tuple[str, ...], offline: bool, timeout: float, json_out: bool) -> None:
    """Check what this host has and what a run here needs: GPUs and driver, torch's CUDA build, free disk
    under the home, the store, libtorrent, vLLM, the Hugging Face token (never shown), and, unless the
    network mode is closed or --offline, whether the Hub and the trackers answer. Exit 0 when no check
    fails, 1 otherwise."""
    app = get_app(json_out, "doctor")
    from provision.cli.diagnose import run_checks
    from provision.stages.fetch.hub.env import hub_endpoint, hub_offline

    off = offline or hub_offline()
    probe = trackers
    if not probe and network == "public" and not off and not app.settings.forbid_public_network:
        probe = default_trackers()
    checks = run_checks(home=app.settings.home, mode=network, offline=off, endpoint=hub_endpoint(),
                        trackers=probe, timeout=timeout)
    width = max(len(c.name) for c in checks)
    for c in checks:
        app.result(f"{c.status:4s}  {c.name:{width}s}  {c.detail}" + (f"  -> {c.fix}" if c.fix else ""))
    failed = [c for c in checks if c.status == "fail"]
    warned = [c for c in checks if c.status == "warn"]
    summary = f"{len(checks)} checks: {len(failed)} failed, {len(warned)} warnings"
    if failed:
        app.terminal.error(summary)
    else:
        app.terminal.success(summary)
    code = EXIT_FAILED_CHECK if failed else 0
    report: dict[str, Any] = {"checks": [c.to_dict() for c in checks], "failed": len(failed),
                              "warnings": len(warned)}
    if failed:
        report["error"] = {"kind": "doctor", "exit_code": code, "context": {"failed": [c.name for c in failed]},
                           "message": f"{len(failed)} check(s) failed: {', '.join(c.name for c in failed)}."}
    app.finish(report, ok=not failed, exit_code=code)
    if failed:
        raise click.exceptions.Exit(code)
