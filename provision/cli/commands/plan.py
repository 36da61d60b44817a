"""`provision plan SOURCE`: show what would be fetched, where, and whether it fits."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from provision.cli.app import App, get_app
from provision.cli.options import home_option, json_option, network_option, profile_options

if TYPE_CHECKING:
    from provision.stages.plan import Plan


def render_plan(app: App, plan: Plan) -> None:
    from rich.table import Table

    from provision.units import human_bytes

    t = app.terminal
    app.result(f"Plan for {plan.name} ({plan.kind})")
    for i, s in enumerate(plan.sources, 1):
        app.result(f"  source {i}: {s}")
    app.result(f"  destination: {plan.dest}")
    if plan.files:
        table = Table(show_header=True, header_style="bold")
        table.add_column("file")
        table.add_column("size", justify="right")
        table.add_column("sha256")
        table.add_column("sources")
        table.add_column("status")
        for f in plan.files:
            table.add_row(f.path, f"{f.size:,d}" if f.size is not None else "unknown",
                          (f.sha256[:16] + "…") if f.sha256 else "unknown", ",".join(f.sources),
                          f.status + (" (optional)" if f.optional else ""))
        app.result(table)
    else:
        app.result("  files: unknown until the metadata is fetched")
    unk = " + unknown" if plan.unknown_sizes else ""
    app.result(f"  to fetch: {human_bytes(plan.bytes_to_fetch)}{unk}; free: {human_bytes(plan.free_bytes)}"
               f" -> {'fits' if plan.disk_ok else 'DOES NOT FIT'}")
    app.result(f"  hardware: {plan.hardware.describe()}")
    for n in plan.notes:
        t.info(f"  note: {n}")


def render_profiles(app: App, rows: list[dict[str, Any]], chosen: str | None, target_desc: str) -> None:
    """The candidate conversion profiles for the target: memory needed, fit, and why not."""
    from rich.table import Table

    app.result(f"Conversion profiles for {target_desc}:")
    table = Table(show_header=True, header_style="bold")
    for col in ("profile", "activations", "weights", "KV cache", "needed/GPU", "available", "verdict"):
        table.add_column(col, justify="right" if col not in ("profile", "verdict", "activations") else "left")
    for r in rows:
        verdict = "ok" if r["ok"] else str(r["why_not"])
        mark = " <- chosen" if r["name"] == chosen else ""
        table.add_row(r["name"], r["activation_dtype"], f"{r['weight_bytes'] / 2**30:.2f} GiB",
                      f"{r['kv_bytes'] / 2**30:.2f} GiB", f"{r['need_bytes'] / 2**30:.2f} GiB",
                      f"{r['available_bytes'] / 2**30:.2f} GiB", verdict + mark)
    app.result(table)


def plan_profiles(plan: Plan, target: str, scheme: str, context: int, params: Path | None) -> dict[str, Any]:
    """Candidate profiles of the plan's model on ``target`` (needs a params.json: --params or fetched)."""
    from provision.errors import ProvisionError
    from provision.formats.params import ModelArgs
    from provision.hardware import parse_target
    from provision.stages.profiles import candidates, choose, gpu_needs

    src = params if params is not None else plan.dest / "params.json"
    tgt = parse_target(target, hardware=plan.hardware)
    carried = params is None and not src.is_file() and plan.manifest is not None and plan.manifest.params is not None
    if not src.is_file() and not carried:
        return {"target": tgt.to_dict(), "params": None, "candidates": [], "chosen": None,
                "note": "profiles need params.json: fetch the model or pass --params FILE"}
    if carried:  # the manifest carries the release's params.json: size the profiles offline
        assert plan.manifest is not None and plan.manifest.params is not None
        args = ModelArgs.from_dict(plan.manifest.params)
        src = Path(f"{plan.manifest.path or plan.manifest.name} [params]")
    else:
        args = ModelArgs.from_file(src)
    rows = [p.to_dict() for p in candidates(args, tgt, context=context)]
    chosen: str | None = None
    error: dict[str, Any] | None = None
    try:
        chosen = choose(args, tgt, scheme, context=context).name
    except ProvisionError as e:
        error = e.to_dict()
    needs = gpu_needs(args, tgt, context=context) if not tgt.is_cpu else []
    return {"target": tgt.to_dict(), "target_description": tgt.describe(), "params": str(src), "context": context,
            "scheme": scheme, "candidates": rows, "chosen": chosen, "error": error, "gpus_needed": needs,
            "host_can_hold": any(r["fits_host"] for r in needs) if needs else chosen is not None}


