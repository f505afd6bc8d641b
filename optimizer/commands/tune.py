"""`optimize tune`: tune the ops without a hand kernel for the tvm runtime."""

from __future__ import annotations

import click

from optimizer.commands.common import NON_NEGATIVE, POSITIVE, check_paths, debug_option, runtime_options, write_report


@click.command("tune")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--trials", type=POSITIVE, required=True, help="measured candidates in total (MetaSchedule)")
@click.option("--batch", type=POSITIVE, default=None, help="batch to tune for (needed when the model's batch is open)")
@click.option("--tvm", "tvm_opts", multiple=True, metavar="k=v,...", help="tvm options (sparse, block, cache_dir)")
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True)
@click.option("--report", type=click.Path(dir_okay=False), help="write the result as JSON")
@debug_option
def command(model, trials, batch, tvm_opts, seed, report, debug):
    """Tune the ops without a hand kernel for the tvm runtime; later `--runtime tvm` loads apply the records."""
    from optimizer.model import load_model
    from runtimes.tvm.options import parse_options
    from runtimes.tvm.tune import tune

    check_paths(models=[("the input model", model)], writes=[("--report", report)])
    values = runtime_options(["tvm"], {"tvm": tvm_opts}).get("tvm", {})
    options = parse_options({**values, **({"batch": batch} if batch is not None else {})})
    result = tune(load_model(model), trials=trials, options=options, seed=seed)
    write_report(report, {"model": str(model), "tune": result})
    click.echo(f"tuned {len(result['tasks'])} ops with {result['trials']} trials in {result['seconds']} s; "
               f"records: {result['work_dir']}")
