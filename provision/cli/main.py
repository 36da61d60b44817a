"""The ``provision`` command line: a click group of thin commands, and ``main``.

Commands live one per module in ``provision/cli/commands/`` and are imported only when used,
so ``provision --help`` stays instant and imports neither torch nor libtorrent. ``main``
is the only place that maps errors to exit codes (see ``errors.py``), installs the SIGTERM
handler (raising ``Interrupted`` so stages save resume data in ``finally`` blocks) and
prints the one-line error. It does no work of its own.
"""

from __future__ import annotations

import contextlib
import os
import pkgutil
import signal
import sys
import traceback
from importlib import import_module
from pathlib import Path
from types import FrameType
from typing import Any

import click

from provision.cli.app import App, current_app, set_app
from provision.cli.console import Terminal
from provision.cli.examples import GROUP_EPILOG, decorate
from provision.cli.options import (
    HOME_HELP,
    JSON_HELP,
    LOG_FILE_HELP,
    QUIET_HELP,
    VERBOSE_HELP,
    add_global_options,
)
from provision.errors import (
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_UNEXPECTED,
    EXIT_USAGE,
    Interrupted,
    ProvisionError,
)
from provision.settings import Settings
from provision.version import __version__

COMMAND_ORDER = ["run", "plan", "fetch", "verify", "sign", "convert", "smoke", "seed", "manifest", "bundle",
                 "tiny", "ls", "rm", "gc", "doctor", "schema"]


class LazyGroup(click.Group):
    """Finds ``provision.cli.commands.<name>`` modules and imports one only when needed."""

    def _names(self) -> list[str]:
        import provision.cli.commands as pkg

        found = {m.name.replace("_", "-") for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")}
        ordered = [n for n in COMMAND_ORDER if n in found]
        return ordered + sorted(found - set(ordered))

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = self._names()
        return names + sorted(set(self.commands) - set(names))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:  # added programmatically (plugins, tests)
            return add_global_options(self.commands[cmd_name])
        if cmd_name not in self._names():
            return None
        cmd: click.Command = import_module(f"provision.cli.commands.{cmd_name.replace('-', '_')}").command
        return decorate(cmd, cmd_name)


@click.group(cls=LazyGroup, invoke_without_command=True, epilog=GROUP_EPILOG,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="provision")
@click.option("--json", "json_out", is_flag=True, help=JSON_HELP)
@click.option("-q", "--quiet", is_flag=True, envvar="PROVISION_QUIET", show_envvar=True, help=QUIET_HELP)
@click.option("-v", "--verbose", is_flag=True, envvar="PROVISION_VERBOSE", show_envvar=True, help=VERBOSE_HELP)
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), envvar="PROVISION_LOG_FILE",
              show_envvar=True, help=LOG_FILE_HELP)
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), help=HOME_HELP)
@click.pass_context
def cli(ctx: click.Context, json_out: bool, quiet: bool, verbose: bool, log_file: Path | None,
        home: Path | None) -> None:
    """Take a bare GPU host to a verified, GPU-ready, smoke-tested copy of a model.

    SOURCE is a manifest name or path, a magnet link, a .torrent file or hf://org/repo[@rev].
    Results go to stdout, progress and notes to stderr. The options above are accepted before or
    after the command. Exit codes: 0 ok, 1 unexpected, 2 usage, 3 manifest/config, 4 fetch,
    5 verification, 6 resources (disk, GPU memory, lock), 7 conversion, 8 smoke test,
    130 SIGINT, 143 SIGTERM.
    """
    settings = Settings.load()
    app = current_app()
    if app is None:
        app = App(terminal=Terminal(progress_interval=settings.progress_interval), settings=settings)
        set_app(app)
    else:
        app.settings = settings
    app.json = app.json or json_out
    app.configure(quiet=quiet, verbose=verbose, log_file=log_file or settings.log_file, home=home)
    if ctx.invoked_subcommand is None:  # bare `provision`: the help (or, with --json, the commands), and success
        if app.json:
            app.command = "provision"
            app.finish({"commands": cli.list_commands(ctx)})
        else:
            click.echo(ctx.get_help())
        ctx.exit(0)


