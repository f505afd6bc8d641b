"""`optimize sensitivity`: prune each channel group alone and list the metric drop, worst first."""

from __future__ import annotations

import click

from optimizer.commands.common import check_paths, debug_option, sweep_options, write_report


@click.command("sensitivity")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--eval", "eval_path", required=True, type=click.Path(dir_okay=False),
              help=".npz of inputs (with 'labels': top-1 drop; without: output cosine drop)")
@click.option("--ratios", default="0.25,0.5,0.75", show_default=True, help="comma-separated pruning ratios")
@click.option("--criterion", default="auto", show_default=True,
              help="auto | reconstruction | activation | l1 | l2 | bn-scale | hoyer (auto: reconstruction with "
                   "--calibration, l1 without)")
@click.option("--recover", default="auto", show_default=True,
              help="auto | lsq | mean | none: refit after each trial cut, as structured-sparse does")
@click.option("--calibration", type=click.Path(dir_okay=False), help=".npz for data-aware ranking and recovery")
@click.option("--report", type=click.Path(dir_okay=False), help="write the result as JSON")
@sweep_options
@debug_option
def command(model, eval_path, ratios, criterion, recover, calibration, report, workers, address, debug):
    """Prune each channel group alone and list the metric drop, worst first (candidates for exclude=)."""
    from optimizer.data import load_npz
    from optimizer.model import load_model
    from optimizer.sensitivity import parse_ratios, print_sensitivity, sensitivity

    parsed = parse_ratios(ratios)
    reads = [("--eval", eval_path)] + ([("--calibration", calibration)] if calibration else [])
    check_paths(models=[("the input model", model)], reads=reads, writes=[("--report", report)])
    proto = load_model(model)
    cal = load_npz(calibration, proto) if calibration else None
    result = sensitivity(proto, load_npz(eval_path, proto), ratios=parsed, criterion=criterion, recover=recover,
                         calibration=cal, progress=lambda text: click.echo(f"sensitivity: {text}…", err=True),
                         workers=workers, address=address)
    write_report(report, {"model": str(model), **result})
    print_sensitivity(result)
