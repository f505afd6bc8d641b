"""Pipeline instruments: what runs around every pass (as TVM's PassInstrument), each with one job.

The pipeline calls, in the order the instruments are given, `before_run(state)` once, `before_pass(state, pass_)`
and `after_pass(state, pass_, result)` around every pass (`state.model` is still the model the pass ran on;
`result.model` is the new one), and `after_run(state)` when every pass is done. An instrument fails the run by
raising a SculptError; nothing has been written at that point.

    instruments = [Timer(), Checker(), ShapeInference(), Verify(tolerance=1e-4), Eval(), SpeedGate("ort")]
    model, report = optimize(model, ["structured-sparse"], instruments=instruments)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from optimizer.data import LABELS, split_labels
from optimizer.errors import PassError, QualityError, SculptError, UsageError, VerificationError
from optimizer.model import check_model, infer_shapes
from optimizer.verify import QualityFloor, class_score_outputs, compare, run_ort, top1_accuracy

VERIFY_SAMPLES = 256
MIN_RANDOM_SAMPLES = 32  # without calibration data: enough that top-1 agreement is not just 0 or 1
GATE_RUNTIMES = ("ort", "tvm")


class GateError(SculptError):
    """A pass that claims a speedup did not deliver the speedup the gate asks for (exit code 1)."""


@dataclass
class RunState:
    """What instruments see: the current model, the pass context, the report being built and the current entry."""

    model: onnx.ModelProto
    ctx: Any
    report: dict
    entry: dict = field(default_factory=dict)


class Instrument:
    """Base class: every hook does nothing."""

    def before_run(self, state: RunState) -> None:
        """Once, before the first pass."""

    def before_pass(self, state: RunState, pass_) -> None:
        """Just before `pass_.run`."""

    def after_pass(self, state: RunState, pass_, result) -> None:
        """Just after `pass_.run`; `state.entry` is the pass's report entry."""

    def after_run(self, state: RunState) -> None:
        """Once, after the last pass; `state.model` is the final model."""


class Timer(Instrument):
    """Seconds each pass's `run` took (entry["seconds"]). Put it first so the other hooks are not counted."""

    def before_pass(self, state: RunState, pass_) -> None:
        self._started = time.perf_counter()

    def after_pass(self, state: RunState, pass_, result) -> None:
        state.entry["seconds"] = round(time.perf_counter() - self._started, 4)


class Checker(Instrument):
    """The full ONNX checker on the input model (failing: bad input, ModelError) and on every pass's output
    (failing: the pass's fault, PassError)."""

    def before_run(self, state: RunState) -> None:
        check_model(state.model, "the input model", full=True)

    def after_pass(self, state: RunState, pass_, result) -> None:
        check_model(result.model, f"output of pass {pass_.name}", full=True, error=PassError)


class ShapeInference(Instrument):
    """Strict shape inference on every pass's output."""

    def after_pass(self, state: RunState, pass_, result) -> None:
        infer_shapes(result.model, strict=True, error=PassError)


class Verify(Instrument):
    """Compare every pass's outputs with the previous model's on the calibration inputs (entry["verify"]).

    The input model's own outputs must be finite, and so must every pass's (NaN/Inf: VerificationError). A pass
    whose contract is `exact` fails the run when the outputs move by more than `tolerance` relative to the output
    scale (max |Δ| / max |reference|); an `approximate` one below `floor` (cosine, top-1 agreement) is a warning,
    or with `strict` a QualityError. report["verification"] says which inputs and how many samples were compared.
    """

    def __init__(self, tolerance: float = 1e-4, samples: int = VERIFY_SAMPLES, floor: QualityFloor | None = None,
                 strict: bool = False):
        if not tolerance >= 0:
            raise UsageError(f"--tolerance {tolerance}: must be a non-negative number")
        self.tolerance, self.samples = tolerance, samples
        self.floor, self.strict = floor or QualityFloor(), strict

    def before_run(self, state: RunState) -> None:
        feeds, _ = split_labels(state.ctx.calibration)
        self.feeds = {k: v[: self.samples] if np.ndim(v) else v for k, v in feeds.items()}  # scalars go whole
        self.reference = run_ort(state.model, self.feeds)
        self.class_scores = class_score_outputs(state.model)  # passes never reorder outputs
        verdict = compare(self.reference, self.reference)
        if "failure" in verdict:
            raise VerificationError(f"input model: {verdict['failure']}; check the model and the calibration data")
        count = max((len(v) for v in self.feeds.values() if np.ndim(v)), default=1)
        source = (f"seeded random N(0,1) inputs (seed {state.ctx.seed})" if state.ctx.calibration_is_random
                  else "calibration data")
        state.report["verification"] = {"inputs": source, "samples": count}
        if count < MIN_RANDOM_SAMPLES:
            state.ctx.warn(f"verification compares only {count} sample(s) (fewer than {MIN_RANDOM_SAMPLES}): cosine "
                           "and top-1 agreement are coarse; give more --calibration samples")

    def after_pass(self, state: RunState, pass_, result) -> None:
        self.feeds = pass_.map_inputs(result, self.feeds)
        outputs = run_ort(result.model, self.feeds)
        verify = compare(self.reference, outputs, self.class_scores)
        state.entry["verify"] = verify
        self._judge(pass_.name, state.entry["contract"], verify, state.ctx)
        self.reference = outputs

    def _judge(self, name: str, contract: str, verify: dict, ctx) -> None:
        if "failure" in verify:
            raise VerificationError(f"pass {name}: {verify['failure']}; nothing was written")
        if contract == "exact":
            if not verify["max_rel_err"] <= self.tolerance:
                raise VerificationError(
                    f"pass {name} is exact but changed the outputs: max relative error {verify['max_rel_err']:.3g} "
                    f"> tolerance {self.tolerance:g} (max abs {verify['max_abs_err']:.3g}); nothing was written"
                )
            return
        shortfall = self.floor.shortfall(verify)
        if shortfall is None:
            return
        if self.strict:
            raise QualityError(f"pass {name} fell below the quality floor ({shortfall}); --strict: nothing was "
                               "written")
        ctx.warn(f"pass {name} fell below the quality floor ({shortfall}); the output may be broken "
                 "(--strict fails the run instead; --min-cosine/--min-agreement set the floor)")