def render_gpu_needs(app: App, name: str, prof: dict[str, Any]) -> None:
    """How many GPUs of the target's card each scheme needs, and plainly whether this host can hold it."""
    t = app.terminal
    tgt = prof["target"]
    have = int(tgt["count"])
    app.result(f"GPUs needed per scheme ({tgt['name']}, {prof['context']}-token context; this host: {have}):")
    for r in prof["gpus_needed"]:
        label = f"{r['scheme']}-{r['layout']}"
        if not r["runnable"] and r["gpus_needed"] is not None:
            n = r["gpus_needed"]
            app.result(f"  {label:14s} {n} GPU{'s' if n > 1 else ''} by memory, but not available: {r['how']}")
        elif not r["runnable"]:
            app.result(f"  {label:14s} cannot run here: {r['how']}")
        elif r["gpus_needed"] is None:
            app.result(f"  {label:14s} more than 8 GPUs")
        else:
            n = r["gpus_needed"]
            verdict = "fits this host" if r["fits_host"] else f"this host has {have}"
            app.result(f"  {label:14s} {n} GPU{'s' if n > 1 else ''} ({verdict})")
    if not prof["host_can_hold"]:
        ok = [r for r in prof["gpus_needed"] if r["runnable"] and r["gpus_needed"] is not None]
        fewest = min(ok, key=lambda r: r["gpus_needed"]) if ok else None
        more = (f"; the fewest that can: {fewest['gpus_needed']} x {tgt['name']} with {fewest['scheme']}"
                if fewest else "; not even 8 of them can")
        t.warn(f"{have} x {tgt['name']} cannot hold {name} under any scheme{more}.")


@click.command("plan")
@click.argument("source")
@home_option
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), help="Where the original files go.")
@click.option("--include", multiple=True, help="Only files matching this glob (repeatable).")
@click.option("--offline", is_flag=True, help="Never touch the network; show what is unknown instead.")
@network_option
@profile_options
@click.option("--params", "params_file", type=click.Path(dir_okay=False, path_type=Path),
              help="params.json to size the conversion profiles with (default: the fetched one).")
@json_option
def command(source: str, home: Path | None, dest: Path | None, include: tuple[str, ...], offline: bool,
            network: str, target: str, scheme: str, context: int, params_file: Path | None, json_out: bool) -> None:
    """Show what SOURCE would fetch, its sizes, sources, what is present, hardware and disk."""
    app = get_app(json_out, "plan")
    from provision.stages.plan import make_plan

    # --network: the BitTorrent mode a bare magnet's file list is asked for in (closed: only its x.pe peers)
    plan = make_plan(source, settings=app.settings, home=home, dest=dest, offline=offline, include=include,
                     network=network)
    if plan.manifest is not None:
        app.manifest_sha256 = plan.manifest.sha256
    render_plan(app, plan)
    prof = plan_profiles(plan, target, scheme, context, params_file)
    if prof["candidates"]:
        render_profiles(app, prof["candidates"], prof["chosen"], prof["target_description"])
        if prof["gpus_needed"]:
            render_gpu_needs(app, plan.name, prof)
        if prof["error"]:
            app.terminal.warn(prof["error"]["message"])
    else:
        app.result(f"  profiles: {prof['note']}")
    app.finish({"plan": plan.to_dict(), "profiles": prof})
