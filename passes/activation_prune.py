"""activation-prune: insert activation-sparsity masks built from standard ONNX ops (JPnet thresholds, DASNet WTA).

A mask sits right after an activation and multiplies it by a 0/1 tensor computed from the activation itself, so
every runtime that runs ONNX runs it, and a zero-skipping engine (or a ReRAM crossbar, whose idle wordlines cost
nothing) saves the MACs that read the zeros. For a Relu output `a` feeding a Conv:

    threshold (JPnet):             a' = a * Cast(Greater(a, t))                      one t per layer
    wta, granularity=channel:      s = ReduceMean(a, spatial axes)  (or ReduceMax)   DASNet winners-take-all:
        (DASNet)                   kth = Slice(TopK(Flatten(s), k).values, last)     the k strongest channels of
                                   a' = a * Unsqueeze(Cast(GreaterOrEqual(Flatten(s), kth)))   each sample survive
    wta, granularity=element:      kth = Slice(TopK(Flatten(a), k).values, last)
                                   a' = a * Reshape(Cast(GreaterOrEqual(Flatten(a), kth)), Shape(a))

Signed activations (LeakyRelu, Gelu, ...) are scored by magnitude (an `Abs` first). The activation keeps its
tensor name (the mask's output takes it over), so consumers and graph outputs need no rewiring.

Selection: by default every ReLU-family output that reaches a Conv/Gemm/MatMul data input, possibly through
pooling and layout ops. `include` (regex on node names) selects any float-valued node output instead; `exclude`
removes matches. Every candidate left out is listed in the report with the reason.

Calibration: per layer, t or k is chosen on the calibration data so that the masked activation's measured
sparsity (fraction of exact zeros, natural zeros included) is as close as possible to the layer's target.
Layers are calibrated in graph order, each with the earlier masks already active, because masking one layer
changes what the next one sees. `scope=uniform` gives every layer the target; `scope=global` cuts all layers at
one magnitude (channel score for channel WTA) chosen so that the element-weighted total meets the target. A layer
whose natural sparsity already exceeds its target keeps it (t = 0, or k keeping every non-zero).

`threshold=T` (threshold method) or `keep=K` (wta, k = ceil(K * units)) fix the parameter instead of calibrating.
With `max_drop` and labelled evaluation data, the targets are scaled down (bisection) until the top-1 accuracy
drop is at most `max_drop` points. Outside a pipeline, without calibration data, seeded random inputs are used.

The report gives per layer: t or k, natural and masked sparsity (calibration data; `eval_sparsity` on evaluation
data), the MACs of the Conv/Gemm/MatMul it feeds and how many of them read a zero before and after masking (per
sample, what a zero-skipping engine skips), and the top-1 drop of that mask alone when labels exist.

A model with nothing to mask is a PassError (a request that cannot be met is an error, not a silent no-op); the
message lists why each candidate was declined.

The inserted masks are recorded in the model's metadata under `sculpt.activation_masks` (a JSON list).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from optimizer.activation_stats import ACTIVATION_MASKS_KEY, ProbeSession, wta_k, zero_skip_macs
from optimizer.data import graph_inputs, random_inputs
from optimizer.declines import Decline
from optimizer.errors import PassError, UsageError
from optimizer.model import default_opset, metadata_value, set_metadata
from optimizer.verify import top1
from passes import Pass, PassContext, PassResult, option, register
from passes.activation_calibration import NP_TYPES, Calibrator, limit_accuracy_drop
from passes.base import compile_regex

RELU_FAMILY = {
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "Clip", "Gelu", "HardSwish",
    "Softplus", "Mish",
}  # fmt: skip
PASS_THROUGH = {
    "MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool", "Flatten", "Reshape", "Transpose", "Identity",
    "Dropout", "Squeeze", "Unsqueeze", "Pad", "Concat",
}  # fmt: skip
COMPUTE = {"Conv", "Gemm", "MatMul"}
MIN_OPSET = 13
METADATA_KEY = ACTIVATION_MASKS_KEY
_INT64_MAX = np.iinfo(np.int64).max


@dataclass
class ComputeUse:
    """A Conv/Gemm/MatMul that reads a masked activation, directly or through pass-through ops."""

    node: str
    op: str
    input: str  # the tensor name at the consumer
    index: int  # which input of the consumer


@dataclass
class MaskSite:
    """One activation to mask. `units` = what WTA ranks per sample: channels (granularity=channel, rank >= 3)
    or features (element granularity, or rank 2); None when the shape is not static."""

    tensor: str
    node: str
    op: str
    elem_type: int
    rank: int | None
    units: int | None
    nonnegative: bool
    consumers: list[ComputeUse] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return f"{self.tensor}/actmask"

    @property
    def param_name(self) -> str:
        return f"{self.prefix}/param"

    @property
    def pre_mask(self) -> str:
        return f"{self.prefix}/input"


@register
class ActivationPrune(Pass):
    name = "activation-prune"
    summary = "inserts activation masks: threshold (JPnet) or winners-take-all top-k (DASNet)"
    contract = "approximate"

    @dataclass(frozen=True)
    class Options:
        method: Literal["threshold", "wta"] = option("threshold", "threshold: y = x*(|x|>t); wta: top-k per sample")
        sparsity: float = option(0.5, "target fraction of zeros per masked activation, in [0, 1)")
        scope: Literal["uniform", "global"] = option("uniform", "same target per layer, or one cut across layers")
        granularity: Literal["channel", "element"] = option(
            "element", "wta: rank single elements per sample, or whole channels by their mean/max (DASNet)"
        )
        score: Literal["mean", "max"] = option("mean", "wta channel score: ReduceMean or ReduceMax over spatial axes")
        threshold: float | None = option(None, "threshold method: fix t for every layer instead of calibrating")
        keep: float | None = option(None, "wta: fix the kept fraction (k = ceil(keep*units)) instead of calibrating")
        max_drop: float | None = option(None, "largest top-1 accuracy drop on --eval, in points; lowers targets")
        include: str = option("", "regex on node names: mask the outputs of these nodes instead of the default")
        exclude: str = option("", "regex on node names: never mask these")

    def validate(self) -> None:
        o = self.options
        if not 0.0 <= o.sparsity < 1.0:
            raise UsageError(f"pass {self.name}: option sparsity={o.sparsity} must be in [0, 1)")
        if o.threshold is not None and (o.method != "threshold" or not 0.0 <= o.threshold < math.inf):
            raise UsageError(f"pass {self.name}: option threshold={o.threshold} needs method=threshold and t >= 0")
        if o.keep is not None and (o.method != "wta" or not 0.0 < o.keep <= 1.0):
            raise UsageError(f"pass {self.name}: option keep={o.keep} needs method=wta and 0 < keep <= 1")
        if o.max_drop is not None:
            if o.max_drop < 0:
                raise UsageError(f"pass {self.name}: option max_drop={o.max_drop} must be >= 0 (accuracy points)")
            if o.threshold is not None or o.keep is not None:
                raise UsageError(f"pass {self.name}: max_drop tunes calibrated targets; drop threshold=/keep=")
        compile_regex(self.name, "include", o.include)
        compile_regex(self.name, "exclude", o.exclude)

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        o = self.options
        opset = default_opset(model)
        if opset < MIN_OPSET:
            raise PassError(
                f"pass {self.name}: the model uses opset {opset}; masks need opset >= {MIN_OPSET} "
                "(convert it first, e.g. onnx.version_converter.convert_version(model, 17))"
            )
        sites, declined = select_sites(model, o)
        if not sites:
            reasons = "; ".join(f"{d['node']}: {d['reason']}" for d in declined[:5]) or "the model has no activations"
            raise PassError(f"pass {self.name}: no activation to mask ({reasons})")
        fixed = o.threshold is not None or o.keep is not None
        if ctx.calibration_is_random and not fixed:
            ctx.warn(f"{self.name}: calibrating masks on random inputs; pass real data with --calibration")
        if ctx.calibration is None:
            calibration = random_inputs(model, batch=8, seed=ctx.seed)
        else:
            calibration = model_feeds(model, ctx.calibration, "calibration")
        evaluation, labels = evaluation_data(model, ctx.evaluation)
        if o.max_drop is not None and labels is None:
            raise UsageError(f"pass {self.name}: max_drop={o.max_drop} needs --eval data with labels")
        probe_model = insert_masks(model, sites, o, opset, params=None)
        probes = [name for s in sites for name in (s.pre_mask, s.tensor, *(u.input for u in s.consumers))]
        session = ProbeSession(probe_model, probes)
        calibrator = Calibrator(session, sites, o, calibration)
        target, search = None if fixed else o.sparsity, []
        if o.threshold is not None:
            params = {s.tensor: o.threshold for s in sites}
        elif o.keep is not None:
            params = {s.tensor: wta_k(o.keep, s.units) for s in sites}
        elif o.max_drop is None:
            params = calibrator.calibrate(o.sparsity)
        else:
            params, target, search = limit_accuracy_drop(calibrator, evaluation, labels, o, ctx)
        masked = insert_masks(model, sites, o, opset, params=params)
        details = {"method": o.method, "scope": o.scope, "requested_sparsity": None if fixed else o.sparsity}
        details["target_sparsity"] = target
        details.update(measure_masks(calibrator, sites, params, evaluation, labels, model))
        details["calibration"] = "random" if ctx.calibration is None or ctx.calibration_is_random else "user"
        details["declined"] = declined
        if search:
            details["max_drop_search"] = search
        record_metadata(masked, model, sites, o, params)
        return PassResult(masked, details)


def model_feeds(model: onnx.ModelProto, data: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    names = [i.name for i in graph_inputs(model)]
    missing = [name for name in names if name not in data]
    if missing:
        raise UsageError(f"the {what} data has no array for model input {missing[0]!r}; it has: {', '.join(data)}")
    return {name: data[name] for name in names}


def evaluation_data(model: onnx.ModelProto, data: dict | None) -> tuple[dict | None, np.ndarray | None]:
    if not data:
        return None, None
    labels = data.get("labels")
    return model_feeds(model, data, "evaluation"), None if labels is None else np.asarray(labels).reshape(-1)


# --- selection -------------------------------------------------------------------------------------------------


def select_sites(model: onnx.ModelProto, options) -> tuple[list[MaskSite], list[dict]]:
    """The activations to mask, in graph order, and a {node, tensor, reason} row for every candidate left out."""
    include = compile_regex(ActivationPrune.name, "include", options.include)
    exclude = compile_regex(ActivationPrune.name, "exclude", options.exclude)
    graph = _GraphFacts(model)
    sites, declined = [], []
    for node in model.graph.node:
        label = node.name or node.output[0]
        if include is not None and not include.search(label):
            continue
        if include is None and node.op_type not in RELU_FAMILY:
            continue
        if exclude is not None and exclude.search(label):
            outcome = _decline(node, label, "excluded", f"excluded by exclude={options.exclude!r}")
        else:
            outcome = _site_or_reason(node, label, graph, options, default_selection=include is None)
        if isinstance(outcome, MaskSite):
            sites.append(outcome)
        else:
            declined.append({**outcome.as_report(), "tensor": node.output[0]})
    return sites, declined


class _GraphFacts:
    """Inferred types and shapes, constant initializers and the readers of every tensor."""

    def __init__(self, model: onnx.ModelProto):
        self.types, self.shapes = _value_infos(_infer(model))
        self.constants = {init.name: init for init in model.graph.initializer}
        self.readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in model.graph.node:
            for index, name in enumerate(node.input):
                self.readers.setdefault(name, []).append((node, index))


def _site_or_reason(node: onnx.NodeProto, label: str, graph: _GraphFacts, options, default_selection: bool
                    ) -> MaskSite | Decline:
    tensor = node.output[0]
    if tensor.endswith("/actmask/input"):
        return _decline(node, label, "already-masked", "already masked by an earlier activation-prune run")
    if graph.types.get(tensor) not in NP_TYPES:
        return _decline(node, label, "not-float", "output is not float32/float16/float64 (or its type is unknown)")
    uses, others = _compute_uses(tensor, graph.readers)
    if default_selection and not uses:
        return _decline(node, label, "no-compute-reader",
                        f"feeds no Conv/Gemm/MatMul (consumers: {', '.join(sorted(others)) or 'graph output only'})")
    shape = graph.shapes.get(tensor)
    units = _wta_units(shape, options.granularity)
    if options.method == "wta" and units is None:
        return _decline(node, label, "dynamic-shape",
                        "wta needs a static rank >= 2 and static non-batch dimensions; use method=threshold")
    rank = None if shape is None else len(shape)
    nonnegative = _is_nonnegative(node, graph.constants)
    return MaskSite(tensor, label, node.op_type, graph.types[tensor], rank, units, nonnegative, uses)


def _decline(node: onnx.NodeProto, label: str, code: str, why: str) -> Decline:
    return Decline(label, node.op_type, code, why)


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # onnx raises several types; the message is what the user needs
        raise PassError(f"pass activation-prune: shape inference failed ({str(e).splitlines()[0]})") from e


def _value_infos(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, list]]:
    types, shapes = {}, {}
    for info in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        tensor_type = info.type.tensor_type
        if not info.type.HasField("tensor_type"):
            continue
        types[info.name] = tensor_type.elem_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    return types, shapes


def _compute_uses(tensor: str, consumers: dict) -> tuple[list[ComputeUse], set[str]]:
    """Conv/Gemm/MatMul reading `tensor` through pass-through ops, and the op types of every other reader."""
    uses, others, frontier, seen = [], set(), [tensor], set()
    while frontier:
        name = frontier.pop()
        for node, index in consumers.get(name, []):
            if node.op_type in COMPUTE:
                uses.append(ComputeUse(node.name or node.output[0], node.op_type, name, index))
            elif node.op_type in PASS_THROUGH and node.output[0] not in seen:
                seen.add(node.output[0])
                frontier.append(node.output[0])
            elif node.op_type not in PASS_THROUGH:
                others.add(node.op_type)
    return uses, others


def _wta_units(shape: list | None, granularity: str) -> int | None:
    if shape is None or len(shape) < 2 or any(d is None or d <= 0 for d in shape[1:]):
        return None
    if granularity == "channel" and len(shape) >= 3:
        return shape[1]
    return int(np.prod(shape[1:]))


def _is_nonnegative(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> bool:
    """True when the op cannot output negative values, so its magnitude is itself (no Abs needed)."""
    if node.op_type in ("Relu", "Softplus"):
        return True
    if node.op_type == "ThresholdedRelu":
        alpha = next((a.f for a in node.attribute if a.name == "alpha"), 1.0)
        return alpha >= 0
    if node.op_type == "Clip" and len(node.input) > 1 and node.input[1] in constants:
        return float(onnx.numpy_helper.to_array(constants[node.input[1]])) >= 0
    return False


# --- graph edit ------------------------------------------------------------------------------------------------


def insert_masks(model: onnx.ModelProto, sites: list[MaskSite], options, opset: int, *, params) -> onnx.ModelProto:
    """A copy of `model` with a mask after every site. `params` maps tensor -> t or k; None makes every parameter
    a graph input (named `site.param_name`) so one session can calibrate all layers."""
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    for site in sites:
        dtype = NP_TYPES[site.elem_type]
        if params is None:
            is_k = options.method == "wta"
            param = gs.Variable(site.param_name, dtype=np.int64 if is_k else dtype, shape=[1] if is_k else [])
            graph.inputs.append(param)
        elif options.method == "wta":
            param = gs.Constant(site.param_name, np.array([params[site.tensor]], dtype=np.int64))
        else:
            param = gs.Constant(site.param_name, np.array(params[site.tensor], dtype=dtype))
        _insert_mask(graph, tensors[site.tensor], site, options, param, opset)
    graph.cleanup().toposort()
    masked = gs.export_onnx(graph)
    masked.ir_version = model.ir_version
    masked.metadata_props.extend(model.metadata_props)
    return masked


def _insert_mask(graph: gs.Graph, tensor: gs.Variable, site: MaskSite, options, param: gs.Tensor, opset: int) -> None:
    producer = tensor.inputs[0]
    pre = gs.Variable(site.pre_mask, dtype=tensor.dtype, shape=tensor.shape)
    producer.outputs[producer.outputs.index(tensor)] = pre
    ops = _MaskBuilder(graph, site.prefix, opset)
    magnitude = pre if site.nonnegative else ops.add("Abs", [pre])
    if options.method == "threshold":
        mask = ops.add("Cast", [ops.add("Greater", [magnitude, param])], to=site.elem_type)
    elif options.granularity == "channel" and site.rank >= 3:
        spatial = list(range(2, site.rank))
        score = ops.reduce("ReduceMean" if options.score == "mean" else "ReduceMax", magnitude, spatial)
        flat = ops.add("Flatten", [score], axis=1)
        keep = ops.add("GreaterOrEqual", [flat, ops.kth_largest(flat, param)])
        mask = ops.add("Unsqueeze", [ops.add("Cast", [keep], to=site.elem_type), ops.ints("axes", spatial)])
    else:
        flat = magnitude if site.rank == 2 else ops.add("Flatten", [magnitude], axis=1)
        keep = ops.add("GreaterOrEqual", [flat, ops.kth_largest(flat, param)])
        mask = ops.add("Cast", [keep], to=site.elem_type)
        if site.rank != 2:
            mask = ops.add("Reshape", [mask, ops.add("Shape", [pre])])
    graph.nodes.append(gs.Node("Mul", f"{site.prefix}/Mul", inputs=[pre, mask], outputs=[tensor]))


class _MaskBuilder:
    """Appends uniquely named nodes (`<tensor>/actmask/<Op>`) to a graph; opset-aware where ops changed."""

    def __init__(self, graph: gs.Graph, prefix: str, opset: int):
        self.graph, self.prefix, self.opset = graph, prefix, opset
        self.count: dict[str, int] = {}

    def _name(self, base: str) -> str:
        self.count[base] = self.count.get(base, 0) + 1
        return f"{self.prefix}/{base}" if self.count[base] == 1 else f"{self.prefix}/{base}_{self.count[base]}"

    def ints(self, what: str, values: list[int]) -> gs.Constant:
        return gs.Constant(self._name(what), np.array(values, dtype=np.int64))

    def add(self, op: str, inputs: list, n_outputs: int = 1, **attrs) -> gs.Variable:
        name = self._name(op)
        outputs = [gs.Variable(name if i == 0 else f"{name}:{i}") for i in range(n_outputs)]
        self.graph.nodes.append(gs.Node(op, name, attrs=attrs, inputs=inputs, outputs=outputs))
        return outputs[0]

    def reduce(self, op: str, x: gs.Tensor, axes: list[int]) -> gs.Variable:
        if self.opset >= 18:
            return self.add(op, [x, self.ints("axes", axes)], keepdims=1)
        return self.add(op, [x], axes=axes, keepdims=1)

    def kth_largest(self, flat: gs.Tensor, k: gs.Tensor) -> gs.Variable:
        """[N, 1]: each row's k-th largest value (the smallest winner); ties with it also win."""
        values = self.add("TopK", [flat, k], n_outputs=2, axis=1, largest=1, sorted=1)
        starts, ends, axes = self.ints("starts", [-1]), self.ints("ends", [_INT64_MAX]), self.ints("axes", [1])
        return self.add("Slice", [values, starts, ends, axes])


