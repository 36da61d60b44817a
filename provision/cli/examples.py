"""The examples that end every command's ``--help``, and the hook that attaches them.

``decorate(cmd, name)`` gives a command (and a group's subcommands) its examples as click's epilog
and the global options (``cli.options.add_global_options``); ``cli.main.LazyGroup`` calls it on
every command it loads. The examples are kept here, one entry per command path, so a test can check
that none is missing; they name only options the commands have. Nothing here runs a command.
"""

from __future__ import annotations

import click

from provision.cli.options import add_global_options

EXAMPLES: dict[str, tuple[str, ...]] = {
    "run": ("provision run pixtral-12b-2409 --target l40s",
            "provision run ./tiny/manifest.toml --network closed --peer 127.0.0.1:6881 --json > report.json"),
    "plan": ("provision plan pixtral-12b-2409 --target rtx4090 --offline",
             "provision plan hf://mistralai/Pixtral-12B-2409 --json"),
    "fetch": ("provision fetch pixtral-12b-2409 --dest ./pixtral",
              "provision fetch 'magnet:?xt=urn:btih:...' --network closed --peer 10.0.0.5:6881"),
    "verify": ("provision verify ./pixtral --manifest pixtral-12b-2409",
               "provision verify ./pixtral --json | jq .verify.files"),
    "sign": ("provision sign ./pixtral-fp8 --key publisher.pem --signature pixtral-fp8.sig",
             "provision sign ./pixtral --key publisher.pem --signature pixtral.sig --json"),
    "convert": ("provision convert ./pixtral --out ./pixtral-fp8 --target h100 --scheme fp8",
                "provision convert ./pixtral --out ./pixtral-w4 --target a10g --scheme w4a16"),
    "smoke": ("provision smoke ./pixtral-fp8",
              "provision smoke ./tiny --device cpu --json"),
    "seed": ("provision seed ./pixtral --manifest pixtral-12b-2409 --torrent-out pixtral.torrent",
             "provision seed ./tiny --network closed --listen 127.0.0.1:6881 --seed-for 600"),
    "manifest lock": ("provision manifest lock ./pixtral --manifest ./pixtral.toml",),
    "manifest show": ("provision manifest show pixtral-12b-2409",
                      "provision manifest show ./tiny/manifest.toml --json"),
    "manifest": ("provision manifest show pixtral-12b-2409",
                 "provision manifest lock ./pixtral --manifest ./pixtral.toml"),
    "bundle export": ("provision bundle export pixtral-12b-2409 /media/usb/pixtral --profile fp8-hf",
                      "provision bundle export pixtral-12b-2409 /media/usb/pixtral.tar --archive --json"),
    "bundle import": ("provision bundle import /media/usb/pixtral",
                      "provision bundle import /media/usb/pixtral.tar --json"),
    "bundle": ("provision bundle export pixtral-12b-2409 /media/usb/pixtral --profile fp8-hf",
               "provision bundle import /media/usb/pixtral"),
    "tiny": ("provision tiny ./tiny",
             "provision tiny ./tiny-7b --kind mistral-7b --pickle"),
    "ls": ("provision ls",
           "provision ls --json | jq '.models[].name'"),
    "rm": ("provision rm pixtral-12b-2409 --profile fp8-hf --yes",),
    "gc": ("provision gc --dry-run", "provision gc --json"),
    "import-pickle": ("provision import-pickle ./mistral-7b/consolidated.00.pth --out ./mistral-7b-st "
                      "--manifest mistral-7b-v0.1",),
    "doctor": ("provision doctor", "provision doctor --network closed --json"),
    "schema": ("provision schema run > run-report.schema.json", "provision schema --list"),
}

GROUP_EPILOG = ("\b\nExamples:\n  provision run pixtral-12b-2409\n  provision ls 2>/dev/null\n"
                "  provision doctor --json")


def epilog(path: str) -> str | None:
    """The ``Examples:`` block for command ``path`` (``"manifest show"``), or None when it has none."""
    lines = EXAMPLES.get(path)
    if not lines:
        return None
    return "\b\nExamples:\n" + "\n".join(f"  {ln}" for ln in lines)


def decorate(cmd: click.Command, path: str) -> click.Command:
    """Attach ``path``'s examples (and its subcommands') and the global options to ``cmd``."""
    if not cmd.epilog:
        cmd.epilog = epilog(path)
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            decorate(sub, f"{path} {name}")
    return add_global_options(cmd)


__all__ = ["EXAMPLES", "GROUP_EPILOG", "decorate", "epilog"]
