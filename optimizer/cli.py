"""`optimize`: the command-line entry point.

It parses options, calls the library, prints tables and maps errors to exit codes.

Exit codes: 0 ok; 1 failure (a pass failed, verification failed, a runtime failed); 2 usage error.
Without --debug a failure is one line on stderr; with --debug the traceback follows.
"""

from __future__ import annotations

import dataclasses
import sys
import traceback
from pathlib import Path

import click

from optimizer.errors import SculptError, UsageError

DEFAULT_GATE_MIN = 1.1


class DefaultToApply(click.Group):
    """`optimize MODEL --pass ...` runs the pipeline; `optimize SUBCOMMAND ...` runs a subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["apply", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultToApply, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sculpt", message="sculpt %(version)s")
def cli():
    """Sculpt: ONNX-in / ONNX-out model optimization.

    \b
    optimize MODEL --pass NAME[:key=value,...] [--pass ...] -o OUT    run passes, verified after each one
    optimize passes                                                   list passes and their options
    optimize inspect | run | bench | compare | sensitivity | sweep | tune | reram-sweep   see `optimize COMMAND --help`
    """


def _debug_option(f):
    return click.option("--debug", is_flag=True, help="show the full traceback on errors")(f)


def _sweep_options(f):
    """--workers/--address for the commands whose trials run as sweep points (optimizer.sweep.engine)."""
    f = click.option("--address", help="run the points on a running Ray cluster (see `optimize sweep`)")(f)
    return click.option("--workers", type=int, default=1, show_default=True,
                        help="points at a time: 1 runs here, N on a local Ray (the [dist] extra)")(f)


def _require_directory(path: str, what: str) -> None:
    """Fail before any work when the file at `path` could not be written: its directory is missing."""
    if not Path(path).parent.is_dir():
        raise UsageError(f"{path}: {what} directory {Path(path).parent} does not exist")


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        from optimizer.io_json import write_json

        write_json(path, payload)


@cli.command("apply", hidden=True)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--pass", "pass_specs", multiple=True, metavar="NAME[:key=value,...]", help="a pass to run (repeatable)")
@click.option("--recipe", type=click.Path(dir_okay=False), help="YAML file listing passes and options")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="where to write the model")
@click.option("--calibration", type=click.Path(dir_okay=False), help=".npz with one array per model input")
@click.option("--eval", "eval_path", type=click.Path(dir_okay=False), help=".npz with inputs and 'labels'")
@click.option("--tolerance", type=float, default=None, help="max relative output change for exact passes [1e-4]")
@click.option("--report", type=click.Path(dir_okay=False), help="write the report as JSON")
@click.option("--seed", type=int, default=None, help="seed for random choices and random inputs [0]")
@click.option("--batch", type=int, default=1, show_default=True, help="batch size for random inputs")
@click.option("--plan-out", type=click.Path(dir_okay=False), help="write the structured-sparse plan as JSON")
@click.option("--gate", type=click.Choice(["ort", "tvm"]), help="measure the speedup on this runtime (fixed threads)")
@click.option("--gate-min", type=float, default=None,
              help="least speedup a pass that claims one must deliver, else exit 1 [1.1]; 0: only report")
@click.option("--gate-threads", type=int, default=1, show_default=True, help="threads for the --gate measurement")
@_debug_option
def apply_cmd(model, pass_specs, recipe, output, calibration, eval_path, tolerance, report, seed, batch, plan_out,
              gate, gate_min, gate_threads, debug):
    """Run passes on MODEL and write the result to OUT."""
    from optimizer.console import print_pipeline_report, progress_printer
    from optimizer.data import load_npz
    from optimizer.model import read_model, save_model
    from optimizer.pipeline import build_pass, load_recipe, optimize

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
    out_path = Path(output)
    _require_directory(output, "output")
    if Path(model).exists() and out_path.exists() and out_path.resolve() == Path(model).resolve():
        raise UsageError(f"{output}: the output would overwrite the input model; choose another path")
    if report:
        _require_directory(report, "report")
    source, external = read_model(model, notes=(notes := []))
    _echo_notes(notes)
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
    )
    save_model(result, output, external=external or None)
    pipeline_report["model"] = str(model)
    pipeline_report["output_model"] = str(output)
    _write_json(report, pipeline_report)
    print_pipeline_report(pipeline_report)
    click.echo(f"wrote {output}" + (f" and {report}" if report else ""))


def _echo_notes(notes: list[str]) -> None:
    """Load-time normalisation notes (optimizer.normalize), one `note:` line each on stderr."""
    for note in notes:
        click.echo(f"note: {note}", err=True)


def _gate_min(gate: str | None, gate_min: float | None) -> float | None:
    if gate_min is not None and gate is None:
        raise UsageError("--gate-min needs --gate ort or --gate tvm")
    return (DEFAULT_GATE_MIN if gate_min is None else gate_min) if gate else None


@cli.command("passes")
@_debug_option
def passes_cmd(debug):
    """List every pass with its contract and options."""
    from optimizer.console import print_passes

    print_passes()


@cli.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--calibration", type=click.Path(dir_okay=False), help="measure activation statistics on these inputs")
@click.option("--batch", type=int, default=1, show_default=True, help="batch size used to count MACs")
@click.option("--report", type=click.Path(dir_okay=False), help="write the facts as JSON")
@_debug_option
def inspect_cmd(model, calibration, batch, report, debug):
    """Per-layer op, weight shape, params, MACs, sparsity and all-zero output channels."""
    from optimizer.console import print_inspect
    from optimizer.data import load_npz
    from optimizer.model import load_model
    from optimizer.report import layer_rows, model_stats

    proto = load_model(model, notes=(notes := []))
    _echo_notes(notes)
    feeds = {k: v for k, v in load_npz(calibration, proto).items() if k != "labels"} if calibration else {}
    shapes = {name: array.shape for name, array in feeds.items()}
    facts = {"model": str(model), "stats": model_stats(proto, batch, input_shapes=shapes),
             "layers": layer_rows(proto, batch, input_shapes=shapes)}
    if calibration:
        from optimizer.activation_stats import activation_stats

        facts["activations"] = activation_stats(proto, feeds)
    _write_json(report, facts)
    print_inspect(facts)


def _runtime_options(runtime_names, option_strings: dict[str, tuple[str, ...]]) -> dict[str, dict]:
    from optimizer.pipeline import parse_pass_spec

    options: dict[str, dict] = {}
    for name, strings in option_strings.items():
        for text in strings:
            options.setdefault(name, {}).update(parse_pass_spec(f"{name}:{text}")[1])
        if strings and name not in runtime_names:
            raise UsageError(f"--{name} options given but --runtime {name} is not selected")
    return options


def _runtime_flags(f):
    f = click.option("--reram-config", type=click.Path(dir_okay=False), help="YAML file of reram options")(f)
    f = click.option("--reram", "reram_opts", multiple=True, metavar="k=v,...", help="reram runtime options")(f)
    f = click.option("--tvm", "tvm_opts", multiple=True, metavar="k=v,...", help="tvm runtime options")(f)
    return f


def _collect_runtime_options(runtime_names, tvm_opts, reram_opts, reram_config) -> dict[str, dict]:
    options = _runtime_options(runtime_names, {"tvm": tvm_opts, "reram": reram_opts})
    if reram_config:
        if "reram" not in runtime_names:
            raise UsageError("--reram-config given but --runtime reram is not selected")
        options.setdefault("reram", {})["config"] = reram_config
    return options


@cli.command("run")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False), help=".npz of inputs")
@click.option("--output", "output_path", required=True, type=click.Path(dir_okay=False), help=".npz to write")
@click.option("--runtime", default="ort", show_default=True, help="ort | tvm | reram")
@click.option("--threads", type=int, default=None, help="threads for the runtime")
@click.option("--report", type=click.Path(dir_okay=False), help="write the runtime's description as JSON")
@_runtime_flags
@_debug_option
def run_cmd(model, input_path, output_path, runtime, threads, report, tvm_opts, reram_opts, reram_config, debug):
    """Run MODEL on a runtime and save its outputs (.npz, one array per output name)."""
    import runtimes
    from optimizer.data import load_npz, split_labels
    from optimizer.model import load_model

    _require_directory(output_path, "output")
    proto = load_model(model)
    data = load_npz(input_path, proto)
    feeds, labels = split_labels(data)
    options = _collect_runtime_options([runtime], tvm_opts, reram_opts, reram_config)
    session = runtimes.load(runtime, proto, threads=threads, **options.get(runtime, {}))
    outputs = session.run(feeds)
    if labels is not None and hasattr(session, "evaluate"):
        session.evaluate(data)
    from optimizer.io_json import write_npz

    write_npz(output_path, outputs)
    described = session.describe()
    _write_json(report, {"model": str(model), "runtime": runtime, runtime: described})
    click.echo(f"wrote {output_path}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in outputs.items()))


@cli.command("morph")
@click.argument("key", type=click.Path(dir_okay=False))
@click.option("--input", "input_path", required=True, type=click.Path(dir_okay=False), help=".npz of samples")
@click.option("--output", "output_path", required=True, type=click.Path(dir_okay=False), help=".npz to write")
@_debug_option
def morph_cmd(key, input_path, output_path, debug):
    """Morph samples with a MoLe KEY (written by `--pass mole:key_out=KEY`): the data provider's side.

    The key's input array becomes `<input>_morphed`; other arrays (labels) are copied unchanged.
    """
    from optimizer.data import load_npz
    from optimizer.io_json import write_npz
    from optimizer.morph import load_key, morph
    from passes.mole import morphed_name

    _require_directory(output_path, "output")
    secret = load_key(key)
    data = load_npz(input_path)
    if secret.input_name not in data:
        raise UsageError(f"{input_path}: has no array {secret.input_name!r}, the input {key} morphs "
                         f"(file has: {', '.join(data) or 'nothing'})")
    arrays = {name: value for name, value in data.items() if name != secret.input_name}
    arrays[morphed_name(secret.input_name)] = morph(data[secret.input_name], secret)
    write_npz(output_path, arrays)
    click.echo(f"wrote {output_path}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in arrays.items()))


@cli.command("bench")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--runtime", "runtime_names", multiple=True, default=("ort",), show_default=True, help="repeatable")
@click.option("--input", "input_path", type=click.Path(dir_okay=False), help=".npz of real inputs")
@click.option("--eval", "eval_path", type=click.Path(dir_okay=False), help=".npz with labels (runtimes that evaluate)")
@click.option("--batch", type=int, default=1, show_default=True, help="batch size of random inputs")
@click.option("--threads", type=int, default=1, show_default=True, help="threads for every runtime")
@click.option("--runs", type=int, default=20, show_default=True, help="timed runs per row")
@click.option("--warmup", type=int, default=3, show_default=True, help="untimed runs per row")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of random inputs")
@click.option("--report", type=click.Path(dir_okay=False), help="write results as JSON")
@_runtime_flags
@_debug_option
def bench_cmd(models, runtime_names, input_path, eval_path, batch, threads, runs, warmup, seed, report,
              tvm_opts, reram_opts, reram_config, debug):
    """Median and p90 latency, peak RSS and ratios, side by side, for every MODEL on every --runtime."""
    from optimizer.bench import bench
    from optimizer.console import print_bench
    from optimizer.data import load_npz
    from optimizer.model import load_model

    names = [Path(m).name for m in models]
    labels = names if len(set(names)) == len(names) else list(models)
    protos = [(label, load_model(m)) for label, m in zip(labels, models, strict=True)]
    inputs = load_npz(input_path) if input_path else None
    evaluation = load_npz(eval_path, protos[0][1]) if eval_path else None
    options = _collect_runtime_options(list(runtime_names), tvm_opts, reram_opts, reram_config)
    results = bench(protos, list(runtime_names), inputs=inputs, batch=batch, threads=threads, runs=runs,
                    warmup=warmup, seed=seed, runtime_options=options, evaluation=evaluation)
    _write_json(report, results)
    print_bench(results)


@cli.command("reram-sweep")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--eval", "eval_path", required=True, type=click.Path(dir_okay=False), help=".npz with 'labels'")
@click.option("--adc-bits", default="1-9", show_default=True, help="ADC resolutions: a range (1-9) or a list (2,4,8)")
@click.option("--plot", type=click.Path(dir_okay=False), help="write accuracy and saturation against ADC bits (PNG)")
@click.option("--calibration", type=click.Path(dir_okay=False), help=".npz for float models' activation ranges")
@click.option("--report", type=click.Path(dir_okay=False), help="write the sweep as JSON")
@click.option("--reram", "reram_opts", multiple=True, metavar="k=v,...", help="reram runtime options")
@click.option("--reram-config", type=click.Path(dir_okay=False), help="YAML file of reram options")
@_sweep_options
@_debug_option
def reram_sweep_cmd(model, eval_path, adc_bits, plot, calibration, report, reram_opts, reram_config, workers, address,
                    debug):
    """Accuracy and ADC saturation of MODEL on the reram emulator against ADC resolution."""
    from optimizer.data import load_npz
    from optimizer.model import load_model
    from runtimes.reram.sweep import check_plot_path, parse_bits, sweep, table_lines, write_plot

    bits = parse_bits(adc_bits)
    if plot:
        check_plot_path(plot)
    proto = load_model(model)
    evaluation = load_npz(eval_path, proto)
    options = _collect_runtime_options(["reram"], (), reram_opts, reram_config).get("reram", {})
    if calibration:
        options["calibration"] = load_npz(calibration, proto)
    result = sweep(proto, evaluation, adc_bits=bits, options=options,
                   progress=lambda text: click.echo(f"reram-sweep: {text}…", err=True), workers=workers,
                   address=address)
    for line in table_lines(result):
        click.echo(line)
    if plot:
        write_plot(result, plot, title=f"{Path(model).name} on the ReRAM emulator")
        click.echo(f"wrote {plot}")
    _write_json(report, {"model": str(model), "reram_sweep": result})


@cli.command("sensitivity")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--eval", "eval_path", required=True, type=click.Path(dir_okay=False),
              help=".npz of inputs (with 'labels': top-1 drop; without: output cosine drop)")
@click.option("--ratios", default="0.25,0.5,0.75", show_default=True, help="comma-separated pruning ratios")
@click.option("--criterion", default="l1", show_default=True, help="l1 | l2 | bn-scale | hoyer")
@click.option("--report", type=click.Path(dir_okay=False), help="write the result as JSON")
@_sweep_options
@_debug_option
def sensitivity_cmd(model, eval_path, ratios, criterion, report, workers, address, debug):
    """Prune each channel group alone and list the metric drop, worst first (candidates for exclude=)."""
    from optimizer.data import load_npz
    from optimizer.model import load_model
    from optimizer.sensitivity import parse_ratios, print_sensitivity, sensitivity

    parsed = parse_ratios(ratios)
    proto = load_model(model)
    result = sensitivity(proto, load_npz(eval_path, proto), ratios=parsed, criterion=criterion,
                         progress=lambda text: click.echo(f"sensitivity: {text}…", err=True), workers=workers,
                         address=address)
    _write_json(report, {"model": str(model), **result})
    print_sensitivity(result)


@cli.command("sweep")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--workers", type=int, default=1, show_default=True,
              help="points at a time: 1 runs here without Ray, N starts a local Ray with N CPUs")
@click.option("--address", help="join a running Ray cluster (e.g. 10.0.0.5:6379) instead of starting one")
@click.option("--report", type=click.Path(dir_okay=False), help="write every point's result as JSON")
@click.option("--plot", type=click.Path(dir_okay=False), help="write the Pareto front as PNG")
@_debug_option
def sweep_cmd(spec, workers, address, report, plot, debug):
    """Run the pipeline over the product of SPEC's axes (YAML): a table by objective, a Pareto front.

    Exit code 1 when a point failed (the others still run and are reported), 130 after Ctrl-C (the finished
    points are written).
    """
    from optimizer.sweep.command import sweep_command

    code = sweep_command(spec, workers=workers, address=address, report=report, plot=plot)
    if code:
        raise click.exceptions.Exit(code)


@cli.command("tune")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--trials", type=int, required=True, help="measured candidates in total (MetaSchedule)")
@click.option("--batch", type=int, default=None, help="batch to tune for (needed when the model's batch is open)")
@click.option("--tvm", "tvm_opts", multiple=True, metavar="k=v,...", help="tvm options (sparse, block, cache_dir)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--report", type=click.Path(dir_okay=False), help="write the result as JSON")
@_debug_option
def tune_cmd(model, trials, batch, tvm_opts, seed, report, debug):
    """Tune the ops without a hand kernel for the tvm runtime; later `--runtime tvm` loads apply the records."""
    from optimizer.model import load_model
    from runtimes.tvm.options import parse_options
    from runtimes.tvm.tune import tune

    values = _runtime_options(["tvm"], {"tvm": tvm_opts}).get("tvm", {})
    options = parse_options({**values, **({"batch": batch} if batch is not None else {})})
    result = tune(load_model(model), trials=trials, options=options, seed=seed)
    _write_json(report, {"model": str(model), "tune": result})
    click.echo(f"tuned {len(result['tasks'])} ops with {result['trials']} trials in {result['seconds']} s; "
               f"records: {result['work_dir']}")


@cli.command("compare")
@click.argument("model_a", type=click.Path(dir_okay=False))
@click.argument("model_b", type=click.Path(dir_okay=False))
@click.option("--calibration", type=click.Path(dir_okay=False), help=".npz of inputs (default: seeded random)")
@click.option("--batch", type=int, default=1, show_default=True, help="batch size of random inputs")
@click.option("--seed", type=int, default=0, show_default=True)
@_debug_option
def compare_cmd(model_a, model_b, calibration, batch, seed, debug):
    """Max abs/rel error, cosine and top-1 agreement between two models' outputs (ONNX Runtime)."""
    from optimizer.console import print_compare
    from optimizer.data import load_npz, random_inputs, split_labels
    from optimizer.model import load_model
    from optimizer.verify import compare, run_ort

    a, b = load_model(model_a), load_model(model_b)
    feeds = split_labels(load_npz(calibration, a))[0] if calibration else random_inputs(a, batch, seed)
    print_compare(compare(run_ort(a, feeds), run_ort(b, feeds)))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        code = cli.main(args=args, prog_name="optimize", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except SculptError as e:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as e:  # a bug: still one line unless --debug
        if debug:
            traceback.print_exc()
        click.echo(f"error: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", err=True)
        return 1
    return code if isinstance(code, int) else 0  # click returns a command's Exit code instead of raising it


if __name__ == "__main__":
    sys.exit(main())
