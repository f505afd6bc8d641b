"""Model statistics: params, MACs, bytes, nodes, weight sparsity, and per-layer rows for `inspect`.

Figures are computed on the normalised model (optimizer.normalize: Constant-node weights are initializers,
constant subgraphs folded). MACs need static shapes: open dims take their sizes from `input_shapes` (e.g. the
calibration data's), axis 0 from `batch`; the model is then specialised to those sizes and its shape subgraphs
folded (for analysis only), so Reshape targets computed from `Shape` are known. A figure that still cannot be
computed is None, with a reason:

    >>> model_stats(bert)            # input_ids: int64[batch, sequence]
    {'params': 4_385_920, 'macs': None,
     'macs_note': "unknown: dim 1 ('sequence') of input 'input_ids' has no size; give --calibration", ...}
    >>> model_stats(bert, input_shapes={"input_ids": (32, 128)})["macs"]
    545_521_664

MACs count Conv/ConvTranspose/Gemm/MatMul (activation x activation MatMuls too: attention's Q·Kᵀ and A·V) and
the recurrent layers LSTM/GRU/RNN (input and recurrent matmuls of every gate, direction and time step).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from optimizer.rnn import RECURRENT_GATES, recurrent_macs

WEIGHTED_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, **{op: 1 for op in RECURRENT_GATES}}


def constant_weight(model: onnx.ModelProto, node: onnx.NodeProto, index: int = 1,
                    initializers: dict[str, onnx.TensorProto] | None = None,
                    producers: dict[str, onnx.NodeProto] | None = None) -> tuple[str, np.ndarray] | None:
    """The constant tensor feeding `node.input[index]`: an initializer, a Constant node's value, or one behind a
    DequantizeLinear (QDQ)."""
    initializers = initializers if initializers is not None else {t.name: t for t in model.graph.initializer}
    producers = producers if producers is not None else {o: n for n in model.graph.node for o in n.output}
    if index >= len(node.input) or not node.input[index]:
        return None
    name = node.input[index]
    if name in initializers:
        return name, numpy_helper.to_array(initializers[name])
    producer = producers.get(name)
    if producer is not None and producer.op_type == "Constant":
        value = next((a.t for a in producer.attribute if a.name == "value"), None)
        return (name, numpy_helper.to_array(value)) if value is not None else None
    if producer is not None and producer.op_type == "DequantizeLinear" and producer.input[0] in initializers:
        return producer.input[0], numpy_helper.to_array(initializers[producer.input[0]])
    return None


class Shapes:
    """Static shapes of a model's values for analysis, or the reason there are none.

    `of(name)` is the shape (list of ints) or None; `unknown` says why shapes are missing ("" when known).
    """

    def __init__(self, model: onnx.ModelProto, batch: int = 1,
                 input_shapes: Mapping[str, Sequence[int]] | None = None):
        self.unknown = ""
        self._shapes: dict[str, list[int]] = {}
        self._twins: dict[str, onnx.NodeProto] = {}  # node name -> the node in the folded graph
        specialised, self.unknown = _specialise(model, batch, input_shapes or {})
        if specialised is None:
            return
        from optimizer.normalize import fold_shapes, has_foldable_nodes

        folded = fold_shapes(specialised) if has_foldable_nodes(specialised.graph) else specialised
        try:
            inferred = shape_inference.infer_shapes(folded, data_prop=True)
        except Exception as e:  # stats are best effort: a model that fails inference still gets params and bytes
            self.unknown = f"unknown: shape inference failed ({str(e).strip().splitlines()[0] if str(e) else e})"
            return
        graph = inferred.graph
        for value in [*graph.input, *graph.value_info, *graph.output]:
            dims = value.type.tensor_type.shape.dim
            if value.type.HasField("tensor_type") and all(d.HasField("dim_value") for d in dims):
                self._shapes[value.name] = [d.dim_value for d in dims]
        for tensor in graph.initializer:
            self._shapes[tensor.name] = list(tensor.dims)
        # folding may rename a node's tensors (an Identity or a folded BatchNorm goes), so a node of the model
        # also finds its shapes through its namesake in the folded graph
        self._twins = {node.name: node for node in graph.node if node.name}

    def of(self, name: str) -> list[int] | None:
        return self._shapes.get(name)

    def output_of(self, node: onnx.NodeProto, index: int = 0) -> list[int] | None:
        return self._of_port(node, index, "output")

    def input_of(self, node: onnx.NodeProto, index: int = 0) -> list[int] | None:
        return self._of_port(node, index, "input")

    def _of_port(self, node: onnx.NodeProto, index: int, kind: str) -> list[int] | None:
        names = getattr(node, kind)
        shape = self._shapes.get(names[index]) if len(names) > index else None
        twin = self._twins.get(node.name) if shape is None and node.name else None
        if twin is not None and twin.op_type == node.op_type and len(getattr(twin, kind)) > index:
            shape = self._shapes.get(getattr(twin, kind)[index])
        return shape


def _specialise(model: onnx.ModelProto, batch: int, input_shapes: Mapping[str, Sequence[int]]
                ) -> tuple[onnx.ModelProto | None, str]:
    """A copy whose graph inputs have static dims, or (None, why) when a dim has no size."""
    from optimizer.data import graph_inputs

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    real = {v.name for v in graph_inputs(model)}
    for value in fixed.graph.input:
        if value.name not in real:
            continue
        given = input_shapes.get(value.name)
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            if axis == 0:
                size = batch
            elif given is not None and len(given) > axis:
                size = int(given[axis])
            else:
                name = f" ({dim.dim_param!r})" if dim.dim_param else ""
                return None, f"unknown: dim {axis}{name} of input {value.name!r} has no size; give --calibration"
            dim.Clear()
            dim.dim_value = size
    return fixed, ""


def _macs(node: onnx.NodeProto, weight: np.ndarray | None, shapes: Shapes) -> int | None:
    out = shapes.output_of(node) if node.output else None
    if node.op_type in RECURRENT_GATES:
        data = shapes.input_of(node, 0)
        return None if data is None or weight is None else recurrent_macs(node, data, weight.shape)
    if out is None:
        return None
    if node.op_type == "Conv":
        return math.prod(out) * math.prod(weight.shape[1:])
    if node.op_type == "ConvTranspose":
        inp = shapes.input_of(node, 0)
        return None if inp is None else math.prod(inp) * math.prod(weight.shape[1:])
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        b = list(weight.shape) if weight is not None else shapes.input_of(node, 1)
        return None if b is None else math.prod(out) * (b[1] if trans_b else b[0])
    if node.op_type == "MatMul":
        a = shapes.input_of(node, 0)
        return None if not a else math.prod(out) * a[-1]
    return None


def output_channel_axis(node: onnx.NodeProto, weight: np.ndarray) -> int:
    """The weight axis that indexes output channels: Conv [O, I/g, k...], ConvTranspose [I, O/g, k...],
    Gemm [K, N] (or [N, K] with transB), MatMul [..., K, N], LSTM/GRU/RNN W [dirs, gates*H, I] (axis 1)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose" or node.op_type in RECURRENT_GATES:
        return 1
    if node.op_type == "Gemm":
        return 0 if next((a.i for a in node.attribute if a.name == "transB"), 0) else 1
    return weight.ndim - 1


