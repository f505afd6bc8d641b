"""The QDQ graph surgery behind `quantize`: which nodes carry weights, and inserting Q/DQ nodes.

A *site* is a Conv, Gemm or MatMul to quantize: its constant weight input (if any) with the output-channel axis
DequantizeLinear per-channel scales run along, and its activation inputs. Toy example, a Conv fed by a ReLU:

    relu ─► Conv(x, W, B)          Site(index=3, weight_input=1, channel_axis=0, activation_inputs=(0,))
    becomes
    relu ─► Q ─► DQ ─► Conv(·, DQ(W_q int8), DQ(B_q int32))

New nodes go right before the first node that reads them (site inputs, weights, biases) or right after the node
that produces them (layer outputs), so the node list stays topologically sorted. Nothing is deleted except
float initializers that no node reads any more.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from optimizer import quant
from optimizer.declines import Decline
from optimizer.model import metadata_value, set_metadata

METADATA_KEY = quant.QUANT_METADATA_KEY


@dataclass(frozen=True)
class Site:
    """A node to quantize: its constant weight input (with the output-channel axis) and its activation inputs."""

    index: int
    node: onnx.NodeProto
    weight_input: int | None
    channel_axis: int | None
    activation_inputs: tuple[int, ...]


# --- which nodes carry weights, and which axis is their output channel --------------------------------------------


def _conv_site(index: int, node: onnx.NodeProto, constants: set[str]) -> Site | Decline:
    if node.input[1] not in constants:
        return Site(index, node, None, None, (0, 1))
    return Site(index, node, 1, 0, (0,))


def _gemm_site(index: int, node: onnx.NodeProto, constants: set[str]) -> Site | Decline:
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    if node.input[0] in constants and node.input[1] not in constants:
        return Decline(node.name, node.op_type, "constant-activation",
                       "a constant A operand is not supported (only a constant B is a crossbar weight)")
    if node.input[1] not in constants:
        return Site(index, node, None, None, (0, 1))
    return Site(index, node, 1, 0 if trans_b else 1, (0,))


def _matmul_site(index: int, node: onnx.NodeProto, constants: set[str]) -> Site | Decline:
    if node.input[0] in constants and node.input[1] not in constants:
        return Decline(node.name, node.op_type, "constant-activation", "a constant first operand is not supported "
                       "(only a constant second operand is a crossbar weight)")
    if node.input[1] not in constants:
        return Site(index, node, None, None, (0, 1))
    return Site(index, node, 1, 1, (0,))


SITE_HANDLERS = {"Conv": _conv_site, "Gemm": _gemm_site, "MatMul": _matmul_site}
NOT_HANDLED = {  # op -> (code, why)
    "ConvTranspose": ("not-handled", "ConvTranspose weights ([C_in, C_out/group, ...]) are not quantized yet"),
    "QLinearConv": ("already-quantized", "already quantized"),
    "QLinearMatMul": ("already-quantized", "already quantized"),
    "ConvInteger": ("already-quantized", "already quantized"),
    "MatMulInteger": ("already-quantized", "already quantized"),
    "GRU": ("recurrent", "recurrent (GRU) weights are not quantized; the node stays float"),
    "LSTM": ("recurrent", "recurrent (LSTM) weights are not quantized; the node stays float"),
    "RNN": ("recurrent", "recurrent (RNN) weights are not quantized; the node stays float"),
}


# --- graph analysis ------------------------------------------------------------------------------------------------


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _float_constants(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}


def find_sites(model: onnx.ModelProto, exclude=None) -> tuple[list[Site], list[Decline]]:
    """Every node to quantize, and a reason for every Conv/Gemm/MatMul-like node that is left alone."""
    constants = _float_constants(model)
    all_constants = {t.name for t in model.graph.initializer}
    dequantized = {out for node in model.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    sites, declines = [], []
    for index, node in enumerate(model.graph.node):
        if node.op_type in NOT_HANDLED:
            declines.append(Decline(node.name, node.op_type, *NOT_HANDLED[node.op_type]))
            continue
        inside = _weighted_ops_in_subgraphs(node)
        if inside:
            why = f"its subgraph bodies are not quantized: {inside} Conv/Gemm/MatMul nodes inside stay float"
            declines.append(Decline(node.name, node.op_type, "subgraph", why))
            continue
        handler = SITE_HANDLERS.get(node.op_type)
        if handler is None or node.domain not in ("", "ai.onnx"):
            continue  # not a weight op: nothing to quantize, nothing to report
        if any(name in dequantized for name in node.input):
            declines.append(
                Decline(node.name, node.op_type, "already-quantized",
                        "already quantized (an input comes from DequantizeLinear)")
            )
            continue
        if exclude is not None and exclude.search(node.name):
            declines.append(Decline(node.name, node.op_type, "excluded", "excluded by the exclude option"))
            continue
        site = handler(index, node, all_constants)
        if isinstance(site, Decline):
            declines.append(site)
        elif site.weight_input is not None and node.input[site.weight_input] not in constants:
            declines.append(Decline(node.name, node.op_type, "not-float32", "the weight initializer is not float32"))
        else:
            sites.append(site)
    return sites, declines


def _weighted_ops_in_subgraphs(node: onnx.NodeProto) -> int:
    """How many Conv/Gemm/MatMul-like nodes the node's subgraphs (If/Loop/Scan bodies) hold, nested ones too."""
    count = 0
    for attribute in node.attribute:
        for graph in ([attribute.g] if attribute.HasField("g") else list(attribute.graphs)):
            for inner in graph.node:
                count += (inner.op_type in SITE_HANDLERS) + _weighted_ops_in_subgraphs(inner)
    return count