def _on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted("Terminated by SIGTERM; progress was saved, run the same command again to resume.",
                      signum=signum)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI and exit with the documented code. After SIGINT or
    SIGTERM, once the report is out and every ``finally`` has run, the process ends at once
    (``os._exit``): the interpreter's teardown would stop helper threads that are still inside
    torch or libtorrent, which aborts the process (``terminate called without an active
    exception``, exit -6) instead of ending with 130/143."""
    code = run_cli(argv)
    if code in (EXIT_SIGINT, EXIT_SIGTERM):
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def run_cli(argv: list[str] | None = None) -> int:
    settings = Settings.load()
    args = list(sys.argv[1:] if argv is None else argv)
    app = App(terminal=Terminal(progress_interval=settings.progress_interval), settings=settings,
              json=wants_json(args), command=command_name(args))
    set_app(app)
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    code = 0
    try:
        rv: Any = cli.main(args=args, prog_name="provision", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.exceptions.Abort as e:  # click turns KeyboardInterrupt (and our Interrupted) into Abort
        cause = e.__cause__ if isinstance(e.__cause__, Interrupted) else Interrupted(
            "Interrupted by SIGINT; progress was saved, run the same command again to resume.")
        code = cause.exit_code
        _report_error(cause, code)
    except click.ClickException as e:  # usage errors: bad option, missing argument, bad value
        e.show(file=sys.stderr)
        code = EXIT_USAGE if isinstance(e, click.UsageError) else e.exit_code
        if code == 1:
            code = EXIT_USAGE
        (current_app() or app).fail_report({"kind": "usage", "exit_code": code, "message": e.format_message(), "context": {}}, code)
    except Interrupted as e:
        code = e.exit_code
        _report_error(e, code)
    except KeyboardInterrupt:
        code = EXIT_SIGINT
        _report_error(Interrupted("Interrupted by SIGINT; progress was saved, run the same command again to resume."),
                      code)
    except ProvisionError as e:
        code = e.exit_code
        _report_error(e, code)
    except BrokenPipeError:
        code = EXIT_UNEXPECTED
    except Exception as e:  # a bug
        code = EXIT_UNEXPECTED
        a = current_app() or app
        if settings.debug:
            traceback.print_exc()
        a.terminal.error(f"Unexpected {type(e).__name__}: {e}. "
                         "This is a bug in provision; run again with PROVISION_DEBUG=1 for the traceback.")
        a.fail_report({"kind": "unexpected", "exit_code": code, "message": f"{type(e).__name__}: {e}",
                       "context": {}}, code)
    finally:
        signal.signal(signal.SIGTERM, old)
        last = current_app()
        if last is not None:
            last.terminal.close()
    if code == EXIT_SIGTERM:
        sys.stderr.flush()
    return code


_VALUE_OPTIONS = frozenset({"--log-file", "--home"})  # global options that take a value


def wants_json(args: list[str]) -> bool:
    """Whether ``--json`` is among the options (before a ``--``), read before click parses anything,
    so a usage error is reported as JSON too."""
    for a in args:
        if a == "--":
            return False
        if a == "--json":
            return True
    return False


def _leading_words(args: list[str], n: int) -> list[str]:
    """The first ``n`` arguments that are neither options nor the values of global options."""
    words: list[str] = []
    skip = False
    for a in args:
        if a == "--" or len(words) == n:
            break
        if skip:
            skip = False
        elif a in _VALUE_OPTIONS:
            skip = True
        elif not a.startswith("-"):
            words.append(a)
    return words


def command_name(args: list[str]) -> str:
    """The command ``args`` name (``manifest show`` for a group's subcommand), or ``provision`` when
    they name none, for the report of a usage error found before the command runs."""
    words = _leading_words(args, 2)
    cmd = cli.get_command(click.Context(cli), words[0]) if words else None
    if cmd is None:
        return "provision"
    if isinstance(cmd, click.Group) and len(words) == 2 and words[1] in cmd.commands:
        return " ".join(words)
    return words[0]


def _report_error(e: ProvisionError | Interrupted, code: int) -> None:
    app = current_app()
    if app is None:  # pragma: no cover
        print(f"error: {e}", file=sys.stderr)
        return
    if Settings.load().debug:
        traceback.print_exception(e)
    app.terminal.error(str(e))
    app.fail_report(e.to_dict(), code)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PROVISION_ENTRY", "module")
    main()
