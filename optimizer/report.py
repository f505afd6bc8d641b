"""Model statistics: params, MACs, bytes, nodes, weight sparsity, and per-layer rows for `inspect`."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

WEIGHTED_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


def constant_weight(model: onnx.ModelProto, node: onnx.NodeProto, index: int = 1,
                    initializers: dict[str, onnx.TensorProto] | None = None,
                    producers: dict[str, onnx.NodeProto] | None = None) -> tuple[str, np.ndarray] | None:
    """The constant tensor feeding `node.input[index]`: an initializer, or one behind a DequantizeLinear (QDQ)."""
    initializers = initializers if initializers is not None else {t.name: t for t in model.graph.initializer}
    producers = producers if producers is not None else {o: n for n in model.graph.node for o in n.output}
    if index >= len(node.input):
        return None
    name = node.input[index]
    if name in initializers:
        return name, numpy_helper.to_array(initializers[name])
    producer = producers.get(name)
    if producer is not None and producer.op_type == "DequantizeLinear" and producer.input[0] in initializers:
        return producer.input[0], numpy_helper.to_array(initializers[producer.input[0]])
    return None


def _shapes(model: onnx.ModelProto, batch: int) -> dict[str, list[int]]:
    """Static shapes of every value (dynamic dims resolved to `batch` on the inputs, then inferred)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value") or dim.dim_value <= 0:
                dim.Clear()
                dim.dim_value = batch
    try:
        fixed = shape_inference.infer_shapes(fixed, data_prop=True)
    except Exception:  # stats are best effort: a model that fails inference still gets params and bytes
        return {}
    shapes = {}
    for value in [*fixed.graph.input, *fixed.graph.value_info, *fixed.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    return shapes


def _macs(node: onnx.NodeProto, weight: np.ndarray, shapes: dict[str, list[int]]) -> int | None:
    out = shapes.get(node.output[0])
    if out is None:
        return None
    if node.op_type == "Conv":
        return math.prod(out) * math.prod(weight.shape[1:])
    if node.op_type == "ConvTranspose":
        inp = shapes.get(node.input[0])
        return None if inp is None else math.prod(inp) * math.prod(weight.shape[1:])
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return math.prod(out) * (weight.shape[1] if trans_b else weight.shape[0])
    if node.op_type == "MatMul":
        return math.prod(out) * weight.shape[-2]
    return None


def output_channel_axis(node: onnx.NodeProto, weight: np.ndarray) -> int:
    """The weight axis that indexes output channels: Conv [O, I/g, k...], ConvTranspose [I, O/g, k...],
    Gemm [K, N] (or [N, K] with transB), MatMul [..., K, N]."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if next((a.i for a in node.attribute if a.name == "transB"), 0) else 1
    return weight.ndim - 1


def layer_rows(model: onnx.ModelProto, batch: int = 1) -> list[dict]:
    """One row per Conv/ConvTranspose/Gemm/MatMul with a constant weight."""
    shapes = _shapes(model, batch)
    initializers = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    rows = []
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS:
            continue
        found = constant_weight(model, node, 1, initializers, producers)
        if found is None:
            continue
        weight_name, weight = found
        out_axis = output_channel_axis(node, weight)
        moved = np.moveaxis(weight, out_axis, 0).reshape(weight.shape[out_axis], -1)
        rows.append({
            "node": node.name or node.output[0],
            "op": node.op_type,
            "weight": weight_name,
            "weight_shape": list(weight.shape),
            "params": int(weight.size),
            "macs": _macs(node, weight, shapes),
            "sparsity": float(np.mean(weight == 0)) if weight.size else 0.0,
            "zero_channels": int(np.sum(~moved.any(axis=1))),
            "channels": int(weight.shape[out_axis]),
        })
    return rows


def model_stats(model: onnx.ModelProto, batch: int = 1) -> dict:
    """{"params", "macs", "bytes", "nodes", "weight_sparsity"} — params counts every initializer element."""
    rows = layer_rows(model, batch)
    weights = sum(r["params"] for r in rows)
    zeros = sum(r["params"] * r["sparsity"] for r in rows)
    macs = [r["macs"] for r in rows]
    return {
        "params": int(sum(math.prod(t.dims) for t in model.graph.initializer)),
        "macs": int(sum(m for m in macs if m is not None)),
        "bytes": model.ByteSize(),
        "nodes": len(model.graph.node),
        "weight_sparsity": float(zeros / weights) if weights else 0.0,
    }