def input_tensors(model: onnx.ModelProto, sites: list[Site]) -> list[str]:
    """Distinct activation tensors read by the sites, in graph order (constants are never activations)."""
    constants = {t.name for t in model.graph.initializer}
    names: list[str] = []
    for site in sites:
        for index in site.activation_inputs:
            name = site.node.input[index]
            if name and name not in constants and name not in names:
                names.append(name)
    return names


def output_tensors(model: onnx.ModelProto, sites: list[Site]) -> dict[int, str]:
    """Site index -> its output, or the output of the Relu that is its only reader; graph outputs stay float.

    Quantizing the layer output (after its ReLU, as onnxruntime's quantizer does) gives every Conv/Gemm the
    DQ → op → Q shape that ONNX Runtime fuses into QLinearConv / QGemm.
    """
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}
    names: dict[int, str] = {}
    for site in sites:
        name = site.node.output[0]
        after = readers.get(name, [])
        if len(after) == 1 and after[0].op_type == "Relu" and name not in graph_outputs:
            name = after[0].output[0]
        if name not in graph_outputs:
            names[site.index] = name
    return names


def plain(values: np.ndarray, axis: int | None) -> int | list[int]:
    """Per-tensor values as one int, per-channel values as a list (for JSON)."""
    return int(values[0]) if axis is None else [int(v) for v in values]


# --- graph rewrite -----------------------------------------------------------------------------------------------


