"""`optimize`: the command-line entry point.

It parses options, calls the library, prints tables and maps errors to exit codes. Each subcommand is one module
of optimizer/commands/, imported only when that command runs (click's lazy-group pattern), so `optimize --help`
and `import optimizer.cli` stay light.

Exit codes: 0 ok; 1 failure (a pass, verification, a runtime or a write failed); 2 usage error or bad input
(optimizer/errors.py).
Without --debug a failure is one line on stderr; with --debug the traceback follows.
"""

from __future__ import annotations

import importlib
import sys
import traceback

import click

from optimizer.errors import SculptError

# command name -> module under optimizer.commands (each defines `command`)
COMMANDS = {
    "apply": "apply",
    "passes": "passes",
    "inspect": "inspect",
    "run": "run",
    "morph": "morph",
    "bench": "bench",
    "reram-sweep": "reram_sweep",
    "sensitivity": "sensitivity",
    "sweep": "sweep",
    "tune": "tune",
    "compare": "compare",
}
HIDDEN = {"apply"}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use. `optimize MODEL --pass ...` runs `apply`."""

    def list_commands(self, ctx):
        return [name for name in COMMANDS if name not in HIDDEN]

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        command = importlib.import_module(f"optimizer.commands.{COMMANDS[name]}").command
        command.hidden = name in HIDDEN
        return command

    def parse_args(self, ctx, args):
        if args and args[0] not in COMMANDS and args[0] not in ("--help", "-h", "--version"):
            args = ["apply", *args]
        return super().parse_args(ctx, args)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sculpt", message="sculpt %(version)s")
def cli():
    """Sculpt: ONNX-in / ONNX-out model optimization.

    \b
    optimize MODEL --pass NAME[:key=value,...] [--pass ...] -o OUT    run passes, verified after each one
    optimize passes                                                   list passes and their options
    optimize inspect | run | bench | compare | sensitivity | sweep | tune | reram-sweep   see `optimize COMMAND --help`
    """


def printable(text: str) -> str:
    """One line whatever a model's names hold: control characters (newlines, record separators) become escapes.

        >>> printable("input 'b\\x1e'")
        "input 'b\\\\x1e'"
    """
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        code = cli.main(args=args, prog_name="optimize", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort as e:
        if isinstance(e.__context__, KeyboardInterrupt):
            click.echo("interrupted", err=True)
            return 130
        cause = e.__context__
        detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        click.echo(f"error: input ended unexpectedly{detail}", err=True)
        return 1
    except click.ClickException as e:  # one line, like every other error; `--help` shows the usage
        command = f"optimize {e.ctx.command_path.split(' ', 1)[1]}: " if getattr(e, "ctx", None) and " " in (
            e.ctx.command_path or "") else ""
        click.echo(f"error: {command.replace('optimize apply: ', '')}{e.format_message()}", err=True)
        return e.exit_code
    except SculptError as e:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {printable(str(e))}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as e:  # a bug: still one line unless --debug
        if debug:
            traceback.print_exc()
        click.echo(f"error: internal error: {type(e).__name__}: {printable(str(e))} (run with --debug for the "
                   "traceback)", err=True)
        return 1
    return code if isinstance(code, int) else 0  # click returns a command's Exit code instead of raising it


if __name__ == "__main__":
    sys.exit(main())
