"""`optimize MODEL --pass ...`: run passes on MODEL and write the result to OUT."""

from __future__ import annotations

import dataclasses

import click

from optimizer.commands.common import NON_NEGATIVE, POSITIVE, check_paths, debug_option, echo_notes, write_report
from optimizer.errors import UsageError

DEFAULT_GATE_MIN = 1.1


@click.command("apply")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--pass", "pass_specs", multiple=True, metavar="NAME[:key=value,...]", help="a pass to run (repeatable)")
@click.option("--recipe", type=click.Path(dir_okay=False), help="YAML file listing passes and options")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="where to write the model (DIR/ writes DIR/<model's file name>)")
@click.option("--calibration", type=click.Path(dir_okay=False), help=".npz with one array per model input")
@click.option("--eval", "eval_path", type=click.Path(dir_okay=False), help=".npz with inputs and 'labels'")
@click.option("--tolerance", type=float, default=None, help="max relative output change for exact passes [1e-4]")
@click.option("--report", type=click.Path(dir_okay=False), help="write the report as JSON")
@click.option("--seed", type=NON_NEGATIVE, default=None, help="seed for random choices and random inputs [0]")
@click.option("--batch", type=POSITIVE, default=1, show_default=True,
              help="batch for MACs; random verification inputs use at least 32 samples")
@click.option("--plan-out", type=click.Path(dir_okay=False), help="write the structured-sparse plan as JSON")
@click.option("--gate", type=click.Choice(["ort", "tvm"]), help="measure the speedup on this runtime (fixed threads)")
@click.option("--gate-min", type=float, default=None,
              help="least speedup a pass that claims one must deliver, else exit 1 [1.1]; 0: only report")
@click.option("--gate-threads", type=POSITIVE, default=1, show_default=True, help="threads for the --gate measurement")
@click.option("--min-cosine", type=click.FloatRange(-1, 1), default=0.99, show_default=True,
              help="quality floor for approximate passes: output cosine against the previous model")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.95, show_default=True,
              help="quality floor for approximate passes: top-1 agreement with the previous model")
@click.option("--strict", is_flag=True, help="a pass below the quality floor fails the run (exit 1, nothing written)")
@click.option("--freeze-inputs", is_flag=True,
              help="treat graph inputs that have a default (initializer) as constants instead of inputs")
@debug_option
def command(model, pass_specs, recipe, output, calibration, eval_path, tolerance, report, seed, batch, plan_out,
            gate, gate_min, gate_threads, min_cosine, min_agreement, strict, freeze_inputs, debug):
    """Run passes on MODEL and write the result to OUT."""
    from optimizer.console import print_pipeline_report, progress_printer
    from optimizer.data import load_npz
    from optimizer.model import read_model, save_model
    from optimizer.paths import external_data_files, output_model_path
    from optimizer.pipeline import build_pass, load_recipe, optimize
    from optimizer.verify import QualityFloor
    from passes.base import file_options

    specs: list = []
    settings: dict = {}
    if recipe:
        specs, settings = load_recipe(recipe)
    specs.extend(pass_specs)
    if not specs:
        raise UsageError("no passes given; use --pass NAME or --recipe FILE.yaml (see `optimize passes`)")
    pass_objects = [build_pass(spec) for spec in specs]
    if plan_out:
        planners = [i for i, p in enumerate(pass_objects) if p.name == "structured-sparse"]
        if len(planners) != 1:
            raise UsageError("--plan-out needs exactly one structured-sparse pass in the pipeline")
        planner = pass_objects[planners[0]]
        pass_objects[planners[0]] = type(planner)(dataclasses.replace(planner.options, plan_out=plan_out))
    output = output_model_path(output, model)
    pass_files = [(f"{p.name}:{name}", path, kind) for p in pass_objects for name, kind, path in file_options(p)]
    check_paths(
        models=[("the input model", model)],
        reads=[("--calibration", calibration), ("--eval", eval_path), ("--recipe", recipe),
               *[(label, path) for label, path, kind in pass_files if kind == "read"]],
        writes=[("-o", output), ("the external data of -o", f"{output}.data" if external_data_files(model) else None),
                ("--report", report), *[(label, path) for label, path, kind in pass_files if kind == "write"]],
    )
    source, external = read_model(model, notes=(notes := []))
    echo_notes(notes)
    calibration_data = load_npz(calibration, source) if calibration else None
    evaluation = load_npz(eval_path, source) if eval_path else None
    if evaluation is not None and "labels" not in evaluation:
        raise UsageError(f"{eval_path}: has no 'labels' array")
    if calibration_data is None:
        click.echo("note: no --calibration data; verifying on seeded random inputs", err=True)
    result, pipeline_report = optimize(
        source,
        pass_objects,
        calibration=calibration_data,
        evaluation=evaluation,
        tolerance=tolerance if tolerance is not None else settings.get("tolerance", 1e-4),
        seed=seed if seed is not None else settings.get("seed", 0),
        batch=batch,
        gate=gate,
        gate_min=_gate_min(gate, gate_min),
        gate_threads=gate_threads,
        on_pass=progress_printer(),
        floor=QualityFloor(min_cosine=min_cosine, min_agreement=min_agreement),
        strict=strict,
        freeze_inputs=freeze_inputs,
    )
    save_model(result, output, external=external or None)
    pipeline_report["model"] = str(model)
    pipeline_report["output_model"] = str(output)
    write_report(report, pipeline_report)
    print_pipeline_report(pipeline_report)
    click.echo(f"wrote {output}" + (f" and {report}" if report else ""))


def _gate_min(gate: str | None, gate_min: float | None) -> float | None:
    if gate_min is not None and gate is None:
        raise UsageError("--gate-min needs --gate ort or --gate tvm")
    return (DEFAULT_GATE_MIN if gate_min is None else gate_min) if gate else None
