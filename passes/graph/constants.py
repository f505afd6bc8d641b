"""The value a channel carries when it is one constant everywhere, pushed through an op by the op itself.

Rather than re-implementing every activation, the node is run by the ONNX reference evaluator on a tensor that
holds one value per channel (every other dim 1), with its constant inputs as they are. The result is kept for a
channel only when all its inputs were constant and the output is uniform over the other dims.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.reference import ReferenceEvaluator
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from passes.graph.channels import Space
from passes.graph.ir import GraphView


def _nan(count: int) -> np.ndarray:
    return np.full(count, np.nan)


def evaluate(view: GraphView, node: gs.Node, spaces: dict[int, Space], out_axis: int, count: int) -> np.ndarray:
    """Per-channel constants of `node.outputs[0]` given the spaces of its tracked inputs (index -> space).

    Inputs that are neither tracked nor constant make every channel vary (NaN).
    """
    known = np.ones(count, dtype=bool)
    for space in spaces.values():
        known &= np.isfinite(space.values)
    if not known.any():
        return _nan(count)
    feeds: dict[str, np.ndarray] = {}
    initializers = []
    names = []
    for i, tensor in enumerate(node.inputs):
        if not tensor.name:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        if i in spaces:
            rank = view.rank(tensor)
            if rank is None:
                return _nan(count)
            layout = [1] * rank
            layout[spaces[i].axis] = count
            filled = np.where(known, spaces[i].values, 0.0).reshape(layout)
            feeds[name] = filled.astype(view.dtype(tensor))
        else:
            value = view.constant(tensor)
            if value is None:
                return _nan(count)
            initializers.append(onnx.numpy_helper.from_array(np.asarray(value), name))
    try:
        result = _run(view, node, names, feeds, initializers)
    except Exception:  # an op the reference evaluator rejects on these shapes simply yields no constants
        return _nan(count)
    if result.ndim <= out_axis or result.shape[out_axis] != count:
        return _nan(count)
    columns = np.moveaxis(result.astype(np.float64), out_axis, 0).reshape(count, -1)
    uniform = np.all(columns == columns[:, :1], axis=1)
    return np.where(known & uniform & np.isfinite(columns[:, 0]), columns[:, 0], np.nan)


def _run(
    view: GraphView, node: gs.Node, names: list[str], feeds: dict[str, np.ndarray], initializers: list
) -> np.ndarray:
    proto = OnnxExporter.export_node(node)
    del proto.input[:]
    proto.input.extend(names)
    del proto.output[:]
    proto.output.extend(f"out{j}" for j in range(len(node.outputs)))
    graph = onnx.helper.make_graph(
        [proto],
        "channel_constants",
        [
            onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
            for n, v in feeds.items()
        ],
        [onnx.helper.make_tensor_value_info("out0", onnx.TensorProto.UNDEFINED, None)],
        initializer=initializers,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", view.opset)])
    return np.asarray(ReferenceEvaluator(model).run(["out0"], feeds)[0])
