"""`provision run SOURCE`: plan -> fetch -> verify -> convert -> smoke, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from provision.cli.app import App, get_app
from provision.cli.commands.convert import workers_option
from provision.cli.options import (
    home_option,
    json_option,
    layout_option,
    parse_rate,
    profile_options,
    source_option,
    transfer_options,
)


def render_summary(app: App, stages: list[dict[str, Any]]) -> None:
    from rich.table import Table

    from provision.units import human_bytes

    table = Table(title="provision run", show_header=True, header_style="bold")
    table.add_column("stage")
    table.add_column("result")
    table.add_column("seconds", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("note")
    for s in stages:
        d = s.get("details", {})
        note = s.get("profile") or d.get("reason") or d.get("how") or ""
        if s["stage"] == "smoke" and s["result"] == "ok":
            note = f"{note} text={d.get('text', '')[:40]!r}"
        table.add_row(s["stage"], s["result"], f"{s['seconds']:.2f}", human_bytes(s["bytes"]), str(note))
    app.result(table)


@click.command("run")
@click.argument("source")
@home_option
@source_option
@profile_options
@layout_option
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the smoke test runs.")
@transfer_options
@click.option("--adopt", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Verify an existing copy in this folder and take it in instead of downloading.")
@click.option("--no-hf-cache", is_flag=True, help="Do not look for the model in the Hugging Face cache.")
@click.option("--drop-original", is_flag=True, help="Remove the original after a verified conversion and smoke test.")
@click.option("--reverify", is_flag=True, help="Re-hash and redo every stage check, even when recorded as done.")
@click.option("--keep-pickle", is_flag=True,
              help="A pickled torrent release: keep the verified pickle in staging after the import (default: drop it).")
@click.option("--skip-smoke", is_flag=True, help="Stop after the conversion.")
@click.option("--smoke-engine", type=click.Choice(["provision", "vllm", "both"]), default=None,
              help="Which engine judges the smoke test (see `provision smoke --engine`); default: "
                   "PROVISION_SMOKE_ENGINE, else both where vLLM can run the model here, else provision.")
@click.option("--skip-convert", is_flag=True, help="Smoke-test the original instead of converting.")
@workers_option
@click.option("--profile-from", metavar="MAGNET|TORRENT",
              help="Take the converted profile a seeder shares (provision seed MODEL --profile P) instead of "
                   "fetching the original and converting: its magnet or .torrent (with --peer HOST:PORT).")
@click.option("--trust-key", type=click.Path(dir_okay=False, path_type=Path), metavar="PUBKEY",
              help="--profile-from: the publisher's public key (PEM) the profile's signature must verify against.")
@click.option("--allow-unsigned", is_flag=True,
              help="--profile-from without --trust-key: trust the profile's provenance record alone.")
@click.option("--trust-certificate-chain", "trust_certificate_chain", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path), metavar="PEM",
              help="--profile-from: certificates (PEM; repeat the option) a certificate signature of the profile "
                   "must chain to, instead of --trust-key.")
@click.option("--force", "force", is_flag=True,
              help="--profile-from: replace a profile of the same name converted on this host (refused otherwise).")
@click.option("--lock-timeout", type=click.FloatRange(min=0), default=None,
              help="Seconds to wait for another run on the same model (default 60).")
@click.option("--offline", is_flag=True, help="Never touch the network while planning.")
@click.option("--dry-run", is_flag=True, help="Print the plan and stop.")
@json_option
def command(source: str, home: Path | None, source_kind: str, target: str, scheme: str, layout: str | None,
            context: int, device: str, peers: tuple[str, ...], network: str, listen: str | None,
            trackers: tuple[str, ...], seed_for: float, max_upload_rate: str | None,
            max_download_rate: str | None, stall_timeout: float, token: str | None, adopt: Path | None,
            no_hf_cache: bool, drop_original: bool, reverify: bool, keep_pickle: bool, skip_smoke: bool, smoke_engine: str | None,
            skip_convert: bool,
            workers: int | None, profile_from: str | None, trust_key: Path | None, allow_unsigned: bool,
            trust_certificate_chain: tuple[Path, ...], force: bool,
            lock_timeout: float | None, offline: bool, dry_run: bool, json_out: bool) -> None:
    """Plan, fetch, verify, convert and smoke-test SOURCE, skipping what is already done."""
    app = get_app(json_out, "run")
    from provision.cli.commands.plan import render_plan
    from provision.formats.sources import parse_peer
    from provision.pipeline import RunOptions, run_pipeline
    from provision.stages.fetch import HubOptions, TorrentOptions

    for p in peers:
        parse_peer(p)
    opts = RunOptions(
        source=source_kind, target=target, scheme=scheme, layout=layout, context=context, device=device,
        adopt=adopt, discover_hf_cache=not no_hf_cache, drop_original=drop_original, reverify=reverify,
        skip_smoke=skip_smoke, smoke_engine=smoke_engine, skip_convert=skip_convert, lock_timeout=lock_timeout, keep_pickle=keep_pickle,
        convert_workers=workers, profile_from=profile_from, trust_key=trust_key, allow_unsigned=allow_unsigned,
        trust_certificate_chain=tuple(trust_certificate_chain), replace_local_profile=force,
        torrent=TorrentOptions(peers=peers, trackers=trackers, network=network, listen=listen, seed_for=seed_for,
                               max_upload_rate=parse_rate(max_upload_rate),
                               max_download_rate=parse_rate(max_download_rate), stall_timeout=stall_timeout,
                               metadata_timeout=stall_timeout),
        hub=HubOptions(token=token, stall_timeout=stall_timeout),
    )

    def on_stage(rec: dict[str, Any]) -> None:
        app.terminal.info(f"stage {rec['stage']}: {rec['result']} ({rec['seconds']:.2f} s)")

    result = run_pipeline(source, settings=app.settings, home=home, options=opts, offline=offline,
                          dry_run=dry_run, progress=app.terminal.progress, on_stage=on_stage)
    if result.plan.manifest is not None:
        app.manifest_sha256 = result.plan.manifest.sha256
    if dry_run:
        render_plan(app, result.plan)
    else:
        render_summary(app, result.stages)
        if result.profile_dir is not None:
            app.terminal.success(f"{result.plan.name}: {result.profile} ready in {result.profile_dir}")
        if result.vllm_command:  # one unbroken line; under --json the report carries vllm_command
            app.terminal.out(f"serve it with: {result.vllm_command}", commentary=app.json)
    app.finish(result.to_dict())
