"""`optimize reram-sweep`: accuracy and ADC saturation of MODEL on the reram emulator against ADC resolution."""

from __future__ import annotations

from pathlib import Path

import click

from optimizer.commands.common import check_paths, collect_runtime_options, debug_option, sweep_options, write_report


@click.command("reram-sweep")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--eval", "eval_path", required=True, type=click.Path(dir_okay=False), help=".npz with 'labels'")
@click.option("--adc-bits", default="1-9", show_default=True, help="ADC resolutions: a range (1-9) or a list (2,4,8)")
@click.option("--adc-bits-per-slice", "per_slice", multiple=True, metavar="MSB,...,LSB",
              help="also one point with these bits per weight slice, most significant first (e.g. 1,3,3,3); repeatable")
@click.option("--plot", type=click.Path(dir_okay=False), help="write accuracy and saturation against ADC bits (PNG)")
@click.option("--calibration", type=click.Path(dir_okay=False), help=".npz for float models' activation ranges")
@click.option("--report", type=click.Path(dir_okay=False), help="write the sweep as JSON")
@click.option("--reram", "reram_opts", multiple=True, metavar="k=v,...", help="reram runtime options")
@click.option("--reram-config", type=click.Path(dir_okay=False), help="YAML file of reram options")
@sweep_options
@debug_option
def command(model, eval_path, adc_bits, per_slice, plot, calibration, report, reram_opts, reram_config, workers,
            address, debug):
    """Accuracy and ADC saturation of MODEL on the reram emulator against ADC resolution."""
    from optimizer.data import load_npz
    from optimizer.model import load_model
    from runtimes.reram.sweep import check_plot_path, parse_bits, parse_slice_bits, sweep, table_lines, write_plot

    bits = parse_bits(adc_bits)
    check_paths(models=[("the input model", model)],
                reads=[("--eval", eval_path), ("--calibration", calibration), ("--reram-config", reram_config)],
                writes=[("--plot", plot), ("--report", report)])
    slice_plans = [parse_slice_bits(text) for text in per_slice]
    if plot:
        check_plot_path(plot)
    proto = load_model(model)
    evaluation = load_npz(eval_path, proto)
    options = collect_runtime_options(["reram"], (), reram_opts, reram_config).get("reram", {})
    if calibration:
        options["calibration"] = load_npz(calibration, proto)
    result = sweep(proto, evaluation, adc_bits=bits, options=options, per_slice=slice_plans,
                   progress=lambda text: click.echo(f"reram-sweep: {text}…", err=True), workers=workers,
                   address=address)
    for line in table_lines(result):
        click.echo(line)
    if plot:
        write_plot(result, plot, title=f"{Path(model).name} on the ReRAM emulator")
        click.echo(f"wrote {plot}")
    write_report(report, {"model": str(model), "reram_sweep": result})
