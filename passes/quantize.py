"""`quantize`: weights and activations to integers, written as standard QDQ ONNX that any runtime runs.

Weights of Conv, Gemm and MatMul (constant operand) become b-bit signed integer initializers (int8 containers,
codes in ±(2^(b-1) − 1), zero point 0) followed by DequantizeLinear — per tensor, or per output channel with
the `axis` attribute. `scale=dfp` uses dynamic fixed point: the scale is exactly 2^-fl (a float32 power of
two) with fractional length fl; `scale=affine` uses a real-valued symmetric scale.

Activations are 8 bits, calibrated on ctx.calibration (minmax, percentile or MSE). The float inputs of those
nodes — and, with `outputs=true`, their outputs (after a ReLU that is their only reader) — get a
QuantizeLinear → DequantizeLinear pair: dfp activations are uint8 (non-negative range, e.g. after ReLU) or int8,
zero point 0, scale 2^-fl; affine activations are uint8 with a zero point. A 1-D bias becomes int32 with scale
s_x · s_w (2^-(fl_x + fl_w) for dfp). Together that is the standard QDQ form ONNX Runtime fuses into
QLinearConv / QGemm. The graph surgery lives in passes/graph/qdq.py, the numbers in optimizer/quant.py.

`magnitude_bits=8` writes the bit-slice L1 authors' weight format instead (methods.md §4): sign plus an 8-bit
magnitude, scale 2^(s-8) with s = ceil(log2 max|w|) (per tensor or channel; a magnitude of 256 at |w| = 2^s is
saturated to 255 so that it fits four 2-bit cells). The codes, ±255, need 9 bits. They are stored as an **int16**
initializer -> DequantizeLinear (opset 21, the first to accept int16; the model is converted), not as a pair of
uint8 magnitudes w+, w- joined by Sub: one standard QDQ weight that ONNX Runtime, `bit-slice` and the reram
runtime read like any other integer weight, the same 2 bytes per weight as the pair, and the positive/negative
crossbar split stays where it belongs, in the runtime (runtimes/reram splits w+ and w- itself). Activations and
biases are as above. Metadata "bits" is then 9 (magnitude + sign) and "format" "sign-magnitude".

Toy example, one Conv with W in [-0.3, 0.6], 8 bits, dfp, per tensor, input x in [0, 1]:
  W: fl = 7 (0.6 · 2^7 = 76.8 ≤ 127), W_q = round(W · 128) int8, DequantizeLinear(W_q, 2^-7, 0)
  x: unsigned, fl = 7 (1 · 2^8 = 256 > 255), QuantizeLinear(x, 2^-7, uint8 0) → DequantizeLinear
  Conv(DQ(Q(x)), DQ(W_q), DQ(round(B · 2^14) int32, 2^-14))

The model's metadata_props gets "sculpt.quant" (JSON), read by `bit-slice` and the reram runtime:
  {"version": 1, "scale": "dfp"|"affine", "granularity": "tensor"|"channel", "activation_bits": 8,
   "weights": {INT_INITIALIZER: {"node", "float_weight", "bits", "axis" (int|null), "format" ("sign-magnitude" only),
                                 "frac_length" (int|[int]|null)}},
   "activations": {TENSOR: {"dtype": "uint8"|"int8", "scale", "zero_point", "frac_length" (int|null)}}}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from optimizer import quant
from optimizer.errors import UsageError
from optimizer.verify import top1
from passes import Pass, PassContext, PassResult, option, register
from passes.base import compile_regex
from passes.graph.qdq import METADATA_KEY, QdqPlan, Site, find_sites, input_tensors, insert_qdq, output_tensors, plain

ACTIVATION_BITS = 8
WEIGHT_BITS = range(4, 9)
MAGNITUDE_BITS = range(2, 15)  # sign-magnitude codes live in int16
INT16_OPSET = 21  # the first opset whose DequantizeLinear takes int16
# Calibration keeps every exact min/max, but at most this many values per tensor for percentile / MSE searches.
SAMPLE_CAP = 1 << 20
CALIBRATION_BATCH = 64
RANDOM_CALIBRATION_BATCH = 8
RANDOM_WARNING = "quantize: no --calibration data; activation ranges come from random inputs"


# --- the pass ------------------------------------------------------------------------------------------------------


@register
class Quantize(Pass):
    name = "quantize"
    summary = "dynamic fixed-point (power-of-two scale) or affine int weights and 8-bit activations, as QDQ ONNX"
    contract = "approximate"

    @dataclass(frozen=True)
    class Options:
        bits: int = option(8, "weight bits, 4-8 (signed, symmetric: codes in ±(2^(bits-1) - 1))")
        scale: Literal["dfp", "affine"] = option("dfp", "dfp: power-of-two scales 2^-fl | affine: real-valued scales")
        granularity: Literal["tensor", "channel"] = option("channel", "one weight scale per tensor or per out channel")
        weight_range: Literal["max", "percentile", "mse"] = option("max", "weight range: max|w|, percentile or MSE")
        calibrate: Literal["minmax", "percentile", "mse"] = option("minmax", "activation range from calibration data")
        percentile: float = option(99.99, "percentile of |x| used by weight_range/calibrate=percentile")
        outputs: bool = option(True, "also quantize layer outputs (after ReLU) so ONNX Runtime fuses every layer")
        exclude: str | None = option(None, "regular expression of node names to leave in float")
        magnitude_bits: int | None = option(
            None, "sign-magnitude weights with this many magnitude bits and the bit-slice L1 authors' scale "
                  "2^(ceil(log2 max|w|) - magnitude_bits), as int16 codes (opset 21); 8 is their format; "
                  "default: `bits`-bit symmetric int8")

    def validate(self) -> None:
        o = self.options
        if o.bits not in WEIGHT_BITS:
            raise UsageError(f"pass quantize: option bits={o.bits} is not supported; use 4, 5, 6, 7 or 8")
        if not 50.0 < o.percentile <= 100.0:
            raise UsageError(f"pass quantize: option percentile={o.percentile} must be in (50, 100]")
        compile_regex(self.name, "exclude", o.exclude)
        if o.magnitude_bits is not None:
            if o.magnitude_bits not in MAGNITUDE_BITS:
                raise UsageError(f"pass quantize: option magnitude_bits={o.magnitude_bits} is not supported; "
                                 "use 2 to 14")
            if o.scale != "dfp":
                raise UsageError("pass quantize: option magnitude_bits needs scale=dfp (the format's scale is a power "
                                 f"of two), not scale={o.scale}")

    @property
    def weight_bits(self) -> int:
        """Signed bits of the weight codes: `bits`, or magnitude plus sign."""
        o = self.options
        return o.bits if o.magnitude_bits is None else o.magnitude_bits + 1

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        from optimizer.model import upgrade_opset

        original = model
        model = onnx.ModelProto()
        model.CopyFrom(upgrade_opset(original, "quantize input"))
        if self.options.magnitude_bits is not None:
            model = _opset_for_int16(model)
        sites, declines = find_sites(model, compile_regex(self.name, "exclude", self.options.exclude))
        _warn_unfolded_batchnorm(model, sites, ctx)
        feeds = self._calibration_feeds(model, ctx)
        outputs = output_tensors(model, sites) if self.options.outputs else {}
        activation_names = list(dict.fromkeys([*input_tensors(model, sites), *outputs.values()]))
        ctx.report_progress("quantize: calibrating activations", 0.0)
        stats, float_outputs = collect_activations(model, feeds, activation_names, ctx.seed)
        activations = {name: self._activation_grid(observer) for name, observer in stats.items()}
        weights = {}
        for site in sites:
            if site.weight_input is not None and site.node.input[site.weight_input] not in weights:
                weights[site.node.input[site.weight_input]] = self._weight_grid(model, site)
        ctx.report_progress("quantize: rewriting the graph", 0.8)
        o = self.options
        plan = QdqPlan(sites, weights, activations, outputs, self.weight_bits, o.scale, o.granularity,
                       "int" if o.magnitude_bits is None else "sign-magnitude")
        metadata, float_biases = insert_qdq(model, plan)
        quantized_outputs = _run(model, feeds)
        details = self._report(plan, declines, metadata)
        details["float_biases"] = [d.as_report() for d in float_biases]
        _warn_declines(declines, ctx)
        details["calibration"] = {
            "samples": _batch_size(feeds),
            "random": ctx.calibration is None or ctx.calibration_is_random,
            "method": self.options.calibrate,
        }
        details["output"] = _compare(float_outputs, quantized_outputs)
        if ctx.evaluation is not None and "labels" in ctx.evaluation:
            details["accuracy"] = _accuracies(original, model, ctx.evaluation)
        ctx.report_progress("quantize: done", 1.0)
        return PassResult(model, details)

    def _calibration_feeds(self, model: onnx.ModelProto, ctx: PassContext) -> dict[str, np.ndarray]:
        from optimizer.data import graph_inputs, random_inputs

        if ctx.calibration is None or ctx.calibration_is_random:
            ctx.warn(RANDOM_WARNING)
        if ctx.calibration is None:
            return random_inputs(model, batch=RANDOM_CALIBRATION_BATCH, seed=ctx.seed)
        names = [i.name for i in graph_inputs(model)]
        missing = [n for n in names if n not in ctx.calibration]
        if missing:
            raise UsageError(f"pass quantize: the calibration data has no array for model input {missing[0]!r}")
        return {n: ctx.calibration[n] for n in names}

    def _activation_grid(self, observer: quant.RangeObserver) -> quant.ActivationGrid:
        method = "max" if self.options.calibrate == "minmax" else self.options.calibrate
        return quant.activation_grid(
            observer.values(), self.options.scale, method=method, percentile=self.options.percentile
        )

    def _weight_grid(self, model: onnx.ModelProto, site: Site) -> quant.WeightGrid:
        o = self.options
        name = site.node.input[site.weight_input]
        w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))
        axis = site.channel_axis if o.granularity == "channel" else None
        if o.magnitude_bits is not None:
            return quant.magnitude_grid(w, o.magnitude_bits, axis=axis, method=o.weight_range, percentile=o.percentile)
        return quant.weight_grid(w, o.bits, o.scale, axis=axis, method=o.weight_range, percentile=o.percentile)

    def _report(self, plan: QdqPlan, declines: list, metadata: dict) -> dict:
        o = self.options
        weights, activations = plan.weights, plan.activations
        layers = []
        for site in plan.sites:
            node = site.node
            row: dict = {"node": node.name, "op": node.op_type}
            if site.weight_input is not None:
                weight = node.input[site.weight_input]
                params = weights[weight]
                row |= {
                    "weight": weight,
                    "bits": self.weight_bits,
                    "scale": _summarize(params.scale.astype(np.float64)),
                    "weight_error": round(params.error, 6),
                }
                if params.frac_length is not None:
                    row["frac_length"] = plain(params.frac_length, params.axis)
            row["activations"] = [
                _activation_row(node.input[i], activations[node.input[i]])
                for i in site.activation_inputs
                if node.input[i] in activations
            ]
            errors = [a["error"] for a in row["activations"]]
            row["activation_error"] = max(errors) if errors else None
            output = plan.layer_outputs.get(site.index)
            if output in activations:
                row["output"] = _activation_row(output, activations[output])
            layers.append(row)
        return {
            "scale": o.scale,
            "granularity": o.granularity,
            "bits": self.weight_bits,
            "weight_format": "int" if o.magnitude_bits is None else "sign-magnitude",
            "magnitude_bits": o.magnitude_bits,
            "activation_bits": ACTIVATION_BITS,
            "layers": layers,
            "declined": [d.as_report() for d in declines],
            "metadata_key": METADATA_KEY,
            "quantized_weights": len(metadata["weights"]),
            "quantized_activations": len(metadata["activations"]),
        }


def _warn_declines(declines: list, ctx: PassContext) -> None:
    """One line for the nodes left in float that the user did not exclude (the report lists every one)."""
    left = [d for d in declines if d.code != "excluded"]
    if left:
        more = f" and {len(left) - 1} more" if len(left) > 1 else ""
        ctx.warn(f"quantize: {left[0].op} {left[0].node!r} stays float ({left[0].why}){more}; "
                 "see 'declined' in the report")


def _opset_for_int16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnx import version_converter

    from optimizer.errors import ModelError
    from optimizer.model import default_opset

    if default_opset(model) >= INT16_OPSET:
        return model
    try:
        return version_converter.convert_version(model, INT16_OPSET)
    except Exception as e:  # the converter raises plain RuntimeError/ValueError for unsupported adapters
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"pass quantize: magnitude_bits needs opset {INT16_OPSET} (int16 DequantizeLinear) and the "
                         f"model (opset {default_opset(model)}) could not be converted: {first_line}") from e


def _warn_unfolded_batchnorm(model: onnx.ModelProto, sites: list[Site], ctx: PassContext) -> None:
    """Quantizing before BN folding quantizes the wrong weights: the folded ones are what a crossbar stores."""
    readers = {name for node in model.graph.node if node.op_type == "BatchNormalization" for name in node.input[:1]}
    before_bn = [s.node.name for s in sites if s.node.output[0] in readers]
    if before_bn:
        more = f" and {len(before_bn) - 1} more" if len(before_bn) > 1 else ""
        ctx.warn(
            f"quantize: BatchNormalization follows {before_bn[0]!r}{more}; run the cleanup pass first "
            "so that the folded weights are quantized"
        )


def _activation_row(name: str, params: quant.ActivationGrid) -> dict:
    row = {
        "tensor": name,
        "dtype": params.dtype,
        "scale": params.scale,
        "zero_point": params.zero_point,
        "error": round(params.error, 6),
    }
    if params.frac_length is not None:
        row["frac_length"] = int(params.frac_length)
    return row


def _summarize(values: np.ndarray) -> float | list[float]:
    return float(values[0]) if values.size == 1 else [float(values.min()), float(values.max())]


# --- calibration -----------------------------------------------------------------------------------------------


def _batch_size(feeds: dict[str, np.ndarray]) -> int:
    return min((len(v) for v in feeds.values() if np.ndim(v)), default=1)


def _chunk(model: onnx.ModelProto) -> int:
    """Rows per ORT call: the model's fixed batch size where it has one, else CALIBRATION_BATCH."""
    from optimizer.data import fixed_batch, graph_inputs

    return fixed_batch(graph_inputs(model)) or CALIBRATION_BATCH


