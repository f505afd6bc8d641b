"""The reram Session: load, calibrate, run, evaluate, and describe the hardware cost of the last run."""

from __future__ import annotations

import contextlib
from collections import Counter
from functools import partial

import numpy as np
import onnx

from optimizer.data import feed_in_chunks, fixed_batch, graph_inputs
from optimizer.errors import UsageError
from optimizer.quant import affine_params
from runtimes.reram import cost
from runtimes.reram.calibration import activation_ranges, load_data
from runtimes.reram.config import ReramOptions
from runtimes.reram.crossbar import Counts
from runtimes.reram.executor import DOMAIN, Executor, Layer, chunks, rewrite
from runtimes.reram.layers import LayerSpec, find_layers
from runtimes.reram.plan import BitslicePlan, declared_weight_bits, read_plan


class ReramSession:
    """A model on the emulated accelerator. `run` and `evaluate` reset the event counters, `describe` reports them."""

    def __init__(self, model: onnx.ModelProto, options: ReramOptions):
        self.options = options
        self.model = model
        specs, self.declines = find_layers(model, weight_bits=options.weight_bits)
        plan = read_plan(model)
        declared = declared_weight_bits(model)
        self.layers = [Layer(spec, options, index, _weight_bits(spec, plan, declared, options))
                       for index, spec in enumerate(specs)]
        self._planned_bits = [_resolve_adc_bits(layer, plan, options) for layer in self.layers]
        for layer, (bits, source) in zip(self.layers, self._planned_bits, strict=True):
            layer.configure_adc(bits, source)
        nodes = rewrite(model, specs)
        self.digital_ops = Counter(n.op_type for n in nodes if n.domain != DOMAIN)
        self.executor = Executor(model, nodes, self.layers, np.random.default_rng([options.seed, 1]))
        self._fixed_batch = fixed_batch(graph_inputs(model))
        self._chunk = self._fixed_batch or options.batch  # a model with a fixed batch takes exactly that many
        self.accuracy: float | None = None
        needed = options.adc_range == "calibrated" or any(layer.spec.input.from_float for layer in self.layers)
        # "final" calibrations come from calibration or evaluation data; one from the first run's inputs is
        # provisional and replaced when evaluate() sees real data.
        self._calibration = "needed" if needed else "final"
        self.calibration_source = None if needed else "not needed"
        if needed and options.calibration is not None:
            self._calibrate(load_data(options.calibration, model), "calibration data", final=True)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._calibration == "needed":
            self._calibrate(load_data(feeds, self.model), "first batch run (no calibration data given)", final=False)
        self._reset()
        self.accuracy = None
        with _blas_threads(self.options.threads):
            return feed_in_chunks(self.executor.run, feeds, self._fixed_batch)

    def evaluate(self, eval_data: dict[str, np.ndarray]) -> dict:
        """Top-1 accuracy of the first output against eval_data["labels"]; returns describe() for the whole set."""
        labels = eval_data.get("labels")
        if labels is None:
            raise UsageError("runtime reram: evaluation data has no 'labels' array")
        feeds = load_data(eval_data, self.model)
        if self._calibration != "final":
            first = next(chunks(feeds, self._chunk))
            self._calibrate(first, "first evaluation batch (no calibration data given)", final=True)
        self._reset()
        with _blas_threads(self.options.threads):
            outputs = [feed_in_chunks(self.executor.run, part, self._fixed_batch)[self.executor.output_names[0]]
                       for part in chunks(feeds, self._chunk)]
        logits = np.concatenate(outputs, axis=0)
        predicted = logits.reshape(logits.shape[0], -1).argmax(axis=1)
        self.accuracy = float(np.mean(predicted == np.asarray(labels).reshape(-1)))
        return self.describe()

    def _reset(self) -> None:
        for layer in self.layers:
            layer.reset_counts()

    def _calibrate(self, feeds: dict[str, np.ndarray], source: str, final: bool) -> None:
        float_layers = [layer for layer in self.layers if layer.spec.input.from_float]
        if float_layers:
            names = sorted({layer.spec.activation_name for layer in float_layers})
            ranges = activation_ranges(self.model, feeds, names, self._chunk)
            for layer in float_layers:
                scale, zero_point = affine_params(*ranges[layer.spec.activation_name], self.options.activation_bits)
                layer.spec.input.scale, layer.spec.input.zero_point = scale, zero_point
        if self.options.adc_range == "calibrated":
            for layer in self.layers:
                layer.observed_max = None
                layer.configure_adc((0,) * layer.slices, layer.adc_bits_source)
            for part in chunks(feeds, self._chunk):
                feed_in_chunks(partial(self.executor.run, observe=True), part, self._fixed_batch)
            for layer, (bits, source_of_bits) in zip(self.layers, self._planned_bits, strict=True):
                layer.configure_adc(bits, source_of_bits)
        self._calibration = "final" if final else "provisional"
        self.calibration_source = source

    def describe(self) -> dict:
        rows = [_layer_report(layer, self.options) for layer in self.layers]
        energy: dict[str, float] = {}
        for row in rows:
            for component, value in row["energy_pj"].items():
                if component != "total":
                    energy[component] = energy.get(component, 0.0) + value
        summary = cost.summarize(energy) if rows else {"total": 0.0}
        conversions = sum(r["adc_conversions"] for r in rows)
        saturated = sum(r["saturated_conversions"] for r in rows)
        macs = sum(r["macs"] for r in rows)
        return {
            "accuracy": self.accuracy,
            "adc_conversions": conversions,
            "saturated_conversions": saturated,
            "saturation_rate": saturated / conversions if conversions else 0.0,
            "energy_pj": summary,
            "adc_energy_share": summary.get("adc", 0.0) / summary["total"] if summary["total"] else None,
            "latency_ns": sum(r["latency_ns"] for r in rows),
            "area_mm2": round(sum(r["area_mm2"] for r in rows), 9),
            "adc_area_mm2": round(sum(r["adc_area_mm2"] for r in rows), 9),
            "arrays": sum(r["arrays"] for r in rows),
            "macs": macs,
            "pj_per_mac": summary["total"] / macs if macs else None,
            "tops_per_w": 2 * macs / summary["total"] if summary["total"] else None,
            "layers": rows,
            "digital": {"ops": dict(self.digital_ops),
                        "declined": [d.as_report() for d in self.declines]},
            "calibration": self.calibration_source,
            "cost_model": cost.SOURCE,
            "settings": self.options.resolved(),
        }