class Eval(Instrument):
    """Top-1 accuracy of the input and the output model on the evaluation data (report["eval"]), when it has labels.

    The pipeline maps `ctx.evaluation` through every pass, so the output model is scored on its own inputs."""

    def before_run(self, state: RunState) -> None:
        evaluation = state.ctx.evaluation
        if evaluation is not None and LABELS in evaluation:
            state.report["eval"] = {"metric": "top1", "input": top1_accuracy(state.model, evaluation)}

    def after_run(self, state: RunState) -> None:
        if "eval" in state.report:
            state.report["eval"]["output"] = top1_accuracy(state.model, state.ctx.evaluation)


class SpeedGate(Instrument):
    """Measure the model before and after on `runtime` with fixed threads, and report the ratio (report["gate"]).

    A pass that claims a speedup (`Pass.claims_speedup(result)`) is measured against the model it ran on, side by
    side (interleaved bursts, fastest call); when `min_ratio` is set and it runs less than `min_ratio` times as
    fast, the run fails with GateError and says so. The whole run is measured input against output at the end.
    """

    def __init__(self, runtime: str = "ort", *, min_ratio: float | None = None, threads: int = 1, batch: int = 1,
                 seconds: float = 1.0, runtime_options: dict | None = None):
        if runtime not in GATE_RUNTIMES:
            raise UsageError(f"--gate {runtime!r}: choose one of {', '.join(GATE_RUNTIMES)}")
        if min_ratio is not None and not min_ratio >= 0:
            raise UsageError(f"--gate-min {min_ratio}: must be a ratio >= 0 such as 1.1 (0: report only)")
        if threads < 1:
            raise UsageError(f"--gate threads={threads}: must be at least 1")
        self.runtime, self.min_ratio, self.threads, self.batch = runtime, min_ratio, threads, batch
        self.seconds, self.runtime_options = seconds, runtime_options or {}

    def before_run(self, state: RunState) -> None:
        from optimizer.timing import set_thread_env

        set_thread_env(self.threads)
        feeds, _ = split_labels(state.ctx.calibration)
        self.first_model = state.model
        self.first_feeds = {k: v[: self.batch] if np.ndim(v) else v for k, v in feeds.items()}
        self.feeds = self.first_feeds
        state.report["gate"] = {"runtime": self.runtime, "threads": self.threads, "batch": self.batch,
                                "min_ratio": self.min_ratio, "passes": []}

    def after_pass(self, state: RunState, pass_, result) -> None:
        before_feeds, self.feeds = self.feeds, pass_.map_inputs(result, self.feeds)
        if not pass_.claims_speedup(result):
            return
        before_ms, after_ms = self._measure((state.model, before_feeds), (result.model, self.feeds))
        row = _ratio_row(before_ms, after_ms)
        state.report["gate"]["passes"].append({"name": pass_.name, **row})
        if self.min_ratio is not None and not row["ratio"] >= self.min_ratio:
            raise GateError(
                f"speed gate: pass {pass_.name} claims a speedup but runs {row['ratio']:.2f}x as fast on "
                f"{self.runtime} ({before_ms:.3f} ms before, {after_ms:.3f} ms after, {self.threads} thread(s), "
                f"batch {self.batch}); --gate-min asks for {self.min_ratio:g}x; nothing was written"
            )

    def after_run(self, state: RunState) -> None:
        measured = state.report["gate"]["passes"]
        if len(measured) == 1 and len(state.report["passes"]) == 1:
            overall = {k: measured[0][k] for k in ("before_ms", "after_ms", "ratio")}
        else:
            overall = _ratio_row(*self._measure((self.first_model, self.first_feeds), (state.model, self.feeds)))
        state.report["gate"].update(overall)

    def _measure(self, *models: tuple[onnx.ModelProto, dict[str, np.ndarray]]) -> list[float]:
        import runtimes
        from optimizer.timing import interleaved_ms

        sessions = [(runtimes.load(self.runtime, model, threads=self.threads, **self.runtime_options), feeds)
                    for model, feeds in models]
        return interleaved_ms([lambda s=s, f=f: s.run(f) for s, f in sessions], self.seconds)


def _ratio_row(before_ms: float, after_ms: float) -> dict:
    """ratio = before / after: above 1 is faster."""
    return {"before_ms": round(before_ms, 4), "after_ms": round(after_ms, 4),
            "ratio": round(before_ms / after_ms, 4) if after_ms > 0 else float("inf")}


def default_instruments(*, tolerance: float = 1e-4, gate: str | None = None, gate_min: float | None = None,
                        threads: int = 1, batch: int = 1, floor: QualityFloor | None = None,
                        strict: bool = False) -> list[Instrument]:
    """The pipeline's standard instruments: timer, checker, shape inference, verification, eval, and the speed
    gate when `gate` names a runtime."""
    verify = Verify(tolerance, floor=floor, strict=strict)
    instruments: list[Instrument] = [Timer(), Checker(), ShapeInference(), verify, Eval()]
    if gate is not None:
        instruments.append(SpeedGate(gate, min_ratio=gate_min, threads=threads, batch=batch))
    elif gate_min is not None:
        raise UsageError("--gate-min needs --gate ort or --gate tvm")
    return instruments