class _Names:
    """Fresh tensor / node names that collide with nothing in the graph."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.used = {t.name for t in graph.initializer} | {v.name for v in [*graph.input, *graph.output]}
        for node in graph.node:
            self.used.update([*node.input, *node.output, node.name])

    def fresh(self, base: str) -> str:
        name, index = base, 1
        while name in self.used:
            name, index = f"{base}_{index}", index + 1
        self.used.add(name)
        return name


def _still_read(model: onnx.ModelProto, name: str) -> bool:
    """Whether a tensor is still read by some node (subgraphs included) or is a graph output."""

    def reads(graph: onnx.GraphProto) -> bool:
        for node in graph.node:
            if name in node.input:
                return True
            for attribute in node.attribute:
                subgraphs = [attribute.g] if attribute.HasField("g") else list(attribute.graphs)
                if any(reads(g) for g in subgraphs):
                    return True
        return False

    return reads(model.graph) or name in {o.name for o in model.graph.output}


@dataclass
class Rewrite:
    """New nodes and initializers, and which tensors they replace.

    before: tensor -> (replacement, nodes) for site inputs and weights: inserted before the first site that
      reads the tensor; only site inputs are rewired (other readers keep the float tensor).
    after: tensor -> (replacement, nodes) for layer outputs: inserted after the producer; every reader rewired.
    per_node: (node index, input index) -> (replacement, nodes) for biases, whose scale depends on the node.
    """

    names: _Names
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    before: dict[str, tuple[str, list[onnx.NodeProto]]] = field(default_factory=dict)
    after: dict[str, tuple[str, list[onnx.NodeProto]]] = field(default_factory=dict)
    per_node: dict[tuple[int, int], tuple[str, list[onnx.NodeProto]]] = field(default_factory=dict)

    def dequantize(
        self, base: str, codes: np.ndarray, scale: np.ndarray, axis: int | None
    ) -> tuple[str, onnx.NodeProto]:
        """An integer initializer and the DequantizeLinear that reads it (zero point 0, per tensor or along axis)."""
        names = [self.names.fresh(f"{base}_{suffix}") for suffix in ("quantized", "scale", "zero_point")]
        output = self.names.fresh(f"{base}_dequantized")
        zero = np.zeros(np.shape(scale), dtype=codes.dtype)
        self.initializers += [numpy_helper.from_array(a, n) for a, n in zip((codes, scale, zero), names, strict=True)]
        attributes = {} if axis is None else {"axis": axis}
        node = helper.make_node(
            "DequantizeLinear", names, [output], name=self.names.fresh(f"{base}_DequantizeLinear"), **attributes
        )
        return names[0], node

    def quantize_dequantize(self, tensor: str, grid: quant.ActivationGrid) -> tuple[str, list[onnx.NodeProto]]:
        """A QuantizeLinear → DequantizeLinear pair on an activation tensor."""
        dtype = np.uint8 if grid.dtype == "uint8" else np.int8
        fresh = self.names.fresh
        scale, zero = fresh(f"{tensor}_scale"), fresh(f"{tensor}_zero_point")
        quantized, output = fresh(f"{tensor}_quantized"), fresh(f"{tensor}_dequantized")
        self.initializers += [
            numpy_helper.from_array(np.asarray(grid.scale, np.float32), scale),
            numpy_helper.from_array(np.asarray(grid.zero_point, dtype), zero),
        ]
        return output, [
            helper.make_node("QuantizeLinear", [tensor, scale, zero], [quantized], name=fresh(f"{tensor}_Quantize")),
            helper.make_node(
                "DequantizeLinear", [quantized, scale, zero], [output], name=fresh(f"{tensor}_Dequantize")
            ),
        ]


@dataclass(frozen=True)
class QdqPlan:
    """What to write: weight grids by float initializer, activation grids by tensor, layer outputs by site index."""

    sites: list[Site]
    weights: dict[str, quant.WeightGrid]
    activations: dict[str, quant.ActivationGrid]
    layer_outputs: dict[int, str]
    bits: int
    scale: str
    granularity: str
    weight_format: str = "int"


def insert_qdq(model: onnx.ModelProto, plan: QdqPlan) -> tuple[dict, list[Decline]]:
    """Insert DequantizeLinear for weights and biases and Q/DQ pairs for activations in place; return the metadata
    and a Decline for every bias kept in float."""
    rewrite = Rewrite(_Names(model))
    metadata: dict = {
        "version": 1,
        "scale": plan.scale,
        "granularity": plan.granularity,
        "activation_bits": 8,
        "weights": {},
        "activations": {},
    }
    for weight, grid in plan.weights.items():
        scale = grid.scale[0] if grid.axis is None else grid.scale
        codes, node = rewrite.dequantize(weight, grid.codes, np.asarray(scale, np.float32), grid.axis)
        rewrite.before[weight] = (node.output[0], [node])
        reader = next(s for s in plan.sites if s.weight_input is not None and s.node.input[s.weight_input] == weight)
        metadata["weights"][codes] = {
            "node": reader.node.name,
            "float_weight": weight,
            "bits": plan.bits,
            "axis": grid.axis,
            "frac_length": None if grid.frac_length is None else plain(grid.frac_length, grid.axis),
        } | ({"format": plan.weight_format} if plan.weight_format != "int" else {})
    outputs = set(plan.layer_outputs.values())
    for tensor, grid in plan.activations.items():
        target = rewrite.after if tensor in outputs else rewrite.before
        target[tensor] = rewrite.quantize_dequantize(tensor, grid)
        metadata["activations"][tensor] = {
            "dtype": grid.dtype,
            "scale": grid.scale,
            "zero_point": grid.zero_point,
            "frac_length": grid.frac_length,
        }
    declines = []
    for site in plan.sites:
        if len(site.node.input) < 3 or not site.node.input[2]:
            continue  # no bias: nothing to quantize
        bias = _bias_nodes(rewrite, model, site, plan)
        if isinstance(bias, Decline):
            declines.append(bias)
        else:
            rewrite.per_node[(site.index, 2)] = bias
    _insert(model, plan.sites, rewrite)
    _store_metadata(model, metadata)
    return metadata, declines


def _bias_nodes(rewrite: Rewrite, model: onnx.ModelProto, site: Site, plan: QdqPlan
                ) -> tuple[str, list[onnx.NodeProto]] | Decline:
    """int32 bias with scale s_x · s_w (zero point 0), the standard QDQ form that lets runtimes fuse the node.

    For dfp the scale is 2^-(fl_x + fl_w), exact. Kept float when the node has no 1-D constant bias per output
    channel, when its data input or weight is not quantized, or when a code would overflow int32.
    """
    node = site.node

    def float_bias(code: str, why: str) -> Decline:
        return Decline(node.name, node.op_type, code, f"bias {node.input[2]!r} kept in float: {why}")

    if site.weight_input is None or node.input[0] not in plan.activations:
        return float_bias("input-not-quantized", "the data input or the weight is not quantized")
    tensor = next((t for t in model.graph.initializer if t.name == node.input[2]), None)
    grid = plan.weights[node.input[site.weight_input]]
    if tensor is None or tensor.data_type != TensorProto.FLOAT:
        return float_bias("not-float32", "it is not a float32 initializer")
    bias = numpy_helper.to_array(tensor).astype(np.float64)
    if bias.shape != (grid.codes.shape[site.channel_axis],):
        return float_bias("bias-shape", f"shape {list(bias.shape)} is not one value per output channel")
    scale = (np.float64(plan.activations[node.input[0]].scale) * grid.scale.astype(np.float64)).astype(np.float32)
    codes = np.rint(bias / scale.astype(np.float64))
    if not np.all(scale > 0) or np.abs(codes).max(initial=0) >= 2**31 - 1:
        return float_bias("int32-overflow", "its codes would overflow int32 (or a scale is 0)")
    per_channel = grid.axis is not None
    _, dq = rewrite.dequantize(
        node.input[2], codes.astype(np.int32), scale if per_channel else scale[0], 0 if per_channel else None
    )
    return dq.output[0], [dq]


def _insert(model: onnx.ModelProto, sites: list[Site], rewrite: Rewrite) -> None:
    """Place the new nodes, rewire their readers and drop float initializers nobody reads any more."""
    graph = model.graph
    by_index = {s.index: s for s in sites}
    pending = {tensor: nodes for tensor, (_, nodes) in rewrite.before.items()}
    replaced: set[str] = set()
    new_nodes: list[onnx.NodeProto] = []
    for position, original in enumerate(graph.node):
        node = onnx.NodeProto()
        node.CopyFrom(original)
        site = by_index.get(position)
        for index, tensor in enumerate(node.input):
            if (position, index) in rewrite.per_node:
                output, nodes = rewrite.per_node[(position, index)]
            elif tensor in rewrite.after:
                output, nodes = rewrite.after[tensor][0], []
            elif site is not None and tensor in rewrite.before and _quantizes(site, index):
                output, nodes = rewrite.before[tensor][0], pending.pop(tensor, [])
            else:
                continue
            new_nodes.extend(nodes)
            node.input[index] = output
            replaced.add(tensor)
        new_nodes.append(node)
        for tensor in node.output:
            if tensor in rewrite.after:
                new_nodes.extend(rewrite.after[tensor][1])
    del graph.node[:]
    graph.node.extend(new_nodes)
    constants = {t.name for t in graph.initializer}
    unused = {t for t in replaced if t in constants and not _still_read(model, t)}
    kept = [t for t in graph.initializer if t.name not in unused] + rewrite.initializers
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _quantizes(site: Site, index: int) -> bool:
    return index in site.activation_inputs or index == site.weight_input


def _store_metadata(model: onnx.ModelProto, metadata: dict) -> None:
    previous = metadata_value(model, METADATA_KEY)
    if previous is not None:
        earlier = json.loads(previous)
        for section in ("weights", "activations"):
            metadata[section] = {**earlier.get(section, {}), **metadata[section]}
    set_metadata(model, METADATA_KEY, json.dumps(metadata))
