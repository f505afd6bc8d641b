"""What several `optimize` subcommands share: the --debug flag, output checks, JSON reports, runtime options."""

from __future__ import annotations

from pathlib import Path

import click

from optimizer.errors import UsageError


def debug_option(f):
    return click.option("--debug", is_flag=True, help="show the full traceback on errors")(f)


def require_directory(path: str, what: str) -> None:
    """Fail before any work when the file at `path` could not be written: its directory is missing."""
    if not Path(path).parent.is_dir():
        raise UsageError(f"{path}: {what} directory {Path(path).parent} does not exist")


def echo_notes(notes: list[str]) -> None:
    """Load-time normalisation notes (optimizer.normalize), one `note:` line each on stderr."""
    for note in notes:
        click.echo(f"note: {note}", err=True)


def write_report(path: str | None, payload: dict) -> None:
    """Write `payload` as JSON to `path` (atomically) when a path was given."""
    if path:
        from optimizer.io_json import write_json

        write_json(path, payload)


def runtime_options(runtime_names, option_strings: dict[str, tuple[str, ...]]) -> dict[str, dict]:
    from optimizer.pipeline import parse_pass_spec

    options: dict[str, dict] = {}
    for name, strings in option_strings.items():
        for text in strings:
            options.setdefault(name, {}).update(parse_pass_spec(f"{name}:{text}")[1])
        if strings and name not in runtime_names:
            raise UsageError(f"--{name} options given but --runtime {name} is not selected")
    return options


def runtime_flags(f):
    f = click.option("--reram-config", type=click.Path(dir_okay=False), help="YAML file of reram options")(f)
    f = click.option("--reram", "reram_opts", multiple=True, metavar="k=v,...", help="reram runtime options")(f)
    f = click.option("--tvm", "tvm_opts", multiple=True, metavar="k=v,...", help="tvm runtime options")(f)
    return f


def collect_runtime_options(runtime_names, tvm_opts, reram_opts, reram_config) -> dict[str, dict]:
    options = runtime_options(runtime_names, {"tvm": tvm_opts, "reram": reram_opts})
    if reram_config:
        if "reram" not in runtime_names:
            raise UsageError("--reram-config given but --runtime reram is not selected")
        options.setdefault("reram", {})["config"] = reram_config
    return options