def layer_rows(model: onnx.ModelProto, batch: int = 1, *, input_shapes: Mapping[str, Sequence[int]] | None = None,
               shapes: Shapes | None = None) -> list[dict]:
    """One row per Conv/ConvTranspose/Gemm/MatMul/LSTM/GRU/RNN with a constant weight, and per MatMul of two
    activations (attention: params 0). `macs` is None when shapes are unknown, with `macs_note` saying why."""
    shapes = shapes if shapes is not None else Shapes(model, batch, input_shapes)
    initializers = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    rows = []
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS:
            continue
        found = constant_weight(model, node, 1, initializers, producers)
        if found is None and node.op_type != "MatMul":
            continue
        row = _weight_row(model, node, found, initializers, producers) if found else _activation_row(node)
        row["macs"] = _macs(node, found[1] if found else None, shapes)
        if row["macs"] is None:
            row["macs_note"] = shapes.unknown or f"unknown: the output shape of {row['node']!r} is not inferable"
        rows.append(row)
    return rows


def _weight_row(model, node, found, initializers, producers) -> dict:
    weight_name, weight = found
    params = int(weight.size)
    if node.op_type in RECURRENT_GATES:  # R and B are the layer's weights too
        for index in (2, 3):
            extra = constant_weight(model, node, index, initializers, producers)
            params += int(extra[1].size) if extra else 0
    out_axis = output_channel_axis(node, weight)
    moved = np.moveaxis(weight, out_axis, 0).reshape(weight.shape[out_axis], -1)
    return {
        "node": node.name or node.output[0],
        "op": node.op_type,
        "weight": weight_name,
        "weight_shape": list(weight.shape),
        "params": params,
        "sparsity": float(np.mean(weight == 0)) if weight.size else 0.0,
        "zero_channels": int(np.sum(~moved.any(axis=1))),
        "channels": int(weight.shape[out_axis]),
    }


def _activation_row(node: onnx.NodeProto) -> dict:
    return {"node": node.name or node.output[0], "op": node.op_type, "weight": None, "weight_shape": [],
            "params": 0, "sparsity": 0.0, "zero_channels": 0, "channels": 0}


def model_stats(model: onnx.ModelProto, batch: int = 1, *,
                input_shapes: Mapping[str, Sequence[int]] | None = None) -> dict:
    """{"params", "macs", "bytes", "nodes", "weight_sparsity"} — params counts every initializer element (load
    the model with optimizer.model.load_model, or normalise it, so Constant-node weights are initializers); macs
    is None when some layer's shapes are unknown, and "macs_note" says why."""
    rows = layer_rows(model, batch, input_shapes=input_shapes)
    weights = sum(r["params"] for r in rows)
    zeros = sum(r["params"] * r["sparsity"] for r in rows)
    unknown = [r for r in rows if r["macs"] is None]
    stats = {
        "params": int(sum(math.prod(t.dims) for t in model.graph.initializer)),
        "macs": None if unknown else int(sum(r["macs"] for r in rows)),
        "bytes": model.ByteSize(),
        "nodes": len(model.graph.node),
        "weight_sparsity": float(zeros / weights) if weights else 0.0,
    }
    if unknown:
        stats["macs_note"] = unknown[0]["macs_note"]
    elif inside := _weighted_in_bodies(model.graph):
        stats["macs_note"] = (f"partial: {inside} weighted nodes inside If/Loop/Scan bodies are not counted (a "
                              "body runs a data-dependent number of times, or not at all)")
    return stats


def _weighted_in_bodies(graph: onnx.GraphProto) -> int:
    count = 0
    for node in graph.node:
        for attribute in node.attribute:
            bodies = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
            for body in bodies:
                count += sum(n.op_type in WEIGHTED_OPS for n in body.node) + _weighted_in_bodies(body)
    return count
