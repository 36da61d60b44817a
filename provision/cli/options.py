"""The click options several commands share, written once, and the choices they offer.

Each decorator adds one option (or one group of options) with the same name, default, help and
environment variable in every command that carries it. The choices come from the library, never
from a list typed here: schemes and layouts from ``provision.stages.profiles``, target names from
``provision.hardware.CARDS``, sources from ``provision.stages.fetch``, network modes from
``provision.settings``. The global options (``--json``, ``--quiet``, ``--verbose``, ``--log-file``,
``--home``) are declared here too: ``add_global_options`` gives them to every command, and their
callbacks set the invocation's ``App`` (so they work before or after the subcommand). This module
parses and checks option values (``parse_rate``, ``--target``) but does no work and reads no files.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from provision.hardware import card_summary
from provision.settings import NETWORK_MODES
from provision.stages.fetch import SOURCE_CHOICES
from provision.stages.profiles import DEFAULT_CONTEXT, LAYOUTS, SCHEMES

F = TypeVar("F", bound=Callable[..., Any])

SCHEME_CHOICES: tuple[str, ...] = ("auto", *SCHEMES)

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


def _stack(f: F, opts: list[Callable[[F], F]]) -> F:
    for o in reversed(opts):
        f = o(f)
    return f


JSON_HELP = "Print one JSON report on stdout (nothing else goes there), also on failure."
HOME_HELP = "Model store (default: $PROVISION_HOME, else ~/.cache/provision)."
QUIET_HELP = "Silence stderr (progress, notes, warnings) except the error line; results still go to stdout."
VERBOSE_HELP = "Print debug lines too."
LOG_FILE_HELP = "Append every message, result and debug line to this file."


def _app_configure(**kw: Any) -> None:
    from provision.cli.app import get_app

    get_app().configure(**kw)


def _on_json(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        from provision.cli.app import get_app

        get_app(json_flag=True)
    return value


def _on_home(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    if value is not None:
        _app_configure(home=value)
    return value


def _on_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        _app_configure(quiet=True)
    return value


def _on_verbose(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        _app_configure(verbose=True)
    return value


def _on_log_file(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    if value is not None:
        _app_configure(log_file=value)
    return value


def json_option(f: F) -> F:
    """The ``--json`` flag every command carries (also accepted before the subcommand)."""
    return click.option("--json", "json_out", is_flag=True, callback=_on_json, help=JSON_HELP)(f)


def home_option(f: F) -> F:
    """``--home``: the model store; without it commands use ``Settings.home`` (``PROVISION_HOME``)."""
    return click.option("--home", type=click.Path(file_okay=False, path_type=Path), callback=_on_home,
                        help=HOME_HELP)(f)


def global_params() -> list[click.Option]:
    """The global options as a subcommand carries them (values go to the ``App``, not the function):
    ``--json``, ``--quiet``, ``--verbose``, ``--log-file`` and ``--home``."""
    path = click.Path(dir_okay=False, path_type=Path)
    return [
        click.Option(["--json", "json_out"], is_flag=True, expose_value=False, callback=_on_json, help=JSON_HELP),
        click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, callback=_on_quiet, help=QUIET_HELP),
        click.Option(["-v", "--verbose"], is_flag=True, expose_value=False, callback=_on_verbose,
                     help=VERBOSE_HELP),
        click.Option(["--log-file"], type=path, expose_value=False, callback=_on_log_file, help=LOG_FILE_HELP),
        click.Option(["--home"], type=click.Path(file_okay=False, path_type=Path), expose_value=False,
                     callback=_on_home, help=HOME_HELP),
    ]


def add_global_options(cmd: click.Command) -> click.Command:
    """Give ``cmd`` (and a group's subcommands) every global option it does not declare itself, so
    ``provision run X --quiet`` means what ``provision --quiet run X`` does. Idempotent."""
    if isinstance(cmd, click.Group):  # its subcommands, and the group itself (`provision manifest -q show M`)
        for sub in cmd.commands.values():
            add_global_options(sub)
    have = {p.name for p in cmd.params} | {o for p in cmd.params for o in getattr(p, "opts", ())}
    for p in global_params():
        if p.name not in have and not set(p.opts) & have:
            cmd.params.append(p)
    return cmd


def source_option(f: F) -> F:
    """``--source``: which of the manifest's sources a fetch uses."""
    return click.option("--source", "source_kind", type=click.Choice(SOURCE_CHOICES), default="auto",
                        show_default=True, help="Which of the manifest's sources to use; auto tries a local one first, then the "
                             "rest in order.")(f)


def network_option(f: F) -> F:
    """``--network``: the BitTorrent network mode (``PROVISION_NETWORK``)."""
    return click.option("--network", type=click.Choice(NETWORK_MODES), envvar="PROVISION_NETWORK",
                        show_envvar=True, default="public", show_default=True,
                        help="public: DHT, trackers, PEX. closed: only the peers and trackers given, "
                             "no DHT/LSD/UPnP/NAT-PMP/uTP.")(f)


def torrent_options(f: F) -> F:
    """BitTorrent options shared by `fetch` and `run`: network, listen, trackers, seeding, upload rate."""
    return _stack(f, [
        network_option,
        click.option("--listen", metavar="HOST:PORT", help="Listen interface (closed mode default 127.0.0.1:0)."),
        click.option("--tracker", "trackers", multiple=True, metavar="URL", help="Add a tracker (repeatable)."),
        click.option("--seed-for", type=click.FloatRange(min=0), default=0, show_default=True, metavar="SECONDS",
                     help="Keep seeding this long after the download."),
        click.option("--max-upload-rate", metavar="R", help="Upload limit, e.g. 10M (bytes/s)."),
    ])


def transfer_options(f: F) -> F:
    """Options of every download (`fetch`, `run`): peers, BitTorrent, download rate, stall timeout, token."""
    return _stack(f, [
        click.option("--peer", "peers", multiple=True, metavar="HOST:PORT",
                     help="Connect to this peer (repeatable)."),
        torrent_options,
        click.option("--max-download-rate", metavar="R", help="Download limit, e.g. 50M (bytes/s)."),
        click.option("--stall-timeout", type=click.FloatRange(min=1), default=120, show_default=True,
                     help="Seconds without progress before a source counts as stalled."),
        click.option("--token", envvar="HF_TOKEN", show_envvar=True,
                     help="Hugging Face token (default: HF_TOKEN or the saved login)."),
    ])


def _check_target(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Reject an unknown target while parsing (exit 2 before any work or output); ``auto`` and
    ``cpu`` are resolved later, against the host."""
    if value.strip().lower() not in ("auto", "cpu"):
        from provision.hardware import parse_target

        parse_target(value)  # raises UsageError naming the known targets
    return value


def target_option(f: F) -> F:
    """``--target``: the GPU a conversion is for."""
    return click.option("--target", default="auto", show_default=True, metavar="auto|cpu|NAME|sm_XY:MEMGB[xCOUNT]",
                        callback=_check_target,
                        help=f"GPU to convert for: detect it, the CPU, a card ({card_summary()}; NAMExCOUNT for "
                             "several) or a compute capability and GiB.")(f)


def scheme_option(f: F) -> F:
    """``--scheme``: the conversion scheme."""
    return click.option("--scheme", type=click.Choice(SCHEME_CHOICES), default="auto", show_default=True,
                        help="bf16/fp16 casts, fp8 (FP8_DYNAMIC), w8a16/w4a16 (weight-only int, group 128); "
                             "auto takes the best that fits.")(f)


def context_option(f: F) -> F:
    """``--context``: the context length a memory fit is computed for."""
    return click.option("--context", type=click.IntRange(min=1), default=DEFAULT_CONTEXT, show_default=True,
                        metavar="TOKENS",
                        help="Context length the KV cache must hold (batch 1) when checking the memory fit.")(f)


def profile_options(f: F) -> F:
    """``--target``, ``--scheme`` and ``--context``: what a conversion profile is chosen from."""
    return _stack(f, [target_option, scheme_option, context_option])


def layout_option(f: F) -> F:
    """``--layout``: the converted checkpoint's layout."""
    return click.option("--layout", type=click.Choice(LAYOUTS), default=None,
                        help="mistral (casts only) or hf (transformers' Llava layout, every scheme). "
                             "Default: casts keep mistral, quantized schemes write hf.")(f)
