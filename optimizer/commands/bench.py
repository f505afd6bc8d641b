"""`optimize bench`: median and p90 latency, peak RSS and ratios, side by side, for every MODEL on every --runtime."""

from __future__ import annotations

from pathlib import Path

import click

from optimizer.commands.common import (
    NON_NEGATIVE,
    POSITIVE,
    check_paths,
    collect_runtime_options,
    debug_option,
    runtime_flags,
    write_report,
)
from optimizer.errors import RuntimeFailure


@click.command("bench")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--runtime", "runtime_names", multiple=True, default=("ort",), show_default=True, help="repeatable")
@click.option("--input", "input_path", type=click.Path(dir_okay=False), help=".npz of real inputs")
@click.option("--eval", "eval_path", type=click.Path(dir_okay=False), help=".npz with labels (runtimes that evaluate)")
@click.option("--batch", type=POSITIVE, default=1, show_default=True, help="batch size of random inputs")
@click.option("--threads", type=POSITIVE, default=1, show_default=True, help="threads for every runtime")
@click.option("--runs", type=POSITIVE, default=20, show_default=True, help="timed runs per row")
@click.option("--warmup", type=NON_NEGATIVE, default=3, show_default=True, help="untimed runs per row")
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True, help="seed of random inputs")
@click.option("--report", type=click.Path(dir_okay=False), help="write results as JSON")
@runtime_flags
@debug_option
def command(models, runtime_names, input_path, eval_path, batch, threads, runs, warmup, seed, report,
              tvm_opts, reram_opts, reram_config, debug):
    """Median and p90 latency, per-row RSS growth and ratios, side by side, for every MODEL on every --runtime.

    A runtime that fails on a model leaves its row with the reason; the other rows are still timed (exit 1)."""
    from optimizer.bench import bench
    from optimizer.console import print_bench
    from optimizer.data import load_npz
    from optimizer.model import load_model

    check_paths(models=[("an input model", m) for m in models],
                reads=[("--input", input_path), ("--eval", eval_path), ("--reram-config", reram_config)],
                writes=[("--report", report)])
    names = [Path(m).name for m in models]
    labels = names if len(set(names)) == len(names) else list(models)
    protos = [(label, load_model(m)) for label, m in zip(labels, models, strict=True)]
    inputs = load_npz(input_path) if input_path else None
    evaluation = load_npz(eval_path, protos[0][1]) if eval_path else None
    options = collect_runtime_options(list(runtime_names), tvm_opts, reram_opts, reram_config)
    results = bench(protos, list(runtime_names), inputs=inputs, batch=batch, threads=threads, runs=runs,
                    warmup=warmup, seed=seed, runtime_options=options, evaluation=evaluation,
                    progress=lambda text: click.echo(f"bench: {text}", err=True))
    write_report(report, results)
    print_bench(results)
    failed = [r for r in results["results"] if "error" in r]
    if failed:
        raise RuntimeFailure(f"{len(failed)} of {len(results['results'])} bench rows failed "
                             f"(first: {failed[0]['model']} on {failed[0]['runtime']}: {failed[0]['error']})")