def _batches(model: onnx.ModelProto, feeds: dict[str, np.ndarray]):
    from optimizer.data import batches

    return list(batches(feeds, _chunk(model))) if feeds else [{}]


def collect_activations(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str], seed: int
) -> tuple[dict[str, quant.RangeObserver], dict[str, np.ndarray]]:
    """Run the float model once over the calibration feeds; return statistics of `names` and the model outputs.

    Only float32 tensors are collected (the others are not quantized).
    """
    from optimizer.activation_stats import ProbeSession, tensor_types

    types = tensor_types(model)
    names = [n for n in names if types.get(n) == TensorProto.FLOAT]
    session = ProbeSession(model, [n for n in names if n not in feeds], threads=1)
    outputs = [o.name for o in model.graph.output]
    chunks = _batches(model, feeds)
    rng = np.random.default_rng(seed)
    stats = {n: quant.RangeObserver() for n in names}
    per_batch = max(1, SAMPLE_CAP // len(chunks))
    collected: dict[str, list[np.ndarray]] = {n: [] for n in outputs}
    for chunk in chunks:
        results = session.run(chunk)
        for n in names:
            stats[n].add(chunk[n] if n in chunk else results[n], per_batch, rng)
        for n in outputs:
            collected[n].append(results[n])
    return stats, {n: np.concatenate(v) for n, v in collected.items()}


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from optimizer.activation_stats import ProbeSession

    session = ProbeSession(model, [], threads=1)
    results = [session.run(chunk) for chunk in _batches(model, feeds)]
    return {o.name: np.concatenate([r[o.name] for r in results]) for o in model.graph.output}


def _compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict:
    from optimizer.verify import compare

    return compare(reference, candidate)


def _accuracies(original: onnx.ModelProto, quantized: onnx.ModelProto, evaluation: dict[str, np.ndarray]) -> dict:
    from optimizer.data import split_labels

    feeds, labels = split_labels(evaluation)
    scores = {}
    for key, model in (("float", original), ("quantized", quantized)):
        scores[key] = top1(next(iter(_run(model, feeds).values())), labels)
    scores["delta_pt"] = round(100.0 * (scores["quantized"] - scores["float"]), 3)
    return scores
