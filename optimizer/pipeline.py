"""The pass manager: parse pass specs, run passes in order with instruments around each one, collect the report."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml

from optimizer.data import LABELS, random_samples, split_labels
from optimizer.errors import PassError, SculptError, UsageError
from optimizer.instruments import MIN_RANDOM_SAMPLES, Instrument, RunState, default_instruments
from optimizer.io_json import write_bytes
from optimizer.model import load_model
from optimizer.overridable import default_feeds, detach, freeze, reattach
from optimizer.report import model_stats
from optimizer.verify import QualityFloor
from passes import Artifact, Pass, PassContext, PassResult, get_pass

# a comma starts a new option only when `key=` follows, so regex values (exclude=a,b) keep their commas
_OPTION_SPLIT = re.compile(r",(?=\s*[A-Za-z_][\w-]*\s*=)")

PassSpec = str | tuple[str, dict[str, Any]] | Pass


def parse_pass_spec(spec: str) -> tuple[str, dict[str, str]]:
    """`name` or `name:key=value,key=value` -> (name, {key: value})."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise UsageError(f"--pass {spec!r}: missing pass name")
    options = {}
    if rest.strip():
        for item in _OPTION_SPLIT.split(rest):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise UsageError(f"--pass {spec!r}: expected key=value, got {item!r}")
            key = key.strip()
            if key.replace("-", "_") in {k.replace("-", "_") for k in options}:
                raise UsageError(f"--pass {spec!r}: option {key!r} is given twice; give each option once")
            options[key] = value.strip()
    return name, options


def build_pass(spec: PassSpec) -> Pass:
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, tuple):
        name, options = spec
    else:
        name, options = parse_pass_spec(spec)
    return get_pass(name).from_spec(options)