def _blas_threads(threads: int | None):
    """Limit numpy's BLAS threads to `threads` while the emulator runs (no limit when None)."""
    if not threads:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads, user_api="blas")


def _weight_bits(spec: LayerSpec, plan: BitslicePlan, declared: dict[str, int], options: ReramOptions) -> int:
    """Signed bits the weight codes are sliced as: the plan's, else the quantize pass's, else options.weight_bits."""
    if spec.weight_source == "float":
        return options.weight_bits
    entry = plan.find(spec.plan_keys)
    return (entry.bits if entry is not None else None) or declared.get(spec.weight_key) or options.weight_bits


def _resolve_adc_bits(layer: Layer, plan: BitslicePlan, options: ReramOptions) -> tuple[tuple[int, ...], str]:
    """Per-slice ADC bits: explicit options win, then the model's bit-slice plan, then 8 bits."""
    slices = layer.slices
    name = layer.spec.name
    entry = plan.find(layer.spec.plan_keys) if options.adc_bits is None else None
    if options.adc_bits is not None:
        bits, source = options.adc_bits, "options"
    elif entry is not None:
        bits, source = entry.adc_bits, "plan"
        storage = "offset" if options.sign == "offset" else "differential"
        if (entry.cell_bits not in (None, options.cell_bits)) or (entry.sign not in (None, storage)):
            raise UsageError(f"runtime reram: layer {name}: the model's bit-slice plan was made for "
                             f"cell_bits={entry.cell_bits}, sign={entry.sign}; run with those options or give "
                             "adc_bits explicitly")
    else:
        bits, source = (8,), "default"
    if len(bits) == 1:
        bits = bits * slices
    if len(bits) != slices:
        where = "the model's bit-slice plan gives" if source == "plan" else "adc_bits gives"
        listed = "/".join(map(str, bits))
        raise UsageError(f"runtime reram: layer {name} has {slices} weight slices but {where} {len(bits)} ADC "
                         f"resolutions ({listed}); give one value or {slices}, least significant first")
    return tuple(bits), source


def _layer_report(layer: Layer, options: ReramOptions) -> dict:
    spec, counts, xbars = layer.spec, layer.counts, layer.crossbars
    arrays = sum(x.arrays for x in xbars)
    adc_units = sum(x.adc_units for x in xbars)
    full_bits = [max(x.full_bits[s] for x in xbars) for s in range(layer.slices)]
    cost_bits = [b or full for b, full in zip(layer.adc_bits, full_bits, strict=True)]
    per_group = Counts(vectors=counts.vectors // len(xbars), cycles=counts.cycles)
    latency = cost.latency_ns(per_group, xbars[0].groups.reads_per_tile, options)
    energy = cost.summarize(cost.energy_pj(counts, cost_bits, options, latency, arrays))
    conversions = int(counts.conversions.sum())
    saturated = int(counts.saturated.sum())
    cells = sum(x.k * x.m * x.slices * x.physical_planes for x in xbars)
    exact = np.concatenate([x.exact_columns.reshape(-1) for x in xbars])
    return {
        "name": spec.name,
        "op": spec.op_type,
        "weights": spec.weight_source,
        "k": spec.k,
        "m": spec.m,
        "groups": len(xbars),
        "slices": layer.slices,
        "vectors": per_group.vectors,
        "macs": counts.macs,
        "arrays": arrays,
        "adc_units": adc_units,
        "cell_utilization": cells / (arrays * options.rows * options.cols),
        "adc_bits": list(layer.adc_bits),
        "adc_bits_source": layer.adc_bits_source,
        "adc_lsb_cells": [2 ** adc.shift for adc in xbars[0].adc],
        "full_adc_bits": full_bits,
        "adc_bits_needed": [max(x.bits_needed()[s] for x in xbars) for s in range(layer.slices)],
        "fast_path_fraction": float(exact.mean()) if not options.noisy else 0.0,
        "array_reads": counts.array_reads,
        "adc_conversions": conversions,
        "saturated_conversions": saturated,
        "saturated_by_slice": [int(v) for v in counts.saturated],
        "saturation_rate": saturated / conversions if conversions else 0.0,
        "energy_pj": energy,
        "latency_ns": latency,
        "area_mm2": cost.area_mm2(arrays, adc_units, options, cost_bits),
        "adc_area_mm2": cost.adc_area_total(adc_units, cost_bits, options),
        "input_scale": spec.input.scale,
        "input_zero_point": spec.input.zero_point,
    }
