"""One point of a pipeline sweep: the spec's passes with the point's values, run by the normal pipeline (checker,
shape inference, verification after every pass, ONNX Runtime top-1 on the eval data), then the spec's runtime
(reram: accuracy, saturation and energy on the emulator; ort/tvm with `bench:`: latency by the bench harness).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from optimizer.data import LABELS
from optimizer.errors import UsageError
from optimizer.sweep.spec import BenchSettings, SweepSpec, substitute


@dataclass(frozen=True)
class SweepInputs:
    """What every point shares (sent to Ray's object store once): the serialized model and the data."""

    model: bytes
    calibration: dict[str, np.ndarray] | None
    evaluation: dict[str, np.ndarray] | None


@dataclass(frozen=True)
class PipelineTask:
    """`task(inputs, params)` for `engine.execute`: the spec's templates filled with `params`, then run."""

    passes: tuple[Any, ...]
    runtime: str
    runtime_options: dict[str, Any]
    seed: Any
    tolerance: float
    threads: int
    bench: BenchSettings | None

    @classmethod
    def from_spec(cls, spec: SweepSpec) -> PipelineTask:
        return cls(spec.passes, spec.runtime, spec.runtime_options, spec.seed, spec.tolerance, spec.threads,
                   spec.bench)

    def __call__(self, inputs: SweepInputs, params: dict[str, Any]) -> dict:
        import onnx
        from threadpoolctl import threadpool_limits

        model = onnx.load_from_string(inputs.model)
        with threadpool_limits(limits=self.threads):
            model, report = self._pipeline(model, inputs, params)
            metrics = _model_metrics(report)
            if self.runtime == "reram":
                metrics.update(self._reram(model, inputs, params, report))
            elif self.runtime != "ort" and inputs.evaluation is not None and LABELS in inputs.evaluation:
                metrics["accuracy"] = self._runtime_accuracy(model, inputs, params)
            if self.bench is not None:
                metrics.update(self._bench(model, params, report))
        return {**metrics, "report": report}

    def _pipeline(self, model, inputs: SweepInputs, params: dict) -> tuple[Any, dict]:
        from optimizer.pipeline import optimize
        from optimizer.report import model_stats
        from optimizer.verify import top1_accuracy

        seed = _integer(substitute(self.seed, params), "seed")
        passes = [substitute(entry, params) for entry in self.passes]
        if passes:
            return optimize(model, passes, calibration=inputs.calibration, evaluation=inputs.evaluation,
                            tolerance=self.tolerance, seed=seed)
        stats = model_stats(model)
        report: dict[str, Any] = {"input": stats, "passes": [], "output": stats}
        if inputs.evaluation is not None and LABELS in inputs.evaluation:
            accuracy = top1_accuracy(model, inputs.evaluation)
            report["eval"] = {"metric": "top1", "input": accuracy, "output": accuracy}
        return model, report

    def _options(self, params: dict) -> dict[str, Any]:
        return {"threads": self.threads, **substitute(self.runtime_options, params)}

    def _reram(self, model, inputs: SweepInputs, params: dict, report: dict) -> dict:
        from runtimes.reram import load

        if inputs.evaluation is None or LABELS not in inputs.evaluation:
            raise UsageError("runtime reram: the sweep needs eval: data with 'labels'")
        options = self._options(params)
        if inputs.calibration is not None and "calibration" not in options:
            options["calibration"] = inputs.calibration
        described = load(model, **options).evaluate(inputs.evaluation)
        report["runtime"] = {"name": "reram", **described}
        return {"accuracy": described["accuracy"], "energy_pj": described["energy_pj"]["total"],
                "latency_ns": described["latency_ns"], "saturation_rate": described["saturation_rate"]}

    def _runtime_accuracy(self, model, inputs: SweepInputs, params: dict) -> float:
        import runtimes
        from optimizer.data import split_labels

        feeds, labels = split_labels(inputs.evaluation)
        logits = next(iter(runtimes.load(self.runtime, model, **self._options(params)).run(feeds).values()))
        return float(np.mean(logits.reshape(len(labels), -1).argmax(-1) == labels.reshape(-1)))

    def _bench(self, model, params: dict, report: dict) -> dict:
        from optimizer.bench import bench

        options = {k: v for k, v in self._options(params).items() if k != "threads"}
        result = bench([("point", model)], [self.runtime], batch=self.bench.batch, threads=self.threads,
                       runs=self.bench.runs, warmup=self.bench.warmup, runtime_options={self.runtime: options})
        row = result["results"][0]
        report["bench"] = {k: row[k] for k in ("runtime", "batch", "threads", "median_ms", "p90_ms")}
        return {"latency_ms": row["median_ms"]}


def _model_metrics(report: dict) -> dict:
    metrics = {"macs": report["output"]["macs"], "model_params": report["output"]["params"],
               "model_bytes": report["output"]["bytes"]}
    if "eval" in report:
        metrics["accuracy"] = report["eval"]["output"]
    return metrics


def _integer(value: Any, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what}: {value!r} is not an integer") from None
