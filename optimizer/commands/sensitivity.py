"""`optimize sensitivity`: prune each channel group alone and list the metric drop, worst first."""

from __future__ import annotations

import click

from optimizer.commands.common import check_paths, debug_option, write_report


@click.command("sensitivity")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--eval", "eval_path", required=True, type=click.Path(dir_okay=False),
              help=".npz of inputs (with 'labels': top-1 drop; without: output cosine drop)")
@click.option("--ratios", default="0.25,0.5,0.75", show_default=True, help="comma-separated pruning ratios")
@click.option("--criterion", default="l1", show_default=True, help="l1 | l2 | bn-scale | hoyer")
@click.option("--report", type=click.Path(dir_okay=False), help="write the result as JSON")
@debug_option
def command(model, eval_path, ratios, criterion, report, debug):
    """Prune each channel group alone and list the metric drop, worst first (candidates for exclude=)."""
    from optimizer.data import load_npz
    from optimizer.model import load_model
    from optimizer.sensitivity import parse_ratios, print_sensitivity, sensitivity

    parsed = parse_ratios(ratios)
    check_paths(models=[("the input model", model)], reads=[("--eval", eval_path)], writes=[("--report", report)])
    proto = load_model(model)
    result = sensitivity(proto, load_npz(eval_path, proto), ratios=parsed, criterion=criterion,
                         progress=lambda text: click.echo(f"sensitivity: {text}…", err=True))
    write_report(report, {"model": str(model), **result})
    print_sensitivity(result)
