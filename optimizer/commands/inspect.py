"""`optimize inspect`: per-layer op, weight shape, params, MACs, sparsity and all-zero output channels."""

from __future__ import annotations

import click

from optimizer.commands.common import POSITIVE, check_paths, debug_option, echo_notes, write_report


@click.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--calibration", type=click.Path(dir_okay=False), help="measure activation statistics on these inputs")
@click.option("--batch", type=POSITIVE, default=1, show_default=True, help="batch size used to count MACs")
@click.option("--report", type=click.Path(dir_okay=False), help="write the facts as JSON")
@debug_option
def command(model, calibration, batch, report, debug):
    """Per-layer op, weight shape, params, MACs, sparsity and all-zero output channels."""
    from optimizer.console import print_inspect
    from optimizer.data import load_npz
    from optimizer.model import load_model
    from optimizer.report import layer_rows, model_stats

    check_paths(models=[("the input model", model)], reads=[("--calibration", calibration)],
                writes=[("--report", report)])
    proto = load_model(model, notes=(notes := []))
    echo_notes(notes)
    feeds = {k: v for k, v in load_npz(calibration, proto).items() if k != "labels"} if calibration else {}
    shapes = {name: array.shape for name, array in feeds.items()}
    facts = {"model": str(model), "stats": model_stats(proto, batch, input_shapes=shapes),
             "layers": layer_rows(proto, batch, input_shapes=shapes)}
    if calibration:
        from optimizer.activation_stats import activation_stats

        facts["activations"] = activation_stats(proto, feeds)
    write_report(report, facts)
    print_inspect(facts)
