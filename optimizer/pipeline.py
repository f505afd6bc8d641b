"""The pass manager: parse pass specs, run passes in order, check and verify after every one, collect the report."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml

from optimizer.data import LABELS, random_inputs, split_labels
from optimizer.errors import PassError, SculptError, UsageError, VerificationError
from optimizer.model import check_model, infer_shapes, load_model
from optimizer.report import model_stats
from optimizer.verify import compare, run_ort
from passes import Pass, PassContext, get_pass

VERIFY_SAMPLES = 256
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
            options[key.strip()] = value.strip()
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


def _verify_feeds(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    feeds, _ = split_labels(data)
    return {k: v[:VERIFY_SAMPLES] if np.ndim(v) else v for k, v in feeds.items()}  # scalars (a sample rate) whole


def _accuracy(outputs: dict[str, np.ndarray], labels: np.ndarray) -> float:
    logits = next(iter(outputs.values()))
    return float(np.mean(logits.reshape(len(labels), -1).argmax(-1) == labels.reshape(-1)))


def optimize(
    model_or_path: onnx.ModelProto | str | os.PathLike,
    passes: Iterable[PassSpec],
    calibration: dict[str, np.ndarray] | None = None,
    evaluation: dict[str, np.ndarray] | None = None,
    tolerance: float = 1e-4,
    seed: int = 0,
    batch: int = 1,
    on_pass: Callable[[str, int, int], None] | None = None,
) -> tuple[onnx.ModelProto, dict]:
    """Run `passes` in order on a copy of the model and return (model, report).

    After every pass: the full ONNX checker, strict shape inference, and a comparison of the new model's
    outputs with the previous model's on the calibration inputs (seeded random inputs when none are given).
    A pass whose contract is `exact` fails the run with VerificationError when the outputs move by more than
    `tolerance` relative to the output scale (max |Δ| / max |reference|).
    """
    if isinstance(model_or_path, onnx.ModelProto):
        from optimizer.normalize import normalize

        model = normalize(model_or_path)[0]
    else:
        model = load_model(model_or_path)
    pass_objects = [build_pass(spec) for spec in passes]
    if not pass_objects:
        raise UsageError("no passes given; use --pass NAME (see `optimize passes`)")
    if not tolerance >= 0:
        raise UsageError(f"--tolerance {tolerance}: must be a non-negative number")

    ctx = PassContext(
        calibration=split_labels(calibration)[0] if calibration is not None else random_inputs(model, batch, seed),
        calibration_is_random=calibration is None,
        evaluation=evaluation,
        seed=seed,
    )
    verify_feeds = _verify_feeds(ctx.calibration)
    reference = run_ort(model, verify_feeds)
    # open dims take the user's data sizes (random inputs' sizes are made up: those figures say "unknown")
    shapes = {} if calibration is None else {k: v.shape for k, v in ctx.calibration.items()}
    report: dict[str, Any] = {"input": model_stats(model, batch, input_shapes=shapes), "passes": []}
    labels = evaluation.get(LABELS) if evaluation is not None else None
    eval_feeds = split_labels(evaluation)[0] if evaluation is not None else None
    if labels is not None:
        report["eval"] = {"metric": "top1", "input": _accuracy(run_ort(model, eval_feeds), labels)}

    for index, pass_ in enumerate(pass_objects):
        if on_pass is not None:
            on_pass(pass_.name, index, len(pass_objects))
        contract = pass_.contract_for_options()
        started = time.perf_counter()
        try:
            new_model, details = pass_.run(model, ctx)
        except SculptError:
            raise
        except Exception as e:
            raise PassError(f"pass {pass_.name} failed: {type(e).__name__}: {e}") from e
        seconds = time.perf_counter() - started
        check_model(new_model, f"output of pass {pass_.name}", full=True)
        infer_shapes(new_model, strict=True)
        verify_feeds = pass_.map_inputs(verify_feeds)
        ctx.calibration = pass_.map_inputs(ctx.calibration)
        if eval_feeds is not None:
            eval_feeds = pass_.map_inputs(eval_feeds)
            ctx.evaluation = {**eval_feeds, LABELS: labels} if labels is not None else eval_feeds
        outputs = run_ort(new_model, verify_feeds)
        verify = compare(reference, outputs)
        entry = {
            "name": pass_.name,
            "options": _plain_options(pass_),
            "contract": contract,
            "seconds": round(seconds, 4),
            "verify": verify,
            "details": details,
        }
        report["passes"].append(entry)
        if contract == "exact" and not verify["max_rel_err"] <= tolerance:
            raise VerificationError(
                f"pass {pass_.name} is exact but changed the outputs: max relative error {verify['max_rel_err']:.3g} "
                f"> tolerance {tolerance:g} (max abs {verify['max_abs_err']:.3g}); nothing was written"
            )
        model, reference = new_model, outputs

    report["output"] = model_stats(model, batch, input_shapes={k: v.shape for k, v in ctx.calibration.items()}
                                   if calibration is not None else {})
    if labels is not None:
        report["eval"]["output"] = _accuracy(run_ort(model, eval_feeds), labels)
    if ctx.warnings:
        report["warnings"] = list(ctx.warnings)
    return model, report


def _plain_options(pass_: Pass) -> dict:
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(pass_.options).items()}
