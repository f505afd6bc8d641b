"""What several `optimize` subcommands share: the --debug flag, output checks, JSON reports, runtime options."""

from __future__ import annotations

import click

from optimizer.errors import UsageError

POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)


def check_paths(models=(), reads=(), writes=()) -> None:
    """The output-path safety rule (optimizer.paths), before any work: (label, path) pairs, None paths skipped.

        check_paths(models=[("the input model", "m.onnx")], writes=[("--report", "m.onnx")])   # UsageError
    """
    from optimizer.paths import OutputPlan

    plan = OutputPlan()
    for label, path in models:
        plan.read_model(path, label)
    for label, path in reads:
        plan.read(label, path)
    for label, path in writes:
        plan.write(label, path)
    plan.check()


def debug_option(f):
    return click.option("--debug", is_flag=True, help="show the full traceback on errors")(f)


def sweep_options(f):
    """--workers/--address for the commands whose trials run as sweep points (optimizer.sweep.engine)."""
    f = click.option("--address", help="run the points on a running Ray cluster (see `optimize sweep`)")(f)
    return click.option("--workers", type=int, default=1, show_default=True,
                        help="points at a time: 1 runs here, N on a local Ray (the [dist] extra)")(f)


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
            values = parse_pass_spec(f"{name}:{text}")[1]
            repeated = sorted(set(values) & set(options.get(name, {})))
            if repeated:
                raise UsageError(f"--{name}: option {repeated[0]!r} is given twice; give each option once")
            options.setdefault(name, {}).update(values)
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