def record_metadata(masked: onnx.ModelProto, original: onnx.ModelProto, sites, options, params) -> None:
    """Append this run's masks to `sculpt.activation_masks`, so later stages (runtimes, reports) can find them."""
    entries = json.loads(metadata_value(original, METADATA_KEY) or "[]")
    for site in sites:
        entry = {"tensor": site.tensor, "node": site.node, "method": options.method}
        if options.method == "wta":
            entry.update(granularity=options.granularity, k=int(params[site.tensor]), units=site.units)
            if options.granularity == "channel" and site.rank >= 3:
                entry["score"] = options.score
        else:
            entry["threshold"] = float(params[site.tensor])
        entries.append(entry)
    set_metadata(masked, METADATA_KEY, json.dumps(entries))


# --- report ----------------------------------------------------------------------------------------------------


def measure_masks(calibrator: Calibrator, sites: list[MaskSite], params, evaluation, labels, model) -> dict:
    """Per layer: parameter, natural and masked sparsity (calibration data, and evaluation data when given), the
    MACs of the Conv/Gemm/MatMul it feeds and how many of them read a zero before and after masking (per sample),
    and the top-1 drop of masking that layer alone when labels exist. Totals count each consumer once."""
    before, after = calibrator.unmasked(), calibrator.run(calibrator.feeds, params)
    nodes = {node.name or node.output[0]: node for node in model.graph.node}
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    layers, consumer_macs = [], {}
    for site in sites:
        row = {"tensor": site.tensor, "node": site.node, "op": site.op, "shape": list(after[site.tensor].shape[1:])}
        row.update(_param_row(site, params[site.tensor]))
        row["natural_sparsity"] = _zero_fraction(before[site.pre_mask])
        row["sparsity"] = _zero_fraction(after[site.tensor])
        row["consumers"] = [use.node for use in site.consumers]
        row.update(macs=0.0, skipped_macs_natural=0.0, skipped_macs=0.0)
        for use in site.consumers:
            natural = zero_skip_macs(nodes[use.node], use.index, before[use.input], constants)
            masked = zero_skip_macs(nodes[use.node], use.index, after[use.input], constants)
            if "note" in masked:
                row.setdefault("notes", []).append(masked["note"])
                continue
            consumer_macs[(use.node, use.index)] = (masked["macs"], natural["skipped_macs"], masked["skipped_macs"])
            row["macs"] += masked["macs"]
            row["skipped_macs_natural"] += natural["skipped_macs"]
            row["skipped_macs"] += masked["skipped_macs"]
        layers.append(row)
    elements = sum(after[s.tensor].size for s in sites)
    details = {
        "layers": layers,
        "activation_sparsity": sum(after[s.tensor].size * r["sparsity"] for s, r in zip(sites, layers, strict=True))
        / elements,
        "macs": sum(m[0] for m in consumer_macs.values()),
        "skipped_macs_natural": sum(m[1] for m in consumer_macs.values()),
        "skipped_macs": sum(m[2] for m in consumer_macs.values()),
    }
    if evaluation is not None:
        details.update(_measure_evaluation(calibrator, sites, params, evaluation, labels, layers))
    return details