def load_recipe(path: str | os.PathLike) -> tuple[list[tuple[str, dict]], dict]:
    """A YAML recipe: `passes:` (a list of names or {name: {options}}) plus optional top-level settings
    (tolerance, seed). Returns the pass list and the settings."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such recipe file")
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(recipe, dict) or not isinstance(recipe.get("passes"), list):
        raise UsageError(f"{path}: a recipe needs a top-level 'passes:' list")
    unknown = set(recipe) - {"passes", "tolerance", "seed"}
    if unknown:
        raise UsageError(f"{path}: unknown recipe key {sorted(unknown)[0]!r} (allowed: passes, tolerance, seed)")
    passes = []
    for entry in recipe["passes"]:
        if isinstance(entry, str):
            passes.append((entry, {}))
        elif isinstance(entry, dict) and len(entry) == 1:
            name, options = next(iter(entry.items()))
            if options is not None and not isinstance(options, dict):
                raise UsageError(f"{path}: options of pass {name!r} must be a mapping")
            passes.append((name, options or {}))
        else:
            raise UsageError(f"{path}: each pass is a name or a one-key mapping name: {{options}}, got {entry!r}")
    settings = {}
    for key, kind in (("tolerance", float), ("seed", int)):
        if key in recipe:
            try:
                settings[key] = kind(recipe[key])  # YAML reads 1e-5 (no dot) as a string
            except (TypeError, ValueError):
                raise UsageError(f"{path}: {key}: {recipe[key]!r} is not a valid {kind.__name__}") from None
    return passes, settings


def write_artifacts(artifacts: Iterable[Artifact]) -> list[dict]:
    """Write each artifact atomically to its path; returns [{"what", "path"}] for the report."""
    written = []
    for artifact in artifacts:
        write_bytes(artifact.path, artifact.content)
        written.append({"what": artifact.what, "path": artifact.path})
    return written


def optimize(
    model_or_path: onnx.ModelProto | str | os.PathLike,
    passes: Iterable[PassSpec],
    *,
    calibration: dict[str, np.ndarray] | None = None,
    evaluation: dict[str, np.ndarray] | None = None,
    tolerance: float = 1e-4,
    seed: int = 0,
    batch: int = 1,
    gate: str | None = None,
    gate_min: float | None = None,
    gate_threads: int = 1,
    instruments: list[Instrument] | None = None,
    on_pass: Callable[[str, int, int], None] | None = None,
    floor: QualityFloor | None = None,
    strict: bool = False,
    freeze_inputs: bool = False,
) -> tuple[onnx.ModelProto, dict]:
    """Run `passes` in order on a copy of the model and return (model, report).

    Around every pass run the instruments (optimizer/instruments.py); by default: Timer, the full ONNX Checker,
    strict ShapeInference, Verify (the new model's outputs against the previous model's on the calibration
    inputs, seeded random inputs when none are given; an `exact` pass that moves them by more than `tolerance`
    relative to the output scale fails the run), Eval (top-1 before and after, when `evaluation` has labels), and
    with `gate="ort"|"tvm"` a SpeedGate that measures the speedup (failing below `gate_min`). Without
    calibration data the inputs are seeded random ones, at least MIN_RANDOM_SAMPLES where the batch axis is open.
    Verify fails on NaN/Inf in either model's outputs, and an `approximate` pass below `floor` (cosine, top-1
    agreement) is a warning, with `strict` a QualityError.

    Overridable initializers (graph inputs with a same-name initializer, a default the caller may replace) stay
    graph inputs through every pass (optimizer/overridable.py), unless `freeze_inputs` makes them constants first.

    The passes' artifacts (keys, plans, plots) are written only after every pass and instrument has passed; a run
    that fails writes none of them.

        model, report = optimize("model.onnx", ["cleanup", "structured-sparse:ratio=0.5"], gate="ort")
        report["gate"]["ratio"]      # before / after latency on ONNX Runtime
    """
    if isinstance(model_or_path, onnx.ModelProto):
        from optimizer.normalize import normalize

        model = normalize(model_or_path)[0]
    else:
        model = load_model(model_or_path)
    pass_objects = [build_pass(spec) for spec in passes]
    if not pass_objects:
        raise UsageError("no passes given; use --pass NAME (see `optimize passes`)")
    if batch < 1:
        raise UsageError(f"--batch {batch}: must be at least 1")
    if instruments is None:
        instruments = default_instruments(tolerance=tolerance, gate=gate, gate_min=gate_min, threads=gate_threads,
                                          batch=batch, floor=floor, strict=strict)
    if freeze_inputs:
        model = freeze(model)
    random_batch = max(batch, MIN_RANDOM_SAMPLES)
    ctx = PassContext(
        calibration=split_labels(calibration)[0] if calibration is not None else random_samples(model, random_batch,
                                                                                                 seed),
        calibration_is_random=calibration is None,
        evaluation=evaluation,
        seed=seed,
    )
    # open dims take the user's data sizes (random inputs' sizes are made up: those figures say "unknown")
    shapes = {} if calibration is None else {k: np.shape(v) for k, v in ctx.calibration.items()}
    state = RunState(model, ctx, {"input": model_stats(model, batch, input_shapes=shapes), "passes": []})
    for instrument in instruments:
        instrument.before_run(state)
    artifacts: list[Artifact] = []
    for index, pass_ in enumerate(pass_objects):
        if on_pass is not None:
            on_pass(pass_.name, index, len(pass_objects))
        result = _run_pass(pass_, state, instruments)
        artifacts.extend(result.artifacts)
        _map_context(ctx, pass_, result)
        state.model = result.model
    shapes = {} if calibration is None else {k: np.shape(v) for k, v in ctx.calibration.items()}
    state.report["output"] = model_stats(state.model, batch, input_shapes=shapes)
    for instrument in instruments:
        instrument.after_run(state)
    if ctx.warnings:
        state.report["warnings"] = list(ctx.warnings)
    if artifacts:
        state.report["artifacts"] = write_artifacts(artifacts)
    return state.model, state.report


def _run_pass(pass_: Pass, state: RunState, instruments: list[Instrument]) -> PassResult:
    state.entry = {"name": pass_.name, "options": _plain_options(pass_), "contract": pass_.contract_for_options()}
    for instrument in instruments:
        instrument.before_pass(state, pass_)
    detached, defaults = detach(state.model)
    calibration = state.ctx.calibration
    state.ctx.calibration = {**default_feeds(defaults), **calibration}  # a pass may run the detached model
    try:
        result = pass_.run(detached, state.ctx)
    except SculptError:
        raise
    except Exception as e:
        raise PassError(f"pass {pass_.name} failed: {type(e).__name__}: {e}") from e
    finally:
        state.ctx.calibration = calibration
    if not isinstance(result, PassResult):
        raise PassError(f"pass {pass_.name} returned {type(result).__name__}, not a PassResult")
    result = dataclasses.replace(result, model=reattach(result.model, defaults))
    state.report["passes"].append(state.entry)
    for instrument in instruments:
        instrument.after_pass(state, pass_, result)
    state.entry["details"] = result.report
    return result


def _map_context(ctx: PassContext, pass_: Pass, result: PassResult) -> None:
    """The calibration and evaluation inputs of the new model (labels unchanged)."""
    ctx.calibration = pass_.map_inputs(result, ctx.calibration)
    if ctx.evaluation is not None:
        feeds, labels = split_labels(ctx.evaluation)
        feeds = pass_.map_inputs(result, feeds)
        ctx.evaluation = {**feeds, LABELS: labels} if labels is not None else feeds


def _plain_options(pass_: Pass) -> dict:
    return {k: v for k, v in dataclasses.asdict(pass_.options).items()}
