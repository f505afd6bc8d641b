"""Sweeps: many independent pipeline runs (points) over the product of a spec's axes, in this process or on Ray.

`run(spec)` is the Python API behind `optimize sweep SPEC.yaml`: each point runs the normal pipeline with its
verification and eval, then the spec's runtime (reram cost, bench latency), and returns its report. The result
holds the points in the order of the axes' product (the same with 1 or N workers), a Pareto front and the
objective the table is sorted by. `task=` swaps the pipeline for any picklable `task(inputs, params) -> dict`,
so training sweeps (regularizer strength, seeds) use the same spec format and the same engine:

>>> def train(inputs, params):  # a module-level function, so Ray can send it to a worker
...     return {"accuracy": 0.9 + params["strength"]}
>>> result = run({"axes": {"strength": [0.01, 0.02]}}, task=train)
>>> [round(p["accuracy"], 2) for p in result["points"]]
[0.91, 0.92]

Execution (`optimizer.sweep.engine`) uses plain Ray tasks rather than Ray Tune; the engine's docstring says why.
"""

from __future__ import annotations

import os
import time
from typing import Any

from optimizer.sweep.engine import TIMING_KEYS, OnResult, Task, execute
from optimizer.sweep.point import PipelineTask, SweepInputs
from optimizer.sweep.results import default_pareto_axis, pareto_front, ranking
from optimizer.sweep.spec import SweepSpec, load_spec, substitute

__all__ = ["run", "load_spec", "substitute", "SweepSpec", "SweepInputs", "pareto_front", "ranking", "TIMING_KEYS"]


def run(spec: SweepSpec | str | os.PathLike | dict, *, workers: int = 1, address: str | None = None,
        task: Task | None = None, inputs: Any = None, on_result: OnResult | None = None) -> dict:
    """Run every point of `spec` (a SweepSpec, a YAML path or a mapping) and return the sweep result.

    workers=1 runs the points here, one after another; workers=N starts a local Ray with N CPUs; `address`
    joins a Ray cluster. `inputs` (only with `task`) is what every task receives beside its params (default:
    the spec's model and data, read once). The result: `{"points": [...], "objective", "pareto", "interrupted",
    "workers", "backend", "seconds"}`; each point is `{"params", "ok", <metrics>, "report", "seconds"}` or
    `{"params", "ok": false, "error", "seconds"}`. A Ctrl-C returns the finished points, `interrupted: true`.
    """
    if not isinstance(spec, SweepSpec):
        spec = load_spec(spec, custom_task=task is not None)
    if inputs is None and (task is None or spec.model is not None):
        inputs = read_inputs(spec)
    started = time.perf_counter()
    outcome = execute(task or PipelineTask.from_spec(spec), list(spec.points), inputs, workers=workers,
                      address=address, on_result=on_result)
    points = [r for r in outcome.results if r is not None]
    result: dict[str, Any] = {
        "points": points,
        "objective": spec.objective,
        "interrupted": outcome.interrupted,
        "finished": len(points),
        "total": len(spec.points),
        "workers": outcome.workers,
        "backend": outcome.backend,
        "seconds": round(time.perf_counter() - started, 3),
    }
    x, y = spec.pareto or (default_pareto_axis(points), "accuracy")
    if x is not None:
        front = pareto_front(points, x, y)
        if front:
            result["pareto"] = {"x": x, "y": y, "points": front,
                                "params": [points[i]["params"] for i in front]}
    return result


def read_inputs(spec: SweepSpec) -> SweepInputs:
    """The spec's model (checked and serialized once) and its calibration and eval data, checked against it."""
    from optimizer.data import load_npz
    from optimizer.errors import UsageError
    from optimizer.model import load_model

    if spec.model is None:
        raise UsageError(f"{spec.source}: the spec needs a model: path")
    model = load_model(spec.model)
    calibration = load_npz(spec.calibration, model) if spec.calibration else None
    evaluation = load_npz(spec.eval, model) if spec.eval else None
    return SweepInputs(model.SerializeToString(), calibration, evaluation)


def without_timings(value: Any) -> Any:
    """The result with every timing removed: what must be equal between two runs of the same spec.

    >>> without_timings({"ok": True, "seconds": 1.2, "report": {"passes": [{"seconds": 0.1, "name": "a"}]}})
    {'ok': True, 'report': {'passes': [{'name': 'a'}]}}
    """
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value
