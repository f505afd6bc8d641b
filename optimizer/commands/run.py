"""`optimize run`: run MODEL on a runtime and save its outputs (.npz, one array per output name)."""

from __future__ import annotations

import click

from optimizer.commands.common import (
    POSITIVE,
    check_paths,
    collect_runtime_options,
    debug_option,
    runtime_flags,
    write_report,
)


@click.command("run")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False), help=".npz of inputs")
@click.option("--output", "output_path", required=True, type=click.Path(dir_okay=False), help=".npz to write")
@click.option("--runtime", default="ort", show_default=True, help="ort | tvm | reram")
@click.option("--threads", type=POSITIVE, default=None, help="threads for the runtime")
@click.option("--report", type=click.Path(dir_okay=False), help="write the runtime's description as JSON")
@runtime_flags
@debug_option
def command(model, input_path, output_path, runtime, threads, report, tvm_opts, reram_opts, reram_config, debug):
    """Run MODEL on a runtime and save its outputs (.npz, one array per output name)."""
    import runtimes
    from optimizer.data import load_npz, split_labels
    from optimizer.model import load_model

    check_paths(models=[("the input model", model)], reads=[("--input", input_path), ("--reram-config", reram_config)],
                writes=[("--output", output_path), ("--report", report)])
    proto = load_model(model)
    data = load_npz(input_path, proto)
    feeds, labels = split_labels(data)
    options = collect_runtime_options([runtime], tvm_opts, reram_opts, reram_config)
    session = runtimes.load(runtime, proto, threads=threads, **options.get(runtime, {}))
    outputs = session.run(feeds)
    if labels is not None and hasattr(session, "evaluate"):
        session.evaluate(data)
    from optimizer.io_json import write_npz

    write_npz(output_path, outputs)
    described = session.describe()
    write_report(report, {"model": str(model), "runtime": runtime, runtime: described})
    click.echo(f"wrote {output_path}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in outputs.items()))
    from optimizer.console import print_runtime_summary

    print_runtime_summary(runtime, described)