def _measure_evaluation(calibrator: Calibrator, sites, params, evaluation, labels, layers) -> dict:
    masked = calibrator.run(evaluation, params)
    for site, row in zip(sites, layers, strict=True):
        row["eval_sparsity"] = _zero_fraction(masked[site.tensor])
    zeros = sum(np.count_nonzero(masked[s.tensor] == 0) for s in sites)
    facts = {"eval_activation_sparsity": float(zeros / sum(masked[s.tensor].size for s in sites))}
    if labels is None:
        return facts
    output = calibrator.session.output_names[0]
    baseline = top1(calibrator.run(evaluation, calibrator.disabled())[output], labels)
    accuracy = top1(masked[output], labels)
    for site, row in zip(sites, layers, strict=True):
        alone = {**calibrator.disabled(), site.tensor: params[site.tensor]}
        row["accuracy_drop"] = 100.0 * (baseline - top1(calibrator.run(evaluation, alone)[output], labels))
    facts["accuracy"] = {"before": baseline, "after": accuracy, "drop": 100.0 * (baseline - accuracy)}
    return facts


def _param_row(site: MaskSite, param) -> dict:
    if isinstance(param, (int, np.integer)):
        return {"k": int(param), "units": site.units, "keep": int(param) / site.units}
    return {"threshold": float(param)}


def _zero_fraction(values: np.ndarray) -> float:
    return float(np.count_nonzero(values == 0) / max(values.size, 1))
