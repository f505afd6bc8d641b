"""`optimize sweep SPEC.yaml`: run a sweep with a progress bar, print the ranked table, write the JSON and PNG."""

from __future__ import annotations

from pathlib import Path

import click

from optimizer.commands.common import check_paths, debug_option


@click.command("sweep")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--workers", type=int, default=1, show_default=True,
              help="points at a time: 1 runs here without Ray, N starts a local Ray with N CPUs")
@click.option("--address", help="join a running Ray cluster (e.g. 10.0.0.5:6379) instead of starting one")
@click.option("--report", type=click.Path(dir_okay=False), help="write every point's result as JSON")
@click.option("--plot", type=click.Path(dir_okay=False), help="write the Pareto front as PNG")
@debug_option
def command(spec, workers, address, report, plot, debug):
    """Run the pipeline over the product of SPEC's axes (YAML): a table by objective, a Pareto front.

    Exit code 1 when a point failed (the others still run and are reported), 130 after Ctrl-C (the finished
    points are written).
    """
    code = sweep_command(spec, workers=workers, address=address, report=report, plot=plot)
    if code:
        raise click.exceptions.Exit(code)


def sweep_command(spec_path: str, *, workers: int, address: str | None, report: str | None,
                  plot: str | None) -> int:
    """Returns the exit code: 0 when every point ran, 1 when a point failed, 130 when interrupted (Ctrl-C).
    Finished points are written to --report (and --plot) in every case."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from optimizer.io_json import write_json
    from optimizer.sweep import load_spec, run
    from optimizer.sweep.results import check_plot_path, print_table, write_plot

    spec = load_spec(spec_path)
    check_paths(models=[("the spec's model", str(spec.model))] if spec.model else [],
                reads=[("SPEC", spec_path), ("the spec's calibration", spec.calibration),
                       ("the spec's eval", spec.eval)],
                writes=[("--report", report), ("--plot", plot)])
    if plot:
        check_plot_path(plot)
    failures: list[str] = []
    progress = Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.description}"), console=Console(stderr=True), transient=False)

    def on_result(index: int, point: dict, finished: int, total: int) -> None:
        if not point["ok"]:
            failures.append(f"point {index} {point['params']}: {point['error']}")
        progress.update(bar, completed=finished, description=f"{len(failures)} failed" if failures else "")

    with progress:
        bar = progress.add_task("", total=len(spec.points))
        result = run(spec, workers=workers, address=address, on_result=on_result)
    result = {"spec": str(spec_path), **result}
    if report:
        write_json(report, result)
    print_table(result)
    if plot and result.get("pareto"):
        write_plot(result, plot, title=f"{Path(spec_path).name}: Pareto front")
    for line in failures:
        click.echo(f"failed: {line}", err=True)
    written = [p for p in (report, plot if result.get("pareto") else None) if p]
    if plot and not result.get("pareto"):
        click.echo(f"note: no plot written: no finished point has both {result.get('objective')} "
                   "and a cost metric", err=True)
    if written:
        click.echo("wrote " + " and ".join(written))
    if result["interrupted"]:
        click.echo(f"interrupted: {result['finished']} of {result['total']} points finished", err=True)
        return 130
    return 1 if failures else 0
